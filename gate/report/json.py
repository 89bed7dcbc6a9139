"""``report.json``: the scan result, the decision and the effective policy in one JSON document.

It is ``ScanResult.to_dict()`` with two more top-level blocks, ``decision`` ({outcome, reasons,
exit_code, findings}) and ``policy`` (the effective policy after command-line overrides). A run that
failed before it had a result writes the same document with ``error`` and whatever it knew about the
model instead of the scan fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from gate import __version__
from gate.decision import Decision
from gate.errors import GateError
from gate.result import SCHEMA_VERSION, ScanResult, read_report

EXTRA_KEYS = ("decision", "policy", "error")


def report_dict(result: ScanResult | None, decision: Decision, policy: dict | None, *,
                model: dict | None = None, error: str | None = None) -> dict:
    if result is not None:
        d = result.to_dict()
    else:
        d = {"schema_version": SCHEMA_VERSION, "tool": {"name": "backdoor-gate", "version": __version__},
             "model": model or {}, "error": error}
    d["decision"] = decision.to_dict()
    d["policy"] = policy
    return d


def write_report_json(path: str | Path, doc: dict) -> None:
    # allow_nan=False: the file must be strict JSON (other tools choke on NaN/Infinity)
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


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
