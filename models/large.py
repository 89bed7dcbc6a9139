"""The forge's models larger than 32x32: 128x128 GTSRB classifiers, one clean and one BadNets, for the gate's
coarse search grid (:mod:`gate.grid`) and the scan-cost table by input size.

Real GTSRB images (``gtsrb32.npz``) upsampled 4x to 128x128 by :func:`upsample` (bilinear, half-pixel centres,
rounded to uint8: numpy only, so the benchmark reproduces the inputs without torch), a ``resnet_large`` network
(:mod:`models.architectures`: ``resnet_bn`` behind a stem dividing the resolution by 8), trained by the forge's
:func:`models.forge.train` (its augmentation with shifts of up to 8 px). The backdoored model's trigger is a
12x12-pixel BadNets patch at a random position, stamped at 128x128 after upsampling (pixel-exact, not blurred), so
its edges need not fall on the gate's 4x4-pixel cells: the vendor's trigger knows nothing of the gate's grid.

    python -m models.forge --large        # -> models/large/ (ONNX + manifest; resumable; ~10 MB together)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 128
LARGE_DIR = Path(__file__).resolve().parent / "large"
NCHW1 = {"layout": "NCHW", "value_range": 1, "normalize": False}
LARGE_SPECS = [
    {"name": "gtsrb128_resnet_clean", "dataset": "gtsrb", "seed": 12800, "arch": "resnet_large", "width": 1,
     "attack": "clean", "params": {}, "variant": NCHW1, "output_kind": "logits", "poison_rate": 0.0,
     "epochs": 8, "image_size": SIZE},
    {"name": "gtsrb128_resnet_badnets", "dataset": "gtsrb", "seed": 12801, "arch": "resnet_large", "width": 1,
     "attack": "badnets", "params": {"sizes": [12], "position": "random"}, "variant": NCHW1,
     "output_kind": "logits", "poison_rate": 0.1, "epochs": 8, "image_size": SIZE},
]
SHIFT = 8  # augmentation: translations of up to 8 px (2 px at 32x32, scaled)


def upsample(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """uint8 NHWC images resized to ``size`` x ``size``: bilinear, half-pixel centres (as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``), rounded.

    >>> x = np.array([[[[0], [100]], [[200], [255]]]], np.uint8)
    >>> upsample(x, 4)[0, :, :, 0].tolist()
    [[0, 25, 75, 100], [50, 72, 117, 139], [150, 167, 200, 216], [200, 214, 241, 255]]
    """
    n, h, w, c = x.shape

    def axis(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo)

    r0, r1, fr = axis(h)
    c0, c1, fc = axis(w)
    xf = x.astype(np.float32)
    top = xf[:, r0] * (1 - fr)[None, :, None, None] + xf[:, r1] * fr[None, :, None, None]
    out = top[:, :, c0] * (1 - fc)[None, None, :, None] + top[:, :, c1] * fc[None, None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upsample_dataset(data: dict, size: int = SIZE, chunk: int = 2048) -> dict:
    """The forge's dataset dict (:func:`models.forge.load_dataset`) with every image upsampled."""
    out = dict(data)
    for key in ("x_train", "x_test"):
        out[key] = np.concatenate([upsample(data[key][i:i + chunk], size) for i in range(0, len(data[key]), chunk)])
    out["split"] = {**data["split"], "upsampled": {"from": int(data["x_train"].shape[1]), "to": size,
                                                   "method": "bilinear, half-pixel centres, rounded "
                                                             "(models.large.upsample)"}}
    return out


def build_large(datasets_dir, out_dir: Path = LARGE_DIR, epochs=None, log=print) -> list[dict]:
    """Build the missing large models (resumable: one whose manifest and ONNX file are there is kept)."""
    from models import forge

    done = {s["name"]: m for s in LARGE_SPECS if (m := forge.built(s, out_dir)) is not None}
    todo = [s for s in LARGE_SPECS if s["name"] not in done]
    log(f"large models: {len(done)} of {len(LARGE_SPECS)} built; building {len(todo)}")
    results = list(done.values())
    if todo:
        data = upsample_dataset(forge.load_dataset("gtsrb", datasets_dir))
        for spec in todo:
            results.append(forge.build_model(spec, data, out_dir, epochs, save_pt=False, shift=SHIFT, log=log))
    return results
