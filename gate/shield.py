"""The runtime shield (Dong et al. 2021, Sec. 5): refuse inputs that already carry the backdoor trigger.

For an input x and the reversed trigger (m, p) of every flagged class::

    A(x, m, p) = (1 - m) * x + m * p
    S(x)       = min_j KL( f(x) || f(A(x, m_j, p_j)) )

Stamping a trigger onto a clean image moves the model's prediction a lot (towards the target class);
an image that already carries the trigger barely moves, so a small S(x) means "triggered": reject when
S(x) < tau. With several flagged classes the minimum over their triggers is the score.

The shield does no I/O. It stamps a batch of model-format inputs and their triggered copies into one
preallocated buffer (one model call answers for all of them) and scores the model's answer; whoever
owns the model (an in-process :class:`gate.oracle.Oracle`, or a remote V2 server) runs the buffer.

Stamping happens in the model's own input space: the input encoding ``e = scale * x + offset`` is affine
per channel, so ``scale * A(x, m, p) + offset = (1 - m) * e + m * (scale * p + offset)``. The shield
encodes each pattern once and never decodes a request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gate.decision import RULE_SMALL_TRIGGER
from gate.errors import GateError
from gate.kernels import stamp_encode, stamping_threads
from gate.oracle import file_sha256, softmax
from gate.result import Triggers, read_report
from gate.spec import InputSpec

PROB_FLOOR = 1e-12  # probabilities are clipped here before the logarithms of the KL divergence
# Batches up to this many stamped rows are stamped on the calling thread alone: waking the kernel's thread
# pool costs more than the work (milliseconds on a busy machine), and the proxy stamps small batches.
SERIAL_ROWS = 512


@dataclass(frozen=True)
class Scored:
    """The model's answer for a batch of inputs, and the shield's score of each input."""

    raw: np.ndarray  # (n, K) the model's own output for the unstamped inputs (probabilities or logits)
    scores: np.ndarray  # (n,) float64 S(x); +inf when the shield has no triggers


def kl_scores(probs: np.ndarray, n: int, triggers: int) -> np.ndarray:
    """S for ``n`` inputs from the probabilities of a shield batch: rows [0, n) are f(x), rows
    [n*(1+j), n*(2+j)) are f(A(x, m_j, p_j)). Returns min over j of KL(f(x) || f(A(x, m_j, p_j)))."""
    if triggers == 0:
        return np.full(n, np.inf)
    p = np.clip(probs[:n].astype(np.float64), PROB_FLOOR, 1.0)
    q = np.clip(probs[n:n * (1 + triggers)].astype(np.float64), PROB_FLOOR, 1.0).reshape(triggers, n, -1)
    log_p = np.log(p)
    kl = np.einsum("nk,jnk->jn", p, log_p[None] - np.log(q))
    return np.maximum(kl.min(axis=0), 0.0)


class Shield:
    """Owns the reversed triggers of the flagged classes, stamps them, and computes S(x).

    Not thread-safe: the stamping buffer is reused, so one caller at a time (the proxy runs every
    batch through one worker thread).
    """

    def __init__(self, triggers: Triggers, spec: InputSpec, threshold: float | None = None) -> None:
        h, w, c = spec.image_shape
        masks = np.asarray(triggers.masks, dtype=np.float32)
        patterns = np.asarray(triggers.patterns, dtype=np.float32)
        if masks.ndim != 3 or patterns.ndim != 4 or masks.shape[1:] != (h, w) or patterns.shape[1:] != (h, w, c) \
                or len(masks) != len(patterns):
            raise GateError(f"triggers of shape masks {masks.shape}, patterns {patterns.shape} do not fit the "
                            f"model input {spec.image_shape}")
        if threshold is not None and not np.isfinite(threshold):
            raise GateError(f"threshold must be a finite number, got {threshold}")
        self.spec = spec
        self.labels = [int(v) for v in triggers.labels]
        self.threshold = None if threshold is None else float(threshold)
        self.masks = np.ascontiguousarray(np.clip(masks, 0.0, 1.0))
        scale, offset = spec.affine()
        # Patterns in the model's input space (see the module docstring); the kernel then encodes with
        # the identity map.
        self.patterns = np.ascontiguousarray(np.clip(patterns, 0.0, 1.0) * scale + offset, dtype=np.float32)
        self._one = np.ones(c, np.float32)
        self._zero = np.zeros(c, np.float32)
        self._buffer = np.empty((0, *spec.model_shape(1)[1:]), np.float32)

    # ------------------------------------------------------------------ properties
    @property
    def triggers(self) -> int:
        return len(self.labels)

    @property
    def active(self) -> bool:
        """False when there is nothing to test (no flagged class): every input passes."""
        return self.triggers > 0

    @property
    def rows_per_input(self) -> int:
        return 1 + self.triggers

    # ------------------------------------------------------------------ the two halves of a model call
    def stamp(self, batch: np.ndarray) -> np.ndarray:
        """The model batch for ``batch`` (n inputs in the model's format): the inputs themselves, then
        each trigger stamped on every input (trigger-major). A view of the shield's buffer, valid until
        the next call."""
        n = len(batch)
        rows = n * self.rows_per_input
        if len(self._buffer) < rows:
            self._buffer = np.empty((max(rows, 2 * len(self._buffer)), *batch.shape[1:]), np.float32)
        out = self._buffer[:rows]
        out[:n] = batch
        if self.active:
            x = batch.transpose(0, 2, 3, 1) if self.spec.channels_first else batch
            x = np.ascontiguousarray(x, dtype=np.float32)
            with stamping_threads(1 if rows <= SERIAL_ROWS else None):  # thread-local: others keep theirs
                stamp_encode(x, self.masks, self.patterns, self._one, self._zero, self.spec.channels_first,
                             out[n:])
        return out

    def score(self, raw: np.ndarray, n: int) -> Scored:
        """Score ``n`` inputs from the model's raw output for :meth:`stamp`'s batch."""
        if raw.ndim != 2 or len(raw) != n * self.rows_per_input:
            raise GateError(f"model answered {raw.shape} for a batch of {n * self.rows_per_input} rows")
        probs = softmax(raw.astype(np.float32)) if self.spec.output_kind == "logits" else raw
        return Scored(raw=np.array(raw[:n]), scores=kl_scores(probs, n, self.triggers))

    def run(self, batch: np.ndarray, forward: Callable[[np.ndarray], np.ndarray]) -> Scored:
        """Stamp, run ``forward`` (model batch -> raw outputs) once, score."""
        return self.score(forward(self.stamp(batch)), len(batch))

    def rejects(self, scores: np.ndarray) -> np.ndarray:
        """True where S(x) < tau (never without a threshold or without triggers)."""
        if self.threshold is None or not self.active:
            return np.zeros(len(scores), bool)
        return np.asarray(scores) < self.threshold

    def describe(self) -> dict:
        return {"triggers": self.triggers, "labels": self.labels, "threshold": self.threshold,
                "mask_l1": [round(float(m.sum()), 3) for m in self.masks]}


def oracle_forward(oracle) -> Callable[[np.ndarray], np.ndarray]:
    """Model batch -> the model's raw output (probabilities or logits, as the model gives them), through
    an in-process :class:`gate.oracle.Oracle`. The proxy answers clients with the raw output, so it
    cannot use ``Oracle.run_encoded`` (always probabilities)."""
    return oracle.run_raw


# ---------------------------------------------------------------------- building a shield from a scan
@dataclass(frozen=True)
class ScanTriggers:
    """What a scan left for the shield: the flagged classes' triggers and where they came from."""

    triggers: Triggers
    report: dict
    triggers_path: Path
    triggers_sha256: str

    @property
    def flagged(self) -> list[int]:
        return [int(v) for v in self.triggers.labels]


def shielded_classes(report: dict) -> list[int]:
    """The classes whose reversed triggers the shield stamps: those the outlier rule flagged, then those a
    small effective trigger convicted (rule BG003: a reject that names a class the outlier rule may not
    have flagged, e.g. on a synthetic-data scan whose L1 spread is wide). A model rejected because of a
    class is never served without that class's trigger."""
    classes = [int(v) for v in report["flagged"]]
    decision = report.get("decision")
    findings = decision.get("findings") if isinstance(decision, dict) else None
    for f in findings or []:
        if isinstance(f, dict) and f.get("rule") == RULE_SMALL_TRIGGER and f.get("class") is not None:
            if int(f["class"]) not in classes:
                classes.append(int(f["class"]))
    return classes


def unverified(report: dict) -> str | None:
    """Why a report cannot vouch for a model's triggers (None: it can): the shield is only as good as the
    scan behind it, so an incomplete scan, a review or error decision, or a report without the model's hash
    is refused (a report with no flags would otherwise turn the shield off)."""
    if not (report.get("model") or {}).get("sha256"):
        return "it names no model sha256"
    if report.get("complete") is not True:
        return "its scan is incomplete"
    decision = report.get("decision")
    outcome = decision.get("outcome") if isinstance(decision, dict) else report.get("verdict", decision)
    if outcome not in ("accept", "reject"):
        return f"its decision is {outcome!r}, not accept or reject" if outcome else "it holds no decision"
    return None


def load_scan_triggers(report_path: str | os.PathLike, triggers_path: str | os.PathLike | None = None,
                       model_sha256: str | None = None, allow_unverified: bool = False,
                       warn=None) -> ScanTriggers:
    """Read report.json and the triggers of its :func:`shielded_classes` (triggers.npz beside the report
    unless given). ``model_sha256``: refuse a report written for another model file. A report :func:`unverified`
    refuses is an error unless ``allow_unverified`` (then ``warn`` is told why)."""
    report_path = Path(report_path)
    report = read_report(report_path)
    if not isinstance(report, dict) or "flagged" not in report:
        raise GateError(f"{report_path} is not a gate scan report (no 'flagged' list)")
    why = unverified(report)
    if why and not allow_unverified:
        raise GateError(f"{report_path} cannot vouch for this model: {why} (--allow-unverified-report to use it "
                        f"anyway)")
    if why and warn is not None:
        warn(f"WARNING: using an unverified report ({report_path}: {why}); the shield may be off or incomplete")
    reported = (report.get("model") or {}).get("sha256")
    if model_sha256 is not None and reported and reported != model_sha256:
        raise GateError(f"{report_path} was written for another model (sha256 {reported[:12]}..., this model "
                        f"is {model_sha256[:12]}...): its triggers do not apply")
    path = Path(triggers_path) if triggers_path is not None else report_path.parent / "triggers.npz"
    flagged = shielded_classes(report)
    all_triggers = Triggers.load(path)
    missing = [lab for lab in flagged if lab not in set(int(v) for v in all_triggers.labels)]
    if missing:
        raise GateError(f"{path} has no trigger for flagged classes {missing}")
    return ScanTriggers(all_triggers.select(flagged), report, path, file_sha256(path))
