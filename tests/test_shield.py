"""The runtime shield without HTTP: KL scores, stamping in model space, loading a scan, calibration, STRIP,
and the demo backdoored model (clean images pass, triggered ones are refused)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gate.calibrate import Calibration, calibrate, roc_auc, shield_scores, strip_entropy, threshold_for_frr
from gate.cli import main as gate_main
from gate.errors import GateError
from gate.kernels import stamp_encode_reference
from gate.oracle import Oracle, file_sha256, softmax
from gate.result import Triggers
from gate.shield import Shield, kl_scores, load_scan_triggers, oracle_forward
from gate.spec import SpecOverrides
from tests.helpers import DEMO_MODEL, Demo, linear_model, write_scan

needs_demo = pytest.mark.skipif(not DEMO_MODEL.exists(), reason=f"demo model {DEMO_MODEL} not built")


@pytest.fixture(scope="module")
def demo():
    if not DEMO_MODEL.exists():
        pytest.skip(f"demo model {DEMO_MODEL} not built")
    return Demo()


# ---------------------------------------------------------------------- KL scores
def test_kl_scores_match_definition_and_take_the_minimum():
    rng = np.random.default_rng(0)
    n, t, k = 5, 3, 7
    probs = softmax(rng.normal(size=(n * (1 + t), k)).astype(np.float32) * 3)
    s = kl_scores(probs, n, t)
    p = probs[:n].astype(np.float64)
    want = np.full(n, np.inf)
    for j in range(t):
        q = probs[n * (1 + j):n * (2 + j)].astype(np.float64)
        want = np.minimum(want, (p * np.log(p / q)).sum(axis=1))
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-9)
    assert kl_scores(np.vstack([probs[:n], probs[:n]]), n, 1) == pytest.approx(np.zeros(n), abs=1e-9)
    assert np.all(np.isinf(kl_scores(probs[:n], n, 0)))


def test_kl_scores_survive_zero_probabilities():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    s = kl_scores(p, 1, 1)
    assert np.isfinite(s).all() and s[0] > 20  # log(1 / 1e-12) = 27.6


# ---------------------------------------------------------------------- stamping in the model's input space
@pytest.mark.parametrize("layout, overrides", [
    ("NCHW", SpecOverrides()),
    ("NHWC", SpecOverrides(value_range=255.0, mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))),
])
def test_stamp_equals_stamping_the_image_then_encoding(tmp_path, layout, overrides):
    path = tmp_path / "m.onnx"
    linear_model(path, layout=layout, size=6, classes=4)
    oracle = Oracle(path, overrides, device="cpu")
    rng = np.random.default_rng(3)
    images = rng.random((5, 6, 6, 3), dtype=np.float32)
    masks = rng.random((2, 6, 6), dtype=np.float32)
    patterns = rng.random((2, 6, 6, 3), dtype=np.float32)
    shield = Shield(Triggers(np.array([1, 3]), masks, patterns, np.array([True, True])), oracle.spec)
    batch = oracle.encode(images)
    rows = shield.stamp(batch)
    assert rows.shape == (15, *batch.shape[1:])
    np.testing.assert_array_equal(rows[:5], batch)
    scale, offset = oracle.affine
    want = stamp_encode_reference(images, masks, patterns, scale, offset, oracle.spec.channels_first)
    np.testing.assert_allclose(rows[5:], want, rtol=1e-4, atol=1e-4)
    # run = stamp + one forward + score; the forward sees every row at once
    calls = []

    def forward(b):
        calls.append(len(b))
        return oracle_forward(oracle)(b)

    scored = shield.run(batch, forward)
    assert calls == [15] and scored.raw.shape == (5, 4) and scored.scores.shape == (5,)
    probs = oracle.probs(np.concatenate([images, *(
        (1 - masks[j][..., None]) * images + masks[j][..., None] * patterns[j] for j in range(2))]))
    np.testing.assert_allclose(scored.scores, kl_scores(probs, 5, 2), rtol=1e-3, atol=1e-5)


def test_logits_models_are_scored_on_probabilities(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path, size=4, classes=5)  # logits
    oracle = Oracle(path, device="cpu")
    assert oracle.spec.output_kind == "logits"
    rng = np.random.default_rng(1)
    tr = Triggers(np.array([0]), np.ones((1, 4, 4), np.float32) * 0.5, rng.random((1, 4, 4, 3), dtype=np.float32),
                  np.array([True]))
    shield = Shield(tr, oracle.spec, threshold=0.1)
    batch = oracle.encode(rng.random((3, 4, 4, 3), dtype=np.float32))
    scored = shield.run(batch, oracle_forward(oracle))
    raw = oracle_forward(oracle)(shield.stamp(batch)).astype(np.float64)
    np.testing.assert_allclose(scored.raw, raw[:3], rtol=1e-5)  # the answer is the model's own logits
    np.testing.assert_allclose(scored.scores, kl_scores(softmax(raw), 3, 1), rtol=1e-4)
    assert shield.rejects(np.array([0.05, 0.1, 0.2])).tolist() == [True, False, False]


def test_shield_without_triggers_passes_everything(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path, softmax=True)
    oracle = Oracle(path, device="cpu")
    empty = Triggers(np.zeros(0, np.int64), np.zeros((0, 4, 4), np.float32), np.zeros((0, 4, 4, 3), np.float32),
                     np.zeros(0, bool))
    shield = Shield(empty, oracle.spec, threshold=1e9)
    assert not shield.active and shield.rows_per_input == 1
    scored = shield.run(oracle.encode(np.zeros((2, 4, 4, 3), np.float32)), oracle_forward(oracle))
    assert np.isinf(scored.scores).all() and not shield.rejects(scored.scores).any()


def test_triggers_must_fit_the_model(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path)
    oracle = Oracle(path, device="cpu")
    bad = Triggers(np.array([0]), np.ones((1, 5, 5), np.float32), np.ones((1, 5, 5, 3), np.float32), np.array([True]))
    with pytest.raises(GateError, match="do not fit"):
        Shield(bad, oracle.spec)


# ---------------------------------------------------------------------- loading a scan
def five_triggers(tmp_path, flagged: list[bool]) -> tuple:
    """A linear model and random triggers for its 5 classes, ``flagged`` as given."""
    path = tmp_path / "m.onnx"
    linear_model(path)
    rng = np.random.default_rng(0)
    return path, Triggers(np.arange(5), rng.random((5, 4, 4), dtype=np.float32),
                          rng.random((5, 4, 4, 3), dtype=np.float32), np.array(flagged))


def test_load_scan_triggers_selects_the_flagged_classes(tmp_path):
    path, tr = five_triggers(tmp_path, [False, False, True, False, True])
    report = write_scan(tmp_path / "scan", path, tr)
    st = load_scan_triggers(report, model_sha256=file_sha256(path))
    assert st.flagged == [2, 4]
    np.testing.assert_array_equal(st.triggers.masks, tr.masks[[2, 4]])
    assert len(st.triggers_sha256) == 64
    with pytest.raises(GateError, match="another model"):
        load_scan_triggers(report, model_sha256="0" * 64)
    report2 = write_scan(tmp_path / "scan2", path, tr, flagged=[7])
    with pytest.raises(GateError, match="no trigger for flagged classes"):
        load_scan_triggers(report2)
    with pytest.raises(GateError, match="not found"):
        load_scan_triggers(tmp_path / "nope.json")
    report3 = write_scan(tmp_path / "scan3", path, tr, flagged=[])
    assert load_scan_triggers(report3).flagged == []


def test_a_class_convicted_by_a_small_trigger_is_shielded_even_when_not_an_outlier(tmp_path):
    """A synthetic-data scan of the demo rejected class 29 by BG003 (a 1 % trigger moving 95 % of the
    held-out images) while its outlier p-value was 0.15: the shield must still stamp class 29's trigger."""
    path, tr = five_triggers(tmp_path, [False, True, False, False, False])
    report_path = write_scan(tmp_path / "scan", path, tr)
    report = json.loads(report_path.read_text())
    report["decision"]["findings"] = [
        {"rule": "BG001", "outcome": "reject", "class": 1, "message": "class 1 flagged"},
        {"rule": "BG003", "outcome": "reject", "class": 3, "message": "class 3: a small trigger"},
        {"rule": "BG003", "outcome": "reject", "class": 1, "message": "class 1: a small trigger"},
        {"rule": "BG005", "outcome": "review", "message": "searches"}]
    report_path.write_text(json.dumps(report))
    st = load_scan_triggers(report_path)
    assert st.flagged == [1, 3]
    np.testing.assert_array_equal(st.triggers.masks, tr.masks[[1, 3]])


# ---------------------------------------------------------------------- calibration helpers
def test_threshold_for_frr_bounds_the_false_rejections():
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 1001):
        s = rng.exponential(size=n)
        for frr in (0.0, 0.01, 0.05, 0.2):
            tau = threshold_for_frr(s, frr)
            assert np.mean(s < tau) <= frr + 1e-12
    assert threshold_for_frr(np.arange(100.0), 0.05) == 4.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    neg = rng.integers(0, 10, 50).astype(float)
    pos = rng.integers(3, 14, 40).astype(float)
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert roc_auc(neg, pos) == pytest.approx(pairs)
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([2, 3], [0, 1]) == 0.0


def test_calibration_file_round_trip(tmp_path):
    cal = Calibration(threshold=0.5, target_frr=0.01, achieved_frr=0.005, n=200, triggers_sha256="a" * 64,
                      model_sha256="b" * 64, flagged=[3], data="clean.npz", created="2026-01-01T00:00:00+00:00")
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == cal
    (tmp_path / "bad.json").write_text('{"version": "0"}')
    with pytest.raises(GateError, match="not a calibration file"):
        Calibration.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------- the demo backdoored model
@needs_demo
def test_demo_clean_images_pass_and_triggered_images_are_refused(demo):
    oracle = Oracle(demo.model, device="cpu")
    shield = Shield(demo.triggers, oracle.spec)
    cal, calib_scores = calibrate(shield, oracle, demo.calib_x, 0.01, triggers_sha256="x", data="sample")
    assert cal.achieved_frr <= 0.01 and cal.n == len(demo.calib_x)
    shield = Shield(demo.triggers, oracle.spec, threshold=cal.threshold)
    clean = shield_scores(shield, oracle, demo.clean_x)
    triggered = shield_scores(shield, oracle, demo.triggered_x)
    clean_pass = 1 - shield.rejects(clean).mean()
    refused = shield.rejects(triggered).mean()
    assert clean_pass >= 0.95, f"only {clean_pass:.1%} of clean images pass (tau {cal.threshold:.4g})"
    assert refused >= 0.95, f"only {refused:.1%} of triggered images refused (tau {cal.threshold:.4g})"
    assert roc_auc(-clean, -triggered) > 0.98


@needs_demo
def test_demo_strip_baseline_separates_triggered_inputs(demo):
    oracle = Oracle(demo.model, device="cpu")
    clean = strip_entropy(oracle, demo.clean_x[:60], demo.calib_x, overlays=16)
    triggered = strip_entropy(oracle, demo.triggered_x[:60], demo.calib_x, overlays=16)
    assert clean.shape == (60,) and np.all(clean >= 0)
    assert roc_auc(-clean, -triggered) > 0.8  # low entropy = triggered


@needs_demo
def test_calibrate_command_writes_tau_for_these_triggers(demo, tmp_path):
    report = demo.write_scan(tmp_path / "scan")
    np.savez(tmp_path / "clean.npz", x=(demo.calib_x * 255).round().astype(np.uint8))
    out = tmp_path / "cal.json"
    rc = gate_main(["calibrate", "--model", str(demo.model), "--report", str(report), "--data",
                    str(tmp_path / "clean.npz"), "--target-frr", "0.02", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    cal = Calibration.load(out)
    assert cal.flagged == [demo.target] and cal.target_frr == 0.02 and cal.n == len(demo.calib_x)
    assert cal.triggers_sha256 == file_sha256(tmp_path / "scan" / "triggers.npz")
    assert cal.model_sha256 == file_sha256(demo.model) and cal.achieved_frr <= 0.02 and cal.threshold > 0
    assert gate_main(["calibrate", "--model", str(demo.model), "--report", str(report), "--data",
                      str(tmp_path / "clean.npz"), "--target-frr", "1.5", "--out", str(out)]) == 4


# ---------------------------------------------------------------------- a real `gate scan` output
@needs_demo
def test_reversed_trigger_from_a_real_scan_shields_the_demo_model(demo, demo_scan):
    _, scan_dir = demo_scan  # the session's real default scan of the demo model
    oracle = Oracle(demo.model, device="cpu")
    st = load_scan_triggers(scan_dir / "report.json", model_sha256=oracle.sha256)
    assert demo.target in st.flagged
    shield = Shield(st.triggers, oracle.spec)
    cal, _ = calibrate(shield, oracle, demo.calib_x, 0.01, triggers_sha256=st.triggers_sha256, data="sample")
    shield = Shield(st.triggers, oracle.spec, threshold=cal.threshold)
    clean = shield_scores(shield, oracle, demo.clean_x)
    triggered = shield_scores(shield, oracle, demo.triggered_x)
    assert 1 - shield.rejects(clean).mean() >= 0.95
    assert shield.rejects(triggered).mean() >= 0.8
    assert roc_auc(-clean, -triggered) > 0.95
