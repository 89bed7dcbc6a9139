"""How ``gate run`` and ``gate scan`` use the verdict cache (:mod:`gate.cache`): this run's key, the look-up
before any query, keeping a finished scan, and the record report.json and the attestation carry.

The record (``decision.cache`` in report.json, ``predicate.cache`` in the attestation) is one of::

    {"status": "hit",  "key": ..., "entry": DIR, "scanned": WHEN, "scan_queries": N, "queries": 0}
    {"status": "miss", "key": ..., "entry": DIR, "stored": true|false}
    {"status": "off",  "why": "--no-cache" | ...}

On a hit the decision is made again from the cached result under this run's policy
(:func:`gate.decision.decide` is pure): the same decision, never a stored one.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from gate.cache import ENV, CacheKey, VerdictCache, cache_dir, cache_key, worth_keeping
from gate.decision import decide
from gate.pipeline import GateRun
from gate.policy import Policy


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verdict cache")
    g.add_argument("--no-cache", action="store_true",
                   help="scan even when the same model, data, policy, tool and seed were scanned before (and keep "
                        "nothing)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help=f"where verdicts are kept (default: ${ENV}, else $XDG_CACHE_HOME/backdoor-gate, else "
                        "~/.cache/backdoor-gate)")


class CacheUse:
    """The cache as one run uses it; ``record`` is what the reports say about it."""

    def __init__(self, cache: VerdictCache | None, key: CacheKey | None, record: dict, model: str = "") -> None:
        self.cache, self.key, self.record, self.model = cache, key, record, model

    @classmethod
    def open(cls, args: argparse.Namespace, policy: Policy, policy_sha256: str, examples: int,
             warn: Callable[[str], None]) -> CacheUse:
        if getattr(args, "no_cache", False):
            return cls(None, None, {"status": "off", "why": "--no-cache"})
        root = cache_dir(getattr(args, "cache_dir", None))
        if root is None:
            return cls(None, None, {"status": "off", "why": f"${ENV} is off"})
        cache = VerdictCache(root, warn)  # UsageError: --cache-dir names a file
        outputs = {"examples": int(examples), "device": getattr(args, "device", None),
                   "max_batch": getattr(args, "max_batch", None)}
        key = cache_key(args.model, policy.to_dict(), policy_sha256, outputs)
        if key is None:  # a missing file (the run says why) or a remote model, whose bytes are not ours to hash
            return cls(None, None, {"status": "off", "why": "no model file to hash"})
        return cls(cache, key, {"status": "miss", "key": key.digest, "entry": str(cache.entry(key)),
                                "stored": False}, str(args.model))

    def lookup(self, policy: Policy) -> GateRun | None:
        """The earlier run's result, decided again under ``policy``, or None (a miss)."""
        if self.cache is None:
            return None
        hit = self.cache.load(self.key)
        if hit is None:
            return None
        result = dataclasses.replace(hit.result, model={**hit.result.model, "path": self.model})  # same bytes
        self.record = {"status": "hit", "key": self.key.digest, "entry": str(hit.path), "scanned": hit.created,
                       "scan_queries": int(result.queries.get("total", 0)), "queries": 0}
        return GateRun(result, hit.triggers, decide(result, policy), hit.examples)

    def remember(self, run: GateRun, policy: Policy, policy_sha256: str) -> None:
        """Keep a finished scan, when it is worth keeping and nothing it depends on changed while it ran."""
        if self.cache is None or not worth_keeping(run.result, policy.to_dict()):
            return
        again = cache_key(self.model, policy.to_dict(), policy_sha256, self.key.outputs)
        if again != self.key or run.result.model.get("sha256") != self.key.model_sha256:
            self.cache.warn("the model or data changed during the scan: not kept in the cache")
            return
        self.record["stored"] = self.cache.store(self.key, run.result, run.triggers, run.examples) is not None

    @property
    def hit(self) -> bool:
        return self.record.get("status") == "hit"
