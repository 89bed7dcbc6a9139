"""The verdict cache (gate/cache.py, gate/commands/verdict_cache.py): a second run of the same model, data,
policy, tool and seed answers from it without a query; anything else, or a broken entry, scans again.

"Without a query" is checked by making the oracle impossible to open: a run that answers from the cache never
opens the model. Scans use the tiny hand-built model and tiny search settings (about a second each); the
"< 2 s" check uses the shipped demo model through the CLI with a cheap search.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import gate.cache
import gate.commands.run
from gate.cli import main
from tests.helpers import DEMO, DEMO_MODEL, linear_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
ACCEPTING = {"name": "lenient", "outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
             "rules": {"small_trigger": None, "weak_search": None, "min_clean_accuracy": None}}
# any reversed trigger with a measured attack success and a mask under the whole image rejects
REJECTING = {"name": "harsh", "outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
             "rules": {"weak_search": None, "min_clean_accuracy": None,
                       "small_trigger": {"min_asr": 0.0, "max_mask_fraction": 1.0}}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8), y=rng.integers(0, 5, 120))
    for name, doc in (("accept.yaml", ACCEPTING), ("reject.yaml", REJECTING)):
        (d / name).write_text(yaml.safe_dump(doc))
    return d


class Opened:
    """Counts how often a run opened the model (a run that answers from the cache must not)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real = gate.commands.run.open_oracle

        def counting(*a, **k):
            self.count += 1
            return real(*a, **k)

        monkeypatch.setattr(gate.commands.run, "open_oracle", counting)


def run(capsys, model, out, cache, *extra, data=None, policy=None) -> tuple[int, str, str]:
    args = ["run", str(model), "--out", str(out), "--cache-dir", str(cache), *map(str, extra)]
    if data is not None:
        args += ["--data", str(data)]
    if policy is not None:
        args += ["--policy", str(policy)]
    code = main(args)
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else []


# --------------------------------------------------------------------------- the hit
def test_a_second_run_of_the_demo_answers_from_the_cache_in_under_2_s(tmp_path, capsys, monkeypatch):
    opened = Opened(monkeypatch)
    cheap = ["--k", "6", "--batch-size", "4", "--max-steps", "6", "--max-images", "100", "--quiet"]
    cache = tmp_path / "cache"
    code1, stdout1, _ = run(capsys, DEMO_MODEL, tmp_path / "first", cache, *cheap, data=DEMO / "gtsrb_sample.npz")
    assert opened.count == 1 and len(entries(cache)) == 1
    first = report(tmp_path / "first")
    assert first["decision"]["cache"]["status"] == "miss" and first["decision"]["cache"]["stored"] is True

    t0 = time.perf_counter()
    code2, stdout2, stderr2 = run(capsys, DEMO_MODEL, tmp_path / "second", cache, *cheap,
                                  data=DEMO / "gtsrb_sample.npz")
    seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"a cached run took {seconds:.2f} s"
    assert opened.count == 1, "the cached run opened the model"
    assert code2 == code1 == first["decision"]["exit_code"]
    assert "from the cache: 0 queries now" in stdout2 and stdout2.count("\n") == 1
    assert "Answered from the verdict cache" in stderr2  # printed even with --quiet

    second = report(tmp_path / "second")
    record = second["decision"].pop("cache")
    assert record["status"] == "hit" and record["queries"] == 0 and record["key"] == first["decision"]["cache"]["key"]
    assert record["scan_queries"] == first["queries"]["total"] > 0
    notes = second["decision"].pop("notes")
    assert len(notes) == 1 and "this run sent no query" in notes[0]
    first["decision"].pop("cache")
    assert second == first, "the cached report is the scan's report, with the cache record beside it"

    out = tmp_path / "second"  # a complete OUT folder
    assert {"report.json", "report.html", "report.sarif", "junit.xml", "triggers.npz", "metrics.prom",
            "attestation.json", "exit_code", "outcome"} <= {p.name for p in out.iterdir()}
    assert (out / "exit_code").read_text() == f"{code1}\n"
    assert (out / "outcome").read_text() == (tmp_path / "first" / "outcome").read_text()
    html = (out / "report.html").read_text()
    assert "Answered from the verdict cache" in html
    assert html.count("data:image/png;base64,") == (tmp_path / "first" / "report.html").read_text().count(
        "data:image/png;base64,"), "the stamped examples come back from the cache too"
    a1, a2 = (json.loads((d / "attestation.json").read_text())["predicate"] for d in (tmp_path / "first", out))
    assert a2["decision"] == a1["decision"] and a2["classes"] == a1["classes"]
    assert a2["cache"]["status"] == "hit" and a1["cache"]["status"] == "miss"
    with np.load(out / "triggers.npz") as t2, np.load(tmp_path / "first" / "triggers.npz") as t1:
        assert np.array_equal(t1["masks"], t2["masks"]) and np.array_equal(t1["patterns"], t2["patterns"])


def test_the_verdict_is_decided_again_not_read_back(assets, tmp_path, capsys, monkeypatch):
    """A hit re-applies the policy to the cached result: an entry whose stored decision was tampered with
    cannot make it say anything else (the decision is not even stored)."""
    cache = tmp_path / "cache"
    code, _, _ = run(capsys, assets / "tiny.onnx", tmp_path / "a", cache, *FAST, data=assets / "data.npz",
                     policy=assets / "accept.yaml")
    assert code == 0
    stored = json.loads((entries(cache)[0] / "result.json").read_text())
    assert "decision" not in stored


# --------------------------------------------------------------------------- misses
def _changed_policy(d: Path) -> dict:
    return {"policy": d / "reject.yaml"}


def _changed_seed(d: Path) -> dict:
    return {"extra": ["--seed", "7"]}


def _changed_data(d: Path) -> dict:
    """One byte of one pixel, in the same file (the policy, which names the path, is unchanged)."""
    with np.load(d / "data.npz") as z:
        x, y = z["x"].copy(), z["y"]
    x[0, 0, 0, 0] ^= 1
    np.savez(d / "data.npz", x=x, y=y)
    return {}


def _changed_model(d: Path) -> dict:
    raw = bytearray((d / "tiny.onnx").read_bytes())
    raw[-1] ^= 1  # the last byte: a bias's low bits, still a valid model
    (d / "tiny.onnx").write_bytes(bytes(raw))
    return {}


def _changed_tool(d: Path) -> dict:
    return {"tool": True}


@pytest.mark.parametrize("change", [_changed_policy, _changed_seed, _changed_data, _changed_model, _changed_tool],
                         ids=["policy", "seed", "data", "model", "tool"])
def test_any_change_is_a_miss_and_a_real_scan(assets, tmp_path, capsys, monkeypatch, change):
    d = tmp_path / "in"  # a copy of the inputs, so that they can be changed in place
    d.mkdir()
    for name in ("tiny.onnx", "data.npz", "accept.yaml", "reject.yaml"):
        (d / name).write_bytes((assets / name).read_bytes())
    cache = tmp_path / "cache"
    code, _, _ = run(capsys, d / "tiny.onnx", tmp_path / "a", cache, *FAST, data=d / "data.npz",
                     policy=d / "accept.yaml")
    assert code == 0 and len(entries(cache)) == 1
    how = change(d)
    if how.get("tool"):
        real = gate.cache.tool_fingerprint()
        monkeypatch.setattr(gate.cache, "tool_fingerprint", lambda: {**real, "version": real["version"] + ".1"})
    opened = Opened(monkeypatch)
    code, _, _ = run(capsys, d / "tiny.onnx", tmp_path / "b", cache, *FAST, *how.get("extra", []),
                     data=d / "data.npz", policy=how.get("policy", d / "accept.yaml"))
    assert opened.count == 1, "a changed input must be scanned, not answered from the cache"
    doc = report(tmp_path / "b")
    assert doc["decision"]["cache"]["status"] == "miss" and doc["decision"]["cache"]["stored"] is True
    assert len(entries(cache)) == 2
    if change is _changed_policy:  # no stale accept: the harsher policy's own verdict
        assert code == 1 and doc["decision"]["outcome"] == "reject"
    opened.count = 0  # and without the change it still answers from the first entry
    if not how:
        return  # the first inputs are gone (changed in place)
    monkeypatch.undo()
    monkeypatch.setenv("BACKDOOR_GATE_CACHE", "off")
    opened = Opened(monkeypatch)
    run(capsys, d / "tiny.onnx", tmp_path / "c", cache, *FAST, data=d / "data.npz", policy=d / "accept.yaml")
    assert opened.count == 0 and report(tmp_path / "c")["decision"]["cache"]["status"] == "hit"


def test_no_cache_neither_reads_nor_writes(assets, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    run(capsys, assets / "tiny.onnx", tmp_path / "a", cache, *FAST, data=assets / "data.npz",
        policy=assets / "accept.yaml")
    opened = Opened(monkeypatch)
    (entries(cache)[0]).rename(cache / "kept-aside")  # what --no-cache must not write again
    run(capsys, assets / "tiny.onnx", tmp_path / "b", cache, *FAST, "--no-cache", data=assets / "data.npz",
        policy=assets / "accept.yaml")
    assert opened.count == 1 and entries(cache) == [cache / "kept-aside"]
    assert report(tmp_path / "b")["decision"]["cache"] == {"status": "off", "why": "--no-cache"}


# --------------------------------------------------------------------------- broken entries
def _truncate_result(entry: Path) -> None:
    text = (entry / "result.json").read_text()
    (entry / "result.json").write_text(text[: len(text) // 2])


def _drop_triggers(entry: Path) -> None:
    (entry / "triggers.npz").unlink()


def _edit_result_consistently(entry: Path) -> None:
    """A result edited by hand, with entry.json's hash updated to match: it names another model's sha256, so it
    is not this model's scan."""
    doc = json.loads((entry / "result.json").read_text())
    doc["model"]["sha256"] = "0" * 64
    (entry / "result.json").write_text(json.dumps(doc))
    meta = json.loads((entry / "entry.json").read_text())
    meta["files"]["result.json"] = gate.cache.file_sha256(entry / "result.json")
    (entry / "entry.json").write_text(json.dumps(meta))


def _partial_entry(entry: Path) -> None:
    (entry / "entry.json").write_text('{"format": 1, "key": ')


def _other_key(entry: Path) -> None:
    meta = json.loads((entry / "entry.json").read_text())
    meta["key"]["seed"] = 123
    (entry / "entry.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate_result, _drop_triggers, _edit_result_consistently, _partial_entry,
                                    _other_key], ids=["truncated", "missing-file", "edited", "partial", "other-key"])
def test_a_broken_entry_is_ignored_with_a_warning_and_replaced(assets, tmp_path, capsys, monkeypatch, damage):
    cache = tmp_path / "cache"
    run(capsys, assets / "tiny.onnx", tmp_path / "a", cache, *FAST, data=assets / "data.npz",
        policy=assets / "reject.yaml")
    reference = report(tmp_path / "a")
    damage(entries(cache)[0])
    opened = Opened(monkeypatch)
    code, _, stderr = run(capsys, assets / "tiny.onnx", tmp_path / "b", cache, *FAST, data=assets / "data.npz",
                          policy=assets / "reject.yaml")
    assert opened.count == 1, "a broken entry is no verdict: the model is scanned"
    assert "gate: warning: cache entry" in stderr and "ignored" in stderr and stderr.count("\n") >= 1
    untimed = [[{k: v for k, v in c.items() if k != "seconds"} for c in doc["classes"]]
               for doc in (report(tmp_path / "b"), reference)]
    assert code == 1 and untimed[0] == untimed[1], "the rescan gives the scan's own result"
    code, _, _ = run(capsys, assets / "tiny.onnx", tmp_path / "c", cache, *FAST, data=assets / "data.npz",
                     policy=assets / "reject.yaml")
    assert opened.count == 1 and code == 1, "the entry was written again and answers now"
    assert report(tmp_path / "c")["decision"]["cache"]["status"] == "hit"


# --------------------------------------------------------------------------- what is kept, and where
def test_a_scan_a_time_budget_may_have_cut_is_not_kept(assets, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, _, _ = run(capsys, assets / "tiny.onnx", tmp_path / "a", cache, *FAST, "--max-seconds", "0.000001",
                     data=assets / "data.npz", policy=assets / "accept.yaml")
    doc = report(tmp_path / "a")
    assert code == 3 and doc["complete"] is False and "time budget" in doc["stop_reason"]
    assert entries(cache) == [] and doc["decision"]["cache"]["stored"] is False


def test_the_default_place_is_the_xdg_cache_folder(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BACKDOOR_GATE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code = main(["run", str(assets / "tiny.onnx"), "--out", str(tmp_path / "a"), "--data", str(assets / "data.npz"),
                 "--policy", str(assets / "accept.yaml"), *FAST])
    assert code == 0 and len(entries(tmp_path / "xdg" / "backdoor-gate")) == 1
    assert report(tmp_path / "a")["decision"]["cache"]["entry"].startswith(str(tmp_path / "xdg" / "backdoor-gate"))


def test_a_cache_dir_that_is_a_file_is_a_usage_error(assets, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, stdout, _ = run(capsys, assets / "tiny.onnx", tmp_path / "a", tmp_path / "file", *FAST,
                          data=assets / "data.npz", policy=assets / "accept.yaml")
    assert code == 4 and stdout == ""
