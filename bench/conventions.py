"""The wide zoo's export variants scanned with nothing stated: which input convention the scan ends on.

    python -m bench.conventions [--datasets gtsrb cifar] [--record] [--json FILE]

Every wide-zoo model is opened as ``gate run MODEL --data D`` opens it with no input flag (layout from the input
shape, output kind by probing), and :func:`gate.conventions.check_convention` runs on the benchmark's scan images of
its dataset (``bench.zoo.clean_data``, labelled), as the scan would. The convention the model's manifest documents
(what its vendor would state: NCHW [0,1], NHWC [0,255], or NCHW with the dataset's own mean and std, each as
probabilities or logits) is measured on the same probe images. Per documented convention: how many models the
check leaves as they are and how many it switches, how many end on the documented convention (mean and std within
0.02 of the documented ones), the accuracy they end with against the documented convention's, and how many would
still fail the default policy's clean-accuracy rule (``rules.min_clean_accuracy``: review) with the convention they
end on. The output kind as probed, against the documented one, on every model.

Nothing is scanned beyond the probe images: 100 queries a model per convention its input shape allows.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench import zoo
from bench.compare import RESULTS_MD, publish
from gate.conventions import check_convention, probe_indices
from gate.oracle import Oracle
from gate.policy import Policy
from gate.spec import SpecOverrides

SECTION = "## Input conventions with nothing stated: the wide zoo's export variants"


def documented(man: dict) -> str:
    """The manifest's convention in words, e.g. "NCHW mean/std (GTSRB)"."""
    s = man["input_spec"]
    if s.get("mean") is not None:
        return f"{s['layout']} mean/std ({zoo.DATASET_TITLES[man['dataset']]})"
    return f"{s['layout']} [0,{float(s['value_range']):g}]"


def same_convention(spec, man: dict) -> bool:
    """Whether a resolved input spec is the manifest's convention (layout, range, mean and std)."""
    s = man["input_spec"]

    def close(a, b):  # the data's own statistics stand for a vendor's training-set ones to 0.02
        return (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=0, atol=0.02))
    return (spec.layout == s["layout"] and float(spec.value_range) == float(s["value_range"])
            and close(spec.mean, s.get("mean")) and close(spec.std, s.get("std")))


def measure(man: dict, floor: float, data_cache: dict) -> dict:
    """One model: the check with nothing stated, and the documented convention on the same probe images."""
    dataset = man["dataset"]
    if dataset not in data_cache:
        data_cache[dataset] = zoo.clean_data(dataset).scan
    images = data_cache[dataset]
    oracle = Oracle(man["_onnx"], SpecOverrides(), device="cpu", calls=1, threads=1)
    check = check_convention(oracle, images.x, images.y)
    pick = probe_indices(len(images.x))
    truth = Oracle(man["_onnx"], zoo.spec_overrides(man), device="cpu", calls=1, threads=1)
    true_accuracy = float(np.mean(truth.predict(images.x[pick]) == images.y[pick]))
    if check.chosen is None:
        final, accuracy = oracle.spec, check.accuracy
    else:
        c = check.chosen
        final = SpecOverrides(layout=c.layout, value_range=c.value_range, mean=c.mean, std=c.std)
        accuracy = next(f.accuracy for f in check.fits if f.convention == c)
    return {"model": man["name"], "dataset": dataset, "documented": documented(man),
            "start": check.in_use.label, "start_accuracy": check.accuracy,
            "switched_to": check.to_dict()["switched_to"],
            "p_value": check.p_value, "final_is_documented": same_convention(final, man), "accuracy": accuracy,
            "documented_accuracy": true_accuracy, "review": accuracy < floor, "queries": check.queries,
            "output_kind": oracle.spec.output_kind, "output_kind_documented": man["input_spec"]["output_kind"]}


def table(rows: list[dict], floor: float) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["documented"]].append(r)
    queries = sorted({r["queries"] for r in rows})
    out = [f"Probe: 100 labelled images per model, {'/'.join(map(str, queries))} queries a model; review: under "
           f"rules.min_clean_accuracy {floor:g} with the convention it ends on.", "",
           "| documented convention | models | accuracy with nothing stated, before the check | left as is | "
           "switched | ends on the documented convention | accuracy it ends with | under the documented one | "
           "under the clean-accuracy floor (review) |", "|---|---|---|---|---|---|---|---|---|"]

    def span(values):
        return f"{min(values):.2f}-{max(values):.2f}"
    for name in sorted(groups):
        g = groups[name]
        switched = [r for r in g if r["switched_to"]]
        targets = sorted({r["switched_to"] for r in switched})
        out.append(f"| {name} | {len(g)} | {span([r['start_accuracy'] for r in g])} | {len(g) - len(switched)} | "
                   f"{len(switched)}{' (to ' + ', '.join(targets) + ')' if targets else ''} | "
                   f"{sum(r['final_is_documented'] for r in g)} | {span([r['accuracy'] for r in g])} | "
                   f"{span([r['documented_accuracy'] for r in g])} | {sum(r['review'] for r in g)} |")
    kinds = sum(r["output_kind"] == r["output_kind_documented"] for r in rows)
    out += ["", f"Output kind (probabilities or logits) as probed: {kinds} of {len(rows)} as documented."]
    wrong = [r for r in rows if r["switched_to"] and not r["final_is_documented"]]
    if wrong:
        out += ["", "Switched to a convention other than the documented one: " + "; ".join(
            f"{r['model']} ({r['documented']} -> {r['switched_to']}: {r['accuracy']:.2f} against "
            f"{r['documented_accuracy']:.2f})" for r in wrong) + "."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.conventions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", choices=zoo.DATASETS, default=list(zoo.DATASETS))
    ap.add_argument("--models", nargs="+", metavar="NAME", help="wide-zoo model names (default: every built one)")
    ap.add_argument("--zoo-dir", type=Path, default=zoo.WIDE_ZOO_DIR)
    ap.add_argument("--json", type=Path, help="write every model's row here")
    ap.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md ({SECTION})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    names = args.models or zoo.wide_names(args.datasets)
    found, missing = zoo.available(names, args.zoo_dir)
    if not found:
        ap.error(f"none of the models are in {args.zoo_dir} (python -m models.forge --wide-zoo builds them)")
    floor = Policy().rules.min_clean_accuracy
    cache: dict = {}
    rows = [measure(zoo.load_manifest(zoo.manifest_path(n, args.zoo_dir)), floor, cache) for n in found]
    text = table(rows, floor)
    if missing:
        text += f"\n\nNot built, skipped: {', '.join(missing)}."
    publish(text, rows, args, "bench.conventions", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
