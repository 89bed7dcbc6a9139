"""One model's classes spread over the workers of a Ray cluster (``gate scan|run --ray local|auto|ADDRESS``).

The classes are dealt round-robin into parts; each part is one Ray task that opens its own oracle (its own
ONNX Runtime session, from the model's bytes shipped through the object store and checked against the
model's sha256, under the input spec the gate resolved here) and runs a :class:`gate.scan.ScanEngine`
restricted to the part's labels. Every class keeps the random stream and the search the single-process
scan gives it, so its result does not depend on the part it lands in: same seed, same per-class L1 norms,
triggers and flags as ``gate scan`` without ``--ray``. The outlier rule and the decision run once, here,
over every class (:func:`gate.scan.assemble`), which refuses a result that lacks a class or holds one twice.

A worker that dies (its process killed, its node lost) is a system failure: Ray runs the task again, up to
``retries`` times, and only the attempt that returns counts, so no class is lost or counted twice. An error
the scan itself raises (a bad model, a budget too small) is not retried: it ends the run as without Ray.

The query budget (``budget.max_queries`` = M over K classes) is split before any part starts: a part with n
classes may send ``floor(M * n / K)`` images, its own clean-image predictions included, so the parts
together never exceed M. Each part predicts the clean images itself (they decide its classes' image
pools), so a Ray scan sends ``(parts - 1) * images`` more queries than a single-process one; the per-class
query counts are the same. A killed attempt's queries are lost work beside the budget (a model file has no
per-query price; a ``--remote`` model is not scanned through Ray). ``budget.max_seconds`` applies to each
part's own wall time.

Screening and the bandit decide across classes while the searches run, so they are refused with ``--ray``;
so are ``--remote`` and ``--resume``. ``import ray`` happens only here, and only when ``--ray`` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gate.data import ImageSet
from gate.errors import GateError, UsageError
from gate.oracle import Oracle
from gate.progress import ClassFinished, Progress, RoundFinished, ScanStarted
from gate.scan import ClassOutcome, ScanConfig, ScanEngine, ScanFacts, ScanOutput, assemble
from gate.spec import SpecOverrides

NEEDS_RAY = "--ray needs Ray, which is not installed: pip install 'backdoor-gate[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how a scan runs on Ray."""

    address: str = "local"  # local: a Ray instance started here; auto: the running cluster; or HOST:PORT, ray://...
    parts: int | None = None  # tasks the classes are dealt into (default: the cluster's CPUs / cpus, at most K)
    cpus: float = 1.0  # CPUs per task (its ONNX Runtime session's threads)
    gpus: float = 0.0  # GPUs per task
    retries: int = 3  # times a task whose worker died runs again
    device: str = "auto"  # each worker's execution provider (--device)

    def check(self) -> None:
        if self.parts is not None and self.parts < 1:
            raise UsageError("--ray-parts must be at least 1")
        if not self.cpus > 0:
            raise UsageError("--ray-cpus must be more than 0")
        if not self.gpus >= 0:
            raise UsageError("--ray-gpus must be 0 or more")
        if self.retries < 0:
            raise UsageError("--ray-retries must be 0 or more")


@dataclass(frozen=True)
class Job:
    """What every part of one scan shares (put once into the object store)."""

    model: bytes
    sha256: str
    spec: SpecOverrides  # the spec resolved by the gate, stated: the workers detect nothing
    device: str
    max_batch: int
    threads: int
    images: ImageSet
    cfg: ScanConfig
    method: str
    examples: int


@dataclass
class PartResult:
    labels: list[int]
    outcomes: list[ClassOutcome]
    facts: ScanFacts


def split_labels(k: int, parts: int) -> list[list[int]]:
    """Classes dealt round-robin into at most ``parts`` non-empty parts.

    >>> split_labels(7, 3)
    [[0, 3, 6], [1, 4], [2, 5]]
    >>> split_labels(2, 5)
    [[0], [1]]
    """
    parts = max(1, min(parts, k))
    return [list(range(i, k, parts)) for i in range(parts)]


def split_budget(max_queries: int | None, parts: list[list[int]], k: int) -> list[int | None]:
    """Each part's query budget: ``floor(M * n / K)`` for a part of n of the K classes, so the sum is at most M.

    >>> split_budget(1000, [[0, 3, 6], [1, 4], [2, 5]], 7)
    [428, 285, 285]
    >>> split_budget(None, [[0], [1]], 2)
    [None, None]
    """
    if max_queries is None:
        return [None] * len(parts)
    return [max_queries * len(p) // k for p in parts]


def stated_spec(oracle: Oracle) -> SpecOverrides:
    """The oracle's resolved input spec as overrides, so a worker's oracle uses it without detecting anything."""
    s = oracle.spec
    return SpecOverrides(layout=s.layout, value_range=s.value_range, mean=s.mean, std=s.std,
                         output_kind=s.output_kind, size=(s.height, s.width),
                         output_name=oracle.output_name)


def model_bytes(oracle: Oracle) -> bytes:
    """The bytes of ``oracle``'s model file, to ship to workers; refused when the file changed since it was opened
    (or ``oracle`` is a remote model: there is no file)."""
    if not isinstance(oracle, Oracle):
        raise UsageError("--ray scans a model file: it does not support --remote")
    model = Path(oracle.path).read_bytes()
    if hashlib.sha256(model).hexdigest() != oracle.sha256:
        raise GateError(f"{oracle.path} changed after it was opened (sha256 differs): scan it again")
    return model


def open_model_bytes(model: bytes, sha256: str, spec: SpecOverrides, *, device: str, max_batch: int,
                     threads: int) -> Oracle:
    """In a worker: an oracle on model bytes received through the object store, checked against ``sha256``."""
    if hashlib.sha256(model).hexdigest() != sha256:
        raise GateError("the model bytes a Ray worker received do not match the model's sha256")
    with tempfile.TemporaryDirectory(prefix="gate-ray-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        oracle = Oracle(path, spec, device=device, max_batch=max_batch, threads=threads)
    if oracle.sha256 != sha256:
        raise GateError("the model file a Ray worker opened does not match the model's sha256")
    return oracle


def run_part(job: Job, labels: list[int], max_queries: int | None) -> PartResult:
    """One part of the scan, in a worker: its own oracle on the job's model bytes, the labels' searches."""
    oracle = open_model_bytes(job.model, job.sha256, job.spec, device=job.device, max_batch=job.max_batch,
                              threads=job.threads)
    cfg = dataclasses.replace(job.cfg, max_queries=max_queries)
    engine = ScanEngine(oracle, job.images, cfg, method=job.method, examples=job.examples, labels=labels)
    engine.run_rounds()
    return PartResult(engine.labels, engine.outcomes(), engine.facts())


def call(runner: Callable, *args):
    """What a Ray task runs: ``runner`` (any picklable callable: :func:`run_part` on a part of a scan,
    :func:`gate.fleet.run_model` on a whole model) on its arguments."""
    return runner(*args)


def check_config(cfg: ScanConfig) -> None:
    """Refuse, as a usage error, the settings whose decisions cross classes while the searches run."""
    if cfg.screening:
        raise UsageError("--ray does not support --screening (screening decides across classes while they "
                         "search): drop one of them")
    if cfg.bandit:
        raise UsageError("--ray does not support the bandit (search.bandit decides across classes while they "
                         "search): switch it off")


def reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a ``HOST:PORT`` (or ``ray://HOST:PORT``) nothing listens on: Ray itself would retry for
    minutes. ``local`` and ``auto`` pass (Ray answers those at once).

    >>> reachable("local")
    """
    if address in ("local", "auto"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray {address}: not local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise GateError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def connect(address: str):
    """The ``ray`` module, initialised: an instance already running in this process, else ``address``.
    Returns (ray, whether this call started it and so must shut it down)."""
    try:
        import ray
    except ImportError:
        raise UsageError(NEEDS_RAY) from None
    if ray.is_initialized():
        return ray, False
    reachable(address)
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # ray.init sets SIGTERM handlers that exit with code 15 or 1 (a reject's) and leave OUT saying running:
    # they are kept from being set (and the gate's handler put back in any case), so a SIGTERM, during
    # ray.init too, ends the run fail-closed, and Ray is shut down (here, or by ray_scan)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    setter = getattr(utils, "set_sigterm_handler", None)
    if setter is not None:
        utils.set_sigterm_handler = lambda handler: None
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, ValueError, ...: one line, no traceback
        ray.shutdown()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GateError(f"cannot start or reach the Ray cluster at {address!r}: {first}") from None
    except BaseException:  # SIGTERM / Ctrl-C while Ray starts
        ray.shutdown()
        raise
    finally:
        if setter is not None:
            utils.set_sigterm_handler = setter
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return ray, True


def ray_scan(oracle: Oracle, images: ImageSet, cfg: ScanConfig, options: RayOptions, *, method: str = "b3d",
             progress: Progress | None = None, examples: int = 0,
             runner: Callable[[Job, list[int], int | None], PartResult] = run_part) -> ScanOutput:
    """The scan of :func:`gate.scan.scan`, its classes spread over Ray tasks (see the module docstring).
    ``runner`` is what each task runs (:func:`run_part`)."""
    options.check()
    check_config(cfg)
    t_start = time.perf_counter()
    progress = progress or Progress(enabled=False)
    model = model_bytes(oracle)
    k = oracle.num_classes
    ray, started = connect(options.address)
    try:
        parts = options.parts or max(1, int(ray.cluster_resources().get("CPU", 1) // options.cpus))
        labels = split_labels(k, parts)
        budgets = split_budget(cfg.max_queries, labels, k)
        job = Job(model, oracle.sha256, stated_spec(oracle), options.device, oracle.max_batch,
                  max(1, int(options.cpus)), images, cfg, method, examples)
        task = ray.remote(call).options(num_cpus=options.cpus, num_gpus=options.gpus,
                                          max_retries=options.retries, retry_exceptions=False)
        job_ref = ray.put(job)
        progress.emit(ScanStarted(k, cfg.search.max_steps))
        refs = [task.remote(runner, job_ref, part, budget) for part, budget in zip(labels, budgets, strict=True)]
        results = _gather(ray, refs, progress)
    finally:
        if started:
            ray.shutdown()
    for part, res in zip(labels, results, strict=True):
        if res.labels != part:
            raise GateError(f"a Ray task asked for classes {part} returned classes {res.labels}")
    if any(r.facts.data != results[0].facts.data for r in results):
        raise GateError("the Ray workers disagree about the clean images (data split or predictions differ)")
    reasons = [r.facts.stop_reason for r in results if r.facts.stop_reason]
    facts = ScanFacts(data=results[0].facts.data, stop_reason=reasons[0] if reasons else None,
                      queries=sum(r.facts.queries for r in results), seconds=time.perf_counter() - t_start,
                      ort_seconds=sum(r.facts.ort_seconds for r in results))
    return assemble(oracle, cfg, method, [o for r in results for o in r.outcomes], facts)


def _gather(ray, refs: list, progress: Progress) -> list[PartResult]:
    """Every task's result, in order; progress as each arrives. A task's own error ends the scan with it."""
    done: dict = {}
    pending = list(refs)
    queries, step = 0, 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)  # in slices: SIGTERM / Ctrl-C end the wait
        if not ready:
            continue
        ref = ready[0]
        res = task_result(ray, ref)
        done[ref] = res
        queries += res.facts.queries
        for o in res.outcomes:
            c = o.result
            step = max(step, c.steps)
            progress.emit(ClassFinished(c.label, c.steps, c.trigger_asr or 0.0, c.l1, c.queries, c.status))
        progress.emit(RoundFinished(step, queries, None))
    return [done[r] for r in refs]


def task_result(ray, ref):
    """A finished task's result; its error as the gate's: the scan's own GateError as it was raised, anything
    else (a bug, a worker lost beyond its retries, the cluster gone) as one GateError line."""
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GateError):
            raise type(cause)(str(cause)) from None
        raise GateError(f"a Ray task failed: {type(cause).__name__ if cause else 'error'}: "
                        f"{str(cause or exc).strip().splitlines()[0]}") from None
    except RayError as exc:  # the worker died more often than the retries allow, the cluster went away, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GateError(f"a Ray task was lost ({type(exc).__name__}: {first})") from None
