"""One class of one zoo model searched with several seeds: how often the search finds the planted trigger.

    python -m bench.class_seeds MODEL [--class C] [--seeds 10] [--zoo-dir models/wide_zoo] [--set FIELD=VALUE ...]

A missed backdoor is often one draw of a random search (bench/RESULTS.md, "two search seeds"). This runs the
scan's own search for one class (default: the model's first true target) with seeds 0..n-1, each exactly as a
whole scan with that seed would search that class (``gate.scan.ScanEngine`` with ``labels``: the same data split
and the class's own random stream), on the benchmark's clean images, and prints per seed the final L1, the steps,
the status, and how much of the reversed mask lies on the planted patch (its mass inside the patch's square over
its whole mass), so "found a small trigger" and "found the planted one" are told apart. ``--set`` changes a policy
field for the run (as ``bench.screen_replay --set``). Nothing is recorded: the table and the command go to stdout.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from bench import zoo
from bench.screen_replay import parse_changes
from gate.errors import GateError
from gate.policy import Policy
from gate.scan import ClassOutcome, ScanEngine


def patch_square(man: dict, target: int) -> tuple[slice, slice] | None:
    """Rows and columns of the planted patch for ``target`` (None: no patch trigger for it)."""
    for t in man.get("triggers", []):
        if t.get("kind") == "patch" and int(t["target"]) == target:
            row, col, size = int(t["row"]), int(t["col"]), int(t["size"])
            return slice(row, row + size), slice(col, col + size)
    return None


def search_class(oracle, images, policy: Policy, label: int, seed: int) -> ClassOutcome:
    """The class's outcome in a scan with ``seed``."""
    cfg = replace(policy.scan_config(), seed=seed)
    engine = ScanEngine(oracle, images, cfg, labels=[label])
    engine.run_rounds()
    return engine.outcomes()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.class_seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="zoo model name (its manifest and ONNX file in --zoo-dir)")
    ap.add_argument("--class", dest="label", type=int, help="the class to search (default: the first true target)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--zoo-dir", type=Path, default=zoo.WIDE_ZOO_DIR)
    ap.add_argument("--datasets-dir", type=Path, default=zoo.DATASETS_DIR)
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="changes", action="append", default=[], metavar="FIELD=VALUE")
    args = ap.parse_args(argv)
    path = zoo.manifest_path(args.model, args.zoo_dir)
    if not path.is_file():
        print(f"error: no manifest {path}", file=sys.stderr)
        return 2
    man = zoo.load_manifest(path)
    targets = [int(t["target"]) for t in man.get("triggers", [])]
    label = args.label if args.label is not None else (targets[0] if targets else None)
    if label is None or not 0 <= label < int(man["num_classes"]):
        print("error: give --class (a clean model has no true target)", file=sys.stderr)
        return 2
    try:
        policy = Policy().override(parse_changes(args.changes))
    except (ValueError, GateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = zoo.clean_data(man["dataset"], args.max_images, 200, 0, args.datasets_dir, manifest=man)
    oracle = zoo.open_oracle(man, threads=args.threads)
    square = patch_square(man, label)
    print(f"{args.model}, class {label}{' (a true target)' if label in targets else ''}: "
          f"python -m bench.class_seeds {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| seed | L1 | steps | status | mask mass on the planted patch |\n|---|---|---|---|---|")
    small = on_patch = 0
    for seed in range(args.seeds):
        o = search_class(oracle, data.scan, policy, label, seed)
        mass = float(o.mask.sum())
        share = None if square is None or mass == 0 else float(o.mask[square].sum()) / mass
        on_patch += share is not None and share >= 0.5
        small += o.result.l1 < 0.1 * o.mask.size
        print(f"| {seed} | {o.result.l1:.1f} | {o.result.steps} | {o.result.status} | "
              f"{'-' if share is None else f'{share:.0%}'} |", flush=True)
    print(f"\n{small} of {args.seeds} seeds end under 10 % of the image"
          + ("." if square is None else f"; {on_patch} with at least half of the mask on the planted patch."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
