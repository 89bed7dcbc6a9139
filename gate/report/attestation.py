"""``attestation.json``: the run's decision about one model file as an in-toto Statement v1.

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<model file name>", "digest": {"sha256": "<hex>"}}],
     "predicateType": "https://backdoor-gate.dev/attestation/v1",
     "predicate": {"decision": {outcome, exit_code, reasons, [model_p_value, backdoor_score, clean_reference]},
                   "model": {path, sha256, ...}, "classes": [{label, l1, flagged, p_value}, ...],
                   "scan": {method, complete, stop_reason, queries, seed},
                   "policy": {sha256, file, overrides, effective}, "data": {source, [sha256]},
                   "tool": {name, version, git_commit}, "runtime": {python, numpy, onnxruntime, providers},
                   "run": {started, finished, command}, ["error": message]}}

A run that failed writes the same statement with outcome ``error``, no classes and the error message (the
subject's digest is empty when the model file could not be read). A model scanned behind an inference
endpoint (``--remote``; there is no file) is the subject ``{"name": "<model name>", "uri": "<model URL>",
"digest": {"sha256": "<endpoint_sha256>"}}``: the digest is of the canonical JSON of the URL and the
server's and model's metadata (:mod:`gate.remote_oracle`), what the server declared, not its weights.
``policy.sha256`` is the sha256 of :func:`canonical_json` of the effective policy (the ``policy`` block of
report.json). The file's bytes are exactly the payload that ``--sign-key`` signs into ``attestation.dsse.json``
(a DSSE envelope, payload type ``application/vnd.in-toto+json``, :mod:`gate.dsse`), so ``gate verify`` can
compare the two.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from gate import __version__
from gate.decision import Decision
from gate.report.jsonfile import strict_json
from gate.result import ScanResult, atomic_write

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://backdoor-gate.dev/attestation/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
ATTESTATION = "attestation.json"
ENVELOPE = "attestation.dsse.json"


def canonical_json(obj) -> bytes:
    """The bytes a digest is taken of: plain JSON types (:func:`strict_json`), sorted keys, no whitespace, UTF-8.

    >>> canonical_json({"b": [1, 2.5], "a": None})
    b'{"a":null,"b":[1,2.5]}'
    """
    return json.dumps(strict_json(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def policy_sha256(policy: dict | None) -> str | None:
    return None if policy is None else hashlib.sha256(canonical_json(policy)).hexdigest()


def utc_iso(t: datetime) -> str:
    """``2025-01-31T12:00:00Z``: UTC, seconds, the form in-toto and SLSA use."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git_commit() -> str | None:
    """The commit of the checkout the gate runs from, when it is one (an editable install); else None."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None  # not a checkout, or the gate is a package inside someone else's repository
    return lines[1]


def tool_facts() -> dict:
    return {"name": "backdoor-gate", "version": __version__, "git_commit": _git_commit()}


def runtime_facts(providers: list[str] | None = None) -> dict:
    import numpy

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": ort_version,
            "providers": providers}


def _file_sha256(path: str | None) -> str | None:
    from gate.oracle import file_sha256

    try:
        return file_sha256(path) if path and Path(path).is_file() else None
    except OSError:
        return None


def _data_facts(result: ScanResult | None, policy: dict | None) -> dict:
    """Where the clean data came from, and the data file's sha256 when it was one file."""
    if result is not None:
        source = result.data.get("source")
        path = source if result.method == "b3d" else None
        facts = {"source": source, "method": result.method, "images": result.data.get("images")}
    else:  # a failed run: what the policy asked for
        data = (policy or {}).get("data") or {}
        path = data.get("path") if data.get("source") in ("file", "auto") else None
        facts = {"source": data.get("source"), "path": path}
    facts["sha256"] = _file_sha256(path)
    return facts


def _classes(result: ScanResult) -> list[dict]:
    rows = []
    for c in sorted(result.classes, key=lambda c: c.label):
        row = {"label": c.label, "l1": c.l1, "flagged": c.flagged, "p_value": c.p_value}
        if c.blend_amplitude is not None:
            row.update(blend_amplitude=c.blend_amplitude, blend_p_value=c.blend_p_value)
        rows.append(row)
    return rows


def statement(decision: Decision, model: dict, policy: dict | None, *, result: ScanResult | None = None,
              provenance: dict | None = None, started: datetime, finished: datetime,
              command: list[str] | None = None, error: str | None = None) -> dict:
    """The in-toto Statement of one run (see the module docstring). ``model``: path and sha256 (the scan
    result's model block when there is one)."""
    model = dict(result.model if result is not None else model)
    sha = model.get("sha256")
    path = str(model.get("path") or "model.onnx")
    subject = {"name": Path(path).name, "digest": {"sha256": sha} if sha else {}}
    if model.get("endpoint"):  # a remote model: named by its URL, digest of what its server declared
        digest = model.get("endpoint_sha256")
        subject = {"name": str(model.get("model_name") or path), "uri": path,
                   "digest": {"sha256": digest} if digest else {}}
    verdict = {"outcome": decision.outcome, "exit_code": decision.exit_code, "reasons": list(decision.reasons)}
    if decision.model_p_value is not None:
        verdict.update(model_p_value=decision.model_p_value, backdoor_score=decision.backdoor_score)
    if decision.clean_reference is not None:
        verdict["clean_reference"] = decision.clean_reference.to_dict()
    provenance = provenance or {}
    predicate = {
        "decision": verdict,
        "model": model,
        "classes": _classes(result) if result is not None else [],
        "scan": None if result is None else {
            "method": result.method, "complete": result.complete, "stop_reason": result.stop_reason,
            "queries": result.queries.get("total"), "seed": result.seed},
        "policy": {"sha256": policy_sha256(policy), "file": provenance.get("policy_file"),
                   "overrides": provenance.get("overrides", {}), "effective": policy},
        "data": _data_facts(result, policy),
        "tool": tool_facts(),
        "runtime": runtime_facts(result.providers if result is not None else None),
        "run": {"started": utc_iso(started), "finished": utc_iso(finished), "command": list(command or [])},
    }
    if error is not None:
        predicate["error"] = error
    return {
        "_type": STATEMENT_TYPE,
        "subject": [subject],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def statement_bytes(doc: dict) -> bytes:
    """The serialised statement: attestation.json's bytes and the signed payload."""
    return (json.dumps(strict_json(doc), indent=2, allow_nan=False) + "\n").encode("utf-8")


def write_attestation(out: str | Path, doc: dict, key=None) -> dict[str, Path]:
    """attestation.json, and with ``key`` (an ed25519 private key) attestation.dsse.json, atomically."""
    out = Path(out)
    body = statement_bytes(doc)
    files = {ATTESTATION: out / ATTESTATION}
    if key is not None:
        from gate import dsse

        files[ENVELOPE] = out / ENVELOPE
        atomic_write(files[ENVELOPE], json.dumps(dsse.sign(body, PAYLOAD_TYPE, key), indent=2) + "\n")
    else:
        (out / ENVELOPE).unlink(missing_ok=True)  # an earlier run's signature must not sit beside this statement
    atomic_write(files[ATTESTATION], body)
    return files
