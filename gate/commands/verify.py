"""``gate verify MODEL OUT [--key PUBLIC.pem]``: does OUT's attestation hold for this model file?

Checks, in order (the first that fails is named in one line, exit 2):

1. OUT/attestation.json is an in-toto Statement v1 of the gate's predicate type with one sha256 subject;
2. with ``--key``: OUT/attestation.dsse.json exists (an unsigned attestation is refused), is an envelope of
   payload type ``application/vnd.in-toto+json`` whose signature the key verifies, and its payload is
   attestation.json byte for byte;
3. MODEL's sha256 is the subject's digest;
4. OUT/report.json agrees with the attestation: the same outcome and exit code, the same model sha256, and
   the same effective policy (by its canonical sha256, which must also match the policy the statement holds).

When every check passes it prints one line with the attested decision and exits with its exit code (0
accept, 1 reject, 3 review, 2 error), so ``gate verify`` can stand in for the gate in a later CI job; 4 on
a usage error (no model file, no OUT folder, an unreadable key).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gate.decision import EXIT_CODES, OUTCOMES, exit_code_help
from gate.errors import GateError, UsageError
from gate.report.attestation import (
    ATTESTATION,
    ENVELOPE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    policy_sha256,
)


class CheckFailed(GateError):
    """A verification check failed (exit 2, one line naming it)."""


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="check a model file against the attestation of a gate run (digest, signature, report)",
        description="Check that OUT/attestation.json is about MODEL (sha256), that OUT/report.json agrees with it "
                    "and, with --key, that OUT/attestation.dsse.json is signed by that key. Prints the attested "
                    "decision and exits with its code when every check passes "
                    f"({exit_code_help()}); exit 2 with the failed check otherwise.")
    p.add_argument("model", help="the ONNX model file the attestation should be about")
    p.add_argument("out", help="the output folder of gate run")
    p.add_argument("--key", metavar="PUBLIC.pem",
                   help="ed25519 public key (PEM): require attestation.dsse.json and check its signature")
    p.set_defaults(handler=run)


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckFailed(f"no {what}: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{what} {path} cannot be read as JSON: {exc}") from None


def _statement(doc) -> dict:
    """The statement's fields this command relies on, checked; CheckFailed names what is wrong."""
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise CheckFailed(f"attestation is not an in-toto Statement v1 (_type {STATEMENT_TYPE})")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise CheckFailed(f"attestation's predicateType is {doc.get('predicateType')!r}, not {PREDICATE_TYPE}")
    subject = doc.get("subject")
    if not isinstance(subject, list) or len(subject) != 1 or not isinstance(subject[0], dict):
        raise CheckFailed("attestation must have exactly one subject (the model file)")
    digest = (subject[0].get("digest") or {}).get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckFailed("attestation's subject has no sha256 digest (the run could not read the model)")
    predicate = doc.get("predicate")
    decision = predicate.get("decision") if isinstance(predicate, dict) else None
    if not isinstance(decision, dict) or decision.get("outcome") not in OUTCOMES \
            or not isinstance(decision.get("exit_code"), int) or isinstance(decision.get("exit_code"), bool):
        raise CheckFailed("attestation's predicate has no decision (outcome, exit_code)")
    expected = {EXIT_CODES["error"], EXIT_CODES["reject"]} if decision["outcome"] == "error" \
        else {EXIT_CODES[decision["outcome"]]}
    if decision["exit_code"] not in expected:
        raise CheckFailed(f"attestation's exit code {decision['exit_code']} is not that of outcome "
                          f"{decision['outcome']}")
    return doc


def _signed_payload(out: Path, key, unsigned: bytes) -> str:
    """Check the envelope against the key and attestation.json; the key id."""
    from gate import dsse

    envelope = _json(out / ENVELOPE, f"signed attestation ({ENVELOPE}; --key refuses an unsigned one)")
    if not isinstance(envelope, dict):
        raise CheckFailed(f"signature: {ENVELOPE} is not a DSSE envelope")
    try:
        body, payload_type = dsse.verify(envelope, key)
    except GateError as exc:
        raise CheckFailed(f"signature: {exc}") from None
    if payload_type != PAYLOAD_TYPE:
        raise CheckFailed(f"signature: payload type {payload_type!r} is not {PAYLOAD_TYPE}")
    if body != unsigned:
        raise CheckFailed(f"signature: {ATTESTATION} is not the signed payload (it was changed after signing)")
    return dsse.keyid(key)


def verify(model: str | Path, out: str | Path, key: str | None = None) -> tuple[dict, str | None]:
    """(statement, key id or None) when every check passes; CheckFailed naming the first that fails."""
    from gate import dsse
    from gate.oracle import file_sha256

    model, out = Path(model), Path(out)
    if not model.is_file():
        raise UsageError(f"model {model} is not a file")
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder (the --out of gate run)")
    public_key = dsse.load_public_key(key) if key is not None else None
    try:
        unsigned = (out / ATTESTATION).read_bytes()
    except FileNotFoundError:
        raise CheckFailed(f"no attestation: {out / ATTESTATION} does not exist") from None
    except OSError as exc:
        raise CheckFailed(f"attestation {out / ATTESTATION} cannot be read: {exc.strerror or exc}") from None
    keyid = _signed_payload(out, public_key, unsigned) if public_key is not None else None
    try:
        doc = json.loads(unsigned)
    except ValueError as exc:
        raise CheckFailed(f"attestation {out / ATTESTATION} is not JSON: {exc}") from None
    statement = _statement(doc)
    attested = statement["subject"][0]["digest"]["sha256"]
    actual = file_sha256(model)
    if actual != attested:
        raise CheckFailed(f"model digest: {model} has sha256 {actual[:16]}..., the attestation is about "
                          f"{attested[:16]}...")
    predicate = statement["predicate"]
    decision = predicate["decision"]
    report = _json(out / "report.json", "report")
    given = report.get("decision") if isinstance(report, dict) else None
    if not isinstance(given, dict):
        raise CheckFailed("report.json has no decision")
    for field in ("outcome", "exit_code"):
        if given.get(field) != decision[field]:
            raise CheckFailed(f"report.json's {field} is {given.get(field)!r}, the attestation's "
                              f"{decision[field]!r}")
    reported_sha = (report.get("model") or {}).get("sha256")
    if reported_sha != attested:
        raise CheckFailed(f"report.json is about model sha256 {str(reported_sha)[:16]}..., the attestation about "
                          f"{attested[:16]}...")
    policy = predicate.get("policy") or {}
    if policy_sha256(policy.get("effective")) != policy.get("sha256"):
        raise CheckFailed("attestation's policy sha256 is not that of the policy it holds")
    if policy_sha256(report.get("policy")) != policy.get("sha256"):
        raise CheckFailed("report.json's effective policy is not the attested one (policy sha256 differs)")
    return statement, keyid


def run(args: argparse.Namespace) -> int:
    try:
        statement, keyid = verify(args.model, args.out, args.key)
    except CheckFailed as exc:
        print(f"gate verify: FAILED: {exc}", flush=True)
        return EXIT_CODES["error"]
    decision = statement["predicate"]["decision"]
    sha = statement["subject"][0]["digest"]["sha256"]
    signed = f"signed by key {keyid[:16]}..." if keyid else "signature not checked (no --key)"
    reasons = "; ".join(decision.get("reasons") or [])
    print(f"verified: {decision['outcome'].upper()} (exit {decision['exit_code']}) for {Path(args.model).name} "
          f"sha256 {sha[:16]}..., {signed}: {reasons}", flush=True)
    return decision["exit_code"]
