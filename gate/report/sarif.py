"""``report.sarif``: the decision's findings as SARIF 2.1.0, for code-scanning dashboards.

One run; the tool driver is ``backdoor-gate`` with one rule per kind of finding (BG001 flagged class,
BG002 incomplete scan, BG003 small effective trigger, BG004 scan error, BG005 inconclusive search).
Each finding is one result located at the model file; its numbers are in the result's ``properties``.

For GitHub code scanning: each rule carries ``properties.security-severity`` (a CVSS-like score GitHub
reads from rules only: 9.0 critical for findings that reject, 7.0 high for a failed scan, which leaves
the model unverified, 5.0 medium for findings that ask for a review; a rule takes the gravest outcome its
findings have in this run, else its usual one) and ``tags`` (``security`` makes GitHub list it as a
security alert), and ``help`` as text and markdown. The run's ``automationDetails.id``
``backdoor-gate/<model file name>/<sha256 prefix>/`` is the upload's category, so the uploads for two
models on one commit do not replace each other's alerts.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from gate import __version__
from gate.decision import RULES, Decision, Finding

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
_LEVEL = {"reject": "error", "error": "error", "review": "warning"}
SECURITY_SEVERITY = {"reject": "9.0", "error": "7.0", "review": "5.0"}
_USUAL_OUTCOME = {"BG001": "reject", "BG002": "review", "BG003": "reject", "BG004": "error", "BG005": "review",
                  "BG006": "review"}
_TAGS = {"BG001": ["backdoor", "trojan"], "BG002": ["incomplete-scan"], "BG003": ["backdoor", "trigger"],
         "BG004": ["scan-error"], "BG005": ["inconclusive-scan"], "BG006": ["data-mismatch"]}
_GRAVITY = {"review": 0, "error": 1, "reject": 2}
_ADVICE = {
    "BG001": "Do not deploy the model: a small reversed trigger is strong evidence of a backdoor aimed at this "
             "class. Open report.html to see the trigger and the held-out images it flips; ask the vendor "
             "for the training data's provenance.",
    "BG002": "A person must decide: raise the policy's budget (budget.max_queries, budget.max_seconds) and run "
             "the gate again, or review report.html's partial results.",
    "BG003": "Do not deploy the model: the reversed trigger is tiny and sends most held-out images to one class, "
             "which is direct evidence of a backdoor. report.html shows the trigger.",
    "BG004": "The gate failed closed: nothing was verified. Fix the cause named in the message (model file, data, "
             "policy) and run the gate again.",
    "BG005": "A person must decide: the trigger searches did not work well enough to clear the model; give the "
             "search more steps (search.max_steps) and run the gate again.",
    "BG006": "A person must decide: the model gets too little of the clean data right for the scan to mean "
             "anything. Check that the data is this model's and the input convention (`gate inspect MODEL --data "
             "DATA`), then run the gate again.",
}
SHA_PREFIX = 12  # hex digits of the model's sha256 in the automation id


def automation_id(model: dict) -> str:
    """``backdoor-gate/<model file name>/<sha256 prefix>/`` (``unknown`` for a model that could not be read).

    >>> automation_id({"path": "vendor/m.onnx", "sha256": "0123456789abcdef" * 4})
    'backdoor-gate/m.onnx/0123456789ab/'
    """
    name = Path(str(model.get("path") or "model.onnx")).name or "model.onnx"
    sha = str(model.get("sha256") or "unknown")[:SHA_PREFIX]
    return f"backdoor-gate/{name}/{sha}/"


def _rule(rule_id: str, name: str, text: str, outcomes: list[str]) -> dict:
    usual = _USUAL_OUTCOME.get(rule_id, "review")  # a rule without an entry here asks for a review
    outcome = max(outcomes, key=_GRAVITY.__getitem__) if outcomes else usual
    advice = _ADVICE.get(rule_id, "A person must decide: open report.html.")
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": text},
        "fullDescription": {"text": text},
        "defaultConfiguration": {"level": _LEVEL[usual]},
        "help": {"text": f"{text} {advice}",
                 "markdown": f"**{name}** ({rule_id}): {text}\n\n{advice}\n\nThe gate's `report.html` shows the "
                             f"reversed triggers; `report.json` holds every number."},
        "properties": {"security-severity": SECURITY_SEVERITY[outcome],
                       "tags": ["security", "machine-learning", "model-supply-chain", *_TAGS.get(rule_id, [])]},
    }


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


def _result(f: Finding, uri: str, base: str | None, model_stem: str, class_names: list[str] | None) -> dict:
    props = {k: v for k, v in f.properties.items() if v is not None}
    if f.label is not None:
        props["class"] = f.label
        if class_names is not None and 0 <= f.label < len(class_names):
            props["class_name"] = class_names[f.label]
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


def sarif_log(decision: Decision, model: dict, *, result_summary: dict | None = None,
              class_names: list[str] | None = None) -> dict:
    """The SARIF log for ``decision`` about the model described by ``model`` (path, sha256); a finding about
    a class carries its name (``--labels``) in ``properties.class_name``."""
    path = str(model.get("path") or "model.onnx")
    uri, base = artifact_uri(path)
    artifact = {"location": {"uri": uri, **({"uriBaseId": base} if base else {})}, "roles": ["analysisTarget"]}
    if model.get("sha256"):
        artifact["hashes"] = {"sha-256": model["sha256"]}
    rules = [_rule(rule_id, name, text, [f.outcome for f in decision.findings if f.rule == rule_id])
             for rule_id, (name, text) in RULES.items()]
    stem = Path(path).stem
    run = {
        "automationDetails": {"id": automation_id(model)},
        "tool": {"driver": {"name": "backdoor-gate", "version": __version__, "semanticVersion": __version__,
                            "rules": rules}},
        "invocations": [{
            "executionSuccessful": decision.outcome != "error",
            "exitCode": decision.exit_code,
            **({"toolExecutionNotifications": [{"level": "error", "message": {"text": decision.reasons[0]}}]}
               if decision.outcome == "error" and decision.reasons else {}),
        }],
        "artifacts": [artifact],
        "results": [_result(f, uri, base, stem, class_names) for f in decision.findings if f.rule in RULES],
        "properties": {"decision": decision.outcome, "exitCode": decision.exit_code,
                       **({"scan": result_summary} if result_summary else {})},
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
