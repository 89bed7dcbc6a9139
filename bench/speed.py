"""Scan speed micro-benchmark: how close the B3D scan gets to onnxruntime's own throughput.

    python -m bench.speed                                  # demo backdoored model, 20 steps per class
    python -m bench.speed --model gtsrb_blended --steps 40 --threads 2 --out bench/out

1. ORT alone: ``InferenceSession.run`` on model-encoded batches of ``--batch`` images (images / s), one call
   with onnxruntime's own threads.
2. A B3D scan with the default search settings cut to ``--steps`` steps per class (bandit off, so every
   class runs every step): queries / s, the fraction of wall time inside onnxruntime (``ort_fraction``) and
   the gate's own overhead per query (sampling, stamping, estimates) in microseconds; side by side for two
   oracle set-ups: one model call parallel inside (onnxruntime's threads), and one single-thread call per core
   (the gate's default, :class:`gate.oracle.Oracle` ``calls``). A 2-step scan of each runs first, uncounted
   (the first scan of a process also loads numba's cached kernels and warms onnxruntime: measured 3-5 % slower
   than the same scan run second); then ``--pairs`` scans of each in turn, medians reported.
``--model`` is a zoo model name (models/zoo) or an ONNX path with a manifest beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import zoo
from gate.oracle import host_cores
from gate.result import write_json
from gate.scan import ScanConfig, scan


def ort_throughput(oracle, batch: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = oracle.encode(rng.random((batch, *oracle.image_shape), dtype=np.float32))
    oracle.session.run([oracle.output_name], {oracle.input_name: x})  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        oracle.session.run([oracle.output_name], {oracle.input_name: x})
        times.append(time.perf_counter() - t0)
    best, med = min(times), float(np.median(times))
    return {"batch": batch, "repeats": repeats, "images_per_s_best": batch / best, "images_per_s_median": batch / med}


def scan_speed(oracle, images, steps: int, seed: int = 0) -> dict:
    base = ScanConfig(seed=seed)
    cfg = replace(base, search=replace(base.search, max_steps=steps), bandit=False)
    res = scan(oracle, images, cfg).result
    q, s = res.queries["total"], res.seconds
    non_ort = s["scan"] - s["ort"]
    return {"steps": steps, "classes": len(res.classes), "queries": q, "seconds": s["scan"], "ort_seconds": s["ort"],
            "ort_fraction": s["ort_fraction"], "queries_per_s": q / s["scan"],
            "overhead_us_per_query": 1e6 * non_ort / q, "l1": [c.l1 for c in res.classes]}


def side_by_side(oracles: dict, images, steps: int, pairs: int) -> dict:
    """Each oracle's scan, after a warm-up scan each, ``pairs`` times in turn (A B A B ...): the machine's drift
    falls on both alike. Per oracle: every run and the median queries/s. The L1s must agree."""
    for oracle in oracles.values():
        scan_speed(oracle, images, 2)  # warm-up: numba's cached kernels, onnxruntime's first runs
    runs: dict = {name: [] for name in oracles}
    for _ in range(pairs):
        for name, oracle in oracles.items():
            runs[name].append(scan_speed(oracle, images, steps))
    l1s = {tuple(r["l1"]) for rs in runs.values() for r in rs}
    if len(l1s) != 1:
        raise SystemExit("error: the scans gave different L1 norms: the oracle set-up moved the results")
    return {name: {"runs": [{k: v for k, v in r.items() if k != "l1"} for r in rs],
                   "queries_per_s_median": float(np.median([r["queries_per_s"] for r in rs])),
                   "ort_fraction_median": float(np.median([r["ort_fraction"] for r in rs])),
                   "overhead_us_per_query_median": float(np.median([r["overhead_us_per_query"] for r in rs]))}
            for name, rs in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(zoo.ROOT / "models" / "demo" / "gtsrb_badnets3x3.onnx"))
    ap.add_argument("--steps", type=int, default=20, help="search steps per class (default 20)")
    ap.add_argument("--batch", type=int, default=4096, help="images per ORT call for the ORT-alone figure")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3, help="scans of each oracle set-up, in turn (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads of the one-call set-up "
                    "(0: its default)")
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=zoo.ROOT / "bench" / "out")
    args = ap.parse_args(argv)

    path = Path(args.model)
    manifest = path.with_suffix(".json") if path.suffix == ".onnx" else zoo.manifest_path(args.model)
    man = zoo.load_manifest(manifest)
    cores = host_cores()
    one = zoo.open_oracle(man, threads=args.threads, calls=1)
    oracles = {"one call, parallel inside": one,
               f"{cores} single-thread calls (the gate's default)": zoo.open_oracle(man, calls=cores)}
    data = zoo.clean_data(man["dataset"], cap=args.max_images, manifest=man)
    ort = ort_throughput(one, args.batch, args.repeats)
    scans = side_by_side(oracles, data.scan, args.steps, args.pairs)
    result = {"model": man["name"], "threads": args.threads, "cores": cores, "ort": ort, "scans": scans}
    print(f"{man['name']}: ORT alone {ort['images_per_s_median']:,.0f} images/s (one call of {ort['batch']} images)")
    for name, s in scans.items():
        q = s["queries_per_s_median"]
        each = ", ".join(f"{r['queries_per_s']:,.0f}" for r in s["runs"])
        print(f"  scan, {name}: {q:,.0f} queries/s (median of {len(s['runs'])}: {each}), "
              f"{s['ort_fraction_median']:.0%} in ORT, "
              f"gate overhead {s['overhead_us_per_query_median']:.1f} us/query -> {q / ort['images_per_s_median']:.0%} "
              f"of ORT-alone throughput")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speed.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
