"""A rule fitted on one dataset's models, used on another's: as it is, within-model only, or with its population
refitted on a few clean models of the new kind (the policy's advice for models unlike the wide zoo's).

    python -m bench.population_transfer --records bench/screen_replay/traces bench/wide/compare \\
        [--method b3d] [--clean-models 3 5 10] [--draws 50] [--record]

The shipped outlier rule is fitted on the wide zoo's GTSRB and CIFAR-10 models together. A buyer's models are of
another kind; the advice the policy file gave was to refit the population test on clean models of that kind or
to switch it off (``population_weight: 0``). This measures both on the wide zoo's
own records, one dataset standing in for "the buyer's kind": the rule is fitted (``bench.verdicts.fit``: population,
scale floor, weight, alpha for a 3 % false-positive rate) on the *source* dataset's models only, then judges the
*target* dataset's models:

* as it is (the source population);
* within-model only (``population_weight`` 0, the rest of the rule as fitted);
* with the population (median and spread, or the median only) refitted on n clean target models drawn at random
  (``--clean-models``), judging the other target models (never the n), over ``--draws`` draws: mean rates and
  their range over the draws;
* for reference, the target's own cross-validated rule (``bench.verdicts.cross_validate`` on its models alone).

Nothing is scanned: every rule is re-applied to the recorded L1 norms (as ``bench.verdicts`` does).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.compare import RESULTS_MD, publish
from bench.verdicts import Judged, Model, attack_took, cross_validate, fit, judge, load_records, summary
from bench.zoo import DATASET_TITLES
from gate.outliers import OutlierRule, population_fit

SECTION = "## The rule on another kind of model: population refitted on a few clean ones"
DIRECTIONS = (("gtsrb", "cifar"), ("cifar", "gtsrb"))
RATES = ("accuracy", "fpr", "tpr", "target_found")


def refit_population(rule: OutlierRule, clean: list[Model], scale_too: bool = True) -> OutlierRule:
    """``rule`` with its population test's median (and with ``scale_too`` its spread) fitted on ``clean``."""
    mean, scale = population_fit([(m.l1, m.pixels) for m in clean])
    return replace(rule, population_mean=mean, population_scale=max(scale, 1e-3) if scale_too else
                   rule.population_scale)


def rates(judged: list[Judged]) -> dict[str, float | None]:
    s = summary(judged)
    return {key: (s[key][0] / s[key][1] if s[key][1] else None) for key in RATES}


def draws(rule: OutlierRule, target: list[Model], n_clean: int, n_draws: int, seed: int,
          scale_too: bool = True) -> dict:
    """Rates of ``rule`` with its population refitted on n clean target models, on the other target models."""
    rng = np.random.default_rng(seed)
    clean = [i for i, m in enumerate(target) if not m.backdoored]
    runs = []
    for _ in range(n_draws):
        chosen = set(rng.choice(clean, n_clean, replace=False).tolist())
        refitted = refit_population(rule, [target[i] for i in chosen], scale_too)
        runs.append(rates([judge(m, refitted) for i, m in enumerate(target) if i not in chosen]))
    return {key: [r[key] for r in runs] for key in runs[0]}


def _count(k: int, n: int) -> str:
    return f"{100 * k / n:.1f} % ({k}/{n})" if n else "-"


def _fixed(name: str, judged: list[Judged], rows: dict) -> str:
    """The table row of a rule judged once; its rates into ``rows``."""
    s = summary(judged)
    rows[name] = {key: s[key][0] / s[key][1] if s[key][1] else None for key in RATES}
    return (f"| {name} | {s['models']} ({s['clean']} clean) | " + " | ".join(_count(*s[key]) for key in RATES)
            + " |")


def mean_and_range(values: list[float]) -> str:
    """The mean rate and its range over draws, in percent: "85.7 % (81-90)"."""
    return f"{100 * np.mean(values):.1f} % ({100 * min(values):.0f}-{100 * max(values):.0f})"


def report(models: list[Model], clean_counts: list[int], n_draws: int, target_fpr: float,
           seed: int) -> tuple[str, dict]:
    """The tables, and per direction the rule fitted on the source and every row's (mean) rates."""
    data: dict = {}
    lines = [f"{len(models)} models (attacks that did not take not counted). Fixed rows: rate (count); rows with "
             f"the population refitted: the mean over {n_draws} random draws of the n clean models (range over the "
             "draws), judged on the target's other models.", ""]
    for source, target in DIRECTIONS:
        src = [m for m in models if m.dataset == source]
        tgt = [m for m in models if m.dataset == target]
        if not src or not tgt or sum(not m.backdoored for m in tgt) <= max(clean_counts, default=0):
            continue
        rule = fit(src, target_fpr)
        name_s, name_t = DATASET_TITLES[source], DATASET_TITLES[target]
        n_clean = sum(not m.backdoored for m in tgt)
        rows: dict = {}
        data[f"{source}->{target}"] = {"rule": rule.to_dict(), "rows": rows}
        lines += [f"### Fitted on {name_s} ({len(src)} models), judging {name_t}", "",
                  f"Rule fitted on {name_s}: scale_floor {rule.scale_floor:g}, population_weight "
                  f"{rule.population_weight:g}, alpha {rule.alpha:.2g}, population {rule.population_mean:.2f} / "
                  f"{rule.population_scale:.2f}.", "",
                  "| rule | models | accuracy | FPR (clean) | TPR | true target found |", "|---|---|---|---|---|---|",
                  _fixed(f"{name_s} rule as it is", [judge(m, rule) for m in tgt], rows),
                  _fixed(f"{name_s} rule, within-model only (population_weight 0)",
                         [judge(m, replace(rule, population_weight=0.0)) for m in tgt], rows)]
        for scale_too in (True, False):
            what = "population" if scale_too else "population median only"
            for n in clean_counts:
                d = draws(rule, tgt, n, n_draws, seed, scale_too)
                name = f"{name_s} rule, {what} refitted on {n} clean {name_t} models"
                rows[name] = {key: float(np.mean(d[key])) for key in RATES}
                lines.append(f"| {name} | {len(tgt) - n} ({n_clean - n} clean) | "
                             + " | ".join(mean_and_range(d[key]) for key in RATES) + " |")
        own, _ = cross_validate(tgt, 5, target_fpr, seed)
        lines += [_fixed(f"{name_t}'s own rule (cross-validated on {name_t} alone, 5 folds)", own, rows), ""]
    return "\n".join(lines).rstrip(), data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.population_transfer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", nargs="+", type=Path, required=True)
    ap.add_argument("--method", default="b3d", choices=["nc", "b3d", "b3d-ss"])
    ap.add_argument("--clean-models", nargs="+", type=int, default=[3, 5, 10])
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--min-asr", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the fitted rules and every row's rates here")
    ap.add_argument("--record", action="store_true", help=f"write the tables into bench/RESULTS.md ({SECTION})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    if min(args.clean_models) < 1 or args.draws < 1:
        ap.error("--clean-models and --draws must be at least 1")
    models = [m for m in load_records(args.records) if m.method == args.method and attack_took(m, args.min_asr)]
    if not models:
        ap.error(f"no {args.method} records in {' '.join(map(str, args.records))}")
    text, data = report(models, args.clean_models, args.draws, args.target_fpr, args.seed)
    publish(text, data, args, "bench.population_transfer", SECTION, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
