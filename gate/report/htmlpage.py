"""``report.html``: one self-contained page for a person deciding whether to trust the gate's verdict.

No external resources: CSS is inline, pictures are base64 PNG data URIs, the chart is inline SVG. Every
piece of text that comes from the model, the data or the policy is escaped.

Sections: decision banner with the reasons, key numbers, model facts, a bar chart of each class's
reversed-trigger L1 norm with the outlier thresholds, and one card per class (flagged first) with the
reversed mask, pattern, mask x pattern and a few clean images with the trigger stamped on.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np

from gate.decision import Decision, exit_code_help, mad_threshold_l1
from gate.outliers import OutlierRule, calibrated_threshold_l1
from gate.pipeline import EXAMPLES_FOR_EVERY_CLASS as MANY_CLASSES
from gate.report.images import data_uri, trigger_views
from gate.result import ClassResult, Example, ScanResult, Triggers

THUMB = 128  # longest side of a picture in the page, in pixels (big models' images are shrunk)

TITLES = {"accept": "Accepted", "reject": "Rejected", "review": "Needs review", "error": "Scan failed"}
BLURBS = {
    "accept": "No backdoor was found. The model may be deployed under this policy.",
    "reject": "The scan found evidence of a backdoor. Do not deploy this model.",
    "review": "The scan could not reach a verdict. A person must review before deployment.",
    "error": "The scan could not be completed. The gate fails closed: do not deploy.",
}

CSS = """
:root{--bg:#f5f7fa;--card:#fff;--line:#d9dee5;--text:#1f2933;--muted:#5f6b7a;--accent:#2f5d9b;
--red:#c62828;--red-bg:#fdecea;--green:#1b7f3b;--green-bg:#e8f5ec;--amber:#a65f00;--amber-bg:#fff4e0;
--grey:#4a5360;--grey-bg:#eceff3}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);font:14px/1.5 -apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,"Liberation Sans",sans-serif}
.wrap{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
header{display:flex;justify-content:space-between;align-items:baseline;gap:16px;margin-bottom:16px}
header h1{font-size:22px;margin:0;font-weight:650;letter-spacing:-.01em}
header .sub{color:var(--muted);font-size:13px;text-align:right}
code,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
.banner{border-radius:10px;padding:18px 22px;margin-bottom:18px;border:1px solid;border-left-width:8px}
.banner.accept{background:var(--green-bg);border-color:var(--green)}
.banner.reject{background:var(--red-bg);border-color:var(--red)}
.banner.review{background:var(--amber-bg);border-color:var(--amber)}
.banner.error{background:var(--grey-bg);border-color:var(--grey)}
.banner .head{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
.banner .outcome{font-size:26px;font-weight:750;letter-spacing:.02em;text-transform:uppercase}
.banner.accept .outcome{color:var(--green)}.banner.reject .outcome{color:var(--red)}
.banner.review .outcome{color:var(--amber)}.banner.error .outcome{color:var(--grey)}
.pill{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600;
background:rgba(0,0,0,.07);color:var(--text)}
.banner .blurb{margin:6px 0 8px;font-weight:500}
.banner ul{margin:6px 0 0;padding-left:20px}.banner li{margin:3px 0}
.stats{display:grid;grid-template-columns:repeat(6,1fr);gap:12px;margin-bottom:18px}
.stat{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.stat .v{font-size:20px;font-weight:650}.stat .k{color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.04em}
.stat .v.bad{color:var(--red)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin-bottom:18px}
section h2{font-size:16px;margin:0 0 12px;font-weight:650}
section h2 .count{color:var(--muted);font-weight:500}
table.facts{border-collapse:collapse;width:100%}
table.facts th{text-align:left;color:var(--muted);font-weight:500;width:170px;vertical-align:top;padding:5px 12px 5px 0}
table.facts td{padding:5px 0;border-bottom:1px solid #eef1f4;word-break:break-all}
table.facts tr:last-child td{border-bottom:0}
.legend{display:flex;gap:18px;flex-wrap:wrap;color:var(--muted);font-size:12.5px;margin:0 0 6px}
.legend i{display:inline-block;width:18px;height:0;border-top:2px solid;vertical-align:middle;margin-right:6px}
.legend i.box{height:10px;border:0;width:12px}
.chart svg{width:100%;height:auto;display:block}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{border:1px solid var(--line);border-radius:10px;padding:12px 14px;background:#fff}
.card.flagged{border-color:var(--red);box-shadow:0 0 0 1px var(--red) inset;background:#fffafa}
.card .title{display:flex;justify-content:space-between;align-items:center;margin-bottom:6px}
.card .title b{font-size:15px}
.tag{font-size:11px;font-weight:700;border-radius:4px;padding:1px 7px;text-transform:uppercase;letter-spacing:.04em}
.tag.flag{background:var(--red);color:#fff}.tag.ok{background:var(--grey-bg);color:var(--muted)}
.tag.warn{background:var(--amber-bg);color:var(--amber)}
.nums{display:grid;grid-template-columns:repeat(3,auto);justify-content:space-between;gap:2px 12px;font-size:12px;
color:var(--muted);margin-bottom:4px;white-space:nowrap}
.nums b{color:var(--text);font-weight:600}
.pics{display:flex;gap:8px;flex-wrap:wrap}
figure{margin:0;text-align:center}
figure img{width:72px;height:72px;image-rendering:pixelated;border:1px solid var(--line);border-radius:4px;
background:#000;display:block}
figcaption{font-size:11px;color:var(--muted);margin-top:2px;white-space:nowrap}
figcaption .hit{color:var(--red);font-weight:700}
.row{margin-top:6px}.rowlabel{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em;
margin-bottom:3px}.rowlabel .muted{text-transform:none;letter-spacing:0}
.card.flagged figure img{width:88px;height:88px}
details{margin-top:4px}summary{cursor:pointer;color:var(--accent);font-weight:600}
pre{background:#f6f8fa;border:1px solid var(--line);border-radius:8px;padding:12px;overflow:auto;font-size:12px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
.muted{color:var(--muted)}
@media print{body{background:#fff}.wrap{padding:0}section,.stat,.card{break-inside:avoid}}
"""


def _e(x) -> str:
    return escape(str(x), quote=True)


def _n(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not np.isfinite(x):
            return "∞" if x > 0 else "−∞"
        if abs(x) >= 1e6:
            return f"{x:.3g}"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _banner(decision: Decision) -> str:
    reasons = "".join(f"<li>{_e(r)}</li>" for r in decision.reasons)
    return (f'<div class="banner {_e(decision.outcome)}" id="decision"><div class="head">'
            f'<span class="outcome">{_e(TITLES.get(decision.outcome, decision.outcome))}</span>'
            f'<span class="pill">decision: {_e(decision.outcome)}</span>'
            f'<span class="pill">exit code {_e(decision.exit_code)}</span></div>'
            f'<div class="blurb">{_e(BLURBS.get(decision.outcome, ""))}</div><ul>{reasons}</ul></div>')


def _stats(result: ScanResult) -> str:
    acc = result.data.get("clean_accuracy")
    items = [
        ("Classes", _n(len(result.classes)), False),
        ("Flagged", _n(len(result.flagged)), bool(result.flagged)),
        ("Queries", _n(int(result.queries.get("total", 0))), False),
        ("Scan time", _seconds(float(result.seconds.get("total", 0.0))), False),
        ("Clean accuracy", _pct(acc) if acc is not None else "n/a", False),
        ("Method", "B3D-SS" if result.method == "b3d-ss" else result.method.upper(), False),
    ]
    cells = "".join(f'<div class="stat"><div class="v{" bad" if bad else ""}">{_e(v)}</div>'
                    f'<div class="k">{_e(k)}</div></div>' for k, v, bad in items)
    return f'<div class="stats">{cells}</div>'


def _spec_text(spec: dict, model: dict) -> str:
    shape = "×".join(str(d) for d in model.get("input_shape", [])) or "?"
    parts = [f"{model.get('input_name', 'input')} {shape} ({spec.get('layout', '?')}, {spec.get('dtype', '?')})",
             f"range [0, {_n(spec.get('value_range', 1.0))}]"]
    if spec.get("mean") is not None:
        parts.append(f"mean {spec['mean']}, std {spec.get('std')}")
    parts.append(f"output: {spec.get('output_kind', '?')}")
    detected = spec.get("detected") or []
    if detected:
        parts.append(f"detected: {', '.join(detected)}")
    return "; ".join(parts)


def _facts(result: ScanResult | None, model: dict, policy: dict | None, policy_source: str | None) -> str:
    rows: list[tuple[str, str, bool]] = [("Model", str(model.get("path", "?")), True)]
    if model.get("sha256"):
        rows.append(("SHA-256", model["sha256"], True))
    if result is not None:
        s, d = result.search, result.data
        rows += [
            ("Input", _spec_text(result.input_spec, model), False),
            ("Classes", f"{model.get('num_classes', len(result.classes))} "
                        f"(image {'×'.join(str(v) for v in model.get('image_shape', []))})", False),
            ("Providers", ", ".join(result.providers), False),
            ("Method", {"b3d": "B3D: trigger search on clean images",
                        "b3d-ss": "B3D-SS: trigger search on synthesised images"}.get(result.method, result.method),
             False),
            ("Data", f"{d.get('source')}: {_n(d.get('images'))} images "
                     f"({_n(d.get('search_pool'))} search, {_n(d.get('held_out'))} held out)", False),
            ("Search", f"k={s.get('k')}, batch {s.get('batch_size')}, ≤{s.get('max_steps')} steps, "
                       f"σ={s.get('sigma')}, lr={s.get('lr')}, sampling {s.get('sampling')}, "
                       f"bandit {'on' if s.get('bandit') else 'off'}, seed {result.seed}", False),
            ("Outlier rule", _rule_text(result.outliers), False),
            ("Queries", f"{_n(int(result.queries.get('total', 0)))} total ({_n(int(result.queries.get('scan', 0)))} "
                        f"scan, {_n(int(result.queries.get('synthesis', 0)))} synthesis; the examples below "
                        f"come from the scan's held-out pass)", False),
            ("Time", f"{_seconds(float(result.seconds.get('total', 0.0)))} total, "
                     f"{_pct(result.seconds.get('ort_fraction'))} in the model", False),
            ("Completed", "yes" if result.complete else f"no: {result.stop_reason}", False),
            ("Searches", _status_counts(result), False),
            ("Tool", f"{result.tool.get('name', 'backdoor-gate')} {result.tool.get('version', '')}", False),
        ]
    if policy:
        rows.append(("Policy", f"{policy.get('name', '?')} ({policy_source or 'built in'})", False))
    mono_cls = ' class="mono"'
    body = "".join(f"<tr><th>{_e(k)}</th><td{mono_cls if mono else ''}>{_e(v)}</td></tr>"
                   for k, v, mono in rows)
    return f'<section id="facts"><h2>Model and scan</h2><table class="facts">{body}</table></section>'


def _status_counts(result: ScanResult) -> str:
    counts: dict[str, int] = {}
    for c in result.classes:
        counts[c.status] = counts.get(c.status, 0) + 1
    return ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items(), key=lambda t: -t[1]))


def _nice_max(v: float) -> tuple[float, float]:
    """A round axis maximum >= v and its tick step (5ish ticks)."""
    if not v > 0 or not np.isfinite(v):
        return 1.0, 0.2
    raw = v / 5
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return float(np.ceil(v / step) * step), float(step)


def _rule_text(o: dict) -> str:
    if o.get("method", "mad") == "calibrated":
        return (f"calibrated: leave-one-out robust z of log L1 (scale floor {_n(o.get('scale_floor'))}), flag at a "
                f"per-model p-value ≤ {_n(o.get('alpha'))}; model p-value {_n(o.get('model_p_value'))}, backdoor "
                f"score {_n(o.get('backdoor_score'))}; median L1 {_n(o.get('median_l1'))}")
    return (f"MAD: anomaly index > {_n(o.get('anomaly_threshold'))} or L1 < {_n(o.get('median_ratio'))} × median; "
            f"median L1 {_n(o.get('median_l1'))}, MAD {_n(o.get('mad'))}")


def l1_chart(result: ScanResult) -> str:
    """Inline SVG: one bar per class (flagged in red) and the outlier thresholds as horizontal lines."""
    classes = sorted(result.classes, key=lambda c: c.label)
    l1 = np.array([c.l1 for c in classes], dtype=np.float64)
    median = float(result.outliers.get("median_l1") or np.median(l1))
    mad = float(result.outliers.get("mad") or 0.0)
    calibrated = result.outliers.get("method", "mad") == "calibrated"
    t = float(result.outliers.get("anomaly_threshold", 2.0))
    ratio = float(result.outliers.get("median_ratio", 0.25))
    mad_line = mad_threshold_l1(median, mad, t)
    ratio_line = ratio * median
    if calibrated:
        rule = OutlierRule(alpha=float(result.outliers["alpha"]), scale_floor=float(result.outliers["scale_floor"]))
        cal_line = calibrated_threshold_l1(l1, rule)
    top, step = _nice_max(max(float(np.max(l1)) if len(l1) else 1.0, median) * 1.05)
    w, h = 1100, 320
    ml, mr, mt, mb = 58, 150, 14, 40
    pw, ph = w - ml - mr, h - mt - mb

    def y(v: float) -> float:
        return mt + ph * (1 - min(max(v, 0.0), top) / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="L1 norm of each class\'s reversed trigger" font-family="Arial, sans-serif" font-size="11">']
    ticks = np.arange(0, top + step / 2, step)
    for v in ticks:
        yy = y(float(v))
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e6e9ee"/>')
        parts.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#5f6b7a">{_e(_n(float(v)))}</text>')
    n = max(1, len(classes))
    slot = pw / n
    bw = max(1.0, slot * 0.72)
    every = 1 if n <= 50 else int(np.ceil(n / 50))
    for i, c in enumerate(classes):
        x = ml + i * slot + (slot - bw) / 2
        yy = y(c.l1)
        color = "#c62828" if c.flagged else "#7d8fb3"
        tip = (f"class {c.label}: L1 {_n(c.l1)}, anomaly index {_n(c.anomaly_index)}"
               f"{f', p-value {c.p_value:.2g}' if c.p_value is not None else ''}, "
               f"trigger ASR {_pct(c.trigger_asr)}{' — FLAGGED' if c.flagged else ''}")
        parts.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw:.1f}" height="{max(0.0, mt + ph - yy):.1f}" '
                     f'fill="{color}" rx="1.5"><title>{_e(tip)}</title></rect>')
        if i % every == 0:
            style = 'fill="#c62828" font-weight="bold"' if c.flagged else 'fill="#5f6b7a"'
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph + 14}" text-anchor="middle" {style}>'
                         f'{c.label}</text>')
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#9aa5b1"/>')
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 6}" text-anchor="middle" fill="#5f6b7a">class</text>')
    parts.append(f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" '
                 f'fill="#5f6b7a">L1 norm of the reversed mask</text>')
    lines = [(median, "#1f2933", "", f"median {_n(median)}")]
    if calibrated:
        lines.append((cal_line, "#c62828", "6 4", f"p ≤ {_n(rule.alpha)}: about {_n(cal_line)}"))
    else:
        lines.append((ratio_line, "#c62828", "6 4", f"{_n(ratio)} × median {_n(ratio_line)}"))
        if mad_line > 0:
            lines.append((mad_line, "#d97706", "3 3", f"MAD threshold {_n(mad_line)}"))
    label_y: list[float] = []
    for v, color, dash, label in sorted(lines, key=lambda t: -t[0]):
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
    legend = ('<div class="legend"><span><i class="box" style="background:#7d8fb3"></i>class</span>'
              '<span><i class="box" style="background:#c62828"></i>flagged class</span>'
              '<span><i style="border-color:#1f2933"></i>median</span>'
              f'<span><i style="border-color:#c62828;border-top-style:dashed"></i>{_e(_n(ratio))} × median</span>'
              + (f'<span><i style="border-color:#d97706;border-top-style:dotted"></i>median − {_e(_n(t))}·1.4826·MAD'
                 '</span>' if mad_line > 0 else
                 f'<span>MAD threshold median − {_e(_n(t))}·1.4826·MAD is below 0 (not drawn)</span>')
              + "</div>")
    return legend + "".join(parts)


def _figure(uri: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def _card(c: ClassResult, triggers: Triggers | None, examples: list[Example], rule_hits: set[int]) -> str:
    flagged = c.flagged
    if flagged:
        tag = '<span class="tag flag">flagged</span>'
    elif c.label in rule_hits:
        tag = '<span class="tag flag">rule</span>'
    elif c.status == "budget":
        tag = '<span class="tag warn">cut short</span>'
    else:
        tag = f'<span class="tag ok">{_e(c.status.replace("_", " "))}</span>'
    nums = [("L1", _n(c.l1)), ("pixels", _n(c.binary_l1)), ("of image", _pct(c.mask_fraction)),
            ("anomaly idx", _n(c.anomaly_index)), ("trigger ASR", _pct(c.trigger_asr)),
            ("steps", _n(c.steps))]
    nums_html = "".join(f"<span>{_e(k)} <b>{_e(v)}</b></span>" for k, v in nums)
    rows = []
    if c.note:
        rows.append(f'<div class="row"><div class="rowlabel">search</div><div class="muted">{_e(c.note)}</div></div>')
    if triggers is not None:
        hit = np.flatnonzero(triggers.labels == c.label)
        if len(hit):
            i = int(hit[0])
            views = trigger_views(triggers.masks[i], triggers.patterns[i])
            figs = [_figure(data_uri(views[key], 64, THUMB), _e(cap), f"class {c.label} {cap}")
                    for key, cap in (("mask", "mask"), ("pattern", "pattern"), ("trigger", "mask·pattern"))]
            rows.append(f'<div class="row"><div class="rowlabel">reversed trigger</div>'
                        f'<div class="pics">{"".join(figs)}</div></div>')
    if examples:
        figs = []
        for ex in examples:
            mark = ' class="hit"' if ex.stamped_pred == c.label else ""
            cap = f"{ex.clean_pred} → <span{mark}>{ex.stamped_pred}</span>"
            figs.append(_figure(data_uri(ex.stamped, 64, THUMB), cap,
                                f"clean image predicted {ex.clean_pred}, stamped with the class {c.label} "
                                f"trigger predicted {ex.stamped_pred}"))
        hits = sum(ex.stamped_pred == c.label for ex in examples)
        rows.append(f'<div class="row"><div class="rowlabel">stamped on clean images '
                    f'<span class="muted">({hits}/{len(examples)} sent to class {c.label})</span></div>'
                    f'<div class="pics">{"".join(figs)}</div></div>')
    return (f'<div class="card{" flagged" if flagged else ""}" id="class-{c.label}">'
            f'<div class="title"><b>class {c.label}</b>{tag}</div><div class="nums">{nums_html}</div>'
            f'{"".join(rows)}</div>')


def render_html(result: ScanResult | None, decision: Decision, policy: dict | None = None, *,
                triggers: Triggers | None = None, examples: dict[int, list[Example]] | None = None,
                model: dict | None = None, generated: str | None = None,
                policy_source: str | None = None) -> str:
    """The whole page as a string. ``result`` is None for a run that failed before it had a result."""
    model = model or (result.model if result is not None else {})
    examples = examples or {}
    name = Path(str(model.get("path") or "model")).name
    sub = [f"<span class='mono'>{_e(name)}</span>"]
    if policy:
        sub.append(f"policy {_e(policy.get('name', '?'))}")
    if generated:
        sub.append(_e(generated))
    body = [f"<header><h1>Backdoor gate report</h1><div class='sub'>{' · '.join(sub)}</div></header>",
            _banner(decision)]
    if result is not None:
        body.append(_stats(result))
    body.append(_facts(result, model, policy, policy_source))
    if result is not None:
        body.append('<section id="chart" class="chart"><h2>Reversed-trigger size per class '
                    '<span class="count">(a backdoor target needs a much smaller trigger than the others)'
                    f'</span></h2>{l1_chart(result)}</section>')
        rule_hits = {f.label for f in decision.findings if f.label is not None}
        flagged = sorted((c for c in result.classes if c.flagged or c.label in rule_hits),
                         key=lambda c: (-c.anomaly_index, c.label))
        rest = sorted((c for c in result.classes if not (c.flagged or c.label in rule_hits)),
                      key=lambda c: c.label)
        legend = ('<p class="muted">Each card shows the reversed trigger (mask: white = trigger pixel; '
                  'pattern; mask·pattern) and clean images with it stamped on, captioned with the model\'s '
                  'prediction before → after stamping (<span style="color:var(--red);font-weight:700">red'
                  '</span>: the trigger sends the image to this class).</p>')
        if flagged:
            cards = "".join(_card(c, triggers, examples.get(c.label, []), rule_hits) for c in flagged)
            body.append(f'<section id="flagged"><h2>Flagged classes <span class="count">({len(flagged)})</span>'
                        f'</h2>{legend}<div class="cards">{cards}</div></section>')
            legend = ""
        many = len(result.classes) > MANY_CLASSES
        cards = "".join(_card(c, triggers, [] if many else examples.get(c.label, []), rule_hits) for c in rest)
        title = "Other classes" if flagged else "All classes"
        body.append(f'<section id="classes"><h2>{title} <span class="count">({len(rest)})</span></h2>'
                    f'{legend}<div class="cards">{cards}</div></section>')
    if policy is not None:
        body.append('<section id="policy"><h2>Effective policy</h2><details><summary>Show the policy this '
                    'decision was made under (after command-line overrides)</summary>'
                    f'<pre>{_e(json.dumps(policy, indent=2))}</pre></details></section>')
    body.append("<footer>Black-box backdoor detection (B3D, Dong et al., ICCV 2021). "
                f"Exit codes: {exit_code_help()}.</footer>")
    title = f"{TITLES.get(decision.outcome, decision.outcome)}: {name} — backdoor gate"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body><div class=\"wrap\">{''.join(body)}</div></body></html>\n")
