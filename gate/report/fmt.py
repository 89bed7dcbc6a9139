"""Text formatting shared by the HTML renderers: escaping and numbers as a person reads them."""

from __future__ import annotations

import math
from html import escape


def e(x) -> str:
    """``x`` as HTML text or attribute value (quotes escaped too)."""
    return escape(str(x), quote=True)


def num(x, digits: int = 3) -> str:
    """A number for a person: 3 significant digits, thousands separated; ``n/a`` for None.

    >>> num(3.5912), num(283.97), num(4442760), num(12345.0), num(None), num(float("inf"))
    ('3.59', '284', '4,442,760', '12,345', 'n/a', '∞')
    """
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a" if math.isnan(x) else ("∞" if x > 0 else "−∞")
        if abs(x) >= 1e6:
            return f"{x:.3g}"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def pct(x) -> str:
    """A fraction as a percentage.

    >>> pct(0.9123), pct(None)
    ('91.2%', 'n/a')
    """
    return "n/a" if x is None else f"{100 * x:.1f}%"


def seconds(s: float) -> str:
    """A duration.

    >>> seconds(12.34), seconds(131.2), seconds(7300)
    ('12.3 s', '2 min 11 s', '2 h 01 min')
    """
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"
