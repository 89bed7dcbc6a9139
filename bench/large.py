"""Models larger than 32x32: the forge's 128x128 GTSRB models scanned on the coarse grid, beside the 32x32 demo.

    python -m models.forge --large            # the models (models/large/)
    python -m bench.large [--resume] [--record]

Each row is ``gate scan MODEL --data DATA`` in a child process under the default policy (the verdict cache off),
timed whole: the 43-class backdoored demo (32x32, searched pixel by pixel) and the two 128x128 models (searched
on 32x32 cells of 4x4 pixels, ``search.grid_cells``), their data 1000 test-split images (the 128x128 ones
upsampled as the models were trained, :func:`models.large.upsample`). The table: the verdict against the truth
the manifest records (right when a backdoored model is rejected naming exactly its target and a clean one
accepted), the classes the reject names (those the proxy would shield, :func:`gate.shield.shielded_classes`) and
the rule that named each (BG001 outlier, BG003 small effective trigger), queries in all and per class, seconds,
queries per second, and the model's ONNX Runtime throughput alone (images per second, batch 512, every core),
which bounds what a scan can reach.

Rows are kept in ``bench/out/large/<model>.json`` (``--resume`` reuses them); ``--record`` writes the section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.compare import RESULTS_MD, write_results_section
from bench.scaling import cached, run
from bench.speed import ort_throughput

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo" / "gtsrb_badnets3x3.onnx"
SAMPLE = ROOT / "models" / "demo" / "gtsrb_sample.npz"
SECTION = "## Models larger than 32x32: the coarse grid (128x128 GTSRB)"
IMAGES = 1000


def test_images(out: Path, datasets: Path) -> Path:
    """1000 GTSRB test-split images (seeded, stratified), upsampled to 128x128 as the large models saw them."""
    from models.forge import load_dataset, stratified_sample
    from models.large import upsample

    path = out / "gtsrb128_test.npz"
    if not path.is_file():
        data = load_dataset("gtsrb", datasets)
        idx = stratified_sample(data["y_test"], IMAGES, seed=128)
        np.savez(path, x=upsample(data["x_test"][idx]), y=data["y_test"][idx])
    return path


def scan_row(model: Path, data: Path, out: Path) -> dict:
    folder = out / model.stem
    code, wall = run(["scan", str(model), "--data", str(data), "--out", str(folder), "--quiet", "--device", "cpu"],
                     out / f"{model.stem}.log")
    report = json.loads((folder / "report.json").read_text())
    manifest = json.loads(model.with_suffix(".json").read_text())
    targets = sorted({t["target"] for t in manifest["triggers"]})
    outcome = report["decision"]["outcome"]
    from gate.oracle import Oracle

    speed = ort_throughput(Oracle(model, device="cpu", max_batch=512), 512, 3)["images_per_s_median"]
    return {"model": model.stem, "size": manifest["image_shape"][0], "classes": manifest["num_classes"],
            "arch": manifest["arch"], "clean_accuracy": manifest.get("clean_accuracy") or
            manifest.get("sample_metrics", {}).get("clean_accuracy"), "targets": targets, "exit_code": code,
            "outcome": outcome, "flagged": report["flagged"], **blame(report, targets), "wall": wall,
            "grid": report["search"].get("grid"), "queries": report["queries"]["total"],
            "per_class": report["queries"]["total"] / manifest["num_classes"],
            "steps_mean": float(np.mean([c["steps"] for c in report["classes"]])),
            "target_l1": {t: report["classes"][t]["l1"] for t in targets},
            "median_l1": report["outliers"].get("median_l1"), "ort_images_per_s": speed}


def blame(report: dict, targets: list[int]) -> dict:
    """The classes the decision names (flagged, or convicted by a small effective trigger), by which rule, and
    whether the verdict is right: a backdoored model rejected naming exactly its targets, a clean one accepted."""
    from gate.shield import shielded_classes

    named = shielded_classes(report)
    rules = {}
    for f in report["decision"].get("findings", []):
        if f.get("class") in named:
            rules.setdefault(int(f["class"]), []).append(f["rule"])
    outcome = report["decision"]["outcome"]
    right = (outcome == "reject" and sorted(named) == targets) if targets else outcome == "accept"
    return {"named": named, "named_by": {str(c): sorted(set(r)) for c, r in rules.items()}, "right": right}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | input | grid | classes | truth (targets) | outcome | named (rule) | right | queries | "
             "per class | mean steps | wall s | scan queries/s | ORT alone img/s |", "|" + "---|" * 14]
    for r in rows:
        grid = f"{r['grid']['cells'][0]}x{r['grid']['cells'][1]} cells of {r['grid']['cell']} px" if r["grid"] else \
            "every pixel"
        truth = f"backdoor {r['targets']}" if r["targets"] else "clean"
        lines.append(f"| {r['model']} | {r['size']}x{r['size']} | {grid} | {r['classes']} | {truth} | {r['outcome']} | "
                     f"{named(r)} | {'yes' if r['right'] else '**no**'} | {r['queries']:,} | "
                     f"{r['per_class']:,.0f} | {r['steps_mean']:.0f} | {r['wall']:.0f} | "
                     f"{r['queries'] / r['wall']:,.0f} | {r['ort_images_per_s']:,.0f} |")
    lines += ["", "L1 of the true target / median L1 (pixels): " + "; ".join(
        f"{r['model']}: " + ", ".join(f"class {t} {v:.1f}" for t, v in r["target_l1"].items()) +
        f" / {r['median_l1']:.1f}" for r in rows if r["target_l1"] and r["median_l1"])]
    return "\n".join(lines)


def named(row: dict) -> str:
    return ", ".join(f"{c} ({'+'.join(row['named_by'].get(str(c), []))})" for c in row["named"]) or "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "large")
    ap.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--resume", action="store_true", help="reuse the rows already measured in --out")
    ap.add_argument("--record", action="store_true", help="write the section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    from models.large import LARGE_DIR, LARGE_SPECS

    args.out.mkdir(parents=True, exist_ok=True)
    missing = [s["name"] for s in LARGE_SPECS if not (LARGE_DIR / f"{s['name']}.onnx").is_file()]
    if missing:
        print(f"bench.large: not built: {', '.join(missing)} (python -m models.forge --large)", file=sys.stderr)
        return 2
    data = test_images(args.out, args.datasets)
    rows = []
    for model, images in [(DEMO, SAMPLE), *((LARGE_DIR / f"{s['name']}.onnx", data) for s in LARGE_SPECS)]:
        def make(model=model, images=images) -> dict:
            print(f"  scanning {model.name}", file=sys.stderr, flush=True)
            return scan_row(model, images, args.out)
        row = cached(args.out / f"{model.stem}.json", args.resume, make)
        if "named" not in row:  # a row measured before the table named the rules: from the report it was made of
            manifest = json.loads(model.with_suffix(".json").read_text())
            report = json.loads((args.out / model.stem / "report.json").read_text())
            row.update(blame(report, sorted({t["target"] for t in manifest["triggers"]})))
            (args.out / f"{model.stem}.json").write_text(json.dumps(row, indent=1) + "\n")
        rows.append(row)
    body = markdown(rows)
    print(body)
    if args.record:
        write_results_section(RESULTS_MD, body, "python -m bench.large", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
