"""B3D-SS: synthetic samples per class, and scans that use them."""

import json

import numpy as np
import pytest

from gate.cli import main
from gate.data import ImageSet
from gate.oracle import Oracle
from gate.synth import SynthConfig, synthesize
from tests.helpers import DEMO, demo_manifest

BACKDOORED = DEMO / "gtsrb_badnets3x3.onnx"
CLEAN = DEMO / "gtsrb_clean.onnx"


@pytest.fixture(scope="module")
def synthetic():
    oracle = Oracle(BACKDOORED, device="cpu")
    images, stats = synthesize(oracle, SynthConfig(per_class=2))
    return oracle, images, stats


def test_synthesis_reaches_most_classes(synthetic):
    oracle, images, stats = synthetic
    assert images.x.shape == (86, 32, 32, 3) and images.x.dtype == np.float32
    assert images.x.min() >= 0 and images.x.max() <= 1
    assert stats["success_rate"] >= 0.75
    labels = np.repeat(np.arange(43), 2)
    pred = oracle.predict(images.x)
    assert np.mean(pred == labels) >= 0.75  # the model really assigns them to their class
    assert sum(stats["assigned_per_class"]) <= 86
    assert len(stats["unreached_classes"]) <= 5
    assert stats["unreached_classes"] == [c for c in range(43) if stats["assigned_per_class"][c] == 0]


def test_synthesis_respects_its_query_budget():
    oracle = Oracle(BACKDOORED, device="cpu")
    q0 = oracle.queries
    _, stats = synthesize(oracle, SynthConfig(per_class=2), max_queries=5_000)
    assert oracle.queries - q0 <= 5_000 and stats["queries"] <= 5_000
    assert stats["stop_reason"] and "budget" in stats["stop_reason"]


def test_seed_images_are_starting_points():
    oracle = Oracle(BACKDOORED, device="cpu")
    seeds = ImageSet(np.full((3, 32, 32, 3), 0.5, np.float32), None, "grey")
    images, stats = synthesize(oracle, SynthConfig(per_class=1, max_steps=1), seed_images=seeds)
    assert stats["seeded"]
    assert np.abs(images.x - 0.5).max() <= SynthConfig().lr + 1e-6  # one step away from the seed at most


CLEAN_SS_FALSE_FLAG = pytest.mark.xfail(
    strict=True, reason="known limitation: on synthetic samples the clean demo's dominant class 12 (and 25) "
    "get triggers ~1/10 of the median (measured L1 20-23 vs 214-241 with 5-20 images per class and "
    "confidence 0.5 or 0.9), so B3D-SS flags them; the same model passes with real clean data")


@pytest.mark.parametrize("model, backdoored", [(BACKDOORED, True),
                                               pytest.param(CLEAN, False, marks=CLEAN_SS_FALSE_FLAG)])
def test_synthetic_scan(tmp_path, model, backdoored):
    code = main(["scan", str(model), "--synthetic", "--synthetic-per-class", "5", "--out", str(tmp_path),
                 "--quiet"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "b3d-ss"
    syn = report["synthesis"]
    assert syn["queries"] > 0 and report["queries"]["synthesis"] == syn["queries"]
    assert report["queries"]["total"] == report["queries"]["scan"] + syn["queries"]
    assert len(syn["success_per_class"]) == 43
    if backdoored:
        target = demo_manifest("gtsrb_badnets3x3")["triggers"][0]["target"]
        assert code == 1 and target in report["flagged"]
    else:
        assert code == 0 and report["flagged"] == []


def test_synth_command_writes_a_reusable_set(tmp_path):
    out = tmp_path / "syn.npz"
    assert main(["synth", str(BACKDOORED), "--out", str(out), "--per-class", "1", "--quiet"]) == 0
    with np.load(out) as z:
        assert z["x"].shape == (43, 32, 32, 3) and z["y"].tolist() == list(range(43))
    assert json.loads(out.with_suffix(".json").read_text())["images"] == 43
