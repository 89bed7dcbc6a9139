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
    normal_upper_tail,
)

MAD = OutlierRule(method="mad")


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
    rule = OutlierRule(scale_floor=0.0)
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
    out = find_outliers(l1)
    assert not out.flagged.any()
    assert out.model_p_value > 0.05


def test_small_triggers_among_widely_spread_natural_classes_stand_out_in_log_space():
    """Naturals of 15-200 px and a 1-px target: the median/4 rule also flags the 15-px class."""
    l1 = np.array([15, 35, 60, 90, 120, 150, 200, 80, 45, 1.0])
    assert find_outliers(l1, MAD).flagged.tolist() == [True] + [False] * 8 + [True]
    out = find_outliers(l1, OutlierRule(alpha=1e-3))
    assert out.flagged.tolist() == [False] * 9 + [True]
    assert out.model_p_value < 1e-3 and out.anomaly_index[-1] > 2 * out.anomaly_index[0]


def test_two_and_three_targets_are_all_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 105, 95, 3, 4, 2.5])
    assert np.flatnonzero(find_outliers(l1).flagged).tolist() == [9, 10, 11]


def test_classes_without_a_trigger_and_large_norms_are_never_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 1024.0, 1024.0])
    out = find_outliers(l1)
    assert not out.flagged.any() and (out.anomaly_index[-2:] < 0).all()


@pytest.mark.parametrize("k", [10, 43, 1000])
def test_the_false_positive_rate_per_model_does_not_grow_with_the_number_of_classes(k):
    """Null models whose classes' log L1 spread no wider than the floor: the per-model rate stays at most
    about alpha for 10, 43 and 1000 classes (the paper's per-class threshold would flag more as k grows)."""
    rng = np.random.default_rng(k)
    rule = OutlierRule()
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
    cut = calibrated_threshold_l1(l1, OutlierRule())
    assert 3.0 < cut < 90.0
