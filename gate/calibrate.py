"""Offline side of the runtime shield: scoring image sets, setting tau, and judging input detectors.

* :func:`shield_scores` — S(x) for float NHWC [0,1] images through an in-process oracle.
* :func:`threshold_for_frr` / :func:`calibrate` — tau from clean images for a target false-rejection
  rate: tau is the FRR-quantile of S on clean data (rejection is S < tau, so at most that fraction of
  the calibration images is refused).
* :func:`roc_auc` — area under the ROC curve of a detector score (Mann-Whitney, ties count one half).
* :func:`strip_entropy` — the STRIP baseline (Gao et al. 2019): superimpose the input on random clean
  images and take the mean entropy of the predictions; a trigger dominates every blend, so a low
  entropy means "triggered". Used for comparison in the benchmark.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gate import __version__
from gate.errors import GateError, UsageError
from gate.kernels import stamp_encode
from gate.oracle import Oracle
from gate.shield import Shield, oracle_forward

CALIBRATION_VERSION = "1.0"


def shield_scores(shield: Shield, oracle: Oracle, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """S(x) for float NHWC [0,1] images (n,), one model call per ``chunk`` images."""
    out = np.empty(len(images))
    forward = oracle_forward(oracle)
    for i in range(0, len(images), chunk):
        batch = oracle.encode(images[i:i + chunk])
        out[i:i + len(batch)] = shield.run(batch, forward).scores
    return out


def threshold_for_frr(clean_scores: np.ndarray, target_frr: float) -> float:
    """tau such that at most ``target_frr`` of the clean scores fall below it (rejection is S < tau)."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(s) == 0:
        raise GateError("no clean scores to calibrate on")
    if not 0.0 <= target_frr < 1.0:
        raise UsageError(f"target false-rejection rate must lie in [0, 1), got {target_frr}")
    return float(s[int(np.floor(target_frr * (len(s) - 1)))])


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score(positive) > score(negative)) + P(tie)/2 — AUC with "higher score = positive"."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def strip_entropy(oracle: Oracle, images: np.ndarray, pool: np.ndarray, overlays: int = 32,
                  alpha: float = 0.5, seed: int = 0, chunk: int = 64) -> np.ndarray:
    """STRIP score (n,): mean prediction entropy of ``(1-alpha)*x + alpha*c`` over ``overlays`` clean
    images c drawn from ``pool``. Low entropy -> likely triggered. The blend is the stamping kernel with
    a constant mask ``alpha`` and the clean image as pattern."""
    rng = np.random.default_rng(seed)
    h, w, _ = oracle.image_shape
    scale, offset = oracle.affine
    masks = np.full((overlays, h, w), alpha, np.float32)
    out = np.empty(len(images))
    buf = np.empty(oracle.spec.model_shape(overlays * chunk), np.float32)
    for i in range(0, len(images), chunk):
        x = np.ascontiguousarray(images[i:i + chunk], dtype=np.float32)
        b = len(x)
        overlay = np.ascontiguousarray(pool[rng.choice(len(pool), overlays, replace=len(pool) < overlays)],
                                       dtype=np.float32)
        rows = buf[:overlays * b]
        stamp_encode(x, masks, overlay, scale, offset, oracle.spec.channels_first, rows)
        p = np.clip(oracle.run_encoded(rows).astype(np.float64), 1e-12, 1.0)
        ent = -(p * np.log(p)).sum(axis=1).reshape(overlays, b)
        out[i:i + b] = ent.mean(axis=0)
    return out


# ---------------------------------------------------------------------- calibration file
@dataclass
class Calibration:
    threshold: float | None  # tau: reject when S(x) < tau; None when there was nothing to calibrate
    target_frr: float
    achieved_frr: float | None  # fraction of the calibration images with S < tau
    n: int
    triggers_sha256: str
    model_sha256: str
    flagged: list[int]
    data: str
    created: str
    score_quantiles: dict = field(default_factory=dict)
    version: str = CALIBRATION_VERSION
    tool: dict = field(default_factory=lambda: {"name": "backdoor-gate", "version": __version__})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise GateError(f"calibration file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise GateError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("version") != CALIBRATION_VERSION:
            raise GateError(f"{path} is not a calibration file (version {CALIBRATION_VERSION})")
        try:
            return cls(**d)
        except TypeError as exc:
            raise GateError(f"{path}: malformed calibration file: {exc}") from None


def calibrate(shield: Shield, oracle: Oracle, images: np.ndarray, target_frr: float, *,
              triggers_sha256: str, data: str) -> tuple[Calibration, np.ndarray]:
    """tau from clean images; returns the calibration and the clean scores."""
    if not 0.0 <= target_frr < 1.0:
        raise UsageError(f"--target-frr must lie in [0, 1), got {target_frr}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = dict(target_frr=float(target_frr), n=int(len(images)), triggers_sha256=triggers_sha256,
                  model_sha256=oracle.sha256, flagged=list(shield.labels), data=data, created=now)
    if not shield.active:
        return Calibration(threshold=None, achieved_frr=None, **common), np.full(len(images), np.inf)
    scores = shield_scores(shield, oracle, images)
    tau = threshold_for_frr(scores, target_frr)
    qs = {f"p{q:g}": float(np.quantile(scores, q / 100)) for q in (0.1, 1, 5, 10, 50, 90)}
    cal = Calibration(threshold=tau, achieved_frr=float(np.mean(scores < tau)), score_quantiles=qs, **common)
    return cal, scores
