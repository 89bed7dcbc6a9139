"""Arguments and helpers several sub-commands share: the model input spec, opening the oracle."""

from __future__ import annotations

import argparse

from gate.errors import UsageError
from gate.oracle import Oracle
from gate.spec import SpecOverrides


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model input spec (detected when not given)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="input layout (default: from the input shape)")
    g.add_argument("--input-range", type=float, choices=[1.0, 255.0], dest="value_range",
                   help="value range the model expects: 1 for [0,1], 255 for [0,255] (default 1)")
    g.add_argument("--mean", type=floats, help="per-channel mean the model expects subtracted (e.g. 0.485,0.456,0.406)")
    g.add_argument("--std", type=floats, help="per-channel std the model expects divided by")
    g.add_argument("--output", choices=["probs", "logits"], dest="output_kind",
                   help="what the model outputs (default: detected by probing)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider (auto)")
    g.add_argument("--max-batch", type=int, default=2048, help="images per model call (default 2048)")


def overrides_from_args(args: argparse.Namespace, base: SpecOverrides | None = None) -> SpecOverrides:
    base = base or SpecOverrides()
    values = {f: getattr(args, f, None) for f in ("layout", "value_range", "mean", "std", "output_kind")}
    merged = {f: (v if v is not None else getattr(base, f)) for f, v in values.items()}
    return SpecOverrides(**merged)


def open_oracle(args: argparse.Namespace, overrides: SpecOverrides | None = None,
                max_queries: int | None = None) -> Oracle:
    if args.max_batch < 1:
        raise UsageError("--max-batch must be at least 1")
    return Oracle(args.model, overrides or overrides_from_args(args), device=args.device,
                  max_batch=args.max_batch, max_queries=max_queries)


def synth_config(seed: int, per_class: int | None, grid: int | None, paper: bool = False):
    """The B3D-SS synthesis settings from command-line values (None: the default; grid 0: every pixel;
    paper: Eq. 7 as written, see gate.synth.SynthConfig.paper)."""
    from dataclasses import replace

    from gate.synth import SynthConfig

    changes = {"per_class": per_class} if per_class is not None else {}
    if grid is not None:
        changes["grid"] = grid or None
    try:
        return replace(SynthConfig.paper(seed=seed) if paper else SynthConfig(seed=seed), **changes)
    except ValueError as exc:
        raise UsageError(f"synthesis: {exc}") from None
