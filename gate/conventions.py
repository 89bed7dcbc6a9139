"""The common input conventions of image classifiers, and how well each fits a model's labelled data.

A model trained on images in [0, 255] or with ImageNet's mean and std subtracted still answers when it is
fed [0, 1] images: wrongly, and without a word. :func:`compare_conventions` runs the labelled clean images
through the model under each convention (value range 1 or 255, no normalisation, [-1, 1] or ImageNet
mean/std, each layout the input shape allows) and measures the accuracy of each; the one the model was
trained with stands out. ``gate inspect MODEL --data D`` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gate.errors import GateError
from gate.oracle import Oracle
from gate.spec import LAYOUTS, SpecOverrides, resolve_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGES = 2000  # labelled images each convention is measured on at most


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
            view = oracle.with_spec(SpecOverrides(layout=layout, value_range=value_range, mean=mean, std=std,
                                                  output_kind=oracle.spec.output_kind, size=oracle.overrides.size))
            fits.append(Fit(convention, float(np.mean(view.predict(x) == y))))
    return sorted(fits, key=lambda f: (f.accuracy is None, -(f.accuracy or 0.0)))
