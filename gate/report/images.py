"""Small PNG pictures of triggers and stamped images, for the HTML page and ``trigger_<class>.png``."""

from __future__ import annotations

import base64
import io

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W) or (H, W, C) -> uint8 (H, W) grey or (H, W, 3) RGB."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def upscale(image: np.ndarray, min_size: int = 96) -> np.ndarray:
    """Nearest-neighbour upscale by a whole factor so the shorter side is at least ``min_size``."""
    h, w = image.shape[:2]
    f = max(1, -(-min_size // max(1, min(h, w))))
    return np.repeat(np.repeat(image, f, axis=0), f, axis=1) if f > 1 else image


def png_bytes(image: np.ndarray, min_size: int = 96, max_size: int | None = None) -> bytes:
    """PNG of a [0, 1] image: small images upscaled (nearest) to ``min_size``, large ones shrunk (box
    filter) so the longer side is at most ``max_size``, which keeps reports of big models small."""
    from PIL import Image

    img = Image.fromarray(upscale(to_uint8(image), min_size))
    if max_size is not None and max(img.size) > max_size:
        f = max_size / max(img.size)
        img = img.resize((max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))), Image.BOX)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(image: np.ndarray, min_size: int = 96, max_size: int | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, min_size, max_size)).decode("ascii")


def trigger_views(mask: np.ndarray, pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The three pictures of a reversed trigger: soft mask (grey), pattern, and mask * pattern."""
    m = np.asarray(mask, dtype=np.float32)
    p = np.asarray(pattern, dtype=np.float32)
    return {"mask": m, "pattern": p, "trigger": m[..., None] * p}
