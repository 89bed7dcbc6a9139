"""Deployment policy: what to scan with, how hard to look, and when a model may ship.

A policy is a YAML file (``policies/default.yaml`` documents every field). It is read with
``yaml.safe_load`` and checked field by field into a frozen dataclass tree; any problem (unknown key,
wrong type, value out of range, duplicate key) is a :class:`gate.errors.PolicyError` whose one-line
message names the file and the field::

    policy policies/x.yaml: search.k must be an even integer >= 2, got 3

The engine's settings are not written here: each is one field of the engine's own dataclasses
(:class:`gate.search.SearchParams`, :class:`gate.scan.ScanConfig`, :class:`gate.blend.BlendParams`,
:class:`gate.outliers.OutlierRule`, :class:`gate.synth.SynthConfig`, :class:`gate.spec.SpecOverrides`), declared
with :func:`gate.settings.setting` and its place in the file (``search.k``). The sections ``data``, ``input``,
``search``, ``blend``, ``synthesis``, ``outliers``, ``budget`` and ``metrics`` are built from those places
(:func:`policy_section`); only what is the policy's own (where the data comes from, the decision rules,
metrics) is declared below.
The command-line flags of every command come from the same fields (:func:`policy_settings`).

Missing fields take the defaults, so a policy only needs to state what it changes. Command-line flags
override policy values through :meth:`Policy.override`, which re-checks the result; the *effective*
policy (:meth:`Policy.to_dict`) is what reports record. :data:`PAPER` is the paper's preset.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gate.blend import BlendParams
from gate.errors import GateError, PolicyError
from gate.outliers import OutlierRule
from gate.scan import ScanConfig
from gate.screening import ScreeningParams
from gate.search import SearchParams
from gate.settings import (
    Bad,
    Setting,
    SettingError,
    Settings,
    choice,
    integer,
    number,
    optional,
    setting,
    show,
    text,
    url,
)
from gate.spec import SpecOverrides
from gate.synth import SynthConfig

POLICY_VERSION = 1
DATA_SOURCES = ("auto", "file", "synthetic")
NON_ACCEPT = ("reject", "review")  # what a rule may ask for: never "accept" (fail closed)
ON_ERROR = ("error", "reject")


# --------------------------------------------------------------------------- the policy's own settings
@dataclass(frozen=True)
class DataSource(Settings):
    SECTION = "data"

    source: str = setting("file", choice(*DATA_SOURCES),
                          "file: --data or `path`, none given is a usage error | synthetic: B3D-SS | auto: `path` if "
                          "it fits the model, else synthetic (the opt-in fallback)", flag=False)
    path: str | None = setting(None, optional(text), "clean images (.npz or image folder), relative to the policy "
                               "file", flag=False)
    seed_images: str | None = setting(None, optional(text), "unlabelled images synthesis starts from instead of noise")


@dataclass(frozen=True)
class MetricsSettings(Settings):
    SECTION = "metrics"

    pushgateway: str | None = setting(None, optional(url), "also push the metrics to this Prometheus Pushgateway")


# Every class whose settings have a place in the policy file, in the order sections list them.
SOURCES: tuple[type[Settings], ...] = (DataSource, SpecOverrides, ScanConfig, SearchParams, BlendParams,
                                       ScreeningParams, SynthConfig, OutlierRule, MetricsSettings)


def policy_settings() -> list[Setting]:
    """Every setting with a place in the policy file (what the command-line flags are made from)."""
    return [s for cls in SOURCES for s in cls.settings() if s.place is not None]


def policy_section(section: str, name: str) -> type:
    """The frozen dataclass of one policy section: a field for every setting placed in ``section``."""
    fields = []
    for s in policy_settings():
        where, _, leaf = s.place.partition(".")
        if where == section:
            fields.append((leaf, Any, field(default=s.default, metadata={
                "check": s.check, "help": s.help, "flag": s.flag or False, "place": s.place, "origin": s})))
    return dataclasses.make_dataclass(name, fields, bases=(Settings,), frozen=True)


DataPolicy = policy_section("data", "DataPolicy")
InputPolicy = policy_section("input", "InputPolicy")
SearchPolicy = policy_section("search", "SearchPolicy")
BlendPolicy = policy_section("blend", "BlendPolicy")
ScreeningPolicy = policy_section("screening", "ScreeningPolicy")
SynthesisPolicy = policy_section("synthesis", "SynthesisPolicy")
OutlierPolicy = policy_section("outliers", "OutlierPolicy")
BudgetPolicy = policy_section("budget", "BudgetPolicy")
MetricsPolicy = policy_section("metrics", "MetricsPolicy")


def _section(cls: type, doc: str = "", nullable: bool = False) -> Any:
    """A nested section; ``nullable`` ones may be set to null in YAML to switch them off."""
    return field(default_factory=cls, metadata={"section": cls, "nullable": nullable, "help": doc})


@dataclass(frozen=True)
class SmallTriggerRule(Settings):
    min_asr: float = setting(0.95, number(0, 1), "reversed trigger attack success at least this ...", flag=False)
    max_mask_fraction: float = setting(0.01, number(0, 1, lo_open=True), "... with a mask under this fraction",
                                       flag=False)


@dataclass(frozen=True)
class WeakSearchRule(Settings):
    max_unreached_fraction: float = setting(0.5, number(0, 1), "classes whose search found no working trigger, "
                                            "at most", flag=False)
    max_median_mask_fraction: float = setting(0.5, number(0, 1, lo_open=True),
                                              "median reversed mask as a fraction of the image, at most", flag=False)


@dataclass(frozen=True)
class RulesPolicy(Settings):
    flagged: str = setting("reject", choice(*NON_ACCEPT), "outcome when a class is flagged", flag=False)
    small_trigger: SmallTriggerRule | None = _section(SmallTriggerRule, "reject tiny effective triggers", True)
    weak_search: WeakSearchRule | None = _section(WeakSearchRule, "no accept on searches that did not work", True)
    incomplete: str = setting("review", choice(*NON_ACCEPT), "outcome when a budget cut the scan short", flag=False)
    min_clean_accuracy: float | None = setting(0.5, optional(number(0, 1)), "labelled clean data: the model's "
                                               "accuracy on it at least this, else the incomplete outcome",
                                               flag=False)


@dataclass(frozen=True)
class Policy:
    version: int = setting(POLICY_VERSION, integer(POLICY_VERSION, POLICY_VERSION), "policy format version")
    name: str = setting("custom", text, "a name for reports")
    data: DataPolicy = _section(DataPolicy)
    input: InputPolicy = _section(InputPolicy)
    search: SearchPolicy = _section(SearchPolicy)
    blend: BlendPolicy = _section(BlendPolicy)
    screening: ScreeningPolicy = _section(ScreeningPolicy)
    synthesis: SynthesisPolicy = _section(SynthesisPolicy)
    outliers: OutlierPolicy = _section(OutlierPolicy)
    rules: RulesPolicy = _section(RulesPolicy)
    budget: BudgetPolicy = _section(BudgetPolicy)
    metrics: MetricsPolicy = _section(MetricsPolicy)
    on_error: str = setting("error", choice(*ON_ERROR), "error (exit 2) | reject (exit 1); never accept")
    source: str | None = field(default=None, compare=False, metadata={"internal": True})

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, raw: Any, where: str = "policy", error: type[GateError] = PolicyError,
                  source: str | None = None) -> Policy:
        try:
            policy = _build(cls, raw, "")
            policy = dataclasses.replace(policy, source=source)
            policy._check_together()
        except Bad as exc:
            raise error(f"{where}: {exc}") from None
        return policy

    def _check_together(self) -> None:
        try:
            for cls in SOURCES:  # each engine object's own cross-field rules
                self._values(cls, built=True)
        except SettingError as exc:
            raise Bad(str(exc)) from None

    def override(self, changes: Mapping[str, Any], flags: Mapping[str, str] | None = None,
                 error: type[GateError] = PolicyError) -> Policy:
        """A new policy with dotted fields (``"search.k"``) replaced; each change is re-checked.

        ``flags`` names the command-line option behind each dotted field, for the error message.
        """
        d = self.to_dict()
        for key, value in changes.items():
            node = d
            *parents, leaf = key.split(".")
            for p in parents:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            node[leaf] = list(value) if isinstance(value, tuple) else value
        try:
            return Policy.from_dict(d, where="override", error=_Refused, source=self.source)
        except _Refused as exc:
            message = str(exc).removeprefix("override: ")
            culprit = next((k for k in changes if re.search(rf"\b{re.escape(k)}\b", message)), None)
            where = f"option {flags[culprit]}" if flags and culprit in flags else "override"
            raise error(f"{where}: {message}") from None

    # ------------------------------------------------------------------ what the rest of the gate needs
    def _values(self, cls: type[Settings], built: bool = False):
        """The settings of engine class ``cls`` gathered from wherever the policy file places them."""
        values = {}
        for section in (self.data, self.input, self.search, self.blend, self.screening, self.synthesis, self.outliers,
                        self.budget, self.metrics):
            for f in dataclasses.fields(section):
                origin = f.metadata.get("origin")
                if origin is not None and origin.owner is cls:
                    values[origin.name] = getattr(section, f.name)
        if not built:
            return values
        if cls is ScanConfig:
            return self.scan_config()
        if cls is SynthConfig:
            return self.synth_config()
        return cls(**values)

    def search_params(self) -> SearchParams:
        return SearchParams(**self._values(SearchParams))

    def blend_params(self) -> BlendParams:
        return BlendParams(**self._values(BlendParams))

    def screening_params(self) -> ScreeningParams:
        return ScreeningParams(**self._values(ScreeningParams))

    def outlier_rule(self) -> OutlierRule:
        return OutlierRule(**self._values(OutlierRule))

    def scan_config(self) -> ScanConfig:
        return ScanConfig(search=self.search_params(), outliers=self.outlier_rule(), blend_params=self.blend_params(),
                          screening_params=self.screening_params(),
                          **self._values(ScanConfig))

    def synth_config(self) -> SynthConfig:
        """Synthesis settings; its seed is the scan's (one seed per run)."""
        return SynthConfig(seed=self.search.seed, **self._values(SynthConfig))

    def spec_overrides(self) -> SpecOverrides:
        return SpecOverrides(**self._values(SpecOverrides))

    def to_dict(self) -> dict:
        """The policy as plain data (the shape of the YAML file), for reports and re-checking."""
        return _plain(self)


class _Refused(GateError):
    """An override the policy refuses (re-raised under the caller's error type)."""


def _changes(base: Settings, preset: Settings) -> dict[str, Any]:
    """Policy place -> value for every setting ``preset`` sets differently from ``base``."""
    return {s.place: getattr(preset, s.name) for s in type(base).settings()
            if s.place is not None and getattr(preset, s.name) != getattr(base, s.name)}


# The paper's settings (Dong et al. 2021), one preset for every command: its search (SearchParams.paper), its
# synthesis (SynthConfig.paper: Eq. 7 as written) and no bandit.
PAPER: dict[str, Any] = {**_changes(SearchParams(), SearchParams.paper()),
                         **_changes(SynthConfig(), SynthConfig.paper()), "search.bandit": False}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "policy"
    if not isinstance(raw, Mapping):
        raise Bad(f"{where} must be a mapping of fields, got {show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        known = ", ".join(fields)
        raise Bad(f"unknown field {prefix}{unknown[0]} (known in {where}: {known})")
    values = {}
    for name, value in raw.items():
        f = fields[name]
        sub = f.metadata.get("section")
        if sub is not None:
            if value is None and f.metadata.get("nullable"):
                values[name] = None
            else:
                values[name] = _build(sub, {} if value is None else value, f"{prefix}{name}.")
            continue
        try:
            values[name] = f.metadata["check"](value)
        except Bad as exc:
            raise Bad(f"{prefix}{name} {exc}, got {show(value)}") from None
    return cls(**values)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- loading
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_policy(text_: str, where: str = "policy", source: str | None = None) -> Policy:
    try:
        raw = yaml.load(text_, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError(f"{where}: not valid YAML{at}: {problem}") from None
    if raw is None:
        raise PolicyError(f"{where}: the file is empty")
    return Policy.from_dict(raw, where=where, source=source)


def load_policy(path: str | Path) -> Policy:
    """The policy in ``path``; its relative data paths (``data.path``, ``data.seed_images``) are resolved against
    the file's folder, so a policy means the same data from any working directory."""
    path = Path(path)
    where = f"policy {path}"
    try:
        content = path.read_text()
    except FileNotFoundError:
        raise PolicyError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise PolicyError(f"{where}: is a folder, not a policy file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: cannot read: {exc}") from None
    return resolve_paths(parse_policy(content, where=where, source=str(path)), path.parent)


PATH_FIELDS = ("path", "seed_images")  # the data section's fields that name files


def resolve_paths(policy: Policy, folder: str | Path) -> Policy:
    """``policy`` with its relative data paths joined to ``folder``.

    >>> resolve_paths(Policy().override({"data.path": "../data/clean.npz"}), "policies").data.path
    'data/clean.npz'
    """
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(policy.data, name)
        if value is not None and not os.path.isabs(value):
            changes[f"data.{name}"] = os.path.normpath(os.path.join(folder, value))
    return policy.override(changes) if changes else policy


BUILT_IN = "default"  # the policy `gate run` and `gate scan` use without --policy: gate/policies/default.yaml


def builtin_policy(name: str = BUILT_IN) -> Policy:
    """A policy shipped inside the package (``gate/policies/NAME.yaml``; policies/default.yaml is that file)."""
    from importlib.resources import files

    resource = files("gate") / "policies" / f"{name}.yaml"
    return parse_policy(resource.read_text(), where=f"built-in policy {name}", source=f"built-in:{name}")


def field_docs(cls: type = Policy, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> one-line documentation (used to check the shipped YAML files stay complete)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        sub = f.metadata.get("section")
        if sub is not None:
            out[prefix + f.name] = f.metadata.get("help", "")
            out.update(field_docs(sub, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f.metadata.get("help", "")
    return out
