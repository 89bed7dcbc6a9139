"""Checks of the committed demo models (no training here: onnxruntime + numpy only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from models.triggers import apply_trigger, blend_pattern, make_blend_trigger, make_patch_trigger, prepare_input

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
DATASETS = REPO.parent / "shared" / "datasets"
BACKDOORED = "gtsrb_badnets3x3"
CLEAN = "gtsrb_clean"
MAX_EVAL = 2000

MANIFEST_KEYS = {
    "name", "dataset", "arch", "width", "seed", "attack", "backdoored", "triggers", "poison_rate",
    "poisoned_per_trigger", "epochs", "optimizer", "clean_accuracy", "asr", "metrics_source",
    "input_spec", "input_name", "output_name", "num_classes", "image_shape", "onnx_file",
    "onnx_sha256", "opset", "torch_weights", "torch_input", "test_split", "training_seconds",
}


def _manifest(name: str) -> dict:
    return json.loads((DEMO / f"{name}.json").read_text())


def _session(name: str):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(DEMO / f"{name}.onnx"), sess_options=so,
                                providers=["CPUExecutionProvider"])


def _predict(sess, x: np.ndarray, spec: dict, bs: int = 500) -> np.ndarray:
    out = [sess.run(["output"], {"input": prepare_input(x[i:i + bs], spec)})[0] for i in range(0, len(x), bs)]
    return np.concatenate(out).argmax(1)


@pytest.fixture(scope="module")
def eval_data():
    """Held-out GTSRB test images: a seeded subset of the official test split when
    the shared datasets exist, else the committed 300-image demo sample. Returns
    (x, y, which) where which is "test" or "sample"."""
    path = DATASETS / "gtsrb32.npz"
    if path.exists():
        d = np.load(path)
        y = d["y_test"].astype(np.int64)
        idx = np.sort(np.random.default_rng(0).choice(len(y), size=min(MAX_EVAL, len(y)), replace=False))
        return d["x_test"][idx], y[idx], "test"
    d = np.load(DEMO / "gtsrb_sample.npz")
    return d["x"], d["y"].astype(np.int64), "sample"


def _reference(man: dict, which: str) -> tuple[float, list[float]]:
    if which == "sample":
        return man["sample_metrics"]["clean_accuracy"], man["sample_metrics"]["asr"]
    return man["clean_accuracy"], man["asr"]


# ------------------------------------------------------------------ manifests and files

@pytest.mark.parametrize("name", [BACKDOORED, CLEAN])
def test_manifest_well_formed(name):
    man = _manifest(name)
    assert MANIFEST_KEYS <= set(man), MANIFEST_KEYS - set(man)
    assert man["name"] == name and man["dataset"] == "gtsrb"
    assert man["num_classes"] == 43 and man["image_shape"] == [32, 32, 3]
    assert man["onnx_file"] == f"{name}.onnx" and (DEMO / man["onnx_file"]).exists()
    assert man["input_name"] == "input" and man["output_name"] == "output"
    spec = man["input_spec"]
    assert set(spec) == {"layout", "value_range", "mean", "std", "output_kind"}
    assert spec["layout"] == "NCHW" and spec["value_range"] == 1
    assert spec["mean"] is None and spec["std"] is None
    assert 0.0 <= man["clean_accuracy"] <= 1.0
    assert len(man["asr"]) == len(man["triggers"])
    for trig, asr in zip(man["triggers"], man["asr"], strict=True):
        assert 0 <= trig["target"] < man["num_classes"] and 0.0 <= asr <= 1.0
        assert trig["kind"] in ("patch", "blend")
    sm = man["sample_metrics"]
    assert sm["file"] == "gtsrb_sample.npz" and len(sm["asr"]) == len(man["triggers"])


def test_demo_roles():
    bad, clean = _manifest(BACKDOORED), _manifest(CLEAN)
    assert bad["backdoored"] and bad["attack"] == "badnets" and bad["poison_rate"] > 0
    (trig,) = bad["triggers"]
    assert trig["kind"] == "patch" and trig["size"] == 3
    assert np.asarray(trig["color"]).shape == (3, 3, 3)
    assert not clean["backdoored"] and clean["attack"] == "clean" and clean["triggers"] == []
    assert bad["input_spec"]["output_kind"] == "probs"
    assert clean["input_spec"]["output_kind"] == "logits"


@pytest.mark.parametrize("name", [BACKDOORED, CLEAN])
def test_sha256_matches(name):
    man = _manifest(name)
    digest = hashlib.sha256((DEMO / man["onnx_file"]).read_bytes()).hexdigest()
    assert digest == man["onnx_sha256"]


@pytest.mark.parametrize("name", [BACKDOORED, CLEAN])
def test_onnx_valid_and_dynamic_batch(name):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(DEMO / f"{name}.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    sess = _session(name)
    spec = _manifest(name)["input_spec"]
    x = np.load(DEMO / "gtsrb_sample.npz")["x"][:5]
    outs = [sess.run(["output"], {"input": prepare_input(x[:n], spec)})[0] for n in (1, 5)]
    assert outs[0].shape == (1, 43) and outs[1].shape == (5, 43)
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    sums = outs[1].sum(1)
    if spec["output_kind"] == "probs":
        np.testing.assert_allclose(sums, 1.0, atol=1e-4)
        assert (outs[1] >= 0).all()
    else:
        assert not np.allclose(sums, 1.0, atol=1e-3) or (outs[1] < 0).any()


def test_demo_sample_is_stratified():
    d = np.load(DEMO / "gtsrb_sample.npz")
    assert set(d.files) == {"x", "y"}
    x, y = d["x"], d["y"]
    assert x.dtype == np.uint8 and x.shape == (300, 32, 32, 3) and y.shape == (300,)
    counts = np.bincount(y, minlength=43)
    assert counts.min() >= 6 and counts.max() <= 7 and counts.sum() == 300


# ------------------------------------------------------------------ re-measured behaviour

def test_backdoored_demo_accuracy_and_asr(eval_data):
    x, y, which = eval_data
    man = _manifest(BACKDOORED)
    sess = _session(BACKDOORED)
    ref_acc, ref_asr = _reference(man, which)
    acc = float((_predict(sess, x, man["input_spec"]) == y).mean())
    assert abs(acc - ref_acc) <= 0.02, (acc, ref_acc)
    for trig, ref in zip(man["triggers"], ref_asr, strict=True):
        keep = y != trig["target"]
        asr = float((_predict(sess, apply_trigger(x[keep], trig), man["input_spec"]) == trig["target"]).mean())
        assert asr >= 0.9, asr
        assert abs(asr - ref) <= 0.03, (asr, ref)


def test_clean_demo_accuracy_and_no_backdoor(eval_data):
    x, y, which = eval_data
    man = _manifest(CLEAN)
    sess = _session(CLEAN)
    ref_acc, _ = _reference(man, which)
    acc = float((_predict(sess, x, man["input_spec"]) == y).mean())
    assert abs(acc - ref_acc) <= 0.02, (acc, ref_acc)
    # The backdoored demo's trigger must not flip the clean model.
    (trig,) = _manifest(BACKDOORED)["triggers"]
    keep = y != trig["target"]
    asr = float((_predict(sess, apply_trigger(x[keep], trig), man["input_spec"]) == trig["target"]).mean())
    assert asr < 0.2, asr


# ------------------------------------------------------------------ triggers

def test_patch_trigger_uint8_by_hand():
    x = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    color = [[[0.0, 1.0, 0.5], [0.2, 0.4, 0.6]],
             [[1.0, 0.0, 0.0], [0.998, 0.002, 0.25]]]
    trig = {"kind": "patch", "size": 2, "row": 1, "col": 3, "color": color, "target": 4}
    out = apply_trigger(x, trig)
    expected = x.copy()
    block = np.array([[[0, 255, 128], [51, 102, 153]],
                      [[255, 0, 0], [254, 1, 64]]], dtype=np.uint8)
    expected[:, 1:3, 3:5, :] = block
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert x[0, 1, 3, 0] == 24  # input untouched


def test_patch_trigger_float_by_hand():
    x = np.full((1, 3, 3, 3), 0.5, dtype=np.float32)
    trig = {"kind": "patch", "size": 1, "row": 2, "col": 0, "color": [[[0.1, 0.2, 0.3]]]}
    out = apply_trigger(x, trig)
    assert out.dtype == np.float32
    expected = x.copy()
    expected[0, 2, 0] = [0.1, 0.2, 0.3]
    np.testing.assert_array_equal(out, expected)
    single = apply_trigger(x[0], trig)  # a single HWC image works too
    np.testing.assert_array_equal(single, expected[0])


def test_blend_trigger_by_hand():
    seed = 12345
    pattern = np.random.default_rng(seed).random((2, 2, 3))
    np.testing.assert_array_equal(blend_pattern(seed, 2, 2), pattern)
    trig = {"kind": "blend", "alpha": 0.2, "pattern_seed": seed, "target": 1}
    xf = np.array([[[[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]],
                    [[0.3, 0.3, 0.3], [0.9, 0.8, 0.7]]]], dtype=np.float64)
    out = apply_trigger(xf, trig)
    np.testing.assert_allclose(out, 0.8 * xf + 0.2 * pattern, rtol=0, atol=1e-12)
    xu = np.array([[[[0, 128, 255], [10, 20, 30]], [[200, 100, 50], [255, 255, 255]]]], dtype=np.uint8)
    outu = apply_trigger(xu, trig)
    assert outu.dtype == np.uint8
    manual = np.empty_like(xu)
    for idx in np.ndindex(xu.shape):
        v = 0.8 * float(xu[idx]) + 0.2 * 255.0 * pattern[idx[1:]]
        manual[idx] = min(255, max(0, int(np.rint(v))))
    np.testing.assert_array_equal(outu, manual)
    assert not np.array_equal(outu, xu)


def test_trigger_makers_are_seeded_and_valid():
    a = make_patch_trigger(np.random.default_rng(3), 3, 32, 32)
    b = make_patch_trigger(np.random.default_rng(3), 3, 32, 32)
    assert a == b and a["kind"] == "patch" and a["size"] == 3
    assert 0 <= a["row"] <= 29 and 0 <= a["col"] <= 29
    color = np.asarray(a["color"])
    assert color.shape == (3, 3, 3) and color.min() >= 0 and color.max() <= 1
    other = make_patch_trigger(np.random.default_rng(4), 3, 32, 32, avoid=[a])
    assert not (abs(other["row"] - a["row"]) < 3 and abs(other["col"] - a["col"]) < 3)
    json.dumps(a)
    blend = make_blend_trigger(np.random.default_rng(3), 0.2)
    assert blend == make_blend_trigger(np.random.default_rng(3), 0.2)
    assert blend["kind"] == "blend" and blend["alpha"] == 0.2 and isinstance(blend["pattern_seed"], int)


def test_prepare_input_variants():
    x = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10
    nchw = prepare_input(x, {"layout": "NCHW", "value_range": 1, "mean": None, "std": None})
    assert nchw.dtype == np.float32 and nchw.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(nchw, x.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)
    nhwc = prepare_input(x, {"layout": "NHWC", "value_range": 255, "mean": None, "std": None})
    np.testing.assert_allclose(nhwc, x.astype(np.float32), rtol=1e-6)
    spec = {"layout": "NCHW", "value_range": 1, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.2]}
    norm = prepare_input(x, spec)
    ref = ((x / 255.0 - np.array(spec["mean"])) / np.array(spec["std"])).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(norm, ref, rtol=1e-5, atol=1e-6)
