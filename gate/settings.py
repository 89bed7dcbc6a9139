"""Settings declared once: a dataclass field carries its default, its check, its help text and its names.

Every knob of the engine (search, scan, synthesis, outliers, input spec) is one field of a frozen
dataclass built with :func:`setting`; what a user sees of it is derived from that one field:

* its **check** validates and normalises the value whenever the dataclass is built (``SearchParams(k=3)``
  raises ``k must be an even integer >= 2, got 3``), and when a policy file sets it;
* its **place** in the policy YAML (``search.k``; the class's ``SECTION`` and the field's name unless
  ``place=`` says otherwise, ``place=False`` for a value the code sets) — :mod:`gate.policy` builds its
  sections from these places;
* its **flag** on every command that exposes it (``--k``; ``--`` + the class's ``FLAG_PREFIX`` + the name
  with dashes unless ``flag=`` says otherwise, ``flag=False`` for none), with the help text;
* the report's effective configuration (``to_dict``).

Example::

    @dataclass(frozen=True)
    class Knobs(Settings):
        SECTION = "search"
        k: int = setting(50, even_integer(2), "search samples per step")

    Knobs(k=3)   # SettingError: k must be an even integer >= 2, got 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar


class SettingError(ValueError):
    """A value does not fit its setting; the message names the setting."""


class Bad(Exception):
    """Raised by a check; the message completes "<name> ...", e.g. "must be an integer >= 1"."""


@dataclass(frozen=True)
class Check:
    """Validates (and normalises) one value; ``parse`` turns command-line text into a value to check."""

    fn: Callable[[Any], Any]
    parse: Callable[[str], Any] | None = str
    metavar: str | None = None
    choices: tuple | None = None
    is_bool: bool = False

    def __call__(self, value: Any) -> Any:
        return self.fn(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    desc = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    if lo is not None and lo == hi:
        desc = str(lo)

    def check(v):
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise Bad(f"must be {desc}")
        return int(v)
    return Check(check, int, "N")


def even_integer(lo: int) -> Check:
    def check(v):
        if not _is_int(v) or v < lo or v % 2:
            raise Bad(f"must be an even integer >= {lo}")
        return int(v)
    return Check(check, int, "N")


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    if lo is not None and hi is not None:
        desc = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        desc = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        desc = "a number"

    def check(v):
        if not _is_num(v):
            raise Bad(f"must be {desc}")
        v = float(v)
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            raise Bad(f"must be {desc}")
        return v
    return Check(check, float, "X")


def _boolean(v):
    if not isinstance(v, bool):
        raise Bad("must be true or false")
    return v


boolean = Check(_boolean, None, is_bool=True)


def choice(*options: Any) -> Check:
    shown = ", ".join(str(o) for o in options)

    def check(v):
        if isinstance(v, bool) or v not in options:
            raise Bad(f"must be one of {shown}")
        return v
    numeric = all(_is_num(o) for o in options)
    return Check(check, float if numeric else str, None, tuple(float(o) for o in options) if numeric else options)


def _text(v):
    if not isinstance(v, str) or not v.strip():
        raise Bad("must be a non-empty string")
    return v


text = Check(_text, str, "TEXT")


def _url(v):
    if not isinstance(v, str) or not v.startswith(("http://", "https://")):
        raise Bad("must be an http:// or https:// URL")
    return v


url = Check(_url, str, "URL")


def _floats(text_: str) -> list[float]:
    try:
        return [float(v) for v in text_.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text_!r}") from None


def _channel_values(v):
    if not isinstance(v, (list, tuple)) or len(v) not in (1, 3) or not all(_is_num(x) for x in v):
        raise Bad("must be a list of 1 or 3 numbers")
    return tuple(float(x) for x in v)


def _positive_channel_values(v):
    values = _channel_values(v)
    if any(x <= 0 for x in values):
        raise Bad("must be a list of 1 or 3 positive numbers")
    return values


channel_values = Check(_channel_values, _floats, "A,B,C")
positive_channel_values = Check(_positive_channel_values, _floats, "A,B,C")


MAX_IMAGE_SIDE = 4096


def _image_size(v):
    """(height, width) from [H, W], a single side H (square), or the text "HxW" / "H"."""
    if isinstance(v, str):
        parts = v.lower().replace("x", " ").replace(",", " ").split()
        try:
            v = [int(p) for p in parts]
        except ValueError:
            raise Bad("must be HxW (e.g. 32x32) or one side for a square") from None
    if _is_int(v):
        v = [v, v]
    if (not isinstance(v, (list, tuple)) or len(v) not in (1, 2) or not all(_is_int(x) for x in v)
            or not all(1 <= x <= MAX_IMAGE_SIDE for x in v)):
        raise Bad(f"must be HxW (e.g. 32x32) or one side for a square, each 1 to {MAX_IMAGE_SIDE}")
    return (int(v[0]), int(v[-1]))


image_size = Check(_image_size, str, "HxW")


def optional(check: Check, *, none_text: str | None = None) -> Check:
    """``check`` or None. ``none_text``: the command-line word that means None (e.g. "0")."""
    def wrapped(v):
        return None if v is None else check(v)

    def parse(s: str):
        if none_text is not None and s == none_text:
            return None
        return check.parse(s) if check.parse else s
    return Check(wrapped, parse, check.metavar, check.choices, check.is_bool)


def setting(default: Any, check: Check, help: str, *, flag: str | bool | None = None,
            place: str | bool | None = None) -> Any:
    """A dataclass field that is a user-facing setting (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help, "flag": flag, "place": place})


@dataclass(frozen=True)
class Setting:
    """What :func:`setting` declared, resolved against its class."""

    owner: type
    name: str
    default: Any
    check: Check
    help: str
    place: str | None  # dotted place in the policy YAML; None: set by the code, not by a policy
    flag: str | None  # command-line option, or None

    @property
    def dest(self) -> str:
        """argparse destination: the place with dots replaced, unique across the policy."""
        return (self.place or f"{self.owner.__name__}.{self.name}").replace(".", "__")


class Settings:
    """Base of settings dataclasses: checks every :func:`setting` field on construction."""

    SECTION: ClassVar[str] = ""
    FLAG_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, check(value))
            except Bad as exc:
                raise SettingError(f"{f.name} {exc}, got {show(value)}") from None
        try:
            self.validate()
        except Bad as exc:
            raise SettingError(str(exc)) from None

    def validate(self) -> None:
        """Rules across fields; raise :class:`Bad` with the whole message."""

    @classmethod
    def settings(cls) -> list[Setting]:
        out = []
        for f in dataclasses.fields(cls):
            if "check" not in f.metadata:
                continue
            m = f.metadata
            flag = m["flag"]
            if flag is None:
                flag = "--" + cls.FLAG_PREFIX + f.name.replace("_", "-")
            place = None if m["place"] is False else m["place"] or f"{cls.SECTION}.{f.name}".lstrip(".")
            out.append(Setting(cls, f.name, f.default, m["check"], m["help"], place, flag or None))
        return out

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(v: Any) -> Any:
    """Settings values as JSON/YAML data: tuples become lists, nested settings dicts."""
    if isinstance(v, Settings):
        return v.to_dict()
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    return v


def show(v: Any) -> str:
    """A value as an error message shows it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a mapping"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------- command-line flags
def add_flags(parser: argparse.ArgumentParser, settings: list[Setting], title: str,
              aliases: dict[str, list[str]] | None = None) -> None:
    """One option per setting (those with a flag), dest :attr:`Setting.dest`; absent from the namespace when
    not given (``argparse.SUPPRESS``), so a flag whose text means None (``--synthetic-grid 0``) still counts."""
    group = parser.add_argument_group(title)
    for s in settings:
        if s.flag is None:
            continue
        names = [s.flag, *(aliases or {}).get(s.place, [])]
        shown = s.default if not isinstance(s.default, tuple) else ",".join(f"{v:g}" for v in s.default)
        help_ = f"{s.help} ({s.place}; default {show(shown) if shown is not None else 'none'})".replace("%", "%%")
        if s.check.is_bool:
            group.add_argument(*names, dest=s.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(*names, dest=s.dest, type=s.check.parse, default=argparse.SUPPRESS,
                               metavar=s.check.metavar, choices=s.check.choices, help=help_)


def given(args: argparse.Namespace, settings: list[Setting]) -> Iterator[tuple[Setting, Any]]:
    """(setting, value) for every flag given on the command line."""
    for s in settings:
        if s.flag is not None and hasattr(args, s.dest):
            yield s, getattr(args, s.dest)
