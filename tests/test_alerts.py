"""policies/alerts.yml: valid Prometheus rules, and their promtool unit tests pass (policies/alerts_test.yml,
evaluated every minute, and policies/alerts_days_test.yml, every 15 minutes over days: resolution and staleness)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

POLICIES = Path(__file__).resolve().parent.parent / "policies"
TEST_FILES = ("alerts_test.yml", "alerts_days_test.yml")
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


@pytest.mark.parametrize("name", TEST_FILES)
def test_rule_unit_tests_pass(name):
    r = promtool("test", "rules", name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested():
    import yaml

    rules = yaml.safe_load((POLICIES / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = [t for name in TEST_FILES for t in yaml.safe_load((POLICIES / name).read_text())["tests"]]
    checks = [a for t in tests for a in t.get("alert_rule_test", [])]
    fired = {a["alertname"] for a in checks if a["exp_alerts"]}
    assert alerts <= fired, f"alerts never seen firing in {TEST_FILES}: {sorted(alerts - fired)}"
    assert {"BackdoorGateRejectionRateHigh", "BackdoorGateProxyDown", "BackdoorGateUpstreamErrors",
            "BackdoorGateModelRejected", "BackdoorGateScanStale"} <= alerts
    # the verdict alerts are also seen resolving (quiet after having fired in the same test group)
    for alert in ("BackdoorGateModelRejected", "BackdoorGateFlaggedClasses", "BackdoorGateScanFailed"):
        assert any(any(a["alertname"] == alert and a["exp_alerts"] for a in t["alert_rule_test"])
                   and any(a["alertname"] == alert and not a["exp_alerts"] and _minutes(a["eval_time"]) >
                           min(_minutes(b["eval_time"]) for b in t["alert_rule_test"]
                               if b["alertname"] == alert and b["exp_alerts"]) for a in t["alert_rule_test"])
                   for t in tests if "alert_rule_test" in t), f"{alert} is never seen resolving"


def _minutes(duration: str) -> float:
    """A promtool duration (``1d30m``, ``169h``, ``20m``) in minutes."""
    units = {"d": 1440, "h": 60, "m": 1, "s": 1 / 60}
    parts = re.findall(r"(\d+)([dhms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_the_verdict_alerts_wait_and_the_scan_alerts_read_only_exported_metrics():
    """Every batch-job alert has a ``for``; every backdoor_gate_* name in their expressions and annotations is
    one that gate/metrics.py exports."""
    import yaml
    from prometheus_client import generate_latest

    from gate.decision import decide
    from gate.metrics import build_registry
    from gate.policy import Policy
    from tests.helpers import make_result

    rules = yaml.safe_load((POLICIES / "alerts.yml").read_text())
    scan = next(g for g in rules["groups"] if g["name"] == "backdoor-gate-scan")["rules"]
    result = make_result()
    text = generate_latest(build_registry(result, decide(result, Policy()), "m", info={"file": "m.onnx"})).decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for rule in scan:
        assert rule.get("for"), f"{rule['alert']} has no for"
        used = set(re.findall(r"backdoor_gate_[a-z_]+", rule["expr"] + json_text(rule["annotations"])))
        assert used and used <= exported, f"{rule['alert']} reads {sorted(used - exported)}, not exported"


def json_text(obj) -> str:
    import json

    return json.dumps(obj)


def test_batch_job_metric_names_match_the_gate_exporter():
    """The scan alerts read what gate/metrics.py exports (a failed run has the decision gauge only)."""
    from prometheus_client import generate_latest

    from gate.decision import Decision
    from gate.metrics import build_registry

    text = generate_latest(build_registry(None, Decision.error("boom"), "vendor-a", now=5.0)).decode()
    assert 'backdoor_gate_last_run_timestamp_seconds{model="vendor-a"} 5.0' in text
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
