"""``gate calibrate --model M --report R --data CLEAN --out calibration.json``: set the shield's tau.

tau is the --target-frr quantile of S(x) on the clean images, so at most that fraction of them would be
refused (S < tau). The file records n, the target, the rate reached, the time, and the sha256 of the
triggers and the model it holds for; `gate proxy --calibration` refuses it for other triggers.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from gate.calibrate import calibrate
from gate.commands.common import add_model_args, as_scanned, open_oracle, spec_from_args
from gate.data import fit_to_model, load_images
from gate.errors import UsageError
from gate.shield import Shield, load_scan_triggers


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="set the runtime shield's threshold from clean data",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="ONNX model file")
    p.add_argument("--report", required=True, help="report.json of a gate scan of this model")
    p.add_argument("--triggers", help="triggers.npz of the scan (default: beside the report)")
    p.add_argument("--data", required=True, help="clean images: .npz (x, optional y) or a folder")
    p.add_argument("--target-frr", type=float, default=0.01,
                   help="false-rejection rate to allow on clean inputs (default 0.01)")
    p.add_argument("--max-images", type=int, help="use at most this many images (random, by --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed for --max-images sampling")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    add_model_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.target_frr < 1.0:
        raise UsageError(f"--target-frr must lie in [0, 1), got {args.target_frr}")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError("--max-images must be at least 1")
    oracle = open_oracle(args)
    st = load_scan_triggers(args.report, args.triggers, model_sha256=oracle.sha256, allow_unverified=True,
                            warn=lambda text: print(f"gate calibrate: {text}", file=sys.stderr, flush=True))
    oracle = as_scanned(oracle, st.report.get("input_spec"), spec_from_args(args), args.report)
    images = fit_to_model(load_images(args.data), oracle.image_shape)
    x = images.x
    if args.max_images is not None and args.max_images < len(x):
        idx = np.sort(np.random.default_rng(args.seed).choice(len(x), args.max_images, replace=False))
        x = x[idx]
    shield = Shield(st.triggers, oracle.spec)
    cal, scores = calibrate(shield, oracle, x, args.target_frr, triggers_sha256=st.triggers_sha256,
                            data=images.source)
    cal.save(args.out)
    if cal.threshold is None:
        print(f"{args.report} flags no class: nothing to calibrate (the proxy passes everything) -> {args.out}")
    else:
        refused = int(np.sum(scores < cal.threshold))
        print(f"tau = {cal.threshold:.6g}: {refused} of {cal.n} clean images below it "
              f"({cal.achieved_frr:.2%}, target {cal.target_frr:.2%}); triggers of classes {cal.flagged} "
              f"-> {args.out}")
    return 0
