"""Backdoor triggers described by small JSON-able dicts (numpy only, no torch).

A trigger dict is one of

* ``{"kind": "patch", "size": s, "row": r, "col": c, "color": [[[r, g, b], ...], ...]}``
  BadNets patch: the ``s x s`` block whose top-left pixel is ``(row, col)`` is
  overwritten with ``color`` (an ``s x s x 3`` nested list of floats in [0, 1]).
* ``{"kind": "blend", "alpha": a, "pattern_seed": k}``
  Blended injection: ``x' = (1 - a) * x + a * P`` where
  ``P = numpy.random.default_rng(k).random((H, W, 3))`` (float64, uniform [0, 1)).
* ``{"kind": "sig", "delta": d, "freq": f}``
  SIG (Barni et al. 2019): a horizontal sinusoid added to every pixel,
  ``x' = clip(x + d * sin(2 pi * col * f / W), 0, 1)`` (``d`` in [0, 1] units).

Manifests add a ``"target"`` key (the attacker's label) to each trigger dict;
``apply_trigger`` ignores any extra keys.

Images are batches ``(N, H, W, C)`` (a single ``(H, W, C)`` image is also
accepted) either ``uint8`` in [0, 255] or floating point in [0, 1]. The result
has the same shape and dtype as the input. For ``uint8`` input the trigger is
computed in float64 on the 0..255 scale, then rounded half-to-even
(``numpy.rint``) and clipped to [0, 255]: a patch colour ``c`` becomes
``rint(255 * c)`` and a blend gives ``rint((1 - a) * x + a * 255 * P)``.
Floating-point input is computed in float64 and cast back to the input dtype
(no clipping: the formulas stay in [0, 1] when the input does).

``prepare_input`` turns uint8 NHWC images into the tensor a zoo ONNX model
expects, following its manifest's ``input_spec``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "apply_trigger",
    "apply_triggers",
    "make_patch_trigger",
    "make_placed_patch",
    "make_blend_trigger",
    "make_sig_trigger",
    "blend_pattern",
    "trigger_mask",
    "prepare_input",
]


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    images = np.asarray(images)
    if images.ndim == 3:
        return images[None], True
    if images.ndim != 4:
        raise ValueError(f"expected (N,H,W,C) or (H,W,C) images, got shape {images.shape}")
    return images, False


def _check_dtype(images: np.ndarray) -> None:
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")


def blend_pattern(pattern_seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """The blend pattern P in [0, 1), float64, shape (H, W, C)."""
    return np.random.default_rng(int(pattern_seed)).random((height, width, channels))


def apply_trigger(images: np.ndarray, trigger: Mapping[str, Any]) -> np.ndarray:
    """Return a stamped copy of ``images`` (same shape and dtype)."""
    batch, squeeze = _as_batch(images)
    _check_dtype(batch)
    _, h, w, c = batch.shape
    is_uint8 = batch.dtype == np.uint8
    scale = 255.0 if is_uint8 else 1.0
    kind = trigger.get("kind")

    if kind == "patch":
        s = int(trigger["size"])
        r = int(trigger["row"])
        col = int(trigger["col"])
        if s < 1 or r < 0 or col < 0 or r + s > h or col + s > w:
            raise ValueError(f"patch of size {s} at ({r},{col}) does not fit in {h}x{w}")
        color = np.asarray(trigger["color"], dtype=np.float64)
        if color.shape != (s, s, c):
            raise ValueError(f"patch color must have shape {(s, s, c)}, got {color.shape}")
        block = color * scale
        if is_uint8:
            block = np.clip(np.rint(block), 0, 255)
        out = batch.copy()
        out[:, r:r + s, col:col + s, :] = block.astype(batch.dtype)
    elif kind == "blend":
        alpha = float(trigger["alpha"])
        pattern = blend_pattern(trigger["pattern_seed"], h, w, c) * scale
        mixed = (1.0 - alpha) * batch.astype(np.float64) + alpha * pattern
        if is_uint8:
            mixed = np.clip(np.rint(mixed), 0, 255)
        out = mixed.astype(batch.dtype)
    elif kind == "sig":
        wave = float(trigger["delta"]) * np.sin(2.0 * np.pi * np.arange(w) * float(trigger["freq"]) / w)
        mixed = np.clip(batch.astype(np.float64) + (scale * wave)[None, None, :, None], 0.0, scale)
        if is_uint8:
            mixed = np.rint(mixed)
        out = mixed.astype(batch.dtype)
    else:
        raise ValueError(f"unknown trigger kind {kind!r}")
    return out[0] if squeeze else out


def apply_triggers(images: np.ndarray, triggers) -> np.ndarray:
    """Apply several triggers one after another."""
    out = images
    for trig in triggers:
        out = apply_trigger(out, trig)
    return out


def trigger_mask(trigger: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels a trigger modifies (all pixels for blend)."""
    mask = np.zeros((height, width), dtype=bool)
    if trigger.get("kind") == "patch":
        s, r, c = int(trigger["size"]), int(trigger["row"]), int(trigger["col"])
        mask[r:r + s, c:c + s] = True
    elif trigger.get("kind") in ("blend", "sig"):
        mask[:] = True
    else:
        raise ValueError(f"unknown trigger kind {trigger.get('kind')!r}")
    return mask


def make_patch_trigger(rng: np.random.Generator, size: int, height: int, width: int,
                       channels: int = 3, avoid=None) -> dict:
    """Random BadNets patch: random per-pixel colours (rounded to 4 decimals) at a
    random position where the whole patch fits. ``avoid`` is an optional list of
    patch trigger dicts the new patch must not overlap."""
    size = int(size)
    if size > height or size > width:
        raise ValueError("patch larger than the image")
    for _ in range(10_000):
        row = int(rng.integers(0, height - size + 1))
        col = int(rng.integers(0, width - size + 1))
        if not avoid:
            break
        new = trigger_mask({"kind": "patch", "size": size, "row": row, "col": col}, height, width)
        if not any((new & trigger_mask(t, height, width)).any() for t in avoid):
            break
    else:  # pragma: no cover - only with absurd inputs
        raise RuntimeError("could not place a non-overlapping patch")
    color = np.round(rng.random((size, size, channels)), 4)
    return {"kind": "patch", "size": size, "row": row, "col": col, "color": color.tolist()}


POSITIONS = ("random", "corner", "edge", "centre")


def make_placed_patch(rng: np.random.Generator, size: int, height: int, width: int, position: str = "random",
                      channels: int = 3, avoid=None) -> dict:
    """A BadNets patch like :func:`make_patch_trigger`, placed at a ``position``: ``random`` (anywhere),
    ``corner`` (one of the four, touching the border), ``edge`` (along one border, away from the corners)
    or ``centre`` (within 2 px of the middle). ``avoid``: patches it must not overlap."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    size = int(size)
    if size > height or size > width:
        raise ValueError("patch larger than the image")
    last_r, last_c = height - size, width - size
    for _ in range(10_000):
        if position == "random":
            row, col = int(rng.integers(0, last_r + 1)), int(rng.integers(0, last_c + 1))
        elif position == "corner":
            row, col = int(rng.choice([0, last_r])), int(rng.choice([0, last_c]))
        elif position == "edge":
            along = int(rng.integers(size, max(size + 1, min(last_r, last_c) - size + 1)))
            side = int(rng.integers(0, 4))
            row, col = [(0, along), (last_r, along), (along, 0), (along, last_c)][side]
        else:
            row = int(np.clip(last_r // 2 + rng.integers(-2, 3), 0, last_r))
            col = int(np.clip(last_c // 2 + rng.integers(-2, 3), 0, last_c))
        new = trigger_mask({"kind": "patch", "size": size, "row": row, "col": col}, height, width)
        if not avoid or not any((new & trigger_mask(t, height, width)).any() for t in avoid):
            break
    else:  # pragma: no cover - only with absurd inputs
        raise RuntimeError("could not place a non-overlapping patch")
    color = np.round(rng.random((size, size, channels)), 4)
    return {"kind": "patch", "size": size, "row": row, "col": col, "color": color.tolist(), "position": position}


def make_blend_trigger(rng: np.random.Generator, alpha: float = 0.2) -> dict:
    """Blend trigger with a pattern seed drawn from ``rng``."""
    return {"kind": "blend", "alpha": float(alpha), "pattern_seed": int(rng.integers(0, 2**31 - 1))}


def make_sig_trigger(delta: float = 20 / 255, freq: int = 6) -> dict:
    """SIG trigger: amplitude ``delta`` (in [0, 1] units; 20/255 as in the SIG paper), ``freq`` periods."""
    return {"kind": "sig", "delta": round(float(delta), 6), "freq": int(freq)}


def prepare_input(images: np.ndarray, input_spec: Mapping[str, Any]) -> np.ndarray:
    """Turn uint8 NHWC images (or float NHWC in [0, 1]) into the float32 array a
    forge ONNX model expects, following a manifest's ``input_spec``:

    1. x = images / 255 (uint8) or images (float, already [0, 1]);
    2. x = x * value_range                         (value_range is 1 or 255);
    3. if mean is not null: x = (x - mean) / std  (per channel, same scale as x);
    4. if layout == "NCHW": transpose to (N, C, H, W).
    """
    batch, _ = _as_batch(images)
    _check_dtype(batch)
    x = batch.astype(np.float32)
    if batch.dtype == np.uint8:
        x /= 255.0
    x *= float(input_spec.get("value_range", 1))
    if input_spec.get("mean") is not None:
        mean = np.asarray(input_spec["mean"], dtype=np.float32)
        std = np.asarray(input_spec["std"], dtype=np.float32)
        x = (x - mean) / std
    layout = input_spec.get("layout", "NCHW")
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    elif layout != "NHWC":
        raise ValueError(f"unknown layout {layout!r}")
    return np.ascontiguousarray(x, dtype=np.float32)
