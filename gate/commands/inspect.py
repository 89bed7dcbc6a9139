"""``gate inspect MODEL [--data FILE|DIR]``: what the oracle makes of a model, its clean accuracy, and with
labelled data which input convention fits the model best (:mod:`gate.conventions`)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from gate.commands.common import add_model_args, open_oracle
from gate.conventions import MAX_IMAGES, check_convention, compare_conventions, data_stats
from gate.data import fit_to_model, load_images
from gate.pipeline import may_check_convention

MARGIN = 0.02  # a convention this much more accurate than the one in use is worth a warning


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's input/output spec, clean accuracy on --data and which input "
                                       "convention fits it")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--data", help="labelled clean images (.npz with x, y) to measure accuracy on, under the spec in "
                                  "use and under each common input convention (range, layout, mean/std)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    oracle = open_oracle(args)
    spec = oracle.spec
    info = {**oracle.describe(), "input_spec": spec.to_dict(), "providers": oracle.providers}
    extra_queries = 0
    if args.data:
        images = fit_to_model(load_images(args.data), oracle.image_shape)
        pred = oracle.predict(images.x)
        info["data"] = {"source": images.source, "images": len(images),
                        "clean_accuracy": None if images.y is None else float(np.mean(pred == images.y)),
                        "predicted_classes": int(len(np.unique(pred)))}
        if images.y is not None:
            fits = compare_conventions(oracle, images.x, images.y, data_stats(images.x))
            extra_queries = sum(min(len(images), MAX_IMAGES) for f in fits if f.accuracy is not None)
            in_use = next((f for f in fits if f.convention.same_as(spec.layout, spec.value_range, spec.mean,
                                                                    spec.std)), None)
            best = fits[0] if fits and fits[0].accuracy is not None else None
            info["conventions"] = [{"layout": f.convention.layout, "value_range": f.convention.value_range,
                                    "mean": f.convention.mean, "std": f.convention.std, "name": f.convention.name,
                                    "accuracy": f.accuracy, "note": f.note or None,
                                    "in_use": f is in_use, "best": f is best} for f in fits]
            accuracy = info["data"]["clean_accuracy"]
            if may_check_convention(oracle):  # what `gate run` would do with nothing stated (its own test)
                check = check_convention(oracle, images.x, images.y)
                extra_queries += check.queries
                info["scan_convention"] = check.to_dict()
            if best is not None and best is not in_use and best.accuracy > accuracy + MARGIN:
                info["convention_warning"] = (
                    f"the input convention in use gives {accuracy:.1%} on the labelled data, {best.convention.label} "
                    f"gives {best.accuracy:.1%}: if that is how the model was trained, pass "
                    f"{best.convention.flags()} (or set the policy's input section)")
    info["queries"] = oracle.queries + extra_queries
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['path']}  (sha256 {info['sha256'][:16]}...)")
    print(f"input        {oracle.input_name} {info['input_shape']} {spec.dtype}, layout {spec.layout}, "
          f"{spec.height}x{spec.width}x{spec.channels}, range [0,{spec.value_range:g}]"
          + (f", mean {list(spec.mean)} std {list(spec.std)}" if spec.mean else ""))
    print(f"output       {oracle.output_name}: {info['num_classes']} classes as {spec.output_kind}"
          + (f"  (detected: {', '.join(spec.detected)})" if spec.detected else ""))
    print(f"providers    {', '.join(oracle.providers)}")
    if "data" in info:
        d = info["data"]
        acc = "n/a (no labels)" if d["clean_accuracy"] is None else f"{d['clean_accuracy']:.1%}"
        print(f"clean data   {d['images']} images from {d['source']}: accuracy {acc}")
    if "conventions" in info:
        print("conventions  accuracy on the labelled data under each common input convention:")
        measured = [c for c in info["conventions"] if c["accuracy"] is not None]
        width = max((len(f"{c['layout']} {c['name']}") for c in measured), default=0)
        for c in measured:
            marks = [m for m, on in (("in use", c["in_use"]), ("best", c["best"])) if on]
            print(f"  {c['layout'] + ' ' + c['name']:<{width}}  {c['accuracy']:6.1%}"
                  + (f"  <- {', '.join(marks)}" if marks else ""))
        skipped = {c["layout"]: c["note"] for c in info["conventions"] if c["accuracy"] is None}
        for layout, note in skipped.items():
            print(f"  {layout}: not tried ({note})")
    if "scan_convention" in info:
        sc = info["scan_convention"]
        print("scan         with nothing stated, gate run/scan would "
              + (f"switch to {sc['switched_to']} (McNemar p {sc['p_value']:.1e} on {sc['images']} images)"
                 if sc["switched_to"] else f"keep {sc['in_use']}"))
    if "convention_warning" in info:
        print(f"warning: {info['convention_warning']}")
    return 0
