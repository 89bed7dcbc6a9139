"""``gate inspect MODEL [--data FILE|DIR]``: what the oracle makes of a model, and its clean accuracy."""

from __future__ import annotations

import argparse
import json

import numpy as np

from gate.commands.common import add_model_args, open_oracle
from gate.data import fit_to_model, load_images


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's input/output spec (and clean accuracy on --data)")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--data", help="labelled clean images (.npz with x, y) to measure accuracy on")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    oracle = open_oracle(args)
    info = {**oracle.describe(), "input_spec": oracle.spec.to_dict(), "providers": oracle.providers}
    if args.data:
        images = fit_to_model(load_images(args.data), oracle.image_shape)
        pred = oracle.predict(images.x)
        info["data"] = {"source": images.source, "images": len(images),
                        "clean_accuracy": None if images.y is None else float(np.mean(pred == images.y)),
                        "predicted_classes": int(len(np.unique(pred)))}
    info["queries"] = oracle.queries
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    spec = oracle.spec
    print(f"model        {info['path']}  (sha256 {info['sha256'][:16]}...)")
    print(f"input        {oracle.input_name} {info['input_shape']} {spec.dtype}, layout {spec.layout}, "
          f"range [0,{spec.value_range:g}]" + (f", mean {list(spec.mean)} std {list(spec.std)}" if spec.mean else ""))
    print(f"output       {info['num_classes']} classes as {spec.output_kind}"
          + (f"  (detected: {', '.join(spec.detected)})" if spec.detected else ""))
    print(f"providers    {', '.join(oracle.providers)}")
    if "data" in info:
        d = info["data"]
        acc = "n/a (no labels)" if d["clean_accuracy"] is None else f"{d['clean_accuracy']:.1%}"
        print(f"clean data   {d['images']} images from {d['source']}: accuracy {acc}")
    return 0
