"""MAD / median rules on hand-made norms."""

import numpy as np
import pytest

from gate.outliers import MAD_CONSISTENCY, OutlierRule, find_outliers


def test_clear_outlier_is_flagged_with_the_right_index():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 20.0])
    out = find_outliers(l1)
    median = np.median(l1)
    mad = np.median(np.abs(l1 - median))
    assert out.median == pytest.approx(median) and out.mad == pytest.approx(mad)
    assert out.anomaly_index[-1] == pytest.approx((median - 20) / (MAD_CONSISTENCY * mad))
    assert out.flagged.tolist() == [False] * 7 + [True]


def test_large_norms_are_never_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 400.0])
    out = find_outliers(l1)
    assert out.anomaly_index[-1] < -2
    assert not out.flagged.any()


def test_median_ratio_rule_flags_when_mad_is_large():
    # widely spread norms: the MAD index of 10 stays below 2, but 10 < median / 4
    l1 = np.array([10, 45, 60, 80, 100, 120, 140, 160.0])
    out = find_outliers(l1)
    assert out.anomaly_index[0] < 2
    assert out.flagged.tolist() == [True] + [False] * 7
    assert not find_outliers(l1, OutlierRule(median_ratio=0.1)).flagged.any()


def test_threshold_is_a_parameter():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 80.0])
    idx = find_outliers(l1).anomaly_index[-1]
    assert 2 < idx < 4
    assert find_outliers(l1).flagged[-1]
    assert not find_outliers(l1, OutlierRule(anomaly_threshold=4)).flagged[-1]


def test_several_targets_are_all_flagged():
    l1 = np.array([100, 104, 96, 110, 90, 102, 98, 105, 95, 12, 15.0])
    assert np.flatnonzero(find_outliers(l1).flagged).tolist() == [9, 10]


def test_equal_norms_flag_nothing_and_zero_mad_is_handled():
    assert not find_outliers(np.full(10, 50.0)).flagged.any()
    l1 = np.array([50, 50, 50, 50, 50, 49.0])
    out = find_outliers(l1)
    assert out.flagged.tolist() == [False] * 5 + [True]


def test_bad_input():
    with pytest.raises(ValueError):
        find_outliers([1.0])
    with pytest.raises(ValueError):
        OutlierRule(median_ratio=1.5)
