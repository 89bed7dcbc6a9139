"""Prometheus metrics of a gate run, as a batch job exposes them.

Every metric is defined in :func:`build_registry`, on a dedicated ``CollectorRegistry``, named
``backdoor_gate_*`` with its unit, and labelled by ``model`` (the model file's stem). Per-class metrics
add a ``class`` label, bounded by the model's number of classes. A run always writes
``OUT/metrics.prom`` (node_exporter textfile format) and, when a Pushgateway URL is set, pushes the
same registry with job ``backdoor_gate`` and grouping key ``model``.

A failed run reports ``backdoor_gate_decision{outcome="error"} 1`` and leaves the last success time
alone: the textfile carries over the previous value, and the push is a ``pushadd`` of the run-level
metrics only, so the Pushgateway keeps the last successful run's other metrics.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.parser import text_string_to_metric_families

from gate.decision import OUTCOMES, Decision, exit_code_help
from gate.result import ScanResult

PREFIX = "backdoor_gate"
JOB = "backdoor_gate"
MAX_LABEL = 64


def model_label(path: str | Path) -> str:
    """The ``model`` label: the file's stem, limited to a safe, bounded string."""
    stem = Path(str(path)).stem or "model"
    stem = re.sub(r"[^A-Za-z0-9_.:-]", "_", stem)
    return stem[:MAX_LABEL]


def build_registry(result: ScanResult | None, decision: Decision, model: str, *, now: float | None = None,
                   last_success: float | None = None) -> CollectorRegistry:
    """All metrics of one run. ``result`` is None for a failed run (only run-level metrics then);
    ``last_success`` carries the previous success time into a failed run's textfile."""
    now = time.time() if now is None else now
    reg = CollectorRegistry(auto_describe=True)
    labels = {"model": model}

    Gauge(f"{PREFIX}_last_run_timestamp_seconds", "Unix time the last gate run finished.",
          ["model"], registry=reg).labels(**labels).set(now)
    decision_g = Gauge(f"{PREFIX}_decision", "Outcome of the last gate run: 1 for the current outcome, 0 for the "
                       "others.", ["model", "outcome"], registry=reg)
    for outcome in OUTCOMES:
        decision_g.labels(model=model, outcome=outcome).set(1 if decision.outcome == outcome else 0)
    Gauge(f"{PREFIX}_exit_code", f"Exit code of the last gate run ({exit_code_help()}).",
          ["model"], registry=reg).labels(**labels).set(decision.exit_code)

    success = now if decision.outcome != "error" else last_success
    if success is not None:
        Gauge(f"{PREFIX}_last_success_timestamp_seconds",
              "Unix time of the last gate run that reached a decision (accept, reject or review).",
              ["model"], registry=reg).labels(**labels).set(success)
    if decision.backdoor_score is not None:
        Gauge(f"{PREFIX}_backdoor_score", "1 minus the model's p-value under the calibrated outlier rule (near 1: "
              "a class clean models do not show).", ["model"], registry=reg).labels(**labels) \
            .set(decision.backdoor_score)
    if result is None:
        return reg

    Gauge(f"{PREFIX}_classes", "Classes of the scanned model.", ["model"], registry=reg) \
        .labels(**labels).set(len(result.classes))
    Gauge(f"{PREFIX}_flagged_classes", "Classes whose reversed trigger is an outlier.", ["model"],
          registry=reg).labels(**labels).set(len(result.flagged))
    Gauge(f"{PREFIX}_scan_complete", "1 when the scan finished within its budgets, else 0.", ["model"],
          registry=reg).labels(**labels).set(1 if result.complete else 0)
    queries = Counter(f"{PREFIX}_queries", "Images sent to the model by the last run (scan and synthesis).",
                      ["model"], registry=reg)
    queries.labels(**labels).inc(int(result.queries.get("total", 0)))
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


def previous_success(path: str | Path, model: str) -> float | None:
    """``last_success_timestamp_seconds`` for ``model`` in an existing textfile, if any."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    name = f"{PREFIX}_last_success_timestamp_seconds"
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels.get("model") == model:
                    return float(s.value)
    except ValueError:
        return None
    return None


def write_textfile(path: str | Path, registry: CollectorRegistry) -> None:
    """Atomic write (temp file + rename) as node_exporter's textfile collector expects."""
    write_to_textfile(str(path), registry)


def push(url: str, registry: CollectorRegistry, model: str, *, replace: bool = True,
         timeout: float = 10.0) -> None:
    """Push to a Pushgateway; ``replace`` False keeps metrics of the group that this push lacks."""
    fn = push_to_gateway if replace else pushadd_to_gateway
    fn(url, job=JOB, registry=registry, grouping_key={"model": model}, timeout=timeout)


def export(out_dir: str | Path, result: ScanResult | None, decision: Decision, model_path: str,
           pushgateway: str | None = None, now: float | None = None) -> str | None:
    """Write ``metrics.prom`` into ``out_dir`` and push when asked. Returns a warning, or None."""
    model = model_label(model_path)
    path = Path(out_dir) / "metrics.prom"
    registry = build_registry(result, decision, model, now=now,
                              last_success=previous_success(path, model) if result is None else None)
    write_textfile(path, registry)
    if not pushgateway:
        return None
    try:
        push(pushgateway, registry, model, replace=result is not None)
    except Exception as exc:  # an unreachable gateway must not change the decision
        return f"could not push metrics to {pushgateway}: {exc}"
    return None
