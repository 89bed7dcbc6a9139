"""The common input conventions of image classifiers, and how well each fits a model's labelled data.

A model trained on images in [0, 255] or with ImageNet's mean and std subtracted still answers when it is
fed [0, 1] images: wrongly, and without a word. :func:`compare_conventions` runs the labelled clean images
through the model under each convention (value range 1 or 255, no normalisation, [-1, 1] or ImageNet
mean/std, each layout the input shape allows) and measures the accuracy of each; the one the model was
trained with stands out. ``gate inspect MODEL --data D`` prints the table.

:func:`check_convention` is the scan's version (``gate run`` / ``gate scan`` with labelled data and no range,
mean or std stated): the convention in use is measured on a seeded sample of :data:`PROBE_IMAGES` labelled
images; when its accuracy is under the clean-accuracy floor, every common convention is measured on the same
images, and the scan switches to the best one when that one clears the floor and beats the one in use beyond
chance (McNemar's exact test on the images the two classify differently, p below :data:`SWITCH_P`). A model fed
[0, 1] images that wants [0, 255] or ImageNet normalisation is otherwise near chance, and its scan can only end
in review; a convention that fits moderately (above the floor) is kept, as stated or detected.
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


def normalisations(channels: int) -> list[tuple[float, tuple | None, tuple | None, str]]:
    """(value range, mean, std, name) of the common normalisations for a model with ``channels`` channels."""
    half = (0.5,) * channels
    out = [(1.0, None, None, "[0,1]"), (255.0, None, None, "[0,255]"), (1.0, half, half, "[-1,1] (mean 0.5, std 0.5)")]
    if channels == 3:
        out += [(1.0, IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std on [0,1]"),
                (255.0, tuple(255 * v for v in IMAGENET_MEAN), tuple(255 * v for v in IMAGENET_STD),
                 "ImageNet mean/std on [0,255]")]
    return out


def compare_conventions(oracle: Oracle, x: np.ndarray, y: np.ndarray) -> list[Fit]:
    """Accuracy on (``x`` float NHWC [0, 1], ``y``) under every common convention, best first."""
    x, y = x[:MAX_IMAGES], y[:MAX_IMAGES]
    fits = []
    for layout in LAYOUTS:
        try:
            _, h, w, c, _ = resolve_layout(oracle.input_shape, layout, oracle.overrides.size)
        except GateError as exc:
            for value_range, mean, std, name in normalisations(oracle.spec.channels):
                fits.append(Fit(Convention(layout, value_range, mean, std, name), None, str(exc)))
            continue
        for value_range, mean, std, name in normalisations(c):
            convention = Convention(layout, value_range, mean, std, name)
            if (h, w, c) != x.shape[1:]:
                fits.append(Fit(convention, None, f"the input shape read as {layout} takes {h}x{w}x{c} images, "
                                                  f"not {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"))
                continue
            correct = convention_view(oracle, convention).predict(x) == y
            fits.append(Fit(convention, float(np.mean(correct)), correct=correct))
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


@dataclass(frozen=True)
class ConventionCheck:
    """What :func:`check_convention` measured and decided."""

    images: int  # labelled images measured on
    in_use: Convention  # the convention the scan was opened with
    accuracy: float  # its accuracy on them
    fits: list[Fit]  # every common convention, best first (empty: the one in use cleared the floor)
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


def most_queries(oracle: Oracle, images: int) -> int:
    """The most queries :func:`check_convention` can make on ``images`` labelled images."""
    return min(PROBE_IMAGES, images) * (1 + len(LAYOUTS) * len(normalisations(oracle.spec.channels)))


def check_convention(oracle: Oracle, x: np.ndarray, y: np.ndarray, floor: float, seed: int = 0) -> ConventionCheck:
    """Measure the convention in use on a seeded sample of labelled images (``x`` float NHWC [0, 1], ``y``);
    under ``floor`` measure the common ones too and pick the best when it clears the floor and beats the one in use
    beyond chance (module docstring). Queries: those of the sample, and of each other convention when measured
    (at most :func:`most_queries`)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(PROBE_IMAGES, len(x)), replace=False))
    x, y = x[pick], y[pick]
    current = in_use(oracle)
    correct = oracle.predict(x) == y
    accuracy, queries = float(np.mean(correct)), len(x)
    if accuracy >= floor:
        return ConventionCheck(len(x), current, accuracy, [], None, None, queries)
    others = [f for f in compare_conventions(oracle, x, y) if not f.convention.same_as(
        current.layout, current.value_range, current.mean, current.std)
        and (oracle.overrides.layout is None or f.convention.layout == current.layout)]
    queries += sum(len(x) for f in others if f.accuracy is not None)
    fits = sorted([Fit(current, accuracy, correct=correct), *others],
                  key=lambda f: (f.accuracy is None, -(f.accuracy or 0.0)))
    best = fits[0]
    if best.convention == current or best.accuracy is None:
        return ConventionCheck(len(x), current, accuracy, fits, None, None, queries)
    p = mcnemar_p(best.correct, correct)
    chosen = best.convention if best.accuracy >= floor and p < SWITCH_P else None
    return ConventionCheck(len(x), current, accuracy, fits, chosen, p, queries)


def switch(oracle: Oracle, check: ConventionCheck) -> Oracle:
    """``oracle`` under the convention ``check`` chose, its queries counted on from all the check made (so a hard
    budget still holds), the spec saying the convention was detected."""
    view = convention_view(oracle, check.chosen)
    view.queries = oracle.queries + check.queries - check.images  # the sample went through ``oracle`` itself
    view.spec = replace(view.spec, detected=oracle.spec.detected + ("convention",))
    return view
