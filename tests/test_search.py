"""NES trigger search: the estimators are unbiased on an analytic problem; the lambda schedule; a toy solve."""

import numpy as np
import pytest

from gate.search import SearchParams, TriggerSearch, g

H, W, C = 2, 3, 2
LAM = 0.3


def analytic_f(masks, patterns, a, w, v):
    """F(m, p) = a.m + (sum m)^2 + sum_i m_i (w_i.p_i + v_i.p_i^2) (lambda |m|_1 is added by the search).

    Like a stamped image, F sees the pattern only where the mask is on.
    """
    ms = masks.reshape(len(masks), -1).astype(np.float64)
    ps = patterns.reshape(len(patterns), ms.shape[1], -1).astype(np.float64)
    shown = (ps * w.reshape(ms.shape[1], -1) + ps ** 2 * v.reshape(ms.shape[1], -1)).sum(2)
    return ms @ a + ms.sum(1) ** 2 + (ms * shown).sum(1)


def exact_gradients(theta_m, theta_p, sigma, a, w, v, sampling):
    """Gradient of the smoothed objective each estimator targets, plus lambda E|m|_1."""
    q = g(theta_m).reshape(-1)
    dq = 2 * q * (1 - q)
    z, wts = np.polynomial.hermite_e.hermegauss(60)  # E over eps ~ N(0, 1)
    wts = wts / wts.sum()
    t = theta_p.reshape(-1)[:, None] + sigma * z[None]
    gz = g(t)
    dg = 2 * gz * (1 - gz)
    c = theta_p.shape[-1]
    if sampling == "separate":  # Eq. 5 evaluates mask samples with the mean pattern g(theta_p)
        gp = g(theta_p.reshape(-1))
        per_pixel = (w * gp + v * gp ** 2).reshape(-1, c).sum(1)
    else:
        per_pixel = (w * (gz @ wts) + v * ((gz ** 2) @ wts)).reshape(-1, c).sum(1)
    # E[(sum m)^2] = sum q(1-q) + (sum q)^2
    grad_m = (a + (1 - 2 * q) + 2 * q.sum() + LAM + per_pixel) * dq
    grad_p = np.repeat(q, c) * (w * (dg @ wts) + v * ((2 * gz * dg) @ wts))
    return grad_m.reshape(theta_m.shape), grad_p.reshape(theta_p.shape)


@pytest.mark.parametrize("sampling, antithetic",
                         [("paired", True), ("joint", True), ("joint", False), ("separate", False)])
def test_estimators_are_unbiased(sampling, antithetic):
    rng = np.random.default_rng(0)
    a = rng.normal(size=H * W)
    w = rng.normal(size=H * W * C) * 3
    v = rng.normal(size=H * W * C) * 3
    params = SearchParams(k=20, sigma=0.3, sampling=sampling, antithetic=antithetic)
    search = TriggerSearch((H, W, C), params)
    state = search.init(np.random.default_rng(1))
    state.theta_m[...] = rng.normal(size=(H, W))
    state.theta_p[...] = rng.normal(size=(H, W, C))
    state.lam = LAM
    gm, gp = [], []
    for _ in range(1500):
        masks, patterns = search.ask(state)
        f = analytic_f(masks, patterns, a, w, v)
        m, p = search.gradients(state, f)
        gm.append(m)
        gp.append(p)
    gm, gp = np.array(gm), np.array(gp)
    want_m, want_p = exact_gradients(state.theta_m, state.theta_p, params.sigma, a, w, v, sampling)
    for est, want in ((gm, want_m), (gp, want_p)):
        mean = est.mean(0)
        se = est.std(0) / np.sqrt(len(est))
        assert np.all(np.abs(mean - want) < 5 * se + 1e-3), (mean, want, se)
    # and the estimate is informative: it points the same way as the true gradient
    assert np.corrcoef(gm.mean(0).ravel(), want_m.ravel())[0, 1] > 0.95
    assert np.corrcoef(gp.mean(0).ravel(), want_p.ravel())[0, 1] > 0.95


def test_estimator_detects_a_wrong_gradient():
    """Guard against a vacuous test: a biased estimate (sign flipped) is caught by the same comparison."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=H * W)
    search = TriggerSearch((H, W, C), SearchParams(k=20))
    state = search.init(np.random.default_rng(1))
    state.lam = LAM
    est = []
    for _ in range(500):
        masks, patterns = search.ask(state)
        est.append(-search.gradients(state, analytic_f(masks, patterns, a, 0 * a.repeat(C), 0 * a.repeat(C)))[0])
    want_m, _ = exact_gradients(state.theta_m, state.theta_p, 0.3, a, 0 * a.repeat(C), 0 * a.repeat(C), "paired")
    est = np.array(est)
    assert np.any(np.abs(est.mean(0) - want_m) > 5 * est.std(0) / np.sqrt(len(est)) + 1e-3)


def test_ask_layout_joint_antithetic():
    search = TriggerSearch((H, W, C), SearchParams(k=6, sampling="joint"))
    state = search.init(np.random.default_rng(0))
    masks, patterns = search.ask(state)
    assert masks.shape == (7, H, W) and patterns.shape == (7, H, W, C)
    np.testing.assert_allclose(state.u[3:], 1 - state.u[:3])
    np.testing.assert_allclose(state.eps[3:], -state.eps[:3])
    np.testing.assert_allclose(patterns[:6], g(state.theta_p + search.params.sigma * state.eps), rtol=1e-5)
    np.testing.assert_array_equal(masks[-1], g(state.theta_m) >= 0.5)  # the current trigger comes last
    assert set(np.unique(masks)) <= {0.0, 1.0}


def test_ask_layout_paired():
    search = TriggerSearch((H, W, C), SearchParams(k=8))
    state = search.init(np.random.default_rng(0))
    state.theta_p[...] = np.random.default_rng(1).normal(size=(H, W, C))
    masks, patterns = search.ask(state)
    assert masks.shape == (9, H, W)
    np.testing.assert_array_equal(masks[4:8], masks[:4])  # each mask twice ...
    sigma = search.params.sigma
    shown = np.broadcast_to(masks[:4, ..., None] == 1.0, (4, H, W, C))
    assert shown.any() and not shown.all()
    eps = state.eps[:4]
    np.testing.assert_allclose(patterns[:4][shown], g(state.theta_p + sigma * eps)[shown], rtol=1e-5)  # ... with
    np.testing.assert_allclose(patterns[4:8][shown], g(state.theta_p - sigma * eps)[shown], rtol=1e-5)  # mirrored noise
    assert np.all(eps[~shown] == 0.0)  # noise is drawn only where the mask shows the pattern
    hidden = np.broadcast_to(g(state.theta_p), (4, H, W, C))[~shown]
    np.testing.assert_allclose(patterns[:4][~shown], hidden, rtol=1e-5)  # hidden: the mean pattern (never stamped)
    np.testing.assert_allclose(patterns[4:8][~shown], hidden, rtol=1e-5)
    np.testing.assert_array_equal(patterns[:4] + patterns[4:8] > 1.0, np.broadcast_to(state.theta_p > 0, (4, H, W, C)))


def test_paired_noise_follows_the_mask_on_a_coarse_grid_too():
    """The scatter of the shown pixels' normals keeps masks, noise and both mirrored patterns aligned whatever the
    mask's density (all hidden, all shown, anything between) and on a grid of cells."""
    search = TriggerSearch((64, 48, 3), SearchParams(k=6, grid_cells=16))
    assert search.shape == (16, 12, 3)
    state = search.init(np.random.default_rng(3))
    state.theta_p[...] = np.random.default_rng(4).normal(size=search.shape)
    for logit in (-30.0, 30.0, 0.0):
        state.theta_m[...] = logit
        masks, patterns = search.ask(state)
        shown = np.broadcast_to(masks[:3, ..., None] == 1.0, (3, *search.shape))
        assert shown.mean() == pytest.approx({-30.0: 0.0, 30.0: 1.0, 0.0: 0.5}[logit], abs=0.1)
        plus = np.where(shown, g(state.theta_p + 0.3 * state.eps[:3]), g(state.theta_p))
        minus = np.where(shown, g(state.theta_p - 0.3 * state.eps[:3]), g(state.theta_p))
        np.testing.assert_allclose(patterns[:3], plus, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(patterns[3:6], minus, rtol=1e-5, atol=1e-6)
        if shown.any():
            assert abs(float(state.eps[:3][shown].std()) - 1.0) < 0.1  # standard normals where shown


def test_separate_sampling_is_the_papers_layout():
    search = TriggerSearch((H, W, C), SearchParams(k=4, sampling="separate", antithetic=False))
    state = search.init(np.random.default_rng(0))
    masks, patterns = search.ask(state)
    assert masks.shape == (9, H, W)
    np.testing.assert_allclose(patterns[:4], np.broadcast_to(g(state.theta_p), (4, H, W, C)))  # Eq. 5
    np.testing.assert_allclose(masks[4:8], np.broadcast_to(g(state.theta_m), (4, H, W)))  # Eq. 6: soft mask


def test_lambda_schedule_and_early_stop():
    p = SearchParams(k=4, patience=5, early_stop_patience=12, max_steps=1000, early_stop_min_shrink=0.0)
    search = TriggerSearch((H, W, C), p)
    state = search.init(np.random.default_rng(0))
    ce = np.zeros(p.candidates)
    search.tell(state, ce, 0.5)
    assert state.lam == 0 and not state.lambda_active
    search.tell(state, ce, 1.0)
    assert state.lambda_active and state.lam == pytest.approx(p.lambda_init)
    assert state.best_mask is not None
    for _ in range(5):
        search.tell(state, ce, 1.0)
    assert state.lam == pytest.approx(1.5 * p.lambda_init)
    for _ in range(5):
        search.tell(state, ce, 0.0)
    assert state.lam == pytest.approx(1.5 * p.lambda_init / 1.5 ** 1.5)
    for _ in range(40):
        if state.done:
            break
        search.tell(state, ce, 0.0)  # never succeeds again: best L1 cannot improve
    assert state.done and state.status == "converged"


def test_no_early_stop_before_the_trigger_shrank():
    """lambda flickering up and down while the mask has not shrunk is not convergence."""
    p = SearchParams(k=4, patience=5, early_stop_patience=12, max_steps=120)
    search = TriggerSearch((H, W, C), p)
    state = search.init(np.random.default_rng(0))
    ce = np.zeros(p.candidates)
    for success in [1.0] * 6 + [0.0] * 5:
        search.tell(state, ce, success)
    assert state.raised and state.lowered
    while not state.done:
        search.tell(state, ce, 0.0)
    assert state.status == "max_steps" and state.step == 120


def test_max_steps_without_success_is_not_reached():
    search = TriggerSearch((H, W, C), SearchParams(k=4, max_steps=7))
    state = search.init(np.random.default_rng(0))
    while not state.done:
        search.ask(state)
        search.tell(state, np.ones(5), 0.0)
    assert state.status == "not_reached" and state.step == 7
    m, _, l1 = state.result_trigger()
    assert l1 == m.size  # no working trigger: as large as the image, never the smallest


def test_search_finds_a_one_pixel_trigger():
    """A toy 'model' that is fooled only by a bright value at pixel (1, 2), channel 0."""
    h, w, c = 4, 4, 1
    search = TriggerSearch((h, w, c), SearchParams(k=20, max_steps=300, lambda_init=0.05))
    state = search.init(np.random.default_rng(3))

    def strength(masks, patterns):
        return masks[:, 1, 2] * patterns[:, 1, 2, 0]

    while not state.done:
        masks, patterns = search.ask(state)
        s = strength(masks, patterns)
        ce = 4.0 * (1.0 - s)  # cross-entropy falls as the trigger pixel gets brighter
        success = float(s[-1] > 0.6)  # the current trigger (binary mask, mean pattern) fools the 'model'
        search.tell(state, ce, success)
    mask, pattern, l1 = state.result_trigger()
    assert state.best_mask is not None
    assert np.unravel_index(mask.argmax(), mask.shape) == (1, 2)
    assert l1 < 2.5  # 16 pixels in all; the trigger needs about one
    assert mask[1, 2] > 0.5 and pattern[1, 2, 0] > 0.6


def test_a_flat_loss_shows_more_of_the_image_and_is_explained():
    """Saturated outputs: every sample gets the same floored loss, so NES has no gradient. The search then
    lowers the mask logits (reveals more of the clean image) instead of stalling, and says why it failed."""
    p = SearchParams(k=4, max_steps=16)
    search = TriggerSearch((H, W, C), p)
    state = search.init(np.random.default_rng(0))
    for _ in range(6):
        search.ask(state)
        search.tell(state, np.full(p.candidates, 85.19), 0.0)
    assert state.flat_steps == 6
    np.testing.assert_allclose(state.theta_m, p.mask_init - 6 * p.flat_shrink)  # 1 - 3: not yet at the floor
    while not state.done:
        search.ask(state)
        search.tell(state, np.full(p.candidates, 85.19), 0.0)
    assert state.theta_m.min() == -3.0  # shrinking stops: a mask of nothing could not find a trigger either
    why = search.explain(state)
    assert "no trigger reached 99% success in 16 steps" in why and "did not move" in why

    varied = search.init(np.random.default_rng(0))
    search.ask(varied)
    search.tell(varied, np.linspace(1.0, 2.0, p.candidates), 0.0)
    assert varied.flat_steps == 0 and "did not move" not in search.explain(varied)


def test_result_l1_is_the_l1_result_trigger_reports():
    """The cheap per-round L1 (no arrays built) is the one the report's trigger carries, before and after a trigger
    works, for the patch search and the blend search."""
    from gate.blend import BlendParams, BlendSearch

    params = SearchParams(k=4)
    for search in (TriggerSearch((8, 6, 3), params), BlendSearch((8, 6, 3), params, BlendParams())):
        state = search.init(np.random.default_rng(0))
        search.ask(state)
        assert state.result_l1 == state.result_trigger()[2] == 48.0  # nothing worked: the whole image
        search.tell(state, np.linspace(1.0, 2.0, search.params.candidates), 1.0)  # the current trigger works
        assert state.result_l1 == state.result_trigger()[2] < 48.0
