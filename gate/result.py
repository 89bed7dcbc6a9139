"""The canonical result of a scan: one JSON-serialisable object every report is rendered from.

``report.json`` is ``ScanResult.to_dict()`` (plus, once a policy has decided, a ``decision`` block);
``triggers.npz`` holds the reversed trigger of every class.

The blend mode's fields (``ClassResult.blend_*``, ``patch_flagged``, ``ScanResult.blend``, the triggers'
``blend_*`` arrays) exist only when the scan ran it (``search.blend``): a scan without it writes the same
report and triggers as before the mode existed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from gate.errors import GateError

SCHEMA_VERSION = "1.0"


@dataclass
class ClassResult:
    """The reversed trigger of one class and what it tells us."""

    label: int
    l1: float  # L1 norm of the soft mask g(theta_m) of the best trigger (what the outlier rule uses)
    binary_l1: int  # pixels in the binary mask 1[g(theta_m) >= 0.5]
    mask_fraction: float  # l1 / (H*W)
    trigger_asr: float | None  # attack success of the reversed trigger on held-out clean images
    queries: int  # images sent to the model for this class (search + held-out check)
    steps: int  # NES steps taken
    status: str  # converged | screened_out | bandit_stopped | max_steps | not_reached | budget
    seconds: float = 0.0  # wall time attributed to this class (its share of each model call)
    anomaly_index: float = 0.0  # the outlier rule's index: calibrated z of log L1, or MAD index; positive = small
    flagged: bool = False
    p_value: float | None = None  # calibrated rule: per-model (Sidak-corrected) p-value of this class
    note: str = ""  # why the search found no working trigger ("" when it did)
    # the blend mode (search.blend; None when it did not run). flagged is then either mode's flag.
    blend_amplitude: float | None = None  # smallest amplitude a of a working blend trigger; 1.0: none worked
    blend_asr: float | None = None  # attack success of that blend trigger on held-out clean images
    blend_status: str | None = None  # as status, for the blend search
    blend_steps: int | None = None
    blend_queries: int | None = None  # the blend search's share of queries (counted in queries too)
    blend_note: str | None = None  # why the blend search found no working trigger ("" when it did)
    blend_anomaly_index: float | None = None  # the outlier rule's index of the amplitude; positive = small
    blend_p_value: float | None = None  # calibrated rule: per-model p-value of the amplitude
    blend_flagged: bool = False  # the blend amplitude is an outlier
    patch_flagged: bool | None = None  # the patch L1 is an outlier (None: only the patch mode ran, see flagged)
    # screening (search.screening; None when off): the class is in the reference sample searched to convergence
    reference: bool | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.reference is None:
            d.pop("reference")
        if self.blend_amplitude is None:
            for key in BLEND_FIELDS:
                d.pop(key)
        return d


BLEND_FIELDS = tuple(f.name for f in fields(ClassResult) if f.name.startswith("blend_")) + ("patch_flagged",)


@dataclass
class ScanResult:
    model: dict  # path, sha256, input_name, input_shape, num_classes, image_shape
    input_spec: dict
    providers: list[str]
    method: str  # "b3d" (clean data) or "b3d-ss" (synthetic data)
    seed: int
    search: dict  # effective search parameters
    outliers: dict  # the rule's settings, median_l1, mad, model_p_value and backdoor_score (calibrated rule)
    data: dict  # source, images, clean_accuracy (when labels are known), held_out
    classes: list[ClassResult]
    flagged: list[int]
    complete: bool  # False when a budget cut the scan short
    stop_reason: str | None
    queries: dict  # total, scan, synthesis, per step
    seconds: dict  # total, ort, synthesis
    synthesis: dict | None = None
    schema_version: str = SCHEMA_VERSION
    tool: dict = field(default_factory=dict)
    blend: dict | None = None  # blend mode: its settings, median_amplitude, mad, model_p_value, backdoor_score

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = [c.to_dict() for c in self.classes]
        if self.blend is None:
            d.pop("blend")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScanResult:
        d = dict(d)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise GateError(f"report schema version {d.get('schema_version')!r} is not {SCHEMA_VERSION!r}")
        # added by the gate's renderers, not part of the scan; "verdict": reports before the decision was one
        for key in ("decision", "policy", "error", "class_names", "verdict"):
            d.pop(key, None)
        d["classes"] = [ClassResult(**c) for c in d["classes"]]
        return cls(**d)

    def class_result(self, label: int) -> ClassResult:
        return next(c for c in self.classes if c.label == label)


@dataclass(frozen=True)
class ExampleRow:
    """A held-out image that a class's reversed trigger was stamped on during the scan's held-out pass."""

    held_out: int  # position among the held-out images
    image: int  # index into the scanned image set
    clean_pred: int
    stamped_pred: int
    label: int | None  # ground truth, when known


@dataclass
class Example:
    """A clean image with a class's reversed trigger stamped on, and what the model said of both."""

    target: int  # the class whose trigger was stamped
    clean: np.ndarray  # (H, W, C) float [0, 1]
    stamped: np.ndarray  # (H, W, C) float [0, 1]
    clean_pred: int
    stamped_pred: int
    label: int | None = None  # ground truth of the clean image, when known


@dataclass
class Triggers:
    """Reversed triggers: soft masks (K, H, W) and patterns (K, H, W, C) in [0, 1]; with the blend mode also
    each class's blend trigger: the mask is the constant amplitude over the image, so only it is kept."""

    labels: np.ndarray  # (K,)
    masks: np.ndarray  # (K, H, W) float32, soft mask g(theta_m)
    patterns: np.ndarray  # (K, H, W, C) float32
    flagged: np.ndarray  # (K,) bool
    blend_amplitudes: np.ndarray | None = None  # (K,) float32 (1.0: no blend trigger worked)
    blend_patterns: np.ndarray | None = None  # (K, H, W, C) float32

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        blend = {} if self.blend_amplitudes is None else {"blend_amplitudes": self.blend_amplitudes,
                                                         "blend_patterns": self.blend_patterns}
        np.savez_compressed(buf, labels=self.labels, masks=self.masks, patterns=self.patterns, flagged=self.flagged,
                            **blend)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Triggers:
        try:
            with np.load(path, allow_pickle=False) as z:
                blend = ((z["blend_amplitudes"].astype(np.float32), z["blend_patterns"].astype(np.float32))
                         if "blend_amplitudes" in z.files else (None, None))
                return cls(z["labels"], z["masks"].astype(np.float32), z["patterns"].astype(np.float32),
                           z["flagged"].astype(bool), *blend)
        except FileNotFoundError:
            raise GateError(f"triggers file not found: {path}") from None
        except (KeyError, ValueError, OSError) as exc:
            raise GateError(f"cannot read triggers from {path}: {exc}") from None

    def select(self, labels) -> Triggers:
        idx = np.array([int(np.flatnonzero(self.labels == lab)[0]) for lab in labels], dtype=np.int64)
        blend = (None, None) if self.blend_amplitudes is None else (self.blend_amplitudes[idx],
                                                                     self.blend_patterns[idx])
        return Triggers(self.labels[idx], self.masks[idx], self.patterns[idx], self.flagged[idx], *blend)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write a file so that readers see the old one or the whole new one, never a part (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_report(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"report not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise GateError(f"{path} is not valid JSON: {exc}") from None
