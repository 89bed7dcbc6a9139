"""Scaling on this machine: one model's classes and many models, here and on 1 and 2 local Ray workers, side by side.

    python -m bench.scaling [--models N] [--resume] [--record]

Two tables, each row a ``gate`` command in a child process (the verdict cache off), timed whole:

* **Classes of one model** — the backdoored 43-class demo (``gate scan``, default policy): in one process
  (ONNX Runtime on every core), as ``--ray local --ray-parts 1 --ray-cpus 2`` (one worker, two threads) and as
  ``--ray local --ray-parts 2 --ray-cpus 1`` (two workers, one thread each). Every Ray row must give the local
  row's flagged classes and bit-identical per-class L1 norms; the table says whether it did.
* **Many models** — ``gate run-many`` over N CIFAR-10 wide-zoo models (``models/wide_zoo``, one architecture
  after another, in name order; each with a
  policy stating its documented input convention, the data its test split): one after another here, then with
  ``--ray local --ray-cpus 2`` (one model at a time) and ``--ray-cpus 1`` (two at a time); same check per model.

Then ONNX Runtime alone (images per second at batch 2048, every core) on each model, which with the measured
queries gives the sizing rule a scan follows: seconds ~ queries per class x classes / images per second.

Each row is kept in ``bench/out/scaling/<row>.json``; ``--resume`` reuses the rows already there (the run
survives a stop). ``--record`` writes the section of bench/RESULTS.md. Wall times are only comparable between
rows run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench import zoo
from bench.compare import RESULTS_MD, write_results_section
from bench.speed import ort_throughput

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo" / "gtsrb_badnets3x3.onnx"
SAMPLE = ROOT / "models" / "demo" / "gtsrb_sample.npz"
SECTION = "## Scaling: classes and models on 1 and 2 Ray workers; sizing"
CLASS_ROWS = {
    "local": [],
    "ray-1-worker": ["--ray", "local", "--ray-parts", "1", "--ray-cpus", "2"],
    "ray-2-workers": ["--ray", "local", "--ray-parts", "2", "--ray-cpus", "1"],
}
MODEL_ROWS = {
    "sequential": [],
    "ray-1-worker": ["--ray", "local", "--ray-cpus", "2"],
    "ray-2-workers": ["--ray", "local", "--ray-cpus", "1"],
}


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    """A gate command in a child process (stdout and stderr to ``log``, read to the end): exit code, wall s."""
    env = {**os.environ, "BACKDOOR_GATE_CACHE": "off"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "gate", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode
    return code, time.perf_counter() - t0


def l1s(report: Path) -> list[float]:
    return [c["l1"] for c in json.loads(report.read_text())["classes"]]


def cached(path: Path, resume: bool, make) -> dict:
    if resume and path.is_file():
        print(f"  reusing {path}", file=sys.stderr, flush=True)
        return json.loads(path.read_text())
    row = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1) + "\n")
    return row


def class_rows(out: Path, resume: bool) -> list[dict]:
    rows = []
    for name, extra in CLASS_ROWS.items():
        def make(name=name, extra=extra) -> dict:
            folder = out / "classes" / name
            print(f"  demo scan: {name}", file=sys.stderr, flush=True)
            code, wall = run(["scan", str(DEMO), "--data", str(SAMPLE), "--out", str(folder), "--quiet",
                              "--device", "cpu", *extra], out / f"classes-{name}.log")
            doc = json.loads((folder / "report.json").read_text())
            return {"row": name, "exit_code": code, "wall": wall, "queries": doc["queries"]["total"],
                    "flagged": doc["flagged"], "l1": l1s(folder / "report.json"),
                    "classes": len(doc["classes"])}
        rows.append(cached(out / f"classes-{name}.json", resume, make))
    return rows


def fleet(n: int, out: Path) -> tuple[Path, list[dict]]:
    """A run-many manifest of ``n`` built CIFAR-10 wide-zoo models (architectures in turn), each with a policy
    stating its documented input convention, and its data (the test split the model did not train on)."""
    names = sorted(p.stem for p in (ROOT / "models" / "wide_zoo").glob("w_cifar_*.json"))
    mans = [zoo.load_manifest(zoo.manifest_path(m, ROOT / "models" / "wide_zoo")) for m in names]
    mans = [m for m in mans if Path(m["_onnx"]).is_file()]
    archs = sorted({m["arch"] for m in mans})  # one architecture after another: the fleet is not one model type
    mans = sorted(mans, key=lambda m: ([x["name"] for x in mans if x["arch"] == m["arch"]].index(m["name"]),
                                       archs.index(m["arch"])))[:n]
    x, y, _ = zoo.test_split("cifar")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "cifar_test.npz", x=x, y=y)
    entries = []
    for man in mans:
        s = man["input_spec"]
        policy = {"input": {"layout": s["layout"], "value_range": s["value_range"], "mean": s.get("mean"),
                            "std": s.get("std"), "output_kind": s["output_kind"]}}
        (out / f"{man['name']}.policy.yaml").write_text(yaml.safe_dump(policy))
        entries.append({"model": str(man["_onnx"]), "name": man["name"], "policy": f"{man['name']}.policy.yaml"})
    manifest = out / "fleet.yaml"
    manifest.write_text(yaml.safe_dump({"models": entries}))
    return manifest, mans


def model_rows(manifest: Path, names: list[str], out: Path, resume: bool) -> list[dict]:
    rows = []
    for name, extra in MODEL_ROWS.items():
        def make(name=name, extra=extra) -> dict:
            folder = out / "models" / name
            print(f"  run-many: {name}", file=sys.stderr, flush=True)
            code, wall = run(["run-many", "--manifest", str(manifest), "--data", str(out / "cifar_test.npz"),
                              "--out", str(folder), "--quiet", "--device", "cpu", "--examples", "0", *extra],
                             out / f"models-{name}.log")
            summary = json.loads((folder / "summary.json").read_text())
            return {"row": name, "exit_code": code, "wall": wall, "models": summary["models"],
                    "l1": {m: l1s(folder / m / "report.json") for m in names}}
        rows.append(cached(out / f"models-{name}.json", resume, make))
    return rows


def throughput(onnx: Path, spec) -> float:
    """ONNX Runtime alone, every core: images per second at batch 2048 (:func:`bench.speed.ort_throughput`)."""
    from gate.oracle import Oracle

    return ort_throughput(Oracle(onnx, spec, device="cpu", max_batch=2048), 2048, 3)["images_per_s_median"]


def markdown(crow: list[dict], mrow: list[dict], speeds: dict[str, float], mans: list[dict]) -> str:
    base = crow[0]
    lines = ["### Classes of one model: the backdoored demo (43 classes, `gate scan`, default policy)", "",
             "| run | workers x ORT threads | wall s | vs local | queries | flagged | L1 = local (bit for bit) |",
             "|---|---|---|---|---|---|---|"]
    layout = {"local": "1 process x 2", "ray-1-worker": "1 x 2", "ray-2-workers": "2 x 1"}
    for r in crow:
        same = "yes" if r["l1"] == base["l1"] and r["flagged"] == base["flagged"] else "**no**"
        lines.append(f"| {r['row']} | {layout[r['row']]} | {r['wall']:.1f} | {base['wall'] / r['wall']:.2f}x | "
                     f"{r['queries']:,} | {r['flagged']} | {same} |")
    first = mrow[0]
    lines += ["", f"### Many models: `gate run-many` over {len(mans)} CIFAR-10 wide-zoo models (10 classes each)", "",
              "| run | models at once x ORT threads | wall s | vs sequential | outcomes | L1 = sequential |",
              "|---|---|---|---|---|---|"]
    layout = {"sequential": "1 x 2", "ray-1-worker": "1 x 2", "ray-2-workers": "2 x 1"}
    for r in mrow:
        same = "yes" if r["l1"] == first["l1"] else "**no**"
        outcomes = ", ".join(m["outcome"] for m in r["models"])
        lines.append(f"| {r['row']} | {layout[r['row']]} | {r['wall']:.1f} | {first['wall'] / r['wall']:.2f}x | "
                     f"{outcomes} | {same} |")
    lines += ["", "### Sizing: seconds ~ queries per class x classes / images per second", "",
              "| model | classes | queries per class (measured) | ORT alone, img/s (2 cores, batch 2048) | "
              "predicted s | measured s |", "|---|---|---|---|---|---|"]
    q_demo = base["queries"] / base["classes"]
    lines.append(f"| demo (small_cnn_v1, GTSRB) | {base['classes']} | {q_demo:,.0f} | {speeds['demo']:,.0f} | "
                 f"{base['queries'] / speeds['demo']:.0f} | {base['wall']:.0f} |")
    for m in first["models"]:
        sp = speeds[m["name"]]
        k = 10
        lines.append(f"| {m['name']} | {k} | {m['queries'] / k:,.0f} | {sp:,.0f} | {m['queries'] / sp:.0f} | "
                     f"{m['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=4, help="CIFAR-10 wide-zoo models for the many-models table (4)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scaling")
    ap.add_argument("--resume", action="store_true", help="reuse the rows already measured in --out")
    ap.add_argument("--record", action="store_true", help="write the section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    crow = class_rows(out, args.resume)
    manifest, mans = fleet(args.models, out)
    mrow = model_rows(manifest, [m["name"] for m in mans], out, args.resume)
    from gate.spec import SpecOverrides

    speeds = {"demo": throughput(DEMO, SpecOverrides())}
    for man in mans:
        speeds[man["name"]] = throughput(Path(man["_onnx"]), zoo.spec_overrides(man))
    body = markdown(crow, mrow, speeds, mans)
    print(body)
    if args.record:
        command = "python -m bench.scaling" + (f" --models {args.models}" if args.models != 4 else "")
        write_results_section(RESULTS_MD, body, command, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
