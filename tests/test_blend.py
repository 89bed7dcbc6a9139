"""The blend trigger search (gate.blend): unbiased estimates, the ask layout, a toy solve, the scan's blend mode
(budget, patch results untouched, a planted blend backdoor flagged) and decide() on blend amplitudes."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gate.blend import AMPLITUDE_FLOOR, BlendParams, BlendSearch, blend_outliers, blend_rule, couples, leave_group_out
from gate.data import ImageSet
from gate.decision import decide
from gate.oracle import Oracle
from gate.outliers import OutlierRule
from gate.policy import Policy
from gate.result import ScanResult, Triggers
from gate.scan import ScanConfig, scan
from gate.search import SearchParams, g
from gate.settings import SettingError
from tests.helpers import L1_CLEAN, linear_model, make_result

H, W, C = 2, 3, 2
LAM = 0.05


def analytic_f(masks, patterns, c1, c2, w, v):
    """F(a, p) = c1 a + c2 a^2 + a w.p + v.p^2 for constant masks a (lambda a H W is added by the search)."""
    a = masks[:, 0, 0].astype(np.float64)
    assert np.all(masks == masks[:, :1, :1])  # one amplitude over the whole image
    ps = patterns.reshape(len(patterns), -1).astype(np.float64)
    return c1 * a + c2 * a ** 2 + a * (ps @ w) + (ps ** 2) @ v


def exact_gradients(theta_a, theta_p, sigma_a, sigma, c1, c2, w, v, sampling):
    """d/d(theta_a), d/d(theta_p) of the smoothed objective each layout's estimates target, plus the closed-form
    lambda a H W term (Gauss-Hermite quadrature for the expectations over the noise)."""
    z, wts = np.polynomial.hermite_e.hermegauss(60)
    wts = wts / wts.sum()
    a = g(theta_a + sigma_a * z)
    da = 2 * a * (1 - a)
    t = g(theta_p.reshape(-1)[:, None] + sigma * z[None])
    dt = 2 * t * (1 - t)
    mean_p = t @ wts
    if sampling == "separate":  # amplitude samples use the mean pattern, pattern samples the mean amplitude
        p_for_a, a_for_p = g(theta_p.reshape(-1)), g(theta_a)
    else:
        p_for_a, a_for_p = mean_p, a @ wts
    grad_a = (da * (c1 + 2 * c2 * a + w @ p_for_a)) @ wts
    a0 = g(theta_a)
    grad_a += LAM * H * W * 2 * a0 * (1 - a0)
    grad_p = a_for_p * w * (dt @ wts) + v * ((2 * t * dt) @ wts)
    return grad_a, grad_p.reshape(theta_p.shape)


@pytest.mark.parametrize("sampling, antithetic", [("paired", True), ("paired", False), ("separate", True),
                                                  ("separate", False)])
def test_estimators_are_unbiased(sampling, antithetic):
    rng = np.random.default_rng(0)
    c1, c2 = -2.0, 3.0
    w = rng.normal(size=H * W * C) * 2
    v = rng.normal(size=H * W * C)
    params = SearchParams(k=22, sigma=0.3, sampling=sampling, antithetic=antithetic)  # 11 amplitudes: one alone
    search = BlendSearch((H, W, C), params, BlendParams(sigma=0.4))
    state = search.init(np.random.default_rng(1))
    state.theta_a[...] = -0.7
    state.theta_p[...] = rng.normal(size=(H, W, C))
    state.lam = LAM
    ga, gp = [], []
    for _ in range(1500):
        masks, patterns = search.ask(state)
        a, p = search.gradients(state, analytic_f(masks, patterns, c1, c2, w, v))
        ga.append(a[0])
        gp.append(p)
    ga, gp = np.array(ga), np.array(gp)
    want_a, want_p = exact_gradients(state.theta_a[0], state.theta_p, 0.4, 0.3, c1, c2, w, v, sampling)
    se_a = ga.std() / np.sqrt(len(ga))
    assert abs(ga.mean() - want_a) < 5 * se_a + 1e-3, (ga.mean(), want_a, se_a)
    assert abs(ga.mean() - want_a) < 0.1 * abs(want_a)  # and precise enough to mean something
    se_p = gp.std(0) / np.sqrt(len(gp))
    assert np.all(np.abs(gp.mean(0) - want_p) < 5 * se_p + 1e-3)
    assert np.corrcoef(gp.mean(0).ravel(), want_p.ravel())[0, 1] > 0.95


def test_the_blend_search_stops_on_its_own_patience_and_shares_the_rest():
    params = SearchParams(k=8, early_stop_patience=5, lambda_init=0.02)
    search = BlendSearch((4, 4, 3), params, BlendParams(early_stop_patience=17))
    assert search.params.early_stop_patience == 17
    assert replace(search.params, early_stop_patience=5) == params, "everything else is the patch search's"
    assert BlendSearch((4, 4, 3), params).params.early_stop_patience == BlendParams().early_stop_patience == 80


def test_couples_and_their_baseline():
    assert couples(5, True).tolist() == [0, 1, 0, 1, 2] and couples(4, False).tolist() == [0, 1, 2, 3]
    f = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    # each sample's baseline: the mean of the samples outside its couple
    np.testing.assert_allclose(leave_group_out(f, couples(5, True)), [16 / 3, 14 / 3, 16 / 3, 14 / 3, 2.5])
    np.testing.assert_allclose(leave_group_out(f[:2], np.array([0, 0])), [0.0, 0.0])


@pytest.mark.parametrize("sampling", ["paired", "joint", "separate"])
def test_ask_layout(sampling):
    """As many candidates as the patch search's, each mask constant over the image, the last the mean trigger."""
    p = SearchParams(k=8, sampling=sampling)
    search = BlendSearch((H, W, C), p)
    state = search.init(np.random.default_rng(0))
    state.theta_p[...] = 0.3 * np.random.default_rng(1).normal(size=(H, W, C))
    masks, patterns = search.ask(state)
    assert masks.shape == (p.candidates, H, W) and patterns.shape == (p.candidates, H, W, C)
    assert p.candidates == (17 if sampling == "separate" else 9)
    assert np.all(masks == masks[:, :1, :1])
    np.testing.assert_allclose(masks[-1], g(1.0), rtol=1e-6)  # blend init 1.0: amplitude 0.88 to start
    np.testing.assert_allclose(patterns[-1], g(state.theta_p), rtol=1e-6)
    amps = masks[:-1, 0, 0]
    theta = np.arctanh(2 * patterns[:-1].astype(np.float64) - 1)
    mirrored = np.broadcast_to(2 * state.theta_p, (4, H, W, C))  # theta_p + sigma eps and theta_p - sigma eps
    if sampling == "separate":
        assert len(np.unique(amps[:8])) == 8 and np.all(masks[8:16] == masks[-1])  # Eq. 5 / Eq. 6 halves
        np.testing.assert_allclose(patterns[:8], np.broadcast_to(patterns[-1], (8, H, W, C)))
        np.testing.assert_allclose(theta[8:12] + theta[12:16], mirrored, atol=1e-3)
    else:
        np.testing.assert_array_equal(amps[:4], amps[4:8])  # each amplitude with +eps and -eps
        np.testing.assert_allclose(theta[:4] + theta[4:8], mirrored, atol=1e-3)
    m = 4 if sampling == "separate" else 2  # amplitude samples come in mirrored couples (j, j + m)
    logits = np.arctanh(2 * amps[:2 * m].astype(np.float64) - 1) - 1.0
    np.testing.assert_allclose(logits[:m], -logits[m:], atol=1e-4)


def test_blend_search_finds_a_faint_blend():
    """A toy 'model' fooled when a >= 0.15 and the pattern agrees with a hidden sign pattern; its loss falls
    with a times the agreement. The search ends near the smallest working amplitude, with the right signs."""
    h, w, c = 4, 4, 3
    sign = np.where(np.random.default_rng(5).random((h, w, c)) < 0.5, -1.0, 1.0)
    search = BlendSearch((h, w, c), SearchParams(k=20, max_steps=400))
    state = search.init(np.random.default_rng(3))
    while not state.done:
        masks, patterns = search.ask(state)
        a = masks[:, 0, 0].astype(np.float64)
        agree = ((2 * patterns - 1) * sign).mean(axis=(1, 2, 3))
        success = float(a[-1] >= 0.15 and agree[-1] > 0.5)  # the current trigger fools the 'model'
        search.tell(state, 4.0 * (1.0 - a * agree), success)
    mask, pattern, l1 = state.result_trigger()
    assert state.status == "converged" and search.explain(state) == ""
    assert 0.15 <= state.result_amplitude < 0.25  # it started at 0.88
    assert np.all(mask == state.result_amplitude) and l1 == pytest.approx(state.result_amplitude * h * w)
    assert np.all((2 * pattern - 1) * sign > 0.5)


def test_no_working_blend_is_the_whole_image():
    p = SearchParams(k=4, max_steps=7)
    search = BlendSearch((H, W, C), p)
    state = search.init(np.random.default_rng(0))
    while not state.done:
        search.ask(state)
        search.tell(state, np.full(p.candidates, 85.0), 0.0)  # flat: no signal
    assert state.status == "not_reached" and state.result_amplitude == 1.0
    assert state.result_trigger()[2] == H * W
    assert "no blend trigger reached 99%" in search.explain(state) and "exactly 0" in search.explain(state)
    assert state.amplitude < g(1.0)  # a flat loss shows more of the image, as in the patch search


def test_blend_settings_in_the_policy():
    p = Policy().override({"search.blend": True, "blend.sigma": 0.5})
    cfg = p.scan_config()
    assert cfg.blend and cfg.blend_params == BlendParams(sigma=0.5) and not Policy().scan_config().blend
    with pytest.raises(SettingError, match="sigma"):
        BlendParams(sigma=0)


# --------------------------------------------------------------------------- the scan's blend mode
def _images(n=60, seed=0):
    return np.random.default_rng(seed).random((n, 8, 8, 3)).astype(np.float32)


def test_scan_with_the_blend_mode(tmp_path):
    """Every class gets a blend amplitude in (0, 1] and its held-out success; the patch results are those of a
    scan without the mode (same seed); the query budget covers both modes; blend off leaves the fields None."""
    path = tmp_path / "linear.onnx"
    linear_model(path, size=8, classes=4, seed=1)
    oracle = Oracle(path, device="cpu")
    images = ImageSet(_images(), None, "noise")
    cfg = ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=4, max_steps=30), max_images=60, held_out=10)
    off = scan(oracle, images, cfg)
    on = scan(oracle, images, replace(cfg, blend=True))
    for c in off.result.classes:
        assert c.blend_amplitude is None and c.patch_flagged is None and not c.blend_flagged
        assert not any(k.startswith("blend") for k in c.to_dict())
    assert "blend" not in off.result.to_dict() and off.triggers.blend_amplitudes is None
    for a, b in zip(off.result.classes, on.result.classes, strict=True):
        assert (a.l1, a.status, a.steps, a.trigger_asr, a.flagged) == (b.l1, b.status, b.steps, b.trigger_asr,
                                                                        b.patch_flagged)
        assert 0 < b.blend_amplitude <= 1 and b.blend_asr is not None and b.blend_steps > 0
        assert b.queries == a.queries + b.blend_queries
    r = on.result
    assert r.queries["total"] == sum(c.queries for c in r.classes) + 60  # + the clean predictions
    assert r.blend["median_amplitude"] > 0 and r.blend["sigma"] == BlendParams().sigma
    assert ScanResult.from_dict(r.to_dict()) == r
    np.testing.assert_array_equal(on.triggers.masks, off.triggers.masks)
    assert on.triggers.blend_patterns.shape == (4, 8, 8, 3)
    on.triggers.save(tmp_path / "t.npz")
    back = Triggers.load(tmp_path / "t.npz")
    np.testing.assert_allclose(back.blend_amplitudes, [c.blend_amplitude for c in r.classes], rtol=1e-6)
    assert back.select([2]).blend_patterns.shape == (1, 8, 8, 3)

    budget = 4000
    cut = scan(oracle, images, replace(cfg, blend=True, max_queries=budget)).result
    assert cut.queries["total"] <= budget and not cut.complete and "budget" in cut.stop_reason
    assert {c.blend_status for c in cut.classes} == {"budget"} and all(c.blend_asr is not None for c in cut.classes)


def test_a_planted_blend_backdoor_is_flagged_by_the_blend_mode(tmp_path):
    """A linear model whose class 0 answers a 5 % blend of a hidden pattern (and balanced clean predictions):
    the blend search finds class 0's trigger far fainter than any other class's and the blend rule flags it."""
    path = tmp_path / "blend.onnx"
    w, _ = linear_model(path, layout="NHWC", size=8, classes=5, seed=2, scale=0.1)
    star = (np.random.default_rng(7).random((8, 8, 3)) < 0.5).astype(np.float32)
    w[:, 0] += 3.0 * (2 * star.reshape(-1) - 1)
    x = _images(80)
    b = -(x.reshape(len(x), -1) @ w).mean(0)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array((w if init.name == "W" else b).astype(np.float32), init.name))
    onnx.save(model, str(path))
    oracle = Oracle(path, device="cpu")
    assert (oracle.probs(0.9 * x + 0.1 * star).argmax(1) == 0).all()

    # the toy's 5 classes are too few and too alike for the shipped cuts (fitted on the wide zoo): the blend mode's
    # mechanics are tested at alpha 0.05, within the model only (the toy's amplitudes are no zoo's population)
    rule = OutlierRule(alpha=0.05, scale_floor=0.35)
    cfg = ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=8, max_steps=300), max_images=80, held_out=16,
                     blend=True, outliers=rule,
                     blend_params=BlendParams(alpha=0.05, scale_floor=0.35, population_weight=0.0))
    r = scan(oracle, ImageSet(x, None, "noise"), cfg).result
    amplitudes = [c.blend_amplitude for c in r.classes]
    assert int(np.argmin(amplitudes)) == 0 and amplitudes[0] < 0.15
    assert 2 * amplitudes[0] < min(amplitudes[1:])
    assert r.classes[0].blend_flagged and r.classes[0].flagged and 0 in r.flagged
    assert not any(c.blend_flagged for c in r.classes[1:])
    d = decide(r, Policy().override({"outliers.alpha": 0.05, "outliers.scale_floor": 0.35, "blend.alpha": 0.05,
                                     "blend.scale_floor": 0.35, "blend.population_weight": 0.0}))
    assert d.outcome == "reject" and any("blend trigger" in f.message and f.label == 0 for f in d.findings)


# --------------------------------------------------------------------------- decide() on blend amplitudes
def _with_blend(result, amplitudes, policy=None):
    policy = policy or Policy()
    out = blend_outliers(np.array(amplitudes), policy.outlier_rule(), policy.blend_params())
    for c, a, idx, flag in zip(result.classes, amplitudes, out.anomaly_index, out.flagged, strict=True):
        c.blend_amplitude, c.blend_asr, c.blend_status = a, 0.9, "converged"
        c.blend_anomaly_index, c.blend_flagged, c.patch_flagged = float(idx), bool(flag), c.flagged
        c.flagged = c.flagged or c.blend_flagged
    result.flagged = [c.label for c in result.classes if c.flagged]
    return result


def test_decide_flags_a_faint_blend_trigger():
    r = _with_blend(make_result(L1_CLEAN), [0.42, 0.38, 0.03, 0.45, 0.4])
    assert not any(c.patch_flagged for c in r.classes) and r.flagged == [2]
    d = decide(r, Policy())
    assert (d.outcome, d.exit_code) == ("reject", 1)
    assert [(f.rule, f.label, f.properties["mode"]) for f in d.findings] == [("BG001", 2, "blend")]
    assert d.reasons[0].startswith("class 2 flagged: blend trigger amplitude 0.03 (attack success 90%) is ")
    assert "x the median 0.4, z " in d.reasons[0] and "in log amplitude" in d.reasons[0]
    assert d.findings[0].properties["p_value"] <= Policy().outliers.alpha
    assert d.model_p_value == pytest.approx(d.findings[0].properties["p_value"])
    # judged again from the stored report, and under the paper's MAD rule
    back = ScanResult.from_dict(r.to_dict())
    assert [f.label for f in decide(back, Policy()).findings] == [2]
    mad = Policy.from_dict({"outliers": {"method": "mad"}})
    assert [f.label for f in decide(back, mad).findings] == [2]


def test_decide_without_a_blend_outlier_accepts_and_says_so():
    d = decide(_with_blend(make_result(L1_CLEAN), [0.42, 0.38, 0.33, 0.45, 0.4]), Policy())
    assert d.outcome == "accept" and "by its blend trigger, class 2 (blend trigger amplitude 0.33" in d.reasons[0]
    plain = decide(make_result(L1_CLEAN), Policy())  # no blend fields: the patch rule alone, as before
    assert plain.outcome == "accept" and "blend" not in plain.reasons[0]


def test_amplitudes_below_the_floor_are_not_told_apart():
    """The calibrated rule takes logs of max(a, 1/255): fainter than one grey level is as faint as it gets."""
    a = blend_outliers([AMPLITUDE_FLOOR / 10, 0.4, 0.5, 0.45, 0.42])
    b = blend_outliers([AMPLITUDE_FLOOR, 0.4, 0.5, 0.45, 0.42])
    np.testing.assert_allclose(a.anomaly_index, b.anomaly_index)
    assert a.flagged.tolist() == [True, False, False, False, False]


def test_the_blend_rule_is_the_policys_method_with_the_blend_calibration():
    """The amplitudes get the blend section's alpha, floor and population; the method (and the MAD rule's own
    settings) stay the policy's."""
    params = BlendParams(alpha=0.01, scale_floor=0.5, population_weight=0.6, population_mean=-1.2,
                         population_scale=0.3)
    rule = blend_rule(OutlierRule(method="mad", anomaly_threshold=2.5, alpha=1e-9, population_weight=0.0), params)
    assert (rule.method, rule.anomaly_threshold) == ("mad", 2.5)
    assert (rule.alpha, rule.scale_floor, rule.population_weight, rule.population_mean, rule.population_scale) == \
        (0.01, 0.5, 0.6, -1.2, 0.3)


def test_the_blend_population_test_flags_a_class_far_below_clean_models_natural_amplitudes():
    """Natural classes that are faint and spread (a = 0.09-0.3): the within-model test sees no outlier at 0.045,
    but the clean models' natural classes (median a = 0.32, spread 0.34 in log) never come near it. With
    population weight 0 nothing is flagged; with the population test class 4 alone is."""
    amplitudes = np.array([0.30, 0.12, 0.22, 0.09, 0.045, 0.25, 0.15, 0.10, 0.19, 0.28])
    within = BlendParams(alpha=1e-4, scale_floor=0.3, population_weight=0.0)
    population = replace(within, population_weight=0.85, population_mean=np.log(0.32), population_scale=0.34)
    assert not blend_outliers(amplitudes, OutlierRule(), within).flagged.any()
    out = blend_outliers(amplitudes, OutlierRule(), population)
    assert out.flagged.tolist() == [c == 4 for c in range(10)]
    # the population part is the log amplitude's distance below the clean median, in spreads (one "pixel")
    np.testing.assert_allclose(out.population_z, (np.log(0.32) - np.log(amplitudes)) / 0.34)
    # an ordinary model (its classes like clean ones): nothing flagged
    ordinary = np.array([0.30, 0.35, 0.28, 0.41, 0.33, 0.25, 0.38, 0.31, 0.29, 0.36])
    assert not blend_outliers(ordinary, OutlierRule(), population).flagged.any()


def test_a_policys_blend_calibration_reaches_the_decision():
    """decide() judges the stored amplitudes with the policy's blend section: the same report flags a faint class
    under a calibration with the population test and not under the within-model test alone."""
    amplitudes = [0.30, 0.12, 0.22, 0.09, 0.045, 0.25, 0.15, 0.10, 0.19, 0.28]
    r = _with_blend(make_result([150.0 + 10 * i for i in range(10)]), amplitudes)
    within = Policy().override({"blend.population_weight": 0.0, "blend.alpha": 1e-4})
    population = Policy().override({"blend.population_weight": 0.85, "blend.alpha": 1e-4,
                                    "blend.population_mean": float(np.log(0.32)), "blend.population_scale": 0.34})
    assert decide(r, within).outcome == "accept"
    d = decide(r, population)
    assert d.outcome == "reject" and [(f.label, f.properties["mode"]) for f in d.findings] == [(4, "blend")]
