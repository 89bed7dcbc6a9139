"""Screen every class cheaply, converge only the classes that could be outliers (scan cost, after K-Arm).

K-Arm (Shen et al., ICML 2021, "Backdoor Scanning for Deep Neural Networks through K-Arm Optimization")
spends its optimisation on the classes that could carry a backdoor. Here, in the black-box setting:

1. **Pre-screening** (top-k labels only): a class that sits in the top ``topk`` labels of unusually many
   clean images of *other* classes (robust z of that count above ``topk_z``) is a candidate from the start and
   is searched to convergence. This only adds classes; it never excuses one.
2. **Reference sample**: ``reference`` classes (at least ``reference_min``, about ``reference_fraction`` of
   K), drawn by a seeded generator *before any query*, are searched to convergence. Because the draw does not
   look at the model, their converged log L1 are a simple random sample of the K classes' converged log L1:
   their median and MAD estimate those of all classes without bias.
3. **Screening budget**: every other class runs ``steps`` NES steps, then waits. Its L1 at that point,
   u_c, is an *upper bound* on the L1 it would converge to (the best working trigger so far; the whole image
   when none worked yet).
4. **Decision per waiting class**, once the reference classes are done. From the reference classes that were still
   searching after the screening budget (like every waiting class; one that had converged before it shrinks by 0
   afterwards and says nothing about a class still shrinking) we know how far such a class shrinks after the
   budget: d_r = log L1_r(final) - log u_r (<= 0), and take the largest shrink d_min = min_r d_r; with fewer than
   three of them nothing is learnt and no class stops. A waiting class c would converge to at least log u_c +
   d_min - ``margin`` if it shrinks like the reference classes do (plus a margin, in log units). The rule's flag
   threshold t (the largest L1 the outlier rule would still flag against the reference distribution, at the full K
   for the correction: :func:`gate.outliers.flag_threshold`) decides: when log u_c + d_min - margin > log t the
   class cannot be flagged and stops ("screened_out", its L1 reported as the upper bound u_c); otherwise it
   becomes a candidate and is searched to convergence like a reference class.

Why the outlier statistics stay unbiased: the median and MAD come only from the reference classes
(``find_outliers(..., reference=...)``): all of them converged, to the same standard, and drawn at random.
Upper bounds of screened-out classes never enter the reference, so they cannot pull the median up (which
would make every class look smaller, i.e. more flags) or widen the MAD. Candidates are selected for being
small, so they stay out of the reference too. Every class is still tested against the reference, and the
Šidák correction still counts all K classes. A class stopped early is stopped only when even its
extrapolated lower bound lies above the threshold: its true flag would have been "not flagged" unless it
shrinks by more than any reference class did plus the margin. That is the one assumption, and it is
measurable: the bench compares screened and unscreened verdicts (``python -m bench.cost``).

With K at most ``reference_min`` every class is a reference class and the scan is the unscreened one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gate.outliers import L1_FLOOR, MAD_CONSISTENCY, OutlierRule, flag_threshold
from gate.settings import Settings, integer, number, setting

SCREENED_OUT = "screened_out"


@dataclass(frozen=True)
class ScreeningParams(Settings):
    """How a screened scan spends its queries (policy section ``screening``)."""

    SECTION = "screening"
    FLAG_PREFIX = "screening-"

    steps: int = setting(90, integer(1), "NES steps every class gets before it may be stopped as not an outlier")
    reference_min: int = setting(10, integer(3), "classes searched to convergence as the reference, at least")
    reference_fraction: float = setting(0.25, number(0, 1), "... and about this fraction of the classes")
    margin: float = setting(1.5, number(0), "log units a waiting class may shrink beyond the largest shrink of "
                                            "the reference classes before the bound is trusted")
    topk: int = setting(3, integer(1), "pre-screening: the top labels of a clean image that are counted")
    topk_z: float = setting(3.0, number(0), "pre-screening: a class in unusually many images' top labels (robust z "
                                            "above this) is searched to convergence from the start")

    def reference_size(self, k: int) -> int:
        return min(k, max(self.reference_min, math.ceil(self.reference_fraction * k)))


def topk_candidates(probs: np.ndarray, topk: int, z_min: float) -> np.ndarray:
    """Classes in the top ``topk`` labels of unusually many clean images of other classes (bool per class).

    >>> p = np.tile(np.array([[0.6, 0.3, 0.1, 0.0, 0.0]]), (8, 1)); p[:4] = p[:4, [1, 0, 2, 3, 4]]
    >>> topk_candidates(p, 2, 3.0).tolist()  # every image's top two are classes 0 and 1, none ever 2, 3, 4
    [True, True, False, False, False]
    """
    n, k = probs.shape
    topk = min(topk, k)
    top = np.argsort(-probs, axis=1)[:, :topk]
    counts = np.zeros(k, np.int64)
    for j in range(1, topk):  # the runners-up: the image's own (predicted) label does not count
        np.add.at(counts, top[:, j], 1)
    med = float(np.median(counts))
    scale = max(MAD_CONSISTENCY * float(np.median(np.abs(counts - med))), 1.0, 0.05 * n / k)
    return (counts - med) / scale > z_min


@dataclass
class Screening:
    """Which classes converge and which stop after the screening budget (see the module docstring)."""

    params: ScreeningParams
    rule: OutlierRule
    reference: np.ndarray  # bool per class: searched to convergence, the reference distribution
    candidate: np.ndarray  # bool per class: searched to convergence (pre-screening or the decision)
    bound_at_screen: np.ndarray = field(default=None)  # log L1 of each class after the screening steps (NaN: not yet)
    waiting: np.ndarray = field(default=None)  # bool per class: paused after the screening steps, not decided
    running_at_screen: np.ndarray = field(default=None)  # bool per class: still searching after the screening steps
    decided: bool = False
    threshold: float | None = None  # the flag threshold against the reference (L1), once decided
    shrink: float | None = None  # d_min: the reference classes' largest log shrink after the screening steps
    pixels: int | None = None  # the input's height x width (the outlier rule's population test needs it)

    def __post_init__(self) -> None:
        k = len(self.reference)
        if self.bound_at_screen is None:
            self.bound_at_screen = np.full(k, np.nan)
        if self.waiting is None:
            self.waiting = np.zeros(k, bool)
        if self.running_at_screen is None:
            self.running_at_screen = np.zeros(k, bool)

    @classmethod
    def start(cls, k: int, params: ScreeningParams, rule: OutlierRule, seed: int,
              probs: np.ndarray | None = None, pixels: int | None = None) -> Screening:
        """The reference sample (from ``seed`` alone) and the pre-screened candidates (from clean ``probs``)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5C12EE7]))
        reference = np.zeros(k, bool)
        reference[rng.choice(k, params.reference_size(k), replace=False)] = True
        candidate = np.zeros(k, bool)
        if probs is not None and len(probs):
            candidate = topk_candidates(probs, params.topk, params.topk_z) & ~reference
        return cls(params, rule, reference, candidate, pixels=pixels)

    @property
    def active(self) -> bool:
        """False when every class is a reference class: the scan is the unscreened one."""
        return not self.reference.all()

    def converges(self, label: int) -> bool:
        return bool(self.reference[label] or self.candidate[label])

    def observe(self, label: int, step: int, l1: float, done: bool) -> bool:
        """A class's state after one of its steps; True when it must now wait for the decision."""
        if np.isnan(self.bound_at_screen[label]) and (step >= self.params.steps or done):
            self.bound_at_screen[label] = math.log(max(l1, L1_FLOOR))
            self.running_at_screen[label] = not done
        if self.decided or self.converges(label) or done or step < self.params.steps:
            return False
        self.waiting[label] = True
        return True

    def ready(self, done: np.ndarray) -> bool:
        """True when the decision can be taken: not yet taken, and every converging class (``done``: bool per
        class) is done."""
        return not self.decided and bool(np.all(done[self.reference | self.candidate]))

    def decide(self, l1: np.ndarray, converged: np.ndarray) -> tuple[list[int], list[int]]:
        """(classes to stop as not outliers, classes to search on), given every class's current L1 and whether
        its search converged, the reference classes done. The waiting classes are those two lists.

        The shrink is learnt from the reference classes that were still searching after the screening steps and
        then converged (one stopped by max_steps was still shrinking): only they are like a waiting class, which
        is by definition still searching; a class that had already converged shrinks by 0 and would teach a
        shrink no waiting class is bound by. With fewer than three of them nothing is learnt and every waiting
        class searches on."""
        k = len(l1)
        x = np.log(np.maximum(np.asarray(l1, np.float64), L1_FLOOR))
        ref = self.reference
        learnt = ref & np.asarray(converged, bool) & self.running_at_screen  # running_at_screen: bound recorded
        self.threshold = flag_threshold(np.asarray(l1)[ref], self.rule, k, self.pixels)
        self.shrink = float(min(0.0, np.min(x[learnt] - self.bound_at_screen[learnt]))) if learnt.sum() >= 3 else None
        stop, resume = [], []
        for c in np.flatnonzero(self.waiting):
            lower = -math.inf if self.shrink is None else self.bound_at_screen[c] + self.shrink - self.params.margin
            (stop if lower > math.log(max(self.threshold, L1_FLOOR)) else resume).append(int(c))
        self.candidate[resume] = True
        self.waiting[:] = False
        self.decided = True
        return stop, resume

    def summary(self) -> dict:
        """What the report keeps of the screening."""
        return {**self.params.to_dict(), "reference": np.flatnonzero(self.reference).tolist(),
                "candidates": np.flatnonzero(self.candidate).tolist(), "threshold_l1": self.threshold,
                "reference_shrink": self.shrink}

    def to_dict(self) -> dict:
        """The state a checkpoint keeps (see :mod:`gate.checkpoint`)."""
        return {"reference": self.reference.tolist(), "candidate": self.candidate.tolist(),
                "bound_at_screen": [None if np.isnan(v) else float(v) for v in self.bound_at_screen],
                "waiting": self.waiting.tolist(), "running_at_screen": self.running_at_screen.tolist(),
                "decided": self.decided, "threshold": self.threshold,
                "shrink": self.shrink}

    def restore(self, d: dict) -> None:
        if d["reference"] != self.reference.tolist():
            raise ValueError("the checkpoint's reference classes differ from this scan's")
        self.candidate = np.array(d["candidate"], bool)
        self.bound_at_screen = np.array([np.nan if v is None else v for v in d["bound_at_screen"]], np.float64)
        self.waiting = np.array(d["waiting"], bool)
        self.running_at_screen = np.array(d.get("running_at_screen", [False] * len(self.reference)), bool)
        self.decided, self.threshold, self.shrink = bool(d["decided"]), d["threshold"], d["shrink"]
