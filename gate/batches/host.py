"""A batch of stamped, model-encoded images in host memory, filled by the numba CPU kernels."""

from __future__ import annotations

import numpy as np

from gate.batches.rows import Rows
from gate.grid import Grid
from gate.kernels import perturb_encode, stamp_classes, stamp_encode
from gate.oracle import Oracle


class HostBatch(Rows):
    def __init__(self, oracle: Oracle, capacity: int) -> None:
        super().__init__(capacity)
        self.oracle = oracle
        self.buffer = np.empty(oracle.spec.model_shape(self.capacity), dtype=np.float32)
        self.scale, self.offset = oracle.affine
        self.channels_first = oracle.spec.channels_first

    def add_stamped(self, images: np.ndarray, masks: np.ndarray, patterns: np.ndarray) -> slice:
        """Stamp every (mask, pattern) on every image; returns the rows they occupy (trigger-major)."""
        n = len(masks) * len(images)
        rows = self._reserve(n)
        stamp_encode(images, masks, patterns, self.scale, self.offset, self.channels_first, self.buffer[rows])
        return rows

    def add_classes(self, pool, classes, sample_idx, eval_idx, masks, patterns, grid: Grid) -> slice:
        """One scan round for the given classes, their triggers on ``grid`` (see :func:`gate.kernels.stamp_classes`)."""
        rows = self._reserve(len(classes) * self.rows_per_class(masks, sample_idx, eval_idx))
        stamp_classes(pool, classes, sample_idx, eval_idx, masks, patterns, grid.rows, grid.cols, self.scale,
                      self.offset, self.channels_first, self.buffer[rows])
        return rows

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
