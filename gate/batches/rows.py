"""Row bookkeeping shared by the host and device batches."""

from __future__ import annotations

import numpy as np

from gate.kernels import round_rows


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
        return round_rows(masks.shape[1] - 1, sample_idx.shape[1], eval_idx.shape[1])
