"""``report.html``: one self-contained page for a person deciding whether to trust the gate's verdict.

No external resources and no script: CSS is inline, pictures are base64 PNG data URIs, the chart is inline
SVG (:mod:`gate.report.l1chart`), the class table sorts with CSS alone (:mod:`gate.report.classtable`). Every
piece of text that comes from the model, the data, the policy, the class names or the command line is
escaped; the only links are relative ones to the run's other files beside the page.

Sections: decision banner with the reasons (for an accept, with what the scan cannot see:
:mod:`gate.report.limits`), key numbers, the L1 of every class's reversed trigger (sorted, log scale), one
card per flagged class (or class a rule named) with the reversed mask, pattern, mask x pattern and held-out
images with the trigger stamped on, a sortable table of the other classes, model and scan facts, the
command that reproduces the run with links to report.json, report.sarif, junit.xml and the attestation, the
scan's limits (other outcomes) and the effective policy.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np

from gate.decision import Decision, exit_code_help
from gate.report.attestation import policy_sha256
from gate.report.classtable import class_table
from gate.report.fmt import e as _e
from gate.report.fmt import num as _n
from gate.report.fmt import pct as _pct
from gate.report.fmt import seconds as _seconds
from gate.report.images import data_uri, trigger_views
from gate.report.l1chart import l1_chart
from gate.report.limits import blind_spots
from gate.result import ClassResult, Example, ScanResult, Triggers

THUMB = 128  # longest side of a picture in the page, in pixels (big models' images are shrunk)

TITLES = {"accept": "Accepted", "reject": "Rejected", "review": "Needs review", "error": "Scan failed"}
BLURBS = {
    "accept": "No backdoor was found within what this scan can see (listed below). The model may be deployed "
              "under this policy.",
    "reject": "The scan found evidence of a backdoor. Do not deploy this model.",
    "review": "The scan could not reach a verdict. A person must review before deployment.",
    "error": "The scan could not be completed. The gate fails closed: do not deploy.",
}
FILES = {  # what each file beside the page is, for the page's links
    "report.json": "the canonical result: every number, the decision and the effective policy",
    "report.sarif": "the findings as SARIF 2.1.0, for code scanning",
    "junit.xml": "one test case per class, for CI test reports",
    "triggers.npz": "every class's reversed trigger (what gate proxy stamps)",
    "attestation.json": "in-toto statement of this decision about the model file's sha256",
    "attestation.dsse.json": "the statement, signed (DSSE envelope; gate verify --key checks it)",
    "metrics.prom": "Prometheus metrics (node_exporter textfile)",
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
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(370px,1fr));gap:14px}
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
.limits{margin-top:10px;padding-top:8px;border-top:1px solid rgba(0,0,0,.12)}
.limits b{font-size:13px}.limits ul{margin:4px 0 0}.limits li{margin:2px 0;font-size:13px}
section .limits{border:0;margin:0;padding:0}
pre.cmd{white-space:pre-wrap;word-break:break-all;margin:0 0 8px}
ul.files{margin:6px 0 0;padding-left:20px;columns:2;column-gap:32px}ul.files li{margin:2px 0;break-inside:avoid}
a{color:var(--accent)}
.card .title .name{font-weight:500;color:var(--muted);margin-left:6px}
.muted{color:var(--muted)}
@media print{body{background:#fff}.wrap{padding:0}section,.stat,.card{break-inside:avoid}}
"""


def _banner(decision: Decision, limits: list[str] | None = None) -> str:
    """The decision; ``limits`` (an accept's blind spots) are listed inside it, where no reader misses them."""
    reasons = "".join(f"<li>{_e(r)}</li>" for r in decision.reasons)
    return (f'<div class="banner {_e(decision.outcome)}" id="decision"><div class="head">'
            f'<span class="outcome">{_e(TITLES.get(decision.outcome, decision.outcome))}</span>'
            f'<span class="pill">decision: {_e(decision.outcome)}</span>'
            f'<span class="pill">exit code {_e(decision.exit_code)}</span></div>'
            f'<div class="blurb">{_e(BLURBS.get(decision.outcome, ""))}</div><ul>{reasons}</ul>'
            + (f'<p class="reference">{_e(decision.clean_reference.sentence)}</p>' if decision.clean_reference else "")
            + f'{_limits(limits) if limits else ""}</div>')


def _limits(limits: list[str]) -> str:
    items = "".join(f"<li>{_e(x)}</li>" for x in limits)
    return f'<div class="limits" id="limits"><b>What this scan cannot see</b><ul>{items}</ul></div>'


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
        words = {"convention": "range and normalisation (from the labelled data's accuracy)"}
        parts.append(f"detected: {', '.join(words.get(d, d) for d in detected)}")
    return "; ".join(parts)


def _facts(result: ScanResult | None, model: dict, policy: dict | None, policy_source: str | None,
           named: bool = False) -> str:
    rows: list[tuple[str, str, bool]] = [("Model", str(model.get("path", "?")), True)]
    if model.get("sha256"):
        rows.append(("SHA-256", model["sha256"], True))
    if result is not None:
        s, d = result.search, result.data
        rows += [
            ("Input", _spec_text(result.input_spec, model), False),
            ("Classes", f"{model.get('num_classes', len(result.classes))} "
                        f"(image {'×'.join(str(v) for v in model.get('image_shape', []))})"
                        f"{'; names from --labels' if named else ''}", False),
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
                        f"scan, {_n(int(result.queries.get('synthesis', 0)))} synthesis, "
                        f"{_n(int(result.queries.get('convention', 0)))} convention check; the examples below "
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


def _rule_text(o: dict) -> str:
    if o.get("method", "mad") == "calibrated":
        weight = o.get("population_weight")
        population = ("" if not weight else
                      f", averaged with weight {_n(weight)} with a robust z against clean models' natural classes "
                      f"(log(L1 / pixels): median {_n(o.get('population_mean'))}, spread "
                      f"{_n(o.get('population_scale'))})")
        return (f"calibrated: leave-one-out robust z of log L1 against the other classes (scale floor "
                f"{_n(o.get('scale_floor'))}){population}; Šidák-corrected normal tail, flag at a per-model p-value ≤ "
                f"{_n(o.get('alpha'))}; model p-value {_n(o.get('model_p_value'))}, backdoor score "
                f"{_n(o.get('backdoor_score'))}; median L1 {_n(o.get('median_l1'))}")
    return (f"MAD: anomaly index > {_n(o.get('anomaly_threshold'))} or L1 < {_n(o.get('median_ratio'))} × median; "
            f"median L1 {_n(o.get('median_l1'))}, MAD {_n(o.get('mad'))}")


def _figure(uri: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def _card(c: ClassResult, triggers: Triggers | None, examples: list[Example], rule_hits: set[int],
          name: str | None = None) -> str:
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
            ("p-value", f"{c.p_value:.2g}") if c.p_value is not None else ("steps", _n(c.steps))]
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
    named = f'<span class="name">{_e(name)}</span>' if name else ""
    return (f'<div class="card{" flagged" if flagged else ""}" id="class-{c.label}">'
            f'<div class="title"><b>class {c.label}{named}</b>{tag}</div><div class="nums">{nums_html}</div>'
            f'{"".join(rows)}</div>')


def _redact(arg: str) -> str:
    """A command-line argument as the page shows it: a URL's user and password become ``***``.

    >>> _redact("--pushgateway=https://ci:s3cret@push.example:9091")
    '--pushgateway=https://***@push.example:9091'
    """
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", arg)


def _reproduce(result: ScanResult | None, model: dict, policy: dict | None, command: list[str] | None,
               links: list[str]) -> str:
    parts = ['<section id="reproduce"><h2>Reproduce and files</h2>']
    if command:
        parts.append(f'<pre class="cmd mono">{_e(shlex.join(_redact(a) for a in command))}</pre>')
        same = [f"the same model file (sha256 <code>{_e(str(model.get('sha256') or '?')[:16])}…</code>)"]
        if policy is not None:
            same.append(f"the same effective policy (sha256 <code>{_e((policy_sha256(policy) or '')[:16])}…</code>, "
                        "the <code>policy</code> block of report.json)")
        same.append("the same data" + (f" ({_e(result.data.get('source'))})" if result is not None else ""))
        tool = result.tool.get("version", "") if result is not None else ""
        same.append(f"gate {_e(tool)}".rstrip() + " give the same report on a CPU of the same kind, timings aside"
                    + (f": the scan is seeded (seed {_e(result.seed)})" if result is not None else "")
                    + "; on a CPU with other SIMD sets the float kernels round differently and the search's "
                    "trigger sizes move as with another seed.")
        parts.append(f'<p class="muted">Run from the same folder: {", ".join(same[:-1])} and {same[-1]}</p>')
    if links:
        items = "".join(f'<li><a href="{_e(name)}">{_e(name)}</a> <span class="muted">— '
                        f'{_e(FILES.get(name, "a file of this run"))}</span></li>' for name in links)
        parts.append(f'<div class="rowlabel">files of this run, beside this page</div><ul class="files">{items}</ul>')
    parts.append("</section>")
    return "".join(parts) if len(parts) > 2 else ""


def render_html(result: ScanResult | None, decision: Decision, policy: dict | None = None, *,
                triggers: Triggers | None = None, examples: dict[int, list[Example]] | None = None,
                model: dict | None = None, generated: str | None = None, policy_source: str | None = None,
                class_names: list[str] | None = None, command: list[str] | None = None,
                links: list[str] | None = None) -> str:
    """The whole page as a string. ``result`` is None for a run that failed before it had a result;
    ``class_names`` (one per class) name the classes, ``command`` is the run's command line and ``links`` the
    names of the run's files beside the page."""
    model = model or (result.model if result is not None else {})
    examples = examples or {}

    def name_of(label: int) -> str | None:
        return class_names[label] if class_names is not None and 0 <= label < len(class_names) else None

    name = Path(str(model.get("path") or "model")).name
    sub = [f"<span class='mono'>{_e(name)}</span>"]
    if policy:
        sub.append(f"policy {_e(policy.get('name', '?'))}")
    if generated:
        sub.append(_e(generated))
    limits = blind_spots(result) if result is not None else None
    head_css = ""
    body = [f"<header><h1>Backdoor gate report</h1><div class='sub'>{' · '.join(sub)}</div></header>",
            _banner(decision, limits if decision.outcome == "accept" else None)]
    if result is not None:
        body.append(_stats(result))
        body.append('<section id="chart" class="chart"><h2>Reversed-trigger size per class '
                    '<span class="count">(a backdoor target needs a much smaller trigger than the others)'
                    f'</span></h2>{l1_chart(result, class_names)}</section>')
        rule_hits = {f.label for f in decision.findings if f.label is not None}
        flagged = sorted((c for c in result.classes if c.flagged or c.label in rule_hits),
                         key=lambda c: (-c.anomaly_index, c.label))
        rest = [c for c in result.classes if not (c.flagged or c.label in rule_hits)]
        if flagged:
            legend = ('<p class="muted">Each card shows the reversed trigger (mask: white = trigger pixel; '
                      'pattern; mask·pattern) and held-out clean images with it stamped on, captioned with the '
                      'model\'s prediction before → after stamping (<span style="color:var(--red);font-weight:700">'
                      'red</span>: the trigger sends the image to this class).</p>')
            cards = "".join(_card(c, triggers, examples.get(c.label, []), rule_hits, name_of(c.label))
                            for c in flagged)
            body.append(f'<section id="flagged"><h2>Flagged classes <span class="count">({len(flagged)})</span>'
                        f'</h2>{legend}<div class="cards">{cards}</div></section>')
        if rest:
            head_css, table = class_table(rest, class_names)
            title = "Other classes" if flagged else "All classes"
            body.append(f'<section id="classes"><h2>{title} <span class="count">({len(rest)}, not flagged; click a '
                        f'column to sort)</span></h2>{table}</section>')
    body.append(_facts(result, model, policy, policy_source, class_names is not None))
    body.append(_reproduce(result, model, policy, command, list(links or [])))
    if limits and decision.outcome != "accept":
        items = "".join(f"<li>{_e(x)}</li>" for x in limits)
        body.append(f'<section id="limits"><h2>What this scan cannot see</h2><ul>{items}</ul></section>')
    if policy is not None:
        body.append('<section id="policy"><h2>Effective policy</h2><details><summary>Show the policy this '
                    'decision was made under (after command-line overrides)</summary>'
                    f'<pre>{_e(json.dumps(policy, indent=2))}</pre></details></section>')
    body.append("<footer>Black-box backdoor detection (B3D, Dong et al., ICCV 2021). "
                f"Exit codes: {exit_code_help()}.</footer>")
    title = f"{TITLES.get(decision.outcome, decision.outcome)}: {name} — backdoor gate"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}{head_css}</style></head>"
            f"<body><div class=\"wrap\">{''.join(body)}</div></body></html>\n")
