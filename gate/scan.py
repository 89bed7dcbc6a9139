"""Scan every class of a model for a reversed trigger, then find the outliers (B3D).

All classes search at once. Each round, every running class asks for its candidates, the candidates of
many classes are stamped side by side into one buffer and answered by one model call, and each class is
told its losses. A round's classes go out in a few near-equal calls (about ``PIPELINE_ROWS`` images each),
two buffers in turn: while one call runs, the next group is sampled and stamped and the previous one told.
Budgets (queries, seconds) are checked before every model call and never exceeded; when they cut the scan
short it says so.

The engine is an object with the life of one scan: set-up (``ScanEngine(...)``: data split, clean
predictions, buffers, one search per class), ``round()`` (every running class asks, the candidates are
stamped and answered, each class is told its losses), ``finish()`` (each reversed trigger measured on the
held-out images, the report's stamped examples read off that same pass, outliers) and ``result()``. The
query budget (:class:`gate.budget.QueryBudget`) and the bandit (:class:`gate.bandit.Bandit`) are its
collaborators; progress goes out as typed events (:mod:`gate.progress`). The scan has no verdict:
:func:`gate.decision.decide` is the only one.

An optional bandit over classes (``bandit=True``) stops classes above the ``bandit_keep`` quantile of the
current L1 norms after ``bandit_warmup`` steps. It is off by default: measured on the forge's GTSRB
models, classes shrink late and in no fixed order, so a class stopped early keeps an L1 several times
its converged value; those upper bounds raise the median and the MAD and so bias both outlier rules
(false flags on clean models through the median rule, missed ones through the MAD rule). Without it
every class converges (or reaches max_steps), at 30-90k queries per class.

With ``blend=True`` every class also runs a :class:`gate.blend.BlendSearch` (a faint full-image blend
trigger, which B3D's patch masks cannot express), interleaved with the patch searches: each class's two
searches are two runs of the same rounds (the arrays hold a slot per run, a model call answers both), the
query budget and its held-out reserve cover both, and each blend trigger is measured on the held-out
images too. The blend amplitudes get the outlier rule of their own (:func:`gate.blend.blend_outliers`); a
class is flagged when either mode flags it (``ClassResult.patch_flagged`` / ``blend_flagged`` say which).
The patch searches draw from the same random streams as without the blend mode, so on one machine their L1s
are those of a patch-only scan bit for bit (measured). Across machines they are not: the search amplifies the
last-bit differences of another CPU's float kernels (bench/RESULTS.md, "Scan L1s across machines").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gate import __version__
from gate.bandit import Bandit
from gate.batches import make_batch
from gate.blend import BlendParams, BlendSearch, BlendState, blend_outliers, blend_summary
from gate.budget import QueryBudget
from gate.checkpoint import restore_state, state_to_dict
from gate.data import ImageSet
from gate.errors import DataError, GateError
from gate.grid import Grid
from gate.kernels import group_cross_entropy, group_hits
from gate.oracle import Oracle
from gate.outliers import OutlierRule, find_outliers, finite_index, outlier_summary
from gate.progress import ClassFinished, Progress, RoundFinished, ScanStarted
from gate.result import ClassResult, ExampleRow, ScanResult, Triggers
from gate.screening import SCREENED_OUT, Screening, ScreeningParams
from gate.search import SearchParams, SearchState, TriggerSearch
from gate.settings import Settings, boolean, integer, number, optional, setting

MIN_IMAGES = 10  # clean images a scan needs at least (search pool + held-out)
PIPELINE_ROWS = 1024  # a round's model calls carry about this many images when there are enough (Scan._groups)


@dataclass(frozen=True)
class ScanConfig(Settings):
    """How the scan over all classes runs; ``search`` and ``outliers`` hold the per-class and outlier settings."""

    SECTION = "search"

    search: SearchParams = field(default_factory=SearchParams)
    outliers: OutlierRule = field(default_factory=OutlierRule)
    blend_params: BlendParams = field(default_factory=BlendParams)
    screening_params: ScreeningParams = field(default_factory=ScreeningParams)
    seed: int = setting(0, integer(0), "random seed: same seed, model, data and policy -> same report (on a CPU of the "
                        "same SIMD kind: another CPU's float kernels round differently, like another seed)")
    max_images: int = setting(1000, integer(MIN_IMAGES), "clean images used at most (search pool + held-out)",
                              place="data.max_images")
    held_out: int = setting(100, integer(0), "images kept aside to measure each trigger's attack success",
                            place="data.held_out")
    bandit: bool = setting(False, boolean, "stop classes above the bandit_keep L1 quantile after bandit_warmup "
                           "steps (off: early-stopped L1s are upper bounds that bias the median and MAD)")
    bandit_warmup: int = setting(100, integer(1), "steps before the bandit may stop a class")
    bandit_every: int = setting(20, integer(1), "steps between bandit decisions")
    bandit_keep: float = setting(0.6, number(0, 1), "classes at or below this L1 quantile always keep searching")
    max_queries: int | None = setting(None, optional(integer(1)), "images sent to the model at most, or null",
                                      place="budget.max_queries")
    max_seconds: float | None = setting(None, optional(number(0, lo_open=True)), "seconds of search, or null",
                                        place="budget.max_seconds")
    batch_images: int = setting(2048, integer(1), "images per model call (each of the two stamped buffers)",
                                flag=False)
    hard_examples: bool = setting(True, boolean, "half of the next minibatch may be images the trigger failed on")
    blend: bool = setting(False, boolean, "also search every class for a faint full-image blend trigger (the blend "
                          "section's settings), with an outlier test of its own; about twice the queries")
    screening: bool = setting(False, boolean, "screen every class for the screening section's steps, search to "
                              "convergence only a random reference sample and the classes that could be outliers "
                              "(gate.screening)")

    @property
    def modes(self) -> int:
        """Searches per class: the patch search, and the blend search when it is on."""
        return 2 if self.blend else 1

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("search")
        d.pop("outliers")
        d.pop("blend_params")
        d.pop("screening_params")
        return d


@dataclass
class ClassSearch:
    """One search of one class inside a scan (its patch search, or its blend search)."""

    label: int  # the target class
    slot: int  # its row in the scan's candidate arrays (label for patch searches, K + label for blend ones)
    search: TriggerSearch  # TriggerSearch or BlendSearch: the same ask/tell
    state: SearchState | BlendState
    pool: np.ndarray  # indices of search images not already predicted as this class
    ce: np.ndarray  # this step's candidate losses
    queries: int = 0
    seconds: float = 0.0
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # eval images the trigger missed

    @property
    def mode(self) -> str:
        return "blend" if isinstance(self.search, BlendSearch) else "patch"

    def finished(self) -> ClassFinished:
        if self.mode == "blend":
            return ClassFinished(self.label, self.state.step, self.state.last_success,
                                 self.state.result_amplitude, self.queries, self.state.status, "blend")
        return ClassFinished(self.label, self.state.step, self.state.last_success, self.state.result_l1, self.queries,
                             self.state.status)


@dataclass
class ScanOutput:
    result: ScanResult
    triggers: Triggers
    examples: dict[int, list[ExampleRow]]  # per class: held-out images with its trigger stamped (no extra query)


@dataclass
class ClassOutcome:
    """One class's searches as they ended, before any comparison across classes: what a part of a scan
    (:class:`ScanEngine` with ``labels``, e.g. a Ray worker's) hands to :func:`assemble`."""

    result: ClassResult  # anomaly index, p-value and flags not yet set
    mask: np.ndarray  # (H, W) the reversed patch trigger's soft mask
    pattern: np.ndarray  # (H, W, C)
    blend_pattern: np.ndarray | None = None  # the blend search's pattern (blend mode only)
    examples: list[ExampleRow] = field(default_factory=list)


@dataclass
class ScanFacts:
    """What a scan knows besides its classes: the data it used, why it stopped early, its cost."""

    data: dict  # source, images, search_pool, held_out, clean_accuracy
    stop_reason: str | None
    queries: int
    seconds: float
    ort_seconds: float


def split_data(images: ImageSet, cfg: ScanConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (search pool, held-out) over at most ``max_images`` images."""
    n = len(images)
    if n < MIN_IMAGES:
        raise DataError(f"{images.source}: {n} images are too few to scan (need at least {MIN_IMAGES})")
    order = rng.permutation(n)[: min(n, cfg.max_images)]
    held = min(cfg.held_out, len(order) // 5)
    return order[held:], order[:held]


def buffer_bytes(oracle: Oracle, cfg: ScanConfig, images: int) -> int:
    """Bytes the scan allocates up front: two stamped batches, every class's candidates, the clean images."""
    h, w, c = oracle.image_shape
    rows = max(cfg.batch_images, cfg.search.queries_per_step)
    per_image = 4 * h * w * c
    candidates = cfg.modes * oracle.num_classes * cfg.search.candidates * 4 * h * w * (c + 1)
    return 2 * rows * per_image + candidates + 2 * images * per_image


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(oracle: Oracle, cfg: ScanConfig, images: int) -> None:
    """Refuse, before any query, a scan whose buffers would not fit in this machine's memory."""
    need, have = buffer_bytes(oracle, cfg, images), available_memory()
    if have is not None and need > have:
        h, w, c = oracle.image_shape
        raise GateError(f"the scan needs {need / 2**30:.1f} GiB of buffers for {oracle.num_classes} classes of "
                        f"{h}x{w}x{c} images but {have / 2**30:.1f} GiB are available (lower --max-batch, or "
                        f"scan on a larger machine)")


class ScanEngine:
    """All classes' trigger searches against one model (see the module docstring)."""

    def __init__(self, oracle: Oracle, images: ImageSet, cfg: ScanConfig = ScanConfig(), *, method: str = "b3d",
                 progress: Progress | None = None, examples: int = 0, labels: Sequence[int] | None = None) -> None:
        """``labels``: search these classes only (a part of a distributed scan), each with the random stream
        and the search the whole scan gives it; :meth:`outcomes` then holds them and :func:`assemble` over
        every part's outcomes gives the whole scan's result. Screening and the bandit decide across classes,
        so they need all of them."""
        self.t_start = time.perf_counter()
        self.ort_start = oracle.ort_seconds
        self.oracle, self.images, self.cfg, self.method = oracle, images, cfg, method
        self.progress = progress or Progress(enabled=False)
        self.examples_per_class = examples
        self.params = params = cfg.search
        self.search = TriggerSearch(oracle.image_shape, params)
        self.blend = BlendSearch(oracle.image_shape, params, cfg.blend_params) if cfg.blend else None
        self.budget = QueryBudget(oracle, cfg.max_queries, cfg.max_seconds)
        self.bandit = Bandit(cfg.bandit_warmup, cfg.bandit_every, cfg.bandit_keep) if cfg.bandit else None
        k_classes = oracle.num_classes
        self.labels = list(range(k_classes)) if labels is None else sorted({int(c) for c in labels})
        if labels is not None:
            if not self.labels or not all(0 <= c < k_classes for c in self.labels):
                raise GateError(f"labels {list(labels)} are not a non-empty subset of the model's {k_classes} classes")
            if cfg.screening or cfg.bandit:
                raise GateError("screening and the bandit decide across classes: they need every class, not labels")
        n_runs = len(self.labels)
        root = np.random.SeedSequence(cfg.seed)
        data_seq, *class_seqs = root.spawn(k_classes + 1)

        self.search_idx, self.held_idx = split_data(images, cfg, np.random.default_rng(data_seq))
        check_memory(oracle, cfg, len(self.search_idx) + len(self.held_idx))
        used = np.concatenate([self.search_idx, self.held_idx])
        self.budget.require(len(used), "predicting the clean images")
        clean_probs = oracle.probs(images.x[used])
        preds = clean_probs.argmax(axis=1)
        pred_search, self.pred_held = preds[: len(self.search_idx)], preds[len(self.search_idx):]
        self.accuracy = None if images.y is None else float(np.mean(preds == images.y[used]))
        self.pool_x = np.ascontiguousarray(images.x[self.search_idx])
        self.held_x = np.ascontiguousarray(images.x[self.held_idx])

        # every search's candidates live in one array (a slot per search), so one kernel call stamps a round
        n_cand = params.candidates
        slots = cfg.modes * n_runs
        self.grid = self.search.grid  # the masks and patterns live on it (gate.grid), both modes'
        self.masks = np.empty((slots, n_cand, *self.search.shape[:2]), np.float32)
        self.rows_per_class = params.queries_per_step
        self.capacity = max(cfg.batch_images, self.rows_per_class)
        self.batches = (make_batch(oracle, self.capacity), make_batch(oracle, self.capacity))  # double-buffered
        # laid out as the stamping kernel reads it best (channels first for a channels-first model on the CPU)
        self.patterns = self.batches[0].planar_patterns((slots, n_cand, *self.search.shape))
        self.sample_idx = np.zeros((slots, params.batch_size), np.int64)
        self.eval_idx = np.zeros((slots, params.eval_size), np.int64)
        pools = []
        for c in self.labels:
            pool = np.flatnonzero(pred_search != c)
            pools.append(pool if len(pool) else np.arange(len(self.search_idx)))
        # slot i: the i-th label's patch search, n_runs + i its blend search (with every class: slot = label)
        self.classes: list[ClassSearch] = [self._run(c, i, self.search, class_seqs[c], pools[i])
                                           for i, c in enumerate(self.labels)]
        self.blends: list[ClassSearch] = []  # the blend searches, class by class (empty: blend mode off)
        if self.blend is not None:  # their own streams, spawned after the patch searches' (which stay as they are)
            blend_seqs = root.spawn(k_classes)
            self.blends = [self._run(c, n_runs + i, self.blend, blend_seqs[c], pools[i])
                           for i, c in enumerate(self.labels)]
        self.runs = self.classes + self.blends
        self.screening: Screening | None = None
        if cfg.screening:
            h, w, _ = oracle.image_shape
            screening = Screening.start(k_classes, cfg.screening_params, cfg.outliers, cfg.seed,
                                        clean_probs[: len(self.search_idx)], pixels=h * w)
            self.screening = screening if screening.active else None

        self.sample_rows = (n_cand - 1) * params.batch_size
        self.reserve = len(self.runs) * len(self.held_x)  # kept for measuring every trigger on held-out images
        self._hits = np.empty(1, np.float64)
        self.step = 0
        self.stop_reason: str | None = None
        self._finished: tuple | None = None
        self.progress.emit(ScanStarted(n_runs, params.max_steps))

    def _run(self, label: int, slot: int, search: TriggerSearch, seq: np.random.SeedSequence,
             pool: np.ndarray) -> ClassSearch:
        state = search.init(np.random.default_rng(seq), self.masks[slot], self.patterns[slot])
        return ClassSearch(label, slot, search, state, pool, ce=np.empty(self.params.candidates - 1, np.float64))

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything the next round depends on, as (JSON data, arrays): see :mod:`gate.checkpoint`."""
        arrays: dict[str, np.ndarray] = {}
        runs = []
        for i, r in enumerate(self.runs):
            arrays[f"r{i}.hard"] = r.hard
            runs.append({"label": r.label, "slot": r.slot, "mode": r.mode, "queries": r.queries, "seconds": r.seconds,
                         "state": state_to_dict(r.state, f"r{i}", arrays)})
        meta = {"step": self.step, "spent": self.budget.spent, "elapsed": time.perf_counter() - self.budget.t_start,
                "runs": runs}
        if self.screening is not None:
            meta["screening"] = self.screening.to_dict()
        return meta, arrays

    def restore(self, meta: dict, arrays) -> None:
        """Continue from a :meth:`snapshot` of an engine set up the same way (same model, data, settings)."""
        saved = [(m["label"], m["slot"], m["mode"]) for m in meta["runs"]]
        if saved != [(r.label, r.slot, r.mode) for r in self.runs]:
            raise GateError("the checkpoint's searches do not match this scan's: start without --resume")
        for i, (r, m) in enumerate(zip(self.runs, meta["runs"], strict=True)):
            restore_state(r.state, m["state"], arrays)
            r.queries, r.seconds = int(m["queries"]), float(m["seconds"])
            r.hard = np.array(arrays[f"r{i}.hard"], dtype=np.int64)
        self.step = int(meta["step"])
        if (self.screening is None) != ("screening" not in meta):
            raise GateError("the checkpoint was made with another screening setting: start without --resume")
        if self.screening is not None:
            try:
                self.screening.restore(meta["screening"])
            except (KeyError, TypeError, ValueError) as exc:
                raise GateError(f"the checkpoint's screening state does not fit this scan ({exc}): start without "
                                f"--resume") from None
        self.budget.q_start = self.oracle.queries - int(meta["spent"])
        self.budget.t_start = time.perf_counter() - float(meta["elapsed"])

    # ------------------------------------------------------------------ rounds
    def run(self, after_round: Callable[[ScanEngine], None] | None = None) -> ScanOutput:
        """All rounds, then :meth:`finish` and :meth:`result`; ``after_round(engine)`` runs between rounds
        (where a checkpoint may be taken)."""
        self.run_rounds(after_round)
        return self.result()

    def run_rounds(self, after_round: Callable[[ScanEngine], None] | None = None) -> None:
        """All rounds, then :meth:`finish` (what :meth:`run` does before the result)."""
        runner = ThreadPoolExecutor(max_workers=1)  # one model call at a time, off the main thread
        try:
            while self.round(runner):
                if after_round is not None:
                    after_round(self)
        finally:
            runner.shutdown()
        self.finish()

    def round(self, runner: ThreadPoolExecutor) -> bool:
        """One step of every running search; False when none is left or a budget stopped the scan.

        Many classes share a model call. Calls run in ``runner`` (ORT releases the GIL) while the next group
        is asked and stamped into the other buffer, so sampling and stamping hide behind inference.
        """
        active = self._active()
        if not active and self.screening is not None and self.screening.waiting.any():
            self._screen()  # every converging class is done: the waiting ones are decided now
            active = self._active()
        if not active:
            return False
        reason = self.budget.blocks(self.rows_per_class * len(active) + self.reserve)
        if reason:
            self.stop_reason = reason
            for r in self.runs:
                if not r.state.done:
                    r.search.stop(r.state, "budget")
            return False
        t0 = time.perf_counter()
        pending = None
        for gi, group in enumerate(self._groups(active)):
            for r in group:
                self._ask(r)
            batch = self.batches[gi % 2]
            batch.add_classes(self.pool_x, np.array([r.slot for r in group], np.int64), self.sample_idx,
                              self.eval_idx, self.masks, self.patterns, self.grid)
            future = runner.submit(batch.run, True)  # log-probabilities
            if pending is not None:
                self.tell(pending[0].result(), pending[1])
            pending = (future, group)
        self.tell(pending[0].result(), pending[1])
        share = (time.perf_counter() - t0) / len(active)
        for r in active:
            r.seconds += share
            if r.state.done:
                self.progress.emit(r.finished())
        self.step += 1
        if self.screening is not None:
            self._observe(active)
        if self.bandit is not None:
            for i in self.bandit.losers(self.step, [r.state for r in self.classes]):
                self.search.stop(self.classes[i].state, "bandit_stopped")
                self.progress.emit(self.classes[i].finished())
        running = [r for r in self.classes if not r.state.done]
        smallest = min(running, key=lambda r: r.state.result_l1) if running else None
        self.progress.emit(RoundFinished(self.step, self.budget.spent, smallest and smallest.finished()))
        return True

    def _groups(self, active: list[ClassSearch]) -> list[list[ClassSearch]]:
        """The round's model calls: as few as the buffers allow, but at least as many as PIPELINE_ROWS asks for,
        of near-equal size. Only the first group's sampling and stamping and the last group's estimates wait
        with no call running (every other group's hide behind the call before it), so several middling calls
        keep the cores busier than one full call and a small remainder (35 + 8 classes of the 43-class demo
        in 4,096-image buffers left 18 ms a round exposed, against 5 ms for four groups of 11). A row's output
        does not depend on the call it is in, so the grouping changes no result."""
        per_call = max(1, self.capacity // self.rows_per_class)
        n = len(active)
        groups = max(-(-n // per_call), min(n, -(-n * self.rows_per_class // PIPELINE_ROWS)))
        bounds = np.linspace(0, n, groups + 1).round().astype(int)
        return [active[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _active(self) -> list[ClassSearch]:
        """The searches that step this round: not done, and (screening) not waiting for the decision."""
        runs = [r for r in self.runs if not r.state.done]
        if self.screening is None:
            return runs
        return [r for r in runs if not (r.mode == "patch" and self.screening.waiting[r.label])]

    def _observe(self, stepped: list[ClassSearch]) -> None:
        """Screening: the patch searches that just stepped report their L1; decide once the reference is done."""
        sc = self.screening
        for r in stepped:
            if r.mode == "patch":
                sc.observe(r.label, r.state.step, r.state.result_l1, r.state.done)
        if sc.ready(np.array([r.state.done for r in self.classes])):
            self._screen()

    def _screen(self) -> None:
        stop, _resume = self.screening.decide(np.array([r.state.result_l1 for r in self.classes]),
                                              np.array([r.state.status == "converged" for r in self.classes]))
        for c in stop:
            r = self.classes[c]
            r.search.stop(r.state, SCREENED_OUT)
            self.progress.emit(r.finished())

    def _ask(self, r: ClassSearch) -> None:
        """The search's candidates (written into ``self.masks[r.slot]``) and this step's images."""
        p = self.params
        r.search.ask(r.state)
        rng = r.state.rng
        self.sample_idx[r.slot] = rng.choice(r.pool, p.batch_size, replace=len(r.pool) < p.batch_size)
        if self.cfg.hard_examples and len(r.hard):  # images the current trigger just failed on
            n_hard = min(len(r.hard), p.batch_size // 2)
            self.sample_idx[r.slot, :n_hard] = r.hard[:n_hard]
        self.eval_idx[r.slot] = rng.choice(r.pool, p.eval_size, replace=len(r.pool) < p.eval_size)

    def tell(self, log_probs: np.ndarray, group: list[ClassSearch]) -> None:
        """Each search of ``group`` its candidates' losses and its trigger's success, from one call's rows."""
        p = self.params
        per = self.rows_per_class
        for g, r in enumerate(group):
            rows = log_probs[g * per:(g + 1) * per]
            group_cross_entropy(rows[:self.sample_rows], r.label, p.batch_size, r.ce)
            trigger_rows = rows[self.sample_rows:]
            group_hits(trigger_rows, r.label, p.eval_size, self._hits)
            r.hard = self.eval_idx[r.slot][trigger_rows.argmax(axis=1) != r.label]
            r.search.tell(r.state, r.ce, float(self._hits[0]))
            r.queries += per

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Measure each reversed trigger (both modes') on the held-out images (and keep the report's examples,
        of the patch triggers)."""
        triggers = [r.state.result_trigger() for r in self.runs]
        # row i: self.runs[i]'s trigger, at the input's resolution
        masks = np.ascontiguousarray(self.grid.up(np.stack([t[0] for t in triggers]).astype(np.float32)))
        patterns = np.ascontiguousarray(self.grid.up(np.stack([t[1] for t in triggers]).astype(np.float32),
                                                     channels=True))
        asr: list[float | None] = [None] * len(self.runs)
        examples: dict[int, list[ExampleRow]] = {}
        n = len(self.held_x)
        batch = self.batches[0]
        if n and self.budget.left() >= n * len(self.runs):
            per_call = max(1, batch.capacity // n)
            for start in range(0, len(self.runs), per_call):
                group = range(start, min(start + per_call, len(self.runs)))
                slots = [batch.add_stamped(self.held_x, masks[i:i + 1], patterns[i:i + 1]) for i in group]
                probs = batch.run()
                for i, rows in zip(group, slots, strict=True):
                    r = self.runs[i]
                    keep = self.pred_held != r.label
                    pred = probs[rows].argmax(axis=1)
                    asr[i] = float(np.mean(pred[keep] == r.label)) if keep.any() else None
                    r.queries += n
                    if self.examples_per_class and r.mode == "patch":
                        examples[r.label] = self._examples(r.label, keep, pred)
        self._finished = (masks, patterns, asr, examples)

    def _examples(self, label: int, keep: np.ndarray, stamped_pred: np.ndarray) -> list[ExampleRow]:
        """Held-out images not already of ``label`` (any, when all are), with what the model said."""
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            idx = np.arange(len(keep))
        y = self.images.y
        return [ExampleRow(int(i), int(self.held_idx[i]), int(self.pred_held[i]), int(stamped_pred[i]),
                           None if y is None else int(y[self.held_idx[i]]))
                for i in idx[:self.examples_per_class]]

    def outcomes(self) -> list[ClassOutcome]:
        """Every class's searches as they ended (after :meth:`finish`), in label order."""
        if self._finished is None:
            raise RuntimeError("ScanEngine.outcomes() before finish()")
        masks, patterns, asr, examples = self._finished
        h, w, _ = self.oracle.image_shape
        n = len(self.classes)
        outcomes = []
        for i, r in enumerate(self.classes):
            l1 = float(r.state.result_l1)
            c = ClassResult(
                label=r.label, l1=l1, binary_l1=int((masks[i] >= 0.5).sum()), mask_fraction=float(l1 / (h * w)),
                trigger_asr=asr[i], queries=int(r.queries), steps=int(r.state.step), status=r.state.status,
                seconds=float(r.seconds), note=self.search.explain(r.state))
            blend_pattern = None
            if self.blends:
                b = self.blends[i]
                c.blend_amplitude = float(b.state.result_amplitude)
                c.blend_asr = asr[n + i]
                c.blend_status = b.state.status
                c.blend_steps = int(b.state.step)
                c.blend_queries = int(b.queries)
                c.blend_note = self.blend.explain(b.state)
                c.queries += int(b.queries)
                c.seconds += float(b.seconds)
                blend_pattern = patterns[n + i]
            outcomes.append(ClassOutcome(c, masks[i], patterns[i], blend_pattern, examples.get(r.label, [])))
        return outcomes

    def facts(self) -> ScanFacts:
        return ScanFacts(
            data={"source": self.images.source, "images": int(len(self.images)),
                  "search_pool": int(len(self.search_idx)), "held_out": int(len(self.held_idx)),
                  "clean_accuracy": self.accuracy},
            stop_reason=self.stop_reason, queries=int(self.budget.spent),
            seconds=time.perf_counter() - self.t_start, ort_seconds=self.oracle.ort_seconds - self.ort_start)

    def result(self) -> ScanOutput:
        return assemble(self.oracle, self.cfg, self.method, self.outcomes(), self.facts(), self.screening)


def assemble(oracle: Oracle, cfg: ScanConfig, method: str, outcomes: list[ClassOutcome], facts: ScanFacts,
             screening: Screening | None = None) -> ScanOutput:
    """The scan's result from every class's outcome: the outlier rule over all classes (both modes'), the
    flags, the triggers. ``outcomes`` must hold each of the model's classes exactly once."""
    outcomes = sorted(outcomes, key=lambda o: o.result.label)
    k = oracle.num_classes
    if [o.result.label for o in outcomes] != list(range(k)):
        raise GateError(f"the scan's parts returned classes {[o.result.label for o in outcomes]}, not each of the "
                        f"model's {k} classes once")
    classes = [o.result for o in outcomes]
    reference = None if screening is None else screening.reference
    if reference is not None:
        for c in classes:
            c.reference = bool(reference[c.label])
    h, w, _ = oracle.image_shape
    out = find_outliers(np.array([c.l1 for c in classes]), cfg.outliers, reference=reference, pixels=h * w)
    for c, idx, pv, flag in zip(classes, out.anomaly_index, out.p_values, out.flagged, strict=True):
        c.anomaly_index = finite_index(idx)
        c.p_value = None if np.isnan(pv) else float(pv)
        c.flagged = bool(flag)
    blend = _blend_outliers(classes, cfg) if cfg.blend else None
    queries, seconds, ort = facts.queries, facts.seconds, facts.ort_seconds
    result = ScanResult(
        model=oracle.describe(),
        input_spec=oracle.spec.to_dict(),
        providers=oracle.providers,
        method=method,
        seed=cfg.seed,
        search={**cfg.search.to_dict(), **cfg.to_dict(), **_grid_facts(oracle, cfg)},
        outliers={**outlier_summary(cfg.outliers, out),
                  **({} if screening is None else {"screening": screening.summary()})},
        data=facts.data,
        classes=classes,
        flagged=[c.label for c in classes if c.flagged],
        complete=facts.stop_reason is None,
        stop_reason=facts.stop_reason,
        queries={"total": int(queries), "scan": int(queries), "synthesis": 0, "convention": 0,
                 "per_class_mean": float(queries / k)},
        seconds={"total": seconds, "scan": seconds, "synthesis": 0.0, "ort": ort,
                 "ort_fraction": ort / seconds if seconds > 0 else 0.0},
        tool={"name": "backdoor-gate", "version": __version__},
        blend=blend,
    )
    blend_triggers = {} if blend is None else {
        "blend_amplitudes": np.array([c.blend_amplitude for c in classes], np.float32),
        "blend_patterns": np.stack([o.blend_pattern for o in outcomes])}
    triggers = Triggers(np.arange(k), np.stack([o.mask for o in outcomes]), np.stack([o.pattern for o in outcomes]),
                        np.array([c.flagged for c in classes]), **blend_triggers)
    return ScanOutput(result, triggers, {o.result.label: o.examples for o in outcomes if o.examples})


def _grid_facts(oracle: Oracle, cfg: ScanConfig) -> dict:
    """The search grid of a coarse scan, as the report states it (nothing when every pixel was searched)."""
    grid = Grid.for_image(*oracle.image_shape[:2], cfg.search.grid_cells)
    return {"grid": {"cell": grid.cell, "cells": list(grid.shape)}} if grid.coarse else {}


def _blend_outliers(classes: list[ClassResult], cfg: ScanConfig) -> dict:
    """The blend amplitudes' outlier rule into ``classes`` (flags: either mode's), and the blend summary."""
    out = blend_outliers(np.array([c.blend_amplitude for c in classes]), cfg.outliers, cfg.blend_params)
    for c, idx, pv, flag in zip(classes, out.anomaly_index, out.p_values, out.flagged, strict=True):
        c.blend_anomaly_index = finite_index(idx)
        c.blend_p_value = None if np.isnan(pv) else float(pv)
        c.blend_flagged = bool(flag)
        c.patch_flagged = c.flagged
        c.flagged = c.patch_flagged or c.blend_flagged
    return blend_summary(cfg.blend_params, out)


def scan(oracle: Oracle, images: ImageSet, cfg: ScanConfig = ScanConfig(), *, method: str = "b3d",
         progress: Progress | None = None, examples: int = 0) -> ScanOutput:
    """Run a whole scan: :class:`ScanEngine` from set-up to result."""
    return ScanEngine(oracle, images, cfg, method=method, progress=progress, examples=examples).run()
