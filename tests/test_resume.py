"""Checkpoint and resume: a run killed at any point continues with --resume to the uninterrupted report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gate.cli import main
from tests.helpers import DEMO, ROOT

MODEL = str(DEMO / "gtsrb_badnets3x3.onnx")
ARGS = ["--policy", "policies/default.yaml", "--data", str(DEMO / "gtsrb_sample.npz"), "--max-steps", "20",
        "--max-images", "120", "--examples", "0", "--checkpoint-every", "0", "--quiet"]


def _report(out) -> dict:
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in ("seconds", "generated")}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    return strip(json.loads((out / "report.json").read_text()))


def _kill_at(out, step: int, sig=signal.SIGKILL) -> int:
    """Start ``gate run``, kill it once its checkpoint has reached ``step``; the checkpoint's step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gate", "run", MODEL, "--out", str(out), *ARGS], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                saved = json.loads((out / "checkpoint.json").read_text())["engine"]["step"]
            except (OSError, ValueError, KeyError):
                saved = -1
            if saved >= step:
                proc.send_signal(sig)
                proc.wait(60)
                return saved
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail(f"the run ended (exit {proc.returncode}) before its checkpoint reached step {step}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    code = main(["run", MODEL, "--out", str(out), *ARGS])
    assert not (out / "checkpoint.json").exists(), "a finished run removes its checkpoint"
    return code, _report(out)


@pytest.mark.slow
@pytest.mark.parametrize("step,sig", [(1, signal.SIGKILL), (7, signal.SIGKILL), (14, signal.SIGTERM)])
def test_a_run_killed_at_any_point_resumes_to_the_same_report(step, sig, uninterrupted, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, whole = uninterrupted
    out = tmp_path / "out"
    saved = _kill_at(out, step, sig)
    stopped = json.loads((out / "report.json").read_text())
    assert stopped["decision"]["outcome"] in ("running", "error")  # never the verdict of a finished run
    assert saved >= step
    assert main(["run", MODEL, "--out", str(out), "--resume", *ARGS]) == code
    assert _report(out) == whole
    assert not (out / "checkpoint.json").exists()


def test_resume_refuses_another_policy_and_needs_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main(["run", MODEL, "--out", str(out), "--resume", *ARGS]) == 4  # nothing to continue: usage error
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    _kill_at(out, 1)
    capsys.readouterr()
    code = main(["run", MODEL, "--out", str(out), "--resume", *ARGS, "--max-steps", "21"])
    assert code == 2
    assert "was made with another policy" in capsys.readouterr().out
    assert (out / "checkpoint.json").exists()  # kept: the right command can still resume it


def test_b3d_ss_resumes_with_its_synthetic_images_and_the_same_result(tmp_path, monkeypatch):
    """In-process: stop a B3D-SS scan after 3 rounds; the resumed run reuses the saved synthetic images
    (no second synthesis) and ends with the result of the uninterrupted run."""
    from gate import pipeline
    from gate.checkpoint import Checkpoint
    from gate.oracle import Oracle
    from gate.policy import Policy
    from gate.scan import ScanEngine
    from tests.helpers import linear_model

    linear_model(tmp_path / "m.onnx", size=8, classes=4, seed=2)
    policy = Policy().override({"data.source": "synthetic", "data.synthetic_per_class": 4, "search.max_steps": 8,
                                "search.k": 8, "search.batch_size": 2, "search.eval_size": 4, "synthesis.max_steps": 3})

    def strip(result):
        d = result.to_dict()
        d.pop("seconds")
        for c in d["classes"]:
            c.pop("seconds")
        d["synthesis"].pop("seconds", None)
        return d

    whole = pipeline.run_gate(Oracle(tmp_path / "m.onnx", device="cpu"), policy)

    real_run = ScanEngine.run

    def stop_after_3(self, after_round=None):
        def hook(engine):
            after_round(engine)
            if engine.step == 3:
                raise KeyboardInterrupt("test stop")
        return real_run(self, hook)

    monkeypatch.setattr(ScanEngine, "run", stop_after_3)
    ck = Checkpoint(tmp_path / "out", every=0)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_gate(Oracle(tmp_path / "m.onnx", device="cpu"), policy, checkpoint=ck)
    monkeypatch.setattr(ScanEngine, "run", real_run)
    monkeypatch.setattr(pipeline, "synthesize_data", lambda *a: pytest.fail("synthesised again on resume"))
    resumed = pipeline.run_gate(Oracle(tmp_path / "m.onnx", device="cpu"), policy, checkpoint=ck, resume=True)
    assert strip(resumed.result) == strip(whole.result)
    assert resumed.decision == whole.decision
    assert not any((tmp_path / "out").iterdir())  # a finished run removes its checkpoint files
