"""``gate run MODEL --policy FILE --out DIR``: scan under a policy, decide, write every report.

What ``make gate`` runs. Steps: load the policy, apply command-line overrides, open the model, load the
clean data (or synthesise it), scan, decide (:func:`gate.decision.decide`), render report.json,
report.html, report.sarif, junit.xml, triggers.npz and trigger PNGs, write metrics.prom (and push),
print one line, exit 0 accept / 1 reject / 2 review or error / 4 usage error.

Any failure after the command line was understood still writes fail-closed reports (outcome
``error``) and metrics; nothing but a completed scan with no finding is ever an accept.

Data (policy ``data.source``): ``--data`` wins; ``--synthetic`` forces B3D-SS; ``auto`` uses the
policy's ``data.path`` when that file exists and fits the model (image size, channels, labels within
the model's classes), else synthetic samples; ``file`` requires the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from gate.commands.common import add_model_args, open_oracle
from gate.commands.scan import PAPER as PAPER_SEARCH
from gate.commands.scan import add_search_args
from gate.data import ImageSet, fit_to_model, load_images
from gate.decision import Decision, decide
from gate.errors import DataError, GateError, UsageError
from gate.policy import Policy, SearchPolicy, load_policy

# dotted policy field -> (argparse dest, flag) for every flag that overrides the policy
OVERRIDES = {
    "search.seed": ("seed", "--seed"),
    "search.k": ("k", "--k"),
    "search.batch_size": ("batch_size", "--batch-size"),
    "search.max_steps": ("max_steps", "--max-steps"),
    "search.sigma": ("sigma", "--sigma"),
    "search.lr": ("lr", "--lr"),
    "outliers.anomaly_threshold": ("anomaly_threshold", "--anomaly-threshold"),
    "outliers.median_ratio": ("median_ratio", "--median-ratio"),
    "data.max_images": ("max_images", "--max-images"),
    "data.synthetic_per_class": ("synthetic_per_class", "--synthetic-per-class"),
    "data.seed_images": ("seed_images", "--seed-images"),
    "budget.max_queries": ("max_queries", "--max-queries"),
    "budget.max_seconds": ("max_seconds", "--max-seconds"),
    "metrics.pushgateway": ("pushgateway", "--pushgateway"),
    "input.layout": ("layout", "--layout"),
    "input.value_range": ("value_range", "--input-range"),
    "input.mean": ("mean", "--mean"),
    "input.std": ("std", "--std"),
    "input.output_kind": ("output_kind", "--output"),
}
# --paper: the scan's paper preset, field by field as far as the policy's search section has them
PAPER = {f"search.{f.name}": getattr(PAPER_SEARCH, f.name) for f in dataclasses.fields(SearchPolicy)
         if hasattr(PAPER_SEARCH, f.name)} | {"search.bandit": False}


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="scan a model under a deployment policy and write all reports (make gate)",
        description="Scan MODEL for backdoors under a policy, decide, and write report.json, report.html, "
                    "report.sarif, junit.xml, triggers.npz and metrics.prom into --out. Flags override the "
                    "policy. Exit 0 accept, 1 reject, 2 review or error (fail closed), 4 usage error.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--policy", required=True, help="policy YAML file (e.g. policies/default.yaml)")
    p.add_argument("--out", required=True, help="output folder for the reports")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="clean images: .npz (x, optional y) or a folder of images "
                                    "(default: the policy's data section)")
    src.add_argument("--synthetic", action="store_true", help="no clean data: synthesise samples (B3D-SS)")
    p.add_argument("--synthetic-per-class", type=int, help="synthetic images per class")
    p.add_argument("--synthetic-grid", type=int, help="grid synthetic images are searched on (0: every pixel)")
    p.add_argument("--seed-images", help="unlabelled images synthesis starts from instead of noise")
    p.add_argument("--pushgateway", metavar="URL", help="also push the metrics to this Prometheus Pushgateway")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="clean images per class shown with the trigger stamped in report.html (3; 0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_model_args(p)
    add_search_args(p)
    p.set_defaults(handler=run, seed=None)  # None: the policy's seed unless --seed is given


def effective_policy(policy: Policy, args: argparse.Namespace) -> tuple[Policy, dict]:
    """The policy after command-line overrides, and the overrides themselves (dotted field -> value)."""
    changes: dict = {}
    if getattr(args, "paper", False):
        changes.update(PAPER)
    for key, (dest, _flag) in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            changes[key] = value
    if getattr(args, "synthetic_grid", None) is not None:
        changes["data.synthetic_grid"] = args.synthetic_grid or None
    if getattr(args, "bandit", None) is not None and not getattr(args, "paper", False):
        changes["search.bandit"] = args.bandit
    if args.data is not None:
        changes["data.source"] = "file"
        changes["data.path"] = args.data
    elif args.synthetic:
        changes["data.source"] = "synthetic"
    flags = {key: flag for key, (_dest, flag) in OVERRIDES.items()}
    flags.update({"data.path": "--data", "data.source": "--data/--synthetic", "search.bandit": "--bandit/--no-bandit",
                  "data.synthetic_grid": "--synthetic-grid"})
    flags.update({k: "--paper" for k in PAPER if k not in flags})
    return policy.override(changes, flags, error=UsageError), {k: _plain(v) for k, v in changes.items()}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def load_data(policy: Policy, oracle, progress, *, log) -> tuple[ImageSet, str, dict | None]:
    """(images, method, synthesis stats) following the policy's data section."""
    d = policy.data
    if d.source == "file":
        return fit_to_model(load_images(d.path), oracle.image_shape), "b3d", None
    if d.source == "auto" and d.path is not None:
        if Path(d.path).exists():
            try:
                images = fit_to_model(load_images(d.path), oracle.image_shape)
                if images.y is not None and len(images.y) and int(images.y.max()) >= oracle.num_classes:
                    raise DataError(f"{d.path}: labels go up to {int(images.y.max())} but the model has "
                                    f"{oracle.num_classes} classes")
                return images, "b3d", None
            except DataError as exc:
                log(f"data: {exc}; synthesising samples instead (B3D-SS)")
        else:
            log(f"data: {d.path} not found; synthesising samples instead (B3D-SS)")
    return synthesize_data(policy, oracle, progress)


def synthesize_data(policy: Policy, oracle, progress) -> tuple[ImageSet, str, dict]:
    try:
        from gate.synth import SynthConfig, synthesize
    except ImportError as exc:
        raise GateError(f"synthetic data (B3D-SS) is not available in this installation: {exc}") from None
    d = policy.data
    cfg = SynthConfig(seed=policy.search.seed, per_class=d.synthetic_per_class, grid=d.synthetic_grid)
    seeds = fit_to_model(load_images(d.seed_images), oracle.image_shape) if d.seed_images else None
    images, stats = synthesize(oracle, cfg, seed_images=seeds, progress=progress,
                               max_queries=policy.budget.max_queries)
    return images, "b3d-ss", stats


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _model_facts(path: str) -> dict:
    facts: dict = {"path": path}
    try:
        from gate.oracle import file_sha256

        if Path(path).is_file():
            facts["sha256"] = file_sha256(path)
    except OSError:
        pass
    return facts


def _say(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    from gate.metrics import export
    from gate.progress import Progress
    from gate.report import write_reports

    out = Path(args.out)
    if args.examples < 0:
        raise UsageError("--examples must be 0 or more")
    try:
        base = load_policy(args.policy)
    except GateError as exc:
        return _fail(out, args, str(exc), None, None)
    policy, changes = effective_policy(base, args)  # UsageError (exit 4) on a bad flag value
    policy_doc = policy.to_dict()
    source = f"{args.policy}" + (f" + {len(changes)} command-line override{'s' if len(changes) > 1 else ''}"
                                 if changes else "")
    progress = Progress(enabled=not args.quiet)

    def log(text: str) -> None:
        if not args.quiet:
            print(f"gate: {text}", file=sys.stderr, flush=True)

    try:
        oracle = open_oracle(args, policy.spec_overrides())
        images, method, synthesis = load_data(policy, oracle, progress, log=log)
        cfg = policy.scan_config()
        cfg = replace(cfg, batch_images=max(cfg.batch_images, args.max_batch))
        if synthesis is not None and cfg.max_queries is not None:
            cfg = replace(cfg, max_queries=max(0, cfg.max_queries - int(synthesis.get("queries", 0))))
        from gate.scan import scan

        result, triggers = scan(oracle, images, cfg, method=method, progress=progress, synthesis=synthesis)
        decision = decide(result, policy)
        before = oracle.queries
        examples = _examples(oracle, images, triggers, result, decision, policy, args.examples, log)
        if oracle.queries > before:  # the report's stamped examples are queries too
            spent = oracle.queries - before
            result.queries = {**result.queries, "report": spent, "total": result.queries["total"] + spent}
        write_reports(out, result, triggers, decision, policy_doc, examples=examples, policy_source=source,
                      generated=_now(), provenance={"policy_file": str(args.policy), "overrides": changes})
        warning = export(out, result, decision, str(args.model), policy.metrics.pushgateway)
    except UsageError:
        raise
    except GateError as exc:
        return _fail(out, args, str(exc), policy, source, changes)
    except Exception as exc:  # a bug must not look like a verdict: fail closed
        traceback.print_exc(file=sys.stderr)
        return _fail(out, args, f"internal error: {type(exc).__name__}: {exc}", policy, source, changes)
    if warning:
        print(f"gate: warning: {warning}", file=sys.stderr)
    _say(f"{decision.summary} ({result.queries['total']:,} queries, {result.seconds['total']:.1f} s) "
         f"-> {out / 'report.html'}")
    return decision.exit_code


def _examples(oracle, images, triggers, result, decision, policy, per_class, log):
    if per_class == 0:
        return None
    from gate.report.examples import example_cost, stamp_examples
    from gate.report.htmlpage import MANY_CLASSES

    if len(triggers.labels) > MANY_CLASSES:  # big models: examples for the classes that matter only
        marked = sorted(set(result.flagged) | {f.label for f in decision.findings if f.label is not None})
        if not marked:
            return None
        triggers = triggers.select(marked)
    cost = example_cost(len(triggers.labels), per_class, len(images))
    budget = policy.budget.max_queries
    if budget is not None and result.queries["total"] + cost > budget:
        log(f"report: no stamped examples ({cost} more queries would exceed the budget of {budget})")
        return None
    try:
        return stamp_examples(oracle, images.x, triggers, y=images.y, per_class=per_class, seed=policy.search.seed)
    except GateError as exc:
        log(f"report: no stamped examples: {exc}")
        return None


def _fail(out: Path, args: argparse.Namespace, message: str, policy: Policy | None, source: str | None,
          changes: dict | None = None) -> int:
    """Fail closed: error reports and metrics where possible, one line, exit 2 (or 1 with on_error reject)."""
    from gate.metrics import export
    from gate.report import write_error_reports

    decision = Decision.error(message, policy.on_error if policy is not None else "error")
    problems = []
    try:
        write_error_reports(out, decision, policy.to_dict() if policy is not None else None,
                            _model_facts(str(args.model)), message, policy_source=source, generated=_now(),
                            provenance={"policy_file": str(args.policy), "overrides": changes or {}})
    except Exception as exc:
        problems.append(f"could not write the error reports: {exc}")
    try:
        warning = export(out, None, decision, str(args.model),
                         policy.metrics.pushgateway if policy is not None else args.pushgateway)
        if warning:
            problems.append(warning)
    except Exception as exc:
        problems.append(f"could not write metrics: {exc}")
    for p in problems:
        print(f"gate: warning: {p}", file=sys.stderr)
    _say(f"{decision.summary} -> {out / 'report.json'}")
    return decision.exit_code
