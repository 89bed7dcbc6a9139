"""``gate run`` end to end on a tiny hand-built ONNX model: every exit code, the reports it leaves,
fail-closed errors, policy overrides, and where the data comes from.

Scans use tiny search settings (k=6, minibatch 4, 15 steps, 100 images) so each run takes about a second;
outcomes are steered through the policy rather than by hoping a 15-step search finds something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from gate.cli import main
from gate.policy import Policy
from tests.helpers import DEMO, fake_synthesis, linear_model

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
# no rule can fire: what decides the outcome is completeness alone (15-step searches do not converge, so
# the weak-search rule is off too, and the data's labels are random, so is the clean-accuracy rule)
NO_FLAGS = {"outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
            "rules": {"small_trigger": None, "weak_search": None, "min_clean_accuracy": None}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    x = (rng.random((120, 8, 8, 3)) * 255).astype(np.uint8)
    np.savez(d / "data.npz", x=x, y=rng.integers(0, 5, 120))
    np.savez(d / "data_43.npz", x=x, y=np.full(120, 42))  # labels beyond the model's 5 classes
    np.savez(d / "data_16px.npz", x=np.zeros((50, 16, 16, 3), np.uint8))
    (d / "broken.onnx").write_bytes(b"this is not an onnx file")
    return d


def write_policy(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def run_gate(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def metric(out: Path, name: str, **labels) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families((out / "metrics.prom").read_text()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# --------------------------------------------------------------------------- exit 0, 1, 2
def test_accept_exit_0_writes_every_report(assets, tmp_path, capsys):
    pol = write_policy(tmp_path / "p.yaml", {"name": "lenient", **NO_FLAGS})
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", out,
                           "--data", assets / "data.npz", *FAST)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ACCEPT: no class flagged among 5")
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html", "report.sarif", "junit.xml", "metrics.prom", "triggers.npz"} <= names
    doc = report(out)
    assert doc["decision"]["outcome"] == "accept" and doc["decision"]["exit_code"] == 0
    assert doc["method"] == "b3d" and doc["data"]["source"].endswith("data.npz")
    # effective policy: the command-line overrides are in it and it is a loadable policy
    eff = Policy.from_dict(doc["policy"])
    assert (eff.name, eff.search.k, eff.search.batch_size, eff.search.max_steps, eff.data.max_images) == \
        ("lenient", 6, 4, 15, 100)
    assert eff.data.source == "file" and eff.data.path == str(assets / "data.npz")
    assert doc["decision"]["overrides"]["search.k"] == 6 and doc["decision"]["policy_file"] == str(pol)
    assert doc["search"]["k"] == 6  # and the scan really ran with them
    label = "sha256-" + doc["model"]["sha256"][:12]  # the metrics' model label: the sha256, not the file stem
    assert metric(out, "backdoor_gate_decision", outcome="accept", model=label) == 1
    assert metric(out, "backdoor_gate_last_run_queries", model=label) == doc["queries"]["total"]
    q = doc["queries"]  # the HTML report's stamped examples come from the scan's held-out pass: no extra query
    assert "report" not in q and q["total"] == q["scan"] + q["synthesis"] + q["convention"]
    html = (out / "report.html").read_text()
    # nothing flagged: no cards with pictures, a table row per class
    assert "Accepted" in html and html.count("data:image/png;base64,") == 0 and html.count('<tr id="row-') == 5


def test_reject_exit_1(assets, tmp_path, capsys):
    # any reversed trigger with measured attack success and a mask under 100% of the image -> reject
    pol = write_policy(tmp_path / "p.yaml", {**NO_FLAGS, "rules": {"weak_search": None, "min_clean_accuracy": None,
                                                                   "small_trigger": {"min_asr": 0.0,
                                                                                     "max_mask_fraction": 1.0}}})
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", out,
                           "--data", assets / "data.npz", *FAST)
    assert code == 1
    assert stdout.count("\n") == 1 and stdout.startswith("REJECT: class 0: a reversed trigger covering")
    doc = report(out)
    assert doc["decision"]["outcome"] == "reject" and len(doc["decision"]["findings"]) == 5
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "5"
    sarif = json.loads((out / "report.sarif").read_text())
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["BG003"] * 5
    assert sorted(p.name for p in out.glob("trigger_*.png")) == [f"trigger_{i}.png" for i in range(5)]
    assert metric(out, "backdoor_gate_decision", outcome="reject") == 1
    assert metric(out, "backdoor_gate_exit_code") == 1


def test_review_exit_3_when_the_budget_runs_out(assets, tmp_path, capsys):
    pol = write_policy(tmp_path / "p.yaml", NO_FLAGS)
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", out,
                           "--data", assets / "data.npz", *FAST, "--max-queries", "1000")
    assert code == 3, "review (a person must look) is not the code of a crash"
    assert stdout.startswith("REVIEW: scan incomplete: query budget reached")
    doc = report(out)
    assert doc["complete"] is False and doc["decision"]["outcome"] == "review"
    assert doc["policy"]["budget"]["max_queries"] == 1000
    assert doc["queries"]["total"] <= 1000, "the budget is never exceeded"
    assert metric(out, "backdoor_gate_scan_complete") == 0
    assert metric(out, "backdoor_gate_decision", outcome="review") == 1


def test_strict_policy_rejects_an_incomplete_scan(assets, tmp_path, capsys):
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", ROOT / "policies" / "strict.yaml",
                           "--out", tmp_path, "--data", assets / "data.npz", *FAST, "--max-queries", "1000")
    assert code == 1 and stdout.startswith("REJECT:") and "scan incomplete" in stdout


def test_same_seed_same_result(assets, tmp_path, capsys):
    pol = write_policy(tmp_path / "p.yaml", NO_FLAGS)
    runs = []
    for name in ("a", "b"):
        run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / name,
             "--data", assets / "data.npz", *FAST, "--seed", "5")
        doc = report(tmp_path / name)
        runs.append([(c["l1"], c["trigger_asr"], c["queries"], c["status"]) for c in doc["classes"]])
        assert doc["seed"] == 5 and doc["policy"]["search"]["seed"] == 5
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------- errors fail closed
@pytest.mark.parametrize("model,data,message", [
    ("missing.onnx", "data.npz", "model file not found"),
    ("broken.onnx", "data.npz", "is not a valid ONNX model"),
    ("tiny.onnx", "data_16px.npz", "images are 16x16 but the model takes 8x8"),
    ("tiny.onnx", "missing.npz", "data not found"),
])
def test_errors_exit_2_with_error_reports(assets, tmp_path, capsys, model, data, message):
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", assets / model, "--policy", ROOT / "policies" / "default.yaml",
                           "--out", out, "--data", assets / data, *FAST)
    assert code == 2
    assert stdout.count("\n") == 1 and stdout.startswith("ERROR: scan failed:") and message in stdout
    doc = report(out)
    assert doc["decision"]["outcome"] == "error" and doc["decision"]["exit_code"] == 2
    assert message in doc["error"] and doc["policy"]["name"] == "default"
    assert metric(out, "backdoor_gate_decision", outcome="error") == 1
    assert metric(out, "backdoor_gate_decision", outcome="accept") == 0
    assert ET.parse(out / "junit.xml").getroot().find("testsuite").get("errors") == "1"
    assert "Scan failed" in (out / "report.html").read_text()


def test_bad_policy_is_an_error_naming_the_field(assets, tmp_path, capsys):
    pol = tmp_path / "bad.yaml"
    pol.write_text("search:\n  k: 3\n")
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", out, *FAST)
    assert code == 2
    assert f"policy {pol}: search.k must be an even integer >= 2, got 3" in stdout
    assert report(out)["decision"]["outcome"] == "error" and report(out)["policy"] is None


def test_on_error_reject_exits_1_but_reports_error(assets, tmp_path, capsys):
    pol = write_policy(tmp_path / "p.yaml", {"on_error": "reject"})
    code, stdout, _ = run_gate(capsys, "run", assets / "missing.onnx", "--policy", pol, "--out", tmp_path / "o",
                               "--data", assets / "data.npz", *FAST)
    assert code == 1 and stdout.startswith("ERROR:")
    assert report(tmp_path / "o")["decision"] | {"reasons": None, "findings": None} == {
        "outcome": "error", "exit_code": 1, "reasons": None, "findings": None,
        "policy_file": str(pol), "overrides": report(tmp_path / "o")["decision"]["overrides"]}


def test_a_crash_is_an_error_not_a_verdict(assets, tmp_path, capsys, monkeypatch):
    import gate.decision
    import gate.pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(gate.pipeline, "decide", boom)
    code, stdout, err = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", write_policy(tmp_path / "p.yaml", {}),
                             "--out", tmp_path / "o", "--data", assets / "data.npz", *FAST)
    assert code == 2 and "internal error: RuntimeError: simulated bug" in stdout
    assert "Traceback" not in err, "one line, no traceback (gate --debug prints it: tests/test_fail_closed.py)"
    assert report(tmp_path / "o")["decision"]["outcome"] == "error"
    assert gate.decision.decide is not boom


# --------------------------------------------------------------------------- usage errors: exit 4
@pytest.mark.parametrize("args", [
    ["run", "m.onnx", "--policy", "p.yaml"],  # no --out
    ["run", "m.onnx", "--policy", "p.yaml", "--out", "o", "--k", "six"],
    ["run", "m.onnx", "--policy", "p.yaml", "--out", "o", "--bogus"],
    ["run", "m.onnx", "--policy", "p.yaml", "--out", "o", "--data", "d.npz", "--synthetic"],
    ["run", "m.onnx", "--policy", "p.yaml", "--out", "o", "--layout", "CHW"],
])
def test_argparse_usage_errors_exit_4(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 4
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--k", "3", "option --k: search.k must be an even integer >= 2, got 3"),
    ("--max-queries", "0", "option --max-queries: budget.max_queries must be an integer >= 1, got 0"),
    ("--median-ratio", "1.5", "option --median-ratio: outliers.median_ratio must be a number in [0, 1)"),
    ("--pushgateway", "localhost:9091", "option --pushgateway: metrics.pushgateway must be an http"),
    ("--mean", "0.5", "input.mean and input.std must be given together"),
    ("--examples", "-1", "--examples must be 0 or more"),
])
def test_bad_flag_values_exit_4(assets, tmp_path, capsys, flag, value, message):
    code, stdout, err = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", ROOT / "policies" / "default.yaml",
                             "--out", tmp_path / "o", flag, value)
    assert code == 4 and message in err and stdout == ""


def test_console_script_exit_codes(assets, tmp_path):
    """The installed entry point (python -m gate) returns the same codes to the shell."""
    pol = write_policy(tmp_path / "p.yaml", NO_FLAGS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gate", "run", str(assets / "tiny.onnx"), "--policy", str(pol),
                        "--out", str(tmp_path / "o"), "--data", str(assets / "data.npz"), *FAST],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ACCEPT:") and r.stdout.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "gate", "run", "m.onnx"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 4


# --------------------------------------------------------------------------- where the data comes from


@pytest.mark.parametrize("sample,expect", [
    ("data.npz", "file"),  # fits: used
    ("missing.npz", "synthetic"),  # not there: synthetic
    ("data_43.npz", "synthetic"),  # labels beyond the model's classes: not this model's data
    ("data_16px.npz", "synthetic"),  # wrong image size
])
def test_auto_data_source(assets, tmp_path, capsys, monkeypatch, sample, expect):
    calls = fake_synthesis(monkeypatch)
    pol = write_policy(tmp_path / "p.yaml", {**NO_FLAGS, "data": {"source": "auto", "path": str(assets / sample),
                                                                  "synthetic_per_class": 20}})
    code, _, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", *FAST)
    assert code == 0
    doc = report(tmp_path / "o")
    if expect == "file":
        assert doc["data"]["source"] == str(assets / sample) and doc["method"] == "b3d" and not calls
    else:
        assert doc["data"]["source"] == "synthetic" and doc["method"] == "b3d-ss" and calls == [20]


def test_synthetic_flag_and_file_source(assets, tmp_path, capsys, monkeypatch):
    calls = fake_synthesis(monkeypatch)
    pol = write_policy(tmp_path / "p.yaml", {**NO_FLAGS, "data": {"source": "file", "path": str(assets / "data.npz")}})
    code, _, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", "--synthetic",
                      "--synthetic-per-class", "20", *FAST)
    assert code == 0 and calls == [20] and report(tmp_path / "o")["policy"]["data"]["source"] == "synthetic"
    pol = write_policy(tmp_path / "q.yaml", {"data": {"source": "file", "path": str(assets / "missing.npz")}})
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "q", *FAST)
    assert code == 2 and "data not found" in stdout


def test_real_synthesis_path(assets, tmp_path, capsys):
    """B3D-SS through gate.synth for real (tiny sizes)."""
    pol = write_policy(tmp_path / "p.yaml", {**NO_FLAGS, "data": {"source": "synthetic", "synthetic_per_class": 4}})
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", *FAST)
    doc = report(tmp_path / "o")
    assert doc.get("error") is None, doc.get("error")
    assert code in (0, 2), stdout
    assert doc["method"] == "b3d-ss" and doc["queries"]["synthesis"] > 0
    assert doc["synthesis"]["config"]["grid"] == 4 and not doc["synthesis"]["seeded"]


def test_synthesis_from_seed_images_on_a_chosen_grid(assets, tmp_path, capsys):
    pol = write_policy(tmp_path / "p.yaml", {**NO_FLAGS, "data": {"source": "synthetic", "synthetic_per_class": 2}})
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", *FAST,
                               "--seed-images", assets / "data.npz", "--synthetic-grid", "2")
    doc = report(tmp_path / "o")
    assert doc.get("error") is None, doc.get("error")
    assert doc["synthesis"]["seeded"] and doc["synthesis"]["config"]["grid"] == 2
    assert doc["policy"]["data"]["seed_images"] == str(assets / "data.npz")
    code, _, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "p", *FAST,
                          "--synthetic-grid", "0")
    assert report(tmp_path / "p")["synthesis"]["config"]["grid"] is None  # 0: every pixel
    code, stdout, _ = run_gate(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "q", *FAST,
                               "--seed-images", tmp_path / "nowhere.npz")
    assert code == 2 and "nowhere.npz" in stdout


# --------------------------------------------------------------------------- the shipped demo
@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "gtsrb_badnets3x3.onnx").is_file(), reason="demo models not built yet")
def test_make_gate_defaults_on_the_demo_model(tmp_path, capsys, monkeypatch):
    """What `make gate` runs: the default policy with the demo data passed explicitly produces every report."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    code, stdout, _ = run_gate(capsys, "run", DEMO / "gtsrb_badnets3x3.onnx", "--policy", "policies/default.yaml",
                               "--data", DEMO / "gtsrb_sample.npz", "--out", out, *FAST, "--examples", "1")
    doc = report(out)
    assert code == doc["decision"]["exit_code"] and stdout.count("\n") == 1
    assert doc["data"]["source"] == str(DEMO / "gtsrb_sample.npz") and doc["method"] == "b3d"
    assert doc["model"]["num_classes"] == 43 and len(doc["classes"]) == 43
    assert doc["decision"]["outcome"] in ("accept", "reject", "review")
