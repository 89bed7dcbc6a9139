"""policies/alerts.yml: valid Prometheus rules, and their promtool unit tests pass."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

POLICIES = Path(__file__).resolve().parent.parent / "policies"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                                reason="promtool not installed (Debian package prometheus); required when CI is set")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None, "promtool is required in CI (apt-get install prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=POLICIES)


def test_rules_are_valid():
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rule_unit_tests_pass():
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested():
    import yaml

    rules = yaml.safe_load((POLICIES / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((POLICIES / "alerts_test.yml").read_text())
    fired = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    assert alerts <= fired, f"alerts never seen firing in alerts_test.yml: {sorted(alerts - fired)}"
    assert {"BackdoorGateRejectionRateHigh", "BackdoorGateProxyDown", "BackdoorGateUpstreamErrors",
            "BackdoorGateModelRejected"} <= alerts


def test_batch_job_metric_names_match_the_gate_exporter():
    """The scan alerts read what gate/metrics.py exports (a failed run has the decision gauge only)."""
    from prometheus_client import generate_latest

    from gate.decision import Decision
    from gate.metrics import build_registry

    text = generate_latest(build_registry(None, Decision.error("boom"), "vendor-a")).decode()
    assert 'backdoor_gate_decision{model="vendor-a",outcome="error"} 1.0' in text
    assert 'backdoor_gate_decision{model="vendor-a",outcome="reject"} 0.0' in text
    from gate.result import ClassResult, ScanResult

    classes = [ClassResult(label=k, l1=1.0, binary_l1=1, mask_fraction=0.1, trigger_asr=1.0, queries=1, steps=1,
                           status="converged", flagged=k == 1) for k in range(3)]
    result = ScanResult(model={}, input_spec={}, providers=[], method="b3d", seed=0, search={}, outliers={},
                        data={}, classes=classes, flagged=[1], complete=True, stop_reason=None, queries={},
                        seconds={})
    text = generate_latest(build_registry(result, Decision("reject", ["r"], 1), "vendor-a")).decode()
    assert 'backdoor_gate_decision{model="vendor-a",outcome="reject"} 1.0' in text
    assert 'backdoor_gate_flagged_classes{model="vendor-a"} 1.0' in text
