"""Ray (gate.distributed, gate scan --ray): a local Ray cluster started here; the same per-class results as the
single-process scan, a killed worker's classes run again exactly once, the query budget split across parts."""

from __future__ import annotations

import doctest
import functools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import gate.distributed  # noqa: E402
from gate.cli import main  # noqa: E402
from gate.data import fit_to_model, load_images  # noqa: E402
from gate.distributed import RayOptions, ray_scan, run_part, split_budget, split_labels  # noqa: E402
from gate.errors import GateError, UsageError  # noqa: E402
from gate.oracle import Oracle  # noqa: E402
from gate.scan import ScanConfig, ScanEngine, scan  # noqa: E402
from gate.search import SearchParams  # noqa: E402
from tests.helpers import DEMO, linear_model  # noqa: E402

MODEL = DEMO / "gtsrb_badnets3x3.onnx"  # 43 classes
SAMPLE = DEMO / "gtsrb_sample.npz"
TINY = ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=4, max_steps=6), max_images=120, held_out=20)
TIMING = ("seconds",)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo():
    oracle = Oracle(MODEL, device="cpu", threads=1)
    return oracle, fit_to_model(load_images(SAMPLE), oracle.image_shape)


def comparable(out) -> tuple[dict, dict]:
    """(report without timings and totals, triggers) of a ScanOutput."""
    d = out.result.to_dict()
    for key in (*TIMING, "queries"):
        d.pop(key)
    for c in d["classes"]:
        c.pop("seconds")
    return d, {k: v for k, v in vars(out.triggers).items() if v is not None}


def assert_same_scan(a, b) -> None:
    (da, ta), (db, tb) = comparable(a), comparable(b)
    assert [c["l1"] for c in da["classes"]] == [c["l1"] for c in db["classes"]]  # bit-identical, not close
    assert da == db
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key])
    assert {k: [vars(r) for r in v] for k, v in a.examples.items()} == \
        {k: [vars(r) for r in v] for k, v in b.examples.items()}


def used_images(cfg: ScanConfig, images) -> int:
    return min(len(images), cfg.max_images)


# --------------------------------------------------------------------------- pure helpers
def test_doctests():
    assert doctest.testmod(gate.distributed).failed == 0


def test_budget_split_never_exceeds_the_total():
    for k in (2, 7, 43, 100):
        for parts in (1, 2, 3, 8, 200):
            labels = split_labels(k, parts)
            assert sorted(c for p in labels for c in p) == list(range(k))  # each class once
            for m in (1, 99, 10_007, 4_442_760):
                shares = split_budget(m, labels, k)
                assert sum(shares) <= m and sum(shares) > m - len(labels)


def test_labels_keep_each_class_search_of_the_whole_scan(demo):
    """ScanEngine(labels=...) alone: a subset's classes end as in the full scan (their random streams)."""
    oracle, images = demo
    full = ScanEngine(oracle, images, TINY)
    full.run_rounds()
    part = ScanEngine(oracle, images, TINY, labels=[29, 3, 40])
    part.run_rounds()
    assert part.labels == [3, 29, 40]
    whole = {o.result.label: o for o in full.outcomes()}
    for o in part.outcomes():
        assert replace(o.result, seconds=0) == replace(whole[o.result.label].result, seconds=0)
        np.testing.assert_array_equal(o.mask, whole[o.result.label].mask)
    with pytest.raises(GateError, match="every class"):
        ScanEngine(oracle, images, replace(TINY, screening=True), labels=[0, 1])
    with pytest.raises(GateError, match="subset"):
        ScanEngine(oracle, images, TINY, labels=[43])


# --------------------------------------------------------------------------- the scan on Ray
def test_ray_scan_is_the_local_scan(demo):
    oracle, images = demo
    local = scan(oracle, images, TINY, examples=2)
    spread = ray_scan(oracle, images, TINY, RayOptions(address="auto", parts=3), examples=2)
    assert_same_scan(local, spread)
    assert spread.result.flagged == local.result.flagged
    # per-class queries are the same; each part predicts the clean images itself
    assert [c.queries for c in spread.result.classes] == [c.queries for c in local.result.classes]
    assert spread.result.queries["total"] == local.result.queries["total"] + 2 * used_images(TINY, images)


def test_ray_scan_with_blend_is_the_local_scan(demo):
    oracle, images = demo
    cfg = replace(TINY, blend=True)
    assert_same_scan(scan(oracle, images, cfg), ray_scan(oracle, images, cfg, RayOptions(address="auto", parts=2)))


def test_a_longer_search_on_another_model_is_the_same(tmp_path):
    """tests.helpers.linear_model (6 classes, 8x8 images), 40 steps, 4 parts of 1-2 classes."""
    path = tmp_path / "lin.onnx"
    linear_model(path, size=8, classes=6, softmax=True, seed=3)
    oracle = Oracle(path, device="cpu", threads=1)
    rng = np.random.default_rng(0)
    images = fit_to_model(_images(rng, 200, 8), oracle.image_shape)
    cfg = replace(TINY, search=replace(TINY.search, max_steps=40), max_images=200, held_out=40)
    local = scan(oracle, images, cfg)
    spread = ray_scan(oracle, images, cfg, RayOptions(address="auto", parts=4))
    assert_same_scan(local, spread)


def _images(rng, n, size):
    from gate.data import ImageSet

    return ImageSet(rng.random((n, size, size, 3), dtype=np.float32), None, "random")


# what a task runs in test_a_killed_worker_*: the part holding class 0 dies on its first attempt (os._exit takes
# the worker process down, as a kill does: a system failure to Ray); every attempt is logged in ``folder``
def dying_part(folder, job, labels, max_queries):
    folder = Path(folder)
    with open(folder / f"attempts-{labels[0]}", "a") as f:
        f.write("x")
    if labels[0] == 0:
        try:
            fd = os.open(folder / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(1)
    return run_part(job, labels, max_queries)


def _with_markers(folder: Path):
    return functools.partial(dying_part, str(folder))


def test_a_killed_worker_is_retried_and_counted_once(demo, tmp_path):
    oracle, images = demo
    runner = _with_markers(tmp_path)
    local = scan(oracle, images, TINY)
    spread = ray_scan(oracle, images, TINY, RayOptions(address="auto", parts=3, retries=2), runner=runner)
    assert (tmp_path / "killed").exists()  # the first attempt of the part holding class 0 really died
    assert (tmp_path / "attempts-0").read_text() == "xx"  # it ran again, once
    assert (tmp_path / "attempts-1").read_text() == (tmp_path / "attempts-2").read_text() == "x"
    assert_same_scan(local, spread)  # every class, once, from the attempt that returned
    assert spread.result.queries["total"] == local.result.queries["total"] + 2 * used_images(TINY, images)


def test_a_worker_that_dies_beyond_its_retries_fails_closed(demo, tmp_path):
    oracle, images = demo
    with pytest.raises(GateError, match="Ray task was lost"):
        ray_scan(oracle, images, TINY, RayOptions(address="auto", parts=2, retries=0), runner=_with_markers(tmp_path))


def test_an_error_in_a_part_is_not_retried_and_names_the_cause(demo, tmp_path):
    oracle, images = demo
    with pytest.raises(GateError, match="too small"):  # QueryBudgetExceeded in the parts: predicting the images
        ray_scan(oracle, images, replace(TINY, max_queries=100), RayOptions(address="auto", parts=2))


def test_the_query_budget_holds_across_parts(demo):
    oracle, images = demo
    unlimited = ray_scan(oracle, images, TINY, RayOptions(address="auto", parts=3)).result.queries["total"]
    budget = unlimited // 2
    out = ray_scan(oracle, images, replace(TINY, max_queries=budget), RayOptions(address="auto", parts=3)).result
    assert not out.complete and "budget" in out.stop_reason
    assert out.queries["total"] <= budget
    assert len(out.classes) == 43  # every class reported, the cut ones as such
    assert {c.status for c in out.classes} & {"budget"}


# --------------------------------------------------------------------------- the command line
def cli(out: Path, *extra: str) -> list[str]:
    return ["scan", str(MODEL), "--data", str(SAMPLE), "--out", str(out), "--quiet", "--k", "8", "--batch-size",
            "2", "--eval-size", "4", "--max-steps", "6", "--max-images", "120", "--held-out", "20", *extra]


def test_gate_scan_ray_writes_the_local_report(tmp_path):
    assert main(cli(tmp_path / "local")) == main(cli(tmp_path / "ray", "--ray", "auto", "--ray-parts", "2"))
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("local", "ray"))
    assert [c["l1"] for c in a["classes"]] == [c["l1"] for c in b["classes"]]
    assert a["flagged"] == b["flagged"] and a["decision"]["outcome"] == b["decision"]["outcome"]
    assert (tmp_path / "ray" / "exit_code").read_text() == (tmp_path / "local" / "exit_code").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--ray", "auto", "--screening"], "--screening"),
    (["--ray", "auto", "--bandit"], "bandit"),
    (["--ray", "auto", "--resume"], "--resume"),
    (["--ray-parts", "2"], "only with --ray"),
    (["--ray", "auto", "--ray-parts", "0"], "at least 1"),
    (["--ray", "auto", "--ray-retries", "-1"], "0 or more"),
])
def test_what_ray_cannot_do_is_a_usage_error(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    if "--resume" in extra:  # a checkpoint to resume, so the refusal is --ray's
        out.mkdir()
        (out / "checkpoint.json").write_text("{}")
    assert main(cli(out, *extra)) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "report.json").exists()  # refused before the folder is claimed


def test_without_ray_installed_ray_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(cli(tmp_path / "out", "--ray", "auto")) == 4
    assert "pip install 'backdoor-gate[ray]'" in capsys.readouterr().err


def test_usage_error_helper_raises():
    with pytest.raises(UsageError):
        RayOptions(parts=0).check()


def test_an_address_nothing_listens_on_is_an_error_at_once(tmp_path, capsys):
    """Ray would retry the connection for minutes; the gate says so in one line (exit 2) straight away."""
    import socket
    import time

    ray.shutdown()  # the test's own cluster would otherwise be used
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # free once closed: nothing listens there
        t0 = time.perf_counter()
        assert main(cli(tmp_path / "out", "--ray", f"127.0.0.1:{port}")) == 2
        assert time.perf_counter() - t0 < 30
        said = capsys.readouterr()
        assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in said.out + said.err
        assert json.loads((tmp_path / "out" / "report.json").read_text())["decision"]["outcome"] == "error"
        assert main(cli(tmp_path / "out2", "--ray", "nowhere")) == 4
    finally:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def test_sigterm_during_a_ray_scan_fails_closed(tmp_path):
    """ray.init installs a SIGTERM handler that exits 1 (a reject's code) leaving OUT 'running'; the gate's own
    handler is put back, so a terminated Ray scan ends as an error (exit 2) with Ray shut down."""
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = cli(out, "--ray", "local", "--no-cache")
    args[args.index("--max-steps") + 1] = "400"
    proc = subprocess.Popen([sys.executable, "-m", "gate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "outcome").is_file():  # the run has claimed OUT
        time.sleep(0.2)
    time.sleep(6)  # Ray starting or its tasks running: the end must be the same
    assert proc.poll() is None, proc.communicate()
    proc.terminate()
    said, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert (out / "outcome").read_text() == "error\n" and (out / "exit_code").read_text() == "2\n"
    assert "interrupted" in said + err
