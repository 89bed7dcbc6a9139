"""``gate synth MODEL --out FILE.npz``: synthesise clean-looking images per class (B3D-SS) for reuse."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gate.commands.common import add_policy_args, add_runtime_args, open_oracle, policy_from_args
from gate.pipeline import synthesize_data
from gate.progress import Progress

# the policy settings synthesis uses: where its images start, its own section, its seed, its budget, the input spec
SECTIONS = ("data.synthetic_per_class", "data.synthetic_grid", "data.seed_images", "input", "synthesis",
            "search.seed", "budget.max_queries")


def register(sub) -> None:
    p = sub.add_parser("synth", help="synthesise images per class from the model itself (B3D-SS)")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--out", required=True, help="output .npz (x float32 NHWC in [0,1], y the intended classes)")
    p.add_argument("--policy", help="policy YAML whose data/synthesis sections to use (default: built-in defaults)")
    p.add_argument("--quiet", action="store_true")
    add_policy_args(p, SECTIONS, aliases={"data.synthetic_per_class": ["--per-class"],
                                          "data.synthetic_grid": ["--grid"]})
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    policy, _ = policy_from_args(args, sections=SECTIONS)
    oracle = open_oracle(args, policy.spec_overrides())
    images, stats = synthesize_data(policy, oracle, Progress(enabled=not args.quiet))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(oracle.num_classes), policy.data.synthetic_per_class)
    np.savez_compressed(out, x=images.x, y=labels)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{len(images)} synthetic images, {stats['success_rate']:.0%} assigned to their class, "
          f"{stats['queries']:,} queries -> {out}")
    return 0
