"""``gate scan MODEL --data FILE|DIR --out DIR``: reverse a trigger for every class, flag outliers."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from gate.commands.common import add_model_args, open_oracle, synth_config
from gate.data import fit_to_model, load_images
from gate.errors import UsageError
from gate.outliers import OutlierRule
from gate.progress import Progress
from gate.result import write_json
from gate.scan import ScanConfig, scan
from gate.search import SearchParams

EXIT = {"accept": 0, "reject": 1, "review": 2}

# The paper's settings (Dong et al. 2021): k=50, minibatch 32, Eq. 5/6 evaluated separately, no bandit.
PAPER = SearchParams(k=50, batch_size=32, eval_size=32, sigma=0.1, lr=0.05, max_steps=300, early_stop_patience=25,
                     early_stop_min_shrink=0.0, mask_init=0.0,
                     sampling="separate", antithetic=False, exact_penalty=False,
                     mask_pattern_noise=False)


def add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search (defaults are the gate's query-efficient settings)")
    g.add_argument("--paper", action="store_true", help="the paper's settings: k=50, minibatch 32, separate "
                   "mask/pattern evaluations, no antithetic samples, no bandit (about 5x the queries); "
                   "gate scan --synthetic: also Eq. 7 synthesis as written (every pixel, no occlusion, p >= 0.5)")
    g.add_argument("--k", type=int, help="search samples per step")
    g.add_argument("--batch-size", type=int, help="clean images per candidate per step")
    g.add_argument("--max-steps", type=int, help="steps per class at most")
    g.add_argument("--sigma", type=float, help="pattern noise scale")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--bandit", action=argparse.BooleanOptionalAction, default=None,
                   help="stop classes above the 60%% L1 quantile after 100 steps (off by default: it biases "
                        "the median and MAD)")
    g.add_argument("--anomaly-threshold", type=float, help="MAD anomaly index above which a class is flagged (2)")
    g.add_argument("--median-ratio", type=float, help="flag classes with L1 below this fraction of the median (0.25)")
    g.add_argument("--max-images", type=int, help="clean images used at most (1000)")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, model, data -> same report)")
    g.add_argument("--max-queries", type=int, help="hard budget of images sent to the model")
    g.add_argument("--max-seconds", type=float, help="stop searching after this many seconds")


def scan_config_from_args(args: argparse.Namespace, base: ScanConfig | None = None) -> ScanConfig:
    cfg = base or ScanConfig()
    search = PAPER if args.paper else cfg.search
    changes = {f: getattr(args, f) for f in ("k", "batch_size", "max_steps", "sigma", "lr")
               if getattr(args, f) is not None}
    try:
        search = replace(search, **changes)
        rule = OutlierRule(
            args.anomaly_threshold if args.anomaly_threshold is not None else cfg.outliers.anomaly_threshold,
            args.median_ratio if args.median_ratio is not None else cfg.outliers.median_ratio)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_queries is not None and args.max_queries < 1:
        raise UsageError("--max-queries must be positive")
    return replace(
        cfg, search=search, outliers=rule, seed=args.seed,
        bandit=False if args.paper else (cfg.bandit if args.bandit is None else args.bandit),
        max_images=args.max_images if args.max_images is not None else cfg.max_images,
        max_queries=args.max_queries if args.max_queries is not None else cfg.max_queries,
        max_seconds=args.max_seconds if args.max_seconds is not None else cfg.max_seconds,
        batch_images=max(cfg.batch_images, args.max_batch),
    )


def register(sub) -> None:
    p = sub.add_parser("scan", help="scan a model for backdoors (B3D, or B3D-SS with --synthetic)",
                       description="Reverse-engineer a trigger for every class with queries only and "
                                   "flag classes whose trigger is an outlier. Exit 0 accept, 1 reject, 2 error "
                                   "or indeterminate.")
    p.add_argument("model", help="ONNX model file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="clean images: .npz (x, optional y) or a folder of images")
    src.add_argument("--synthetic", action="store_true", help="no clean data: synthesise samples (B3D-SS)")
    p.add_argument("--synthetic-per-class", type=int, default=None, help="synthetic images per class (100)")
    p.add_argument("--seed-images", help="unlabelled images to start synthesis from instead of noise")
    p.add_argument("--synthetic-grid", type=int, default=None,
                   help="search synthetic images on a GRID x GRID grid upsampled to the model's size "
                        "(4); 0 searches every pixel as paper Eq. 7")
    p.add_argument("--out", required=True, help="output folder for report.json and triggers.npz")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_model_args(p)
    add_search_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = scan_config_from_args(args)
    oracle = open_oracle(args)
    progress = Progress(enabled=not args.quiet)
    out = Path(args.out)
    if args.synthetic:
        from gate.synth import synthesize

        scfg = synth_config(args.seed, args.synthetic_per_class, args.synthetic_grid, paper=args.paper)
        seeds = fit_to_model(load_images(args.seed_images), oracle.image_shape) if args.seed_images else None
        images, stats = synthesize(oracle, scfg, seed_images=seeds, progress=progress,
                                   max_queries=cfg.max_queries)
        left = None if cfg.max_queries is None else cfg.max_queries - stats["queries"]
        result, triggers = scan(oracle, images, replace(cfg, max_queries=left), method="b3d-ss",
                                progress=progress, synthesis=stats)
    else:
        images = fit_to_model(load_images(args.data), oracle.image_shape)
        result, triggers = scan(oracle, images, cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    # "decision" as the scan issue names it; `gate run` replaces it with the policy's decision block
    write_json(out / "report.json", {**result.to_dict(), "decision": result.verdict})
    triggers.save(out / "triggers.npz")
    print(f"{result.verdict}: flagged classes {result.flagged or 'none'} "
          f"({result.queries['total']:,} queries, {result.seconds['total']:.1f}s) -> {out / 'report.json'}")
    return EXIT[result.verdict]
