"""``gate synth MODEL --out FILE.npz``: synthesise clean-looking images per class (B3D-SS) for reuse."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gate.commands.common import add_model_args, open_oracle, synth_config
from gate.data import fit_to_model, load_images
from gate.progress import Progress
from gate.synth import synthesize


def register(sub) -> None:
    p = sub.add_parser("synth", help="synthesise images per class from the model itself (B3D-SS)")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--out", required=True, help="output .npz (x float32 NHWC in [0,1], y the intended classes)")
    p.add_argument("--per-class", type=int, help="images per class (100)")
    p.add_argument("--seed-images", help="unlabelled images to start from instead of uniform noise")
    p.add_argument("--grid", type=int, help="search a GRID x GRID image upsampled to the model's size (4); "
                   "0 searches every pixel as paper Eq. 7")
    p.add_argument("--paper", action="store_true", help="paper Eq. 7 as written: every pixel, no occlusion, "
                   "stop at p(c | x) >= 0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-queries", type=int, help="hard budget of images sent to the model")
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = synth_config(args.seed, args.per_class, args.grid, paper=args.paper)
    oracle = open_oracle(args)
    seeds = fit_to_model(load_images(args.seed_images), oracle.image_shape) if args.seed_images else None
    images, stats = synthesize(oracle, cfg, seed_images=seeds, progress=Progress(enabled=not args.quiet),
                               max_queries=args.max_queries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(oracle.num_classes), cfg.per_class)
    np.savez_compressed(out, x=images.x, y=labels)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{len(images)} synthetic images, {stats['success_rate']:.0%} assigned to their class, "
          f"{stats['queries']:,} queries -> {out}")
    return 0
