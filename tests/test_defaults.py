"""Safe defaults: the built-in default policy, no demo data unless asked for, synthetic samples only when
asked for, relative policy paths, the clean-accuracy rule, and gate inspect's input-convention check."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import yaml

from gate.cli import main
from gate.decision import RULE_LOW_ACCURACY, decide
from gate.policy import Policy, builtin_policy, load_policy
from tests.helpers import DEMO, DEMO_MODEL, ROOT, fake_synthesis, linear_model, make_result, pooled_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
QUIET_RULES = {"outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
               "rules": {"small_trigger": None, "weak_search": None}}  # the clean-accuracy rule stays on


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model, images it classifies as labelled (its own predictions: accuracy 100 %) and the same
    images with random labels (accuracy near chance)."""
    from gate.oracle import Oracle

    d = tmp_path_factory.mktemp("defaults")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    x = (rng.random((120, 8, 8, 3)) * 255).astype(np.uint8)
    own = Oracle(d / "tiny.onnx", device="cpu").predict(x.astype(np.float32) / 255)
    np.savez(d / "own.npz", x=x, y=own)
    np.savez(d / "random.npz", x=x, y=(own + 1 + rng.integers(0, 4, 120)) % 5)  # never the model's answer
    return d


def gate_run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# --------------------------------------------------------------------------- the built-in policy
def test_the_built_in_policy_is_the_shipped_file_and_the_code_defaults():
    packaged = (files("gate") / "policies" / "default.yaml").read_bytes()
    assert (ROOT / "policies" / "default.yaml").read_bytes() == packaged, "policies/default.yaml drifted"
    built_in = builtin_policy()
    assert built_in.name == "default" and built_in.source == "built-in:default"
    assert built_in == load_policy(ROOT / "policies" / "default.yaml")
    assert built_in.to_dict() | {"name": None} == Policy().to_dict() | {"name": None}
    assert built_in.data.path is None and built_in.data.source == "file", "the default policy names no data"
    assert "gtsrb" not in packaged.decode(), "no demo data named anywhere in the default policy"


def test_gate_run_works_without_a_policy(assets, tmp_path, capsys):
    code, stdout, _ = gate_run(capsys, "run", assets / "tiny.onnx", "--data", assets / "own.npz", "--out",
                               tmp_path / "o", *FAST)
    doc = report(tmp_path / "o")
    assert code == doc["decision"]["exit_code"] and stdout.count("\n") == 1
    assert doc["policy"]["name"] == "default" and doc["decision"]["policy_file"] is None
    assert doc["method"] == "b3d" and doc["data"]["source"] == str(assets / "own.npz")


def test_no_data_is_a_usage_error_before_anything_runs(assets, tmp_path, capsys):
    code, stdout, err = gate_run(capsys, "run", assets / "tiny.onnx", "--out", tmp_path / "o", *FAST)
    assert code == 4 and stdout == ""
    assert "no clean data given: pass --data FILE|DIR" in err and "--synthetic" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists(), "a usage error found before the run writes nothing"
    pol = tmp_path / "file.yaml"  # the same from a policy that asks for a file but names none
    pol.write_text("data:\n  source: file\n")
    code, _, err = gate_run(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", *FAST)
    assert code == 4 and "no clean data given" in err


def test_synthetic_samples_only_when_asked_for(assets, tmp_path, capsys, monkeypatch):
    calls = fake_synthesis(monkeypatch)
    code, _, err = gate_run(capsys, "run", assets / "tiny.onnx", "--synthetic", "--synthetic-per-class", "20",
                            "--out", tmp_path / "o", *FAST)
    doc = report(tmp_path / "o")
    assert calls == [20] and doc["method"] == "b3d-ss" and "fallback" not in doc["data"]
    assert "No clean data was scanned" not in err, "asked for: no fallback note"


def test_an_auto_fallback_is_stated_in_every_output(assets, tmp_path, capsys, monkeypatch):
    calls = fake_synthesis(monkeypatch)
    pol = tmp_path / "auto.yaml"
    pol.write_text(yaml.safe_dump({**QUIET_RULES, "data": {"source": "auto", "path": "missing.npz",
                                                           "synthetic_per_class": 20}}))
    code, stdout, err = gate_run(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o",
                                 *FAST)
    doc = report(tmp_path / "o")
    assert calls == [20] and doc["method"] == "b3d-ss"
    why = doc["data"]["fallback"]
    assert f"data {tmp_path / 'missing.npz'} not found" in why and "synthetic samples (B3D-SS)" in why
    assert any(why in n for n in doc["decision"]["notes"])
    assert "No clean data was scanned" in (tmp_path / "o" / "report.html").read_text()
    assert "gate: note: No clean data was scanned" in err  # even with --quiet


def test_relative_paths_in_a_policy_are_the_policy_files(assets, tmp_path, capsys, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clean.npz").write_bytes((assets / "own.npz").read_bytes())
    pol = tmp_path / "policies" / "p.yaml"
    pol.write_text(yaml.safe_dump({**QUIET_RULES, "data": {"path": "../data/clean.npz"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where ../data/clean.npz does not exist
    code, _, _ = gate_run(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--out", tmp_path / "o", *FAST)
    doc = report(tmp_path / "o")
    assert doc.get("error") is None, doc.get("error")
    assert doc["method"] == "b3d" and doc["data"]["source"] == str(tmp_path / "data" / "clean.npz")
    assert load_policy(Path("../policies/p.yaml")).data.path == "../data/clean.npz"  # relative stays relative


# --------------------------------------------------------------------------- the clean-accuracy rule
@pytest.mark.parametrize("accuracy,method,fires", [
    (0.97, "b3d", False), (0.5, "b3d", False), (0.49, "b3d", True), (0.05, "b3d", True),
    (None, "b3d", False),  # no labels: nothing to measure
    (0.05, "b3d-ss", False),  # B3D-SS's labels are the classes it synthesised for, not ground truth
])
def test_min_clean_accuracy(accuracy, method, fires):
    result = make_result([40.0, 47.0, 36.0, 44.0, 41.0])
    result.method = method
    result.data["clean_accuracy"] = accuracy
    d = decide(result, Policy())
    low = [f for f in d.findings if f.rule == RULE_LOW_ACCURACY]
    assert bool(low) == fires
    if fires:
        assert d.outcome == "review" and d.exit_code == 3
        assert f"clean accuracy {accuracy:.1%}" in low[0].message and "gate inspect" in low[0].message
        strict = load_policy(ROOT / "policies" / "strict.yaml")
        assert decide(result, strict).outcome == "reject"
    else:
        assert d.outcome == "accept"
    assert decide(result, Policy().override({"rules.min_clean_accuracy": None})).outcome == "accept"


def test_low_accuracy_quotes_what_the_convention_check_measured():
    result = make_result([40.0, 47.0, 36.0, 44.0, 41.0])
    result.data["clean_accuracy"] = 0.3
    result.data["convention"] = {"images": 100, "fits": {"NCHW [0,1]": 0.31, "NCHW [0,255]": 0.42}}
    low = [f for f in decide(result, Policy()).findings if f.rule == RULE_LOW_ACCURACY]
    assert "measured 2 conventions on 100 of the images, the best NCHW [0,255] at 42%" in low[0].message


def test_the_rule_on_a_real_run(assets, tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(QUIET_RULES))
    code, stdout, _ = gate_run(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--data", assets / "own.npz",
                               "--out", tmp_path / "own", *FAST)
    assert code == 0 and report(tmp_path / "own")["data"]["clean_accuracy"] == 1.0
    code, stdout, _ = gate_run(capsys, "run", assets / "tiny.onnx", "--policy", pol, "--data",
                               assets / "random.npz", "--out", tmp_path / "random", *FAST)
    doc = report(tmp_path / "random")
    assert code == 3 and doc["data"]["clean_accuracy"] == 0.0
    assert stdout.startswith("REVIEW: clean accuracy 0.0%") and "below 50%" in stdout
    assert [f["rule"] for f in doc["decision"]["findings"]] == ["BG006"]


# --------------------------------------------------------------------------- gate inspect's conventions
def test_inspect_finds_the_convention_the_labels_were_made_with(tmp_path, capsys):
    """Labels made by the model under [0,255] inputs: inspect, run under the default [0,1], says [0,255] fits."""
    from gate.oracle import Oracle
    from gate.spec import SpecOverrides

    linear_model(tmp_path / "m.onnx", layout="NHWC", size=6, classes=4, seed=1)
    rng = np.random.default_rng(2)
    x = (rng.random((200, 6, 6, 3)) * 255).astype(np.uint8)
    y = Oracle(tmp_path / "m.onnx", SpecOverrides(value_range=255.0), device="cpu").predict(x / 255.0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert main(["inspect", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    best = next(c for c in info["conventions"] if c["best"])
    in_use = next(c for c in info["conventions"] if c["in_use"])
    assert (best["layout"], best["value_range"], best["mean"], best["accuracy"]) == ("NHWC", 255.0, None, 1.0)
    assert in_use["value_range"] == 1.0 and in_use["accuracy"] == info["data"]["clean_accuracy"] < 0.9
    assert "--input-range 255" in info["convention_warning"]
    assert {c["name"] for c in info["conventions"]} >= {"[0,1]", "[0,255]", "ImageNet mean/std on [0,1]"}
    nchw = [c for c in info["conventions"] if c["layout"] == "NCHW"]
    assert nchw and all(c["accuracy"] is None and c["note"] for c in nchw)  # 6x6x3 read as NCHW: 6 channels

    assert main(["inspect", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--input-range",
                 "255"]) == 0
    text = capsys.readouterr().out
    assert "<- in use, best" in text and "warning" not in text


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo models not built yet")
def test_inspect_on_the_demo_names_imagenet_normalisation_as_the_wrong_one(capsys):
    assert main(["inspect", str(DEMO_MODEL), "--data", str(DEMO / "gtsrb_sample.npz"), "--mean",
                 "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"NCHW \[0,1\]\s+\d+\.\d%  <- best", text)
    assert re.search(r"NCHW ImageNet mean/std on \[0,1\]\s+\d+\.\d%  <- in use", text)
    assert "warning: the input convention in use gives" in text and "and no --mean/--std" in text



# --------------------------------------------------------------------------- a model with a dynamic image size
def test_a_dynamic_size_model_is_inspected_and_run_at_the_stated_size(tmp_path, capsys):
    """[N, h, w, 3]: refused (exit 2, one line naming --image-size) until the size is stated, on the command
    line or in the policy; then inspected and run at that size, and the report says so."""
    from gate.oracle import Oracle
    from gate.spec import SpecOverrides

    pooled_model(tmp_path / "dyn.onnx", layout="NHWC", classes=4, seed=2)
    x = (np.random.default_rng(5).random((150, 8, 6, 3)) * 255).astype(np.uint8)
    y = Oracle(tmp_path / "dyn.onnx", SpecOverrides(size=(8, 6)), device="cpu").predict(x / 255.0)
    np.savez(tmp_path / "d.npz", x=x, y=y)

    code, _, err = gate_run(capsys, "inspect", tmp_path / "dyn.onnx", "--data", tmp_path / "d.npz")
    assert code == 2 and "--image-size" in err and len(err.strip().splitlines()) == 1

    code, out, _ = gate_run(capsys, "inspect", tmp_path / "dyn.onnx", "--data", tmp_path / "d.npz",
                            "--image-size", "8x6")
    assert code == 0 and "layout NHWC, 8x6x3" in out
    assert re.search(r"NHWC \[0,1\]\s+100\.0%  <- in use, best", out)

    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump({"version": 1, "input": {"size": [8, 6]}, **QUIET_RULES}))
    code, _, _ = gate_run(capsys, "run", tmp_path / "dyn.onnx", "--data", tmp_path / "d.npz", "--policy", pol,
                          "--out", tmp_path / "o", *FAST)
    doc = report(tmp_path / "o")
    assert code == 0 and doc["decision"]["outcome"] == "accept"
    assert (doc["input_spec"]["height"], doc["input_spec"]["width"]) == (8, 6)
    assert doc["policy"]["input"]["size"] == [8, 6]
