"""Detection benchmark on the forge zoo: Neural Cleanse (white-box) vs B3D and B3D-SS (black-box).

    python -m bench.compare                      # default subset: per dataset clean_s0, badnets3x3, blended,
                                                 # two_triggers (8 models), methods nc b3d b3d-ss
    python -m bench.compare --full               # all 14 zoo models
    python -m bench.compare --quick              # tiny search settings: a smoke test of the pipeline
    options: --models NAME ...  --datasets gtsrb cifar  --methods nc b3d b3d-ss  --out bench/out
             --max-images N  --synthetic-per-class N  --seed S  --threads T  --resume  --record/--no-record

Every model is scanned with every method:

* ``nc``: Neural Cleanse (``bench.neural_cleanse``) on the torch weights of the very network in the ONNX file;
  its cost is counted in gradient steps (one minibatch step of one class).
* ``b3d``: ``gate.scan.scan`` with the default ``ScanConfig`` on held-out clean test images; cost in queries.
* ``b3d-ss``: ``gate.synth.synthesize`` (``--synthetic-per-class`` images per class from noise, no clean
  data), then ``scan(..., method="b3d-ss")`` on them; synthesis queries are reported apart from scan queries.

Detection cases (paper Tables 3/4), with F = the flagged classes and T = the true target(s):
  backdoored model: I   F non-empty and every flagged class is a true target (F within T)
                    II  F contains a true target and at least one other class
                    III F non-empty but contains no true target
                    IV  nothing flagged (backdoor missed)
  clean model:      IV  nothing flagged (correct);  III  something flagged (false positive; no true target)
(two-trigger models: I and II need one of the two targets flagged; each record also counts targets found)
Detection accuracy (paper Table 2): a backdoored model counts as detected in cases I-III, a clean one in
case IV; "with target" counts backdoored models only in cases I-II.

Outputs under ``--out`` (default bench/out): ``compare.json`` (settings, environment, one record per model
and method, aggregates), ``compare.md`` (the tables as printed) and ``compare/<model>.<method>.json`` (+
``.npz`` triggers) per run. With ``--record`` the tables replace the "## Detection (B3D, B3D-SS, Neural
Cleanse)" section of bench/RESULTS.md (default: on for a complete default or --full run, off otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench import zoo
from gate.pipeline import run_gate
from gate.policy import Policy
from gate.result import Triggers, write_json
from gate.scan import ScanConfig
from gate.search import SearchParams
from gate.synth import SynthConfig

METHODS = ("nc", "b3d", "b3d-ss")
TITLES = {"nc": "NC", "b3d": "B3D", "b3d-ss": "B3D-SS"}
COST_UNIT = {"nc": "gradient steps", "b3d": "queries", "b3d-ss": "queries"}
SECTION = "## Detection (B3D, B3D-SS, Neural Cleanse)"
RESULTS_MD = zoo.ROOT / "bench" / "RESULTS.md"

# Dong et al., ICCV 2021, Table 2: detection accuracy (%). None: not given here.
PAPER_ACCURACY = {
    "gtsrb": {"NC": 100.0, "TABOR": 100.0, "B3D": 100.0, "B3D-SS": 100.0},
    "cifar": {"NC": 95.0, "TABOR": None, "B3D": 97.5, "B3D-SS": 97.5},
}
PAPER_METHODS = ("NC", "TABOR", "B3D", "B3D-SS")

CASE_LEGEND = (
    "Cases (F = flagged classes, T = true target classes). Backdoored model: I = F non-empty and F within T "
    "(detected, only true targets flagged); II = F holds a true target and another class; III = F non-empty "
    "without any true target (detected, wrong target); IV = F empty (missed). Clean model: IV = nothing flagged "
    "(correct), III = something flagged (false positive); I/II do not apply (-). Two-trigger models: I and II "
    "need one true target flagged, not both (the per-model table says how many were found).")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    quick: bool = False
    max_images: int = 1000  # clean images given to B3D and NC per dataset
    eval_images: int = 200  # clean images held out from every detector, to measure reversed triggers
    synthetic_per_class: int = 10
    seed: int = 0
    screening: bool = False  # the gate's screening (gate.screening) in every B3D / B3D-SS scan
    grid_cells: int | None = None  # search.grid_cells (None: the policy's default)
    blend: bool = False  # the gate's blend mode (gate.blend) beside the patch search in every B3D / B3D-SS scan

    def scan_config(self) -> ScanConfig:
        grid = {} if self.grid_cells is None else {"grid_cells": self.grid_cells}
        if self.quick:
            return ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=8, max_steps=8, **grid),
                              seed=self.seed, max_images=self.max_images, held_out=20, bandit_warmup=4,
                              bandit_every=2, screening=self.screening, blend=self.blend)
        return ScanConfig(search=SearchParams(**grid), seed=self.seed, max_images=self.max_images,
                          screening=self.screening, blend=self.blend)

    def synth_config(self) -> SynthConfig:
        if self.quick:
            return SynthConfig(per_class=self.synthetic_per_class, k=4, max_steps=3, seed=self.seed)
        return SynthConfig(per_class=self.synthetic_per_class, seed=self.seed)

    def policy(self, method: str) -> Policy:
        """The gate's policy with these settings: what ``run_gate`` scans under (B3D-SS synthesises)."""
        cfg, synth = self.scan_config(), self.synth_config()
        changes = {s.place: getattr(obj, s.name) for obj in (cfg, cfg.search, cfg.outliers, cfg.screening_params, synth)
                   for s in type(obj).settings() if s.place is not None}
        changes["data.source"] = "synthetic" if method == "b3d-ss" else "auto"
        return Policy().override(changes)

    def nc_config(self):
        from bench.neural_cleanse import NCConfig

        if self.quick:
            return NCConfig(schedule=SearchParams(max_steps=8), batch_size=8, max_images=self.max_images,
                            seed=self.seed)
        return NCConfig(max_images=self.max_images, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.screening:  # added with the screening; off, records made before still match
            d.pop("screening")
        if self.grid_cells is None:  # likewise the grid (the scan fingerprint holds the value in use)
            d.pop("grid_cells")
        if not self.blend:  # likewise the blend mode
            d.pop("blend")
        return d


def fingerprint(settings: Settings, method: str) -> dict:
    """Everything a run's result depends on besides the model and the code: what --resume compares."""
    fp = {"settings": settings.to_dict(), "method": method}
    if method == "nc":
        fp["nc"] = settings.nc_config().to_dict()
    else:
        cfg = settings.scan_config()
        fp["scan"] = {**cfg.search.to_dict(), **cfg.to_dict(), "outliers": [cfg.outliers.anomaly_threshold,
                                                                          cfg.outliers.median_ratio]}
        if not cfg.blend:  # added with the blend mode; off, the scan is what it was (records made before match)
            fp["scan"].pop("blend")
        if cfg.search.grid_cells == SearchParams().grid_cells:  # added with the coarse grid: at its default, a
            fp["scan"].pop("grid_cells")  # 32x32 model (every model the zoos hold) is searched as before
        if cfg.screening:  # likewise the screening: on, its settings are part of the run
            fp["scan"]["screening_params"] = cfg.screening_params.to_dict()
        else:
            fp["scan"].pop("screening")
        if method == "b3d-ss":
            fp["synth"] = settings.synth_config().to_dict()
    return json.loads(json.dumps(fp))  # as it reads back from JSON (tuples become lists)


def quick_settings(seed: int = 0, synthetic_per_class: int | None = None) -> Settings:
    return Settings(quick=True, max_images=200, eval_images=50,
                    synthetic_per_class=synthetic_per_class or 2, seed=seed)


# --------------------------------------------------------------------------- cases and records
def detection_case(flagged, targets) -> str:
    f, t = set(int(v) for v in flagged), set(int(v) for v in targets)
    if not f:
        return "IV"
    if not t:
        return "III"
    if f <= t:
        return "I"
    if f & t:
        return "II"
    return "III"


def correct(case: str, backdoored: bool, with_target: bool = False) -> bool:
    if not backdoored:
        return case == "IV"
    return case in (("I", "II") if with_target else ("I", "II", "III"))


def base_record(man: dict, method: str) -> dict:
    return {"model": man["name"], "dataset": man["dataset"], "group": zoo.group_of_manifest(man),
            "attack": man.get("attack"), "arch": man.get("arch"), "width": man.get("width"),
            "num_classes": man.get("num_classes"), "backdoored": bool(man.get("backdoored", man.get("triggers"))),
            "targets": zoo.targets(man), "true_asr": man.get("asr", []),
            "clean_accuracy_manifest": man.get("clean_accuracy"), "method": method, "cpu": cpu_description()}


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model and the SIMD sets that choose onnxruntime's and numba's float kernels. A scan is bit for bit
    reproducible on one machine (threads, batch make-up and the blend mode do not move its L1 norms), not across
    CPUs: the search's trajectory amplifies last-bit differences (bench/RESULTS.md, "Scan L1s across machines")."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "?"
    lines = text.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({' '.join(simd) or 'no avx2'})"


def finish_record(rec: dict, man: dict, l1, anomaly, flagged, masks, patterns, oracle, data, eval_pred,
                  scan_asr=None) -> dict:
    """Case, and per true target: reversed L1, anomaly index, attack success on the eval images."""
    h, w = masks.shape[1:3]
    l1 = np.asarray(l1, dtype=np.float64)
    rec["flagged"] = [int(v) for v in flagged]
    rec["case"] = detection_case(flagged, rec["targets"])
    rec["targets_found"] = len(set(rec["flagged"]) & set(rec["targets"]))
    rec["median_l1"] = float(np.median(l1))
    rec["l1_per_class"] = [float(v) for v in l1]
    rec["eval_clean_accuracy"] = float(np.mean(eval_pred == data.eval.y)) if data.eval.y is not None else None
    per_target = []
    for trig in man.get("triggers", []):
        t = int(trig["target"])
        per_target.append({
            "target": t, "kind": trig["kind"], "true_l1": zoo.true_trigger_l1(trig, h, w),
            "l1": float(l1[t]), "anomaly_index": float(anomaly[t]), "flagged": t in rec["flagged"],
            "asr_eval": zoo.trigger_asr(oracle, data.eval.x, eval_pred, t, masks[t], patterns[t]),
            "asr_scan": None if scan_asr is None else scan_asr[t]})
    rec["per_target"] = per_target
    return rec


def run_nc(man, data, settings, oracle, eval_pred, log) -> tuple[dict, dict, Triggers]:
    from bench.neural_cleanse import neural_cleanse

    net, normalize = zoo.torch_model(man)
    res = neural_cleanse(net, data.scan.x, settings.nc_config(), normalize=normalize,
                         num_classes=man["num_classes"], log=log)
    k = len(res.classes)
    rec = base_record(man, "nc")
    rec.update(cost=res.steps, cost_unit="gradient steps", cost_per_class=res.steps / k,
               image_passes=res.image_passes, queries=None, seconds=res.seconds, seconds_scan=res.seconds,
               seconds_synthesis=0.0, ort_fraction=None, complete=True,
               statuses=_count([c.status for c in res.classes]))
    finish_record(rec, man, [c.l1 for c in res.classes], [c.anomaly_index for c in res.classes], res.flagged,
                  res.masks, res.patterns, oracle, data, eval_pred)
    trig = Triggers(np.arange(k), res.masks, res.patterns, np.array([c.flagged for c in res.classes]))
    return rec, res.to_dict(), trig


def run_b3d(man, data, settings, oracle, eval_pred, method, log) -> tuple[dict, dict, Triggers]:
    from gate.progress import Progress

    progress = Progress(enabled=log is not None)
    ort0 = oracle.ort_seconds
    run = run_gate(oracle, settings.policy(method), images=None if method == "b3d-ss" else data.scan,
                   progress=progress)
    res, trig, synth = run.result, run.triggers, run.result.synthesis
    synth_ort = oracle.ort_seconds - ort0 - res.seconds["ort"]
    k = len(res.classes)
    q = res.queries
    sec = res.seconds
    rec = base_record(man, method)
    rec.update(cost=q["total"], cost_unit="queries", cost_per_class=q["total"] / k,
               queries={"scan": q["scan"], "synthesis": q["synthesis"], "total": q["total"],
                        "scan_per_class": q["scan"] / k, "synthesis_per_class": q["synthesis"] / k},
               seconds=sec["total"], seconds_scan=sec["scan"], seconds_synthesis=sec["synthesis"],
               ort_fraction=(sec["ort"] + synth_ort) / sec["total"] if sec["total"] > 0 else 0.0,
               ort_fraction_scan=sec["ort_fraction"], complete=res.complete, verdict=run.decision.outcome,
               statuses=_count([c.status for c in res.classes]),
               status_per_class=[c.status for c in res.classes], notes={c.label: c.note for c in res.classes if c.note},
               binary_l1_per_class=[c.binary_l1 for c in res.classes],
               synthesis_success=None if synth is None else synth["success_rate"])
    if settings.blend:  # each mode's own evidence: the blend amplitudes and which mode flagged which class
        rec.update(blend_amplitude_per_class=[c.blend_amplitude for c in res.classes],
                   patch_flagged=[c.label for c in res.classes if c.patch_flagged],
                   blend_flagged=[c.label for c in res.classes if c.blend_flagged])
    finish_record(rec, man, [c.l1 for c in res.classes], [c.anomaly_index for c in res.classes], res.flagged,
                  trig.masks, trig.patterns, oracle, data, eval_pred,
                  scan_asr=[c.trigger_asr for c in res.classes])
    return rec, res.to_dict(), trig


def _count(items) -> dict:
    out: dict = {}
    for v in items:
        out[v] = out.get(v, 0) + 1
    return out


# --------------------------------------------------------------------------- aggregation and tables
def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(records: list[dict]) -> dict:
    """dataset -> group -> method -> summary; dataset -> method -> accuracy."""
    out: dict = {}
    for ds in zoo.DATASETS:
        recs = [r for r in records if r["dataset"] == ds]
        if not recs:
            continue
        groups = {}
        for key, _, _ in zoo.GROUPS:
            gm = {}
            for m in METHODS:
                rs = [r for r in recs if r["group"] == key and r["method"] == m]
                if not rs:
                    continue
                targets = [t for r in rs for t in r["per_target"]]
                gm[m] = {
                    "models": len(rs),
                    "cases": {c: sum(r["case"] == c for r in rs) for c in ("I", "II", "III", "IV")},
                    "l1_target": _mean(t["l1"] for t in targets),
                    "true_l1": _mean(t["true_l1"] for t in targets),
                    "asr_target": _mean(t["asr_eval"] for t in targets),
                    "median_l1": _mean(r["median_l1"] for r in rs),
                    "cost": _mean(r["cost"] for r in rs),
                    "cost_per_class": _mean(r["cost_per_class"] for r in rs),
                    "seconds": _mean(r["seconds"] for r in rs),
                    "ort_fraction": _mean(r.get("ort_fraction") for r in rs),
                }
            if gm:
                groups[key] = gm
        acc = {}
        for m in METHODS:
            rs = [r for r in recs if r["method"] == m]
            if not rs:
                continue
            acc[m] = {"models": len(rs),
                      "detected": sum(correct(r["case"], r["backdoored"]) for r in rs) / len(rs),
                      "with_target": sum(correct(r["case"], r["backdoored"], True) for r in rs) / len(rs)}
        per_class = {}
        for m in METHODS:
            rs = [r for r in recs if r["method"] == m]
            if not rs:
                continue
            k = [len(r["l1_per_class"]) for r in rs]
            per_class[m] = {
                "models": len(rs),
                "cost_per_class": _mean(r["cost_per_class"] for r in rs),
                "scan_queries_per_class": _mean((r["queries"] or {}).get("scan_per_class") for r in rs),
                "synthesis_queries_per_class": _mean((r["queries"] or {}).get("synthesis_per_class") for r in rs),
                "seconds_per_class": _mean(r["seconds"] / kk for r, kk in zip(rs, k, strict=True)),
                "scan_seconds_per_class": _mean(r["seconds_scan"] / kk for r, kk in zip(rs, k, strict=True)),
                "synthesis_seconds_per_class": _mean(r["seconds_synthesis"] / kk
                                                     for r, kk in zip(rs, k, strict=True)),
                "ort_fraction": _mean(r.get("ort_fraction") for r in rs),
            }
        out[ds] = {"groups": groups, "accuracy": acc, "per_class": per_class}
    return out


def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


def _cost(v, unit):
    if v is None:
        return "-"
    if unit == "queries":
        return f"{v / 1e6:.2f}M" if v >= 999_500 else f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v:.0f}"
    return f"{v:,.0f}"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(records: list[dict], methods, settings: Settings, missing=(), env: dict | None = None) -> str:
    agg = aggregate(records)
    methods = [m for m in METHODS if m in methods]
    out = []
    mode = "QUICK (tiny search settings: numbers mean nothing)" if settings.quick else "benchmark settings"
    out.append(f"Settings: {mode}; clean scan images <= {settings.max_images} per dataset, "
               f"{settings.eval_images} held-out eval images, B3D-SS {settings.synthetic_per_class} synthetic "
               f"images per class, seed {settings.seed}.")
    if env:
        out.append(f"Machine: {env.get('cpus')} CPUs, threads {env.get('threads') or 'library default'}; "
                   f"onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}; gate {env.get('gate')} "
                   f"at {env.get('git_commit', '?')[:10]}.")
    if missing:
        out.append(f"Not in the zoo (skipped): {', '.join(missing)}.")
    out.append("")
    out.append(CASE_LEGEND)
    out.append("L1 = soft-mask L1 norm of the reversed trigger of the true target class (mean over models and "
               "targets; true = the planted trigger's mask L1, blend: alpha*H*W); median = median L1 over all "
               "classes; ASR = attack success of that reversed trigger on held-out clean images (never seen by "
               "any detector) not already classified as the target; cost = model queries (B3D; B3D-SS incl. "
               "synthesis) or gradient steps summed over classes (NC); s = wall seconds per model; ORT = "
               "fraction of that time inside onnxruntime. All numbers are from this run unless marked paper.")
    for ds, a in agg.items():
        title = zoo.DATASET_TITLES[ds]
        groups = a["groups"]
        out += ["", f"### {title}: detection cases (paper Table 3/4 layout)", ""]
        header = ["model group", "models"]
        for m in methods:
            header += [f"{TITLES[m]} {c}" for c in ("I", "II", "III", "IV")]
        rows = []
        for key, gtitle, _ in zoo.GROUPS:
            if key not in groups:
                continue
            n = max(v["models"] for v in groups[key].values())
            row = [gtitle, n]
            for m in methods:
                v = groups[key].get(m)
                if v is None:
                    row += ["-"] * 4
                elif key == "clean":
                    row += ["-", "-", v["cases"]["III"], v["cases"]["IV"]]
                else:
                    row += [v["cases"][c] for c in ("I", "II", "III", "IV")]
            rows.append(row)
        out += _table(header, rows)
        out += ["", f"### {title}: reversed trigger of the true target, cost and time", ""]
        header = ["model group", "true L1"]
        for m in methods:
            header += [f"{TITLES[m]} L1 (median)", f"{TITLES[m]} ASR",
                       f"{TITLES[m]} {'steps' if m == 'nc' else 'queries'}", f"{TITLES[m]} s"]
            if m != "nc":
                header.append(f"{TITLES[m]} ORT")
        rows = []
        for key, gtitle, _ in zoo.GROUPS:
            if key not in groups:
                continue
            true_l1 = next((v["true_l1"] for v in groups[key].values() if v["true_l1"] is not None), None)
            row = [gtitle, _f(true_l1)]
            for m in methods:
                v = groups[key].get(m)
                if v is None:
                    row += ["-"] * (4 if m == "nc" else 5)
                    continue
                row += [f"{_f(v['l1_target'])} ({_f(v['median_l1'], '{:.0f}')})",
                        _f(v["asr_target"], "{:.0%}"), _cost(v["cost"], COST_UNIT[m]), _f(v["seconds"], "{:.0f}")]
                if m != "nc":
                    row.append(_f(v["ort_fraction"], "{:.0%}"))
            rows.append(row)
        out += _table(header, rows)

    # overall accuracy, paper Table 2 layout
    out += ["", "### Detection accuracy (paper Table 2 layout)", "",
            "ours = correctly judged models / models scanned in this run (backdoored: detected, cases I-III; "
            "clean: nothing flagged); \"with target\" also requires a true target among the flagged classes "
            "(cases I-II). paper = Dong et al. (ICCV 2021) Table 2, on their own model sets, not re-run here.", ""]
    dss = list(agg)
    header = ["method"]
    for ds in dss:
        t = zoo.DATASET_TITLES[ds]
        header += [f"{t} ours", f"{t} ours with target", f"{t} paper"]
    rows = []
    for pm in PAPER_METHODS:
        m = next((k for k, v in TITLES.items() if v == pm), None)
        row = [pm]
        for ds in dss:
            acc = agg[ds]["accuracy"].get(m) if m in methods else None
            paper = PAPER_ACCURACY[ds].get(pm)
            if acc is None:
                row += ["not run", "not run"]
            else:
                row += [f"{acc['detected']:.1%} ({acc['models']})", f"{acc['with_target']:.1%}"]
            row.append("-" if paper is None else f"{paper:.1f}% (paper)")
        rows.append(row)
    out += _table(header, rows)

    # queries and time per class
    out += ["", "### Queries and time per class", "",
            "Mean over the models of each dataset. B3D-SS synthesis queries/seconds are reported apart from its "
            "scan; NC's cost is gradient steps (no queries).", ""]
    header = ["dataset", "method", "scan queries / class", "synthesis queries / class", "total / class",
              "scan s / class", "synthesis s / class", "total s / class", "ORT"]
    rows = []
    for ds in dss:
        for m in methods:
            v = agg[ds]["per_class"].get(m)
            if v is None:
                continue
            if m == "nc":
                rows.append([zoo.DATASET_TITLES[ds], TITLES[m], "-", "-", f"{v['cost_per_class']:,.0f} steps",
                             _f(v["scan_seconds_per_class"], "{:.2f}"), "-",
                             _f(v["seconds_per_class"], "{:.2f}"), "-"])
            else:
                rows.append([zoo.DATASET_TITLES[ds], TITLES[m], _cost(v["scan_queries_per_class"], "queries"),
                             _cost(v["synthesis_queries_per_class"], "queries") if m == "b3d-ss" else "-",
                             _cost(v["cost_per_class"], "queries"), _f(v["scan_seconds_per_class"], "{:.2f}"),
                             _f(v["synthesis_seconds_per_class"], "{:.2f}") if m == "b3d-ss" else "-",
                             _f(v["seconds_per_class"], "{:.2f}"), _f(v["ort_fraction"], "{:.0%}")])
    out += _table(header, rows)

    # per model
    out += ["", "### Per model", "", "L1 / anomaly index / ASR per true target; a * after the case: a budget "
            "cut the scan short.", ""]
    header = ["model", "method", "true targets", "flagged", "case", "targets found", "L1 target", "median L1",
              "anomaly idx", "ASR", "cost", "s"]
    rows = []
    for r in sorted(records, key=lambda r: (zoo.DATASETS.index(r["dataset"]), r["model"],
                                            METHODS.index(r["method"]))):
        pt = r["per_target"]
        rows.append([r["model"], TITLES[r["method"]], ",".join(map(str, r["targets"])) or "-",
                     ",".join(map(str, r["flagged"])) or "-", r["case"] + ("" if r.get("complete", True) else "*"),
                     f"{r.get('targets_found', 0)}/{len(r['targets'])}" if r["targets"] else "-",
                     " / ".join(_f(t["l1"]) for t in pt) or "-", _f(r["median_l1"]),
                     " / ".join(_f(t["anomaly_index"], "{:.1f}") for t in pt) or "-",
                     " / ".join(_f(t["asr_eval"], "{:.0%}") for t in pt) or "-",
                     f"{_cost(r['cost'], COST_UNIT[r['method']])}{' steps' if r['method'] == 'nc' else ''}",
                     _f(r["seconds"], "{:.0f}")])
    out += _table(header, rows)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- running
def environment(threads: int) -> dict:
    import onnxruntime

    import gate

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "threads": threads, "onnxruntime": onnxruntime.__version__, "gate": gate.__version__,
           "numpy": np.__version__, "cpu": cpu_description()}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=zoo.ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = "?"
    return env


def run_model(name, methods, settings, zoo_dir, datasets_dir, out_dir, data_cache, threads, resume, verbose,
              say) -> list[dict]:
    man = zoo.load_manifest(zoo.manifest_path(name, zoo_dir))
    ds = man["dataset"]
    if ds not in data_cache:
        data_cache[ds] = zoo.clean_data(ds, settings.max_images, settings.eval_images, settings.seed,
                                        datasets_dir, manifest=man)
    data = data_cache[ds]
    log = (lambda msg: print(f"    {msg}", file=sys.stderr, flush=True)) if verbose else None
    records = []
    oracle = None
    for m in methods:
        path = out_dir / "compare" / f"{name}.{m}.json"
        if resume and path.is_file():
            prev = json.loads(path.read_text())
            if prev.get("fingerprint") == fingerprint(settings, m) and prev.get("record", {}).get("model") == name:
                say(f"{name} {TITLES[m]}: reusing {path}")
                records.append(prev["record"])
                continue
        if oracle is None:
            oracle = zoo.open_oracle(man, threads=threads)
            eval_pred = oracle.predict(data.eval.x)
        t0 = time.perf_counter()
        if m == "nc":
            rec, raw, trig = run_nc(man, data, settings, oracle, eval_pred, log)
        else:
            rec, raw, trig = run_b3d(man, data, settings, oracle, eval_pred, m, log)
        rec["bench_seconds"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"fingerprint": fingerprint(settings, m), "record": rec, "raw": raw})
        trig.save(path.with_suffix(".npz"))
        records.append(rec)
        pt = ", ".join(f"target {t['target']} L1 {t['l1']:.1f}" for t in rec["per_target"])
        say(f"{name} {TITLES[m]}: flagged {rec['flagged'] or 'none'} (true {rec['targets'] or 'none'}) case "
            f"{rec['case']}; {pt + '; ' if pt else ''}median L1 {rec['median_l1']:.1f}; "
            f"{_cost(rec['cost'], rec['cost_unit'])} {rec['cost_unit']}, {rec['seconds']:.0f}s")
    return records


def write_results_section(md_path: Path, body: str, command: str, title: str = SECTION) -> None:
    """Replace (or append) only the section ``title`` of RESULTS.md; other sections stay as they are."""
    section = f"{title}\n\nProduced by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}).\n\n{body.strip()}\n"
    text = md_path.read_text() if md_path.is_file() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    md_path.write_text(new)


def publish(text: str, data, args, module: str, section: str, argv=None) -> None:
    """A benchmark's tables: printed, its numbers to ``args.json`` (when given), and with ``args.record`` the
    section ``section`` of ``args.results_md`` rewritten, headed by the command that made it (files first: a
    reader that stops reading early loses none of them)."""
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=float))
    if args.record:
        command = f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_results_section(args.results_md, text, command.strip(), section)
    print(text)
    if args.record:
        print(f"recorded in {args.results_md}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="all 14 zoo models (default: 4 per dataset)")
    ap.add_argument("--wide", action="store_true", help="every built model of the wide zoo (models/wide_zoo, "
                    "python -m models.forge --wide-zoo); missing ones are skipped and listed")
    ap.add_argument("--quick", action="store_true", help="tiny search settings: smoke test, meaningless numbers")
    ap.add_argument("--models", nargs="+", metavar="NAME", help="zoo model names (overrides --full/default)")
    ap.add_argument("--datasets", nargs="+", choices=zoo.DATASETS, default=list(zoo.DATASETS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", type=Path, default=zoo.ROOT / "bench" / "out")
    ap.add_argument("--zoo-dir", type=Path, default=zoo.ZOO_DIR)
    ap.add_argument("--datasets-dir", type=Path, default=zoo.DATASETS_DIR)
    ap.add_argument("--max-images", type=int, help="clean images per dataset given to B3D/NC (1000; quick 200)")
    ap.add_argument("--eval-images", type=int, help="held-out clean images to measure reversed triggers (200)")
    ap.add_argument("--synthetic-per-class", type=int, help="B3D-SS synthetic images per class (10; quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-cells", type=int, default=None, help="search.grid_cells for B3D/B3D-SS scans (default: "
                    "the policy's; 16 searches a 32x32 model on 2x2-pixel cells)")
    ap.add_argument("--screening", action="store_true", help="B3D/B3D-SS scans with the gate's screening "
                    "(gate.screening); compare with an unscreened run by python -m bench.cost")
    ap.add_argument("--blend", action="store_true", help="B3D/B3D-SS scans with the gate's blend mode beside the "
                    "patch search (records: blend amplitudes, which mode flagged which class)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime/torch threads (0: library default)")
    ap.add_argument("--resume", action="store_true", help="reuse per-run results in OUT/compare/ made with the "
                    "same settings and search/synthesis/NC configuration (not checked: the code version)")
    rec = ap.add_mutually_exclusive_group()
    rec.add_argument("--record", dest="record", action="store_true", default=None,
                     help="write the tables into the detection section of bench/RESULTS.md")
    rec.add_argument("--no-record", dest="record", action="store_false")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    ap.add_argument("--verbose", action="store_true", help="per-class progress of every scan on stderr")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.quick:
        settings = quick_settings(args.seed, args.synthetic_per_class)
    else:
        settings = Settings(seed=args.seed)
        if args.synthetic_per_class:
            settings = replace(settings, synthetic_per_class=args.synthetic_per_class)
    if args.screening:
        settings = replace(settings, screening=True)
    if args.grid_cells is not None:
        settings = replace(settings, grid_cells=args.grid_cells)
    if args.blend:
        settings = replace(settings, blend=True)
    if args.max_images:
        settings = replace(settings, max_images=args.max_images)
    if args.eval_images:
        settings = replace(settings, eval_images=args.eval_images)
    if args.threads and "nc" in args.methods:
        import torch

        torch.set_num_threads(args.threads)

    if args.wide and args.zoo_dir == zoo.ZOO_DIR:
        args.zoo_dir = zoo.WIDE_ZOO_DIR
    if args.models:
        names = args.models
        subset = "custom"
    elif args.wide:
        names = zoo.wide_names(args.datasets)
        subset = "wide"
    else:
        names = zoo.all_names(args.datasets) if args.full else zoo.default_names(args.datasets)
        subset = "full" if args.full else "default"
    names, missing = zoo.available(names, args.zoo_dir)
    if args.models and missing:
        print(f"error: not in {args.zoo_dir}: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not names:
        print(f"error: none of the benchmark models are in {args.zoo_dir} (build them: python -m models.forge "
              f"{'--wide-zoo' if args.wide else '--zoo'})", file=sys.stderr)
        return 2

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    methods = [m for m in METHODS if m in args.methods]
    say(f"{len(names)} models x {len(methods)} methods ({subset}{', quick' if args.quick else ''}); "
        f"missing: {', '.join(missing) or 'none'}")
    env = environment(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records, cache = [], {}
    for name in names:
        records += run_model(name, methods, settings, args.zoo_dir, args.datasets_dir, args.out, cache,
                             args.threads, args.resume, args.verbose, say)
    text = render(records, methods, settings, missing, env)
    wall = time.perf_counter() - t_start
    command = "python -m bench.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command.strip(), "subset": subset, "settings": settings.to_dict(),
               "scan_config": {**settings.scan_config().search.to_dict(), **settings.scan_config().to_dict()},
               "synth_config": settings.synth_config().to_dict(), "methods": methods, "models": names,
               "missing": missing, "environment": env, "wall_seconds": wall, "records": records,
               "aggregate": aggregate(records), "paper_accuracy": PAPER_ACCURACY}
    if "nc" in methods:
        summary["nc_config"] = settings.nc_config().to_dict()
    write_json(args.out / "compare.json", summary)
    (args.out / "compare.md").write_text(text)
    print(text)
    print(f"wall time {wall:.0f}s; results in {args.out / 'compare.json'} and {args.out / 'compare.md'}")
    record = args.record
    if record is None:
        record = (not args.quick and subset in ("default", "full") and not missing
                  and methods == list(METHODS) and list(args.datasets) == list(zoo.DATASETS))
    if record:
        write_results_section(args.results_md, text + f"\nWall time of the whole run: {wall:.0f} s.\n",
                              command.strip())
        print(f"recorded in {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
