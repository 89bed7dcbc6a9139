"""The coarse search grid (gate.grid, ``search.grid_cells``): inputs above 32x32 are searched on at most 32x32 cells;
every L1 stays in pixels; a 32x32 input is searched exactly as before; a planted corner backdoor in a 64x64 model is
found on the grid, its trigger in the corner, and the reported trigger is the grid trigger upsampled."""

from __future__ import annotations

import doctest
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gate.grid
from gate.data import ImageSet
from gate.grid import Grid, cell_size
from gate.kernels import stamp
from gate.oracle import Oracle
from gate.scan import ScanConfig, ScanEngine, scan
from gate.search import SearchParams, TriggerSearch
from tests.helpers import patch_backdoor_model

TARGET = 3


def test_doctests():
    assert doctest.testmod(gate.grid).failed == 0


@pytest.mark.parametrize("h, w, cells, cell, shape", [
    (32, 32, 32, 1, (32, 32)), (64, 64, 32, 2, (32, 32)), (128, 128, 32, 4, (32, 32)), (224, 224, 32, 7, (32, 32)),
    (224, 224, 64, 4, (56, 56)), (100, 60, 32, 4, (25, 15)), (299, 299, 32, 10, (30, 30)), (224, 224, 0, 1, (224, 224)),
])
def test_at_most_grid_cells_a_side_and_every_pixel_covered_once(h, w, cells, cell, shape):
    grid = Grid.for_image(h, w, cells)
    assert grid.cell == cell == cell_size(h, w, cells) and grid.shape == shape
    assert max(shape) <= (cells or max(h, w))
    assert grid.area.sum() == h * w  # every pixel in exactly one cell, edge cells cut by the image's edge
    assert grid.up(np.ones(shape)).shape == (h, w)
    counted = np.zeros(shape)
    np.add.at(counted, (grid.rows[:, None], grid.cols[None, :]), 1.0)
    np.testing.assert_array_equal(counted, grid.area)


def test_l1_is_in_pixels_and_is_the_upsampled_masks():
    grid = Grid(10, 7, 4)  # cells of 16, 12 (cut by the right edge) and 8, 6 pixels (bottom row)
    mask = np.random.default_rng(0).random(grid.shape)
    assert grid.l1(mask) == pytest.approx(grid.up(mask).sum())
    pattern = np.random.default_rng(1).random((*grid.shape, 3))
    up = grid.up(pattern, channels=True)
    assert up.shape == (10, 7, 3)
    assert np.array_equal(up[9, 6], pattern[2, 1]) and np.array_equal(up[0, 3], pattern[0, 0])


def test_a_search_of_a_large_input_lives_on_the_grid_and_counts_pixels():
    search = TriggerSearch((128, 96, 3), SearchParams())
    assert search.grid.cell == 4 and search.shape == (32, 24, 3)
    state = search.init(np.random.default_rng(0))
    masks, patterns = search.ask(state)
    assert masks.shape[1:] == (32, 24) and patterns.shape[1:] == (32, 24, 3)
    m, p, l1 = state.result_trigger()  # nothing worked yet: the whole image, in pixels
    assert l1 == 128 * 96 and m.shape == (32, 24)
    search.tell(state, np.linspace(1.0, 2.0, search.params.candidates), success=1.0)  # the mean trigger works
    assert state.best_l1 == pytest.approx(16.0 * state.best_mask.sum())  # each cell counts its 16 pixels


def test_the_penalty_counts_cells_a_cut_cell_its_share():
    """The closed-form gradient of lambda E|m|_1 on a cut grid counts cells, not pixels: a whole cell weighs as
    one pixel of a 32x32 input does (2 lambda g(1-g)), a cell the image's edge cuts its share (area / cell area)."""
    search = TriggerSearch((10, 7, 3), SearchParams(k=4, grid_cells=2))  # cell 5: areas 25, 10 / 25, 10
    state = search.init(np.random.default_rng(0))
    search.ask(state)
    state.lam = 0.5
    flat = np.zeros(search.params.candidates)
    grad_m, _ = search.gradients(state, flat)  # no loss signal: the penalty alone
    prob = state.mask_prob
    np.testing.assert_allclose(grad_m, 0.5 * 2.0 * prob * (1 - prob) * search.grid.area / 25.0)
    assert search.grid.area.tolist() == [[25.0, 10.0], [25.0, 10.0]] and search.grid.cell_area == 25
    pixel = TriggerSearch((10, 7, 3), SearchParams(k=4, grid_cells=0))  # the same input pixel by pixel
    state = pixel.init(np.random.default_rng(0))
    pixel.ask(state)
    state.lam = 0.5
    grad_m, _ = pixel.gradients(state, flat)
    np.testing.assert_allclose(grad_m, 0.5 * 2.0 * state.mask_prob * (1 - state.mask_prob))


def test_a_32px_input_is_searched_pixel_by_pixel():
    search = TriggerSearch((32, 32, 3), SearchParams())
    assert not search.grid.coarse and search.shape == (32, 32, 3)
    assert not search.init(np.random.default_rng(0)).grid.coarse  # the arithmetic is the pixel search's, unchanged


@pytest.fixture(scope="module")
def backdoored_64(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "corner64.onnx"
    patch_backdoor_model(path, size=64, classes=10, target=TARGET, patch=8)
    oracle = Oracle(path, device="cpu")
    images = ImageSet(np.random.default_rng(1).random((300, 64, 64, 3), dtype=np.float32), None, "uniform noise")
    return oracle, images


def test_a_corner_backdoor_in_a_64px_model_is_found_on_the_grid(backdoored_64):
    oracle, images = backdoored_64
    cfg = ScanConfig()  # the defaults: 64 px -> 2x2-pixel cells, a 32x32 grid
    engine = ScanEngine(oracle, images, cfg)
    assert engine.grid.cell == 2 and engine.masks.shape[2:] == (32, 32)
    out = engine.run()
    res = out.result
    assert res.flagged == [TARGET]
    assert res.search["grid"] == {"cell": 2, "cells": [32, 32]}
    mask = out.triggers.masks[TARGET]
    assert mask.shape == (64, 64)  # reported at the input's resolution
    assert mask[-8:, -8:].sum() >= 0.7 * mask.sum()  # the reversed trigger sits on the planted corner
    target = res.classes[TARGET]
    assert target.l1 == pytest.approx(float(mask.sum()), rel=1e-5)  # the L1 is the upsampled mask's, in pixels
    assert target.mask_fraction == pytest.approx(target.l1 / 64 ** 2)
    assert all(c.binary_l1 % 4 == 0 for c in res.classes)  # a binary grid mask covers whole 2x2 cells
    keep = engine.pred_held != TARGET  # its attack success: the upsampled trigger stamped on the held-out images
    stamped = oracle.predict(stamp(engine.held_x[keep], mask, out.triggers.patterns[TARGET]))
    assert target.trigger_asr == pytest.approx(float(np.mean(stamped == TARGET)))
    assert max(c.l1 for c in res.classes if c.label != TARGET) > 20 * target.l1


def test_a_grid_scan_resumes_to_the_same_result(backdoored_64):
    oracle, images = backdoored_64
    cfg = ScanConfig(search=SearchParams(max_steps=30), max_images=120, held_out=20)
    whole = scan(oracle, images, cfg).result
    engine = ScanEngine(oracle, images, cfg)
    with ThreadPoolExecutor(1) as pool:
        for _ in range(10):
            engine.round(pool)
    meta, arrays = engine.snapshot()
    again = ScanEngine(oracle, images, cfg)
    again.restore(meta, {k: np.array(v) for k, v in arrays.items()})
    resumed = again.run().result
    assert [c.l1 for c in resumed.classes] == [c.l1 for c in whole.classes]
