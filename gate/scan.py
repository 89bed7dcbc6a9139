"""Scan every class of a model for a reversed trigger, then find the outliers (B3D).

All classes search at once. Each round, every running class asks for its candidates, the candidates of
many classes are stamped side by side into one buffer and answered by one model call, and each class is
told its losses. Budgets (queries, seconds) are checked before every model call and never exceeded; when
they cut the scan short it says so.

An optional bandit over classes (``bandit=True``) stops classes above the ``bandit_keep`` quantile of the
current L1 norms after ``bandit_warmup`` steps. It is off by default: measured on the forge's GTSRB
models, classes shrink late and in no fixed order, so a class stopped early keeps an L1 several times
its converged value; those upper bounds raise the median and the MAD and so bias both outlier rules
(false flags on clean models through the median rule, missed ones through the MAD rule). Without it
every class converges (or reaches max_steps), at 30-90k queries per class.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from gate import __version__
from gate.batch import make_batch
from gate.data import ImageSet
from gate.errors import DataError
from gate.kernels import group_cross_entropy, group_hits
from gate.oracle import Oracle
from gate.outliers import OutlierRule, find_outliers
from gate.progress import Progress
from gate.result import ClassResult, ScanResult, Triggers
from gate.search import SearchParams, TriggerSearch


@dataclass(frozen=True)
class ScanConfig:
    search: SearchParams = field(default_factory=SearchParams)
    outliers: OutlierRule = field(default_factory=OutlierRule)
    seed: int = 0
    max_images: int = 1000  # clean images used (search pool + held-out), sampled by seed
    held_out: int = 100  # images kept aside to measure each reversed trigger's attack success
    bandit: bool = False  # off by default: see the module docstring
    bandit_warmup: int = 100  # steps before the bandit may stop a class (lambda needs time to ramp)
    bandit_every: int = 20
    bandit_keep: float = 0.6  # classes at or below this quantile of L1 always keep searching
    max_queries: int | None = None  # for the whole scan (the oracle may hold its own, larger budget)
    max_seconds: float | None = None
    batch_images: int = 2048  # images per model call (each of the two stamped-candidate buffers)
    hard_examples: bool = True  # half of the next minibatch may be images the current trigger failed on

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("search")
        d.pop("outliers")
        return d


@dataclass
class _ClassRun:
    label: int
    state: object
    pool: np.ndarray  # indices of search images not already predicted as this class
    queries: int = 0
    seconds: float = 0.0
    ce: np.ndarray | None = None
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # eval images the trigger missed


def split_data(images: ImageSet, cfg: ScanConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (search pool, held-out) over at most ``max_images`` images."""
    n = len(images)
    order = rng.permutation(n)[: min(n, cfg.max_images)]
    held = min(cfg.held_out, len(order) // 5)
    if len(order) - held < 2:
        raise DataError(f"{images.source}: {n} images are too few to scan (need at least 10)")
    return order[held:], order[:held]


def scan(oracle: Oracle, images: ImageSet, cfg: ScanConfig = ScanConfig(), *, method: str = "b3d",
         progress: Progress | None = None, synthesis: dict | None = None) -> tuple[ScanResult, Triggers]:
    t_start = time.perf_counter()
    q_start = oracle.queries
    ort_start = oracle.ort_seconds
    progress = progress or Progress(enabled=False)
    k_classes = oracle.num_classes
    params = cfg.search
    search = TriggerSearch(oracle.image_shape, params)
    root = np.random.SeedSequence(cfg.seed)
    data_seq, *class_seqs = root.spawn(k_classes + 1)
    data_rng = np.random.default_rng(data_seq)

    search_idx, held_idx = split_data(images, cfg, data_rng)
    used = np.concatenate([search_idx, held_idx])
    budget = _Budget(oracle, cfg, q_start, t_start)
    budget.require(len(used), "predicting the clean images")
    preds = oracle.predict(images.x[used])
    pred_search, pred_held = preds[: len(search_idx)], preds[len(search_idx):]
    accuracy = None
    if images.y is not None:
        accuracy = float(np.mean(preds == images.y[used]))
    pool_x = np.ascontiguousarray(images.x[search_idx])
    held_x = np.ascontiguousarray(images.x[held_idx])

    # every class's candidates live in one array, so one kernel call stamps a whole round
    n_cand = params.candidates
    masks_all = np.empty((k_classes, n_cand, *oracle.image_shape[:2]), np.float32)
    patterns_all = np.empty((k_classes, n_cand, *oracle.image_shape), np.float32)
    sample_idx = np.zeros((k_classes, params.batch_size), np.int64)
    eval_idx = np.zeros((k_classes, params.eval_size), np.int64)
    runs = []
    for c in range(k_classes):
        pool = np.flatnonzero(pred_search != c)
        if len(pool) == 0:
            pool = np.arange(len(search_idx))
        state = search.init(np.random.default_rng(class_seqs[c]), masks_all[c], patterns_all[c])
        runs.append(_ClassRun(c, state, pool, ce=np.empty(n_cand - 1, np.float64)))

    per_class = params.queries_per_step
    capacity = max(cfg.batch_images, per_class)
    batches = (make_batch(oracle, capacity), make_batch(oracle, capacity))  # double-buffered
    runner = ThreadPoolExecutor(max_workers=1)  # one model call at a time, off the main thread
    sample_rows = (n_cand - 1) * params.batch_size
    reserve = k_classes * len(held_x)  # budget kept for measuring every trigger on held-out images
    hits = np.empty(1, np.float64)

    def tell_group(future, group) -> None:
        probs = future.result()
        for g, r in enumerate(group):
            rows = probs[g * per_class:(g + 1) * per_class]
            group_cross_entropy(rows[:sample_rows], r.label, params.batch_size, r.ce)
            trigger_rows = rows[sample_rows:]
            group_hits(trigger_rows, r.label, params.eval_size, hits)
            r.hard = eval_idx[r.label][trigger_rows.argmax(axis=1) != r.label]
            search.tell(r.state, r.ce, float(hits[0]))
            r.queries += per_class
    stop_reason = None
    step = 0
    progress.start(k_classes, params.max_steps)

    try:
        while True:
            active = [r for r in runs if not r.state.done]
            if not active:
                break
            cost = per_class * len(active)
            reason = budget.blocks(cost + reserve)
            if reason:
                stop_reason = reason
                for r in active:
                    search.stop(r.state, "budget")
                break
            # one round: every active class takes one step, many classes per model call. Model calls run in a
            # worker thread (ORT releases the GIL) while the next group is asked and stamped into the other
            # buffer, so sampling and stamping hide behind inference.
            t0 = time.perf_counter()
            per_call = max(1, capacity // per_class)
            pending = None
            for gi, start in enumerate(range(0, len(active), per_call)):
                group = active[start:start + per_call]
                for r in group:
                    search.ask(r.state)  # writes the samples, then the current trigger, into masks_all[c]
                    rng = r.state.rng
                    sample_idx[r.label] = rng.choice(r.pool, params.batch_size, replace=len(r.pool) < params.batch_size)
                    if cfg.hard_examples and len(r.hard):  # images the current trigger just failed on
                        n_hard = min(len(r.hard), params.batch_size // 2)
                        sample_idx[r.label, :n_hard] = r.hard[:n_hard]
                    eval_idx[r.label] = rng.choice(r.pool, params.eval_size, replace=len(r.pool) < params.eval_size)
                batch = batches[gi % 2]
                batch.add_classes(pool_x, np.array([r.label for r in group], np.int64), sample_idx, eval_idx,
                                  masks_all, patterns_all)
                future = runner.submit(batch.run)
                if pending is not None:
                    tell_group(*pending)
                pending = (future, group)
            tell_group(*pending)
            share = (time.perf_counter() - t0) / len(active)
            for r in active:
                r.seconds += share
                if r.state.done:
                    progress.class_done(r.label, r.state, r.queries)
            step += 1
            if cfg.bandit and step >= cfg.bandit_warmup and step % cfg.bandit_every == 0:
                _bandit(runs, search, cfg.bandit_keep, progress)
            progress.step(step, runs, oracle.queries - q_start)
    finally:
        runner.shutdown()
    # measure each class's reversed trigger on the held-out images
    results, masks, patterns = _finish(runs, held_x, pred_held, batches[0], budget, oracle.image_shape)
    l1 = np.array([c.l1 for c in results])
    out = find_outliers(l1, cfg.outliers)
    for c, idx, flag in zip(results, out.anomaly_index, out.flagged, strict=True):
        c.anomaly_index = float(idx) if np.isfinite(idx) else (1e9 if idx > 0 else -1e9)
        c.flagged = bool(flag)
    flagged = [c.label for c in results if c.flagged]
    complete = stop_reason is None
    verdict = "reject" if flagged and complete else ("review" if not complete else "accept")
    progress.finish(flagged, verdict)

    total_q = oracle.queries - q_start
    seconds = time.perf_counter() - t_start
    synth_q = (synthesis or {}).get("queries", 0)
    synth_s = (synthesis or {}).get("seconds", 0.0)
    result = ScanResult(
        model=oracle.describe(),
        input_spec=oracle.spec.to_dict(),
        providers=oracle.providers,
        method=method,
        seed=cfg.seed,
        search={**params.to_dict(), **cfg.to_dict()},
        outliers={"anomaly_threshold": cfg.outliers.anomaly_threshold, "median_ratio": cfg.outliers.median_ratio,
                  "median_l1": out.median, "mad": out.mad},
        data={"source": images.source, "images": int(len(images)), "search_pool": int(len(search_idx)),
              "held_out": int(len(held_idx)), "clean_accuracy": accuracy},
        classes=results,
        flagged=flagged,
        complete=complete,
        stop_reason=stop_reason,
        queries={"total": int(total_q + synth_q), "scan": int(total_q), "synthesis": int(synth_q),
                 "per_class_mean": float(total_q / k_classes)},
        seconds={"total": seconds + synth_s, "scan": seconds, "synthesis": synth_s,
                 "ort": oracle.ort_seconds - ort_start,
                 "ort_fraction": (oracle.ort_seconds - ort_start) / seconds if seconds > 0 else 0.0},
        synthesis=synthesis,
        verdict=verdict,
        tool={"name": "backdoor-gate", "version": __version__},
    )
    triggers = Triggers(np.arange(k_classes), masks, patterns, np.array([c.flagged for c in results]))
    return result, triggers


class _Budget:
    def __init__(self, oracle: Oracle, cfg: ScanConfig, q_start: int, t_start: float) -> None:
        self.oracle, self.cfg, self.q_start, self.t_start = oracle, cfg, q_start, t_start

    def left(self) -> float:
        lefts = [np.inf]
        if self.cfg.max_queries is not None:
            lefts.append(self.cfg.max_queries - (self.oracle.queries - self.q_start))
        if self.oracle.remaining is not None:
            lefts.append(self.oracle.remaining)
        return min(lefts)

    def blocks(self, n: int) -> str | None:
        """Why ``n`` more queries cannot be sent now, or None."""
        if n > self.left():
            return f"query budget reached ({self.oracle.queries - self.q_start} queries sent)"
        if self.cfg.max_seconds is not None and time.perf_counter() - self.t_start > self.cfg.max_seconds:
            return f"time budget of {self.cfg.max_seconds:g} s reached"
        return None

    def require(self, n: int, what: str) -> None:
        from gate.errors import QueryBudgetExceeded

        if n > self.left():
            raise QueryBudgetExceeded(f"query budget too small: {what} needs {n} queries, {self.left():.0f} left")


def _bandit(runs: list[_ClassRun], search: TriggerSearch, keep: float, progress: Progress) -> None:
    scores = np.array([r.state.result_trigger()[2] for r in runs])
    cut = np.quantile(scores, keep)
    for r, s in zip(runs, scores, strict=True):
        if not r.state.done and s > cut and r.state.best_mask is not None:
            search.stop(r.state, "bandit_stopped")
            progress.class_done(r.label, r.state, r.queries)


def _finish(runs, held_x, pred_held, batch, budget, image_shape):
    h, w, _ = image_shape
    masks = np.stack([r.state.result_trigger()[0] for r in runs]).astype(np.float32)
    patterns = np.stack([r.state.result_trigger()[1] for r in runs]).astype(np.float32)
    asr = [None] * len(runs)
    n = len(held_x)
    if n and budget.left() >= n * len(runs):
        per_call = max(1, batch.capacity // n)
        for start in range(0, len(runs), per_call):
            group = runs[start:start + per_call]
            slots = [batch.add_stamped(held_x, masks[r.label:r.label + 1], patterns[r.label:r.label + 1])
                     for r in group]
            probs = batch.run()
            for r, rows in zip(group, slots, strict=True):
                keep = pred_held != r.label
                pred = probs[rows].argmax(axis=1)
                asr[r.label] = float(np.mean(pred[keep] == r.label)) if keep.any() else None
                r.queries += n
    results = []
    for r in runs:
        _, _, l1 = r.state.result_trigger()
        results.append(ClassResult(
            label=r.label, l1=float(l1), binary_l1=int((masks[r.label] >= 0.5).sum()),
            mask_fraction=float(l1 / (h * w)), trigger_asr=asr[r.label], queries=int(r.queries),
            steps=int(r.state.step), status=r.state.status, seconds=float(r.seconds)))
    return results, masks, patterns
