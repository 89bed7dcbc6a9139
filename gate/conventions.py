"""The common input conventions of image classifiers, and how well each fits a model's labelled data.

A model trained on images in [0, 255] or with ImageNet's mean and std subtracted still answers when it is
fed [0, 1] images: wrongly, and without a word. :func:`compare_conventions` runs the labelled clean images
through the model under each convention (value range 1 or 255, no normalisation, [-1, 1] or ImageNet
mean/std, or the labelled data's own per-channel mean and std, which is what a vendor that normalises with its
training set's statistics used when the data comes from the same distribution; each layout the input shape
allows) and measures the accuracy of each; the one the model was trained with stands out. ``gate inspect MODEL
--data D`` prints the table.

:func:`check_convention` is the scan's version (``gate run`` / ``gate scan`` with labelled data and no range,
mean or std stated): every convention is measured on the same seeded sample of :data:`PROBE_IMAGES` labelled
images, and the scan switches to the best one when it beats the one in use beyond chance (McNemar's exact test on
the images the two classify differently, p below :data:`SWITCH_P`) and is itself better than guessing (a binomial
test against one in K classes, p below :data:`SWITCH_P`: labels that are not the model's must not pick one).
A model that wants [0, 255] fed [0, 1] images is near chance; one normalised with its training set's mean and std
may still classify half of the images under [0, 1] (wide zoo, GTSRB: 0.50-0.79 against 0.80-0.98: ``python -m
bench.conventions``), and a scan under the wrong convention searches triggers for inputs the model never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from gate.errors import GateError
from gate.oracle import Oracle
from gate.spec import LAYOUTS, SpecOverrides, resolve_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGES = 2000  # labelled images each convention is measured on at most
PROBE_IMAGES = 100  # labelled images a scan measures its convention on (check_convention)
SWITCH_P = 1e-3  # McNemar p-value under which a better-fitting convention replaces the one in use


@dataclass(frozen=True)
class Convention:
    layout: str
    value_range: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    name: str  # the normalisation in words

    @property
    def label(self) -> str:
        return f"{self.layout} {self.name}"

    def flags(self) -> str:
        """The command-line flags that state this convention."""
        out = [f"--layout {self.layout}", f"--input-range {self.value_range:g}"]
        if self.mean is not None:
            out += [f"--mean {','.join(f'{v:g}' for v in self.mean)}", f"--std {','.join(f'{v:g}' for v in self.std)}"]
        else:
            out.append("and no --mean/--std")
        return " ".join(out)

    def same_as(self, layout: str, value_range: float, mean, std) -> bool:
        def close(a, b):
            return (a is None and b is None) or (a is not None and b is not None and len(a) == len(b)
                                                 and np.allclose(a, b, rtol=1e-4))
        return (layout == self.layout and float(value_range) == self.value_range and close(mean, self.mean)
                and close(std, self.std))


@dataclass(frozen=True)
class Fit:
    convention: Convention
    accuracy: float | None  # None: this layout cannot read the input shape with these images
    note: str = ""
    correct: np.ndarray | None = field(default=None, compare=False, repr=False)  # per image, when measured


def data_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of float NHWC [0, 1] images, to 4 decimals: a vendor that normalises with its
    training set's statistics used about these, when the images are from the same distribution."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    mean, std = flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def normalisations(channels: int, stats: tuple | None = None) -> list[tuple[float, tuple | None, tuple | None, str]]:
    """(value range, mean, std, name) of the common normalisations for a model with ``channels`` channels; with
    ``stats`` (:func:`data_stats` of the labelled images) also the data's own mean and std."""
    half = (0.5,) * channels
    out = [(1.0, None, None, "[0,1]"), (255.0, None, None, "[0,255]"), (1.0, half, half, "[-1,1] (mean 0.5, std 0.5)")]
    if channels == 3:
        out += [(1.0, IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std on [0,1]"),
                (255.0, tuple(255 * v for v in IMAGENET_MEAN), tuple(255 * v for v in IMAGENET_STD),
                 "ImageNet mean/std on [0,255]")]
    if stats is not None and len(stats[0]) == channels:
        out.append((1.0, stats[0], stats[1], "the data's own mean/std"))
    return out


def compare_conventions(oracle: Oracle, x: np.ndarray, y: np.ndarray, stats: tuple | None = None) -> list[Fit]:
    """Accuracy on (``x`` float NHWC [0, 1], ``y``) under every common convention, best first; ``stats``: the
    labelled data's own mean and std (:func:`data_stats`), one more convention to try."""
    x, y = x[:MAX_IMAGES], y[:MAX_IMAGES]
    fits = []
    for layout in LAYOUTS:
        try:
            _, h, w, c, _ = resolve_layout(oracle.input_shape, layout, oracle.overrides.size)
        except GateError as exc:
            for value_range, mean, std, name in normalisations(oracle.spec.channels, stats):
                fits.append(Fit(Convention(layout, value_range, mean, std, name), None, str(exc)))
            continue
        for value_range, mean, std, name in normalisations(c, stats):
            convention = Convention(layout, value_range, mean, std, name)
            if (h, w, c) != x.shape[1:]:
                fits.append(Fit(convention, None, f"the input shape read as {layout} takes {h}x{w}x{c} images, "
                                                  f"not {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"))
                continue
            try:
                view = convention_view(oracle, convention)
            except GateError as exc:  # e.g. a uint8 input takes no other range
                fits.append(Fit(convention, None, str(exc)))
                continue
            correct = view.predict(x) == y
            fits.append(Fit(convention, float(np.mean(correct)), correct=correct))
    return _best_first(fits)


def _best_first(fits: list[Fit]) -> list[Fit]:
    """Measured fits by accuracy, best first (ties keep their order), then those not measured."""
    return sorted(fits, key=lambda f: (f.accuracy is None, -(f.accuracy or 0.0)))


def convention_view(oracle: Oracle, convention: Convention) -> Oracle:
    """``oracle`` under ``convention`` (its output kind, size and output kept); the view counts its own queries."""
    o = oracle.overrides
    return oracle.with_spec(SpecOverrides(layout=convention.layout, value_range=convention.value_range,
                                          mean=convention.mean, std=convention.std, output_kind=oracle.spec.output_kind,
                                          size=o.size, output_name=o.output_name))


def in_use(oracle: Oracle) -> Convention:
    """The convention ``oracle`` runs under, named as the common ones are where it is one of them."""
    s = oracle.spec
    for value_range, mean, std, name in normalisations(s.channels):
        c = Convention(s.layout, value_range, mean, std, name)
        if c.same_as(s.layout, s.value_range, s.mean, s.std):
            return c
    return Convention(s.layout, s.value_range, s.mean, s.std, "as stated")


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value that per-image correctness ``a`` and ``b`` (same images) are equally good."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def chance_p(correct: int, n: int, chance: float) -> float:
    """One-sided binomial p-value of ``correct`` of ``n`` right or more by guessing (each right with ``chance``)."""
    return min(1.0, sum(math.comb(n, i) * chance ** i * (1 - chance) ** (n - i) for i in range(correct, n + 1)))


@dataclass(frozen=True)
class ConventionCheck:
    """What :func:`check_convention` measured and decided."""

    images: int  # labelled images measured on
    in_use: Convention  # the convention the scan was opened with
    accuracy: float  # its accuracy on them
    fits: list[Fit]  # every convention tried, the one in use included, best first
    chosen: Convention | None  # the convention switched to, or None
    p_value: float | None  # McNemar, the best against the one in use (None: not compared)
    queries: int

    def to_dict(self) -> dict:
        return {"images": self.images, "in_use": self.in_use.label, "accuracy": self.accuracy,
                "switched_to": None if self.chosen is None else self.chosen.label,
                "flags": None if self.chosen is None else self.chosen.flags(), "p_value": self.p_value,
                "fits": {f.convention.label: f.accuracy for f in self.fits if f.accuracy is not None},
                "queries": self.queries}

    def sentence(self) -> str:
        if self.chosen is None:
            return ""
        best = next(f for f in self.fits if f.convention == self.chosen)
        return (f"input convention: {self.in_use.label} classifies {self.accuracy:.0%} of {self.images} labelled "
                f"images, {self.chosen.label} {best.accuracy:.0%} (McNemar p {self.p_value:.1e}): scanning under "
                f"{self.chosen.label}; state the input convention to skip this ({self.chosen.flags()})")


def probe_indices(n: int, seed: int = 0) -> np.ndarray:
    """Which of ``n`` labelled images :func:`check_convention` measures on (seeded, in order)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(PROBE_IMAGES, n), replace=False))


def most_queries(oracle: Oracle, images: int) -> int:
    """The most queries :func:`check_convention` can make on ``images`` labelled images: the sample once per
    convention of each layout (the common ones and the data's own mean/std), and once more for the convention in
    use when it is none of them."""
    return min(PROBE_IMAGES, images) * (1 + len(LAYOUTS) * (len(normalisations(oracle.spec.channels)) + 1))


def check_convention(oracle: Oracle, x: np.ndarray, y: np.ndarray, seed: int = 0) -> ConventionCheck:
    """Measure every convention on a seeded sample of labelled images (``x`` float NHWC [0, 1], ``y``) and pick
    the best when it beats the one in use beyond chance (module docstring). Every image goes through a view of
    ``oracle`` (its own count stays as it was); queries: the sample's, once per convention the input shape allows
    (at most :func:`most_queries`)."""
    pick = probe_indices(len(x), seed)
    n = len(pick)
    x_probe, y_probe = x[pick], y[pick]
    current = in_use(oracle)
    fits = [f for f in compare_conventions(oracle, x_probe, y_probe, data_stats(x))
            if oracle.overrides.layout is None or f.convention.layout == current.layout]
    mine = next((f for f in fits if f.accuracy is not None and f.convention.same_as(
        current.layout, current.value_range, current.mean, current.std)), None)
    if mine is None:  # the convention in use is none of the common ones
        correct = convention_view(oracle, current).predict(x_probe) == y_probe
        mine = Fit(current, float(np.mean(correct)), correct=correct)
        fits = _best_first([mine, *fits])
    queries = n * sum(f.accuracy is not None for f in fits)
    best = fits[0]
    if best is mine:
        return ConventionCheck(n, current, mine.accuracy, fits, None, None, queries)
    p = mcnemar_p(best.correct, mine.correct)
    better = p < SWITCH_P and chance_p(int(best.correct.sum()), n, 1.0 / oracle.num_classes) < SWITCH_P
    return ConventionCheck(n, current, mine.accuracy, fits, best.convention if better else None, p, queries)


def switch(oracle: Oracle, check: ConventionCheck) -> Oracle:
    """``oracle`` under the convention ``check`` chose, its queries counted on from all the check made (so a hard
    budget still holds), the spec saying the convention was detected."""
    view = convention_view(oracle, check.chosen)
    view.queries = oracle.queries + check.queries  # the check's views' queries
    view.spec = replace(view.spec, detected=oracle.spec.detected + ("convention",))
    return view
