"""Prometheus metrics of a gate run, as a batch job exposes them.

Every metric is defined in :func:`build_registry`, on a dedicated ``CollectorRegistry``, named
``backdoor_gate_*`` with its unit, and labelled by ``model``: ``--model-name`` when given (a stable name for
a deployment slot, e.g. ``vendor-a/resnet``), else ``sha256-`` and the first 12 hex digits of the model
file's sha256 (:func:`model_label`), so two vendors' ``model.onnx`` never share a series. Per-class metrics
add a ``class`` label, bounded by the model's number of classes. A run always writes ``OUT/metrics.prom``
(node_exporter textfile format) and, when a Pushgateway URL is set, pushes the same registry with job
``backdoor_gate`` and grouping key ``model``.

Everything is a gauge about the last run: ``backdoor_gate_last_run_queries`` (not a ``_total``: it is one
run's count, not a counter that only grows), ``backdoor_gate_last_run_timestamp_seconds`` (when the last
run ended, whatever its outcome: staleness) and ``backdoor_gate_last_success_timestamp_seconds`` (the last
one that reached accept, reject or review). ``backdoor_gate_model_info`` carries identity: file name, full
sha256, policy name and policy sha256 (the attestation's, :func:`gate.report.attestation.policy_sha256`),
tool version.

``backdoor_gate_decision{outcome}`` is 1 for the last run's outcome (accept, reject, review, error) and 0
for the others. While a run is in progress (:func:`mark_running`, written before the first query) the
textfile says ``outcome="running"``, never an earlier accept, and carries the earlier run's timestamps.
A failed run reports ``outcome="error"`` and leaves the last success time alone: the textfile carries
over the previous value, and the push is a ``pushadd`` of the run-level metrics only, so the Pushgateway
keeps the last successful run's other metrics.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Info,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.parser import text_string_to_metric_families

from gate import __version__
from gate.decision import OUTCOMES, Decision, exit_code_help
from gate.errors import UsageError
from gate.result import ScanResult

PREFIX = "backdoor_gate"
JOB = "backdoor_gate"
MAX_LABEL = 64
SHA_PREFIX = 12  # hex digits of the sha256 in the default model label
RUNNING = "running"
DECISION_OUTCOMES = (*OUTCOMES, RUNNING)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,63}")
LAST_RUN = f"{PREFIX}_last_run_timestamp_seconds"
LAST_SUCCESS = f"{PREFIX}_last_success_timestamp_seconds"


def check_model_name(name: str) -> str:
    """``--model-name``, checked: 1-64 letters, digits and ``_.:/@+-``, starting with a letter or digit.

    >>> check_model_name("vendor-a/resnet50")
    'vendor-a/resnet50'
    """
    if not _NAME.fullmatch(name):
        raise UsageError(f"--model-name {name!r}: use 1-{MAX_LABEL} letters, digits and _.:/@+- "
                         "(starting with a letter or digit)")
    return name


def model_label(sha256: str | None, path: str | Path, name: str | None = None) -> str:
    """The ``model`` label: ``name`` (``--model-name``), else ``sha256-<12 hex digits>``; a model file that
    could not be read (no sha256) gets ``file-<its stem>``, limited to a safe, bounded string.

    >>> model_label("0123456789abcdef" * 4, "vendor/model.onnx")
    'sha256-0123456789ab'
    >>> model_label(None, "vendor/model.onnx"), model_label("ab" * 32, "m.onnx", "vendor-a")
    ('file-model', 'vendor-a')
    """
    if name is not None:
        return check_model_name(name)
    if sha256:
        return f"sha256-{sha256[:SHA_PREFIX]}"
    stem = re.sub(r"[^A-Za-z0-9_.:-]", "_", Path(str(path)).stem or "model")
    return f"file-{stem}"[:MAX_LABEL]


def _info(path: str | Path, sha256: str | None, policy: dict | None) -> dict[str, str]:
    from gate.report.attestation import policy_sha256

    return {"file": Path(str(path)).name[:MAX_LABEL * 2], "sha256": sha256 or "",
            "policy": str((policy or {}).get("name") or "")[:MAX_LABEL],
            "policy_sha256": policy_sha256(policy) or "", "version": __version__}


def build_registry(result: ScanResult | None, decision: Decision | None, model: str, *, now: float | None = None,
                   last_run: float | None = None, last_success: float | None = None,
                   info: dict[str, str] | None = None) -> CollectorRegistry:
    """All metrics of one run. ``decision`` None: a run in progress (decision ``running``, the earlier run's
    timestamps ``last_run`` and ``last_success``). ``result`` None: a failed run (run-level metrics only;
    ``last_success`` carries the previous success time)."""
    now = time.time() if now is None else now
    reg = CollectorRegistry(auto_describe=True)
    labels = {"model": model}

    if info is not None:
        Info(f"{PREFIX}_model", "Identity of the last run's model file and policy (1 per model label).",
             ["model"], registry=reg).labels(**labels).info(info)
    outcome = RUNNING if decision is None else decision.outcome
    decision_g = Gauge(f"{PREFIX}_decision", "Outcome of the last gate run: 1 for the current outcome, 0 for the "
                       "others (running: a run is in progress).", ["model", "outcome"], registry=reg)
    for o in DECISION_OUTCOMES:
        decision_g.labels(model=model, outcome=o).set(1 if o == outcome else 0)
    finished = last_run if decision is None else now
    if finished is not None:
        Gauge(LAST_RUN, "Unix time the last gate run ended (any outcome).", ["model"], registry=reg) \
            .labels(**labels).set(finished)
    success = now if decision is not None and decision.outcome != "error" else last_success
    if success is not None:
        Gauge(LAST_SUCCESS, "Unix time of the last gate run that reached a decision (accept, reject or review).",
              ["model"], registry=reg).labels(**labels).set(success)
    if decision is None:
        return reg
    Gauge(f"{PREFIX}_exit_code", f"Exit code of the last gate run ({exit_code_help()}).",
          ["model"], registry=reg).labels(**labels).set(decision.exit_code)
    if decision.backdoor_score is not None:
        Gauge(f"{PREFIX}_backdoor_score", "1 minus the model's p-value under the calibrated outlier rule (near 1: "
              "a class clean models do not show).", ["model"], registry=reg).labels(**labels) \
            .set(decision.backdoor_score)
    if decision.clean_reference is not None and decision.clean_reference.p_value is not None:
        Gauge(f"{PREFIX}_clean_reference_p_value", "Empirical p-value of the model's p-value among the clean reference "
              "models: (k + 1) / (n + 1), k of n at or below it (absent where the scan is unlike the reference's).",
              ["model"], registry=reg).labels(**labels).set(decision.clean_reference.p_value)
    if result is None:
        return reg

    Gauge(f"{PREFIX}_classes", "Classes of the scanned model.", ["model"], registry=reg) \
        .labels(**labels).set(len(result.classes))
    Gauge(f"{PREFIX}_flagged_classes", "Classes whose reversed trigger is an outlier.", ["model"],
          registry=reg).labels(**labels).set(len(result.flagged))
    Gauge(f"{PREFIX}_scan_complete", "1 when the scan finished within its budgets, else 0.", ["model"],
          registry=reg).labels(**labels).set(1 if result.complete else 0)
    Gauge(f"{PREFIX}_last_run_queries", "Images the last run sent to the model (scan, synthesis and convention check).",
          ["model"], registry=reg).labels(**labels).set(int(result.queries.get("total", 0)))
    Gauge(f"{PREFIX}_scan_duration_seconds", "Wall time of the last scan (synthesis included).", ["model"],
          registry=reg).labels(**labels).set(float(result.seconds.get("total", 0.0)))
    anomaly = Gauge(f"{PREFIX}_class_anomaly_index", "Outlier index of each class's reversed-trigger L1 norm "
                    "(calibrated rule: z of log L1 against the other classes; mad rule: MAD index; positive = "
                    "smaller).", ["model", "class"], registry=reg)
    l1 = Gauge(f"{PREFIX}_class_l1", "L1 norm of each class's reversed-trigger mask.", ["model", "class"],
               registry=reg)
    flagged = Gauge(f"{PREFIX}_class_flagged", "1 when the class is flagged, else 0.", ["model", "class"],
                    registry=reg)
    for c in result.classes:
        anomaly.labels(model=model, **{"class": str(c.label)}).set(c.anomaly_index)
        l1.labels(model=model, **{"class": str(c.label)}).set(c.l1)
        flagged.labels(model=model, **{"class": str(c.label)}).set(1 if c.flagged else 0)
    return reg


def previous_value(path: str | Path, name: str, model: str) -> float | None:
    """The sample ``name`` for ``model`` in an existing textfile, if any."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels.get("model") == model:
                    return float(s.value)
    except ValueError:
        return None
    return None


def previous_success(path: str | Path, model: str) -> float | None:
    """``last_success_timestamp_seconds`` for ``model`` in an existing textfile, if any."""
    return previous_value(path, LAST_SUCCESS, model)


def write_textfile(path: str | Path, registry: CollectorRegistry) -> None:
    """Atomic write (temp file + rename) as node_exporter's textfile collector expects."""
    write_to_textfile(str(path), registry)


def push(url: str, registry: CollectorRegistry, model: str, *, replace: bool = True,
         timeout: float = 10.0) -> None:
    """Push to a Pushgateway; ``replace`` False keeps metrics of the group that this push lacks."""
    fn = push_to_gateway if replace else pushadd_to_gateway
    fn(url, job=JOB, registry=registry, grouping_key={"model": model}, timeout=timeout)


def _sha256(result: ScanResult | None, model_path: str | Path) -> str | None:
    if result is not None and result.model.get("sha256"):
        return result.model["sha256"]
    from gate.oracle import file_sha256

    try:
        return file_sha256(model_path) if Path(model_path).is_file() else None
    except OSError:
        return None


def export(out_dir: str | Path, result: ScanResult | None, decision: Decision, model_path: str,
           pushgateway: str | None = None, now: float | None = None, *, model_name: str | None = None,
           policy: dict | None = None) -> str | None:
    """Write ``metrics.prom`` into ``out_dir`` and push when asked. Returns a warning, or None."""
    sha = _sha256(result, model_path)
    model = model_label(sha, model_path, model_name)
    path = Path(out_dir) / "metrics.prom"
    registry = build_registry(result, decision, model, now=now, info=_info(model_path, sha, policy),
                              last_success=previous_success(path, model) if result is None else None)
    write_textfile(path, registry)
    if not pushgateway:
        return None
    try:
        push(pushgateway, registry, model, replace=result is not None)
    except Exception as exc:  # an unreachable gateway must not change the decision
        return f"could not push metrics to {pushgateway}: {exc}"
    return None


def mark_running(out_dir: str | Path, model_path: str, *, model_name: str | None = None,
                 policy: dict | None = None) -> None:
    """Before the first query: ``metrics.prom`` says ``running`` (no outcome at 1 but that), with the earlier
    run's timestamps for this model carried over. Textfile only: the Pushgateway keeps the last finished run."""
    sha = _sha256(None, model_path)
    model = model_label(sha, model_path, model_name)
    path = Path(out_dir) / "metrics.prom"
    write_textfile(path, build_registry(None, None, model, info=_info(model_path, sha, policy),
                                        last_run=previous_value(path, LAST_RUN, model),
                                        last_success=previous_success(path, model)))
