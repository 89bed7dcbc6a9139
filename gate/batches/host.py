"""A batch of stamped, model-encoded images in host memory, filled by the numba CPU kernels."""

from __future__ import annotations

import numpy as np

from gate.batches.rows import Rows
from gate.grid import Grid
from gate.kernels import perturb_encode, stamp_classes, stamp_classes_planar, stamp_encode
from gate.oracle import Oracle


class HostBatch(Rows):
    def __init__(self, oracle: Oracle, capacity: int) -> None:
        super().__init__(capacity)
        self.oracle = oracle
        self.buffer = np.empty(oracle.spec.model_shape(self.capacity), dtype=np.float32)
        self.scale, self.offset = oracle.affine
        self.channels_first = oracle.spec.channels_first
        self._pool_source: np.ndarray | None = None  # channels first: the pool last seen, and it as (N, C, H, W)
        self._pool_planar: np.ndarray | None = None
        self._patterns_planar: np.ndarray | None = None  # scratch: one call's patterns as (G, n+1, C, gh, gw)

    def add_stamped(self, images: np.ndarray, masks: np.ndarray, patterns: np.ndarray) -> slice:
        """Stamp every (mask, pattern) on every image; returns the rows they occupy (trigger-major)."""
        n = len(masks) * len(images)
        rows = self._reserve(n)
        stamp_encode(images, masks, patterns, self.scale, self.offset, self.channels_first, self.buffer[rows])
        return rows

    def add_classes(self, pool, classes, sample_idx, eval_idx, masks, patterns, grid: Grid) -> slice:
        """One scan round for the given classes, their triggers on ``grid`` (see :func:`gate.kernels.stamp_classes`).

        For a channels-first model the pool is transposed to (N, C, H, W) once (kept while the same pool comes
        back) and the patterns are read as (K, n+1, C, gh, gw), so that the stamping kernel reads every operand in
        the order it writes (:func:`gate.kernels.stamp_classes_planar`): in place when ``patterns`` is a view of
        such an array (:func:`planar_patterns`, what the scan allocates), else copied per call."""
        rows = self._reserve(len(classes) * self.rows_per_class(masks, sample_idx, eval_idx))
        if not self.channels_first:
            stamp_classes(pool, classes, sample_idx, eval_idx, masks, patterns, grid.rows, grid.cols, self.scale,
                          self.offset, False, self.buffer[rows])
            return rows
        planar = patterns.transpose(0, 1, 4, 2, 3)
        if planar.flags.c_contiguous:  # the scan keeps its patterns planar (planar_patterns): read them in place
            which = classes
        else:
            planar, which = self._planar_patterns(patterns, classes), np.arange(len(classes), dtype=np.int64)
        stamp_classes_planar(self._planar_pool(pool), classes, sample_idx, eval_idx, masks, planar, which, grid.rows,
                             grid.cols, self.scale, self.offset, grid.coarse, self.buffer[rows])
        return rows

    def planar_patterns(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised float32 patterns array of ``shape`` (K, n+1, gh, gw, C) for the scan's searches to
        write: for a channels-first model a view of a (K, n+1, C, gh, gw) array, which add_classes stamps from in
        place (the searches write through the view; nothing is copied per call)."""
        if not self.channels_first:
            return np.empty(shape, np.float32)
        k, n, gh, gw, c = shape
        return np.empty((k, n, c, gh, gw), np.float32).transpose(0, 1, 3, 4, 2)

    def _planar_pool(self, pool: np.ndarray) -> np.ndarray:
        if self._pool_source is not pool:
            self._pool_source = pool
            self._pool_planar = np.ascontiguousarray(pool.transpose(0, 3, 1, 2))
        return self._pool_planar

    def _planar_patterns(self, patterns: np.ndarray, classes: np.ndarray) -> np.ndarray:
        shape = (len(classes), *patterns.shape[1:2], patterns.shape[4], *patterns.shape[2:4])
        if self._patterns_planar is None or self._patterns_planar.shape[0] < shape[0] \
                or self._patterns_planar.shape[1:] != shape[1:]:
            self._patterns_planar = np.empty(shape, np.float32)
        out = self._patterns_planar[:shape[0]]
        for g, cls in enumerate(classes):
            np.copyto(out[g], patterns[cls].transpose(0, 3, 1, 2))
        return out

    def add_perturbed(self, x: np.ndarray, delta: np.ndarray, sigma: float) -> slice:
        """Gaussian probes clip(x[i] + sigma*delta[i, j]) (image-major rows), for B3D-SS."""
        n = delta.shape[0] * delta.shape[1]
        rows = self._reserve(n)
        perturb_encode(x, delta, np.float32(sigma), self.scale, self.offset, self.channels_first,
                       self.buffer[rows])
        return rows

    def run(self, log: bool = False) -> np.ndarray:
        """Probabilities (with ``log``: log-probabilities) for every row added since the last run; empties
        the batch."""
        n, self.size = self.size, 0
        return self.oracle.run_encoded(self.buffer[:n], log)
