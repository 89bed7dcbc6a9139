"""The verdict cache: a finished scan kept under everything its result depends on, so that the same run
answers again without sending a single query.

The key (:class:`CacheKey`) is the model file's sha256, a digest of the data's bytes (the data file, or every
image file of a folder; the seed images too), the effective policy's sha256 (the one the attestation
records), the tool (version, a digest of the gate's own source files, onnxruntime and numpy versions), the
seed, and what else shapes the outputs (``--examples``, ``--device``, ``--max-batch``). A change to any of
them is another key: a miss. A hit gives back the scan result, triggers and report examples; the caller
decides again (:func:`gate.decision.decide` is pure), so the verdict is the policy's, never a stored word.

Where (:func:`cache_dir`): ``--cache-dir``, else ``$BACKDOOR_GATE_CACHE`` (a folder, or ``off``), else
``$XDG_CACHE_HOME/backdoor-gate``, else ``~/.cache/backdoor-gate``. One folder per key::

    <dir>/<key sha256>/result.json     ScanResult.to_dict()
                       triggers.npz    Triggers.save
                       examples.npz    the report's stamped examples (allow_pickle=False on loading)
                       entry.json      written last: the key in full, when, and each file's sha256

An entry is written in a temporary folder and renamed into place, so a reader sees a whole entry or none.
Anything wrong with an entry (missing or unreadable file, a sha256 that does not match, another key, a
result that does not parse or is for another model) makes it a miss with a warning: the run scans again and
replaces it. A broken cache never gives a verdict. Only complete scans, or scans cut short by the query
budget (deterministic), are kept; a scan that a time budget may have cut is not.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import gate
from gate import __version__
from gate.data import IMAGE_SUFFIXES
from gate.errors import GateError, UsageError
from gate.oracle import file_sha256
from gate.result import Example, ScanResult, Triggers, atomic_write

FORMAT = 1
ENV = "BACKDOOR_GATE_CACHE"
ENTRY, RESULT, TRIGGERS, EXAMPLES = "entry.json", "result.json", "triggers.npz", "examples.npz"


def cache_dir(explicit: str | None = None) -> Path | None:
    """The cache folder (module docstring), or None when ``$BACKDOOR_GATE_CACHE`` is ``off``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("off", "0", "no", "false"):
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "backdoor-gate"


# --------------------------------------------------------------------------- the key
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_digest(path: str | None) -> str:
    """What the bytes at ``path`` are: a file's sha256, or one over a folder's image files (relative name and
    sha256 of each, in order); ``none`` for no path, ``missing`` for a path that is not there.

    >>> content_digest(None)
    'none'
    """
    if path is None:
        return "none"
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()):
            h.update(_canonical([f.relative_to(p).as_posix(), file_sha256(f)]))
        return "folder:" + h.hexdigest()
    return "missing"


@functools.lru_cache(maxsize=1)
def _tool() -> str:
    return json.dumps(_tool_facts())


def tool_fingerprint() -> dict:
    """The code a result came from: a change to any of the gate's source or policy files is another tool.
    Taken once per process: the code a process runs is the code it started with."""
    return json.loads(_tool())


def _tool_facts() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    root = Path(gate.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
        if "__pycache__" not in f.parts:
            h.update(_canonical([f.relative_to(root).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest()]))
    ort = None
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            ort = version(dist)
            break
        except PackageNotFoundError:
            continue
    return {"version": __version__, "source_sha256": h.hexdigest(), "onnxruntime": ort, "numpy": np.__version__}


@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    data: dict  # data.path and data.seed_images -> content_digest
    policy_sha256: str
    tool: dict
    seed: int
    outputs: dict  # what else shapes the files: examples, device, max_batch

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.to_dict())).hexdigest()


def cache_key(model: str | Path, policy: dict, policy_sha256: str, outputs: dict) -> CacheKey | None:
    """The key of a run of ``model`` under the effective ``policy`` (its dict), or None when the model file
    cannot be read (the run itself then says why)."""
    try:
        model_sha = file_sha256(model) if Path(model).is_file() else None
    except OSError:
        model_sha = None
    if model_sha is None:
        return None
    data = policy.get("data") or {}
    try:
        digests = {name: content_digest(data.get(name)) for name in ("path", "seed_images")}
    except OSError as exc:
        digests = {"unreadable": str(exc)}
    return CacheKey(model_sha, digests, policy_sha256, tool_fingerprint(), int(policy["search"]["seed"]),
                    dict(outputs))


# --------------------------------------------------------------------------- entries
@dataclass
class CachedScan:
    result: ScanResult
    triggers: Triggers
    examples: dict[int, list[Example]] | None
    created: str  # when the scan that made the entry finished (UTC, ISO 8601)
    path: Path  # the entry's folder


def worth_keeping(result: ScanResult, policy: dict) -> bool:
    """Complete scans, and scans cut by the query budget; not one a time budget may have cut short."""
    return result.complete or (policy.get("budget") or {}).get("max_seconds") is None


class VerdictCache:
    """One cache folder. ``warn`` hears, in one line each, why an entry was not used or not written."""

    def __init__(self, root: str | Path, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.warn = warn or (lambda _text: None)
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--cache-dir {self.root} is a file, not a folder")

    def entry(self, key: CacheKey) -> Path:
        return self.root / key.digest

    def load(self, key: CacheKey) -> CachedScan | None:
        """The entry for ``key``, or None (no entry, or one that cannot be trusted: a warning says why)."""
        where = self.entry(key)
        if not (where / ENTRY).exists():
            return None
        try:
            return self._read(where, key)
        except Exception as exc:  # whatever is wrong with it, it is not a verdict
            self.warn(f"cache entry {where} ignored ({_why(exc)}): scanning again")
            return None

    def _read(self, where: Path, key: CacheKey) -> CachedScan:
        entry = json.loads((where / ENTRY).read_text())
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise GateError(f"format {entry.get('format') if isinstance(entry, dict) else '?'} is not {FORMAT}")
        if entry.get("key") != json.loads(json.dumps(key.to_dict())):
            raise GateError("it was made for another key")
        files = entry.get("files")
        if not isinstance(files, dict) or set(files) != {RESULT, TRIGGERS, EXAMPLES}:
            raise GateError("its file list is incomplete")
        for name, digest in files.items():
            if file_sha256(where / name) != digest:
                raise GateError(f"{name} does not match its sha256")
        result = ScanResult.from_dict(json.loads((where / RESULT).read_text()))
        if result.model.get("sha256") != key.model_sha256:
            raise GateError("its result is for another model")
        triggers = Triggers.load(where / TRIGGERS)
        if sorted(int(v) for v in triggers.labels) != sorted(c.label for c in result.classes):
            raise GateError("its triggers do not match its classes")
        return CachedScan(result, triggers, _load_examples(where / EXAMPLES), str(entry.get("created")), where)

    def store(self, key: CacheKey, result: ScanResult, triggers: Triggers,
              examples: dict[int, list[Example]] | None) -> Path | None:
        """Keep a finished scan under ``key``; None (and a warning) when it could not be written."""
        tmp = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        where = self.entry(key)
        try:
            tmp.mkdir(parents=True)
            atomic_write(tmp / RESULT, json.dumps(_plain(result.to_dict())) + "\n")  # NaN and inf kept
            triggers.save(tmp / TRIGGERS)
            atomic_write(tmp / EXAMPLES, _examples_bytes(examples))
            entry = {"format": FORMAT, "key": key.to_dict(), "key_sha256": key.digest,
                     "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "files": {name: file_sha256(tmp / name) for name in (RESULT, TRIGGERS, EXAMPLES)}}
            atomic_write(tmp / ENTRY, json.dumps(entry, indent=2) + "\n")
            if where.exists():
                shutil.rmtree(where)
            os.replace(tmp, where)
            return where
        except (OSError, TypeError, ValueError) as exc:  # the verdict does not depend on the cache
            self.warn(f"could not keep this scan in the cache {self.root}: {_why(exc)}")
            return None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _plain(obj):
    """JSON data: numpy scalars as Python numbers, tuples as lists (floats keep NaN and inf)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _why(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def _examples_bytes(examples: dict[int, list[Example]] | None) -> bytes:
    rows = [ex for label in sorted(examples or {}) for ex in examples[label]]
    empty = np.zeros((0, 1, 1, 1), np.float32)
    buf = io.BytesIO()
    np.savez_compressed(
        buf, present=np.array(examples is not None), labels=np.array(sorted(examples or {}), np.int64),
        target=np.array([ex.target for ex in rows], np.int64),
        clean=np.stack([ex.clean for ex in rows]).astype(np.float32) if rows else empty,
        stamped=np.stack([ex.stamped for ex in rows]).astype(np.float32) if rows else empty,
        clean_pred=np.array([ex.clean_pred for ex in rows], np.int64),
        stamped_pred=np.array([ex.stamped_pred for ex in rows], np.int64),
        label=np.array([-1 if ex.label is None else ex.label for ex in rows], np.int64))
    return buf.getvalue()


def _load_examples(path: Path) -> dict[int, list[Example]] | None:
    with np.load(path, allow_pickle=False) as z:
        a = {name: z[name] for name in z.files}  # each read once: an npz member is decompressed per access
    if not bool(a["present"]):
        return None
    out: dict[int, list[Example]] = {int(label): [] for label in a["labels"]}
    for i, target in enumerate(a["target"]):
        label = int(a["label"][i])
        out[int(target)].append(Example(int(target), a["clean"][i], a["stamped"][i], int(a["clean_pred"][i]),
                                        int(a["stamped_pred"][i]), None if label < 0 else label))
    return out
