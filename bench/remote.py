"""Remote vs local: a model scanned from its file and through ``gate proxy --no-shield`` on this machine (the
Open Inference Protocol, binary tensor data over loopback HTTP).

    python -m bench.remote [--model M.onnx] [--data D.npz] [--quick] [--record]

1. Oracle throughput: ``--repeats`` interleaved rounds of ``probs`` on ``--images`` random images through
   the ONNX oracle and through the remote oracle at concurrency 1 and 4: images/s (median), and the remote's
   wall time per image beyond the local one.
2. ``gate scan`` of the model both ways at the default settings (``--quick``: tiny search settings, a smoke
   test): verdict, flagged classes, whether every class's L1 is identical, queries, wall time, queries/s,
   and the proxy's CPU seconds (the model runs there, not in the scanning process).

``--record`` writes the section "## Remote oracle vs local" of bench/RESULTS.md. The server shares the
machine's cores with the scanning process, so the remote figures include the server's contention for them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.compare import write_results_section
from bench.serve import gate_proxy
from bench.zoo import ROOT

SECTION = "## Remote oracle vs local (Open Inference Protocol)"
QUICK = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100"]


def throughput(url: str, name: str, model: Path, images: int, repeats: int) -> list[dict]:
    from gate.oracle import Oracle
    from gate.remote_oracle import RemoteOracle

    x = np.random.default_rng(0).random((images, *Oracle(model, device="cpu").image_shape), dtype=np.float32)
    oracles = {"local (onnxruntime)": Oracle(model, device="cpu", max_batch=2048)}
    for conc in (1, 4):
        oracles[f"remote, concurrency {conc}"] = RemoteOracle(url, name, max_batch=2048, concurrency=conc)
    times: dict[str, list[float]] = {k: [] for k in oracles}
    for o in oracles.values():
        o.probs(x[:256])  # warm-up
    for _ in range(repeats):
        for label, o in oracles.items():
            t0 = time.perf_counter()
            o.probs(x)
            times[label].append(time.perf_counter() - t0)
    local = float(np.median(times["local (onnxruntime)"]))
    rows = []
    for label, ts in times.items():
        med = float(np.median(ts))
        rows.append({"oracle": label, "images_per_s": images / med,
                     "overhead_us_per_image": 1e6 * (med - local) / images})
    return rows


def gate_scan(args: list[str], out: Path) -> dict:
    """``gate scan ARGS`` in a child process: its exit code, report, wall and CPU seconds."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    env = {**os.environ, "BACKDOOR_GATE_CACHE": "off"}  # a measurement: never an answer from the verdict cache
    proc = subprocess.run([sys.executable, "-m", "gate", "scan", *args, "--out", str(out), "--quiet",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    doc = json.loads((out / "report.json").read_text())
    return {"exit_code": proc.returncode, "line": proc.stdout.strip(), "wall": wall, "cpu": cpu, "report": doc}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo" / "gtsrb_badnets3x3.onnx")
    ap.add_argument("--data", type=Path, default=ROOT / "models" / "demo" / "gtsrb_sample.npz")
    ap.add_argument("--images", type=int, default=8192, help="images per throughput round (8192)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny search settings (a smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "remote")
    ap.add_argument("--record", action="store_true", help="write the section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.model.stem
    settings = QUICK if args.quick else []
    with gate_proxy(["--model", args.model, "--no-shield", "--model-name", name, "--device", "cpu"],
                    log=args.out / "proxy.log") as server:
        rows = throughput(server.url, name, args.model, args.images, args.repeats)
        cpu0 = server.cpu_seconds()
        remote = gate_scan(["--remote", server.url, "--model-name", name, "--data", str(args.data), *settings],
                           args.out / "remote")
        server_cpu = server.cpu_seconds() - cpu0
    # the file's scan under the server's convention, stated: it would otherwise check conventions first (600
    # queries the served model is spared: gate.pipeline scans a served model as served)
    local = gate_scan([str(args.model), "--data", str(args.data), "--input-range", "1", *settings], args.out / "local")
    a, b = local["report"], remote["report"]
    same_l1 = [c["l1"] for c in a["classes"]] == [c["l1"] for c in b["classes"]]
    lines = [f"Oracle throughput (`probs` on {args.images:,} random images, median of {args.repeats} interleaved "
             "rounds):", "", "| oracle | images/s | extra wall time per image |", "|---|---:|---:|"]
    lines += [f"| {r['oracle']} | {r['images_per_s']:,.0f} | {r['overhead_us_per_image']:.0f} µs |" for r in rows]
    lines += ["", f"`gate scan` of {args.model.name} ({'quick settings' if args.quick else 'default settings'}):",
              "", "| | outcome | flagged | queries | scan s | queries/s |", "|---|---|---|---:|---:|---:|"]
    for label, run in (("local", local), ("remote", remote)):
        r = run["report"]
        q, s = r["queries"]["total"], r["seconds"]["total"]
        lines.append(f"| {label} | {r['decision']['outcome']} | {r['flagged']} | {q:,} | {s:.1f} | {q / s:,.0f} |")
    qa, qb = a["queries"]["total"], b["queries"]["total"]
    per_query = 1e6 * (b["seconds"]["total"] - a["seconds"]["total"]) / max(1, qb)
    cpu_local, cpu_remote = 1e6 * local["cpu"] / max(1, qa), 1e6 * (remote["cpu"] + server_cpu) / max(1, qb)
    lines += ["", f"Per-class L1 identical: {'yes' if same_l1 else 'NO'}; queries identical: "
              f"{'yes' if qa == qb else 'NO'}. Remote overhead: {per_query:.0f} µs of wall time per query. CPU per "
              f"query: local {cpu_local:.0f} µs; remote {cpu_remote:.0f} µs (scanner "
              f"{1e6 * remote['cpu'] / max(1, qb):.0f} + server {1e6 * server_cpu / max(1, qb):.0f}: the model runs in "
              "the server)."]
    body = "\n".join(lines)
    print(body)
    if args.record:
        command = "python -m bench.remote" + (" --quick" if args.quick else "")
        write_results_section(ROOT / "bench" / "RESULTS.md", body, command, SECTION)
    return 0 if same_l1 and a["decision"]["outcome"] == b["decision"]["outcome"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
