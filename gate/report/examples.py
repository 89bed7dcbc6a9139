"""Clean images with a class's reversed trigger stamped on, and what the model says about them.

This is the one part of reporting that queries the model (through the oracle); the renderers only get
the :class:`Example` objects it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gate.report.images import stamp
from gate.result import Triggers


@dataclass
class Example:
    target: int  # the class whose trigger was stamped
    clean: np.ndarray  # (H, W, C) float [0, 1]
    stamped: np.ndarray  # (H, W, C) float [0, 1]
    clean_pred: int
    stamped_pred: int
    label: int | None = None  # ground truth of the clean image, when known


def example_cost(num_classes: int, per_class: int, n_images: int) -> int:
    """Queries :func:`stamp_examples` will send for ``n_images`` candidate clean images."""
    pool = min(n_images, max(4 * per_class, 16))
    return pool + num_classes * min(per_class, pool)


def stamp_examples(oracle, x: np.ndarray, triggers: Triggers, *, y: np.ndarray | None = None,
                   per_class: int = 3, seed: int = 0) -> dict[int, list[Example]]:
    """``per_class`` examples for every class in ``triggers`` (pass ``triggers.select(labels)`` for
    fewer), on clean images the model does not already assign to that class; one model call for the
    clean images and one for all stamped ones."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(x))[: min(len(x), max(4 * per_class, 16))]
    clean = np.ascontiguousarray(x[pool], dtype=np.float32)
    clean_pred = oracle.predict(clean)
    chosen: list[tuple[int, np.ndarray]] = []
    for label in triggers.labels:
        label = int(label)
        others = np.flatnonzero(clean_pred != label)
        if len(others) == 0:
            others = np.arange(len(pool))
        chosen.append((label, others[:per_class]))
    batches = [stamp(clean[idx], triggers.masks[i], triggers.patterns[i]) for i, (_, idx) in enumerate(chosen)]
    stamped = np.concatenate(batches) if batches else np.zeros((0, *clean.shape[1:]), np.float32)
    stamped_pred = oracle.predict(stamped) if len(stamped) else np.zeros(0, np.int64)
    out: dict[int, list[Example]] = {}
    row = 0
    for (label, idx), batch in zip(chosen, batches, strict=True):
        exs = []
        for j, i in enumerate(idx):
            exs.append(Example(label, clean[i], batch[j], int(clean_pred[i]), int(stamped_pred[row + j]),
                               None if y is None else int(y[pool[i]])))
        row += len(idx)
        out[label] = exs
    return out
