"""Fail closed: interrupted runs, stale reports, reports the proxy must refuse, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from gate.cli import build_parser, main
from tests.helpers import DEMO, ROOT, linear_model

# no rule can fire and nothing is flagged: an accept once the scan completes
LENIENT = {"outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
           "rules": {"small_trigger": None, "weak_search": None, "min_clean_accuracy": None}}
FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fail_closed")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8), y=rng.integers(0, 5, 120))
    (d / "lenient.yaml").write_text(yaml.safe_dump(LENIENT))
    return d


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _accepted(tiny: Path, out: Path, capsys) -> None:
    """An earlier run's accept in ``out``: what must never survive a later run that fails."""
    assert main(["run", str(tiny / "tiny.onnx"), "--policy", str(tiny / "lenient.yaml"), "--out", str(out),
                 "--data", str(tiny / "data.npz"), *FAST]) == 0
    capsys.readouterr()
    assert _report(out)["decision"]["outcome"] == "accept"


def _metric(out: Path, outcome: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families((out / "metrics.prom").read_text()):
        for s in fam.samples:
            if s.name == "backdoor_gate_decision" and s.labels.get("outcome") == outcome:
                return s.value
    raise AssertionError(f"no decision metric for {outcome}")


def _sigint_default() -> None:
    """In the child: SIGINT back to its default, so Python installs its KeyboardInterrupt handler. A test run
    started in the background by a non-interactive shell (``make test &``) inherits SIGINT ignored, and an
    ignored SIGINT stays ignored across exec: the scan would run on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_fail_closed_reports_not_the_earlier_accept(tiny, tmp_path, capsys, sig):
    out = tmp_path / "out"
    _accepted(tiny, out, capsys)
    # the demo model's default scan takes minutes: interrupt it once it has started
    proc = subprocess.Popen([sys.executable, "-m", "gate.cli", "run", str(DEMO / "gtsrb_badnets3x3.onnx"),
                             "--policy", str(ROOT / "policies" / "default.yaml"), "--out", str(out),
                             "--data", str(DEMO / "gtsrb_sample.npz")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stderr.readline()
            if line.startswith("class ") or "scanning" in line:
                break
        assert _report(out)["decision"]["outcome"] == "running", "the earlier accept is gone as the run starts"
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert stdout.startswith("ERROR: scan failed: interrupted") and stdout.count("\n") == 1
    doc = _report(out)
    assert doc["decision"]["outcome"] == "error" and "interrupted" in doc["error"]
    assert {"report.html", "report.sarif", "junit.xml", "metrics.prom"} <= {p.name for p in out.iterdir()}
    assert not (out / "triggers.npz").exists()
    assert _metric(out, "error") == 1 and _metric(out, "accept") == 0


@pytest.mark.slow
def test_a_killed_run_leaves_running_not_the_earlier_accept(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    _accepted(tiny, out, capsys)
    proc = subprocess.Popen([sys.executable, "-m", "gate.cli", "run", str(DEMO / "gtsrb_badnets3x3.onnx"),
                             "--policy", str(ROOT / "policies" / "default.yaml"), "--out", str(out),
                             "--data", str(DEMO / "gtsrb_sample.npz")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while "scanning" not in proc.stderr.readline():
            pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    doc = _report(out)
    assert doc["decision"]["outcome"] == "running" and doc["decision"]["exit_code"] is None
    assert not (out / "report.html").exists() and not (out / "junit.xml").exists()
    assert _metric(out, "running") == 1 and _metric(out, "accept") == 0 and _metric(out, "error") == 0


def test_out_naming_a_file_is_refused_before_any_query(tiny, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    code = main(["scan", str(tiny / "tiny.onnx"), "--data", str(tiny / "data.npz"), "--out", str(target), *FAST])
    out, err = capsys.readouterr()
    assert code == 2 and "is a file, not a folder" in out + err
    assert target.read_text() == "not a folder"


def test_an_internal_error_is_one_line_without_traceback_unless_debug(tiny, tmp_path, capsys, monkeypatch):
    import gate.pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(gate.pipeline, "decide", boom)
    args = ["run", str(tiny / "tiny.onnx"), "--policy", str(tiny / "lenient.yaml"), "--out", str(tmp_path / "o"),
            "--data", str(tiny / "data.npz"), *FAST]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "internal error: RuntimeError: simulated bug" in out and "Traceback" not in err
    assert main(["--debug", *args]) == 2
    assert "Traceback" in capsys.readouterr().err


def _scan_report(tmp_path: Path, model_file: Path, changes: dict | None = None) -> Path:
    from gate.oracle import file_sha256
    from gate.result import Triggers

    d = tmp_path / "scan"
    d.mkdir(exist_ok=True)
    doc = {"schema_version": "1.0", "model": {"path": str(model_file), "sha256": file_sha256(model_file)},
           "flagged": [],
           "complete": True, "decision": {"outcome": "accept", "exit_code": 0}}
    for key, value in (changes or {}).items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    (d / "report.json").write_text(json.dumps(doc))
    Triggers(np.arange(5), np.zeros((5, 8, 8), np.float32), np.zeros((5, 8, 8, 3), np.float32),
             np.zeros(5, bool)).save(d / "triggers.npz")
    return d / "report.json"


@pytest.mark.parametrize("changes,why", [
    ({"complete": False}, "its scan is incomplete"),
    ({"decision": {"outcome": "review", "exit_code": 3}}, "its decision is 'review'"),
    ({"decision": {"outcome": "error", "exit_code": 2}}, "its decision is 'error'"),
    ({"decision": {"outcome": "running", "exit_code": None}}, "its decision is 'running'"),
    ({"model": {"path": "m.onnx"}}, "it names no model sha256"),
    ({"decision": None, "complete": None}, "its scan is incomplete"),
])
def test_the_proxy_refuses_reports_that_cannot_vouch_for_the_model(tiny, tmp_path, changes, why):
    from gate.commands.proxy import build
    from gate.errors import GateError

    report = _scan_report(tmp_path, tiny / "tiny.onnx", changes)
    args = build_parser().parse_args(["proxy", "--model", str(tiny / "tiny.onnx"), "--report", str(report)])
    with pytest.raises(GateError, match="cannot vouch for this model: " + why):
        build(args)
    args = build_parser().parse_args(["proxy", "--model", str(tiny / "tiny.onnx"), "--report", str(report),
                                      "--allow-unverified-report"])
    _, message = build(args)  # explicitly allowed: it starts (and said so loudly on stderr)
    assert "flags no class" in message


def test_the_proxy_takes_a_complete_accepted_report(tiny, tmp_path):
    from gate.commands.proxy import build

    report = _scan_report(tmp_path, tiny / "tiny.onnx")
    _, message = build(build_parser().parse_args(["proxy", "--model", str(tiny / "tiny.onnx"),
                                                  "--report", str(report)]))
    assert "the shield is off" in message


def _pooled_model(path: Path, size: int, classes: int) -> None:
    """NCHW (N, 3, size, size) -> mean over pixels -> (N, 3) x W -> softmax: tiny weights, any input size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32), "W")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "AX")
    nodes = [helper.make_node("ReduceMean", ["input", "AX"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["output"], axis=1)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", 3, size, size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])], [w, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_scan_too_big_for_the_memory_is_refused_before_any_query(tmp_path, capsys, monkeypatch):
    import gate.scan

    _pooled_model(tmp_path / "big.onnx", 512, 4)
    np.savez(tmp_path / "d.npz", x=np.zeros((12, 512, 512, 3), np.uint8))
    monkeypatch.setattr(gate.scan, "available_memory", lambda: 8 * 2**30)
    code = main(["scan", str(tmp_path / "big.onnx"), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"),
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 2 and "GiB of buffers for 4 classes of 512x512x3 images but 8.0 GiB are available" in out
    assert _report(tmp_path / "o")["decision"]["outcome"] == "error"


def test_a_one_class_model_is_refused(tmp_path, capsys):
    _pooled_model(tmp_path / "one.onnx", 8, 1)
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 8, 8, 3), np.uint8))
    code = main(["scan", str(tmp_path / "one.onnx"), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"),
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 2 and "a backdoor scan needs at least 2 classes" in out and out.count("\n") == 1


def test_a_constant_output_model_is_never_accepted_and_says_why(tmp_path, capsys):
    """Whatever the input, the model says the same: no search gets a signal; review, with the reason."""
    from onnx import numpy_helper

    path = tmp_path / "const.onnx"
    linear_model(path, size=8, classes=5, seed=1)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        value = np.zeros((8 * 8 * 3, 5), np.float32) if init.name == "W" else np.array([0, 0, 5, 0, 0], np.float32)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(model, str(path))
    np.savez(tmp_path / "d.npz", x=(np.random.default_rng(0).random((60, 8, 8, 3)) * 255).astype(np.uint8))
    code = main(["scan", str(path), "--data", str(tmp_path / "d.npz"), "--max-steps", "10", "--out",
                 str(tmp_path / "o"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 3 and out.startswith("REVIEW: search inconclusive: 4 of 5 classes found no working trigger")
    assert "did not move however the trigger varied" in out and "1000000000" not in out


def test_a_directory_as_the_model_says_so(tmp_path, capsys):
    (tmp_path / "model.onnx").mkdir()
    code = main(["scan", str(tmp_path / "model.onnx"), "--synthetic", "--out", str(tmp_path / "o"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 2 and "model path is a directory, not an ONNX file" in out and out.count("\n") == 1
    assert json.loads((tmp_path / "o" / "report.json").read_text())["decision"]["outcome"] == "error"


@pytest.mark.parametrize("write,message", [
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((20, 8, 8, 3), np.uint8)), "is a single .npy array"),
    (lambda p: np.savez(p, x=np.array([object()] * 20, dtype=object)), "cannot read"),
    (lambda p: np.savez(p, x=np.zeros((20, 8, 8, 3), np.uint8), y=np.full(20, -1)), "labels must be 0 or more"),
    (lambda p: np.savez(p, x=np.zeros((20, 8, 8, 3), np.uint8), y=np.full(20, 0.5)), "labels must be integers"),
    (lambda p: np.savez(p, x=np.zeros((20, 8, 8, 3), np.uint8), y=np.full(20, 9)), "labels go up to 9"),
    (lambda p: np.savez(p, x=np.zeros((5, 8, 8, 3), np.uint8)), "need at least 10"),
])
def test_bad_data_files_are_one_line_errors(tiny, tmp_path, capsys, write, message):
    path = tmp_path / "d.npz"
    write(path)
    data = path if path.exists() else path.with_suffix(".npy")
    code = main(["scan", str(tiny / "tiny.onnx"), "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and message in out and out.count("\n") == 1 and "Traceback" not in err
