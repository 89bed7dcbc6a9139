"""The report page's compact table of classes, sortable by any column without a line of script.

Each sort order is a radio button ahead of the table; a column's header is a ``<label>`` for its buttons,
so clicking it sorts by that column (ascending, and descending on a second click). Each row carries its rank
under every column as a CSS variable (``--r-l1: 3``); the checked button's rule sets the rows' flex
``order`` to that rank (descending: the body's ``column-reverse``). The page stays free of JavaScript, so it
works under a strict Content-Security-Policy and from a CI artifact. Default: L1 ascending, the most
suspicious class first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gate.report.fmt import e, num, pct
from gate.result import ClassResult

DEFAULT_SORT = "l1"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    cell: Callable[[ClassResult], str]  # the text shown
    sort: Callable[[ClassResult], Any]  # the sort key (None sorts last)
    track: str = "minmax(52px, .8fr)"  # its CSS grid track
    numeric: bool = True
    tip: str = ""


def _title(text: str) -> str:
    return f' title="{e(text)}"' if text else ""


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def columns(classes: list[ClassResult], class_names: list[str] | None) -> list[Column]:
    """The columns for these classes: a name column with ``class_names``, p-values and blend amplitudes
    only when the scan has them."""
    name = (lambda c: class_names[c.label] if 0 <= c.label < len(class_names) else "") if class_names else None
    cols = [Column("class", "class", lambda c: str(c.label), lambda c: c.label, "minmax(60px, .6fr)")]
    if name is not None:
        cols.append(Column("name", "name", name, lambda c: name(c).casefold(), "minmax(180px, 3.4fr)", False))
    cols += [
        Column("l1", "L1", lambda c: num(c.l1), lambda c: c.l1, tip="L1 norm of the reversed mask"),
        Column("pixels", "pixels", lambda c: num(c.binary_l1), lambda c: c.binary_l1,
               tip="pixels in the binary mask (mask ≥ 0.5)"),
        Column("area", "of image", lambda c: pct(c.mask_fraction), lambda c: c.mask_fraction, "minmax(60px, .9fr)"),
        Column("index", "anomaly", lambda c: num(c.anomaly_index), lambda c: -c.anomaly_index, "minmax(80px, 1fr)",
               tip="anomaly index: outlier index of the L1 (positive: smaller than the others); sorted most "
                   "anomalous first"),
    ]
    if any(c.p_value is not None for c in classes):
        cols.append(Column("p", "p-value", lambda c: _p(c.p_value), lambda c: c.p_value,
                           tip="per-model p-value of the calibrated rule"))
    cols.append(Column("asr", "ASR", lambda c: pct(c.trigger_asr), lambda c: c.trigger_asr,
                       tip="trigger ASR: share of held-out clean images the reversed trigger sends to the class"))
    if any(c.blend_amplitude is not None for c in classes):
        cols.append(Column("blend", "blend amp.", lambda c: num(c.blend_amplitude), lambda c: c.blend_amplitude,
                           tip="smallest amplitude of a working blend trigger (1: none worked)"))
    cols += [
        Column("steps", "steps", lambda c: num(c.steps), lambda c: c.steps),
        Column("queries", "queries", lambda c: num(c.queries), lambda c: c.queries, "minmax(64px, 1fr)"),
        Column("status", "status", lambda c: c.status.replace("_", " "), lambda c: c.status,
               "minmax(90px, 1.2fr)", False, "how the search ended; hover a row's status for the search's note"),
    ]
    return cols


def ranks(classes: list[ClassResult], col: Column) -> dict[int, int]:
    """Each class's position (label -> 0-based rank) under ``col``'s sort key; None last, ties by label."""
    def key(c: ClassResult):
        k = col.sort(c)
        return (k is None, k if k is not None else 0, c.label)

    return {c.label: i for i, c in enumerate(sorted(classes, key=key))}


def _css(cols: list[Column]) -> str:
    rules = [".ctable{--cols:" + " ".join(c.track for c in cols) + "}"]
    for c in cols:
        a, d = f"#sort-{c.key}-a:checked~.ctw", f"#sort-{c.key}-d:checked~.ctw"
        rules += [f"{a} tbody tr,{d} tbody tr{{order:var(--r-{c.key})}}",
                  f"{d} tbody{{flex-direction:column-reverse}}",
                  f"{a} .sa-{c.key}{{display:none}}{a} .sd-{c.key}{{display:inline}}",
                  f'{a} .sd-{c.key}::after{{content:" ▲"}}{d} .sa-{c.key}::after{{content:" ▼"}}',
                  f"{a} th.c-{c.key},{d} th.c-{c.key}{{background:#e8eef8}}"]
    return "".join(rules)


CSS = """
.ctable{position:relative}
.ctable .sr{position:absolute;width:1px;height:1px;opacity:0;margin:0;pointer-events:none}
.ctable table{width:100%;border-collapse:collapse;font-size:12.5px}
.ctable thead tr,.ctable tbody tr{display:grid;grid-template-columns:var(--cols);align-items:center}
.ctable tbody{display:flex;flex-direction:column}
.ctable th{text-align:left;font-weight:600;color:var(--muted);padding:5px 8px;border-bottom:2px solid var(--line);
white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.ctable th label{cursor:pointer;color:var(--accent);user-select:none}.ctable th .sd{display:none}
.ctable .sr:focus-visible~.ctw thead{outline:2px solid var(--accent)}
.ctable td{padding:3px 8px;border-bottom:1px solid #eef1f4;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.ctable .num{text-align:right;font-variant-numeric:tabular-nums}
.ctable tbody tr:hover{background:#f6f8fb}
"""


def class_table(classes: list[ClassResult], class_names: list[str] | None = None, *,
                default: str = DEFAULT_SORT) -> tuple[str, str]:
    """(CSS for the page's head, the table's HTML) for ``classes``."""
    cols = columns(classes, class_names)
    if default not in {c.key for c in cols}:
        default = cols[0].key
    order = {c.key: ranks(classes, c) for c in cols}
    radios = "".join(f'<input type="radio" class="sr" name="sort-classes" id="sort-{c.key}-{d}" '
                     f'aria-label="sort by {e(c.title)} {"ascending" if d == "a" else "descending"}"'
                     f'{" checked" if (c.key, d) == (default, "a") else ""}>'
                     for c in cols for d in ("a", "d"))
    head = "".join(
        f'<th class="c-{c.key}{" num" if c.numeric else ""}"{_title(c.tip)}>'
        f'<label for="sort-{c.key}-a" class="sa sa-{c.key}">{e(c.title)}</label>'
        f'<label for="sort-{c.key}-d" class="sd sd-{c.key}">{e(c.title)}</label></th>' for c in cols)
    rows = []
    for cr in sorted(classes, key=lambda c: order[default][c.label]):
        style = ";".join(f"--r-{c.key}:{order[c.key][cr.label]}" for c in cols)
        cells = []
        for c in cols:
            tip = cr.note if c.key == "status" and cr.note else (c.cell(cr) if not c.numeric else "")
            cells.append(f'<td class="c-{c.key}{" num" if c.numeric else ""}"{_title(tip)}>{e(c.cell(cr))}</td>')
        rows.append(f'<tr id="row-{cr.label}" style="{style}">{"".join(cells)}</tr>')
    html = (f'<div class="ctable">{radios}<div class="ctw"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></div>')
    return CSS + _css(cols), html
