"""A reusable buffer of stamped, model-encoded images that is sent to the oracle in one call.

Many classes' candidates are stamped side by side into one preallocated buffer, then one
``InferenceSession.run`` answers for all of them. :class:`HostBatch` does this in host memory with the
numba CPU kernels; :class:`gate.kernels_cuda.DeviceBatch` does the same in GPU memory and feeds ORT's
CUDA provider through IOBinding.
"""

from __future__ import annotations

import numpy as np

from gate.kernels import perturb_encode, stamp_classes, stamp_encode
from gate.oracle import Oracle


class Rows:
    """Row bookkeeping shared by the host and device batches: rows are handed out until ``run`` empties it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.size = 0

    def _reserve(self, n: int) -> slice:
        if self.size + n > self.capacity:
            raise ValueError(f"batch overflow: {self.size} + {n} rows > capacity {self.capacity}")
        rows = slice(self.size, self.size + n)
        self.size += n
        return rows

    @staticmethod
    def rows_per_class(masks: np.ndarray, sample_idx: np.ndarray, eval_idx: np.ndarray) -> int:
        """Rows one class takes in a scan round: n samples x B images, then the trigger x E images."""
        return (masks.shape[1] - 1) * sample_idx.shape[1] + eval_idx.shape[1]


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

    def add_classes(self, pool, classes, sample_idx, eval_idx, masks, patterns) -> slice:
        """One scan round for the given classes (see :func:`gate.kernels.stamp_classes`)."""
        rows = self._reserve(len(classes) * self.rows_per_class(masks, sample_idx, eval_idx))
        stamp_classes(pool, classes, sample_idx, eval_idx, masks, patterns, self.scale, self.offset,
                      self.channels_first, self.buffer[rows])
        return rows

    def add_perturbed(self, x: np.ndarray, delta: np.ndarray, sigma: float) -> slice:
        """Gaussian probes clip(x[i] + sigma*delta[i, j]) (image-major rows), for B3D-SS."""
        n = delta.shape[0] * delta.shape[1]
        rows = self._reserve(n)
        perturb_encode(x, delta, np.float32(sigma), self.scale, self.offset, self.channels_first,
                       self.buffer[rows])
        return rows

    def run(self) -> np.ndarray:
        """Probabilities for every row added since the last run; empties the batch."""
        n, self.size = self.size, 0
        return self.oracle.run_encoded(self.buffer[:n])


def make_batch(oracle: Oracle, capacity: int):
    """A device-resident batch when the oracle runs on CUDA and numba.cuda works, else a host one."""
    if oracle.on_cuda:
        from gate.kernels_cuda import DeviceBatch, cuda_usable

        if cuda_usable():
            return DeviceBatch(oracle, capacity)
    return HostBatch(oracle, capacity)
