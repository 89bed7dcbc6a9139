"""B3D-SS: synthetic samples per class, and scans that use them."""

import json

import numpy as np
import pytest

from gate.cli import main
from gate.data import ImageSet
from gate.oracle import Oracle
from gate.shield import shielded_classes
from gate.synth import SynthConfig, occlude_pairs, synthesize, upsample_matrix
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


@pytest.mark.parametrize("size, grid", [(32, 4), (32, 8), (28, 5), (7, 7)])
def test_upsample_matrix_interpolates(size, grid):
    m = upsample_matrix(size, grid)
    assert m.shape == (size, grid) and np.all(m >= 0)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # a constant grid stays constant
    if size == grid:
        np.testing.assert_allclose(m, np.eye(size))
    else:  # a linear ramp on the grid stays a monotone ramp in the image
        ramp = m @ np.arange(grid, dtype=np.float32)
        assert np.all(np.diff(ramp) >= -1e-6) and ramp[0] == 0 and ramp[-1] == grid - 1


def _grid_residual(x: np.ndarray, grid: int) -> float:
    """How far images are from the span of bilinearly upsampled grid x grid images."""
    up = upsample_matrix(x.shape[1], grid)
    fit = np.linalg.pinv(up)
    z = np.einsum("hH,nHWc,wW->nhwc", fit, x, fit)
    return float(np.abs(np.einsum("Hh,nhwc,Ww->nHWc", up, z, up) - x).max())


def test_grid_synthesis_makes_smooth_images_and_every_pixel_does_not(synthetic):
    _, images, stats = synthetic
    assert stats["config"]["grid"] == 4
    assert _grid_residual(images.x, 4) < 1e-4  # default: a 4x4 grid upsampled
    oracle = Oracle(BACKDOORED, device="cpu")
    pixels, stats = synthesize(oracle, SynthConfig(per_class=1, max_steps=2, grid=None))
    assert stats["config"]["grid"] is None and pixels.x.shape == (43, 32, 32, 3)
    assert _grid_residual(pixels.x, 4) > 0.1  # uniform noise per pixel


def test_grid_search_on_seed_images_keeps_their_detail():
    oracle = Oracle(BACKDOORED, device="cpu")
    with np.load(DEMO / "gtsrb_sample.npz") as z:
        seeds = ImageSet(z["x"][:4].astype(np.float32) / 255, None, "demo sample")
    images, _ = synthesize(oracle, SynthConfig(per_class=1, max_steps=3, grid=4), seed_images=seeds)
    starts = [np.argmin([np.abs(img - s).mean() for s in seeds.x]) for img in images.x]
    change = images.x - seeds.x[starts]
    assert np.abs(change).max() <= 3 * SynthConfig().lr + 1e-6  # three grid steps away from a seed at most
    assert np.abs(change).max() > 0  # and they did move
    assert _grid_residual(images.x, 4) > 0.1  # the seeds' fine detail is still there


def test_occlusion_puts_the_same_patch_on_both_probes_of_a_pair():
    rng = np.random.default_rng(0)
    x = rng.random((6, 12, 12, 3), dtype=np.float32)
    d = np.zeros((6, 9, 12, 12, 3), np.float32)
    d[:, 1:5] = rng.standard_normal((6, 4, 12, 12, 3))
    d[:, 5:] = -d[:, 1:5]
    before = d.copy()
    occlude_pairs(d, x, 5, 0.1, rng)
    probes = x[:, None] + 0.1 * d
    changed = (d != before).any(axis=-1)
    assert not changed[:, 0].any()  # the image row is never occluded
    sides = set()
    for i in range(6):
        for j in range(1, 5):
            patch = changed[i, j]
            assert (patch == changed[i, j + 4]).all()  # same place in both probes of the pair
            rows, cols = np.flatnonzero(patch.any(axis=1)), np.flatnonzero(patch.any(axis=0))
            assert patch.sum() == len(rows) * len(cols) and len(rows) == len(cols) <= 5  # a square
            sides.add(len(rows))
            colour = probes[i, j][patch]
            np.testing.assert_allclose(colour, colour[0:1].repeat(len(colour), 0), atol=1e-5)  # one colour
            np.testing.assert_allclose(probes[i, j + 4][patch], colour, atol=1e-5)
    assert len(sides) > 1  # sides vary
    # a side larger than the image is drawn as at most the image's side: sides 1-4 uniform on 4x4 images,
    # so about a quarter of the patches cover the whole image (drawing 1-9 would make it two thirds)
    small = np.zeros((50, 5, 4, 4, 3), np.float32)
    occlude_pairs(small, rng.random((50, 4, 4, 3), dtype=np.float32), 9, 0.1, rng)
    area = (small[:, 1:3] != 0).any(axis=-1).sum(axis=(2, 3))
    assert set(np.unique(area)) == {1, 4, 9, 16} and np.mean(area == 16) < 0.45


def test_gate_synthesis_is_harder_to_flip_than_the_paper_recipe():
    """The point of grid + occlusion + robust stop: synthetic images a random patch rarely flips."""
    oracle = Oracle(CLEAN, device="cpu")
    flips = {}
    for name, cfg in (("gate", SynthConfig(per_class=2)), ("paper", SynthConfig.paper(per_class=2))):
        images, stats = synthesize(oracle, cfg)
        assert stats["success_rate"] >= 0.9, name
        x = images.x.copy()
        rng = np.random.default_rng(1)
        for img in x:
            r, c = rng.integers(0, 25, 2)
            img[r:r + 8, c:c + 8] = rng.random(3)
        flips[name] = np.mean(oracle.predict(x) != oracle.predict(images.x))
    assert flips["gate"] < 0.5 * flips["paper"], flips


def test_paper_preset():
    p = SynthConfig.paper(per_class=3)
    assert (p.grid, p.occlusion, p.robust_stop, p.confidence, p.per_class) == (None, 0, False, 0.5, 3)
    with pytest.raises(ValueError, match="occlusion"):
        SynthConfig(occlusion=-1)


def test_grid_larger_than_the_image_is_a_clear_error(tmp_path, capsys):
    code = main(["synth", str(BACKDOORED), "--out", str(tmp_path / "s.npz"), "--grid", "64", "--quiet"])
    assert code == 2 and "grid 64 is larger than the model's 32x32 images" in capsys.readouterr().err
    assert main(["synth", str(BACKDOORED), "--out", str(tmp_path / "s.npz"), "--grid", "-1"]) == 4


@pytest.mark.parametrize("model, backdoored", [(BACKDOORED, True), (CLEAN, False)])
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
        # With 5 synthetic images per class the L1 spread is wide: the outlier rule may leave the target at a
        # p-value of 0.15 (seen on two CPU kinds) while BG003 convicts it; either way the reject names the
        # target and the proxy shields it.
        assert code == 1 and target in shielded_classes(report), report["decision"]["reasons"]
    else:
        assert code == 0 and report["flagged"] == []


def test_synth_command_writes_a_reusable_set(tmp_path):
    out = tmp_path / "syn.npz"
    assert main(["synth", str(BACKDOORED), "--out", str(out), "--per-class", "1", "--quiet"]) == 0
    with np.load(out) as z:
        assert z["x"].shape == (43, 32, 32, 3) and z["y"].tolist() == list(range(43))
    assert json.loads(out.with_suffix(".json").read_text())["images"] == 43
