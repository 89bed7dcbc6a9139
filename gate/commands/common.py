"""Arguments several sub-commands share: the model's input spec, the policy's flags, opening the oracle.

Every settings flag comes from the setting's own declaration (:mod:`gate.settings`): the policy's flags
from :func:`gate.policy.policy_settings`, the input-spec flags from :class:`gate.spec.SpecOverrides`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import numpy as np

from gate.errors import GateError, UsageError
from gate.oracle import Oracle, QueryOracle, host_cores
from gate.policy import PAPER, Policy, load_policy, policy_settings
from gate.settings import Setting, SettingError, add_flags, given
from gate.spec import SpecOverrides

SECTION_TITLES = {
    "data": "data (policy section data)",
    "input": "model input spec (policy section input; detected when not given)",
    "search": "search (policy section search; defaults are the gate's query-efficient settings)",
    "blend": "blend trigger search (policy section blend; runs with --blend)",
    "screening": "screening (policy section screening; runs with --screening)",
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


def add_remote_args(p: argparse.ArgumentParser) -> None:
    """A model behind an Open Inference Protocol (V2) server instead of a file (:mod:`gate.remote_oracle`);
    the model's name there is ``--model-name`` (added here unless the command has one)."""
    g = p.add_argument_group("remote model (instead of a file: a model served over the Open Inference Protocol)")
    g.add_argument("--remote", metavar="URL",
                   help="scan the model --model-name served by this Open Inference Protocol (KServe V2) REST server "
                        "(Triton, KServe, MLServer, gate proxy --no-shield), e.g. http://HOST:PORT; no model file")
    try:
        g.add_argument("--model-name", metavar="NAME", help="with --remote: the model's name on the server")
    except argparse.ArgumentError:  # the command has its own --model-name (gate run: the metrics label, too)
        pass
    g.add_argument("--model-version", metavar="V", help="the model's version on the server (default: its choice)")
    g.add_argument("--max-qps", type=float, metavar="N", help="images sent to the server per second at most "
                   "(default: no limit)")
    g.add_argument("--remote-concurrency", type=int, metavar="N", help="requests in flight at once (default 4)")
    g.add_argument("--remote-batch", type=int, metavar="N", help="images per request (default: what fits in 4 MiB, "
                   "at most 256; a fixed-batch model: its batch)")
    g.add_argument("--remote-retries", type=int, metavar="N", help="tries again after a connection error, timeout, "
                   "HTTP 429 or 5xx, with exponential back-off from 0.5 s (default 5)")
    g.add_argument("--remote-timeout", type=float, metavar="SECONDS", help="per request (default 60)")


def add_ray_args(p: argparse.ArgumentParser, *, models: bool = False) -> None:
    """The scan's classes (``models``: the models, :mod:`gate.fleet`) spread over a Ray cluster
    (:mod:`gate.distributed`; the ``ray`` extra)."""
    what = "models" if models else "classes"
    g = p.add_argument_group(f"Ray (spread the {what} over a Ray cluster's workers; pip install "
                             "'backdoor-gate[ray]')")
    if models:
        g.add_argument("--ray", metavar="ADDRESS",
                       help="run each model's gate run as one Ray task: local (a Ray instance started here), auto "
                            "(the running cluster), HOST:PORT or ray://HOST:PORT; the reports are written here, the "
                            "same as without --ray")
    else:
        g.add_argument("--ray", metavar="ADDRESS",
                       help="run the classes' searches as Ray tasks: local (a Ray instance started here), auto (the "
                            "running cluster), HOST:PORT or ray://HOST:PORT; same seed -> the same per-class results "
                            "and decision as without --ray")
        g.add_argument("--ray-parts", type=int, metavar="N",
                       help="tasks the classes are dealt into (default: the cluster's CPUs / --ray-cpus)")
    g.add_argument("--ray-cpus", type=float, metavar="N", help="CPUs per task (default 1)")
    g.add_argument("--ray-gpus", type=float, metavar="N", help="GPUs per task (default 0)")
    g.add_argument("--ray-retries", type=int, metavar="N",
                   help="times a task whose worker died runs again (default 3)")


RAY_ONLY = ("ray_parts", "ray_cpus", "ray_gpus", "ray_retries")


def ray_options(args: argparse.Namespace, policy: Policy | None):
    """The :class:`gate.distributed.RayOptions` of ``--ray`` (None without it); UsageError for what it cannot
    do (--remote, --resume, screening, the bandit) or when Ray is not installed, before any query. ``policy``
    None: whole models run as Ray tasks (``gate run-many``), so nothing a scan decides across classes is refused."""
    address = getattr(args, "ray", None)
    if address is None:
        given_flags = [f"--{k.replace('_', '-')}" for k in RAY_ONLY if getattr(args, k, None) is not None]
        if given_flags:
            raise UsageError(f"{', '.join(given_flags)} only with --ray")
        return None
    import importlib.util

    from gate.distributed import NEEDS_RAY, RayOptions, check_config

    if not address.strip():
        raise UsageError("--ray needs an address: local, auto, HOST:PORT or ray://HOST:PORT")
    if getattr(args, "remote", None):
        raise UsageError("--ray scans a model file: it does not support --remote")
    if getattr(args, "resume", False):
        raise UsageError("--ray does not checkpoint: it does not support --resume")
    if policy is not None:
        check_config(policy.scan_config())
    if importlib.util.find_spec("ray") is None:
        raise UsageError(NEEDS_RAY)
    stated = {k: getattr(args, f"ray_{k}") for k in ("parts", "cpus", "gpus", "retries")
              if getattr(args, f"ray_{k}", None) is not None}
    options = RayOptions(address=address.strip(), device=args.device, **stated)
    options.check()
    return options


REMOTE_ONLY = ("model_version", "max_qps", "remote_concurrency", "remote_batch", "remote_retries", "remote_timeout")


def check_model_source(args: argparse.Namespace) -> None:
    """Exactly one model: a file, or ``--remote URL --model-name NAME``; for a remote one ``args.model``
    becomes the model's URL (what the reports and metrics name). UsageError otherwise."""
    remote = getattr(args, "remote", None)
    if remote is None:
        if args.model is None:
            raise UsageError("no model: give an ONNX file, or --remote URL --model-name NAME")
        given_flags = [f"--{k.replace('_', '-')}" for k in REMOTE_ONLY if getattr(args, k, None) is not None]
        if given_flags:
            raise UsageError(f"{', '.join(given_flags)} only with --remote")
        return
    from gate.remote_oracle import check_endpoint, model_url

    if args.model is not None:
        raise UsageError(f"give a model file or --remote, not both ({args.model} and --remote {remote})")
    if not getattr(args, "model_name", None):
        raise UsageError("--remote needs --model-name: the model's name on the server")
    args.model = model_url(check_endpoint(remote), args.model_name, args.model_version)


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
    """The model file's oracle, or with ``--remote`` a :class:`gate.remote_oracle.RemoteOracle` (its hard
    budget ``max_queries``: every image sent counts, the spec's probe included)."""
    if args.max_batch < 1:
        raise UsageError("--max-batch must be at least 1")
    if getattr(args, "remote", None):
        from gate.remote_oracle import RemoteOracle

        options = {"model_version": "model_version", "max_qps": "max_qps", "request_images": "remote_batch",
                   "concurrency": "remote_concurrency", "retries": "remote_retries", "timeout": "remote_timeout"}
        stated = {k: getattr(args, flag) for k, flag in options.items() if getattr(args, flag, None) is not None}
        return RemoteOracle(args.remote, args.model_name, overrides if overrides is not None else spec_from_args(args),
                            max_batch=args.max_batch, max_queries=max_queries, **stated)
    # on the CPU: one single-thread model call per core rather than one call parallel inside (gate.oracle.Oracle)
    return Oracle(args.model, overrides if overrides is not None else spec_from_args(args), device=args.device,
                  max_batch=args.max_batch, max_queries=max_queries, calls=host_cores())


def as_scanned(oracle: QueryOracle, scanned: dict | None, stated: SpecOverrides, report: str) -> QueryOracle:
    """``oracle`` under the input convention the scan ran under (its report's ``input_spec``): the reversed triggers
    are stamped as the scan stamped them. Nothing stated here: the scan's convention is taken (it may have been
    chosen from labelled data); a stated one that differs is refused."""
    if not scanned:
        return oracle
    s = oracle.spec

    def same(a, b) -> bool:
        return (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=1e-6, atol=0))
    if (scanned.get("layout") == s.layout and float(scanned.get("value_range", 1.0)) == s.value_range
            and same(scanned.get("mean"), s.mean) and same(scanned.get("std"), s.std)):
        return oracle
    there = (f"{scanned.get('layout')} range [0,{float(scanned.get('value_range', 1.0)):g}]"
             + (f" mean {scanned['mean']} std {scanned.get('std')}" if scanned.get("mean") else ""))
    if any(v is not None for v in (stated.layout, stated.value_range, stated.mean, stated.std)):
        raise GateError(f"{report}: the scan ran under {there}, the input flags given here say otherwise; pass the "
                        f"scan's convention or none")
    return oracle.with_spec(SpecOverrides(
        layout=scanned["layout"], value_range=float(scanned.get("value_range", 1.0)),
        mean=None if scanned.get("mean") is None else tuple(scanned["mean"]),
        std=None if scanned.get("std") is None else tuple(scanned["std"]),
        output_kind=s.output_kind, size=stated.size, output_name=stated.output_name))


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
