"""Where a model's p-value sits among clean models: an empirical p-value beside the rule's normal-tail one.

The calibrated rule's model p-value (``gate.outliers``) assumes a N(0, 1) null, and the wide zoo shows that null is
poor (clean models' natural classes have a heavy lower tail); the cut ``alpha`` is calibrated for that, the p-value
itself is not. So the decision also says how this model's p-value compares with clean models' p-values: of the n
clean reference models, k had a model p-value at or below this one, and the empirical p-value is (k + 1) / (n + 1)
(the chance that a clean model like those scores at least this extreme, with the model itself counted among them,
as a conformal p-value is).

The reference (``gate/policies/clean_reference.json``, made by ``python -m bench.clean_reference``) holds the
clean wide-zoo models' model p-values, each judged by the rule of its cross-validation fold, so by a rule that was
not fitted on it (a clean model the shipped rule was fitted on looks cleaner to it than a new one would). It is only
valid for scans like the reference's, and the comparison is withheld, with the reason, otherwise:

* the same search (every field of the scan's ``search`` record but the seed, image counts, model-call size and
  budgets), on real clean images (B3D; B3D-SS scans' L1 norms sit elsewhere), without the blend mode (the
  reference has patch scans only) and of inputs with the reference's pixel count (32x32);
* judged by the rule the reference was made for: the same scale floor, population weight and population
  (alpha only sets the cut, not the p-values, and may differ).

The reference pools the zoo's two kinds: clean 10-class CIFAR-10 models' p-values run lower (median 10^-1.88) than
clean 43-class GTSRB ones' (10^-0.84), so a clean 10-class model reads somewhat rarer against it than against its own
kind (bench/RESULTS.md, "A clean reference for the model p-value"). The comparison informs the reader; it never
changes the decision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gate.errors import GateError
from gate.outliers import OutlierRule

REFERENCE_FILE = Path(__file__).parent / "policies" / "clean_reference.json"
# search fields that do not move the L1 norms of a scan that completed (or that only size it)
UNCOMPARED_SEARCH = frozenset({"seed", "max_images", "held_out", "batch_images", "max_queries", "max_seconds"})
# the rule's fields that shape its p-values (alpha only places the cut)
P_VALUE_FIELDS = ("method", "scale_floor", "population_weight", "population_mean", "population_scale")


@dataclass(frozen=True)
class CleanReference:
    """Clean models' model p-values (log10), and what scans and rule they belong to."""

    log10_p: tuple[float, ...]
    rule: dict  # P_VALUE_FIELDS of the rule the reference is for
    search: dict  # the reference scans' search record, UNCOMPARED_SEARCH left out
    pixels: int
    description: str

    @classmethod
    def from_dict(cls, d: dict) -> CleanReference:
        return cls(tuple(float(v) for v in d["log10_p"]), dict(d["rule"]), dict(d["search"]), int(d["pixels"]),
                   str(d["description"]))


@lru_cache(maxsize=4)
def load(path: str | Path = REFERENCE_FILE) -> CleanReference | None:
    """The reference at ``path``; None when there is none (the comparison is then withheld, never guessed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return CleanReference.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:  # a damaged installation: fail closed, and say where
        raise GateError(f"clean reference {path} is unreadable ({type(exc).__name__}: {exc}); reinstall the "
                        "gate or remake it with python -m bench.clean_reference") from exc


@dataclass(frozen=True)
class Standing:
    """This model's p-value among the clean reference models, or why that comparison is withheld."""

    clean_models: int = 0
    at_or_below: int = 0  # clean reference models whose model p-value was at most this model's
    unavailable: str | None = None
    description: str = ""  # what the reference models are, after their count

    @property
    def p_value(self) -> float | None:
        """The empirical p-value (k + 1) / (n + 1); None when withheld."""
        return None if self.unavailable else (self.at_or_below + 1) / (self.clean_models + 1)

    def to_dict(self) -> dict:
        if self.unavailable:
            return {"unavailable": self.unavailable}
        return {"clean_models": self.clean_models, "at_or_below": self.at_or_below, "p_value": self.p_value,
                "reference": self.description}

    @property
    def sentence(self) -> str:
        if self.unavailable:
            return f"Against clean models: not compared ({self.unavailable})."
        return (f"Against clean models: {self.at_or_below} of {self.clean_models} {self.description} had a model "
                f"p-value at or below this one's (empirical p-value {self.p_value:.2g}).")


def _differences(search: dict, reference: dict) -> list[str]:
    keys = (set(search) | set(reference)) - UNCOMPARED_SEARCH
    return sorted(k for k in keys if search.get(k) != reference.get(k))


def standing(model_p: float, rule: OutlierRule, search: dict, method: str, pixels: int | None, blend: bool,
             reference: CleanReference | None) -> Standing:
    """Where ``model_p`` (the patch rule's model p-value) sits among the reference's clean models, for a scan
    with this ``search`` record, ``method`` (b3d / b3d-ss), input ``pixels`` and ``blend`` mode, judged by
    ``rule``; withheld, with the reason, where the reference does not apply."""
    if reference is None:
        return Standing(unavailable="no clean reference is installed")
    why = None
    if method != "b3d":
        why = "the reference scans used real clean images, this scan synthetic ones"
    elif blend:
        why = "the reference has patch-only scans, this scan's p-value includes the blend mode"
    elif pixels != reference.pixels:
        side = round(math.sqrt(reference.pixels))
        why = f"the reference models take {side}x{side} inputs, this one {pixels or 'an unrecorded number of'} pixels"
    elif any(getattr(rule, k) != v for k, v in reference.rule.items()):
        why = "the policy's outlier rule is not the one the reference was made for"
    else:
        diff = _differences(search, reference.search)
        if diff:
            why = f"the search differs from the reference scans' in {', '.join(diff)}"
    if why:
        return Standing(unavailable=why)
    x = math.log10(model_p) if model_p > 0 else -math.inf
    k = sum(v <= x for v in reference.log10_p)
    return Standing(len(reference.log10_p), k, None, reference.description)
