"""The coarse grid a trigger is searched on for inputs larger than 32x32 (``search.grid_cells``).

A 224x224 input has 50,176 mask pixels; NES estimates a gradient over every one of them from k samples,
so the search's noise grows with the input while a backdoor's patch stays a few percent of the image. The
mask and the pattern are therefore searched on a grid of square cells, at most ``grid_cells`` per side
(cell = ceil(max(H, W) / grid_cells) pixels; the last row or column of cells may be cut by the image's
edge), and each cell covers its pixels: m(r, c) = m_grid(r // cell, c // cell), the same for the pattern.
Nothing else changes: the objective is the pixel-space one, restricted to masks and patterns that are
constant on each cell. In particular every L1 is in pixels (a cell's mask value counts once per pixel it
covers: :attr:`Grid.area`), so the outlier statistics, the lambda penalty, mask fractions and the reports
mean what they mean at full resolution, and a 32x32 input (cell 1) is searched pixel by pixel, exactly as
without a grid.

The stamping kernels read the grid directly through the row and column maps (:attr:`Grid.rows`,
:attr:`Grid.cols`: pixel -> cell), so a round never materialises full-resolution masks; the reversed
triggers a scan reports are upsampled once (:meth:`Grid.up`) and stamp like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def cell_size(h: int, w: int, grid_cells: int) -> int:
    """Pixels per cell side: the smallest cell that puts at most ``grid_cells`` cells on each side (0: 1).

    >>> cell_size(32, 32, 32), cell_size(128, 128, 32), cell_size(224, 224, 32), cell_size(299, 299, 32)
    (1, 4, 7, 10)
    >>> cell_size(224, 224, 0)
    1
    """
    if grid_cells <= 0:
        return 1
    return max(1, math.ceil(max(h, w) / grid_cells))


@dataclass(frozen=True)
class Grid:
    """The search grid of an H x W input with square cells of ``cell`` pixels."""

    h: int
    w: int
    cell: int = 1
    rows: np.ndarray = field(init=False, repr=False, compare=False)  # (H,) int64: pixel row -> cell row
    cols: np.ndarray = field(init=False, repr=False, compare=False)  # (W,) int64: pixel column -> cell column
    area: np.ndarray = field(init=False, repr=False, compare=False)  # (gh, gw) float64: pixels each cell covers

    def __post_init__(self) -> None:
        if self.cell < 1 or self.h < 1 or self.w < 1:
            raise ValueError(f"a grid needs positive sizes, not {self.h}x{self.w} with cell {self.cell}")
        rows = np.arange(self.h, dtype=np.int64) // self.cell
        cols = np.arange(self.w, dtype=np.int64) // self.cell
        area = np.outer(np.bincount(rows), np.bincount(cols)).astype(np.float64)
        for name, value in (("rows", rows), ("cols", cols), ("area", area)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def for_image(cls, h: int, w: int, grid_cells: int) -> Grid:
        return cls(h, w, cell_size(h, w, grid_cells))

    @property
    def shape(self) -> tuple[int, int]:
        """(cell rows, cell columns)."""
        return self.area.shape

    @property
    def coarse(self) -> bool:
        """Whether a cell covers more than one pixel."""
        return self.cell > 1

    @property
    def cell_area(self) -> int:
        """Pixels of a whole cell (1 on a pixel grid): what the lambda penalty divides by (gate.search)."""
        return self.cell * self.cell

    @property
    def pixels(self) -> int:
        return self.h * self.w

    def weigh(self, a: np.ndarray) -> np.ndarray:
        """Per-cell values (..., gh, gw) times the pixels each cell covers (on a pixel grid: ``a`` itself)."""
        return a * self.area if self.coarse else a

    def l1(self, mask: np.ndarray) -> float:
        """The L1 norm in pixels of a grid mask (gh, gw): each cell counts once per pixel it covers."""
        return float(self.weigh(mask).sum())

    def up(self, a: np.ndarray, *, channels: bool = False) -> np.ndarray:
        """Grid arrays (..., gh, gw) (``channels``: (..., gh, gw, C)) at the input's resolution (..., H, W[, C]).

        >>> g = Grid(5, 4, 2)
        >>> g.shape, g.area.tolist()
        ((3, 2), [[4.0, 4.0], [4.0, 4.0], [2.0, 2.0]])
        >>> g.up(np.arange(6.0).reshape(3, 2)).tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]]
        """
        if not self.coarse:
            return a
        axis = a.ndim - (3 if channels else 2)
        return np.take(np.take(a, self.rows, axis=axis), self.cols, axis=axis + 1)
