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
