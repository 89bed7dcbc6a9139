"""``report.sarif``: the decision's findings as SARIF 2.1.0, for code-scanning dashboards.

One run; the tool driver is ``backdoor-gate`` with one rule per kind of finding (BG001 flagged class,
BG002 incomplete scan, BG003 small effective trigger, BG004 scan error, BG005 inconclusive search).
Each finding is one result located at the model file; its numbers are in the result's ``properties``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from gate import __version__
from gate.decision import RULES, Decision, Finding

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
_LEVEL = {"reject": "error", "error": "error", "review": "warning"}


def artifact_uri(path: str) -> tuple[str, str | None]:
    """(uri, uriBaseId): relative paths stay relative to the source root; absolute ones become file URIs."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri(), None
    return str(PurePosixPath(*p.parts)) if p.parts else ".", "%SRCROOT%"


def _location(uri: str, base: str | None) -> dict:
    loc = {"uri": uri, "index": 0}
    if base:
        loc["uriBaseId"] = base
    return {"physicalLocation": {"artifactLocation": loc}}


def _result(f: Finding, uri: str, base: str | None, model_stem: str) -> dict:
    props = {k: v for k, v in f.properties.items() if v is not None}
    if f.label is not None:
        props["class"] = f.label
    props["outcome"] = f.outcome
    rule_index = list(RULES).index(f.rule)
    fingerprint = f"{model_stem}/{f.rule}/{'model' if f.label is None else f'class-{f.label}'}"
    return {
        "ruleId": f.rule,
        "ruleIndex": rule_index,
        "level": _LEVEL[f.outcome],
        "message": {"text": f.message},
        "locations": [_location(uri, base)],
        "partialFingerprints": {"backdoorGateFinding/v1": fingerprint},
        "properties": props,
    }


def sarif_log(decision: Decision, model: dict, *, result_summary: dict | None = None) -> dict:
    """The SARIF log for ``decision`` about the model described by ``model`` (path, sha256)."""
    path = str(model.get("path") or "model.onnx")
    uri, base = artifact_uri(path)
    artifact = {"location": {"uri": uri, **({"uriBaseId": base} if base else {})}, "roles": ["analysisTarget"]}
    if model.get("sha256"):
        artifact["hashes"] = {"sha-256": model["sha256"]}
    rules = [{
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": text},
        "fullDescription": {"text": text},
        "defaultConfiguration": {"level": "warning" if rule_id in ("BG002", "BG005") else "error"},
        "help": {"text": f"{text} See report.html for the reversed triggers."},
    } for rule_id, (name, text) in RULES.items()]
    stem = Path(path).stem
    run = {
        "tool": {"driver": {"name": "backdoor-gate", "version": __version__, "semanticVersion": __version__,
                            "rules": rules}},
        "invocations": [{
            "executionSuccessful": decision.outcome != "error",
            "exitCode": decision.exit_code,
            **({"toolExecutionNotifications": [{"level": "error", "message": {"text": decision.reasons[0]}}]}
               if decision.outcome == "error" and decision.reasons else {}),
        }],
        "artifacts": [artifact],
        "results": [_result(f, uri, base, stem) for f in decision.findings if f.rule in RULES],
        "properties": {"decision": decision.outcome, "exitCode": decision.exit_code,
                       **({"scan": result_summary} if result_summary else {})},
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
