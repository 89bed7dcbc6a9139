"""Which classes' reversed triggers are suspiciously small (paper Sec. 4, after Neural Cleanse).

A class is flagged when its mask L1 norm lies below the median and its MAD anomaly index exceeds
``anomaly_threshold`` (default 2), or when its L1 is below ``median_ratio`` (default 1/4) of the median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gate.settings import Settings, number, setting

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data


@dataclass(frozen=True)
class OutlierRule(Settings):
    """Which classes are outliers (policy section ``outliers``)."""

    SECTION = "outliers"

    anomaly_threshold: float = setting(2.0, number(0, lo_open=True),
                                       "flag below the median at this MAD anomaly index")
    median_ratio: float = setting(0.25, number(0, 1, hi_open=True), "flag L1 below this fraction of the median")


@dataclass(frozen=True)
class Outliers:
    median: float
    mad: float  # raw median absolute deviation (before the consistency constant)
    anomaly_index: np.ndarray  # (median - l1) / (1.4826 * MAD): positive below the median
    flagged: np.ndarray  # bool


def anomaly_index(l1: np.ndarray) -> tuple[float, float, np.ndarray]:
    l1 = np.asarray(l1, dtype=np.float64)
    median = float(np.median(l1))
    mad = float(np.median(np.abs(l1 - median)))
    below = median - l1
    scale = MAD_CONSISTENCY * mad
    if scale > 0:
        index = below / scale
    else:  # all (or most) norms equal: any norm below the median is infinitely anomalous
        index = np.where(below > 0, np.inf, np.where(below < 0, -np.inf, 0.0))
    return median, mad, index


def finite_index(x: float) -> float:
    """An anomaly index as a JSON-safe number: +-1e9 stands for +-inf (a MAD of 0)."""
    x = float(x)
    return x if math.isfinite(x) else (1e9 if x > 0 else -1e9)


def find_outliers(l1, rule: OutlierRule = OutlierRule()) -> Outliers:
    l1 = np.asarray(l1, dtype=np.float64)
    if l1.ndim != 1 or len(l1) < 2:
        raise ValueError("outlier detection needs the L1 norms of at least two classes")
    median, mad, index = anomaly_index(l1)
    flagged = ((l1 < median) & (index > rule.anomaly_threshold)) | (l1 < rule.median_ratio * median)
    return Outliers(median, mad, index, flagged)
