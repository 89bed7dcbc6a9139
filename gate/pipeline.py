"""The gate's pipeline: where the clean images come from, synthesis and its budget, the scan, the decision.

:func:`run_gate` is the one way the gate judges a model (``gate run``, ``gate scan`` and the benchmarks
all call it)::

    oracle -> data (the policy's data section, or images given) -> [synthesis, B3D-SS | convention check]
           -> scan -> decide

Data (policy ``data.source``): ``file`` requires ``data.path`` (the default: no data is an error, never a
silent change of method); ``synthetic`` synthesises samples from the model (B3D-SS); ``auto`` uses
``data.path`` when that file exists and fits the model (image size, channels, labels within the model's
classes), else synthesises: an opt-in fallback, whose reason the result's ``data.fallback`` states.
Synthesis queries count against the run's query budget; the scan gets what is left.

With labelled images and no input range, mean or std stated, :func:`gate.conventions.check_convention`
measures the common conventions on a sample first, and the scan switches to one that fits clearly better than
the one in use (the result's ``data.convention`` says what was measured; its queries count as synthesis's do).

The report's stamped examples are read off the scan's held-out pass (no query after the decision), and
nothing changes the result once :func:`gate.decision.decide` has seen it. With a
:class:`gate.checkpoint.Checkpoint` the scan's state is saved between rounds (and B3D-SS's images once
made), and a resumed run continues from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gate.checkpoint import Checkpoint, fingerprint
from gate.conventions import ConventionCheck, check_convention, most_queries, switch
from gate.data import ImageSet, fit_to_model, load_images
from gate.decision import Decision, decide
from gate.errors import DataError, GateError, ModelError
from gate.kernels import stamp
from gate.oracle import Oracle
from gate.policy import Policy
from gate.progress import Progress, ScanFinished
from gate.result import Example, ExampleRow, ScanResult, Triggers
from gate.scan import ScanEngine, ScanOutput

if TYPE_CHECKING:
    from gate.distributed import RayOptions

EXAMPLES_FOR_EVERY_CLASS = 100  # above this many classes, examples only for classes a finding names


@dataclass
class GateRun:
    result: ScanResult
    triggers: Triggers
    decision: Decision
    examples: dict[int, list[Example]] | None  # per class: clean held-out images with its trigger stamped


def run_gate(oracle: Oracle, policy: Policy, *, images: ImageSet | None = None, examples: int = 0,
             progress: Progress | None = None, log: Callable[[str], None] | None = None,
             checkpoint: Checkpoint | None = None, resume: bool = False, ray: RayOptions | None = None,
             convention_check: bool | None = None) -> GateRun:
    """Scan ``oracle``'s model under ``policy`` and decide. ``images``: clean data given by the caller (the
    policy's data section is then not consulted); ``examples``: stamped examples per class for the report.
    ``checkpoint``: where the scan's state is saved between rounds; with ``resume`` the run continues from
    the checkpoint there (refused when it was made for another model, data or policy). ``ray``: the scan's
    classes run on a Ray cluster (:mod:`gate.distributed`; no checkpoint then), with the same result.
    ``convention_check``: whether to check the input convention on labelled data (default: when
    :func:`may_check_convention`; a Ray worker, whose spec states everything, is told the command's answer)."""
    progress = progress or Progress(enabled=False)
    log = log or (lambda _text: None)
    if oracle.num_classes < 2:
        raise ModelError(f"{oracle.path}: the model has {oracle.num_classes} output; a backdoor scan needs at least "
                         f"2 classes")
    method, synthesis, fallback = "b3d", None, None
    if images is None:
        images, fallback = load_data(policy, oracle)
        if fallback:
            log(f"warning: {fallback}")
    if images is None:
        method = "b3d-ss"
        fp = fingerprint(oracle.sha256, policy.to_dict(), "synthetic", method)
        saved = checkpoint.load_data(fp) if checkpoint is not None and resume else None
        if saved is not None:
            x, y, source, synthesis = saved
            images = ImageSet(x, y, source)
            log(f"resume: {len(x)} synthetic images from {checkpoint.out}")
        else:
            images, synthesis = synthesize_data(policy, oracle, progress)
            if checkpoint is not None:
                checkpoint.save_data(images.x, images.y, images.source, synthesis, fp)
    convention = None
    if convention_check is None:
        convention_check = may_check_convention(oracle)
    if method == "b3d" and images.y is not None and convention_check and _affordable(
            oracle, policy, most_queries(oracle, len(images))):
        convention = check_convention(oracle, images.x, images.y)
        if convention.chosen is not None:
            oracle = switch(oracle, convention)
            log(f"warning: {convention.sentence()}")
    cfg = policy.scan_config()
    cfg = dataclasses.replace(cfg, batch_images=max(cfg.batch_images, oracle.max_batch))
    spent = (synthesis["queries"] if synthesis is not None else 0) + (convention.queries if convention else 0)
    if cfg.max_queries is not None:  # the run's budget covers synthesis or the convention check, and the scan
        cfg = dataclasses.replace(cfg, max_queries=max(0, cfg.max_queries - spent))
    if ray is not None:
        from gate.distributed import ray_scan

        out = ray_scan(oracle, images, cfg, ray, method=method, progress=progress, examples=examples)
    else:
        out = _scan_here(oracle, images, cfg, method, progress, examples, policy, log, checkpoint, resume)
    result = with_fallback(with_convention(with_synthesis(out.result, synthesis), convention), fallback)
    decision = decide(result, policy)
    progress.emit(ScanFinished(result.flagged, decision.outcome))
    shown = _example_images(images, out.triggers, out.examples, result, decision) if examples else None
    return GateRun(result, out.triggers, decision, shown)


def _scan_here(oracle: Oracle, images: ImageSet, cfg, method: str, progress: Progress, examples: int, policy: Policy,
               log: Callable[[str], None], checkpoint: Checkpoint | None, resume: bool) -> ScanOutput:
    """The scan in this process, checkpointed between rounds when ``checkpoint`` is given."""
    engine = ScanEngine(oracle, images, cfg, method=method, progress=progress, examples=examples)
    after_round = None
    if checkpoint is not None:
        fp = fingerprint(oracle.sha256, policy.to_dict(), _data_digest(images), method)
        state = checkpoint.load(fp) if resume else None
        if state is not None:
            engine.restore(*state)
            log(f"resume: from step {engine.step} ({engine.budget.spent:,} queries) of the checkpoint in "
                f"{checkpoint.out}")

        def after_round(e: ScanEngine) -> None:
            if checkpoint.due():
                checkpoint.save(*e.snapshot(), fp)

    out = engine.run(after_round)
    if checkpoint is not None:
        checkpoint.clear()
    return out


def _data_digest(images: ImageSet) -> str:
    """What a checkpoint's data must match: the images' and labels' bytes."""
    h = hashlib.sha256(np.ascontiguousarray(images.x).tobytes())
    if images.y is not None:
        h.update(np.ascontiguousarray(images.y).tobytes())
    return h.hexdigest()


NO_DATA = ("no clean data given: pass --data FILE|DIR (clean images from the model's domain), or --synthetic to "
           "synthesise samples from the model itself (B3D-SS; data.source synthetic or auto in a policy)")


def load_data(policy: Policy, oracle: Oracle) -> tuple[ImageSet | None, str | None]:
    """Clean images following the policy's data section, or None: synthesise them. The second value says why
    an ``auto`` source fell back to synthetic samples (None: no fallback)."""
    d = policy.data
    if d.source == "file":
        if d.path is None:
            raise DataError(NO_DATA)
        return _fitting(load_images(d.path), oracle, d.path), None
    if d.source != "auto":
        return None, None
    if d.path is None:
        return None, "no clean data given (data.source auto): the scan uses synthetic samples (B3D-SS)"
    if not Path(d.path).exists():
        return None, f"data {d.path} not found (data.source auto): the scan uses synthetic samples (B3D-SS)"
    try:
        return _fitting(load_images(d.path), oracle, d.path), None
    except DataError as exc:
        return None, f"data: {exc} (data.source auto): the scan uses synthetic samples (B3D-SS)"


def _fitting(images: ImageSet, oracle: Oracle, where: str) -> ImageSet:
    images = fit_to_model(images, oracle.image_shape)
    if images.y is not None and len(images.y) and int(images.y.max()) >= oracle.num_classes:
        raise DataError(f"{where}: labels go up to {int(images.y.max())} but the model has "
                        f"{oracle.num_classes} classes")
    return images


def synthesize_data(policy: Policy, oracle: Oracle, progress: Progress) -> tuple[ImageSet, dict]:
    """B3D-SS samples under the policy's synthesis settings and the run's query budget."""
    try:
        from gate.synth import synthesize
    except ImportError as exc:
        raise GateError(f"synthetic data (B3D-SS) is not available in this installation: {exc}") from None
    seeds = policy.data.seed_images
    seed_images = fit_to_model(load_images(seeds), oracle.image_shape) if seeds else None
    return synthesize(oracle, policy.synth_config(), seed_images=seed_images, progress=progress,
                      max_queries=policy.budget.max_queries)


def with_synthesis(result: ScanResult, synthesis: dict | None) -> ScanResult:
    """The scan's result with the synthesis that made its images counted in (queries, seconds)."""
    if synthesis is None:
        return result
    q, s = result.queries, result.seconds
    return dataclasses.replace(
        result, synthesis=synthesis,
        queries={**q, "total": q["scan"] + int(synthesis["queries"]), "synthesis": int(synthesis["queries"])},
        seconds={**s, "total": s["scan"] + synthesis["seconds"], "synthesis": synthesis["seconds"]})


def may_check_convention(oracle: Oracle) -> bool:
    """Whether the scan may check the input convention: nobody stated its range or normalisation, the input is not
    uint8 (whole pixel values: the range is fixed, any normalisation is inside the model), and the model is a file
    (a served model takes what its server takes: other conventions' inputs may be refused, and are queries the
    server sees)."""
    o = oracle.overrides
    return (isinstance(oracle, Oracle) and o.value_range is None and o.mean is None and o.std is None
            and oracle.spec.dtype != "uint8")


def _affordable(oracle: Oracle, policy: Policy, queries: int) -> bool:
    """Whether a check of at most ``queries`` leaves the scan most of its budgets (the run's and the oracle's):
    the check takes at most half of either, else it is skipped."""
    limits = [v for v in (policy.budget.max_queries, oracle.remaining) if v is not None]
    return all(2 * queries <= v for v in limits)


def with_convention(result: ScanResult, check: ConventionCheck | None) -> ScanResult:
    """The scan's result with the convention check that preceded it counted in (queries) and described."""
    if check is None:
        return result
    q = result.queries
    return dataclasses.replace(result, data={**result.data, "convention": check.to_dict()},
                               queries={**q, "total": q["total"] + check.queries, "convention": check.queries})


def with_fallback(result: ScanResult, fallback: str | None) -> ScanResult:
    """The result, its data section saying why an ``auto`` source fell back to synthetic samples (if it did)."""
    if not fallback:
        return result
    return dataclasses.replace(result, data={**result.data, "fallback": fallback})


def _example_images(images: ImageSet, triggers: Triggers, rows: dict[int, list[ExampleRow]], result: ScanResult,
                    decision: Decision) -> dict[int, list[Example]] | None:
    """The held-out examples as pictures (stamped here, on the host: no query), for the classes shown."""
    labels = [int(v) for v in triggers.labels]
    if len(labels) > EXAMPLES_FOR_EVERY_CLASS:  # big models: examples for the classes that matter only
        marked = set(result.flagged) | {f.label for f in decision.findings if f.label is not None}
        labels = [c for c in labels if c in marked]
    position = {int(v): i for i, v in enumerate(triggers.labels)}
    out = {}
    for label in labels:
        i = position[label]
        mask, pattern = triggers.masks[i], triggers.patterns[i]
        out[label] = [Example(label, images.x[r.image], stamp(images.x[r.image], mask, pattern), r.clean_pred,
                              r.stamped_pred, r.label) for r in rows.get(label, [])]
    return out or None
