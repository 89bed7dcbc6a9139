"""Loading clean images: an .npz file (x, optional y) or a folder of PNG/JPEG/PPM images.

Images come back as float32 NHWC in [0, 1], the one representation the gate works in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gate.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp"}
X_KEYS = ("x", "x_test", "images")
Y_KEYS = ("y", "y_test", "labels")


@dataclass
class ImageSet:
    x: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    y: np.ndarray | None  # (N,) int64 labels, when known
    source: str

    def __len__(self) -> int:
        return len(self.x)


def to_unit_float(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 0-255 -> /255; floats must already lie in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: images contain NaN or inf")
        if x.min() < 0.0 or x.max() > 1.0:
            raise DataError(f"{source}: float images must lie in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
        return x
    raise DataError(f"{source}: images must be uint8 (0-255) or float (0-1), got {x.dtype}")


def load_npz(path: Path) -> ImageSet:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array: give an .npz with x (and optional y), or a folder of images")
    with archive:
        xkey = next((k for k in X_KEYS if k in archive.files), None)
        if xkey is None:
            raise DataError(f"{path}: no image array (expected one of keys {', '.join(X_KEYS)}); "
                            f"found {', '.join(archive.files) or 'nothing'}")
        ykey = next((k for k in Y_KEYS if k in archive.files), None)
        try:
            x = archive[xkey]
            y = archive[ykey] if ykey else None
        except ValueError as exc:  # object arrays need pickle, which is never allowed
            raise DataError(f"{path}: cannot read {xkey}/{ykey}: {exc}") from None
    if x.ndim == 3:  # (N, H, W): grey images
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{path}: images must be (N, H, W, C), got shape {x.shape}")
    if y is not None:
        if not np.issubdtype(np.asarray(y).dtype, np.integer):
            raise DataError(f"{path}: labels must be integers, got {np.asarray(y).dtype}")
        y = np.asarray(y).reshape(-1).astype(np.int64)
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: labels must be 0 or more, found {int(y.min())}")
        if len(y) != len(x):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return ImageSet(to_unit_float(x, str(path)), y, str(path))


def load_folder(path: Path) -> ImageSet:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except Exception as exc:
            raise DataError(f"cannot decode image {f}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{path}: images have different sizes {sorted(shapes)[:3]}; resize them to the model input")
    return ImageSet(to_unit_float(np.stack(arrays), str(path)), None, str(path))


def load_images(path: str | Path) -> ImageSet:
    path = Path(path)
    if path.is_dir():
        return load_folder(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    return load_npz(path)


def fit_to_model(images: ImageSet, image_shape: tuple[int, int, int]) -> ImageSet:
    """Check the images match the model input; grey/RGB conversions are the only adaptation."""
    x = images.x
    h, w, c = image_shape
    if x.shape[1:3] != (h, w):
        raise DataError(f"{images.source}: images are {x.shape[1]}x{x.shape[2]} but the model takes {h}x{w}")
    if x.shape[3] != c:
        if x.shape[3] == 3 and c == 1:
            x = x.mean(axis=3, keepdims=True)
        elif x.shape[3] == 1 and c == 3:
            x = np.repeat(x, 3, axis=3)
        else:
            raise DataError(f"{images.source}: images have {x.shape[3]} channels but the model takes {c}")
    if len(x) == 0:
        raise DataError(f"{images.source}: no images")
    return ImageSet(np.ascontiguousarray(x, dtype=np.float32), images.y, images.source)
