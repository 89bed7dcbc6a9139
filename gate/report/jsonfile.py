"""``report.json``: the scan result, the decision and the effective policy in one JSON document.

It is ``ScanResult.to_dict()`` with two more top-level blocks, ``decision`` ({outcome, reasons,
exit_code, findings}) and ``policy`` (the effective policy after command-line overrides). A run that
failed before it had a result writes the same document with ``error`` and whatever it knew about the
model instead of the scan fields.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gate import __version__
from gate.decision import Decision
from gate.errors import GateError
from gate.result import SCHEMA_VERSION, ScanResult, atomic_write, read_report

EXTRA_KEYS = ("decision", "policy", "error", "class_names")


def report_dict(result: ScanResult | None, decision: Decision, policy: dict | None, *,
                model: dict | None = None, error: str | None = None, provenance: dict | None = None,
                class_names: list[str] | None = None) -> dict:
    """``provenance`` ({policy_file, overrides}) is recorded in the decision block; ``class_names``
    (``--labels``, one per class in class order) is a top-level list, absent when none were given."""
    if result is not None:
        d = result.to_dict()
    else:
        d = {"schema_version": SCHEMA_VERSION, "tool": {"name": "backdoor-gate", "version": __version__},
             "model": model or {}, "error": error}
    if class_names is not None:
        d["class_names"] = list(class_names)
    d["decision"] = {**decision.to_dict(), **(provenance or {})}
    d["policy"] = policy
    return d


def strict_json(obj):
    """Plain JSON types only: numpy scalars become Python ones, NaN and infinities become null."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_report_json(path: str | Path, doc: dict) -> None:
    # strict: the file must be plain JSON (other tools choke on NaN/Infinity)
    atomic_write(path, json.dumps(strict_json(doc), indent=2, allow_nan=False) + "\n")


def load_report(path: str | Path) -> tuple[ScanResult | None, dict | None, dict | None]:
    """(result, decision block, policy block) of a report.json; result is None for an error report."""
    doc = read_report(path)
    if not isinstance(doc, dict):
        raise GateError(f"{path}: not a gate report")
    decision, policy = doc.get("decision"), doc.get("policy")
    if doc.get("error") is not None or "classes" not in doc:
        return None, decision, policy
    core = {k: v for k, v in doc.items() if k not in EXTRA_KEYS}
    try:
        return ScanResult.from_dict(core), decision, policy
    except TypeError as exc:
        raise GateError(f"{path}: not a gate report: {exc}") from None
