"""The outlier rules on hand-made norms: the paper's MAD / median rule and the calibrated log-L1 rule."""

import numpy as np
import pytest

from gate.outliers import (
    MAD_CONSISTENCY,
    OutlierRule,
    calibrated_threshold_l1,
    corrected_p,
    critical_z,
    find_outliers,
    flag_threshold,
    normal_upper_tail,
    population_fit,
)

MAD = OutlierRule(method="mad")
# the within-model test alone (the calibrated rule before the population test; its fit of 2026-12-02)
WITHIN = OutlierRule(population_weight=0.0, scale_floor=1.0, alpha=0.08)


def test_clear_outlier_is_flagged_with_the_right_index():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 20.0])
    out = find_outliers(l1, MAD)
    median = np.median(l1)
    mad = np.median(np.abs(l1 - median))
    assert out.median == pytest.approx(median) and out.mad == pytest.approx(mad)
    assert out.anomaly_index[-1] == pytest.approx((median - 20) / (MAD_CONSISTENCY * mad))
    assert out.flagged.tolist() == [False] * 7 + [True]


def test_large_norms_are_never_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 400.0])
    out = find_outliers(l1, MAD)
    assert out.anomaly_index[-1] < -2
    assert not out.flagged.any()


def test_median_ratio_rule_flags_when_mad_is_large():
    # widely spread norms: the MAD index of 10 stays below 2, but 10 < median / 4
    l1 = np.array([10, 45, 60, 80, 100, 120, 140, 160.0])
    out = find_outliers(l1, MAD)
    assert out.anomaly_index[0] < 2
    assert out.flagged.tolist() == [True] + [False] * 7
    assert not find_outliers(l1, OutlierRule(method="mad", median_ratio=0.1)).flagged.any()


def test_threshold_is_a_parameter():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 80.0])
    idx = find_outliers(l1, MAD).anomaly_index[-1]
    assert 2 < idx < 4
    assert find_outliers(l1, MAD).flagged[-1]
    assert not find_outliers(l1, OutlierRule(method="mad", anomaly_threshold=4)).flagged[-1]


def test_several_targets_are_all_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 105, 95, 12, 15.0])
    assert np.flatnonzero(find_outliers(l1, MAD).flagged).tolist() == [9, 10]


def test_equal_norms_flag_nothing_and_zero_mad_is_handled():
    assert not find_outliers(np.full(10, 50.0), MAD).flagged.any()
    l1 = np.array([50, 50, 50, 50, 50, 49.0])
    out = find_outliers(l1, MAD)
    assert out.flagged.tolist() == [False] * 5 + [True]


def test_bad_input():
    with pytest.raises(ValueError):
        find_outliers([1.0])
    with pytest.raises(ValueError):
        OutlierRule(median_ratio=1.5)

    with pytest.raises(ValueError):
        OutlierRule(method="zscore")


# --------------------------------------------------------------------------- calibrated rule
def test_calibrated_z_is_leave_one_out_on_log_l1():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 20.0])
    rule = OutlierRule(scale_floor=0.0, population_weight=0.0)
    out = find_outliers(l1, rule)
    others = np.log(l1[:-1])
    med = np.median(others)
    scale = MAD_CONSISTENCY * np.median(np.abs(others - med))
    assert out.anomaly_index[-1] == pytest.approx((med - np.log(20.0)) / scale)
    p = 0.5 * __import__("math").erfc(out.anomaly_index[-1] / np.sqrt(2))
    assert out.p_values[-1] == pytest.approx(1 - (1 - p) ** len(l1))
    assert out.flagged.tolist() == [False] * 7 + [True]
    assert out.model_p_value == out.p_values[-1] and out.backdoor_score == pytest.approx(1 - out.p_values[-1])


def test_a_tight_cluster_does_not_make_a_natural_class_an_outlier():
    """The clean CIFAR-10 model of the issue: five classes within 3 % of the median, a natural class at 0.58x.
    Its MAD index is about 8 (the paper's rule rejects the model); with the log-scale floor it is ordinary."""
    l1 = np.array([100, 101, 99, 102, 98, 58, 130, 150, 85, 170.0])
    assert find_outliers(l1, MAD).flagged[5]
    out = find_outliers(l1, WITHIN)
    assert not out.flagged.any()
    assert out.model_p_value > 0.05


def test_small_triggers_among_widely_spread_natural_classes_stand_out_in_log_space():
    """Naturals of 15-200 px and a 1-px target: the median/4 rule also flags the 15-px class."""
    l1 = np.array([15, 35, 60, 90, 120, 150, 200, 80, 45, 1.0])
    assert find_outliers(l1, MAD).flagged.tolist() == [True] + [False] * 8 + [True]
    out = find_outliers(l1, OutlierRule(alpha=1e-3, scale_floor=1.0, population_weight=0.0))
    assert out.flagged.tolist() == [False] * 9 + [True]
    assert out.model_p_value < 1e-3 and out.anomaly_index[-1] > 2 * out.anomaly_index[0]


def test_two_and_three_targets_are_all_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 105, 95, 3, 4, 2.5])
    assert np.flatnonzero(find_outliers(l1, WITHIN).flagged).tolist() == [9, 10, 11]
    assert np.flatnonzero(find_outliers(l1, pixels=1024).flagged).tolist() == [9, 10, 11]


def test_classes_without_a_trigger_and_large_norms_are_never_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 1024.0, 1024.0])
    for out in (find_outliers(l1, WITHIN), find_outliers(l1, pixels=1024)):
        assert not out.flagged.any() and (out.anomaly_index[-2:] < 0).all()


@pytest.mark.parametrize("k", [10, 43, 1000])
def test_the_false_positive_rate_per_model_does_not_grow_with_the_number_of_classes(k):
    """Null models whose classes' log L1 spread no wider than the floor: the per-model rate stays at most
    about alpha for 10, 43 and 1000 classes (the paper's per-class threshold would flag more as k grows)."""
    rng = np.random.default_rng(k)
    rule = WITHIN
    n = 300 if k < 1000 else 60
    models = [np.exp(rng.normal(4.0, 0.3, k)) for _ in range(n)]
    rate = np.mean([find_outliers(l1, rule).flagged.any() for l1 in models])
    assert rate <= 3 * rule.alpha + 2 / n
    mad_rate = np.mean([find_outliers(l1, MAD).flagged.any() for l1 in models])
    assert mad_rate > rate


def test_corrected_p_and_the_critical_z_agree():
    for k in (10, 43, 1000):
        z = critical_z(0.01, k)
        assert corrected_p(normal_upper_tail(np.array([z])), k)[0] == pytest.approx(0.01, rel=1e-6)
    assert critical_z(0.01, 1000) > critical_z(0.01, 10)


def test_the_chart_line_sits_between_the_flagged_and_the_rest():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 105, 95, 3.0])
    cut = calibrated_threshold_l1(l1, WITHIN)
    assert 3.0 < cut < 90.0


# --------------------------------------------------------------------------- the population test
def test_a_planted_trigger_among_small_natural_classes_is_found_by_the_population_test():
    """The wide zoo's CIFAR-10 failure: natural classes of 16-60 px (a tight model), the target at 4 px of
    1024. Within the model it is no outlier (z about 2); against clean models' natural classes (a median
    of 23 % of the image) it is."""
    l1 = np.array([16, 18, 22, 26, 30, 35, 40, 48, 60, 4.0])
    assert not find_outliers(l1, WITHIN).flagged.any()
    out = find_outliers(l1, OutlierRule(), pixels=1024)
    assert out.flagged.tolist() == [False] * 9 + [True]
    # the same model at 4x the pixels (and triggers 4x as large) is judged the same: only L1 / pixels counts
    same = find_outliers(4 * l1, OutlierRule(), pixels=4096)
    assert np.allclose(same.anomaly_index, out.anomaly_index) and same.flagged.tolist() == out.flagged.tolist()


def test_the_combined_z_is_the_weighted_mean_of_the_two_tests():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 20.0])
    rule = OutlierRule(population_weight=0.3, population_mean=-2.0, population_scale=0.5)
    within = find_outliers(l1, OutlierRule(population_weight=0.0, scale_floor=rule.scale_floor)).anomaly_index
    population = (-2.0 - (np.log(l1) - np.log(1024))) / 0.5
    got = find_outliers(l1, rule, pixels=1024)
    assert np.allclose(got.anomaly_index, 0.7 * within + 0.3 * population)
    assert np.allclose(got.p_values, corrected_p(normal_upper_tail(got.anomaly_index), len(l1)))


def test_the_population_test_needs_the_pixel_count():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 20.0])
    with pytest.raises(ValueError, match="pixel count"):
        find_outliers(l1, OutlierRule())
    assert find_outliers(l1, OutlierRule(population_weight=0.0)).flagged[-1] == find_outliers(
        l1, OutlierRule(population_weight=0.0), pixels=1024).flagged[-1]


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.85, 1.0])
def test_the_threshold_is_the_combined_rules_exact_cut(weight):
    """flag_threshold against a reference set is where find_outliers starts to flag a class outside it."""
    rng = np.random.default_rng(1)
    ref = np.exp(rng.normal(4.5, 0.5, 12))
    rule = OutlierRule(population_weight=weight, alpha=0.01, scale_floor=0.3)
    t = flag_threshold(ref, rule, 13, pixels=1024)
    reference = np.r_[np.ones(12, bool), False]
    for l1, flagged in ((t * 0.99, True), (t * 1.01, False)):
        assert bool(find_outliers(np.r_[ref, l1], rule, reference=reference, pixels=1024).flagged[-1]) is flagged


@pytest.mark.parametrize("k", [10, 43, 1000])
def test_models_drawn_from_the_population_are_flagged_at_most_at_alpha(k):
    """Clean models whose classes are drawn from the population the rule describes: the per-model rate of the
    combined rule stays at most about alpha for 10, 43 and 1000 classes."""
    rng = np.random.default_rng(k)
    rule = OutlierRule(alpha=0.05, scale_floor=0.3, population_weight=0.85)
    n = 300 if k < 1000 else 60
    centre = rule.population_mean + np.log(1024)
    models = [np.exp(rng.normal(centre, rule.population_scale, k)) for _ in range(n)]
    rate = np.mean([find_outliers(l1, rule, pixels=1024).flagged.any() for l1 in models])
    assert rate <= rule.alpha + 3 * np.sqrt(rule.alpha / n) + 1 / n


def test_the_population_fit_is_the_median_and_mad_of_every_clean_class():
    models = [(np.array([64.0, 128.0, 256.0]), 1024), (np.array([256.0, 512.0, 1024.0]), 4096)]
    mean, scale = population_fit(models)
    assert mean == pytest.approx(np.log(128 / 1024))  # both models' classes are 1/16, 1/8, 1/4 of the image
    assert scale == pytest.approx(1.4826 * np.log(2))
    with pytest.raises(ValueError):
        population_fit([])
