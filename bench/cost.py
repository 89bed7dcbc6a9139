"""Scan cost: unscreened vs screened B3D scans of the same models, same seeds, side by side.

    python -m bench.compare --wide --datasets gtsrb --methods b3d --resume --out bench/wide           # A
    python -m bench.compare --wide --datasets gtsrb --methods b3d --resume --screening \\
        --out bench/wide_screened                                                                 # B
    python -m bench.cost --a bench/wide/compare --b bench/wide_screened/compare [--record]

For every model with a record in both folders: its classes, the flagged classes and verdict of each scan
(the screening's promise is the same verdicts), queries per class of each and their ratio, and how the
screened scan's classes ended (converged / screened out). Totals: verdicts that agree, mean queries per
class over all classes (the issue's target is <= 25k), and the cost per class by class count.
Queries are exact and comparable across runs; seconds are only comparable when both scans ran side by side
on an idle machine, so the table shows them but the totals do not rely on them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bench.compare import RESULTS_MD, write_results_section

SECTION = "## Scan cost: screened vs unscreened (same models, same seeds)"


def load_records(folder: Path, method: str = "b3d") -> dict[str, dict]:
    """model name -> its record, from ``<model>.<method>.json`` files of one bench.compare run."""
    out = {}
    for path in sorted(Path(folder).glob(f"*.{method}.json")):
        rec = json.loads(path.read_text())["record"]
        out[rec["model"]] = rec
    return out


def pairs(a: dict[str, dict], b: dict[str, dict]) -> list[tuple[dict, dict]]:
    return [(a[name], b[name]) for name in sorted(set(a) & set(b)) if a[name]["complete"] and b[name]["complete"]]


def compare(rows: list[tuple[dict, dict]]) -> dict:
    """The totals over (unscreened, screened) record pairs."""
    same = sum(ra["flagged"] == rb["flagged"] for ra, rb in rows)
    classes = sum(ra["num_classes"] for ra, _ in rows)
    qa = sum(ra["queries"]["scan"] for ra, _ in rows)
    qb = sum(rb["queries"]["scan"] for _, rb in rows)
    by_k: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0])
    for ra, rb in rows:
        t = by_k[ra["num_classes"]]
        t[0] += 1
        t[1] += ra["num_classes"]
        t[2] += ra["queries"]["scan"]
        t[3] += rb["queries"]["scan"]
    return {"models": len(rows), "same_flags": same, "classes": classes,
            "per_class_unscreened": qa / classes if classes else None,
            "per_class_screened": qb / classes if classes else None,
            "by_classes": {k: {"models": v[0], "per_class_unscreened": v[2] / v[1], "per_class_screened": v[3] / v[1]}
                           for k, v in sorted(by_k.items())}}


def table(rows: list[tuple[dict, dict]], totals: dict) -> str:
    lines = ["| model | classes | flagged (unscreened) | flagged (screened) | same | queries/class unscreened | "
             "screened | ratio | screened classes: converged / screened out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ra, rb in rows:
        st = rb.get("statuses", {})
        ratio = ra["queries"]["scan"] / max(rb["queries"]["scan"], 1)
        lines.append(f"| {ra['model']} | {ra['num_classes']} | {ra['flagged']} | {rb['flagged']} | "
                     f"{'yes' if ra['flagged'] == rb['flagged'] else '**no**'} | "
                     f"{ra['queries']['scan_per_class']:,.0f} | {rb['queries']['scan_per_class']:,.0f} | "
                     f"{ratio:.2f}x | {st.get('converged', 0) + st.get('max_steps', 0)} / "
                     f"{st.get('screened_out', 0)} |")
    if totals["models"]:
        lines += ["", f"Same flagged classes on {totals['same_flags']} of {totals['models']} models. Mean queries "
                  f"per class over {totals['classes']} classes: {totals['per_class_unscreened']:,.0f} unscreened, "
                  f"{totals['per_class_screened']:,.0f} screened "
                  f"({totals['per_class_unscreened'] / totals['per_class_screened']:.2f}x fewer).", "",
                  "| classes | models | queries/class unscreened | screened |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['models']} | {v['per_class_unscreened']:,.0f} | {v['per_class_screened']:,.0f} |"
                  for k, v in totals["by_classes"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="records of the unscreened scans (OUT/compare)")
    ap.add_argument("--b", type=Path, required=True, help="records of the screened scans (OUT/compare)")
    ap.add_argument("--method", default="b3d", choices=["b3d", "b3d-ss"])
    ap.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md ({SECTION})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    a, b = load_records(args.a, args.method), load_records(args.b, args.method)
    if not a or not b:
        ap.error(f"no {args.method} records in {args.a if not a else args.b}")
    rows = pairs(a, b)
    if not rows:
        ap.error("no model has a complete record in both folders")
    text = table(rows, compare(rows))
    print(text)
    if args.record:
        cmd = f"python -m bench.cost --a {args.a} --b {args.b}" + (f" --method {args.method}"
                                                                     if args.method != "b3d" else "")
        write_results_section(args.results_md, text, cmd, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
