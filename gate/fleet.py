"""Many models on one Ray cluster (``gate run-many ... --ray local|auto|ADDRESS``): each model's whole gate run
(data, B3D-SS synthesis where the policy asks for it, the scan, the decision) is one Ray task.

The command opens each model here as ``gate run`` does (its input spec resolved, its clean images read and fitted
here, so a worker on another node needs neither the model file nor the data file), then ships the model's bytes,
the resolved spec, the policy and the images through the object store; the task opens its own ONNX Runtime
session on those bytes (checked against the model's sha256) and returns the :class:`gate.pipeline.GateRun`,
and the reports, attestation and metrics are written here, into the model's own output folder. A model's result
is the one ``gate run`` gives it in a single process: the same seed, the same images, the same code.

A worker that dies is retried by Ray (``--ray-retries``) and only the attempt that returns counts; an error the
gate itself raises in the task (a bad model, a budget too small) ends that model's run as an error, as it would
without Ray, and the other models go on. :meth:`RayModels.stop` (SIGTERM / Ctrl-C in the command) cancels the
tasks still running; each of their runs then ends fail-closed as interrupted.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gate.checkpoint import Checkpoint
from gate.data import ImageSet
from gate.distributed import RayOptions, call, connect, model_bytes, open_model_bytes, stated_spec, task_result
from gate.oracle import Oracle
from gate.pipeline import GateRun, load_data, may_check_convention, run_gate, with_fallback
from gate.policy import Policy
from gate.progress import Progress
from gate.spec import SpecOverrides


@dataclass(frozen=True)
class ModelJob:
    """One model's gate run, as a Ray task receives it."""

    model: bytes
    sha256: str
    spec: SpecOverrides  # resolved by the command: the worker detects nothing
    device: str
    max_batch: int
    threads: int
    policy: Policy
    images: ImageSet | None  # None: B3D-SS, the worker synthesises the samples
    examples: int
    convention_check: bool  # the user stated no range or normalisation: the run checks the convention (the spec
    #                         above states everything, so the worker cannot tell)


def run_model(job: ModelJob) -> GateRun:
    """In a worker: the model's gate run, from its bytes."""
    oracle = open_model_bytes(job.model, job.sha256, job.spec, device=job.device, max_batch=job.max_batch,
                              threads=job.threads)
    policy = job.policy
    if job.images is None:  # the command found no clean images to use: the samples are synthesised, here
        policy = dataclasses.replace(policy, data=dataclasses.replace(policy.data, source="synthetic"))
    return run_gate(oracle, policy, images=job.images, examples=job.examples, convention_check=job.convention_check)


class RayModels:
    """A connection to a Ray cluster that runs whole models' gate runs; :meth:`scan` stands where
    :func:`gate.pipeline.run_gate` does in ``gate run`` and may be called from several threads at once."""

    def __init__(self, options: RayOptions, runner: Callable[[ModelJob], GateRun] = run_model) -> None:
        options.check()
        self.options = options
        self.runner = runner
        self.ray, self._started = connect(options.address)
        self._task = self.ray.remote(call).options(num_cpus=options.cpus, num_gpus=options.gpus,
                                                    max_retries=options.retries, retry_exceptions=False)
        self._stopped = threading.Event()

    def slots(self) -> int:
        """How many models the cluster runs at once (its CPUs over the CPUs per task)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.options.cpus))

    def scan(self, oracle: Oracle, policy: Policy, *, examples: int = 0, progress: Progress | None = None,
             log: Callable[[str], None] | None = None, checkpoint: Checkpoint | None = None, resume: bool = False,
             ray: RayOptions | None = None) -> GateRun:
        """``oracle``'s model's gate run in a Ray task (``checkpoint``, ``resume`` and ``ray``, which a Ray run
        does not use, are taken so the call reads as run_gate's)."""
        if resume or ray is not None:
            raise ValueError("a model run on Ray neither resumes nor splits its classes")
        log = log or (lambda _text: None)
        images, fallback = load_data(policy, oracle)
        if fallback:
            log(f"warning: {fallback}")
        job = ModelJob(model_bytes(oracle), oracle.sha256, stated_spec(oracle), self.options.device,
                       oracle.max_batch, max(1, int(self.options.cpus)), policy, images, examples,
                       may_check_convention(oracle))
        if self._stopped.is_set():  # a run that had not started when the command was stopped
            raise KeyboardInterrupt("SIGTERM")
        ref = self._task.remote(self.runner, job)
        while True:
            ready, _ = self.ray.wait([ref], timeout=0.5)
            if ready:
                break
            if self._stopped.is_set():
                self.ray.cancel(ref, force=True)
                raise KeyboardInterrupt("SIGTERM")
        run = task_result(self.ray, ref)
        return dataclasses.replace(run, result=with_fallback(run.result, fallback))

    def stop(self) -> None:
        """End every run still waiting for its task (from any thread): each raises KeyboardInterrupt."""
        self._stopped.set()

    def close(self) -> None:
        """Shut down the Ray instance this object started (a running cluster it joined stays up)."""
        if self._started:
            self.ray.shutdown()
            self._started = False
