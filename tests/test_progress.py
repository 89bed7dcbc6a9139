"""Progress on stderr (gate/progress.py): the live bar on a terminal, timestamped heartbeat lines elsewhere, an
ETA that is an upper bound, and a broken stderr that never ends a run."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from gate.progress import ClassFinished, Message, Progress, RoundFinished, ScanCounters, ScanFinished, ScanStarted
from tests.helpers import ROOT, linear_model

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def _class(label, step, l1=10.0):
    return ClassFinished(label, step, 1.0, l1, 100, "converged")


def test_the_eta_is_every_running_class_to_max_steps_at_the_rate_so_far():
    c = ScanCounters(classes=4, max_steps=100, now=0.0)
    assert c.eta(0.0) is None  # nothing done yet: no rate
    c.finished, c.finished_steps, c.step = 1, 10, 10  # one class stopped at step 10; three at step 10
    # 40 class-steps in 20 s = 2/s; 3 classes x 90 steps left = 270 class-steps -> 135 s at most
    assert c.eta(20.0) == pytest.approx(135.0)
    c.queries = 5000
    assert c.rate(20.0) == pytest.approx(250.0)
    c.finished = 4
    assert c.eta(30.0) == 0.0


def test_without_a_terminal_lines_are_timestamped_and_a_heartbeat_keeps_coming():
    stream = io.StringIO()
    with Progress(stream=stream, live=False, heartbeat=0.05) as p:
        p.emit(Message("synthesising 4 images for each of 3 classes (B3D-SS)"))
        time.sleep(0.2)  # synthesis sends no event: the heartbeat still speaks
        p.emit(ScanStarted(3, 50))
        p.emit(RoundFinished(5, 1200, None))
        p.emit(_class(1, 5))
        time.sleep(0.2)
        p.emit(ScanFinished([1], "reject"))
    lines = stream.getvalue().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    beats = [line for line in lines if "heartbeat:" in line]
    assert any("synthesising 4 images" in b for b in beats), "a heartbeat during synthesis says what runs"
    scan_beats = [b for b in beats if "classes done" in b]
    assert scan_beats and "1/3 classes done, step 5/50, 1,200 queries" in scan_beats[-1]
    assert "ETA at most" in scan_beats[-1] and "/s)" in scan_beats[-1]
    assert any("class   1  step    5" in line for line in lines)
    n = len(lines)
    time.sleep(0.15)
    assert len(stream.getvalue().splitlines()) == n, "closed: no heartbeat after the run"


def test_no_heartbeat_with_zero():
    stream = io.StringIO()
    with Progress(stream=stream, live=False, heartbeat=0) as p:
        p.emit(ScanStarted(2, 10))
        time.sleep(0.1)
    assert "heartbeat" not in stream.getvalue()


def test_on_a_terminal_a_live_bar_with_classes_queries_per_second_and_eta():
    stream = io.StringIO()
    with Progress(stream=stream, live=True) as p:
        p.emit(ScanStarted(3, 50))
        p.emit(_class(0, 4))
        time.sleep(0.01)
        p.emit(RoundFinished(6, 2400, ClassFinished(2, 6, 0.5, 3.5, 0, "running")))
        screen = stream.getvalue()
        p.emit(ScanFinished([], "accept"))
    assert "classes 1/3" in screen and "2,400 queries" in screen and "/s)" in screen
    assert "ETA at most" in screen and "smallest running: class 2 L1 3.5" in screen
    assert "class   0  step    4" in screen  # the finished class is a line above the bar
    assert not STAMP.match(screen), "no timestamps on a terminal"


class Broken(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stream_silences_progress_and_never_raises():
    for live in (False, True):
        p = Progress(stream=Broken(), live=live, heartbeat=0.01)
        p.emit(ScanStarted(2, 10))
        p.emit(_class(0, 3))
        p.emit(RoundFinished(4, 100, None))
        p.emit(ScanFinished([], "accept"))
        p.close()
        assert not p.enabled


def test_a_run_whose_stderr_reader_went_away_still_finishes_with_its_verdict(tmp_path):
    """The child's stderr is a pipe whose read end is closed at once: every progress line meets a broken pipe.
    The run must still write its reports and exit with the decision's code, not die on the first line."""
    linear_model(tmp_path / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8),
             y=rng.integers(0, 5, 120))
    (tmp_path / "p.yaml").write_text(json.dumps({"outliers": {"anomaly_threshold": 1e6, "median_ratio": 0.0},
                                                 "rules": {"small_trigger": None, "weak_search": None,
                                                           "min_clean_accuracy": None}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gate", "run", str(tmp_path / "tiny.onnx"), "--data", str(tmp_path / "data.npz"),
         "--policy", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out"), "--k", "6", "--batch-size", "4",
         "--max-steps", "15", "--max-images", "100", "--progress-every", "0.01"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin",
                                                                        "BACKDOOR_GATE_CACHE": "off"})
    proc.stderr.close()
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert stdout.decode().startswith("ACCEPT:")
    assert (tmp_path / "out" / "outcome").read_text() == "accept\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["decision"]["outcome"] == "accept"


def test_progress_every_must_not_be_negative(tmp_path, capsys):
    from gate.cli import main

    code = main(["run", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"),
                 "--progress-every", "-1"])
    assert code == 4 and "--progress-every must be 0 or more seconds" in capsys.readouterr().err
