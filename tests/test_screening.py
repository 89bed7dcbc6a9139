"""Screening (gate.screening): a synthetic problem with known answers, the rule's threshold, and the scan."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import math

import numpy as np
import pytest

import gate.outliers
import gate.screening
from gate.data import ImageSet
from gate.decision import decide
from gate.oracle import Oracle
from gate.outliers import OutlierRule, find_outliers, flag_threshold
from gate.policy import Policy
from gate.result import ScanResult
from gate.scan import ScanConfig, ScanEngine
from gate.screening import SCREENED_OUT, Screening, ScreeningParams
from gate.search import SearchParams
from tests.helpers import linear_model

K = 43
PIXELS = 1024  # the synthetic trajectories start from the whole 32x32 image


def trajectories(seed: int, backdoor: int | None = 29, steps: int = 400):
    """Known answers: every class's L1 after each step, shrinking from the whole image (1024) towards its
    final size at its own rate. Natural classes end log-normally around 100 px, a backdoor class at 3 px."""
    rng = np.random.default_rng(seed)
    final = np.exp(rng.normal(math.log(100.0), 0.5, K))
    rate = rng.uniform(0.012, 0.03, K)
    if backdoor is not None:
        final[backdoor], rate[backdoor] = 3.0, 0.03
    t = np.arange(1, steps + 1)[:, None]
    return final + (1024.0 - final) * np.exp(-rate * t), final  # (steps, K), (K,)


def screen(traj: np.ndarray, params: ScreeningParams, rule: OutlierRule, seed: int, last=None):
    """Play a screened scan over known trajectories (each class stepping on its own counter, as in the scan):
    the screening, the L1 each class reports and the steps each class ran. ``last``: the step each class
    converges at (default: all at the trajectories' end)."""
    sc = Screening.start(K, params, rule, seed, pixels=PIXELS)
    last = np.full(K, len(traj)) if last is None else np.asarray(last)
    steps = np.zeros(K, int)
    done = np.zeros(K, bool)
    stopped = np.zeros(K, bool)
    while not (done | stopped).all():
        for c in np.flatnonzero(~done & ~stopped & ~sc.waiting):
            steps[c] += 1
            done[c] = steps[c] == last[c]
            sc.observe(c, int(steps[c]), float(traj[steps[c] - 1, c]), bool(done[c]))
        if sc.ready(done):
            stop, _ = sc.decide(traj[steps - 1, np.arange(K)], done)
            stopped[stop] = True
    return sc, traj[steps - 1, np.arange(K)], steps


@pytest.mark.parametrize("seed", range(6))
def test_screened_verdicts_equal_the_converged_ones(seed):
    traj, _ = trajectories(seed)
    final = traj[-1]  # converged
    rule = OutlierRule()
    params = ScreeningParams(steps=150, margin=0.5)
    sc, reported, ran = screen(traj, params, rule, seed)
    stopped = np.flatnonzero(ran == params.steps)
    assert len(stopped) > 15  # the screening saves work ...
    assert not sc.reference[stopped].any() and 29 not in stopped  # ... never on a reference or the backdoor
    # the known answer: the rule on every class's converged L1, against the same reference classes
    truth = find_outliers(final, rule, reference=sc.reference, pixels=PIXELS)
    got = find_outliers(reported, rule, reference=sc.reference, pixels=PIXELS)
    assert got.flagged.tolist() == truth.flagged.tolist()
    assert np.flatnonzero(got.flagged).tolist() == [29]
    # every stopped class would truly not have been flagged, and converges above the threshold
    assert np.all(final[stopped] > sc.threshold)
    # the statistics: the reference classes alone, so the flagged class's z is the same as with converged L1s
    assert got.anomaly_index[29] == pytest.approx(truth.anomaly_index[29])
    assert got.median == pytest.approx(np.median(final[sc.reference]))


def test_upper_bounds_in_the_reference_would_bias_the_statistics():
    """Why the reference excludes screened-out classes: their upper bounds pull the median up."""
    traj, _ = trajectories(1)
    final = traj[-1]
    sc, reported, ran = screen(traj, ScreeningParams(steps=150, margin=0.5), OutlierRule(), 1)
    # the z's read with a scale floor below this model's spread of log L1, so they show the whole median shift (at
    # the default floor, 0.6, the floor caps the scale and the same shift reads as 0.8 instead of over 1)
    rule = OutlierRule(scale_floor=0.3)
    biased = find_outliers(reported, rule, pixels=PIXELS)  # every class in the reference, upper bounds too
    unbiased = find_outliers(reported, rule, reference=sc.reference, pixels=PIXELS)
    truth = find_outliers(final, rule, reference=sc.reference, pixels=PIXELS)
    assert biased.median > 1.3 * np.median(final)
    assert unbiased.within_z[29] == pytest.approx(truth.within_z[29])
    assert abs(biased.within_z[29] - truth.within_z[29]) > 1.0  # the backdoor's z is off by more than 1


def test_a_clean_model_stays_clean():
    traj, _ = trajectories(3, backdoor=None)
    sc, reported, ran = screen(traj, ScreeningParams(steps=150, margin=0.5), OutlierRule(), 3)
    assert not find_outliers(reported, OutlierRule(), reference=sc.reference, pixels=PIXELS).flagged.any()
    assert (ran == 150).sum() > 15


@pytest.mark.parametrize("seed", range(6))
def test_a_shrink_is_learnt_only_from_classes_still_searching_at_the_budget(seed):
    """Most classes converge before the screening budget (after it they shrink by 0); the backdoor is still
    shrinking there, from 60 px to 3, and two natural classes search on too. Learnt from every converged
    reference class the shrink would be 0 and the backdoor's bound, 60 px, would stop it; learnt from the reference
    classes still searching at the budget (at most two here: too few) nothing is learnt and it searches on."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, 401)[:, None]
    final = np.exp(rng.normal(math.log(100.0), 0.3, K))
    last = np.full(K, 100)
    late = rng.choice(np.setdiff1d(np.arange(K), [29]), 2, replace=False)
    last[late], last[29], final[29] = 300, 400, 3.0
    early = final + (1024.0 - final) * np.exp(-0.08 * t)
    tail = final + np.where(np.arange(K) == 29, 57.0, 0.2 * final) * np.exp(-0.01 * np.maximum(t - 150, 0))
    traj = np.where(last == 100, early, np.where(t <= 150, np.maximum(early, tail[149]), tail))
    traj = np.where(t > last, traj[last - 1, np.arange(K)], traj)  # a converged class stays where it stopped
    sc, reported, ran = screen(traj, ScreeningParams(steps=150, margin=0.5), OutlierRule(), seed, last=last)
    assert sc.running_at_screen.tolist() == (last > 150).tolist()
    assert sc.shrink is None and ran[29] == 400
    assert np.flatnonzero(find_outliers(reported, OutlierRule(), reference=sc.reference, pixels=PIXELS).flagged
                          ).tolist() == [29]
    # what a shrink learnt from the converged reference classes (0) would have done: stop the backdoor
    assert math.log(traj[149, 29]) - sc.params.margin > math.log(sc.threshold)


def test_without_converged_reference_classes_nothing_is_stopped():
    sc = Screening.start(K, ScreeningParams(steps=5), OutlierRule(), 0, pixels=PIXELS)
    for c in range(K):
        sc.observe(c, 5, 500.0, done=False)
    stop, resume = sc.decide(np.full(K, 400.0), np.zeros(K, bool))  # the reference hit max_steps: no shrink learnt
    assert stop == [] and len(resume) == K - sc.reference.sum()
    assert sc.shrink is None


def test_few_classes_are_all_reference():
    sc = Screening.start(10, ScreeningParams(), OutlierRule(), 0)
    assert sc.reference.all() and not sc.active


def test_reference_draw_depends_on_the_seed_only():
    a = Screening.start(K, ScreeningParams(), OutlierRule(), 7).reference
    b = Screening.start(K, ScreeningParams(), OutlierRule(), 7, probs=np.eye(K)[np.arange(100) % K]).reference
    assert a.tolist() == b.tolist() and a.sum() == 11  # ceil(0.25 * 43)
    assert Screening.start(K, ScreeningParams(), OutlierRule(), 8).reference.tolist() != a.tolist()


@pytest.mark.parametrize("rule", [OutlierRule(), OutlierRule(scale_floor=0.3, alpha=0.01),
                                  OutlierRule(population_weight=0.0), OutlierRule(method="mad")])
def test_flag_threshold_is_the_rules_cut(rule):
    rng = np.random.default_rng(0)
    ref = np.exp(rng.normal(4.0, 0.6, 12))
    t = flag_threshold(ref, rule, 13, PIXELS)
    reference = np.r_[np.ones(12, bool), False]
    for l1, flagged in ((t * 0.98, True), (t * 1.02, False)):
        out = find_outliers(np.r_[ref, l1], rule, reference=reference, pixels=PIXELS)
        assert bool(out.flagged[-1]) is flagged


def test_docstring_examples():
    assert doctest.testmod(gate.screening).failed == 0
    assert doctest.testmod(gate.outliers).failed == 0


# --------------------------------------------------------------------------- in a scan
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("screen") / "linear20.onnx"
    linear_model(path, size=6, classes=20, seed=4, softmax=True)
    rng = np.random.default_rng(1)
    return path, ImageSet(rng.random((80, 6, 6, 3), dtype=np.float32), None, "uniform noise")


CFG = ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=4, max_steps=150, early_stop_patience=5),
                 max_images=80, held_out=10, screening=True,
                 screening_params=ScreeningParams(steps=6, reference_min=5, reference_fraction=0.0))


def test_a_screened_scan_stops_classes_and_decides_from_its_reference(model):
    path, images = model
    result = ScanEngine(Oracle(path, threads=1), images, CFG).run().result
    statuses = [c.status for c in result.classes]
    reference = [c.reference for c in result.classes]
    assert sum(reference) == 5
    screened = [c for c in result.classes if c.status == SCREENED_OUT]
    assert all(not c.reference and c.steps == 6 for c in screened)
    assert result.outliers["screening"]["reference"] == [c.label for c in result.classes if c.reference]
    assert sum(c.queries for c in screened) < sum(c.queries for c in result.classes) / 2 or not screened
    # the stored report, judged again, gives the scan's flags (the reference travels with the classes)
    again = ScanResult.from_dict(result.to_dict())
    policy = Policy().override({"search.screening": True})
    assert screened and "running" not in statuses
    assert decide(again, policy).model_p_value == pytest.approx(result.outliers["model_p_value"])
    for c in again.classes:  # without the reference the upper bounds would enter the statistics
        c.reference = None
    assert decide(again, policy).model_p_value != pytest.approx(result.outliers["model_p_value"])


def test_screening_off_or_inactive_is_the_unscreened_scan(model):
    path, images = model
    plain = ScanEngine(Oracle(path, threads=1), images, dataclasses.replace(CFG, screening=False)).run().result
    every = dataclasses.replace(CFG, screening_params=ScreeningParams(steps=6, reference_min=20))
    inactive = ScanEngine(Oracle(path, threads=1), images, every).run().result
    assert [c.l1 for c in inactive.classes] == [c.l1 for c in plain.classes]
    assert "screening" not in inactive.outliers and all(c.reference is None for c in inactive.classes)


def test_a_screened_scan_resumes_from_a_snapshot(model):
    path, images = model
    whole = ScanEngine(Oracle(path, threads=1), images, CFG).run().result
    first = ScanEngine(Oracle(path, threads=1), images, CFG)
    snaps = []
    first.run(after_round=lambda e: snaps.append(copy.deepcopy(e.snapshot())) if e.step == 8 else None)
    meta, arrays = snaps[0]
    assert "screening" in meta
    second = ScanEngine(Oracle(path, threads=1), images, CFG)
    second.restore(meta, arrays)
    resumed = second.run().result
    assert [c.l1 for c in resumed.classes] == [c.l1 for c in whole.classes]
    assert [c.status for c in resumed.classes] == [c.status for c in whole.classes]
