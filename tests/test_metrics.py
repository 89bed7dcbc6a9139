"""Prometheus metrics: registry contents, the textfile (checked by promtool), and a real Pushgateway."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve import Server, ServerError, free_port
from gate.decision import Decision, decide
from gate.metrics import build_registry, export, model_label, previous_success
from gate.policy import Policy
from tests.helpers import L1_CLEAN, make_result

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or (
    "/usr/bin/prometheus-pushgateway" if os.path.exists("/usr/bin/prometheus-pushgateway") else None)
PROMTOOL = shutil.which("promtool")
CI = bool(os.environ.get("CI"))


def samples(text: str) -> dict[tuple, float]:
    """{(name, sorted labels without job/instance): value} of an exposition text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("job", "instance")))
            out[(s.name, labels)] = s.value
    return out


def run_result():
    result = make_result()
    return result, decide(result, Policy())


def test_registry_holds_the_run():
    result, decision = run_result()
    reg = build_registry(result, decision, "badnets", now=1000.0)
    m = {"model": "badnets"}
    assert reg.get_sample_value("backdoor_gate_last_run_timestamp_seconds", m) == 1000.0
    assert reg.get_sample_value("backdoor_gate_last_success_timestamp_seconds", m) == 1000.0
    assert reg.get_sample_value("backdoor_gate_decision", {**m, "outcome": "reject"}) == 1
    for other in ("accept", "review", "error"):
        assert reg.get_sample_value("backdoor_gate_decision", {**m, "outcome": other}) == 0
    assert reg.get_sample_value("backdoor_gate_exit_code", m) == 1
    assert reg.get_sample_value("backdoor_gate_flagged_classes", m) == 1
    assert reg.get_sample_value("backdoor_gate_queries_total", m) == 123456
    assert reg.get_sample_value("backdoor_gate_scan_duration_seconds", m) == 42.5
    assert reg.get_sample_value("backdoor_gate_scan_complete", m) == 1
    for c in result.classes:
        lab = {**m, "class": str(c.label)}
        assert reg.get_sample_value("backdoor_gate_class_l1", lab) == pytest.approx(c.l1)
        assert reg.get_sample_value("backdoor_gate_class_anomaly_index", lab) == pytest.approx(c.anomaly_index)
        assert reg.get_sample_value("backdoor_gate_class_flagged", lab) == (1 if c.flagged else 0)
    assert reg.get_sample_value("backdoor_gate_class_l1", {**m, "class": "10"}) is None  # bounded by classes


def test_failed_run_reports_error_and_keeps_the_last_success(tmp_path):
    result, decision = run_result()
    export(tmp_path, result, decision, "models/demo/m.onnx", now=1000.0)
    assert previous_success(tmp_path / "metrics.prom", "m") == 1000.0
    export(tmp_path, None, Decision.error("model file not found"), "models/demo/m.onnx", now=2000.0)
    s = samples((tmp_path / "metrics.prom").read_text())
    assert s[("backdoor_gate_decision", (("model", "m"), ("outcome", "error")))] == 1
    assert s[("backdoor_gate_decision", (("model", "m"), ("outcome", "reject")))] == 0
    assert s[("backdoor_gate_last_run_timestamp_seconds", (("model", "m"),))] == 2000.0
    assert s[("backdoor_gate_last_success_timestamp_seconds", (("model", "m"),))] == 1000.0
    assert s[("backdoor_gate_exit_code", (("model", "m"),))] == 2
    assert not any(name.startswith("backdoor_gate_class_") for name, _ in s)
    # a first run that fails has no success time at all
    (tmp_path / "fresh").mkdir()
    export(tmp_path / "fresh", None, Decision.error("boom"), "x.onnx")
    assert "last_success" not in (tmp_path / "fresh" / "metrics.prom").read_text()


def test_model_label_is_bounded_and_safe():
    assert model_label("models/demo/gtsrb_badnets3x3.onnx") == "gtsrb_badnets3x3"
    label = model_label("/x/" + "a\"b{c}" * 40 + ".onnx")
    assert len(label) <= 64 and all(ch.isalnum() or ch in "_.:-" for ch in label)


needs_promtool = pytest.mark.skipif(PROMTOOL is None and not CI,
                                    reason="promtool not installed (Debian prometheus; required when CI is set)")


@needs_promtool
@pytest.mark.parametrize("failed", [False, True])
def test_promtool_accepts_the_textfile(tmp_path, failed):
    assert PROMTOOL is not None, "promtool is required in CI"
    result, decision = run_result()
    if failed:
        export(tmp_path, None, Decision.error("bad model"), "m.onnx")
    else:
        export(tmp_path, result, decision, "m.onnx")
    prom = tmp_path / "metrics.prom"
    with prom.open() as f:
        r = subprocess.run([PROMTOOL, "check", "metrics"], stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", "promtool lint findings: " + r.stdout + r.stderr


@needs_promtool
def test_promtool_check_can_fail(tmp_path):
    """The promtool check above is a real check: a badly named metric is reported."""
    bad = tmp_path / "bad.prom"
    bad.write_text("# HELP x_total a gauge named like a counter\n# TYPE x_total gauge\nx_total 1\n")
    with bad.open() as f:
        r = subprocess.run([PROMTOOL, "check", "metrics"], stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 or r.stdout.strip() or r.stderr.strip()


# --------------------------------------------------------------------------- a real Pushgateway
def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 -- a local test server
        return r.status, r.read().decode()


@pytest.fixture
def pushgateway(tmp_path):
    if PUSHGATEWAY is None:
        if CI:
            pytest.fail("prometheus-pushgateway is required in CI (apt-get install prometheus-pushgateway)")
        pytest.skip("prometheus-pushgateway not installed")
    try:
        server = Server([PUSHGATEWAY, "--web.listen-address={host}:{port}",
                         f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                        ready_path="/-/ready", timeout=30, log=tmp_path / "pushgateway.log", name="pushgateway")
    except ServerError as e:
        pytest.fail(str(e))
    try:
        yield server.url
    finally:
        server.stop()


def test_push_to_a_real_pushgateway(tmp_path, pushgateway):
    result, decision = run_result()
    warning = export(tmp_path, result, decision, "models/demo/gtsrb_badnets3x3.onnx", pushgateway, now=1234.0)
    assert warning is None
    _, text = http_get(f"{pushgateway}/metrics")
    s = samples(text)
    m = (("model", "gtsrb_badnets3x3"),)
    assert s[("backdoor_gate_decision", (("model", "gtsrb_badnets3x3"), ("outcome", "reject")))] == 1
    assert s[("backdoor_gate_decision", (("model", "gtsrb_badnets3x3"), ("outcome", "accept")))] == 0
    assert s[("backdoor_gate_flagged_classes", m)] == 1
    assert s[("backdoor_gate_queries_total", m)] == 123456
    assert s[("backdoor_gate_last_success_timestamp_seconds", m)] == 1234.0
    assert s[("backdoor_gate_class_anomaly_index", (("class", "3"), *m))] == pytest.approx(
        result.class_result(3).anomaly_index)
    # job and grouping key as documented
    fam = {f.name: f for f in text_string_to_metric_families(text)}["backdoor_gate_flagged_classes"]
    assert fam.samples[0].labels["job"] == "backdoor_gate"

    # a failed run: decision error, last run updated, the last success and class metrics kept
    (tmp_path / "err").mkdir()
    warning = export(tmp_path / "err", None, Decision.error("bad model"), "models/demo/gtsrb_badnets3x3.onnx",
                     pushgateway, now=5678.0)
    assert warning is None
    s = samples(http_get(f"{pushgateway}/metrics")[1])
    assert s[("backdoor_gate_decision", (("model", "gtsrb_badnets3x3"), ("outcome", "error")))] == 1
    assert s[("backdoor_gate_decision", (("model", "gtsrb_badnets3x3"), ("outcome", "reject")))] == 0
    assert s[("backdoor_gate_last_run_timestamp_seconds", m)] == 5678.0
    assert s[("backdoor_gate_last_success_timestamp_seconds", m)] == 1234.0
    assert ("backdoor_gate_class_l1", (("class", "3"), *m)) in s

    # another model is its own group
    other = make_result(L1_CLEAN, model_path="clean.onnx")
    (tmp_path / "o").mkdir()
    export(tmp_path / "o", other, decide(other, Policy()), "clean.onnx", pushgateway)
    s = samples(http_get(f"{pushgateway}/metrics")[1])
    assert s[("backdoor_gate_decision", (("model", "clean"), ("outcome", "accept")))] == 1
    assert s[("backdoor_gate_decision", (("model", "gtsrb_badnets3x3"), ("outcome", "error")))] == 1


def test_unreachable_pushgateway_is_a_warning_not_a_verdict(tmp_path):
    result, decision = run_result()
    warning = export(tmp_path, result, decision, "m.onnx", f"http://127.0.0.1:{free_port()}")
    assert warning and "could not push metrics" in warning
    assert (tmp_path / "metrics.prom").is_file()


def test_textfile_round_trip(tmp_path):
    result, decision = run_result()
    export(tmp_path, result, decision, "m.onnx", now=99.0)
    text = Path(tmp_path / "metrics.prom").read_text()
    assert samples(text)[("backdoor_gate_flagged_classes", (("model", "m"),))] == 1
    assert not list(tmp_path.glob("*.tmp*")), "textfile written atomically, no temp file left"
