"""Screening schedules replayed on traced scans: many schedules and reference draws from one scan per model.

    python -m bench.screen_replay trace --wide --datasets gtsrb --resume      # one unscreened scan per model
    python -m bench.screen_replay trace --zoo-dir models/demo --models gtsrb_badnets3x3 gtsrb_clean --resume
    python -m bench.screen_replay table [--seeds 20] [--record]               # every schedule, every trace
    python -m bench.screen_replay trace ... --set search.lambda_init=0.03 --out DIR   # a changed search, traced
    python -m bench.screen_replay pair --b DIR                                # the two searches side by side

Why a replay is exact: in a scan every class's search draws from its own random stream and onnxruntime's
answers do not depend on which other images share a call (measured: bench/RESULTS.md, "Scan L1s across
machines"), so a class's L1 after step s is the same whether the scan is screened or not (screening only
decides *when a class stops*).
``trace`` runs the default unscreened scan of each model and keeps, per class, the steps at which its L1 fell
(its *path*), how its search ended, and the top labels of the clean search images (for the pre-screening).
``table`` then plays :class:`gate.screening.Screening` itself, round by round, over those paths: the reference
draw, the waiting, the decision and the stops are the gate's own code, so a replayed schedule gives the flags
and the query count the screened scan would give (``table --check DIR`` replays the schedule and seed of each
screened ``bench.compare --screening`` record in DIR beside it: on the backdoored demo the same flags, the same
2,263,364 queries and every class's L1 bit for bit; tests/test_screen_replay.py checks it on three schedules).

What ``table`` reports per schedule (screening steps, reference size, margin), over every trace and
``--seeds`` reference draws each: how often the screened flags equal the unscreened ones, backdoored models
whose true target the unscreened scan flags and the screened one does not, clean models the screened scan
flags, and the mean queries per class against the unscreened scan's; then a leave-one-model-out choice of
schedule (chosen on the other traces, judged on the one left out: a schedule's figures on the traces it was
chosen on would flatter it), and the default schedule trace by trace. A trace also carries the unscreened
scan's own verdict, so traces of a changed search (``--set``) measure that search on the zoo and every
screening schedule for it at once.

Traces live in ``OUT/traces/<model>.json`` (default bench/screen_replay); ``--resume`` keeps those made with
the same scan settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench import zoo
from bench.compare import RESULTS_MD, Settings, cpu_description, write_results_section
from gate.decision import decide
from gate.outliers import OutlierRule, find_outliers
from gate.policy import Policy
from gate.result import atomic_write, write_json
from gate.scan import ScanConfig, ScanEngine
from gate.screening import Screening, ScreeningParams

OUT = zoo.ROOT / "bench" / "screen_replay"
SECTION = "## Scan cost: screening schedules replayed on traced scans"
TOP = 5  # top labels kept per clean search image (the pre-screening counts at most this many)
STEPS = (60, 90, 120, 150)
REFERENCE_MIN = (3, 5, 10)
MARGINS = (0.5, 1.0, 1.5)


# --------------------------------------------------------------------------- tracing
def trace_fingerprint(settings: Settings, policy: Policy) -> dict:
    cfg = policy.scan_config()
    return {"settings": settings.to_dict(), "scan": {**cfg.search.to_dict(), **cfg.to_dict()}}


def parse_changes(items: list[str]) -> dict:
    """``["search.lambda_init=0.01", ...]`` as policy overrides (values read as YAML: numbers, booleans)."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes FIELD=VALUE (e.g. search.lambda_init=0.01), got {item!r}")
        changes[key.strip()] = yaml.safe_load(value)
    return changes


def trace_scan(oracle, images, cfg: ScanConfig, policy: Policy | None = None) -> dict:
    """The unscreened scan ``cfg`` of ``images`` with every class's L1 path: what :func:`replay` plays.
    ``policy``: the decision's outcome is kept too."""
    if cfg.screening or cfg.bandit or cfg.blend:
        raise ValueError("a trace is of the plain scan: screening, bandit and blend off")
    engine = ScanEngine(oracle, images, cfg)
    pixels = float(engine.grid.pixels)
    paths = [[[0, pixels]] for _ in engine.classes]

    def record(e: ScanEngine) -> None:
        for r, path in zip(e.classes, paths, strict=True):
            l1 = float(r.state.result_trigger()[2])
            if l1 != path[-1][1]:
                path.append([int(r.state.step), l1])

    engine.run_rounds(record)
    res = engine.result().result
    probs = oracle.probs(engine.pool_x)  # the pre-screening's input (not counted: the scan predicted them too)
    h, w, _ = oracle.image_shape
    return {
        "num_classes": len(res.classes), "pixels": h * w, "rows_per_step": engine.rows_per_class,
        "held_out": len(engine.held_x), "clean_queries": len(engine.search_idx) + len(engine.held_idx),
        "queries": res.queries["scan"], "seconds": res.seconds["scan"], "flagged": res.flagged,
        "outcome": None if policy is None else decide(res, policy).outcome, "seed": cfg.seed,
        "top": np.argsort(-probs, axis=1)[:, :TOP].tolist(),
        "classes": [{"steps": c.steps, "status": c.status, "l1": c.l1, "path": p}
                    for c, p in zip(res.classes, paths, strict=True)],
    }


def run_traces(names, zoo_dir, datasets_dir, out: Path, resume: bool, threads: int, say,
               changes: dict | None = None) -> None:
    settings = Settings()
    policy = settings.policy("b3d").override(changes or {})
    fp = trace_fingerprint(settings, policy)
    data_cache: dict = {}
    for name in names:
        path = out / "traces" / f"{name}.json"
        if resume and path.is_file() and json.loads(path.read_text()).get("fingerprint") == fp:
            say(f"{name}: reusing {path}")
            continue
        man = zoo.load_manifest(zoo.manifest_path(name, zoo_dir))
        if man["dataset"] not in data_cache:
            data_cache[man["dataset"]] = zoo.clean_data(man["dataset"], settings.max_images, settings.eval_images,
                                                        settings.seed, datasets_dir, manifest=man)
        t0 = time.perf_counter()
        oracle = zoo.open_oracle(man, threads=threads)
        cfg = policy.scan_config()
        cfg = dataclasses.replace(cfg, batch_images=max(cfg.batch_images, oracle.max_batch))  # as run_gate does
        trace = trace_scan(oracle, data_cache[man["dataset"]].scan, cfg, policy)
        trace.update(model=name, dataset=man["dataset"], arch=man.get("arch"), attack=man.get("attack"),
                     backdoored=bool(man.get("backdoored", man.get("triggers"))), targets=zoo.targets(man),
                     true_asr=man.get("asr", []), cpu=cpu_description())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"fingerprint": fp, "trace": trace}, separators=(",", ":")) + "\n")
        say(f"{name}: flagged {trace['flagged'] or 'none'} (true {trace['targets'] or 'none'}), "
            f"{trace['queries']:,} queries, {time.perf_counter() - t0:.0f}s")


# --------------------------------------------------------------------------- replay
class Paths:
    """Every class's path of (step, L1) changes as arrays: the L1 of class c after step s, for many (c, s).

    >>> Paths([{"path": [[0, 1024.0], [3, 500.0], [7, 80.0]]}]).at(0, 5)
    500.0
    """

    def __init__(self, classes: list[dict]) -> None:
        self.steps = [np.array([s for s, _ in c["path"]], np.int64) for c in classes]
        self.values = [np.array([v for _, v in c["path"]], np.float64) for c in classes]

    def at(self, c: int, step: int) -> float:
        return float(self.values[c][np.searchsorted(self.steps[c], step, side="right") - 1])

    def all_at(self, steps) -> np.ndarray:
        return np.array([self.at(c, int(s)) for c, s in enumerate(steps)])


def top_probs(top: list, k: int) -> np.ndarray:
    """Stand-in probabilities with the recorded top-label order (all the pre-screening looks at)."""
    top = np.asarray(top, np.int64)
    probs = np.zeros((len(top), k))
    probs[np.arange(len(top))[:, None], top] = np.linspace(1.0, 0.5, top.shape[1])
    return probs


def replay(trace: dict, params: ScreeningParams, rule: OutlierRule, seed: int) -> dict:
    """The screened scan of a traced model, played round by round with :class:`gate.screening.Screening`:
    its flags, queries and which classes were screened out. ``seed``: the scan seed the reference is drawn from."""
    k, pixels = trace["num_classes"], trace["pixels"]
    classes = trace["classes"]
    if params.topk > TOP:
        raise ValueError(f"traces keep the top {TOP} labels; screening.topk {params.topk} needs more")
    sc = Screening.start(k, params, rule, seed, top_probs(trace["top"], k), pixels=pixels)
    last = np.array([c["steps"] for c in classes])
    paths = Paths(classes)
    step = np.zeros(k, np.int64)
    done = np.zeros(k, bool)
    out = np.zeros(k, bool)  # screened out

    def screen() -> None:
        l1 = paths.all_at(step)
        converged = done & ~out & np.array([c["status"] == "converged" for c in classes])
        stop, _ = sc.decide(l1, converged)
        done[stop] = True
        out[stop] = True

    if sc.active:
        while True:
            active = np.flatnonzero(~done & ~sc.waiting)
            if not len(active) and sc.waiting.any():
                screen()
                active = np.flatnonzero(~done & ~sc.waiting)
            if not len(active):
                break
            step[active] += 1
            done[active] = step[active] >= last[active]
            for c in active:
                sc.observe(int(c), int(step[c]), paths.at(c, int(step[c])), bool(done[c]))
            if sc.ready(done):
                screen()
    else:
        step = last.copy()
    l1 = paths.all_at(step)
    found = find_outliers(l1, rule, reference=sc.reference if sc.active else None, pixels=pixels)
    queries = trace["clean_queries"] + int(step.sum()) * trace["rows_per_step"] + k * trace["held_out"]
    return {"flagged": np.flatnonzero(found.flagged).tolist(), "queries": queries, "screened_out": int(out.sum()),
            "steps": step.tolist()}


def unscreened_flags(trace: dict, rule: OutlierRule) -> list[int]:
    """The plain scan's flags from the trace's final L1s (equal to the traced scan's own flags)."""
    l1 = np.array([c["l1"] for c in trace["classes"]])
    return np.flatnonzero(find_outliers(l1, rule, pixels=trace["pixels"]).flagged).tolist()


def schedules(steps=STEPS, reference_min=REFERENCE_MIN, margins=MARGINS) -> list[ScreeningParams]:
    """The schedules the table compares: every combination, reference fraction 0 (the size is reference_min)
    beside the default's, for the default reference_min."""
    base = ScreeningParams()
    out = [base]
    for s, r, m in itertools.product(steps, reference_min, margins):
        p = dataclasses.replace(base, steps=s, reference_min=r, margin=m, reference_fraction=0.0)
        if p not in out:
            out.append(p)
    return out


COUNTS = ("runs", "same", "target_lost", "clean_flagged", "queries", "queries_unscreened", "classes")


def tally(trace: dict, params: ScreeningParams, rule: OutlierRule, seeds: range) -> dict:
    """One schedule on one trace over ``seeds`` reference draws: how often its flags equal the unscreened
    scan's, true targets the unscreened scan flags and the screened one loses, clean models flagged, queries."""
    base = unscreened_flags(trace, rule)
    targets = set(trace["targets"])
    out = dict.fromkeys(COUNTS, 0) | {"lost_at": []}
    for seed in seeds:
        r = replay(trace, params, rule, seed)
        out["runs"] += 1
        out["same"] += r["flagged"] == base
        if trace["backdoored"] and set(base) & targets and not set(r["flagged"]) & targets:
            out["target_lost"] += 1
            out["lost_at"].append(f"{trace['model']}@{seed}")
        out["clean_flagged"] += (not trace["backdoored"]) and bool(r["flagged"])
        out["queries"] += r["queries"]
        out["queries_unscreened"] += trace["queries"]
        out["classes"] += trace["num_classes"]
    return out


def total(tallies: list[dict], params: ScreeningParams) -> dict:
    """Tallies of one schedule summed over traces, with the queries per class."""
    out = {key: sum(t[key] for t in tallies) for key in COUNTS}
    return out | {"params": params.to_dict(), "lost_at": [x for t in tallies for x in t["lost_at"]][:5],
                  "per_class": out["queries"] / out["classes"],
                  "per_class_unscreened": out["queries_unscreened"] / out["classes"]}


def cheapest_safe(totals: list[dict]) -> int:
    """The schedule (index) with the most runs agreeing with the unscreened flags, the fewest queries among
    those: how a schedule is chosen from traces."""
    return min(range(len(totals)), key=lambda i: (totals[i]["runs"] - totals[i]["same"], totals[i]["per_class"]))


def leave_one_out(grid: list[list[dict]], plans: list[ScreeningParams], traces: list[dict]) -> dict:
    """Choose a schedule on every trace but one, judge it on that one; summed over the traces left out.
    ``grid[i][j]``: the tally of schedule i on trace j."""
    held = []
    for j, t in enumerate(traces):
        others = [total([row[m] for m in range(len(traces)) if m != j], p) for row, p in zip(grid, plans, strict=True)]
        i = cheapest_safe(others)
        held.append((t["model"], plans[i], grid[i][j]))
    out = total([g for _, _, g in held], ScreeningParams())
    out.pop("params")
    return out | {"chosen": [(m, p.steps, reference_size(p.to_dict()), p.margin) for m, p, _ in held]}


def per_trace(grid_row: list[dict], traces: list[dict], rule: OutlierRule) -> str:
    """One schedule's tallies trace by trace (the table's first row, the policy's default, broken down). The
    outcome is the traced scan's decision under the policy of the day it was traced (its rules may have moved
    since); the flags are the current rule's."""
    head = ("| model | classes | true targets | unscreened flags | outcome when traced | same flags | "
            "queries/class unscreened | screened |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t, g in zip(traces, grid_row, strict=True):
        flags = unscreened_flags(t, rule) or "-"
        lines.append(f"| {t['model']} | {t['num_classes']} | {t['targets'] or '-'} | {flags} | {t['outcome'] or '-'} | "
                     f"{g['same']}/{g['runs']} | {t['queries'] / t['num_classes']:,.0f} | "
                     f"{g['queries'] / g['classes']:,.0f} |")
    return "\n".join(lines) + "\n"


def reference_size(p: dict) -> str:
    """How a schedule sizes its reference, as the tables print it."""
    if p["reference_fraction"]:
        return f"max({p['reference_min']}, {p['reference_fraction']:g} K)"
    return str(p["reference_min"])


def table(rows: list[dict], traces: list[dict], seeds: range, rule: OutlierRule, cv: dict | None = None) -> str:
    backdoored = sum(t["backdoored"] for t in traces)
    models = ", ".join(f"{t['model']} ({t['num_classes']})" for t in traces)
    head = ("| screening steps | reference | margin | runs | same flags | true target lost | clean model flagged | "
            "queries/class | unscreened | ratio |")
    lines = [f"{len(traces)} traces ({backdoored} backdoored, {len(traces) - backdoored} clean; classes in brackets): "
             f"{models}.", f"Reference draws per trace: {len(seeds)} (seeds {seeds.start}-{seeds.stop - 1}); outlier "
             f"rule: {rule.method} (the policy's defaults). The first row is the policy's default schedule.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        p = row["params"]
        ref = reference_size(p)
        lost = f"{row['target_lost']}" + (f" (e.g. {', '.join(row['lost_at'][:2])})" if row["lost_at"] else "")
        lines.append(f"| {p['steps']} | {ref} | {p['margin']:g} | {row['runs']} | {row['same']}/{row['runs']} | "
                     f"{lost} | {row['clean_flagged']} | {row['per_class']:,.0f} | "
                     f"{row['per_class_unscreened']:,.0f} | {row['per_class_unscreened'] / row['per_class']:.2f}x |")
    if cv is not None:
        chosen = "; ".join(f"{m}: {s} steps, reference {r}, margin {g:g}" for m, s, r, g in cv["chosen"])
        lines += ["", f"Leave one model out (the schedule with the most agreeing runs, then the fewest queries, "
                      f"chosen on the other traces and judged on the one left out): same flags {cv['same']}/"
                      f"{cv['runs']}, true target lost {cv['target_lost']}, clean model flagged "
                      f"{cv['clean_flagged']}, {cv['per_class']:,.0f} queries per class against "
                      f"{cv['per_class_unscreened']:,.0f} unscreened "
                      f"({cv['per_class_unscreened'] / cv['per_class']:.2f}x). Chosen: {chosen}."]
    return "\n".join(lines) + "\n"


def check(traces: list[dict], folder: Path) -> list[str]:
    """Each replay beside the real screened scan of the same model (``bench.compare --screening`` records in
    ``folder``): the same flags, queries and per-class L1? One line per model with both."""
    by_name = {t["model"]: t for t in traces}
    lines = []
    for path in sorted(Path(folder).glob("*.b3d.json")):
        saved = json.loads(path.read_text())
        rec, fp = saved["record"], saved["fingerprint"]["scan"]
        if rec["model"] not in by_name or "screening_params" not in fp:
            continue
        t = by_name[rec["model"]]
        r = replay(t, ScreeningParams(**fp["screening_params"]), OutlierRule(), int(fp["seed"]))
        l1 = Paths(t["classes"]).all_at(r["steps"]).tolist()
        differ = [c for c, (a, b) in enumerate(zip(l1, rec["l1_per_class"], strict=True)) if a != b]
        lines.append(f"{rec['model']}: flags replayed {r['flagged']} / scanned {rec['flagged']}; queries "
                     f"{r['queries']:,} / {rec['queries']['scan']:,}; classes whose L1 differs: {differ or 'none'}")
    return lines


def pair_table(a: list[dict], b: list[dict], names: tuple[str, str], seeds: range, rule: OutlierRule) -> str:
    """Two traced searches of the same models side by side: each one's unscreened flags, median L1 and queries per
    class, and the queries per class of the default screening schedule (mean over ``seeds`` reference draws)."""
    by_name = {t["model"]: t for t in b}
    a_, b_ = names
    head = (f"| model | true targets | flags {a_} | flags {b_} | median L1 {a_} | median L1 {b_} "
            f"| queries/class {a_} | {b_} | screened {a_} | screened {b_} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    sums = np.zeros(4)
    for ta in a:
        tb = by_name.get(ta["model"])
        if tb is None:
            continue
        cost = []
        for t in (ta, tb):
            g = tally(t, ScreeningParams(), rule, seeds)
            cost += [t["queries"] / t["num_classes"], g["queries"] / g["classes"]]
        sums += np.array([cost[0], cost[2], cost[1], cost[3]])
        med = [float(np.median([c["l1"] for c in t["classes"]])) for t in (ta, tb)]
        lines.append(f"| {ta['model']} | {ta['targets'] or '-'} | {unscreened_flags(ta, rule) or '-'} | "
                     f"{unscreened_flags(tb, rule) or '-'} | {med[0]:.0f} | {med[1]:.0f} | {cost[0]:,.0f} | "
                     f"{cost[2]:,.0f} | {cost[1]:,.0f} | {cost[3]:,.0f} |")
    n = len(lines) - 2
    if n:
        m = sums / n
        lines.append(f"| mean of {n} | | | | | | {m[0]:,.0f} | {m[1]:,.0f} | {m[2]:,.0f} | {m[3]:,.0f} |")
    return "\n".join(lines) + "\n"


def load_traces(out: Path, names: list[str] | None = None) -> list[dict]:
    traces = [json.loads(p.read_text())["trace"] for p in sorted((out / "traces").glob("*.json"))]
    return [t for t in traces if names is None or t["model"] in names]


# --------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.screen_replay", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("trace", help="unscreened scans with every class's L1 path (resumable)")
    tr.add_argument("--models", nargs="+", metavar="NAME")
    tr.add_argument("--wide", action="store_true", help="the wide zoo's models (models/wide_zoo)")
    tr.add_argument("--datasets", nargs="+", choices=zoo.DATASETS, default=list(zoo.DATASETS))
    tr.add_argument("--zoo-dir", type=Path, default=None)
    tr.add_argument("--datasets-dir", type=Path, default=zoo.DATASETS_DIR)
    tr.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: library default)")
    tr.add_argument("--resume", action="store_true", help="keep traces made with the same scan settings")
    tr.add_argument("--set", dest="changes", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="policy fields to change from the default (e.g. search.lambda_init=0.01): a search to try")
    tb = sub.add_parser("table", help="replay every schedule on every trace")
    tb.add_argument("--models", nargs="+", metavar="NAME", help="only these traces")
    tb.add_argument("--seeds", type=int, default=20, help="reference draws per trace (seeds 0..N-1)")
    tb.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    tb.add_argument("--reference-min", type=int, nargs="+", default=list(REFERENCE_MIN))
    tb.add_argument("--margins", type=float, nargs="+", default=list(MARGINS))
    tb.add_argument("--check", type=Path, metavar="DIR", help="also replay the schedule and seed of each "
                    "screened bench.compare record in DIR and compare flags, queries and L1s")
    tb.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md ({SECTION[3:]})")
    tb.add_argument("--results-md", type=Path, default=RESULTS_MD)
    pr = sub.add_parser("pair", help="two traced searches of the same models side by side")
    pr.add_argument("--b", type=Path, required=True, metavar="DIR", help="the other search's trace folder (--out)")
    pr.add_argument("--seeds", type=int, default=20, help="reference draws per trace for the screened cost")
    for p in (tr, tb, pr):
        p.add_argument("--out", type=Path, default=OUT)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    if args.command == "trace":
        zoo_dir = args.zoo_dir or (zoo.WIDE_ZOO_DIR if args.wide else zoo.ZOO_DIR)
        names = args.models or (zoo.wide_names(args.datasets) if args.wide else zoo.all_names(args.datasets))
        names, missing = zoo.available(names, zoo_dir)
        if missing and args.models:
            print(f"error: not in {zoo_dir}: {', '.join(missing)}", file=sys.stderr)
            return 2
        run_traces(names, zoo_dir, args.datasets_dir, args.out, args.resume, args.threads, say,
                   parse_changes(args.changes))
        return 0
    if args.command == "pair":
        a, b = load_traces(args.out), load_traces(args.b)
        print(pair_table(a, b, (args.out.name, args.b.name), range(args.seeds), OutlierRule()))
        return 0
    traces = load_traces(args.out, args.models)
    if not traces:
        print(f"error: no traces in {args.out / 'traces'} (python -m bench.screen_replay trace ...)", file=sys.stderr)
        return 2
    if args.check:
        lines = check(traces, args.check)
        print("\n".join(lines) or f"no screened record in {args.check} has a trace")
    rule = OutlierRule()
    seeds = range(args.seeds)
    plans = schedules(args.steps, args.reference_min, args.margins)
    grid = [[tally(t, p, rule, seeds) for t in traces] for p in plans]
    rows = [total(row, p) for row, p in zip(grid, plans, strict=True)]
    cv = leave_one_out(grid, plans, traces) if len(traces) > 1 else None
    text = table(rows, traces, seeds, rule, cv)
    text += "\nThe default schedule, trace by trace:\n\n" + per_trace(grid[0], traces, rule)
    print(text)
    write_json(args.out / "table.json", {"rows": rows, "leave_one_out": cv, "models": [t["model"] for t in traces],
                                         "seeds": args.seeds})
    if args.record:
        command = "python -m bench.screen_replay " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results_section(args.results_md, text, command.strip(), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
