"""Does the verdict depend on how many classes a model has? The cross-validated rule on models with classes left out.

    python -m bench.class_count --records bench/screen_replay/traces bench/wide/compare \\
        [--classes 43 20 10 5] [--draws 20] [--record]

The outlier rule (``gate.outliers``) claims one cut means one per-model false-positive rate whether a model has 10
classes or 1000 (Šidák-corrected p-values), and GTSRB (43 classes) comes out better than CIFAR-10 (10 classes) on
the wide zoo. Two readings: the 10-class models are weaker models whose natural triggers are smaller, or ten classes
give the within-model test (a leave-one-out median and MAD of the other classes) too little to stand on. This
separates them on the recorded scans: each model is judged with only K of its classes, drawn at random (a backdoored
model keeps every true target), by the rule of its cross-validation fold (``bench.verdicts.cross_validate``: fitted on
the other folds' models with all their classes, as the shipped rule is fitted). Each class's search runs on its own
(no bandit), so a class's L1 does not depend on which other classes are judged with it; what changes with K is only
what the rule sees.

Rows: per dataset and K, the mean rate over ``--draws`` draws of the classes (range over the draws); K equal to the
model's own class count is one draw, the cross-validated figure of ``bench.verdicts``. The same with the within-model
test alone (``population_weight`` 0, fitted the same way), whose reference is the only part that changes with K.

A second table takes the other reading head on: on the clean models of each dataset, the manifests' clean accuracy
against the smallest natural class's L1 over the model's median L1, as a Spearman rank correlation. If weaker
models had relatively smaller natural triggers, it would be positive (higher accuracy, larger ratio).

Nothing is scanned: every rule is re-applied to the recorded L1 norms.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import zoo
from bench.compare import RESULTS_MD, publish
from bench.population_transfer import RATES, mean_and_range
from bench.population_transfer import rates as headline_rates
from bench.verdicts import Judged, Model, attack_took, cross_validate, folds_of, judge, load_records, summary
from bench.zoo import DATASET_TITLES, WIDE_ZOO_DIR

SECTION = "## The verdict and the number of classes: the cross-validated rule on models with classes left out"
RULES = (("calibrated", None), ("within-model only", (0.0,)))


def keep_classes(m: Model, k: int, rng: np.random.Generator) -> Model:
    """``m`` as a model of ``k`` of its classes: every true target and ``k`` - targets others drawn by ``rng``,
    in their original order; the targets renumbered to their places among the kept classes."""
    n = len(m.l1)
    if k >= n:
        return m
    if k < len(m.targets) + 2:
        raise ValueError(f"{m.name}: cannot keep {k} classes with {len(m.targets)} targets and two others")
    others = [c for c in range(n) if c not in m.targets]
    kept = sorted(set(m.targets) | set(rng.choice(others, k - len(m.targets), replace=False).tolist()))
    return replace(m, l1=m.l1[kept], targets=tuple(kept.index(t) for t in m.targets))


def rates(judged: list[Judged]) -> dict[str, float | None]:
    """``bench.population_transfer.rates`` (the headline rates), and extra flags per model and the ROC-AUC."""
    s = summary(judged)
    return {**headline_rates(judged), "extra": s["extra"][0] / s["models"] if s["models"] else None,
            "auc": None if s["auc"] is None else s["auc"][0]}


def judged_with_classes(models: list[Model], rule_of: list, k: int, draws: int, seed: int) -> list[dict]:
    """Per draw, the rates of every model judged by its own fold's rule (``rule_of[i]``) on ``k`` of its classes."""
    rng = np.random.default_rng(seed)
    n_draws = draws if any(len(m.l1) > k for m in models) else 1
    return [rates([judge(keep_classes(m, k, rng), rule) for m, rule in zip(models, rule_of, strict=True)])
            for _ in range(n_draws)]


def _spread(values: list[float | None], percent: bool = True) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if not percent:
        return f"{np.mean(v):.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ({min(v):.2f}-{max(v):.2f})"
    return f"{100 * v[0]:.1f} %" if len(v) == 1 else mean_and_range(v)


def report(models: list[Model], class_counts: list[int], draws: int, folds: int, target_fpr: float,
           seed: int) -> tuple[str, dict]:
    """The table, and per (rule, dataset, K) the rates of every draw."""
    fold = folds_of(models, folds, seed)
    data: dict = {}
    lines = [f"{len(models)} models (attacks that did not take not counted), {folds}-fold cross-validation as in "
             "bench.verdicts; each model judged by its fold's rule with K of its classes (every true target kept). "
             f"Mean over {draws} random draws of the classes (range over the draws); a model's own class count: one "
             "draw.", "",
             "| rule | dataset | classes K | models (clean) | accuracy | FPR (clean) | TPR | true target found "
             "| extra flags / model | ROC-AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, weights in RULES:
        _, rules = cross_validate(models, folds, target_fpr, seed, **({"weights": weights} if weights else {}))
        for dataset in sorted({m.dataset for m in models}):
            idx = [i for i, m in enumerate(models) if m.dataset == dataset]
            ms = [models[i] for i in idx]
            native = max(len(m.l1) for m in ms)
            for k in sorted({min(k, native) for k in class_counts}, reverse=True):
                runs = judged_with_classes(ms, [rules[fold[i]] for i in idx], k, draws, seed)
                data.setdefault(name, {}).setdefault(dataset, {})[str(k)] = runs
                clean = sum(not m.backdoored for m in ms)
                lines.append(f"| {name} | {DATASET_TITLES.get(dataset, dataset)} | {k}"
                             f"{' (all)' if k == native else ''} | {len(ms)} ({clean}) | "
                             + " | ".join(_spread([r[key] for r in runs]) for key in RATES)
                             + f" | {_spread([r['extra'] for r in runs], percent=False)}"
                             f" | {_spread([r['auc'] for r in runs], percent=False)} |")
    return "\n".join(lines), data


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: measured accuracies and L1 norms)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(v, float))).astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def accuracy_rows(models: list[Model], zoo_dir: Path) -> tuple[list[str], dict]:
    """Per dataset, over its clean models with a manifest: the clean accuracy's median and range, the smallest
    natural class's L1 over the model's median L1 (median and range), and the rank correlation of the two."""
    lines = ["| dataset | clean models | clean accuracy, median (range) | smallest class / median L1, median (range) "
             "| Spearman (accuracy, ratio) |", "|---|---|---|---|---|"]
    data: dict = {}
    for dataset in sorted({m.dataset for m in models}):
        acc, ratio = [], []
        for m in models:
            path = zoo.manifest_path(m.name, zoo_dir)
            if m.dataset != dataset or m.backdoored or not path.exists():
                continue
            acc.append(float(json.loads(path.read_text())["clean_accuracy"]))
            ratio.append(float(np.min(m.l1) / np.median(m.l1)))
        if len(acc) < 3:
            continue
        rho = spearman(acc, ratio)
        data[dataset] = {"accuracy": acc, "ratio": ratio, "spearman": rho}
        lines.append(f"| {DATASET_TITLES.get(dataset, dataset)} | {len(acc)} | {np.median(acc):.2f} "
                     f"({min(acc):.2f}-{max(acc):.2f}) | {np.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) "
                     f"| {rho:+.2f} |")
    return lines, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.class_count", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", nargs="+", type=Path, required=True)
    ap.add_argument("--method", default="b3d", choices=["nc", "b3d", "b3d-ss"])
    ap.add_argument("--classes", nargs="+", type=int, default=[43, 20, 10, 5], help="class counts K to judge at")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--min-asr", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo-dir", type=Path, default=WIDE_ZOO_DIR, help="the models' manifests (clean accuracy)")
    ap.add_argument("--json", type=Path, help="write every draw's rates here")
    ap.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md ({SECTION})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    if args.draws < 1 or args.folds < 2 or min(args.classes) < 5:
        ap.error("--draws must be at least 1, --folds at least 2, every --classes at least 5")
    models = [m for m in load_records(args.records) if m.method == args.method and attack_took(m, args.min_asr)]
    if not models:
        ap.error(f"no {args.method} records in {' '.join(map(str, args.records))}")
    text, data = report(models, args.classes, args.draws, args.folds, args.target_fpr, args.seed)
    rows, data["accuracy"] = accuracy_rows(models, args.zoo_dir)
    if data["accuracy"]:
        text += "\n\nClean models: clean accuracy (manifest) and the smallest natural class.\n\n" + "\n".join(rows)
    publish(text, data, args, "bench.class_count", SECTION, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
