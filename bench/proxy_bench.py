"""Runtime shield benchmark: how well S(x) finds triggered inputs, and what the proxy costs.

    python -m bench.proxy_bench                      # demo backdoored model, reversed trigger from a scan
    python -m bench.proxy_bench --scan DIR           # use an existing `gate scan` output (report.json, triggers.npz)
    options: --duration S  --repeats R  --connections C  --max-batch-size N  --ort-threads T  --no-serve

1. Detection (paper Table 6 layout: detectors x attacked model). Clean test images vs the same images with
   the model's true trigger stamped (images of the target class left out). tau is set at 1 % FRR on a
   disjoint clean calibration split; AUC, and TPR / FRR at tau on the evaluation split. Detectors: the B3D
   shield S(x) with the trigger reversed by `gate scan` (what the proxy uses), the shield with the true
   trigger (an upper bound), and STRIP (entropy over clean superimpositions; low = triggered).
2. Serving. Two `gate proxy` servers side by side with the same settings: a bare V2 server of the model
   (`--no-shield`) and the shielded one. A load generator on 127.0.0.1 (wrk when installed, else an
   asyncio httpx client) measures latency at one connection and throughput at --connections, alternating
   bare / shielded --repeats times (medians reported). Targets: added p50 latency beyond the model's own
   extra forward <= 1 ms; shielded throughput >= 45 % of bare (two forwards per request make 50 % the
   limit when the model dominates).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.serve import Server, gate_proxy
from gate.calibrate import Calibration, roc_auc, shield_scores, strip_entropy, threshold_for_frr
from gate.oracle import Oracle, file_sha256
from gate.proxy.codec import TensorSpec, encode_infer_request
from gate.result import Triggers
from gate.shield import Shield, load_scan_triggers, oracle_forward
from models.triggers import apply_trigger, trigger_mask

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
SHARED = Path(os.environ.get("GATE_SHARED", ROOT.parent / "shared"))


# ---------------------------------------------------------------------- data and triggers
def true_triggers(manifest: dict, shape) -> Triggers:
    h, w, c = shape
    t = manifest["triggers"][0]
    if t["kind"] != "patch":
        raise SystemExit("the benchmark's true-trigger row needs a patch trigger")
    mask = trigger_mask(t, h, w)[None].astype(np.float32)
    pattern = apply_trigger(np.zeros((1, h, w, c), np.float32), t)  # the patch colours, zero elsewhere
    return Triggers(np.array([int(t["target"])]), mask, pattern, np.array([True]))


def load_split(args, manifest):
    """(calibration clean, evaluation clean, evaluation triggered, STRIP pool, source) as float NHWC."""
    trigger = manifest["triggers"][0]
    data = Path(args.data) if args.data else SHARED / "datasets" / "gtsrb32.npz"
    rng = np.random.default_rng(args.seed)
    if data.exists():
        with np.load(data) as z:
            x, y = z["x_test"], z["y_test"].astype(np.int64)
            pool = z["x_train"][rng.choice(len(z["x_train"]), args.strip_pool, replace=False)]
        idx = rng.permutation(len(x))
        cal_i, ev_i = idx[:args.calibration_images], idx[args.calibration_images:][:args.test_images]
        source = f"{data.name} test split: {len(cal_i)} calibration + {len(ev_i)} evaluation images"
    else:  # the demo sample only: even / odd halves
        with np.load(DEMO / "gtsrb_sample.npz") as z:
            x, y = z["x"], z["y"].astype(np.int64)
        cal_i, ev_i = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
        pool = x[cal_i]
        source = f"demo sample: {len(cal_i)} calibration + {len(ev_i)} evaluation images"
    keep = ev_i[y[ev_i] != int(trigger["target"])]
    f = lambda a: a.astype(np.float32) / 255  # noqa: E731
    return f(x[cal_i]), f(x[ev_i]), f(apply_trigger(x[keep], trigger)), f(pool), source


def scan_output(args, model: Path) -> Path | None:
    if args.scan:
        return Path(args.scan) / "report.json"
    out = Path(args.out) / "scan"
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
        if report.get("model", {}).get("sha256") == file_sha256(model):
            return out / "report.json"
    if args.no_scan:
        return None
    print(f"running `gate scan {model} --data {DEMO / 'gtsrb_sample.npz'} --out {out}` (minutes) ...", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "gate", "scan", str(model), "--data", str(DEMO / "gtsrb_sample.npz"),
                        "--out", str(out), "--quiet"], cwd=ROOT)
    if r.returncode not in (0, 1):
        raise SystemExit(f"gate scan failed (exit {r.returncode})")
    print(f"  scan took {time.time() - t0:.0f}s", flush=True)
    return out / "report.json"


# ---------------------------------------------------------------------- detection
def detection(args, oracle, manifest, scan_report):
    cal_x, clean_x, trig_x, pool, source = load_split(args, manifest)
    rows, calibrations = [], {}
    shields = []
    if scan_report is not None:
        st = load_scan_triggers(scan_report, model_sha256=oracle.sha256)
        if st.flagged:
            shields.append(("B3D shield S(x), reversed trigger (gate scan)", st.triggers, "scan"))
        else:
            print(f"note: {scan_report} flags no class; the reversed-trigger row is left out", flush=True)
        scan_flagged = st.flagged
    else:
        scan_flagged = None
    shields.append(("B3D shield S(x), true trigger (upper bound)", true_triggers(manifest, oracle.image_shape),
                    "true"))
    for name, triggers, key in shields:
        shield = Shield(triggers, oracle.spec)
        t0 = time.perf_counter()
        s_cal = shield_scores(shield, oracle, cal_x)
        s_clean = shield_scores(shield, oracle, clean_x)
        s_trig = shield_scores(shield, oracle, trig_x)
        seconds = time.perf_counter() - t0
        tau = threshold_for_frr(s_cal, args.target_frr)
        rows.append({"detector": name, "auc": roc_auc(-s_clean, -s_trig), "tau": tau,
                     "tpr": float(np.mean(s_trig < tau)), "frr": float(np.mean(s_clean < tau)),
                     "labels": [int(v) for v in triggers.labels],
                     "images_per_s": (len(cal_x) + len(clean_x) + len(trig_x)) / seconds})
        calibrations[key] = (triggers, tau, float(np.mean(s_cal < tau)), len(cal_x))
    t0 = time.perf_counter()
    e_cal = strip_entropy(oracle, cal_x, pool, overlays=args.strip_overlays, seed=1)
    e_clean = strip_entropy(oracle, clean_x, pool, overlays=args.strip_overlays, seed=2)
    e_trig = strip_entropy(oracle, trig_x, pool, overlays=args.strip_overlays, seed=3)
    seconds = time.perf_counter() - t0
    tau = threshold_for_frr(e_cal, args.target_frr)
    rows.append({"detector": f"STRIP ({args.strip_overlays} superimpositions, entropy)",
                 "auc": roc_auc(-e_clean, -e_trig), "tau": tau, "tpr": float(np.mean(e_trig < tau)),
                 "frr": float(np.mean(e_clean < tau)), "labels": None,
                 "images_per_s": (len(cal_x) + len(clean_x) + len(trig_x)) / seconds})
    triggers0, tau0 = calibrations[shields[0][2]][:2]
    first = Shield(triggers0, oracle.spec, tau0)
    passing = clean_x[:256][~first.rejects(shield_scores(first, oracle, clean_x[:256]))]
    return {"source": source, "n_clean": len(clean_x), "n_triggered": len(trig_x), "rows": rows,
            "scan_flagged": scan_flagged, "target": int(manifest["triggers"][0]["target"])}, calibrations, passing


# ---------------------------------------------------------------------- serving
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_run(url: str, body_dir: Path, n_bodies: int, header_length: int, connections: int, seconds: float) -> dict:
    script = body_dir / "post.lua"
    script.write_text(f"""
local bodies = {{}}
for i = 0, {n_bodies - 1} do
  local f = assert(io.open("{body_dir}/b" .. i .. ".bin", "rb"))
  bodies[i + 1] = f:read("*a")
  f:close()
end
local headers = {{["Content-Type"] = "application/octet-stream",
                 ["Inference-Header-Content-Length"] = "{header_length}"}}
local i = 0
request = function()
  i = i % {n_bodies} + 1
  return wrk.format("POST", nil, headers, bodies[i])
end
""")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
                          "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60).stdout
    pct = {int(p): _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"p50": pct[50], "p90": pct[90], "p99": pct[99], "rps": rps, "requests": total,
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else None}


def httpx_run(url: str, bodies: list[tuple[bytes, dict]], connections: int, seconds: float) -> dict:
    import httpx

    async def go():
        lat, codes = [], []
        stop = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def worker(k):
                i = k
                while time.perf_counter() < stop:
                    body, headers = bodies[i % len(bodies)]
                    i += connections
                    t = time.perf_counter()
                    r = await client.post(url, content=body, headers=headers)
                    lat.append(time.perf_counter() - t)
                    codes.append(r.status_code)
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(connections)))
            return lat, codes, time.perf_counter() - t0

    lat, codes, wall = asyncio.run(go())
    ms = np.array(lat) * 1e3
    return {"p50": float(np.median(ms)), "p90": float(np.quantile(ms, 0.9)), "p99": float(np.quantile(ms, 0.99)),
            "rps": len(lat) / wall, "requests": len(lat), "non_2xx": int(sum(c != 200 for c in codes)),
            "socket_errors": None}


def model_costs(oracle: Oracle, shield: Shield, x: np.ndarray, reps: int = 400) -> dict:
    """Median in-process times (ms): bare forward of 1 image, forward of the 1+T shield rows, stamp + score."""
    fwd = oracle_forward(oracle)
    one, rows = x[:1], shield.stamp(x[:1]).copy()

    def med(fn):
        for _ in range(20):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3

    f1, fr = med(lambda: fwd(one)), med(lambda: fwd(rows))
    full = med(lambda: shield.run(one, fwd))
    return {"forward_1": f1, "forward_rows": fr, "rows": len(rows), "shield_run": full,
            "stamp_score": max(full - fr, 0.0)}


def load(args, servers: dict[str, Server], name: str, body_dir: Path, bodies: list, header_length: int,
         use_wrk: bool) -> dict:
    """Latency (1 connection) and throughput (--connections) runs, alternating the servers --repeats times."""
    results = {k: {"latency": [], "throughput": []} for k in servers}
    for srv in servers.values():  # warm up connections, allocator and batch shapes; not measured
        url = f"{srv.url}/v2/models/{name}/infer"
        (wrk_run(url, body_dir, len(bodies), header_length, args.connections, 1.0) if use_wrk
         else httpx_run(url, bodies, args.connections, 1.0))
    for kind, conns in (("latency", 1), ("throughput", args.connections)):
        for _ in range(args.repeats):
            for label, srv in servers.items():
                url = f"{srv.url}/v2/models/{name}/infer"
                cpu0 = srv.cpu_seconds()
                r = (wrk_run(url, body_dir, len(bodies), header_length, conns, args.duration) if use_wrk
                     else httpx_run(url, bodies, conns, args.duration))
                r["cpu_ms_per_request"] = (srv.cpu_seconds() - cpu0) * 1e3 / max(r["requests"], 1)
                results[label][kind].append(r)
                print(f"  {label:6s} {kind:10s} c={conns:<3d} p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  "
                      f"{r['rps']:8.0f} req/s  server CPU {r['cpu_ms_per_request']:.3f} ms/request  "
                      f"non-2xx {r['non_2xx']}", flush=True)
    return results


def serving(args, oracle, calibrations, passing, report_path: Path | None, out: Path) -> dict:
    key = "scan" if "scan" in calibrations else "true"
    triggers, tau, achieved, n = calibrations[key]
    sdir = out / f"serve_{key}"
    sdir.mkdir(parents=True, exist_ok=True)
    if report_path is None or key != "scan":
        from gate.oracle import file_sha256

        report = {"schema_version": "1.0", "flagged": [int(v) for v in triggers.labels],
                  "model": {"sha256": file_sha256(args.model)}}
        (sdir / "report.json").write_text(json.dumps(report))
        triggers.save(sdir / "triggers.npz")
        report_path, triggers_path = sdir / "report.json", sdir / "triggers.npz"
    else:
        triggers_path = report_path.parent / "triggers.npz"
    cal = Calibration(threshold=tau, target_frr=args.target_frr, achieved_frr=achieved, n=n,
                      triggers_sha256=file_sha256(triggers_path), model_sha256=oracle.sha256,
                      flagged=[int(v) for v in triggers.labels], data="bench calibration split",
                      created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    cal.save(sdir / "calibration.json")

    shield = Shield(triggers, oracle.spec, tau)
    images = passing[:64]
    x_model = oracle.encode(images)
    costs = model_costs(oracle, shield, x_model)
    spec = TensorSpec(oracle.input_name, "FP32", (-1, *oracle.spec.model_shape(1)[1:]))
    bodies = [encode_infer_request(spec, x_model[i:i + 1], oracle.output_name) for i in range(len(x_model))]
    body_dir = Path(tempfile.mkdtemp(prefix="proxy_bench_"))
    for i, (b, _) in enumerate(bodies):
        (body_dir / f"b{i}.bin").write_bytes(b)
    header_length = int(bodies[0][1]["inference-header-content-length"])

    common = ["--model", str(args.model), "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us",
              str(args.max_queue_delay_us), "--threads", str(args.ort_threads), "--max-queue", "4096",
              "--device", "cpu"]
    use_wrk = shutil.which("wrk") is not None and not args.httpx
    name = Path(args.model).stem
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, body_dir, ignore_errors=True)
        servers = {
            "bare": stack.enter_context(gate_proxy([*common, "--no-shield"], log=out / "bare.log", timeout=120)),
            "shield": stack.enter_context(gate_proxy(
                [*common, "--report", str(report_path), "--triggers", str(triggers_path), "--calibration",
                 str(sdir / "calibration.json")], log=out / "shield.log", timeout=120)),
        }
        results = load(args, servers, name, body_dir, bodies, header_length, use_wrk)

    def med(label, kind, field):
        return float(np.median([r[field] for r in results[label][kind]]))

    summary = {
        "load_generator": "wrk 1 thread" if use_wrk else "httpx asyncio",
        "triggers": key, "rows_per_request": shield.rows_per_input, "costs_ms": costs,
        "bare": {f: med("bare", "latency", f) for f in ("p50", "p90", "p99")},
        "shield": {f: med("shield", "latency", f) for f in ("p50", "p90", "p99")},
        "rps_bare": med("bare", "throughput", "rps"), "rps_shield": med("shield", "throughput", "rps"),
        "cpu_bare": med("bare", "throughput", "cpu_ms_per_request"),
        "cpu_shield": med("shield", "throughput", "cpu_ms_per_request"),
        "non_2xx": sum(r["non_2xx"] for label in results for kind in results[label] for r in results[label][kind]),
        "runs": results,
    }
    summary["bare"]["rps"], summary["shield"]["rps"] = summary["rps_bare"], summary["rps_shield"]
    summary["added_p50_ms"] = summary["shield"]["p50"] - summary["bare"]["p50"]
    summary["extra_forward_ms"] = costs["forward_rows"] - costs["forward_1"]
    summary["added_p50_beyond_forward_ms"] = summary["added_p50_ms"] - summary["extra_forward_ms"]
    summary["throughput_ratio"] = summary["rps_shield"] / summary["rps_bare"]
    summary["cpu_ratio"] = summary["cpu_bare"] / summary["cpu_shield"]
    return summary


# ---------------------------------------------------------------------- report
def print_detection(det: dict, model_name: str) -> str:
    lines = [f"Detection of triggered inputs — {model_name} (target class {det['target']}); {det['source']}; "
             f"{det['n_clean']} clean vs {det['n_triggered']} triggered evaluation images; tau at 1% FRR on the "
             f"calibration split",
             "", f"| Detector | AUC ({model_name}) | TPR at tau | FRR at tau | images/s |", "|---|---|---|---|---|"]
    for r in det["rows"]:
        lines.append(f"| {r['detector']} | {r['auc']:.4f} | {r['tpr']:.1%} | {r['frr']:.1%} | "
                     f"{r['images_per_s']:,.0f} |")
    if det["scan_flagged"] is not None:
        lines.append("")
        lines.append(f"gate scan flagged classes {det['scan_flagged']} (true target {det['target']})")
    return "\n".join(lines)


def print_serving(s: dict, args) -> str:
    c = s["costs_ms"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    lines = [
        f"Serving — load generator {s['load_generator']}, {args.duration:g}s per run, median of {args.repeats} "
        f"alternating runs; latency at 1 connection, throughput at {args.connections}; micro-batching up to "
        f"{args.max_batch_size} images, {args.max_queue_delay_us} us delay; ORT intra-op threads {args.ort_threads}; "
        f"binary tensor requests of 1 image; shield triggers: {s['triggers']} ({s['rows_per_request']} model rows "
        f"per image)",
        "", "| Server | p50 ms | p90 ms | p99 ms | req/s | server CPU ms/request |", "|---|---|---|---|---|---|",
        *(f"| {label} | {s[label]['p50']:.3f} | {s[label]['p90']:.3f} | {s[label]['p99']:.3f} | "
          f"{s[label]['rps']:,.0f} | {s['cpu_' + label]:.3f} |" for label in ("bare", "shield")),
        "",
        f"In process (median): forward of 1 image {c['forward_1']:.3f} ms, of the {c['rows']} shield rows "
        f"{c['forward_rows']:.3f} ms, whole shield step (stamp + forward + KL) {c['shield_run']:.3f} ms",
        f"Added p50 latency: {s['added_p50_ms']:.3f} ms, of which the model's extra forward "
        f"{s['extra_forward_ms']:.3f} ms -> beyond the forward {s['added_p50_beyond_forward_ms']:.3f} ms "
        f"(target <= 1 ms): {ok(s['added_p50_beyond_forward_ms'] <= 1.0)}",
        f"Throughput shielded / bare: {s['throughput_ratio']:.1%} (target >= 45%): {ok(s['throughput_ratio'] >= 0.45)}",
        f"Server CPU per request bare / shielded: {s['cpu_ratio']:.1%} (the throughput ratio a CPU-bound server "
        f"would reach; robust to other load on the machine)",
        f"Non-2xx responses over all runs: {s['non_2xx']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO / "gtsrb_badnets3x3.onnx"))
    p.add_argument("--scan", help="gate scan output folder of --model (default: run one into OUT/scan, cached)")
    p.add_argument("--no-scan", action="store_true", help="no scan: only the true-trigger row")
    p.add_argument("--data", help="npz with x_test/y_test (and x_train for the STRIP pool); default shared gtsrb32")
    p.add_argument("--calibration-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--strip-pool", type=int, default=500)
    p.add_argument("--strip-overlays", type=int, default=32)
    p.add_argument("--target-frr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-serve", action="store_true", help="detection table only")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--httpx", action="store_true", help="use the httpx load generator even when wrk is installed")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "proxy"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    manifest = json.loads(model.with_suffix(".json").read_text())
    oracle = Oracle(model, device="cpu")
    report = scan_output(args, model)
    det, calibrations, passing = detection(args, oracle, manifest, report)
    text = print_detection(det, model.stem)
    print("\n" + text + "\n", flush=True)
    result = {"command": "python -m bench.proxy_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "detection": det}
    if not args.no_serve:
        s = serving(args, oracle, calibrations, passing, report, out)
        stext = print_serving(s, args)
        print("\n" + stext + "\n", flush=True)
        result["serving"] = s
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"-> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
