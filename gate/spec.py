"""How a vendor model wants its input and what it gives back.

The gate itself always works on images as float32 NHWC in [0, 1]. An :class:`InputSpec` says how to turn
such an image into what the model expects::

    model_input[c] = (x[c] * value_range - mean[c]) / std[c]     laid out as NCHW or NHWC

which is one per-channel affine map ``scale[c] * x[c] + offset[c]`` followed by a layout change; the
stamping kernels apply it while they write each stamped image, so no extra pass is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gate.errors import ModelError, UsageError
from gate.settings import (
    Bad,
    Check,
    Settings,
    channel_values,
    choice,
    image_size,
    optional,
    positive_channel_values,
    setting,
    text,
)

LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("probs", "logits")


def _value_range() -> Check:
    pick = choice(1.0, 255.0)
    return Check(lambda v: float(pick(v)), float, None, (1.0, 255.0))


@dataclass(frozen=True)
class SpecOverrides(Settings):
    """What the user states about the model; ``None`` means "detect it" (policy section ``input``)."""

    SECTION = "input"

    layout: str | None = setting(None, optional(choice(*LAYOUTS)), "input layout: NCHW | NHWC (default: from "
                                 "the input shape)")
    value_range: float | None = setting(None, optional(_value_range()), "value range the model expects: 1 for "
                                        "[0,1], 255 for [0,255] (default 1)", flag="--input-range")
    mean: tuple[float, ...] | None = setting(None, optional(channel_values), "per-channel mean the model expects "
                                             "subtracted (e.g. 0.485,0.456,0.406)")
    std: tuple[float, ...] | None = setting(None, optional(positive_channel_values),
                                            "per-channel std the model expects divided by")
    output_kind: str | None = setting(None, optional(choice(*OUTPUT_KINDS)), "what the model outputs: probs | "
                                      "logits (default: detected by probing)", flag="--output")
    size: tuple[int, int] | None = setting(None, optional(image_size), "image size HxW the model was trained at, for "
                                           "an input with dynamic height and width (default: the input shape's)",
                                           flag="--image-size")
    output_name: str | None = setting(None, optional(text), "the output to scan, by name, when the model has score "
                                      "outputs of different widths (default: the one output of class scores)")

    def validate(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise Bad("input.mean and input.std must be given together")


@dataclass(frozen=True)
class InputSpec:
    """The resolved input/output contract of one model."""

    layout: str
    height: int
    width: int
    channels: int
    value_range: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output_kind: str = "probs"
    batch: int | None = None  # fixed batch dimension, or None when dynamic
    dtype: str = "float32"
    detected: tuple[str, ...] = field(default_factory=tuple)  # which fields were detected, not stated

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def channels_first(self) -> bool:
        return self.layout == "NCHW"

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, offset) so that model_value = scale * x + offset for x in [0, 1]."""
        c = self.channels
        mean = np.zeros(c) if self.mean is None else np.asarray(self.mean, dtype=np.float64)
        std = np.ones(c) if self.std is None else np.asarray(self.std, dtype=np.float64)
        scale = self.value_range / std
        offset = -mean / std
        return scale.astype(np.float32), offset.astype(np.float32)

    def model_shape(self, n: int) -> tuple[int, int, int, int]:
        if self.channels_first:
            return (n, self.channels, self.height, self.width)
        return (n, self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        d["detected"] = list(self.detected)
        return d


def _static(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def resolve_layout(shape: list, stated: str | None,
                   size: tuple[int, int] | None = None) -> tuple[str, int, int, int, bool]:
    """Pick NCHW/NHWC from a rank-4 input shape; returns (layout, H, W, C, detected).

    An input whose height and width are dynamic (a symbolic name in ONNX, -1 in V2 metadata) takes them from
    ``size``, the (H, W) the user states; its channel dimension must be fixed, and tells the layout. A fixed
    height and width must agree with ``size`` when both are given."""
    dims = list(shape[1:])
    if all(_static(d) for d in dims):
        return _resolve_static(shape, stated, size)
    candidates = [stated] if stated is not None else [
        layout for layout, c in (("NCHW", dims[0]), ("NHWC", dims[2])) if _static(c) and c in (1, 3, 4)]
    if len(candidates) != 1:
        raise ModelError(f"model input {shape} has no single fixed channel dimension of 1, 3 or 4 to read its layout "
                         f"from; state it with --layout")
    layout = candidates[0]
    (c, h, w) = dims if layout == "NCHW" else (dims[2], dims[0], dims[1])
    if not (_static(c) and c in (1, 3, 4)):
        raise ModelError(f"model input {shape} read as {layout} has channels {c!r}; expected a fixed 1, 3 or 4")
    if size is None:
        raise ModelError(f"model input {shape} has a dynamic height or width: state the image size the model was "
                         f"trained at with --image-size HxW (policy input.size), e.g. the size of its clean data")
    for name, dim, want in (("height", h, size[0]), ("width", w, size[1])):
        if _static(dim) and dim != want:
            raise ModelError(f"model input {shape} has a fixed {name} of {dim}, not the stated size "
                             f"{size[0]}x{size[1]}")
    return layout, size[0], size[1], c, stated is None


def _resolve_static(shape: list, stated: str | None, size: tuple[int, int] | None) -> tuple[str, int, int, int, bool]:
    d1, d2, d3 = shape[1:]
    if stated is not None:
        layout, detected = stated, False
    elif d1 in (1, 3) and d3 not in (1, 3):
        layout, detected = "NCHW", True
    elif d3 in (1, 3) and d1 not in (1, 3):
        layout, detected = "NHWC", True
    else:
        layout, detected = "NCHW", True  # ambiguous (e.g. 3x3x3): the common convention
    if layout == "NCHW":
        c, h, w = d1, d2, d3
    else:
        h, w, c = d1, d2, d3
    if c not in (1, 3, 4):
        raise ModelError(f"model input {shape} read as {layout} has {c} channels; expected 1, 3 or 4 "
                         f"(state the layout if it is the other one)")
    if size is not None and tuple(size) != (h, w):
        raise ModelError(f"model input {shape} takes {h}x{w} images, not the stated size {size[0]}x{size[1]}")
    return layout, h, w, c, detected


def check_channels(values: tuple[float, ...] | None, channels: int, what: str) -> None:
    if values is not None and len(values) not in (1, channels):
        raise UsageError(f"{what} has {len(values)} values but the model has {channels} channels")


def broadcast_channels(values: tuple[float, ...] | None, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)
