"""Checkpoints of a running scan, so that ``gate run/scan --resume OUT`` continues where a stopped run was.

A checkpoint is taken between two rounds of :class:`gate.scan.ScanEngine` (every ``every`` seconds) and
holds everything the next round depends on: each search's state (parameters, Adam moments, the lambda
schedule's counters, the best trigger so far, the random generator's state), its queries and hard
examples, the engine's step and the queries spent. Per-step scratch buffers (the noise and candidates
that ``ask`` overwrites) are left out. With the same model, data and policy the set-up of a resumed engine
is the same as the first one's (the data split and clean predictions are seeded), so restoring this state
gives the very same rounds: a resumed run's report equals the uninterrupted one's, timings aside.

Files in OUT: ``checkpoint.npz`` (arrays, ``allow_pickle=False``: loading runs no code) and
``checkpoint.json`` (everything else, the fingerprint, and the npz file's sha256), each written atomically;
the JSON is written last, so a pair that does not match is never used. B3D-SS's synthetic images and
their synthesis summary are kept as ``checkpoint-data.npz`` once synthesis has finished.

The fingerprint (model sha256, effective policy, data source, tool version) must match on resume;
otherwise the resume is refused with a one-line error. A finished run removes its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from gate import __version__
from gate.errors import GateError

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_NPZ = "checkpoint.npz"
DATA_NPZ = "checkpoint-data.npz"
FILES = (CHECKPOINT_JSON, CHECKPOINT_NPZ, DATA_NPZ)
SCRATCH = frozenset({"u", "eps", "z", "masks", "patterns", "delta", "amps",  # rewritten by every ask()
                     "grid"})  # the search grid, set by init()
VERSION = 1


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- search states
def state_to_dict(state: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict:
    """A search state's fields as JSON data; its arrays go into ``arrays`` under ``prefix``."""
    meta: dict = {}
    for f in dataclasses.fields(state):
        if f.name in SCRATCH:
            continue
        v = getattr(state, f.name)
        key = f"{prefix}.{f.name}"
        if isinstance(v, np.ndarray):
            arrays[key] = v
            meta[f.name] = {"array": key}
        elif isinstance(v, np.random.Generator):
            meta[f.name] = {"rng": v.bit_generator.state}
        elif dataclasses.is_dataclass(v):  # Adam
            arrays[key + ".m"], arrays[key + ".v"] = v.m, v.v
            meta[f.name] = {"adam": key, "t": v.t}
        elif isinstance(v, float) and not np.isfinite(v):
            meta[f.name] = {"float": repr(v)}
        else:
            meta[f.name] = v.item() if isinstance(v, np.generic) else v
    return meta


def restore_state(state: Any, meta: dict, arrays) -> None:
    """Put a saved state back into a freshly initialised one (same shapes), in place."""
    for f in dataclasses.fields(state):
        if f.name in SCRATCH:
            continue
        if f.name not in meta:
            raise GateError(f"checkpoint lacks the search field {f.name!r}: made by another version")
        m = meta[f.name]
        cur = getattr(state, f.name)
        if isinstance(m, dict) and "array" in m:
            a = np.array(arrays[m["array"]])
            if isinstance(cur, np.ndarray) and cur.shape == a.shape:
                np.copyto(cur, a)
            else:
                setattr(state, f.name, a.astype(cur.dtype) if isinstance(cur, np.ndarray) else a)
        elif isinstance(m, dict) and "rng" in m:
            cur.bit_generator.state = m["rng"]
        elif isinstance(m, dict) and "adam" in m:
            np.copyto(cur.m, arrays[m["adam"] + ".m"])
            np.copyto(cur.v, arrays[m["adam"] + ".v"])
            cur.t = int(m["t"])
        elif isinstance(m, dict) and "float" in m:
            setattr(state, f.name, float(m["float"]))
        else:
            setattr(state, f.name, m)


# --------------------------------------------------------------------------- the files
def has_checkpoint(out: str | Path) -> bool:
    """Whether the folder holds an interrupted run's checkpoint (its scan state or its synthetic images)."""
    return (Path(out) / CHECKPOINT_JSON).is_file() or (Path(out) / DATA_NPZ).is_file()


def fingerprint(model_sha256: str, policy: dict, data: str, method: str) -> dict:
    return {"model_sha256": model_sha256, "policy": json.loads(json.dumps(policy)), "data": data,
            "method": method, "tool_version": __version__, "format": VERSION}


class Checkpoint:
    """The checkpoint files of one output folder."""

    def __init__(self, out: str | Path, every: float = 60.0) -> None:
        self.out = Path(out)
        self.every = float(every)
        self.last = time.monotonic()
        self.saved = 0

    # writing ------------------------------------------------------------------
    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def save(self, meta: dict, arrays: dict[str, np.ndarray], fp: dict) -> None:
        npz = self.out / CHECKPOINT_NPZ
        _atomic(npz, lambda p: np.savez(p.open("wb"), **arrays))
        doc = {"fingerprint": fp, "npz_sha256": _sha256(npz), "saved": time.time(), "engine": meta}
        _atomic(self.out / CHECKPOINT_JSON, lambda p: p.write_text(json.dumps(doc)))
        self.last = time.monotonic()
        self.saved += 1

    def save_data(self, x: np.ndarray, y: np.ndarray | None, source: str, synthesis: dict, fp: dict) -> None:
        extra = {} if y is None else {"y": y}
        doc = json.dumps({"fingerprint": fp, "source": source, "synthesis": synthesis}, default=float)
        _atomic(self.out / DATA_NPZ, lambda p: np.savez(p.open("wb"), x=x, meta=np.array(doc), **extra))

    def clear(self) -> None:
        for name in FILES:
            (self.out / name).unlink(missing_ok=True)

    # reading ------------------------------------------------------------------
    def load(self, fp: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(engine meta, arrays) of a checkpoint made under ``fp``; None when there is none yet."""
        path = self.out / CHECKPOINT_JSON
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            npz = self.out / CHECKPOINT_NPZ
            if _sha256(npz) != doc["npz_sha256"]:
                raise GateError(f"{npz} does not match {path} (a checkpoint cut short): start without --resume")
            self._check(doc["fingerprint"], fp)
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise GateError(f"cannot read the checkpoint in {self.out}: {exc}") from None
        return doc["engine"], arrays

    def load_data(self, fp: dict) -> tuple[np.ndarray, np.ndarray | None, str, dict] | None:
        path = self.out / DATA_NPZ
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                doc = json.loads(str(z["meta"]))
                x, y = z["x"], (z["y"] if "y" in z.files else None)
        except (OSError, ValueError, KeyError) as exc:
            raise GateError(f"cannot read the synthetic data checkpoint {path}: {exc}") from None
        self._check(doc["fingerprint"], fp)
        return x, y, doc["source"], doc["synthesis"]

    def _check(self, saved: dict, fp: dict) -> None:
        for key, what in (("model_sha256", "model"), ("policy", "policy"), ("data", "data"),
                          ("method", "method"), ("tool_version", "gate version"), ("format", "format")):
            if saved.get(key) != fp.get(key):
                raise GateError(f"the checkpoint in {self.out} was made with another {what}: start without "
                                "--resume (or give the same model, data and policy)")
