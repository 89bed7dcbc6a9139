"""bench.additive_probe: its two stamping formulas, a search that finds an additive trigger, and the summary."""

import numpy as np

from bench.additive_probe import class_amplitude, stamp_additive, stamp_blend, summary, table
from gate.kernels import stamp
from gate.oracle import Oracle
from gate.search import SearchParams
from tests.helpers import linear_model


def test_additive_stamp_adds_a_signed_pattern_and_clips():
    rng = np.random.default_rng(0)
    x = rng.random((3, 4, 5, 2), dtype=np.float32)
    p = rng.random((2, 4, 5, 2), dtype=np.float32)
    a = np.array([0.0, 0.3], np.float32)
    out = stamp_additive(x, a, p)
    assert out.shape == (2, 3, 4, 5, 2)
    np.testing.assert_array_equal(out[0], x)  # amplitude 0 leaves the image as it is
    np.testing.assert_allclose(out[1], np.clip(x + 0.3 * (2 * p[1] - 1), 0, 1), atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out[1], stamp_blend(x, a, p)[1])  # not the blend: the image is not faded


def test_blend_stamp_is_the_gates_formula_with_a_constant_mask():
    rng = np.random.default_rng(1)
    x = rng.random((3, 4, 5, 2), dtype=np.float32)
    p = rng.random((2, 4, 5, 2), dtype=np.float32)
    a = np.array([0.2, 0.7], np.float32)
    masks = np.broadcast_to(a[:, None, None], (2, 4, 5))
    np.testing.assert_allclose(stamp_blend(x, a, p), stamp(x[None], masks[:, None], p[:, None]), atol=1e-6)


def test_the_search_finds_a_working_additive_trigger_on_a_linear_model(tmp_path):
    path = tmp_path / "linear.onnx"
    linear_model(path, layout="NHWC", size=8, classes=4, seed=3)
    oracle = Oracle(path, device="cpu", threads=1)
    pool = np.random.default_rng(2).random((64, 8, 8, 3), dtype=np.float32)
    params = SearchParams(max_steps=300)
    for label in range(4):
        amplitude, steps, status = class_amplitude(oracle, pool, label, stamp_additive, params,
                                                   np.random.default_rng(label))
        assert amplitude < 1.0, (label, status)  # 1.0 means no trigger worked
        assert 0 < steps <= 300


def _record(name, amps, targets):
    return {"model": name, "attack": "sig" if targets else "clean", "asr": [0.95] if targets else None,
            "targets": targets, "planted": [], "stamps": {"additive": {"amplitudes": amps}}}


def test_summary_ranks_the_target_and_compares_it_with_clean_models():
    backdoored = _record("b", [0.4, 0.1, 0.3, 0.2, 0.5], [1])
    s = summary(backdoored, "additive")
    assert s["median"] == 0.3
    assert s["targets"][1]["rank"] == 1
    np.testing.assert_allclose(s["targets"][1]["ratio"], 0.1 / 0.3)
    missed = _record("m", [0.4, 0.1, 0.3, 0.2, 0.5], [4])
    assert summary(missed, "additive")["targets"][4]["rank"] == 5
    clean = _record("c", [0.2, 0.4, 0.4, 0.4, 0.4], [])  # smallest natural class at 0.5x the median
    text = table([backdoored, missed, clean], ["additive"])
    assert "clean models' smallest class at 0.50-0.50x" in text
    assert "below the lowest of those: 1 of 2; ranked first: 1 of 2" in text
