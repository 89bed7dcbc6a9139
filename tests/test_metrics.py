"""Prometheus metrics: registry contents, the model label, the textfile (checked by promtool), and a real
Pushgateway."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve import Server, ServerError, free_port
from gate.decision import Decision, decide
from gate.errors import UsageError
from gate.metrics import build_registry, check_model_name, export, mark_running, model_label, previous_success
from gate.policy import Policy
from gate.report.attestation import policy_sha256
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


def model_file(folder: Path, content: bytes = b"vendor-a model", name: str = "model.onnx") -> tuple[Path, str]:
    """A stand-in model file (metrics only hash it) and the label it gets by default."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path, "sha256-" + hashlib.sha256(content).hexdigest()[:12]


def run_result(path: Path | None = None, l1=None):
    result = make_result(l1, model_path=str(path) if path else "models/demo/gtsrb_badnets3x3.onnx")
    if path is not None:
        result.model["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result, decide(result, Policy())


def test_registry_holds_the_run():
    result, decision = run_result()
    reg = build_registry(result, decision, "badnets", now=1000.0,
                         info={"file": "m.onnx", "sha256": "ab" * 32, "policy": "default", "policy_sha256": "cd",
                               "version": "0.1.0"})
    m = {"model": "badnets"}
    assert reg.get_sample_value("backdoor_gate_last_run_timestamp_seconds", m) == 1000.0
    assert reg.get_sample_value("backdoor_gate_last_success_timestamp_seconds", m) == 1000.0
    assert reg.get_sample_value("backdoor_gate_decision", {**m, "outcome": "reject"}) == 1
    for other in ("accept", "review", "error", "running"):
        assert reg.get_sample_value("backdoor_gate_decision", {**m, "outcome": other}) == 0
    assert reg.get_sample_value("backdoor_gate_exit_code", m) == 1
    assert reg.get_sample_value("backdoor_gate_flagged_classes", m) == 1
    assert reg.get_sample_value("backdoor_gate_last_run_queries", m) == 123456
    assert reg.get_sample_value("backdoor_gate_scan_duration_seconds", m) == 42.5
    assert reg.get_sample_value("backdoor_gate_scan_complete", m) == 1
    assert reg.get_sample_value("backdoor_gate_model_info", {**m, "file": "m.onnx", "sha256": "ab" * 32,
                                                             "policy": "default", "policy_sha256": "cd",
                                                             "version": "0.1.0"}) == 1
    for c in result.classes:
        lab = {**m, "class": str(c.label)}
        assert reg.get_sample_value("backdoor_gate_class_l1", lab) == pytest.approx(c.l1)
        assert reg.get_sample_value("backdoor_gate_class_anomaly_index", lab) == pytest.approx(c.anomaly_index)
        assert reg.get_sample_value("backdoor_gate_class_flagged", lab) == (1 if c.flagged else 0)
    assert reg.get_sample_value("backdoor_gate_class_l1", {**m, "class": "10"}) is None  # bounded by classes
    # the helper's search (bandit on) is unlike the clean reference's: no empirical p-value, so no series
    assert decision.clean_reference.p_value is None
    assert reg.get_sample_value("backdoor_gate_clean_reference_p_value", m) is None


def test_the_clean_reference_p_value_is_exported_for_a_default_scan():
    from gate.policy import builtin_policy
    from gate.scan import ScanConfig

    result = make_result()
    result.search = {**ScanConfig().search.to_dict(), **ScanConfig().to_dict()}
    decision = decide(result, builtin_policy())
    reg = build_registry(result, decision, "badnets", now=1000.0)
    assert decision.clean_reference.p_value is not None
    assert reg.get_sample_value("backdoor_gate_clean_reference_p_value", {"model": "badnets"}) == \
        decision.clean_reference.p_value


def test_every_metric_is_a_gauge_about_the_last_run_with_no_counter_series():
    """One run's query count is not a counter: no ``_total``, no ``_created`` series (Prometheus conventions)."""
    from prometheus_client import generate_latest

    result, decision = run_result()
    text = generate_latest(build_registry(result, decision, "m", info={"file": "m.onnx"})).decode()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    assert set(types.values()) == {"gauge"}, types
    assert not any(name.endswith(("_total", "_created")) for name, _ in samples(text))
    assert "backdoor_gate_queries_total" not in text


def test_failed_run_reports_error_and_keeps_the_last_success(tmp_path):
    path, label = model_file(tmp_path / "vendor")
    result, decision = run_result(path)
    export(tmp_path, result, decision, str(path), now=1000.0)
    assert previous_success(tmp_path / "metrics.prom", label) == 1000.0
    export(tmp_path, None, Decision.error("data not found"), str(path), now=2000.0)
    s = samples((tmp_path / "metrics.prom").read_text())
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "error")))] == 1
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "reject")))] == 0
    assert s[("backdoor_gate_last_run_timestamp_seconds", (("model", label),))] == 2000.0
    assert s[("backdoor_gate_last_success_timestamp_seconds", (("model", label),))] == 1000.0
    assert s[("backdoor_gate_exit_code", (("model", label),))] == 2
    assert not any(name.startswith("backdoor_gate_class_") for name, _ in s)
    # a first run that fails has no success time at all; an unreadable model is labelled by its file
    (tmp_path / "fresh").mkdir()
    export(tmp_path / "fresh", None, Decision.error("boom"), "missing/x.onnx")
    text = (tmp_path / "fresh" / "metrics.prom").read_text()
    assert "last_success" not in text and 'model="file-x"' in text


def test_a_run_in_progress_says_running_with_the_earlier_timestamps(tmp_path):
    path, label = model_file(tmp_path / "vendor")
    result, _ = run_result(path, L1_CLEAN)
    export(tmp_path, result, decide(result, Policy()), str(path), now=1000.0)
    mark_running(tmp_path, str(path), policy=Policy().to_dict())
    s = samples((tmp_path / "metrics.prom").read_text())
    decision = {dict(k)["outcome"]: v for (name, k), v in s.items() if name == "backdoor_gate_decision"}
    assert decision == {"accept": 0, "reject": 0, "review": 0, "error": 0, "running": 1}, "no earlier accept"
    assert s[("backdoor_gate_last_run_timestamp_seconds", (("model", label),))] == 1000.0
    assert s[("backdoor_gate_last_success_timestamp_seconds", (("model", label),))] == 1000.0
    assert ("backdoor_gate_exit_code", (("model", label),)) not in s
    # a first run in progress has no timestamps yet
    (tmp_path / "fresh").mkdir()
    mark_running(tmp_path / "fresh", str(path))
    text = (tmp_path / "fresh" / "metrics.prom").read_text()
    assert "timestamp" not in text and f'backdoor_gate_decision{{model="{label}",outcome="running"}} 1.0' in text


def test_model_label_is_the_sha256_prefix_unless_named(tmp_path):
    """Two vendors' model.onnx do not share a series; --model-name gives a stable one."""
    a, label_a = model_file(tmp_path / "vendor-a", b"weights of vendor a")
    b, label_b = model_file(tmp_path / "vendor-b", b"weights of vendor b")
    assert label_a != label_b and a.name == b.name
    for path, label in ((a, label_a), (b, label_b)):
        result, decision = run_result(path)
        export(path.parent, result, decision, str(path))
        text = (path.parent / "metrics.prom").read_text()
        assert f'backdoor_gate_flagged_classes{{model="{label}"}} 1.0' in text
        assert f'sha256="{result.model["sha256"]}"' in text  # the info metric names the whole hash
    result, decision = run_result(a)
    export(tmp_path, result, decision, str(a), model_name="vendor-a/resnet50", policy=Policy().to_dict())
    s = samples((tmp_path / "metrics.prom").read_text())
    assert s[("backdoor_gate_decision", (("model", "vendor-a/resnet50"), ("outcome", "reject")))] == 1
    info = {dict(k)["file"]: dict(k) for (name, k), v in s.items() if name == "backdoor_gate_model_info" and v == 1}
    assert info == {"model.onnx": {"model": "vendor-a/resnet50", "file": "model.onnx",
                                   "sha256": result.model["sha256"], "policy": Policy().name,
                                   "policy_sha256": policy_sha256(Policy().to_dict()), "version": "0.1.0"}}
    assert model_label(None, "/x/" + "a\"b{c}" * 40 + ".onnx").startswith("file-a_b_c_")
    assert len(model_label(None, "/x/" + "a" * 200 + ".onnx")) <= 64


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a\"b", "ü", "x" * 65, "a{b}"])
def test_a_bad_model_name_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--model-name"):
        check_model_name(bad)
    assert check_model_name("vendor-a/resnet50@2.1") == "vendor-a/resnet50@2.1"


needs_promtool = pytest.mark.skipif(PROMTOOL is None and not CI,
                                    reason="promtool not installed (Debian prometheus; required when CI is set)")


@needs_promtool
@pytest.mark.parametrize("state", ["finished", "failed", "running"])
def test_promtool_accepts_the_textfile(tmp_path, state):
    assert PROMTOOL is not None, "promtool is required in CI"
    path, _ = model_file(tmp_path / "vendor")
    result, decision = run_result(path)
    if state == "failed":
        export(tmp_path, None, Decision.error("bad model"), str(path), policy=Policy().to_dict())
    elif state == "running":
        mark_running(tmp_path, str(path), policy=Policy().to_dict())
    else:
        export(tmp_path, result, decision, str(path), policy=Policy().to_dict())
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
    path, label = model_file(tmp_path / "vendor")
    result, decision = run_result(path)
    warning = export(tmp_path, result, decision, str(path), pushgateway, now=1234.0, policy=Policy().to_dict())
    assert warning is None
    _, text = http_get(f"{pushgateway}/metrics")
    s = samples(text)
    m = (("model", label),)
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "reject")))] == 1
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "accept")))] == 0
    assert s[("backdoor_gate_flagged_classes", m)] == 1
    assert s[("backdoor_gate_last_run_queries", m)] == 123456
    assert s[("backdoor_gate_last_success_timestamp_seconds", m)] == 1234.0
    assert s[("backdoor_gate_class_anomaly_index", (("class", "3"), *m))] == pytest.approx(
        result.class_result(3).anomaly_index)
    assert not any(name.endswith(("_total", "_created")) and name.startswith("backdoor_gate") for name, _ in s)
    # job and grouping key as documented
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["backdoor_gate_flagged_classes"].samples[0].labels["job"] == "backdoor_gate"
    info = fams["backdoor_gate_model_info"].samples[0].labels
    assert info["sha256"] == result.model["sha256"] and info["policy"] == Policy().name

    # a failed run: decision error, last run updated, the last success and class metrics kept
    (tmp_path / "err").mkdir()
    warning = export(tmp_path / "err", None, Decision.error("bad data"), str(path), pushgateway, now=5678.0)
    assert warning is None
    s = samples(http_get(f"{pushgateway}/metrics")[1])
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "error")))] == 1
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "reject")))] == 0
    assert s[("backdoor_gate_last_run_timestamp_seconds", m)] == 5678.0
    assert s[("backdoor_gate_last_success_timestamp_seconds", m)] == 1234.0
    assert ("backdoor_gate_class_l1", (("class", "3"), *m)) in s

    # another vendor's model.onnx is its own group; so is a named one (a '/' in the grouping key is fine)
    other_path, other_label = model_file(tmp_path / "vendor-b", b"another vendor")
    other, _ = run_result(other_path, L1_CLEAN)
    (tmp_path / "o").mkdir()
    export(tmp_path / "o", other, decide(other, Policy()), str(other_path), pushgateway)
    export(tmp_path / "o", other, decide(other, Policy()), str(other_path), pushgateway, model_name="vendor-b/cnn")
    s = samples(http_get(f"{pushgateway}/metrics")[1])
    assert s[("backdoor_gate_decision", (("model", other_label), ("outcome", "accept")))] == 1
    assert s[("backdoor_gate_decision", (("model", "vendor-b/cnn"), ("outcome", "accept")))] == 1
    assert s[("backdoor_gate_decision", (("model", label), ("outcome", "error")))] == 1


def test_unreachable_pushgateway_is_a_warning_not_a_verdict(tmp_path):
    result, decision = run_result()
    warning = export(tmp_path, result, decision, "m.onnx", f"http://127.0.0.1:{free_port()}")
    assert warning and "could not push metrics" in warning
    assert (tmp_path / "metrics.prom").is_file()


def test_textfile_round_trip(tmp_path):
    path, label = model_file(tmp_path / "vendor")
    result, decision = run_result(path)
    export(tmp_path, result, decision, str(path), now=99.0)
    text = Path(tmp_path / "metrics.prom").read_text()
    assert samples(text)[("backdoor_gate_flagged_classes", (("model", label),))] == 1
    assert not list(tmp_path.glob("*.tmp*")), "textfile written atomically, no temp file left"
