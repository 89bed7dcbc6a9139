"""Two trigger searches judged side by side on the same models: is a cheaper search as good a detector?

    python -m bench.search_versus --a bench/screen_replay/b4_p80_l0.001/traces bench/wide/compare \\
        --b bench/screen_replay/traces [--folds 5] [--seeds 10] [--record]

``--a`` and ``--b`` are folders of B3D scans of the same models made with two search settings: ``bench.compare``
records or ``bench.screen_replay`` traces (``trace --set FIELD=VALUE`` traces a changed search). Only models
both sides scanned count (where a side has a model twice, its first folder wins). Nothing is scanned here.

``--b-best-of``: B is a search with several independent starts, built from scans the folders of ``--b`` hold
of the same models with different seeds (``trace --set search.seed=1 --out DIR``): each class keeps the smallest
L1 any start reached (what a multi-start search would report: the best trigger found), and the queries add up.
Only models every folder scanned count.

A search's L1 norms move with its settings (a shorter search leaves the natural classes larger), so each side
is judged by a calibrated rule fitted on its own scans, exactly as :mod:`bench.verdicts` does: cross-validated
(the rule of a fold is fitted on the other folds; the folds are the same models on both sides), never on the
models it judges. One split into folds is one draw; ``--seeds`` repeats the cross-validation over that many
splits and reports the spread of detection accuracy, so a difference between the searches can be told from a
difference between splits. Beside it: queries per class (the scan's queries / classes, mean over models),
the rule each side would ship (fitted on all its models), and every model whose cross-validated verdict differs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import zoo
from bench.compare import publish
from bench.verdicts import (
    Judged,
    Model,
    _auc,
    _extra,
    _rate,
    _rule,
    attack_took,
    cross_validate,
    fit,
    folds_of,
    judge,
    load_records,
    summary,
)

SECTION = "## Two searches side by side on the same models (cross-validated)"


def scans(dirs: list[Path], best_of: bool = False) -> tuple[dict[str, Model], dict[str, float]]:
    """The B3D scans in ``dirs`` by model name (the first folder wins), and each one's queries per class. With
    ``best_of`` the folders are starts of one multi-start search: :func:`best_of_starts`."""
    if best_of:
        return best_of_starts([scans([d])[0] for d in dirs])
    models = {m.name: m for m in load_records(dirs) if m.method == "b3d"}
    return models, {n: m.queries_per_class for n, m in models.items() if m.queries_per_class is not None}


def best_of_starts(starts: list[dict[str, Model]]) -> tuple[dict[str, Model], dict[str, float]]:
    """Independent starts of the same models merged as a multi-start search reports them: each class's smallest
    L1 over the starts, the queries of all starts. Models some start lacks are left out."""
    names = set.intersection(*(set(s) for s in starts)) if starts else set()
    models, queries = {}, {}
    for n in sorted(names):
        runs = [s[n] for s in starts]
        models[n] = replace(runs[0], l1=np.min(np.stack([m.l1 for m in runs]), axis=0))
        if all(m.queries_per_class is not None for m in runs):
            queries[n] = float(sum(m.queries_per_class for m in runs))
    return models, queries


def common(a: dict[str, Model], b: dict[str, Model], min_asr: float) -> tuple[list[str], list[str]]:
    """Model names both sides scanned whose attack took, and those left out because it did not."""
    names = sorted(set(a) & set(b))
    bad = [n for n in names if not (attack_took(a[n], min_asr) and attack_took(b[n], min_asr))]
    return [n for n in names if n not in bad], bad


def judged_over_seeds(models: list[Model], folds: int, target_fpr: float,
                      seeds: int) -> tuple[list[list[Judged]], list]:
    """Per split seed, every model's cross-validated verdict; and split 0's fold rules."""
    runs = [cross_validate(models, folds, target_fpr, seed) for seed in range(seeds)]
    return [judged for judged, _ in runs], runs[0][1]


def compare(a: list[Model], b: list[Model], folds: int, target_fpr: float, seeds: int) -> dict:
    """Both sides cross-validated on the same splits: per seed, every model's verdict; and B judged by A's fold
    rules of split 0 (``b_by_a_rules``: each model by the rule fitted on A's scans of the other folds, so that with
    two seeds of one search only the search's random draw differs, not the rule)."""
    runs_a, rules_a = judged_over_seeds(a, folds, target_fpr, seeds)
    runs_b, _ = judged_over_seeds(b, folds, target_fpr, seeds)
    fold = folds_of(a, folds, 0)
    return {"a": runs_a, "b": runs_b,
            "b_by_a_rules": [judge(m, rules_a[f]) for m, f in zip(b, fold, strict=True)]}


def accuracy_spread(runs: list[list[Judged]], dataset: str | None) -> tuple[float, float, float]:
    accs = []
    for judged in runs:
        js = [j for j in judged if dataset is None or j.model.dataset == dataset]
        accs.append(sum(j.detected for j in js) / len(js))
    return float(np.mean(accs)), float(np.min(accs)), float(np.max(accs))


def mean_queries(names: list[str], per_class: dict[str, float], dataset: str | None, models: dict[str, Model]):
    q = [per_class[n] for n in names if n in per_class and (dataset is None or models[n].dataset == dataset)]
    return float(np.mean(q)) if q else None


def rows(labels: tuple[str, str], names: list[str], sides: tuple[dict, dict], queries: tuple[dict, dict],
         runs: dict, seeds: int) -> list[str]:
    head = ["dataset", "search", "models", "accuracy (CV, seed 0)", f"accuracy over {seeds} splits: mean (min-max)",
            "FPR (clean)", "TPR", "true target found", "extra flags / model", "ROC-AUC", "queries/class"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    datasets = sorted({sides[0][n].dataset for n in names}, key=lambda d: list(zoo.DATASETS).index(d))
    for ds in [*datasets, None]:
        title = zoo.DATASET_TITLES[ds] if ds else "all"
        for label, key, models, per_class in zip(labels, ("a", "b"), sides, queries, strict=True):
            s = summary([j for j in runs[key][0] if ds is None or j.model.dataset == ds])
            mean, lo, hi = accuracy_spread(runs[key], ds)
            q = mean_queries(names, per_class, ds, models)
            out.append(f"| {title} | {label} | {s['models']} ({s['clean']} clean) | {_rate(s['accuracy'])} | "
                       f"{100 * mean:.1f} % ({100 * lo:.1f}-{100 * hi:.1f}) | {_rate(s['fpr'])} | {_rate(s['tpr'])} | "
                       f"{_rate(s['target_found'])} | {_extra(s['extra'])} | {_auc(s['auc'])} | "
                       f"{'-' if q is None else f'{q:,.0f}'} |")
    return out


def differences(labels: tuple[str, str], runs: dict) -> list[str]:
    """Models whose cross-validated verdict (seed 0) differs between the searches."""
    out = []
    for ja, jb in zip(runs["a"][0], runs["b"][0], strict=True):
        if ja.flagged != jb.flagged:
            m = ja.model
            truth = f"targets {list(m.targets)}" if m.backdoored else "clean"
            out.append(f"{m.name} ({truth}): {labels[0]} {list(ja.flagged) or 'nothing'} (p {1 - ja.score:.2g}), "
                       f"{labels[1]} {list(jb.flagged) or 'nothing'} (p {1 - jb.score:.2g})")
    return out


def agreement(ja: list[Judged], jb: list[Judged]) -> tuple[int, int, int]:
    """(models, same decision: flagged or not on both sides, same flags) of two verdicts per model: with two seeds
    of one search, how often a verdict is the search's and not its random draw's."""
    pairs = list(zip(ja, jb, strict=True))
    return (len(pairs), sum(bool(a.flagged) == bool(b.flagged) for a, b in pairs),
            sum(a.flagged == b.flagged for a, b in pairs))


def report(args) -> tuple[str, dict]:
    a, qa = scans(args.a)
    b, qb = scans(args.b, args.b_best_of)
    names, left_out = common(a, b, args.min_asr)
    if not names:
        raise ValueError("the two sides have no model in common")
    labels = (args.a_name or args.a[0].as_posix(), args.b_name or args.b[0].as_posix())
    ma, mb = [a[n] for n in names], [b[n] for n in names]
    runs = compare(ma, mb, args.folds, args.target_fpr, args.seeds)
    final = (fit(ma, args.target_fpr), fit(mb, args.target_fpr))
    only = sorted(set(a) ^ set(b))
    lines = [f"{len(names)} models both searches scanned ({sum(not m.backdoored for m in ma)} clean), "
             f"{args.folds} folds, target false-positive rate {args.target_fpr:.0%}; A = {labels[0]}, "
             f"B = {labels[1]}. Cells: rate (count; 95 % Wilson interval).", ""]
    lines += rows(labels, names, (a, b), (qa, qb), runs, args.seeds)
    lines += ["", "Rules each search would ship (fitted on all its models; scale_floor, population_weight, alpha; "
              f"population median and spread of log(L1 / pixels)): A {_rule(final[0])}, B {_rule(final[1])}."]
    diff = differences(labels, runs)
    n, same_decision, same_flags = agreement(runs["a"][0], runs["b"][0])
    lines += ["", "Agreement of the cross-validated verdicts (split 0): the same decision (anything flagged or not) "
              f"on {same_decision} of {n} models, the same flagged classes on {same_flags} of {n}."]
    _, same_decision_a, same_flags_a = agreement(runs["a"][0], runs["b_by_a_rules"])
    sb = summary(runs["b_by_a_rules"])
    lines += ["", "Both judged by A's cross-validated rules (each model by the rule fitted on A's scans of the other "
              f"folds, so only the search differs): the same decision on {same_decision_a} of {n} models, the same "
              f"flagged classes on {same_flags_a} of {n}; B under them: accuracy {_rate(sb['accuracy'])}, FPR "
              f"{_rate(sb['fpr'])}, true target found {_rate(sb['target_found'])}."]
    lines += ["", "Cross-validated verdicts that differ (split 0): " + ("; ".join(diff) if diff else "none") + "."]
    if left_out:
        lines += ["", "Not counted, the attack did not take (true ASR below "
                  f"{args.min_asr:.0%} on either side): " + ", ".join(left_out) + "."]
    if only:
        lines += ["", f"Scanned by one side only (not counted): {len(only)}."]
    data = {"models": names, "labels": labels, "final_rules": [r.to_dict() for r in final],
            "queries_per_class": {"a": {n: qa.get(n) for n in names}, "b": {n: qb.get(n) for n in names}},
            "cv": {k: [summary(j) for j in runs[k]] for k in ("a", "b")}, "differences": diff,
            "same_decision": same_decision, "same_flags": same_flags,
            "a_rules": {"same_decision": same_decision_a, "same_flags": same_flags_a, "b": sb}}
    return "\n".join(lines) + "\n", data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.search_versus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", type=Path, required=True, metavar="DIR", help="scans made with search A")
    ap.add_argument("--b", nargs="+", type=Path, required=True, metavar="DIR", help="scans made with search B")
    ap.add_argument("--b-best-of", action="store_true",
                    help="--b's folders are independent starts of the same search: each class keeps its best L1")
    ap.add_argument("--a-name", help="A's name in the tables (default: its first folder)")
    ap.add_argument("--b-name", help="B's name in the tables (default: its first folder)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10, help="cross-validation splits (seeds 0..N-1)")
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--min-asr", type=float, default=0.9)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--record", action="store_true", help=f"write the tables into bench/RESULTS.md ({SECTION[3:]})")
    ap.add_argument("--section-name", metavar="TEXT",
                    help="record under the section title and ': TEXT' (comparisons do not overwrite each other)")
    ap.add_argument("--results-md", type=Path, default=zoo.ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    if args.folds < 2 or args.seeds < 1:
        print("error: --folds must be at least 2 and --seeds at least 1", file=sys.stderr)
        return 2
    try:
        text, data = report(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    section = f"{SECTION}: {args.section_name}" if args.section_name else SECTION
    publish(text, data, args, "bench.search_versus", section, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
