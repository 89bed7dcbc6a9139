"""Fixtures shared across test modules."""

import pytest

from gate.cli import main
from tests.helpers import DEMO


@pytest.fixture(scope="session")
def demo_scan(tmp_path_factory):
    """(exit code, output folder) of one real default `gate scan` of the backdoored demo model."""
    out = tmp_path_factory.mktemp("demo_scan")
    code = main(["scan", str(DEMO / "gtsrb_badnets3x3.onnx"), "--data", str(DEMO / "gtsrb_sample.npz"),
                 "--out", str(out), "--quiet"])
    return code, out


@pytest.fixture(autouse=True)
def no_verdict_cache(monkeypatch):
    """Every test scans for real (and keeps nothing in ~/.cache) unless it names a --cache-dir itself:
    tests/test_cache.py does."""
    monkeypatch.setenv("BACKDOOR_GATE_CACHE", "off")
