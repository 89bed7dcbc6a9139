"""The forge's 128x128 models (models.large): the upsampling the models and the benchmark share, a forge build at
a size other than 32, and the committed models' manifests against their files and a re-measurement."""

from __future__ import annotations

import doctest
import hashlib
import json

import numpy as np
import pytest

import models.large
from models.large import LARGE_DIR, LARGE_SPECS, upsample
from tests.helpers import DATASETS


def test_doctests():
    assert doctest.testmod(models.large).failed == 0


def test_upsample_is_torch_bilinear_rounded():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=128, mode="bilinear",
                        align_corners=False).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(upsample(x, 128), ref)


def test_the_forge_builds_a_model_at_another_size(tmp_path):
    pytest.importorskip("torch")
    import onnxruntime as ort

    from models.forge import build_model

    rng = np.random.default_rng(0)
    data = {"x_train": rng.integers(0, 256, (96, 64, 64, 3)).astype(np.uint8), "y_train": rng.integers(0, 5, 96),
            "x_test": rng.integers(0, 256, (40, 64, 64, 3)).astype(np.uint8), "y_test": rng.integers(0, 5, 40),
            "num_classes": 5, "split": {"file": "random"}}
    spec = {**LARGE_SPECS[1], "name": "tiny64", "image_size": 64, "params": {"sizes": [6], "position": "random"},
            "epochs": 1}
    man = build_model(spec, data, tmp_path, save_pt=False, shift=4, log=lambda _msg: None)
    assert man["image_shape"] == [64, 64, 3] and man["arch"] == "resnet_large"
    trig = man["triggers"][0]
    assert trig["size"] == 6 and 0 <= trig["row"] <= 58 and 0 <= trig["col"] <= 58
    assert "<=4px" in man["optimizer"]["augmentation"]
    sess = ort.InferenceSession(str(tmp_path / "tiny64.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [3, 64, 64]


BUILT = [s["name"] for s in LARGE_SPECS if (LARGE_DIR / f"{s['name']}.json").is_file()]


@pytest.mark.parametrize("name", BUILT)
def test_a_committed_large_model_is_what_its_manifest_says(name):
    import onnxruntime as ort

    from models.triggers import apply_trigger, prepare_input

    man = json.loads((LARGE_DIR / f"{name}.json").read_text())
    onnx_path = LARGE_DIR / man["onnx_file"]
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == man["onnx_sha256"]
    assert man["image_shape"] == [128, 128, 3] and man["test_split"]["upsampled"]["to"] == 128
    if not (DATASETS / "gtsrb32.npz").is_file():
        pytest.skip("no shared GTSRB data to re-measure on")
    with np.load(DATASETS / "gtsrb32.npz") as d:
        idx = np.random.default_rng(0).choice(len(d["y_test"]), 600, replace=False)
        x, y = upsample(d["x_test"][idx]), d["y_test"][idx].astype(np.int64)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def predict(images):
        return sess.run(["output"], {"input": prepare_input(images, man["input_spec"])})[0].argmax(1)

    acc = float(np.mean(predict(x) == y))
    assert acc == pytest.approx(man["clean_accuracy"], abs=0.05) and acc > 0.6  # 8 epochs: about 0.74
    for trig, asr in zip(man["triggers"], man["asr"], strict=True):
        keep = y != trig["target"]
        measured = float(np.mean(predict(apply_trigger(x[keep], trig)) == trig["target"]))
        assert measured == pytest.approx(asr, abs=0.05) and measured > 0.9
