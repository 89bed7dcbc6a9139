"""``gate run-many MODEL ... | --manifest FILE --out DIR``: ``gate run`` for several models, one output folder each,
and a summary.

Each model gets ``OUT/NAME/`` (NAME: the manifest's ``name``, else the file name without ``.onnx``) holding exactly
what ``gate run MODEL --out OUT/NAME`` writes, under the same policy and flags. Every model folder is claimed
(``running``) before the first scan starts, so no folder keeps an earlier run's accept while this one runs. Without
``--ray`` the models run one after another here; with ``--ray local|auto|ADDRESS`` each model's run is one Ray task
(:mod:`gate.fleet`), as many at once as the cluster has CPUs for (``--ray-cpus`` each), and the reports are
written here. A model that fails ends as an error in its folder; the others go on.

The summary: ``OUT/summary.json`` and ``OUT/summary.md`` (a row per model: outcome, exit code, flagged classes,
queries, seconds, its folder) and ``OUT/exit_code`` / ``OUT/outcome``, printed as a table at the end. The summary
exit code is 0 only when every model was accepted; otherwise 1 when any model was rejected (a finding is what a
pipeline must act on first), else 2 when any run failed, else 3 (a person must review one). ``--resume`` continues
each model whose folder holds a checkpoint and scans the others afresh.

A manifest is YAML: a list (or a mapping with ``models:``) whose entries are a model path or a mapping with
``model`` and optionally ``name``, ``data``, ``synthetic``, ``labels``, ``model_name`` (the metrics label) and
``policy``; relative paths are read from the manifest's folder; a ``data``/``synthetic``/``labels``/``policy``
given in an entry replaces the command line's for that model.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from gate.checkpoint import has_checkpoint
from gate.commands.common import RAY_ONLY, ray_options
from gate.commands.run import INTERRUPTED, _now, _terminated, add_gate_args, execute
from gate.decision import EXIT_CODES, EXIT_USAGE, exit_code_help
from gate.errors import GateError, UsageError
from gate.report import atomic_write, begin_run, write_exit_files

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
ENTRY_KEYS = ("model", "name", "data", "synthetic", "labels", "model_name", "policy")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SEVERITY = ("reject", "error", "review")  # the summary's outcome: the first of these any model has, else accept


def register(sub) -> None:
    p = sub.add_parser(
        "run-many", help="gate run for several models (a list or a manifest), on Ray with --ray; a summary",
        description="Scan several models under one policy, each into its own folder OUT/NAME (what gate run "
                    "writes), and write OUT/summary.json, OUT/summary.md, OUT/exit_code and OUT/outcome. With --ray "
                    "each model runs as one Ray task. Exit 0 only when every model is accepted; else 1 (any "
                    f"rejected), 2 (any error), 3 (any to review); 4 usage error. Per model: exit {exit_code_help()}.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="ONNX model files (and/or --manifest)")
    p.add_argument("--manifest", metavar="YAML", help="the models, with their names, data, labels, metrics labels "
                                                      "or policies (see gate/commands/run_many.py)")
    p.add_argument("--policy", help="policy YAML file for every model (default: the built-in default policy)")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="held-out images per class shown with the trigger stamped in each report.html (3; 0: none)")
    p.add_argument("--sign-key", metavar="PEM", help="ed25519 private key that signs each model's attestation")
    add_gate_args(p, data_required=False, one_model=False)
    p.set_defaults(handler=execute_many)


@dataclass(frozen=True)
class Entry:
    """One model of the run and what differs for it from the command line."""

    model: str
    name: str
    data: str | None = None
    synthetic: bool | None = None
    labels: str | None = None
    model_name: str | None = None
    policy: str | None = None


def read_manifest(path: str) -> list[Entry]:
    """The manifest's entries (module docstring); UsageError, naming the entry, for anything else."""
    file = Path(path)
    try:
        doc = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise UsageError(f"--manifest {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--manifest {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(doc, dict) and set(doc) == {"models"}:
        doc = doc["models"]
    if not isinstance(doc, list) or not doc:
        raise UsageError(f"--manifest {path}: expected a list of models (or models: [...])")
    base = file.parent

    def place(value, key: str, i: int) -> str:
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"--manifest {path}: entry {i + 1}: {key} must be a path")
        return str(base / value) if not Path(value).is_absolute() else value

    entries = []
    for i, item in enumerate(doc):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise UsageError(f"--manifest {path}: entry {i + 1}: a model path or a mapping with model:")
        unknown = sorted(set(item) - set(ENTRY_KEYS))
        if unknown:
            raise UsageError(f"--manifest {path}: entry {i + 1}: unknown key {unknown[0]!r} "
                             f"(known: {', '.join(ENTRY_KEYS)})")
        synthetic = item.get("synthetic")
        if synthetic is not None and not isinstance(synthetic, bool):
            raise UsageError(f"--manifest {path}: entry {i + 1}: synthetic must be true or false")
        if synthetic and item.get("data") is not None:
            raise UsageError(f"--manifest {path}: entry {i + 1}: data and synthetic: true exclude each other")
        for key in ("name", "model_name"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise UsageError(f"--manifest {path}: entry {i + 1}: {key} must be a string")
        model = place(item["model"], "model", i)
        entries.append(Entry(model=model, name=item.get("name") or _default_name(model),
                             data=place(item["data"], "data", i) if item.get("data") is not None else None,
                             synthetic=synthetic,
                             labels=place(item["labels"], "labels", i) if item.get("labels") is not None else None,
                             model_name=item.get("model_name"),
                             policy=place(item["policy"], "policy", i) if item.get("policy") is not None else None))
    return entries


def _default_name(model: str) -> str:
    name = Path(model).name
    return name[:-5] if name.lower().endswith(".onnx") else name


def collect(args: argparse.Namespace) -> list[Entry]:
    """The command line's models, then the manifest's; UsageError when there are none or two share a folder."""
    entries = [Entry(model=m, name=_default_name(m)) for m in args.models]
    if args.manifest:
        entries += read_manifest(args.manifest)
    if not entries:
        raise UsageError("no model: give ONNX files and/or --manifest FILE")
    seen: dict[str, str] = {}
    for e in entries:
        for what, path in (("model", e.model), ("data", e.data), ("labels", e.labels), ("policy", e.policy)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{e.name}: {what} {path} not found")
        if not NAME.fullmatch(e.name) or e.name in (SUMMARY_JSON, SUMMARY_MD, "exit_code", "outcome"):
            raise UsageError(f"{e.model}: {e.name!r} cannot be its output folder's name (letters, digits, . _ -): "
                             f"give it a name: in a manifest")
        if e.name in seen:
            raise UsageError(f"{seen[e.name]} and {e.model} would share the output folder {e.name}: give them "
                             f"different name: entries in a manifest")
        seen[e.name] = e.model
    return entries


def model_args(args: argparse.Namespace, entry: Entry, out: Path) -> argparse.Namespace:
    """``gate run``'s arguments for one model: the command line's, with the entry's replacements."""
    a = copy.copy(args)
    a.model, a.out, a.ray, a.remote, a.model_name = entry.model, str(out / entry.name), None, None, entry.model_name
    for k in RAY_ONLY:  # run-many's own: a model runs whole in one task, its scan not split again
        setattr(a, k, None)
    if entry.data is not None:
        a.data, a.synthetic = entry.data, False
    if entry.synthetic is not None:
        a.synthetic = entry.synthetic
        if entry.synthetic:
            a.data = None
    if entry.labels is not None:
        a.labels = entry.labels
    if entry.policy is not None:
        a.policy = entry.policy
    a.resume = bool(args.resume) and has_checkpoint(a.out)
    return a


def execute_many(args: argparse.Namespace) -> int:
    entries = collect(args)
    options = ray_options(args, None)
    out = Path(args.out)
    started = _now()
    _claim(out, entries, started)
    rows: dict[str, dict] = {}
    INTERRUPTED.clear()
    in_main = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        if options is None:
            for i, e in enumerate(entries):
                rows[e.name] = _one(args, e, out, None)
                if INTERRUPTED.is_set():  # the rest do not start: they end as the interrupted one did
                    for rest in entries[i + 1:]:
                        rows[rest.name] = _failed(args, rest, out, f"interrupted: gate run-many stopped before "
                                                                   f"{rest.name}'s scan began")
                    break
        else:
            _on_ray(args, entries, out, options, rows)
    except KeyboardInterrupt as exc:  # before or between the models' own runs (Ray starting, say)
        why = f"interrupted ({exc.args[0] if exc.args else 'SIGINT'}): gate run-many stopped before this model's scan"
        for e in entries:
            if e.name not in rows:
                rows[e.name] = _failed(args, e, out, why)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _finish(out, entries, rows, started)


def _claim(out: Path, entries: list[Entry], started: str) -> None:
    """Before any query: the summary says running and has no exit code; so does every model's folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_exit_files(out, "running", None)
        _write_summary(out, {"status": "running", "started": started, "outcome": "running", "exit_code": None,
                             "models": [{"name": e.name, "model": e.model, "outcome": "running"} for e in entries]})
        (out / SUMMARY_MD).unlink(missing_ok=True)
    except OSError as exc:
        raise GateError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    for e in entries:
        begin_run(out / e.name, {"path": e.model}, None, started=started)


def _one(args: argparse.Namespace, entry: Entry, out: Path, scan) -> dict:
    """One model's gate run (its own failures are its report's: fail closed there) and its summary row."""
    a = model_args(args, entry, out)
    try:
        code = execute(a, renderers=True, scan=scan)
    except UsageError as exc:  # a usage error of this model only (its data, labels, policy): the others go on
        print(f"gate: {entry.name}: usage error: {exc}", file=sys.stderr, flush=True)
        _usage_reports(Path(a.out), entry, f"usage error: {exc}")
        return {"name": entry.name, "model": entry.model, "outcome": "usage", "exit_code": EXIT_USAGE,
                "reason": str(exc), "out": a.out}
    return _row(entry, Path(a.out), code)


def _usage_reports(folder: Path, entry: Entry, message: str) -> None:
    """The folder of a model whose command line was wrong: it was claimed ("running"), so it now says why it
    has no verdict (report.json, metrics.prom: the error decision, fail closed; exit files: usage, 4)."""
    from gate.decision import Decision
    from gate.metrics import export
    from gate.report import write_error_reports

    decision = Decision.error(message)
    write_error_reports(folder, decision, None, {"path": entry.model}, message, renderers=False)
    export(folder, None, decision, entry.model, model_name=entry.model_name)
    write_exit_files(folder, "usage", EXIT_USAGE)


def _row(entry: Entry, folder: Path, code: int) -> dict:
    """The summary row of a finished model, read from its report.json (what the reports say is what counts)."""
    row = {"name": entry.name, "model": entry.model, "out": str(folder), "exit_code": code}
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return {**row, "outcome": "error", "exit_code": EXIT_CODES["error"], "reason": f"no report.json: {exc}"}
    decision = report.get("decision") or {}
    queries, seconds = report.get("queries") or {}, report.get("seconds") or {}
    reasons = decision.get("reasons") or []
    return {**row, "outcome": decision.get("outcome", "error"), "flagged": report.get("flagged") or [],
            "queries": queries.get("total"), "seconds": seconds.get("total"),
            "reason": reasons[0] if reasons else None}


def _on_ray(args: argparse.Namespace, entries: list[Entry], out: Path, options, rows: dict[str, dict]) -> None:
    """Every model as a Ray task, as many at once as the cluster runs, its row into ``rows``; SIGTERM / Ctrl-C
    end them fail-closed."""
    from gate.fleet import RayModels

    models = None
    try:
        try:
            models = RayModels(options)
        except GateError as exc:  # the cluster cannot be reached: every model's run is an error
            for e in entries:
                rows[e.name] = _failed(args, e, out, str(exc))
            return
        quiet = _quiet(args)
        with ThreadPoolExecutor(max_workers=min(len(entries), max(models.slots(), 1) * 2)) as pool:
            futures = {e.name: pool.submit(_one, quiet, e, out, models.scan) for e in entries}
            try:
                for name, fut in futures.items():
                    while True:
                        try:
                            rows[name] = fut.result(timeout=0.5)
                            break
                        except TimeoutError:
                            continue
            except KeyboardInterrupt:
                models.stop()  # every run still waiting ends as interrupted, in its own folder
                for name, fut in futures.items():
                    rows[name] = fut.result()
    finally:
        if models is not None:
            models.close()


def _quiet(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "quiet": True})


def _failed(args: argparse.Namespace, entry: Entry, out: Path, message: str) -> dict:
    """A model whose run could not start: its folder's fail-closed reports, as gate run writes them (never an
    answer from the verdict cache: this run did not judge the model)."""

    def cannot(oracle, policy, **_):
        raise GateError(message)

    return _one(argparse.Namespace(**{**vars(_quiet(args)), "no_cache": True}), entry, out, cannot)


def _finish(out: Path, entries: list[Entry], rows: dict[str, dict], started: str) -> int:
    ordered = [rows[e.name] for e in entries]
    outcomes = {r["outcome"] for r in ordered}
    outcome = next((o for o in SEVERITY if o in outcomes), None)
    if outcome is None:
        outcome = "accept" if outcomes == {"accept"} else "error"  # a usage error of one model: not an accept
    code = EXIT_CODES[outcome]
    doc = {"status": "finished", "started": started, "finished": _now(), "outcome": outcome, "exit_code": code,
           "counts": {o: sum(r["outcome"] == o for r in ordered) for o in sorted(outcomes)}, "models": ordered}
    table = summary_table(ordered)
    _write_summary(out, doc)
    atomic_write(out / SUMMARY_MD, f"# gate run-many: {outcome} (exit {code})\n\n{table}\n")
    write_exit_files(out, outcome, code)
    print(table, flush=True)
    print(f"{outcome.upper()}: {len(ordered)} models, " + ", ".join(f"{n} {o}" for o, n in doc["counts"].items())
          + f" -> {out / SUMMARY_JSON}", flush=True)
    return code


def _write_summary(out: Path, doc: dict) -> None:
    atomic_write(out / SUMMARY_JSON, json.dumps(doc, indent=2) + "\n")


def summary_table(rows: list[dict]) -> str:
    """The summary as a Markdown table, a row per model.

    >>> print(summary_table([{"name": "a", "outcome": "reject", "exit_code": 1, "flagged": [29], "queries": 1200,
    ...                       "seconds": 3.25, "out": "o/a"}]))
    | model | outcome | exit | flagged | queries | seconds | report |
    |---|---|---|---|---|---|---|
    | a | reject | 1 | 29 | 1,200 | 3.2 | o/a/report.html |

    A model whose command line was wrong has no report: its row gives the reason.
    """
    lines = ["| model | outcome | exit | flagged | queries | seconds | report |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = ", ".join(map(str, r.get("flagged") or [])) or "-"
        queries = f"{r['queries']:,}" if isinstance(r.get("queries"), int) else "-"
        seconds = f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), int | float) else "-"
        report = f"usage error: {r.get('reason', '')}" if r["outcome"] == "usage" else f"{r['out']}/report.html"
        lines.append(f"| {r['name']} | {r['outcome']} | {r['exit_code']} | {flagged} | {queries} | {seconds} | "
                     f"{report} |")
    return "\n".join(lines)

