"""The canonical result of a scan: one JSON-serialisable object every report is rendered from.

``report.json`` is ``ScanResult.to_dict()`` (plus, once a policy has decided, a ``decision`` block);
``triggers.npz`` holds the reversed trigger of every class.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
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
    status: str  # converged | bandit_stopped | max_steps | not_reached | budget
    seconds: float = 0.0  # wall time attributed to this class (its share of each model call)
    anomaly_index: float = 0.0  # the outlier rule's index: calibrated z of log L1, or MAD index; positive = small
    flagged: bool = False
    p_value: float | None = None  # calibrated rule: per-model (Sidak-corrected) p-value of this class
    note: str = ""  # why the search found no working trigger ("" when it did)


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = [asdict(c) for c in self.classes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScanResult:
        d = dict(d)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise GateError(f"report schema version {d.get('schema_version')!r} is not {SCHEMA_VERSION!r}")
        # added by the gate's renderers, not part of the scan; "verdict": reports before the decision was one
        for key in ("decision", "policy", "error", "verdict"):
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
    """Reversed triggers: soft masks (K, H, W) and patterns (K, H, W, C) in [0, 1]."""

    labels: np.ndarray  # (K,)
    masks: np.ndarray  # (K, H, W) float32, soft mask g(theta_m)
    patterns: np.ndarray  # (K, H, W, C) float32
    flagged: np.ndarray  # (K,) bool

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, labels=self.labels, masks=self.masks, patterns=self.patterns, flagged=self.flagged)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Triggers:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["labels"], z["masks"].astype(np.float32), z["patterns"].astype(np.float32),
                           z["flagged"].astype(bool))
        except FileNotFoundError:
            raise GateError(f"triggers file not found: {path}") from None
        except (KeyError, ValueError, OSError) as exc:
            raise GateError(f"cannot read triggers from {path}: {exc}") from None

    def select(self, labels) -> Triggers:
        idx = np.array([int(np.flatnonzero(self.labels == lab)[0]) for lab in labels], dtype=np.int64)
        return Triggers(self.labels[idx], self.masks[idx], self.patterns[idx], self.flagged[idx])


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
