"""Scan speed micro-benchmark: how close the B3D scan gets to onnxruntime's own throughput.

    python -m bench.speed                                  # demo backdoored model, 20 steps per class
    python -m bench.speed --model gtsrb_blended --steps 40 --threads 2 --out bench/out

1. ORT alone: ``InferenceSession.run`` on model-encoded batches of ``--batch`` images (images / s).
2. A B3D scan with the default search settings cut to ``--steps`` steps per class (bandit off, so every
   class runs every step): queries / s, the fraction of wall time inside onnxruntime (``ort_fraction``) and
   the gate's own overhead per query (sampling, stamping, estimates) in microseconds. A 2-step scan runs
   first, uncounted: the first scan of a process also loads numba's cached kernels and warms onnxruntime
   (measured: 3-5 % slower than the same scan run second).
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
            "overhead_us_per_query": 1e6 * non_ort / q}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(zoo.ROOT / "models" / "demo" / "gtsrb_badnets3x3.onnx"))
    ap.add_argument("--steps", type=int, default=20, help="search steps per class (default 20)")
    ap.add_argument("--batch", type=int, default=4096, help="images per ORT call for the ORT-alone figure")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=zoo.ROOT / "bench" / "out")
    args = ap.parse_args(argv)

    path = Path(args.model)
    manifest = path.with_suffix(".json") if path.suffix == ".onnx" else zoo.manifest_path(args.model)
    man = zoo.load_manifest(manifest)
    oracle = zoo.open_oracle(man, threads=args.threads)
    data = zoo.clean_data(man["dataset"], cap=args.max_images, manifest=man)
    scan_speed(oracle, data.scan, 2)  # warm-up, not counted
    result = {"model": man["name"], "threads": args.threads,
              "ort": ort_throughput(oracle, args.batch, args.repeats),
              "scan": scan_speed(oracle, data.scan, args.steps)}
    o, s = result["ort"], result["scan"]
    print(f"{man['name']}: ORT alone {o['images_per_s_median']:,.0f} images/s (batch {o['batch']}); "
          f"scan {s['queries_per_s']:,.0f} queries/s over {s['queries']:,} queries in {s['seconds']:.1f}s, "
          f"{s['ort_fraction']:.0%} of it in ORT, gate overhead {s['overhead_us_per_query']:.1f} us/query "
          f"-> scan reaches {s['queries_per_s'] / o['images_per_s_median']:.0%} of ORT-alone throughput")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speed.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
