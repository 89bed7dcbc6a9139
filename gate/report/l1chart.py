"""The report page's chart: each class's reversed-trigger L1 norm, smallest first, on a log scale.

Inline SVG, no script. Classes are sorted by L1 so the suspicious ones stand at the left; the log axis keeps a
trigger of 3.6 pixels next to ones of 400 visible (on a linear axis it is a sliver). Flagged classes are red
and carry their value; the median and the outlier rule's threshold are horizontal lines, with the region
below the threshold shaded.
"""

from __future__ import annotations

import math

import numpy as np

from gate.decision import input_pixels, mad_threshold_l1
from gate.outliers import OutlierRule, calibrated_threshold_l1
from gate.report.fmt import e as _e
from gate.report.fmt import num as _n
from gate.result import ScanResult

BAR = "#7d8fb3"
FLAG = "#c62828"
MAX_TICK_LABELS = 60  # class labels under the bars; beyond that every n-th (flagged ones always)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi`` (powers of ten; with 1, 2, 5 steps over few decades).

    >>> log_ticks(1, 1000)
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
    >>> log_ticks(0.01, 1e5)
    [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
    """
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    steps = (1, 2, 5) if b - a <= 3 else (1,)
    ticks = [m * 10.0 ** e for e in range(a, b + 1) for m in steps]
    return [float(f"{t:.6g}") for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]


def axis_range(values: list[float]) -> tuple[float, float]:
    """Whole decades around the positive finite ``values`` (at least one decade).

    >>> axis_range([3.6, 112.0, 376.0])
    (1.0, 1000.0)
    """
    v = [x for x in values if x > 0 and math.isfinite(x)] or [1.0]
    lo = 10.0 ** math.floor(math.log10(min(v)))
    hi = 10.0 ** math.ceil(math.log10(max(v)))
    return lo, (hi if hi > lo else lo * 10)


def thresholds(result: ScanResult) -> list[tuple[float, str, str, str]]:
    """(L1, colour, dash, label) of each horizontal line: the median and the outlier rule's threshold(s)."""
    o = result.outliers
    l1 = np.array([c.l1 for c in result.classes], dtype=np.float64)
    median = float(o.get("median_l1") or (np.median(l1) if len(l1) else 0.0))
    lines = [(median, "#1f2933", "", f"median {_n(median)}")]
    if o.get("method", "mad") == "calibrated":
        pixels = input_pixels(result)
        population = {k: float(o[k]) for k in ("population_weight", "population_mean", "population_scale") if k in o}
        if "population_weight" not in population or pixels is None:  # a report from before the population test
            population["population_weight"] = 0.0
        rule = OutlierRule(alpha=float(o["alpha"]), scale_floor=float(o["scale_floor"]), **population)
        cut = calibrated_threshold_l1(l1, rule, pixels=pixels)
        lines.append((cut, FLAG, "6 4", f"p ≤ {_n(rule.alpha)}: about {_n(cut)}"))
    else:
        ratio = float(o.get("median_ratio", 0.25))
        lines.append((ratio * median, FLAG, "6 4", f"{_n(ratio)} × median {_n(ratio * median)}"))
        mad_line = mad_threshold_l1(median, float(o.get("mad") or 0.0), float(o.get("anomaly_threshold", 2.0)))
        if mad_line > 0:
            lines.append((mad_line, "#d97706", "3 3", f"MAD threshold {_n(mad_line)}"))
    return lines


def legend(result: ScanResult) -> str:
    o = result.outliers
    items = [f'<span><i class="box" style="background:{BAR}"></i>class</span>',
             f'<span><i class="box" style="background:{FLAG}"></i>flagged class</span>',
             '<span><i style="border-color:#1f2933"></i>median</span>']
    if o.get("method", "mad") == "calibrated":
        items.append(f'<span><i style="border-color:{FLAG};border-top-style:dashed"></i>about where the calibrated '
                     f'rule flags (per-model p ≤ {_e(_n(float(o["alpha"])))})</span>')
    else:
        t = float(o.get("anomaly_threshold", 2.0))
        items.append(f'<span><i style="border-color:{FLAG};border-top-style:dashed"></i>'
                     f'{_e(_n(float(o.get("median_ratio", 0.25))))} × median</span>')
        mad_line = mad_threshold_l1(float(o.get("median_l1") or 0.0), float(o.get("mad") or 0.0), t)
        items.append(f'<span><i style="border-color:#d97706;border-top-style:dotted"></i>median − {_e(_n(t))}·1.4826·'
                     'MAD</span>' if mad_line > 0 else
                     f'<span>MAD threshold median − {_e(_n(t))}·1.4826·MAD is below 0 (not drawn)</span>')
    items.append("<span>log scale, smallest first</span>")
    return f'<div class="legend">{"".join(items)}</div>'


def l1_chart(result: ScanResult, class_names: list[str] | None = None) -> str:
    """The legend and the inline SVG: one bar per class, sorted by L1, log scale."""
    classes = sorted(result.classes, key=lambda c: (c.l1 if math.isfinite(c.l1) else math.inf, c.label))
    lines = thresholds(result)
    lo, hi = axis_range([c.l1 for c in classes] + [v for v, *_ in lines])
    w, h = 1100, 340
    ml, mr, mt, mb = 58, 170, 22, 46
    pw, ph = w - ml - mr, h - mt - mb
    llo, lhi = math.log10(lo), math.log10(hi)

    def y(v: float) -> float:
        if not v > 0:
            return mt + ph
        return mt + ph * (1 - (min(max(math.log10(v), llo), lhi) - llo) / (lhi - llo))

    def name(label: int) -> str:
        return f" ({class_names[label]})" if class_names is not None and 0 <= label < len(class_names) else ""

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" role="img" '
             'aria-label="L1 norm of each class\'s reversed trigger, smallest first, log scale" '
             'font-family="Arial, sans-serif" font-size="11">']
    for v in log_ticks(lo, hi):
        yy = y(v)
        major = abs(math.log10(v) - round(math.log10(v))) < 1e-9
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="{"#d5dae1" if major else "#eef0f3"}"/>')
        parts.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#5f6b7a">{_e(_n(v))}</text>')
    cut = max((v for v, *_ in lines[1:]), default=0.0)
    if cut > lo:  # the region where the rule flags
        yc = y(cut)
        parts.append(f'<path d="M{ml} {yc:.1f}H{ml + pw}V{mt + ph}H{ml}Z" fill="{FLAG}" fill-opacity="0.06"/>')
    n = max(1, len(classes))
    slot = pw / n
    bw = max(1.0, slot * 0.72)
    every = 1 if n <= MAX_TICK_LABELS else math.ceil(n / MAX_TICK_LABELS)
    for i, c in enumerate(classes):
        x = ml + i * slot + (slot - bw) / 2
        yy = y(c.l1)
        tip = (f"class {c.label}{name(c.label)}: L1 {_n(c.l1)}, anomaly index {_n(c.anomaly_index)}"
               f"{f', p-value {c.p_value:.2g}' if c.p_value is not None else ''}"
               f"{f', trigger ASR {100 * c.trigger_asr:.1f}%' if c.trigger_asr is not None else ''}"
               f"{' — FLAGGED' if c.flagged else ''}")
        parts.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw:.1f}" height="{max(0.0, mt + ph - yy):.1f}" '
                     f'fill="{FLAG if c.flagged else BAR}" rx="1.5" data-class="{c.label}">'
                     f'<title>{_e(tip)}</title></rect>')
        if c.flagged:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{yy - 5:.1f}" text-anchor="middle" fill="{FLAG}" '
                         f'font-weight="bold">{_e(_n(c.l1))}</text>')
        if c.flagged or i % every == 0:
            style = f'fill="{FLAG}" font-weight="bold"' if c.flagged else 'fill="#5f6b7a"'
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph + 14}" text-anchor="middle" {style}>'
                         f'{c.label}</text>')
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#9aa5b1"/>')
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 8}" text-anchor="middle" fill="#5f6b7a">class, sorted by the '
                 'L1 of its reversed trigger (smallest, most suspicious, first)</text>')
    parts.append(f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" '
                 'fill="#5f6b7a">L1 norm of the reversed mask (log)</text>')
    label_y: list[float] = []
    for v, color, dash, label in sorted(lines, key=lambda t: -t[0]):
        if not v > 0:
            continue
        yy = y(v)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{color}" '
                     f'stroke-width="1.6"{dashed}/>')
        ty = yy + 4
        for prev in label_y:  # keep labels of close lines apart
            if abs(ty - prev) < 13:
                ty = prev + 13
        label_y.append(ty)
        parts.append(f'<text x="{ml + pw + 6}" y="{ty:.1f}" fill="{color}">{_e(label)}</text>')
    parts.append("</svg>")
    return legend(result) + "".join(parts)
