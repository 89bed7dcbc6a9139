"""Would an additive full-image trigger search find SIG backdoors? A probe before building one into the kernels.

    python -m bench.additive_probe --models w_cifar_resnet_bn_sig_27 w_cifar_resnet_bn_clean_24 ... \\
        --out bench/additive_probe [--stamps additive blend] [--resume] [--record]

The blend mode (:mod:`gate.blend`) stamps (1 - a) x + a p: it finds blended backdoors, but SIG's trigger is
a signal *added* to the image, x + d sin(...), which a blend can only express by fading the image as well
(the blend scans rank SIG targets 6th-8th of 10: bench/RESULTS.md). The candidate fix is an additive mode,
clip(x + a (2p - 1), 0, 1): one amplitude a, a full-image pattern p. It needs a stamping variant in every
kernel (CPU, planar, CUDA, the shield), so this probe measures first whether it would help:

* **the planted trigger's own strength**: the attack success of the planted full-image trigger (SIG's
  delta, a blend's alpha) scaled by 0.5-4x on clean images not of the target class; ``at 99 %`` is the
  smallest tested strength whose success reaches the search's threshold, in the additive amplitude's
  units (SIG: d; a blend's alpha is not an additive amplitude and is shown as it is).
* **each class's smallest working amplitude** from the blend search's own ask/tell
  (:class:`gate.blend.BlendSearch`: same sampling, lambda schedule, early stop and success rule) with the
  candidates stamped additively (``--stamps additive``) or as the gate's blend (``--stamps blend``), in
  NumPy here and sent through :class:`gate.oracle.Oracle`: the target's rank and its ratio to the median,
  the smallest natural class's ratio on clean models (how small natural classes come).

A search mode is worth building only if the planted targets stand apart from the natural classes by more
than the clean models' own smallest classes do. Per-model JSON in ``--out`` (``--resume`` skips models done).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import zoo
from bench.compare import RESULTS_MD, publish
from gate.blend import BlendParams, BlendSearch
from gate.kernels import blend
from gate.search import SearchParams

SECTION = "## An additive full-image search: a probe on SIG and blended models"
STAMPS = ("additive", "blend")
STRENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def stamp_additive(images: np.ndarray, amplitude: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """clip(x + a (2p - 1), 0, 1) for every (candidate, image): images (B, H, W, C), amplitude (n,),
    patterns (n, H, W, C) -> (n, B, H, W, C)."""
    a = np.asarray(amplitude, np.float32)[:, None, None, None, None]
    return np.clip(images[None] + a * (2 * patterns[:, None] - 1), 0, 1)


def stamp_blend(images: np.ndarray, amplitude: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """(1 - a) x + a p for every (candidate, image): the gate's own stamping formula (:func:`gate.kernels.blend`)."""
    return blend(images[None], np.asarray(amplitude, np.float32)[:, None, None, None, None], patterns[:, None])


STAMPERS = {"additive": stamp_additive, "blend": stamp_blend}


def class_amplitude(oracle, pool: np.ndarray, label: int, stamper, params: SearchParams,
                    rng: np.random.Generator) -> tuple[float, int, str]:
    """(smallest working amplitude, steps, status) of one class's search; 1.0 when no trigger worked."""
    search = BlendSearch(pool.shape[1:], params, BlendParams())
    state = search.init(rng)
    k = oracle.num_classes
    while not state.done:
        masks, patterns = search.ask(state)
        amps = masks[:, 0, 0]
        batch = pool[rng.choice(len(pool), params.batch_size, replace=False)]
        stamped = stamper(batch, amps, patterns)
        n, b = stamped.shape[:2]
        log_p = oracle.run_encoded(oracle.encode(stamped.reshape(n * b, *pool.shape[1:])), log=True)
        ce = -log_p.reshape(n, b, k)[:, :, label].mean(axis=1)
        held = pool[rng.choice(len(pool), params.eval_size, replace=False)]
        pred = oracle.predict(stamper(held, amps[-1:], patterns[-1:])[0])
        search.tell(state, ce, float(np.mean(pred == label)))
    return float(state.result_amplitude), int(state.step), state.status


def planted_strength(oracle, images: np.ndarray, labels: np.ndarray, trigger: dict,
                     threshold: float) -> dict:
    """Attack success of the planted trigger at each multiple of its strength, and the least strength reaching
    ``threshold`` (None if none of :data:`STRENGTHS` does)."""
    from models.triggers import apply_trigger

    key = {"sig": "delta", "blend": "alpha"}[trigger["kind"]]
    keep = labels != trigger["target"]
    rows, least = [], None
    for mult in STRENGTHS:
        t = {**trigger, key: float(trigger[key]) * mult}
        rate = float(np.mean(oracle.predict(apply_trigger(images[keep], t)) == trigger["target"]))
        rows.append({"strength": t[key], "success": rate})
        if least is None and rate >= threshold:
            least = t[key]
    return {"kind": trigger["kind"], "parameter": key, "planted": float(trigger[key]), "rows": rows,
            "least_working": least}


def probe(name: str, stamps: list[str], seed: int, threads: int, max_steps: int | None) -> dict:
    man = zoo.load_manifest(zoo.manifest_path(name, zoo.WIDE_ZOO_DIR))
    oracle = zoo.open_oracle(man, threads=threads)
    data = zoo.clean_data(man["dataset"], seed=seed, manifest=man)
    params = SearchParams() if max_steps is None else SearchParams(max_steps=max_steps)
    x, y = data.scan.x, data.scan.y
    out = {"model": name, "dataset": man["dataset"], "arch": man["arch"], "attack": man["attack"],
           "targets": zoo.targets(man), "asr": man.get("asr"), "seed": seed, "max_steps": params.max_steps,
           "stamps": {}, "planted": []}
    full_image = [t for t in man.get("triggers") or [] if t["kind"] in ("sig", "blend")]
    out["planted"] = [planted_strength(oracle, data.eval.x, data.eval.y, t, params.success_threshold)
                      for t in full_image]
    for stamp in stamps:
        root = np.random.SeedSequence([seed, STAMPS.index(stamp)])
        t0 = time.perf_counter()
        amps, steps = [], []
        q0 = oracle.queries
        for label, seq in enumerate(root.spawn(oracle.num_classes)):
            pool = x[y != label]
            a, s, _ = class_amplitude(oracle, pool, label, STAMPERS[stamp], params, np.random.default_rng(seq))
            amps.append(a)
            steps.append(s)
        out["stamps"][stamp] = {"amplitudes": amps, "steps": steps, "queries": oracle.queries - q0,
                                "seconds": round(time.perf_counter() - t0, 1)}
    return out


def summary(rec: dict, stamp: str) -> dict:
    amps = np.array(rec["stamps"][stamp]["amplitudes"])
    median = float(np.median(amps))
    order = np.argsort(amps, kind="stable")
    rank = {int(c): int(np.where(order == c)[0][0]) + 1 for c in rec["targets"]}
    return {"median": median, "min_ratio": float(amps.min() / median),
            "targets": {c: {"amplitude": float(amps[c]), "rank": rank[c], "ratio": float(amps[c] / median)}
                        for c in rec["targets"]}}


def table(records: list[dict], stamps: list[str]) -> str:
    lines = ["| model | attack | true ASR | planted strength at 99 % | stamp | target amplitude | rank | median | "
             "target / median | smallest / median |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        planted = "; ".join(f"{p['parameter']} {p['least_working']:.3f} (planted {p['planted']:.3f})"
                            if p["least_working"] is not None else f"{p['parameter']} > {4 * p['planted']:.3f}"
                            for p in rec["planted"]) or "-"
        asr = ", ".join(f"{a:.2f}" for a in rec["asr"] or []) or "-"
        for stamp in stamps:
            if stamp not in rec["stamps"]:
                continue
            s = summary(rec, stamp)
            k = len(rec["stamps"][stamp]["amplitudes"])
            tgt = "; ".join(f"{t['amplitude']:.3f}" for t in s["targets"].values()) or "-"
            rank = "; ".join(f"{t['rank']} of {k}" for t in s["targets"].values()) or "-"
            ratio = "; ".join(f"{t['ratio']:.2f}" for t in s["targets"].values()) or "-"
            lines.append(f"| {rec['model']} | {rec['attack']} | {asr} | {planted} | {stamp} | {tgt} | {rank} | "
                         f"{s['median']:.3f} | {ratio} | {s['min_ratio']:.2f} |")
    clean = [r for r in records if not r["targets"]]
    for stamp in stamps:
        ratios = [summary(r, stamp)["min_ratio"] for r in clean if stamp in r["stamps"]]
        hits = [(r["model"], t) for r in records if r["targets"] and stamp in r["stamps"]
                for t in summary(r, stamp)["targets"].values()]
        if ratios and hits:
            below = sum(t["ratio"] < min(ratios) for _, t in hits)
            lines += ["", f"{stamp}: clean models' smallest class at {min(ratios):.2f}-{max(ratios):.2f}x their "
                      f"median ({len(ratios)} models); planted targets below the lowest of those: {below} of "
                      f"{len(hits)}; ranked first: {sum(t['rank'] == 1 for _, t in hits)} of {len(hits)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.additive_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--stamps", nargs="+", choices=STAMPS, default=list(STAMPS))
    ap.add_argument("--out", type=Path, default=Path("bench/additive_probe"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per class at most (default: the search's)")
    ap.add_argument("--resume", action="store_true", help="keep models already probed in --out")
    ap.add_argument("--json", type=Path, help="write every model's record here too")
    ap.add_argument("--record", action="store_true", help=f"write the table into bench/RESULTS.md ({SECTION})")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    found, missing = zoo.available(args.models, zoo.WIDE_ZOO_DIR)
    if missing:
        ap.error(f"not in the wide zoo (python -m models.forge --wide-zoo builds it): {' '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in found:
        path = args.out / f"{name}.json"
        rec = json.loads(path.read_text()) if args.resume and path.exists() else None
        steps = args.max_steps or SearchParams().max_steps
        if (rec is None or any(s not in rec["stamps"] for s in args.stamps) or rec["seed"] != args.seed
                or rec.get("max_steps", SearchParams().max_steps) != steps):
            rec = probe(name, args.stamps, args.seed, args.threads, args.max_steps)
            path.write_text(json.dumps(rec, indent=1))
            print(f"{name}: " + ", ".join(f"{s} {rec['stamps'][s]['seconds']:.0f}s" for s in args.stamps),
                  file=sys.stderr, flush=True)
        records.append(rec)
    publish(table(records, args.stamps), records, args, "bench.additive_probe", SECTION, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
