"""``gate run MODEL --policy FILE --out DIR``: scan under a policy, decide, write every report.

What ``make gate`` runs: parse the command line into the effective policy, open the model, call
:func:`gate.pipeline.run_gate`, render report.json, report.html, report.sarif, junit.xml, triggers.npz and
trigger PNGs and attestation.json (an in-toto Statement of the decision; signed into attestation.dsse.json
with ``--sign-key``), write metrics.prom (and push), write ``OUT/exit_code`` and ``OUT/outcome`` (the CI
contract, :func:`gate.report.write_exit_files`), print one line, exit with the decision's code
(:data:`gate.decision.EXIT_CODES`). ``gate scan`` is the same command without the renderers
(:func:`execute` with ``renderers=False``; it writes the exit_code and outcome files too).

Any failure after the command line was understood still writes fail-closed reports (outcome ``error``)
and metrics; nothing but a completed scan with no finding is ever an accept. The output folder is claimed
first (:func:`gate.report.begin_run`: earlier reports removed, report.json says ``running``, metrics say
running until the run ends), so a run that is killed never leaves an earlier accept behind. SIGINT and
SIGTERM end the run with fail-closed reports (reason "interrupted"). Without ``gate --debug`` no
traceback is printed: one line names the cause. The scan checkpoints its state into OUT every
``--checkpoint-every`` seconds; ``--resume`` continues an interrupted run from there (:mod:`gate.checkpoint`).
With ``--remote URL --model-name NAME`` the model is the one a V2 server serves (:mod:`gate.remote_oracle`),
named by its URL where a file's path would be.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from gate.checkpoint import Checkpoint, has_checkpoint
from gate.commands.common import (
    add_policy_args,
    add_ray_args,
    add_remote_args,
    add_runtime_args,
    check_model_source,
    open_oracle,
    policy_from_args,
    ray_options,
)
from gate.commands.verdict_cache import CacheUse, add_cache_args
from gate.decision import EXIT_USAGE, Decision, exit_code_help
from gate.errors import GateError, UsageError
from gate.labels import check_count, read_class_names
from gate.policy import Policy, builtin_policy, load_policy
from gate.progress import HEARTBEAT_SECONDS, say

if TYPE_CHECKING:
    from gate.pipeline import GateRun


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="scan a model under a deployment policy and write all reports (make gate)",
        description="Scan MODEL for backdoors under a policy, decide, and write report.json, report.html, "
                    "report.sarif, junit.xml, triggers.npz and metrics.prom into --out. Flags override the "
                    f"policy. Exit {exit_code_help()} (fail closed).")
    p.add_argument("--policy", help="policy YAML file (default: the built-in default policy, "
                                    "gate/policies/default.yaml = policies/default.yaml)")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="held-out images per class shown with the trigger stamped in report.html (3; 0: none)")
    p.add_argument("--sign-key", metavar="PEM",
                   help="ed25519 private key (PEM; passphrase in $GATE_SIGN_KEY_PASSWORD) that signs the "
                        "attestation into attestation.dsse.json (a DSSE envelope; gate verify --key checks it)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the metrics' model label, stable across versions of one model (e.g. vendor-a/resnet; "
                        "default: sha256- and the model file's first 12 sha256 hex digits)")
    add_gate_args(p, data_required=False)
    p.set_defaults(handler=lambda args: execute(args, renderers=True))


def add_gate_args(p: argparse.ArgumentParser, *, data_required: bool, one_model: bool = True) -> None:
    """What ``gate run``, ``gate scan`` and ``gate run-many`` share: the model (``one_model``: the positional model
    and the remote-model flags), the output folder, the data and every policy flag."""
    if one_model:
        p.add_argument("model", nargs="?", help="ONNX model file (or --remote URL --model-name NAME)")
    p.add_argument("--out", required=True, help="output folder for the reports" if one_model else
                   "output folder: one sub-folder per model, and the summary")
    src = p.add_mutually_exclusive_group(required=data_required)
    src.add_argument("--data", help="clean images: .npz (x, optional y) or a folder of images (default: the "
                                    "policy's data.path; without either, give --synthetic)")
    src.add_argument("--synthetic", action="store_true", help="no clean data: synthesise samples (B3D-SS)")
    p.add_argument("--labels", metavar="FILE",
                   help="class names for the reports: one per line in class order, or a JSON list of strings")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--progress-every", type=float, default=HEARTBEAT_SECONDS, metavar="SECONDS",
                   help=f"without a terminal: a timestamped heartbeat line on stderr this often "
                        f"({HEARTBEAT_SECONDS:g}; 0: none). On a terminal a live bar shows the progress")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run whose checkpoint is in --out (same model, data and policy)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the scan's state to --out this often (60; 0: after every round) so --resume can "
                        "continue it")
    add_cache_args(p)
    add_policy_args(p)
    add_runtime_args(p)
    if one_model:
        add_remote_args(p)
    add_ray_args(p, models=not one_model)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class _Invocation:
    """What the attestation records about this run besides its result: when, how, and the signing key."""

    started: datetime
    command: list[str]
    key: object | None  # an ed25519 private key, or None: the attestation is not signed


def _signing_key(args: argparse.Namespace):
    """The ``--sign-key`` private key, read before any query (a bad key is a usage error); None without it."""
    path = getattr(args, "sign_key", None)
    if not path:
        return None
    from gate.dsse import load_private_key

    return load_private_key(path)


def _model_facts(path: str) -> dict:
    if path.startswith(("http://", "https://")):  # --remote: the model's URL, no file and no sha256
        from gate.remote_oracle import endpoint_facts

        return endpoint_facts(path)
    facts: dict = {"path": path}
    try:
        from gate.oracle import file_sha256

        if Path(path).is_file():
            facts["sha256"] = file_sha256(path)
    except OSError:
        pass
    return facts


def execute(args: argparse.Namespace, *, renderers: bool, scan: Callable[..., GateRun] | None = None) -> int:
    """The command (see the module docstring). ``scan`` stands where :func:`gate.pipeline.run_gate` does (the same
    arguments and result): ``gate run-many --ray`` runs the model on a Ray worker through it."""
    from gate.pipeline import NO_DATA, run_gate
    from gate.progress import Progress
    from gate.report.attestation import policy_sha256
    from gate.report.notes import run_notes

    started = datetime.now(timezone.utc)
    out = Path(args.out)
    examples = getattr(args, "examples", 0) if renderers else 0
    if examples < 0:
        raise UsageError("--examples must be 0 or more")
    check_model_source(args)  # a remote model: args.model is its URL from here on
    if not args.checkpoint_every >= 0:
        raise UsageError("--checkpoint-every must be 0 or more seconds")
    if not args.progress_every >= 0:
        raise UsageError("--progress-every must be 0 or more seconds")
    if args.resume and not has_checkpoint(out):
        raise UsageError(f"--resume: no checkpoint in {out} (nothing to continue)")
    class_names = read_class_names(args.labels) if getattr(args, "labels", None) else None
    if getattr(args, "model_name", None) is not None:
        from gate.metrics import check_model_name

        check_model_name(args.model_name)
    run_info = _Invocation(started, list(getattr(args, "command_line", None) or ["gate", *sys.argv[1:]]),
                           _signing_key(args))
    policy_file = getattr(args, "policy", None)
    try:
        base = load_policy(policy_file) if policy_file else builtin_policy()
    except GateError as exc:
        return _fail(out, args, str(exc), None, None, run_info=run_info, renderers=renderers)
    policy, changes = policy_from_args(args, base)  # UsageError (exit 4) on a bad flag value
    if policy.data.source == "file" and policy.data.path is None:
        raise UsageError(NO_DATA)  # before any query and before the claim: synthetic samples are opt-in
    ray = ray_options(args, policy)  # UsageError (exit 4) for what --ray cannot do, before the claim
    source = (policy_file or "built-in default policy") + (
        f" + {len(changes)} command-line override{'s' if len(changes) > 1 else ''}" if changes else "")
    provenance = {"policy_file": str(policy_file) if policy_file else None, "overrides": changes}

    def log(text: str) -> None:
        if not args.quiet:
            say(f"gate: {text}")

    policy_hash = policy_sha256(policy.to_dict())
    cache = CacheUse.open(args, policy, policy_hash, examples, warn=lambda text: say(f"gate: warning: {text}"))

    in_main = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    claimed = False
    try:
        _claim(out, args, policy, renderers)
        claimed = True
        checkpoint = Checkpoint(out, args.checkpoint_every)
        if not args.resume:
            checkpoint.clear()  # a fresh run: an earlier run's checkpoint is stale
        run = cache.lookup(policy)
        if run is not None:
            checkpoint.clear()  # the run is answered: nothing is left to resume
            if class_names is not None:
                check_count(class_names, len(run.result.classes), args.labels)
            log(f"answered from the cache ({cache.record['entry']}): no query sent; --no-cache scans again")
        else:
            # a remote model's own budget counts every image sent (the spec's probe too): none beyond --max-queries
            oracle = open_oracle(args, policy.spec_overrides(), policy.budget.max_queries if args.remote else None)
            if class_names is not None:
                check_count(class_names, oracle.num_classes, args.labels)
            with Progress(enabled=not args.quiet, heartbeat=args.progress_every) as progress:
                run = (scan or run_gate)(oracle, policy, examples=examples, progress=progress, log=log,
                                         checkpoint=checkpoint, resume=args.resume, ray=ray)
            cache.remember(run, policy, policy_hash)
        provenance["cache"] = cache.record
        notes = run_notes(run.result, cache.record)
        if notes:
            provenance["notes"] = notes
        warning = _write(out, run, policy, source, provenance, args, run_info, renderers, class_names)
    except UsageError:
        if claimed:  # the folder must not say "running" for ever
            _exit_files(out, "usage", EXIT_USAGE, [])
        raise
    except KeyboardInterrupt as exc:
        return _fail(out, args, f"interrupted ({exc.args[0] if exc.args else 'SIGINT'}): the scan did not finish",
                     policy, source, provenance, run_info=run_info, renderers=renderers)
    except GateError as exc:
        return _fail(out, args, str(exc), policy, source, provenance, run_info=run_info, renderers=renderers)
    except Exception as exc:  # a bug must not look like a verdict: fail closed
        if getattr(args, "debug", False):
            traceback.print_exc(file=sys.stderr)
        return _fail(out, args, f"internal error: {type(exc).__name__}: {exc}", policy, source, provenance,
                     run_info=run_info, renderers=renderers)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if warning:
        say(f"gate: warning: {warning}")
    for note in notes:
        say(f"gate: note: {note}")
    result, decision = run.result, run.decision
    if decision.clean_reference is not None:
        say(f"gate: {decision.clean_reference.sentence}")
    target = out / ("report.html" if renderers else "report.json")
    cost = (f"from the cache: 0 queries now, {result.queries['total']:,} when scanned at {cache.record['scanned']}"
            if cache.hit else f"{result.queries['total']:,} queries, {result.seconds['total']:.1f} s")
    print(f"{decision.summary} ({cost}) -> {target}", flush=True)
    return decision.exit_code


INTERRUPTED = threading.Event()  # set by SIGTERM (and by gate run-many's SIGINT): the caller stops after this run


def _terminated(signum, frame) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _claim(out: Path, args, policy: Policy, renderers: bool) -> None:
    """Before any query: the output folder marks this run as running, and the metrics as not finished."""
    from gate.metrics import mark_running
    from gate.report import begin_run

    begin_run(out, _model_facts(str(args.model)), policy.to_dict(), started=_now())
    if renderers:
        mark_running(out, str(args.model), model_name=getattr(args, "model_name", None), policy=policy.to_dict())


def _write(out: Path, run, policy: Policy, source: str, provenance: dict, args, run_info: _Invocation,
           renderers: bool, class_names: list[str] | None = None) -> str | None:
    """Every file of a finished run; the exit_code and outcome files last."""
    from gate.metrics import export
    from gate.report import statement, write_attestation, write_exit_files, write_reports, write_scan_files
    from gate.report.notes import add_notes

    if not renderers:
        write_scan_files(out, run.result, run.triggers, run.decision, policy.to_dict(), provenance=provenance,
                         class_names=class_names)
        write_exit_files(out, run.decision.outcome, run.decision.exit_code)
        return None
    write_reports(out, run.result, run.triggers, run.decision, policy.to_dict(), examples=run.examples,
                  policy_source=source, generated=_now(), provenance=provenance, class_names=class_names,
                  command=run_info.command, companions=_companions(run_info))
    add_notes(out / "report.html", provenance.get("notes", []))
    attested = statement(run.decision, run.result.model, policy.to_dict(), result=run.result, provenance=provenance,
                         started=run_info.started, finished=datetime.now(timezone.utc), command=run_info.command)
    attested["predicate"]["cache"] = provenance.get("cache")
    write_attestation(out, attested, run_info.key)
    warning = export(out, run.result, run.decision, str(args.model), policy.metrics.pushgateway,
                     model_name=getattr(args, "model_name", None), policy=policy.to_dict())
    write_exit_files(out, run.decision.outcome, run.decision.exit_code)
    return warning


def _companions(run_info: _Invocation) -> list[str]:
    """The files gate run writes beside the reports after them (report.html links to them)."""
    from gate.report import ATTESTATION, ENVELOPE

    return [ATTESTATION, *([ENVELOPE] if run_info.key is not None else []), "metrics.prom"]


def _exit_files(out: Path, outcome: str, exit_code: int, problems: list[str]) -> None:
    from gate.report import write_exit_files

    try:
        if out.is_dir():
            write_exit_files(out, outcome, exit_code)
    except OSError as exc:
        problems.append(f"could not write {out / 'exit_code'}: {exc.strerror or exc}")


def _fail(out: Path, args: argparse.Namespace, message: str, policy: Policy | None, source: str | None,
          provenance: dict | None = None, *, run_info: _Invocation, renderers: bool) -> int:
    """Fail closed: error reports, attestation and metrics where possible, then the exit_code and outcome
    files, one line, exit 2 (or 1 with on_error reject)."""
    from gate.metrics import export
    from gate.report import statement, write_attestation, write_error_reports

    decision = Decision.error(message, policy.on_error if policy is not None else "error")
    provenance = provenance or {"policy_file": getattr(args, "policy", None), "overrides": {}}
    model = _model_facts(str(args.model))
    policy_doc = policy.to_dict() if policy is not None else None
    problems: list[str] = []
    try:
        write_error_reports(out, decision, policy_doc, model, message, policy_source=source, generated=_now(),
                            provenance=provenance, renderers=renderers, command=run_info.command,
                            companions=_companions(run_info))
    except Exception as exc:
        problems.append(f"could not write the error reports: {exc}")
    if renderers and out.is_dir():
        try:
            write_attestation(out, statement(decision, model, policy_doc, provenance=provenance,
                                             started=run_info.started, finished=datetime.now(timezone.utc),
                                             command=run_info.command, error=message), run_info.key)
        except Exception as exc:
            problems.append(f"could not write the attestation: {exc}")
    if renderers:
        try:
            pushgateway = (policy.metrics.pushgateway if policy is not None
                           else getattr(args, "metrics__pushgateway", None))
            warning = export(out, None, decision, str(args.model), pushgateway,
                             model_name=getattr(args, "model_name", None), policy=policy_doc)
            if warning:
                problems.append(warning)
        except Exception as exc:
            problems.append(f"could not write metrics: {exc}")
    _exit_files(out, decision.outcome, decision.exit_code, problems)
    for p in problems:
        print(f"gate: warning: {p}", file=sys.stderr)
    print(f"{decision.summary} -> {out / 'report.json'}", flush=True)
    return decision.exit_code
