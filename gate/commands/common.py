"""Arguments several sub-commands share: the model's input spec, the policy's flags, opening the oracle.

Every settings flag comes from the setting's own declaration (:mod:`gate.settings`): the policy's flags
from :func:`gate.policy.policy_settings`, the input-spec flags from :class:`gate.spec.SpecOverrides`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from gate.errors import UsageError
from gate.oracle import Oracle
from gate.policy import PAPER, Policy, load_policy, policy_settings
from gate.settings import Setting, SettingError, add_flags, given
from gate.spec import SpecOverrides

SECTION_TITLES = {
    "data": "data (policy section data)",
    "input": "model input spec (policy section input; detected when not given)",
    "search": "search (policy section search; defaults are the gate's query-efficient settings)",
    "blend": "blend trigger search (policy section blend; runs with --blend)",
    "synthesis": "B3D-SS synthesis (policy section synthesis)",
    "outliers": "outliers (policy section outliers)",
    "budget": "budget (policy section budget)",
    "metrics": "metrics (policy section metrics)",
}


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How the model runs here (not part of any policy)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider (auto)")
    g.add_argument("--max-batch", type=int, default=2048, help="images per model call (default 2048)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The input-spec flags and the runtime flags, for commands without a policy."""
    add_flags(p, SpecOverrides.settings(), SECTION_TITLES["input"])
    add_runtime_args(p)


def spec_from_args(args: argparse.Namespace) -> SpecOverrides:
    try:
        return SpecOverrides(**{s.name: v for s, v in given(args, SpecOverrides.settings())})
    except SettingError as exc:
        raise UsageError(str(exc)) from None


def open_oracle(args: argparse.Namespace, overrides: SpecOverrides | None = None,
                max_queries: int | None = None) -> Oracle:
    if args.max_batch < 1:
        raise UsageError("--max-batch must be at least 1")
    return Oracle(args.model, overrides if overrides is not None else spec_from_args(args), device=args.device,
                  max_batch=args.max_batch, max_queries=max_queries)


# --------------------------------------------------------------------------- the policy on the command line
def add_policy_args(p: argparse.ArgumentParser, sections: Iterable[str] | None = None,
                    aliases: dict[str, list[str]] | None = None) -> None:
    """A flag for every policy setting (of ``sections``, default all), grouped by section, and ``--paper``."""
    chosen = _chosen(sections)
    for section, title in SECTION_TITLES.items():
        group = [s for s in chosen if s.place.split(".")[0] == section]
        if group:
            add_flags(p, group, title, aliases=aliases)
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings (Dong et al. 2021): k=50, minibatch 32, separate mask/pattern "
                        "evaluations, no antithetic samples, no bandit (about 5x the queries); B3D-SS synthesis as "
                        "Eq. 7 is written (every pixel, no occlusion, p >= 0.5). Flags given beside it still win")


def _chosen(sections: Iterable[str] | None) -> list[Setting]:
    """The policy settings of ``sections`` (section names, or single places like ``search.seed``)."""
    keep = None if sections is None else set(sections)
    return [s for s in policy_settings() if keep is None or s.place.split(".")[0] in keep or s.place in keep]


def policy_from_args(args: argparse.Namespace, base: Policy | None = None,
                     sections: Iterable[str] | None = None) -> tuple[Policy, dict]:
    """The effective policy: ``--policy`` (or ``base``, or the built-in defaults), then ``--paper``, then every
    flag given, then ``--data`` / ``--synthetic``. Returns it and the overrides (dotted field -> value)."""
    policy = base or (load_policy(args.policy) if getattr(args, "policy", None) else Policy())
    chosen = _chosen(sections)
    changes: dict = {}
    flags: dict = {}
    if getattr(args, "paper", False):
        changes.update(PAPER)
        flags.update({k: "--paper" for k in PAPER})
    for s, value in given(args, chosen):
        changes[s.place] = value
        flags[s.place] = s.flag
    if getattr(args, "data", None) is not None:
        changes["data.source"], changes["data.path"] = "file", args.data
        flags["data.source"] = flags["data.path"] = "--data"
    elif getattr(args, "synthetic", False):
        changes["data.source"] = "synthetic"
        flags["data.source"] = "--synthetic"
    effective = policy.override(changes, flags, error=UsageError)
    return effective, {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
