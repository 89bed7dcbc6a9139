"""Which classes' reversed triggers are suspiciously small (paper Sec. 4, after Neural Cleanse).

A class is flagged when its mask L1 norm lies below the median and its MAD anomaly index exceeds
``anomaly_threshold`` (default 2), or when its L1 is below ``median_ratio`` (default 1/4) of the median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data


@dataclass(frozen=True)
class OutlierRule:
    anomaly_threshold: float = 2.0
    median_ratio: float = 0.25

    def __post_init__(self) -> None:
        if not self.anomaly_threshold > 0:
            raise ValueError("anomaly_threshold must be positive")
        if not 0 <= self.median_ratio < 1:
            raise ValueError("median_ratio must be in [0, 1)")


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


def find_outliers(l1, rule: OutlierRule = OutlierRule()) -> Outliers:
    l1 = np.asarray(l1, dtype=np.float64)
    if l1.ndim != 1 or len(l1) < 2:
        raise ValueError("outlier detection needs the L1 norms of at least two classes")
    median, mad, index = anomaly_index(l1)
    flagged = ((l1 < median) & (index > rule.anomaly_threshold)) | (l1 < rule.median_ratio * median)
    return Outliers(median, mad, index, flagged)
