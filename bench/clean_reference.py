"""The clean reference the gate compares each model's p-value with (``gate.reference``), from traced zoo scans.

    python -m bench.clean_reference --records bench/screen_replay/traces [--out gate/policies/clean_reference.json]

Each clean counted model's model p-value under the rule of its cross-validation fold (``bench.verdicts``: the same
folds, target false-positive rate and seed as the verdict tables), so under a rule not fitted on it; the rule the
reference is for is the one fitted on all the models, which is what the default policy ships, its population to two
decimals (the command fails if it is not: refit the default first). The traces' search fingerprint (every one must
agree) and the models' pixel count go into the file, so the gate compares only scans made like these.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.verdicts import attack_took, cross_validate, fit, folds_of, load_records
from bench.zoo import DATASET_TITLES
from gate.outliers import OutlierRule, find_outliers
from gate.reference import P_VALUE_FIELDS, REFERENCE_FILE, UNCOMPARED_SEARCH


def _same(fitted, shipped) -> bool:
    """A fitted rule field against the default's (the policy writes the population to two decimals)."""
    if isinstance(fitted, float) and isinstance(shipped, float):
        return abs(fitted - shipped) <= 0.005
    return fitted == shipped


def trace_searches(dirs: list[Path], names: set[str]) -> list[dict]:
    """The search fingerprint of every trace in ``dirs`` of the models ``names`` (compared fields only)."""
    out = []
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            doc = json.loads(path.read_text())
            if isinstance(doc.get("trace"), dict) and doc["trace"]["model"] in names:
                out.append({k: v for k, v in doc["fingerprint"]["scan"].items() if k not in UNCOMPARED_SEARCH})
    return out


def build(dirs: list[Path], folds: int, target_fpr: float, min_asr: float, seed: int) -> dict:
    models = [m for m in load_records(dirs) if m.method == "b3d" and attack_took(m, min_asr)]
    clean = [i for i, m in enumerate(models) if not m.backdoored]
    if len(clean) < 10:
        raise ValueError(f"{len(clean)} clean B3D scans: a reference needs at least 10")
    shipped, final = OutlierRule(), fit(models, target_fpr)
    if any(not _same(getattr(final, k), getattr(shipped, k)) for k in P_VALUE_FIELDS):
        raise ValueError(f"the rule fitted on these scans ({final}) is not the default rule ({shipped}): refit the "
                         "default (python -m bench.verdicts) before making its reference")
    searches = trace_searches(dirs, {models[i].name for i in clean})
    if len(searches) != len(clean) or any(s != searches[0] for s in searches):
        raise ValueError("the clean models' scans must all be traces made with one search")
    pixels = {models[i].pixels for i in clean}
    if len(pixels) != 1:
        raise ValueError(f"the clean models' inputs differ in size ({sorted(pixels)} pixels)")
    fold = folds_of(models, folds, seed)
    _, rules = cross_validate(models, folds, target_fpr, seed)
    log10_p = [math.log10(max(find_outliers(models[i].l1, rules[fold[i]], pixels=models[i].pixels).model_p_value,
                              1e-300)) for i in clean]
    datasets = sorted({DATASET_TITLES.get(models[i].dataset, models[i].dataset) for i in clean})
    archs = sorted({models[i].arch for i in clean})
    side = round(math.sqrt(pixels.pop()))
    return {"description": f"clean wide-zoo models ({', '.join(datasets)}; {len(archs)} architectures; {side}x{side}; "
                           "each judged by a cross-validated rule not fitted on it)",
            "log10_p": [round(v, 4) for v in log10_p], "models": [models[i].name for i in clean],
            "rule": {k: getattr(shipped, k) for k in P_VALUE_FIELDS}, "search": searches[0], "pixels": side * side,
            "made_by": f"python -m bench.clean_reference --records {' '.join(map(str, dirs))} --folds {folds} "
                       f"--target-fpr {target_fpr} --min-asr {min_asr} --seed {seed}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.clean_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", nargs="+", type=Path, required=True, help="bench.screen_replay trace folders")
    ap.add_argument("--out", type=Path, default=REFERENCE_FILE)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--min-asr", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        doc = build(args.records, args.folds, args.target_fpr, args.min_asr, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    low, high = min(doc["log10_p"]), max(doc["log10_p"])
    print(f"{len(doc['log10_p'])} {doc['description']}: log10 p from {low:.2f} to {high:.2f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
