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


@pytest.fixture(autouse=True, scope="session")
def no_verdict_cache():
    """Every test scans for real (and keeps nothing in ~/.cache) unless it names a --cache-dir itself:
    tests/test_cache.py does. Session-scoped, so module- and session-scoped fixtures that run the gate
    (tests/test_resume.py's uninterrupted run) see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOOR_GATE_CACHE", "off")
        yield
