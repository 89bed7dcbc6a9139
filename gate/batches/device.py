"""A batch of stamped, model-encoded images in GPU memory, fed to ORT's CUDA provider through IOBinding.

The stamped batch never crosses to the host; only masks/patterns/images go up and (N, K) probabilities
come back.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from gate.batches.rows import Rows
from gate.kernels_cuda import perturb_encode, stamp_classes, stamp_encode


class DeviceBatch(Rows):
    """:class:`gate.batches.host.HostBatch` with the buffer in GPU memory (same interface)."""

    def __init__(self, oracle, capacity: int) -> None:
        super().__init__(capacity)
        self.oracle = oracle
        self.buffer = cuda.device_array(oracle.spec.model_shape(self.capacity), dtype=np.float32)
        scale, offset = oracle.affine
        self.scale = cuda.to_device(scale)
        self.offset = cuda.to_device(offset)
        self.channels_first = oracle.spec.channels_first
        self._pool_host = None
        self._pool_device = None
        self._grid_host = None
        self._grid_device = None

    def planar_patterns(self, shape: tuple[int, ...]) -> np.ndarray:
        """The scan's patterns array (K, n+1, gh, gw, C): plain here (copied to the GPU as it is each call)."""
        return np.empty(shape, np.float32)

    def _device_pool(self, pool):
        """The clean-image pool goes up once per scan, not once per round."""
        if self._pool_host is not pool:
            self._pool_host, self._pool_device = pool, cuda.to_device(np.ascontiguousarray(pool))
        return self._pool_device

    def add_classes(self, pool, classes, sample_idx, eval_idx, masks, patterns, grid) -> slice:
        rows = self._reserve(len(classes) * self.rows_per_class(masks, sample_idx, eval_idx))
        if self._grid_host is not grid:  # the grid's maps go up once per scan
            self._grid_host = grid
            self._grid_device = (cuda.to_device(grid.rows), cuda.to_device(grid.cols))
        stamp_classes(self._device_pool(pool), cuda.to_device(classes), cuda.to_device(sample_idx),
                      cuda.to_device(eval_idx), cuda.to_device(masks), cuda.to_device(patterns), *self._grid_device,
                      self.scale, self.offset, self.channels_first, self.buffer[rows])
        return rows

    def add_stamped(self, images, masks, patterns) -> slice:
        rows = self._reserve(len(masks) * len(images))
        stamp_encode(cuda.to_device(np.ascontiguousarray(images)), cuda.to_device(np.ascontiguousarray(masks)),
                     cuda.to_device(np.ascontiguousarray(patterns)), self.scale, self.offset,
                     self.channels_first, self.buffer[rows])
        return rows

    def add_perturbed(self, x, delta, sigma) -> slice:
        rows = self._reserve(delta.shape[0] * delta.shape[1])
        perturb_encode(cuda.to_device(np.ascontiguousarray(x)), cuda.to_device(np.ascontiguousarray(delta)),
                       sigma, self.scale, self.offset, self.channels_first, self.buffer[rows])
        return rows

    def run(self, log: bool = False) -> np.ndarray:
        n, self.size = self.size, 0
        cuda.synchronize()
        ptr = self.buffer.device_ctypes_pointer.value
        return self.oracle.run_device(ptr, n, log)
