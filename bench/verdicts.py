"""Verdicts on the wide zoo: the calibrated outlier rule chosen by cross-validation, and how often it is right.

    python -m bench.verdicts                       # records of bench/wide/compare (python -m bench.compare --wide)
    python -m bench.verdicts --records DIR ... --folds 5 --target-fpr 0.03 --record

Input: the per-model scan records ``bench.compare`` writes (``<model>.<method>.json``: every class's L1,
status, the manifest's truth). Nothing is scanned here; every rule is re-applied to the recorded L1 norms.

Cross-validation: the models of each method are split into ``--folds`` folds, stratified by dataset and
clean/backdoored (seeded). For each fold the calibrated rule is fitted on the *other* folds: the population
(median and spread of log(L1 / pixels) over every class of their clean models), then ``scale_floor``,
``population_weight`` and ``alpha``: among the grid points whose false-positive rate on those clean models is at most
``--target-fpr``, those with the most detected backdoored models (ties: more true targets found, fewer
extra flagged classes); of these, the (floor, weight) with the widest range of alphas (ties: the smaller
weight, then the smaller floor) and the middle of that range (:func:`fit`). The same fit with weight 0 (the
within-model test alone) is reported beside it. The chosen rule then judges the fold's models, so every
number below comes from models the rule was not fitted on. The paper's MAD rule needs no fitting and is
reported on the same models. The final rule (fitted on all models) is what ``gate.outliers.OutlierRule``
ships as its default; its numbers on the models it was fitted on are not reported.

B3D-SS scans are also judged by the policy's shipped rule (fitted on B3D scans, never on B3D-SS ones): what a
``--synthetic`` scan is judged by today. With ``--blend-records``, a table shows where the blend search puts each
planted blended / SIG target (amplitude, rank among the model's classes, ratio to the median).

Backdoored models whose attack did not take (a true ASR below ``--min-asr``, 0.9) are not counted as backdoored or
clean; a table apart judges them by the rule fitted on all counted models (out of sample for them: :func:`weak_rows`).

Metrics, each with its count and a 95 % Wilson interval: detection accuracy (backdoored: anything flagged;
clean: nothing flagged), false-positive rate (clean models with a flag), TPR (backdoored models with a flag),
true target found (backdoored models with a true target flagged), extra flagged classes per model (flags on
classes that are not true targets; the interval is the Wilson interval of "a model has any extra flag"), and
the ROC-AUC of the per-model backdoor score (1 - the model's p-value; interval: Hanley & McNeil's standard
error). Split by attack and by architecture. Where more than one method has records, a last table puts them
side by side on the models every method scanned (:func:`same_models_rows`): false positives on the same clean
models, as the paper compares B3D with Neural Cleanse.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench import zoo
from bench.compare import publish
from gate.blend import AMPLITUDE_FLOOR, CALIBRATION, BlendParams, blend_outliers
from gate.outliers import (
    L1_FLOOR,
    OutlierRule,
    combine_z,
    corrected_p,
    find_outliers,
    leave_one_out_z,
    normal_upper_tail,
    population_fit,
    population_z,
)

DEFAULT_RECORDS = zoo.ROOT / "bench" / "wide" / "compare"
SECTION = "## Verdicts on the wide zoo (cross-validated)"
# no floor of 0: with it a tight cluster of classes (a MAD near 0) makes any ordinary class look infinitely extreme,
# the failure the floor exists for (gate.outliers), however well a finite zoo happens to tolerate it
FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
ALPHAS = tuple(float(a) for a in np.geomspace(1e-14, 0.3, 47))
WEIGHTS = (0.0, 0.5, 0.7, 0.85, 1.0)  # population_weight: 0 within the model only, 1 the population test only
ZOO_PIXELS = 32 * 32  # every forge and wide-zoo model takes 32x32 images (records without the scan's input spec)
# Dong et al., ICCV 2021, Table 2 (detection accuracy, %) and Sec. 5.2 (false positives on 50 clean models)
PAPER = {"gtsrb": {"B3D": 100.0, "B3D-SS": 100.0, "NC": 100.0}, "cifar": {"B3D": 97.5, "B3D-SS": 97.5, "NC": 95.0}}
PAPER_CLEAN_FP = {"B3D": "2/50", "NC": "8/50"}
TITLES = {"nc": "NC", "b3d": "B3D", "b3d-ss": "B3D-SS"}


# --------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def roc_auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a backdoored model > score of a clean one), ties counting half (Mann-Whitney)."""
    if not pos or not neg:
        return None
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def auc_interval(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """Hanley & McNeil (1982) normal interval of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


# --------------------------------------------------------------------------- records and judgements
@dataclass(frozen=True)
class Model:
    name: str
    dataset: str
    method: str
    arch: str
    attack: str
    backdoored: bool
    targets: tuple[int, ...]
    l1: np.ndarray
    asr: tuple[float, ...]
    pixels: int = ZOO_PIXELS  # the input's height x width
    blend: np.ndarray | None = None  # per-class blend amplitudes, from a scan with the blend mode (--blend-records)
    blend_l1: np.ndarray | None = None  # that scan's own patch L1 norms (another machine's: need not be ``l1``)
    queries_per_class: float | None = None  # the scan's queries (synthesis included) / classes, where recorded

    @property
    def blend_scan_l1(self) -> np.ndarray:
        """The patch L1 norms of the blend-mode scan (``l1`` where that scan did not record its own)."""
        return self.l1 if self.blend_l1 is None else self.blend_l1


def load_records(dirs) -> list[Model]:
    """The scans in ``dirs``: ``bench.compare`` records, and ``bench.screen_replay`` traces (an unscreened B3D
    scan each: the final L1 of every class), so a traced search can be calibrated and judged the same way.
    A model scanned by one method in more than one folder counts once: the first folder's scan wins (so
    ``--records TRACES bench/wide/compare`` takes B3D from the traces and NC from the records)."""
    out, seen = [], set()
    for d in dirs:
        for m in _folder(Path(d)):
            if (m.name, m.method) not in seen:
                seen.add((m.name, m.method))
                out.append(m)
    return out


def _folder(d: Path) -> list[Model]:
    out = []
    for path in sorted(d.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc.get("trace"), dict):
            out.append(trace_model(doc["trace"]))
            continue
        rec = doc.get("record")
        if not rec or "l1_per_class" not in rec:
            continue
        spec = (doc.get("raw") or {}).get("input_spec") or {}
        pixels = int(spec["height"]) * int(spec["width"]) if spec.get("height") else ZOO_PIXELS
        queries = (rec.get("queries") or {}).get("total")  # a record keeps scan and synthesis queries apart
        out.append(Model(rec["model"], rec["dataset"], rec["method"], rec.get("arch") or "small_cnn_v1",
                         rec.get("attack") or rec.get("group"), bool(rec["backdoored"]),
                         tuple(int(t) for t in rec["targets"]), np.asarray(rec["l1_per_class"], float),
                         tuple(float(a) for a in rec.get("true_asr") or ()), pixels,
                         None if rec.get("blend_amplitude_per_class") is None
                         else np.asarray(rec["blend_amplitude_per_class"], float),
                         queries_per_class=None if queries is None else queries / len(rec["l1_per_class"])))
    return out


def trace_model(t: dict) -> Model:
    """A ``bench.screen_replay`` trace as a :class:`Model` (method b3d: the trace is the plain B3D scan)."""
    return Model(t["model"], t["dataset"], "b3d", t.get("arch") or "small_cnn_v1", t.get("attack") or "clean",
                 bool(t["backdoored"]), tuple(int(v) for v in t["targets"]),
                 np.asarray([c["l1"] for c in t["classes"]], float), tuple(float(a) for a in t.get("true_asr") or ()),
                 int(t["pixels"]), queries_per_class=t["queries"] / len(t["classes"]) if "queries" in t else None)


def with_blend(models: list[Model], blend_models: list[Model]) -> list[Model]:
    """``models`` with the same model and method's blend-mode scan (its blend amplitudes and its own patch L1
    norms), where there is one. ``l1`` stays that of the patch-only scan: the fit and the patch rows do not move."""
    scans = {(b.name, b.method): b for b in blend_models if b.blend is not None}
    out = []
    for m in models:
        b = scans.get((m.name, m.method))
        out.append(m if b is None else replace(m, blend=b.blend, blend_l1=b.l1))
    return out


def attack_took(m: Model, min_asr: float) -> bool:
    return not m.backdoored or (bool(m.asr) and min(m.asr) >= min_asr)


@dataclass(frozen=True)
class Judged:
    model: Model
    flagged: tuple[int, ...]
    score: float  # backdoor score: 1 - the model's p-value (mad rule: the largest MAD index)

    @property
    def detected(self) -> bool:
        return bool(self.flagged) == self.model.backdoored

    @property
    def target_found(self) -> bool:
        return bool(set(self.flagged) & set(self.model.targets))

    @property
    def extra(self) -> int:
        return len(set(self.flagged) - set(self.model.targets))


def judge(m: Model, rule: OutlierRule, blend: BlendParams | None = None) -> Judged:
    """The rule on the model's patch L1 norms; with ``blend`` (the blend rule's calibration) and the model's
    blend-mode scan, the gate's decision on that scan: a class is flagged when either mode flags it, the score
    the larger one."""
    with_blend = blend is not None and m.blend is not None
    out = find_outliers(m.blend_scan_l1 if with_blend else m.l1, rule, pixels=m.pixels)
    score = out.backdoor_score if rule.method == "calibrated" else float(np.max(out.anomaly_index))
    flagged = set(int(c) for c in np.flatnonzero(out.flagged))
    if with_blend:
        b = blend_outliers(m.blend, rule, blend)
        flagged |= set(int(c) for c in np.flatnonzero(b.flagged))
        score = max(score, b.backdoor_score if rule.method == "calibrated" else float(np.max(b.anomaly_index)))
    return Judged(m, tuple(sorted(flagged)), score)


def summary(judged: list[Judged]) -> dict:
    clean = [j for j in judged if not j.model.backdoored]
    bad = [j for j in judged if j.model.backdoored]
    fp = sum(bool(j.flagged) for j in clean)
    tp = sum(bool(j.flagged) for j in bad)
    found = sum(j.target_found for j in bad)
    det = sum(j.detected for j in judged)
    extra = sum(j.extra for j in judged)
    any_extra = sum(j.extra > 0 for j in judged)
    auc = roc_auc([j.score for j in bad], [j.score for j in clean])
    return {"models": len(judged), "clean": len(clean), "backdoored": len(bad),
            "accuracy": (det, len(judged)), "fpr": (fp, len(clean)), "tpr": (tp, len(bad)),
            "target_found": (found, len(bad)), "extra": (extra, any_extra, len(judged)),
            "auc": None if auc is None else (auc, len(bad), len(clean))}


# --------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class Sizes:
    """What a rule is fitted on: each class's size (small is suspicious), the model's pixel count for the
    population test, and the smallest size the logs tell apart."""

    of: Callable[[Model], np.ndarray]
    pixels: Callable[[Model], int]
    floor: float


PATCH = Sizes(lambda m: m.l1, lambda m: m.pixels, L1_FLOOR)  # the patch triggers' L1 norms, per pixel
BLEND = Sizes(lambda m: m.blend, lambda m: 1, AMPLITUDE_FLOOR)  # the blend amplitudes, already a fraction


def fit(models: list[Model], target_fpr: float, weights: tuple[float, ...] = WEIGHTS, sizes: Sizes = PATCH,
        prior: list[tuple[int, ...]] | None = None) -> OutlierRule:
    """The rule that detects most backdoors while flagging at most ``target_fpr`` of the clean models.

    The population test's null (``population_mean``, ``population_scale``) is fitted on the clean models among
    ``models`` (:func:`gate.outliers.population_fit`); then every (scale_floor, population_weight, alpha) of the
    grid is tried. Among the grid points that tie on (backdoors detected, true targets found, fewer extra flags),
    the (floor, weight) with the widest range of such alphas is taken (ties: the smaller weight, then the smaller
    floor), and the geometric middle of that range: the threshold sits as far from the clean models' scores as
    from the backdoored ones', not on the edge of either. ``sizes``: the patch L1 norms (default) or the blend
    amplitudes; ``prior`` (per model): classes another rule already flags, counted with this rule's flags in the
    detections (the blend rule is fitted on the gate's decision, patch flags and blend flags together); the
    false-positive bound is on this rule's own flags, so the two rules' rates add up to at most their sum."""
    clean = [m for m in models if not m.backdoored]
    base = OutlierRule(method="calibrated")
    if clean:
        mean, scale = population_fit([(sizes.of(m), sizes.pixels(m)) for m in clean], sizes.floor)
        base = replace(base, population_mean=mean, population_scale=max(scale, 1e-3))
    prior = prior or [()] * len(models)
    scored = []
    for floor in FLOORS:
        within = [leave_one_out_z(sizes.of(m), floor, sizes.floor) for m in models]
        population = [population_z(sizes.of(m), sizes.pixels(m), base, sizes.floor) for m in models]
        for weight in weights if clean else (0.0,):
            # the rule's per-class corrected p-values (what find_outliers computes), once per (floor, weight)
            q = [corrected_p(normal_upper_tail(combine_z(zw, zp, weight)), len(zw))
                 for zw, zp in zip(within, population, strict=True)]
            for alpha in ALPHAS:
                own = [tuple(int(c) for c in np.flatnonzero(qm <= alpha)) for qm in q]
                fp = sum(bool(f) for m, f in zip(models, own, strict=True) if not m.backdoored)
                if clean and fp > target_fpr * len(clean):
                    continue
                s = summary([Judged(m, tuple(sorted(set(before) | set(f))), 0.0)
                             for m, f, before in zip(models, own, prior, strict=True)])
                scored.append(((s["tpr"][0], s["target_found"][0], -s["extra"][0]), floor, weight, alpha))
    if not scored:
        return replace(base, alpha=ALPHAS[0], scale_floor=FLOORS[-1])
    best = max(key for key, *_ in scored)
    plateau: dict[tuple[float, float], list[float]] = {}
    for key, floor, weight, alpha in scored:
        if key == best:
            plateau.setdefault((floor, weight), []).append(alpha)
    floor, weight = max(plateau, key=lambda fw: (len(plateau[fw]), -fw[1], -fw[0]))
    alphas = sorted(plateau[(floor, weight)])
    return replace(base, alpha=alphas[len(alphas) // 2], scale_floor=floor, population_weight=weight)


def fit_blend(models: list[Model], rule: OutlierRule, target_fpr: float) -> BlendParams:
    """The blend amplitudes' calibration (:class:`gate.blend.BlendParams`), fitted as :func:`fit` fits the patch
    rule, on the models with a blend-mode scan, with the patch ``rule``'s flags on those scans counted beside
    it: the gate's decision flags a class when either mode does, and a backdoor the patch rule finds needs no
    blend flag. The blend flags' own false-positive rate is bounded by ``target_fpr`` (the gate's is at most the
    patch rule's plus that). The blend population (median and spread of the natural classes' log amplitudes) comes
    from their clean models."""
    ms = [m for m in models if m.blend is not None]
    if not ms:
        return BlendParams()
    prior = [tuple(int(c) for c in np.flatnonzero(find_outliers(m.blend_scan_l1, rule, pixels=m.pixels).flagged))
             for m in ms]
    r = fit(ms, target_fpr, sizes=BLEND, prior=prior)
    return replace(BlendParams(), **{name: getattr(r, name) for name in CALIBRATION})


def folds_of(models: list[Model], k: int, seed: int) -> list[int]:
    """A fold per model, stratified by dataset and clean/backdoored, seeded."""
    fold = [0] * len(models)
    rng = np.random.default_rng(seed)
    strata: dict = {}
    for i, m in enumerate(models):
        strata.setdefault((m.dataset, m.backdoored), []).append(i)
    offset = 0
    for key in sorted(strata):
        idx = strata[key]
        for j, i in enumerate(rng.permutation(idx)):
            fold[i] = (j + offset) % k
        offset += len(idx)
    return fold


def cross_validate(models: list[Model], k: int, target_fpr: float, seed: int = 0,
                   weights: tuple[float, ...] = WEIGHTS, blend: bool = False) -> tuple[list[Judged], list]:
    """Every model judged by a rule fitted on the other folds; the fitted rules, fold by fold. With ``blend``
    the fold's blend calibration is fitted too (:func:`fit_blend`, on the fold's models with a blend-mode scan)
    and the models with one are judged on it as the gate would judge their blend-mode scan; the rules are then
    (patch rule, blend calibration) pairs."""
    fold = folds_of(models, k, seed)
    judged: list[Judged | None] = [None] * len(models)
    rules = []
    for f in range(k):
        train = [m for m, g in zip(models, fold, strict=True) if g != f]
        rule = fit(train, target_fpr, weights)
        blend_params = fit_blend(train, rule, target_fpr) if blend else None
        rules.append((rule, blend_params) if blend else rule)
        for i, (m, g) in enumerate(zip(models, fold, strict=True)):
            if g == f:
                judged[i] = judge(m, rule, blend_params)
    return judged, rules


# --------------------------------------------------------------------------- tables
def _rule(r: OutlierRule | BlendParams) -> str:
    return (f"({r.scale_floor:g}, {r.population_weight:g}, {r.alpha:.2g}; {r.population_mean:.2f}, "
            f"{r.population_scale:.2f})")


def _rate(pair) -> str:
    k, n = pair
    if n == 0:
        return "-"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} % ({k}/{n}; {100 * lo:.0f}-{100 * hi:.0f})"


def _extra(t) -> str:
    extra, any_extra, n = t
    if n == 0:
        return "-"
    lo, hi = wilson(any_extra, n)
    return f"{extra / n:.2f} ({extra} on {any_extra}/{n} models; {100 * lo:.0f}-{100 * hi:.0f} % with any)"


def _auc(a) -> str:
    if a is None:
        return "-"
    auc, npos, nneg = a
    lo, hi = auc_interval(auc, npos, nneg)
    return f"{auc:.3f} ({npos}+{nneg}; {lo:.2f}-{hi:.2f})"


def table(rows: list[tuple[str, dict]], first: str) -> list[str]:
    head = [first, "models", "accuracy", "FPR (clean)", "TPR", "true target found", "extra flags / model",
            "ROC-AUC"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows:
        out.append(f"| {name} | {s['models']} ({s['clean']} clean) | {_rate(s['accuracy'])} | {_rate(s['fpr'])} | "
                   f"{_rate(s['tpr'])} | {_rate(s['target_found'])} | {_extra(s['extra'])} | {_auc(s['auc'])} |")
    return out


def blend_rows(ms: list[Model], judged: list[Judged], rule: OutlierRule, folds: int, target_fpr: float, seed: int,
               data: dict) -> list[str]:
    """On the models scanned with the blend mode too: the cross-validated patch rule alone, and the gate's
    decision on their blend-mode scan with the blend calibration fitted on the other folds beside it. ``rule``:
    the patch rule fitted on all of ``ms``, beside which the all-model blend calibration is fitted."""
    if not any(m.blend is not None for m in ms):
        return []
    both, rules = cross_validate(ms, folds, target_fpr, seed, blend=True)
    patch = [j for j in judged if j.model.blend is not None]
    both = [j for j in both if j.model.blend is not None]
    final = fit_blend(ms, rule, target_fpr)
    data["cv_blend_models_patch"], data["cv_blend_models_with_blend"] = summary(patch), summary(both)
    data["blend_fold_params"] = [b.to_dict() for _, b in rules]
    data["blend_final_params"] = final.to_dict()
    data["per_model_with_blend"] = [{"model": j.model.name, "flagged": list(j.flagged), "score": j.score,
                                     "targets": list(j.model.targets)} for j in both]
    rows = [("patch only (CV)", summary(patch)), ("patch + blend (CV)", summary(both))]
    for attack in sorted({j.model.attack for j in both}):
        rows.append((f"patch + blend (CV), {attack}", summary([j for j in both if j.model.attack == attack])))
    return ["", f"The {len(both)} models also scanned with the blend mode (--blend-records): the patch-only scan "
            "judged by the fold's patch rule, and the gate's decision on the --blend scan (its own patch L1 norms "
            "and its blend amplitudes, the blend calibration fitted on the other folds' blend scans):", "",
            *table(rows, "rule"), "",
            "Blend calibrations fitted per fold (scale_floor, population_weight, alpha; population median and spread "
            "of the log amplitude): " + ", ".join(_rule(b) for _, b in rules) + f"; on all models: {_rule(final)}.",
            *target_amplitude_rows(ms)]


def target_amplitude_rows(ms: list[Model]) -> list[str]:
    """Where the blend search puts each planted target of a full-image attack (blended, SIG): its amplitude, its
    rank among the model's classes (1: the smallest, the most suspicious) and its ratio to the median class."""
    rows = []
    for m in ms:
        if m.blend is None or not m.backdoored or m.attack in ("badnets", "multi"):
            continue
        a = np.asarray(m.blend, float)
        med = float(np.median(a))
        for t in m.targets:
            rows.append(f"| {m.name} | {m.attack} | {min(m.asr) if m.asr else 0:.2f} | {a[t]:.3f} | "
                        f"{int((a < a[t]).sum()) + 1} of {len(a)} | {med:.3f} | {a[t] / med:.2f} |")
    if not rows:
        return []
    return ["", "Where the blend search puts the planted targets of full-image attacks (every counted model of "
            "those attacks with a blend-mode scan):", "",
            "| model | attack | true ASR | target amplitude | rank | median amplitude | target / median |",
            "|---|---|---|---|---|---|---|", *rows]


def same_models_rows(by_method: dict[str, tuple[list[Judged], list[Judged]]], data: dict,
                     methods: tuple[str, ...] | None = None) -> list[str]:
    """The methods (all, or ``methods``) on the models that each of them scanned (each judged by its own
    cross-validated rule and by the paper's MAD rule): the side-by-side comparison, false positives on the same
    clean models included. Numbers go to ``data["same_models"]`` (all methods) or ``data["same_models_A_B"]``."""
    chosen = {m: v for m, v in by_method.items() if methods is None or m in methods}
    if len(chosen) < 2:
        return []
    common = set.intersection(*({j.model.name for j in judged} for judged, _ in chosen.values()))
    if not common:
        return []
    key = "same_models" if methods is None else "same_models_" + "_".join(chosen)
    rows, data[key] = [], {"models": sorted(common)}
    for method, (judged, mad) in chosen.items():
        for label, js in (("calibrated (CV)", judged), ("MAD (paper rule)", mad)):
            summ = summary([j for j in js if j.model.name in common])
            rows.append((f"{TITLES[method]} {label}", summ))
            data[key][f"{method} {label}"] = summ
    who = "every method" if methods is None else " and ".join(TITLES[m] for m in chosen)
    return ["", f"### Side by side on the {len(common)} models {who} scanned ({summ['clean']} clean)", "",
            "Each method's cross-validated rule is the one fitted on its own records (folds as above); the MAD rows "
            "need no fit.", "", *table(rows, "method, rule")]


def check_rows(checks: list[Model], fitted: OutlierRule, min_asr: float, data: dict,
               records: list[Model] = ()) -> list[str]:
    """Scans made with other settings (``--check-records``: B3D-SS at the product's 100 synthetic images per class)
    judged by the shipped rule and by the rule fitted on the method's records: per model, and totals; then, on the
    models with both, the two settings side by side under the shipped rule, with their queries per class (what the
    other setting costs, synthesis included)."""
    rows = [m for m in checks if attack_took(m, min_asr)]
    if not rows:
        return []
    side = _side_by_side(rows, records, data)
    rules = (("shipped rule", OutlierRule()), ("rule fitted on these B3D-SS records", fitted))
    judged = {name: [judge(m, r) for m in rows] for name, r in rules}
    out = ["", f"B3D-SS scans made with other settings (--check-records: {len(rows)} models) judged by the shipped "
           "rule and by the B3D-SS rule fitted on all the records above (a --synthetic "
           "calibration would ship it; these models' own 10-per-class scans were among its training data):", "",
           "| model | true targets | shipped rule: flagged (p) | B3D-SS fit: flagged (p) |", "|---|---|---|---|"]
    for i, m in enumerate(rows):
        cells = [f"{list(j[i].flagged) or 'none'} ({1 - j[i].score:.2g})" for j in judged.values()]
        out.append(f"| {m.name} | {list(m.targets) or 'none'} | " + " | ".join(cells) + " |")
    data["check_records"] = {name: summary(js) for name, js in judged.items()}
    return out + [""] + table(list(data["check_records"].items()), "rule") + side


def _side_by_side(checks: list[Model], records: list[Model], data: dict) -> list[str]:
    """The models scanned both ways, each way judged by the shipped rule, with its mean queries per class."""
    mine = {m.name: m for m in records}
    pairs = [(mine[m.name], m) for m in checks if m.name in mine]
    if not pairs:
        return []
    rows, costs = [], []
    ways = (("the records' scans", [a for a, _ in pairs]), ("the --check-records scans", [b for _, b in pairs]))
    for label, ms in ways:
        rows.append((label, summary([judge(m, OutlierRule()) for m in ms])))
        q = [m.queries_per_class for m in ms if m.queries_per_class is not None]
        costs.append(f"{label} {np.mean(q):,.0f}" if len(q) == len(ms) else f"{label} not recorded")
    data["check_side_by_side"] = {label: s for label, s in rows}
    return ["", f"The {len(pairs)} models with both scans, each judged by the shipped rule; queries per class, "
            "synthesis included: " + ", ".join(costs) + ".", ""] + table(rows, "scans")


def weak_rows(weak: list[Model], final: OutlierRule, title: str, min_asr: float, data: dict) -> list[str]:
    """Backdoored models whose attack did not take (true ASR under ``min_asr``) judged by the rule fitted on every
    counted model: none of them was in its fit, so this is out of sample. A partly learned backdoor still flips most
    triggered inputs; whether the gate sees it is worth knowing, apart from the counted figures."""
    if not weak:
        return []
    judged = sorted((judge(m, final) for m in weak), key=lambda j: -min(j.model.asr or (0.0,)))
    out = ["", f"{title}: the {len(weak)} backdoored models whose attack did not take (true ASR under {min_asr:.0%}, "
           "not counted above), judged by the rule fitted on all the counted models (none of these in its fit):", "",
           "| model | attack | true ASR | flagged | true target | p |", "|---|---|---|---|---|---|"]
    for j in judged:
        m = j.model
        out.append(f"| {m.name} | {m.attack} | {min(m.asr or (0.0,)):.2f} | {list(j.flagged) or 'none'} | "
                   f"{list(m.targets)} {'found' if j.target_found else 'missed'} | {1 - j.score:.2g} |")
    by_attack: dict[str, list[Judged]] = {}
    for j in judged:
        if min(j.model.asr or (0.0,)) >= 0.75:
            by_attack.setdefault(j.model.attack, []).append(j)
    data["not_taken"] = [{"model": j.model.name, "asr": min(j.model.asr or (0.0,)), "flagged": list(j.flagged),
                          "target_found": j.target_found, "score": j.score} for j in judged]
    if by_attack:
        out += ["", "With a true ASR of at least 75 %, true target found: " + ", ".join(
            f"{attack} {sum(j.target_found for j in js)}/{len(js)}" for attack, js in sorted(by_attack.items())) + "."]
    return out


def report(models: list[Model], folds: int, target_fpr: float, min_asr: float, seed: int,
           checks: list[Model] | None = None) -> tuple[str, dict]:
    lines, data = [], {}
    failed = [m for m in models if not attack_took(m, min_asr)]
    usable = [m for m in models if attack_took(m, min_asr)]
    by_method: dict[str, tuple[list[Judged], list[Judged]]] = {}
    for method in [m for m in TITLES if any(x.method == m for x in usable)]:
        ms = [m for m in usable if m.method == method]
        judged, rules = cross_validate(ms, folds, target_fpr, seed)
        within, _ = cross_validate(ms, folds, target_fpr, seed, weights=(0.0,))  # the rule before the population test
        final = fit(ms, target_fpr)
        mad = [judge(m, OutlierRule(method="mad")) for m in ms]
        # what a --synthetic scan gets today: the policy's one rule, fitted on B3D scans (never on B3D-SS scans)
        shipped = [judge(m, OutlierRule()) for m in ms] if method == "b3d-ss" else []
        by_method[method] = (judged, mad)
        title = TITLES[method]
        data[method] = {"final_rule": final.to_dict(), "fold_rules": [r.to_dict() for r in rules],
                        "cv": summary(judged), "cv_within_model_only": summary(within), "mad": summary(mad),
                        **({"shipped_b3d_rule": summary(shipped)} if shipped else {}),
                        "per_model": [{"model": j.model.name, "flagged": list(j.flagged), "score": j.score,
                                       "targets": list(j.model.targets)} for j in judged]}
        lines += ["", f"### {title}: calibrated rule (cross-validated, {folds} folds) and the paper's MAD rule", "",
                  "calibrated: within-model and population tests, weight fitted; within only: population_weight 0 "
                  "(fitted the same way)."
                  + (" shipped rule: the policy's default rule, fitted on B3D scans, never on these: what a scan "
                     "with this method is judged by today." if shipped else ""), ""]
        rows = []
        for ds in [*zoo.DATASETS, None]:
            name = zoo.DATASET_TITLES[ds] if ds else "all"
            of = (lambda js, ds=ds: [j for j in js if ds is None or j.model.dataset == ds])  # noqa: E731
            if of(judged):
                rows.append((f"{name} calibrated (CV)", summary(of(judged))))
                rows.append((f"{name} within only (CV)", summary(of(within))))
                rows.append((f"{name} MAD (paper rule)", summary(of(mad))))
                if shipped:
                    rows.append((f"{name} shipped rule (B3D's fit)", summary(of(shipped))))
        lines += table(rows, "rule")
        if method == "b3d-ss" and checks:
            lines += check_rows([m for m in checks if m.method == method], final, min_asr, data[method], ms)
        lines += blend_rows(ms, judged, final, folds, target_fpr, seed, data[method])
        lines += weak_rows([m for m in failed if m.method == method and m.backdoored], final, title, min_asr,
                           data[method])
        paper = ", ".join(f"{zoo.DATASET_TITLES[d]} {v[title]:.1f} %" for d, v in PAPER.items() if title in v)
        lines += ["", f"Paper ({title}, Table 2 detection accuracy): {paper}"
                  + (f"; false positives on 50 clean CIFAR-10 models: {PAPER_CLEAN_FP[title]}"
                     if title in PAPER_CLEAN_FP else "") + "."]
        lines += ["", "Rules fitted per fold (scale_floor, population_weight, alpha; population median and spread "
                  "of log(L1 / pixels)): " + ", ".join(_rule(r) for r in rules) + f"; on all models: {_rule(final)}."]
        for key, label in (("attack", "attack"), ("arch", "architecture")):
            groups = sorted({getattr(j.model, key) for j in judged})
            rows = [(g, summary([j for j in judged if getattr(j.model, key) == g])) for g in groups]
            lines += ["", f"{title}, calibrated (CV), by {label}:", ""] + table(rows, label)
    if len(by_method) > 2:  # the paper's comparison first: white-box NC against black-box B3D
        lines += same_models_rows(by_method, data, ("nc", "b3d"))
    lines += same_models_rows(by_method, data)
    if failed:
        lines += ["", "Not counted, the attack did not take (true ASR below "
                  f"{min_asr:.0%}): " + ", ".join(f"{m.name} ({m.method}, ASR {min(m.asr) if m.asr else 0:.2f})"
                                                  for m in failed) + "."]
    return "\n".join(lines).strip() + "\n", data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verdicts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", nargs="+", type=Path, default=[DEFAULT_RECORDS])
    ap.add_argument("--blend-records", nargs="+", type=Path, default=[],
                    help="records of the same models scanned with the blend mode (python -m bench.compare --blend)")
    ap.add_argument("--check-records", nargs="+", type=Path, default=[],
                    help="B3D-SS scans of some of the same models with other settings (e.g. --synthetic-per-class "
                         "100): judged by the shipped rule and by the B3D-SS rule fitted on --records")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--min-asr", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the numbers (and every model's CV verdict) here")
    ap.add_argument("--record", action="store_true", help="write the tables into bench/RESULTS.md")
    ap.add_argument("--results-md", type=Path, default=zoo.ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    models = with_blend(load_records(args.records), load_records(args.blend_records))
    if not models:
        print(f"error: no scan records in {', '.join(map(str, args.records))} (python -m bench.compare --wide)",
              file=sys.stderr)
        return 2
    if args.folds < 2:
        print("error: --folds must be at least 2", file=sys.stderr)
        return 2
    body, data = report(models, args.folds, args.target_fpr, args.min_asr, args.seed,
                        load_records(args.check_records))
    n = {m: sum(x.method == m for x in models) for m in TITLES}
    head = (f"{len({m.name for m in models})} models ({', '.join(f'{TITLES[k]} {v}' for k, v in n.items() if v)} "
            f"scans); target false-positive rate {args.target_fpr:.0%}; attacks with true ASR < {args.min_asr:.0%} "
            "not counted. Cells: rate (count; 95 % Wilson interval).")
    publish(head + "\n" + body, data, args, "bench.verdicts", SECTION, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
