"""An optional bandit over classes: stop the searches whose triggers are clearly not small.

After ``warmup`` steps, every ``every`` steps, classes above the ``keep`` quantile of the current L1
norms stop (those with a working trigger only). Off by default: see :mod:`gate.scan`.
"""

from __future__ import annotations

import numpy as np


class Bandit:
    def __init__(self, warmup: int, every: int, keep: float) -> None:
        self.warmup, self.every, self.keep = warmup, every, keep

    def losers(self, step: int, states: list) -> list[int]:
        """Indices of the running ``states`` (:class:`gate.search.SearchState`) to stop after ``step``."""
        if step < self.warmup or step % self.every:
            return []
        scores = np.array([s.result_l1 for s in states])
        cut = np.quantile(scores, self.keep)
        return [i for i, (s, v) in enumerate(zip(states, scores, strict=True))
                if not s.done and v > cut and s.best_mask is not None]
