"""``gate run-many``: one gate run folder per model and a summary whose exit code is 0 only when every model is
accepted; a manifest; no folder keeps an earlier accept while the run goes on; on a local Ray cluster the same
reports as one after another here, a killed worker retried, SIGTERM ending every model fail-closed.

Scans use tiny search settings on tiny hand-built models (about a second each); outcomes are steered through
per-model policies (as in test_run_cli), so each model's verdict is known before the run.
"""

from __future__ import annotations

import doctest
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import gate.commands.run_many
import gate.pipeline
from gate.cli import main
from tests.helpers import DEMO, linear_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet", "--no-cache"]
NO_FLAGS = {"outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
            "rules": {"small_trigger": None, "weak_search": None, "min_clean_accuracy": None}}
ANY_TRIGGER = {**NO_FLAGS, "rules": {"weak_search": None, "min_clean_accuracy": None,
                                     "small_trigger": {"min_asr": 0.0, "max_mask_fraction": 1.0}}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    for i in range(3):
        linear_model(d / f"m{i}.onnx", size=8, classes=5, seed=3 + i)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8), y=rng.integers(0, 5, 120))
    np.savez(d / "data_16px.npz", x=np.zeros((50, 16, 16, 3), np.uint8))  # fits no model here
    (d / "accept.yaml").write_text(yaml.safe_dump({"name": "lenient", **NO_FLAGS}))
    (d / "reject.yaml").write_text(yaml.safe_dump(ANY_TRIGGER))
    return d


def manifest(path: Path, entries) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def outcome(folder: Path) -> str:
    return (folder / "outcome").read_text().strip()


def test_doctests():
    assert doctest.testmod(gate.commands.run_many).failed == 0


def test_every_model_accepted_is_exit_0(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run-many", str(assets / "m0.onnx"), str(assets / "m1.onnx"), "--data", str(assets / "data.npz"),
                 "--policy", str(assets / "accept.yaml"), "--out", str(out), *FAST])
    assert code == 0
    doc = summary(out)
    assert doc["outcome"] == "accept" and doc["exit_code"] == 0 and doc["counts"] == {"accept": 2}
    assert [r["name"] for r in doc["models"]] == ["m0", "m1"]
    for name in ("m0", "m1"):  # each folder is what gate run writes
        assert outcome(out / name) == "accept" and (out / name / "exit_code").read_text() == "0\n"
        assert {"report.json", "report.html", "report.sarif", "junit.xml", "metrics.prom",
                "attestation.json"} <= {p.name for p in (out / name).iterdir()}
    assert outcome(out) == "accept" and (out / "exit_code").read_text() == "0\n"
    said = capsys.readouterr().out
    assert "| m0 | accept | 0 |" in said and "| m1 | accept | 0 |" in said
    assert (out / "summary.md").read_text().startswith("# gate run-many: accept (exit 0)")


def test_a_folder_is_what_gate_run_writes(assets, tmp_path):
    many, alone = tmp_path / "many", tmp_path / "alone"
    common = ["--data", str(assets / "data.npz"), "--policy", str(assets / "reject.yaml"), *FAST]
    assert main(["run-many", str(assets / "m2.onnx"), "--out", str(many), *common]) == 1
    assert main(["run", str(assets / "m2.onnx"), "--out", str(alone), *common]) == 1
    a, b = (json.loads((d / "report.json").read_text()) for d in (many / "m2", alone))
    assert [c["l1"] for c in a["classes"]] == [c["l1"] for c in b["classes"]]
    assert a["decision"] == b["decision"]


def test_a_manifest_mixes_policies_and_data_and_a_reject_decides(assets, tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path / "fleet.yaml", [
        {"model": str(assets / "m0.onnx"), "name": "vendor-a", "policy": str(assets / "accept.yaml")},
        {"model": str(assets / "m1.onnx"), "name": "vendor-b", "policy": str(assets / "reject.yaml"),
         "model_name": "vendor-b/classifier"},
        {"model": str(assets / "m2.onnx"), "name": "vendor-c", "data": str(assets / "data_16px.npz")},
    ])
    code = main(["run-many", "--manifest", str(m), "--data", str(assets / "data.npz"), "--policy",
                 str(assets / "accept.yaml"), "--out", str(out), *FAST])
    doc = summary(out)
    by_name = {r["name"]: r for r in doc["models"]}
    assert by_name["vendor-a"]["outcome"] == "accept"
    assert by_name["vendor-b"]["outcome"] == "reject"
    assert by_name["vendor-c"]["outcome"] == "error"  # its own data does not fit it: fail closed, the rest go on
    assert "16" in by_name["vendor-c"]["reason"]
    assert code == 1 and doc["outcome"] == "reject"  # a finding is what the pipeline acts on first
    assert 'model="vendor-b/classifier"' in (out / "vendor-b" / "metrics.prom").read_text()


def test_an_error_and_no_reject_is_exit_2(assets, tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path / "fleet.yaml", [str(assets / "m0.onnx"),
                                           {"model": str(assets / "m1.onnx"), "data": str(assets / "data_16px.npz")}])
    assert main(["run-many", "--manifest", str(m), "--data", str(assets / "data.npz"), "--policy",
                 str(assets / "accept.yaml"), "--out", str(out), *FAST]) == 2
    assert [r["outcome"] for r in summary(out)["models"]] == ["accept", "error"]
    assert outcome(out) == "error"


def test_one_models_usage_error_is_its_row_and_stderr_line_and_the_rest_go_on(assets, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "labels.txt").write_text("one\ntwo\n")  # 2 names for a 5-class model
    m = manifest(tmp_path / "fleet.yaml", [str(assets / "m0.onnx"),
                                           {"model": str(assets / "m1.onnx"), "labels": str(tmp_path / "labels.txt")}])
    code = main(["run-many", "--manifest", str(m), "--data", str(assets / "data.npz"), "--policy",
                 str(assets / "accept.yaml"), "--out", str(out), *FAST])
    assert code == 2 and [r["outcome"] for r in summary(out)["models"]] == ["accept", "usage"]
    captured = capsys.readouterr()
    assert "gate: m1: usage error:" in captured.err and "usage error" not in captured.out.split("|")[0]
    row = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| m1 |")]
    assert len(row) == 1 and "usage error:" in row[0] and "report.html" not in row[0]
    assert not (out / "m1" / "report.html").exists()
    report = json.loads((out / "m1" / "report.json").read_text())  # claimed "running" first, then why not judged
    assert report["decision"]["outcome"] == "error" and "2 class names" in report["decision"]["reasons"][0]
    assert 'outcome="running"} 1' not in (out / "m1" / "metrics.prom").read_text()
    assert outcome(out / "m1") == "usage"


def test_no_folder_keeps_an_earlier_accept_while_the_run_goes_on(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["run-many", str(assets / "m0.onnx"), str(assets / "m1.onnx"), "--data", str(assets / "data.npz"),
            "--policy", str(assets / "accept.yaml"), "--out", str(out), *FAST]
    assert main(args) == 0  # both folders say accept now
    seen = []
    real = gate.pipeline.run_gate

    def watching(oracle, policy, **kw):  # what the other folders and the summary say while a model scans
        seen.append((outcome(out / "m0"), outcome(out / "m1"), outcome(out),
                     (out / "m1" / "exit_code").exists(), (out / "exit_code").exists()))
        return real(oracle, policy, **kw)

    monkeypatch.setattr(gate.pipeline, "run_gate", watching)
    assert main(args) == 0
    assert seen[0] == ("running", "running", "running", False, False)
    assert seen[1] == ("accept", "running", "running", False, False)


@pytest.mark.parametrize("entries, message", [
    ([{"model": "m0.onnx", "colour": "red"}], "unknown key 'colour'"),
    (["m0.onnx", "m0.onnx"], "share the output folder m0"),
    ([{"model": "m0.onnx", "name": "../up"}], "cannot be its output folder's name"),
    ([{"model": "m0.onnx", "data": "data.npz", "synthetic": True}], "exclude each other"),
    ([{"model": "nowhere.onnx"}], "model"),
    ([{"model": "m0.onnx", "labels": "none.txt"}], "labels"),
    ([], "expected a list"),
])
def test_a_bad_manifest_is_a_usage_error_before_anything_runs(assets, tmp_path, capsys, entries, message):
    m = assets / f"bad-{abs(hash(message))}.yaml"  # relative paths: from the manifest's folder
    manifest(m, entries)
    out = tmp_path / "out"
    assert main(["run-many", "--manifest", str(m), "--data", str(assets / "data.npz"), "--out", str(out),
                 *FAST]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage error" in err
    assert not out.exists()  # nothing claimed, nothing scanned


def test_no_model_and_ray_flags_without_ray_are_usage_errors(assets, tmp_path, capsys):
    assert main(["run-many", "--out", str(tmp_path / "o"), *FAST]) == 4
    assert "no model" in capsys.readouterr().err
    assert main(["run-many", str(assets / "m0.onnx"), "--data", str(assets / "data.npz"), "--out",
                 str(tmp_path / "o"), "--ray-cpus", "2", *FAST]) == 4
    assert "only with --ray" in capsys.readouterr().err


def test_a_model_that_never_ran_is_not_answered_from_the_cache(assets, tmp_path, capsys):
    """Ray unreachable: no model is judged, so none may end as an earlier run's cached accept."""
    pytest.importorskip("ray")
    args = ["run-many", str(assets / "m0.onnx"), "--data", str(assets / "data.npz"), "--policy",
            str(assets / "accept.yaml"), "--cache-dir", str(tmp_path / "cache"),
            *[f for f in FAST if f != "--no-cache"]]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0  # scanned and cached
    assert main([*args, "--out", str(tmp_path / "again")]) == 0  # answered from the cache: it does hold the verdict
    assert json.loads((tmp_path / "again" / "m0" / "report.json").read_text())["decision"]["cache"]["status"] == "hit"
    port = 9  # discard: nothing listens there
    assert main([*args, "--out", str(tmp_path / "out"), "--ray", f"127.0.0.1:{port}"]) == 2
    assert outcome(tmp_path / "out" / "m0") == "error" and outcome(tmp_path / "out") == "error"
    assert "cannot reach the Ray cluster" in summary(tmp_path / "out")["models"][0]["reason"]


def _run_many_cli(out: Path, models: list[Path], data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gate", "run-many", *map(str, models), "--data", str(data), "--out", str(out),
            "--k", "6", "--batch-size", "4", "--max-images", "100", "--quiet", "--no-cache", *extra]


def _terminate_once_running(proc: subprocess.Popen, out: Path) -> tuple[str, str]:
    deadline = time.time() + 90
    while time.time() < deadline and not (out / "m0" / "outcome").is_file():
        time.sleep(0.2)
    time.sleep(5)  # the first model scanning (or Ray starting): the end must be the same
    assert proc.poll() is None, proc.communicate()
    proc.terminate()
    return proc.communicate(timeout=90)


def test_sigterm_ends_the_running_model_and_the_rest_fail_closed(assets, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_run_many_cli(out, [assets / "m0.onnx", assets / "m1.onnx"], assets / "data.npz",
                                          "--max-steps", "100000", "--patience", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said, err = _terminate_once_running(proc, out)
    assert proc.returncode == 2, err
    rows = summary(out)["models"]
    assert [r["outcome"] for r in rows] == ["error", "error"]
    assert "interrupted (SIGTERM)" in rows[0]["reason"] and "stopped before m1" in rows[1]["reason"]
    assert outcome(out / "m1") == "error" and outcome(out) == "error"


# --------------------------------------------------------------------------- on a local Ray cluster
@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_on_ray_the_same_reports_as_here(assets, tmp_path, cluster):
    here, there = tmp_path / "here", tmp_path / "ray"
    m = manifest(tmp_path / "fleet.yaml", [
        {"model": str(assets / "m0.onnx"), "policy": str(assets / "accept.yaml")},
        {"model": str(assets / "m1.onnx"), "policy": str(assets / "reject.yaml")},
        {"model": str(DEMO / "gtsrb_badnets3x3.onnx"), "name": "demo", "data": str(DEMO / "gtsrb_sample.npz")},
    ])
    common = ["run-many", "--manifest", str(m), "--data", str(assets / "data.npz"), *FAST]
    on_ray = ["--out", str(there), "--ray", "auto", "--ray-cpus", "1"]  # --ray-cpus is run-many's, not the models'
    assert main([*common, "--out", str(here)]) == main([*common, *on_ray]) == 1
    for name in ("m0", "m1", "demo"):
        a, b = (json.loads((d / name / "report.json").read_text()) for d in (here, there))
        assert [c["l1"] for c in a["classes"]] == [c["l1"] for c in b["classes"]]  # bit-identical
        assert a["decision"] == b["decision"] and a["queries"]["total"] == b["queries"]["total"]
        assert a["flagged"] == b["flagged"]
    assert [r["outcome"] for r in summary(there)["models"]] == [r["outcome"] for r in summary(here)["models"]]


def dying_model(folder, job):
    """The first attempt at the model's task dies as a killed worker does (os._exit)."""
    from gate.fleet import run_model

    folder = Path(folder)
    with open(folder / "attempts", "a") as f:
        f.write("x")
    try:
        fd = os.open(folder / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return run_model(job)
    os.close(fd)
    os._exit(1)


def test_a_killed_worker_is_retried_and_its_model_counted_once(assets, tmp_path, cluster):
    from dataclasses import replace

    from gate.distributed import RayOptions
    from gate.fleet import RayModels
    from gate.oracle import Oracle
    from gate.policy import load_policy

    oracle = Oracle(assets / "m1.onnx", device="cpu", threads=1)
    policy = load_policy(assets / "reject.yaml")
    policy = replace(policy, data=replace(policy.data, source="file", path=str(assets / "data.npz"), max_images=100),
                     search=replace(policy.search, k=6, batch_size=4, max_steps=15))
    local = gate.pipeline.run_gate(oracle, policy)
    models = RayModels(RayOptions(address="auto", retries=2), runner=functools.partial(dying_model, str(tmp_path)))
    try:
        spread = models.scan(oracle, policy)
    finally:
        models.close()
    assert (tmp_path / "killed").exists() and (tmp_path / "attempts").read_text() == "xx"  # died, ran again once
    assert [c.l1 for c in spread.result.classes] == [c.l1 for c in local.result.classes]
    assert spread.result.queries["total"] == local.result.queries["total"]  # the attempt that returned, only
    assert spread.decision == local.decision


def test_sigterm_during_run_many_on_ray_ends_every_model_fail_closed(assets, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    proc = subprocess.Popen(_run_many_cli(out, [assets / "m0.onnx", assets / "m1.onnx", assets / "m2.onnx"],
                                          assets / "data.npz", "--max-steps", "100000", "--patience", "100000",
                                          "--ray", "local"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said, err = _terminate_once_running(proc, out)
    assert proc.returncode == 2, err
    rows = summary(out)["models"]
    assert [r["outcome"] for r in rows] == ["error"] * 3
    assert all("interrupted" in r["reason"] for r in rows), rows
    assert all(outcome(out / f"m{i}") == "error" for i in range(3)) and outcome(out) == "error"
