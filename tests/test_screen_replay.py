"""bench.screen_replay: a screening schedule replayed on a traced scan is the screened scan itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.screen_replay import Paths, replay, top_probs, trace_scan, unscreened_flags
from gate.data import ImageSet
from gate.oracle import Oracle
from gate.outliers import OutlierRule
from gate.scan import ScanConfig, ScanEngine
from gate.screening import SCREENED_OUT, ScreeningParams
from gate.search import SearchParams
from tests.helpers import linear_model

CFG = ScanConfig(search=SearchParams(k=8, batch_size=2, eval_size=4, max_steps=150, early_stop_patience=5),
                 max_images=80, held_out=10)
SCHEDULES = [ScreeningParams(steps=6, reference_min=5, reference_fraction=0.0),
             ScreeningParams(steps=3, reference_min=3, reference_fraction=0.0, margin=0.0),
             ScreeningParams(steps=12, reference_min=8, reference_fraction=0.0, margin=1.0)]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "linear20.onnx"
    linear_model(path, size=6, classes=20, seed=4, softmax=True)
    images = ImageSet(np.random.default_rng(1).random((80, 6, 6, 3), dtype=np.float32), None, "uniform noise")
    return path, images, trace_scan(Oracle(path, threads=1), images, CFG)


def test_the_trace_is_the_plain_scan(traced):
    path, images, trace = traced
    plain = ScanEngine(Oracle(path, threads=1), images, CFG).run().result
    assert [c["l1"] for c in trace["classes"]] == [c.l1 for c in plain.classes]
    assert Paths(trace["classes"]).all_at([c["steps"] for c in trace["classes"]]).tolist() == \
        [c.l1 for c in plain.classes]
    assert trace["queries"] == plain.queries["scan"] and trace["flagged"] == plain.flagged
    assert unscreened_flags(trace, CFG.outliers) == plain.flagged


@pytest.mark.parametrize("params", SCHEDULES)
@pytest.mark.parametrize("seed", [0, 3])
def test_a_replayed_schedule_gives_the_screened_scan(traced, params, seed):
    """Flags, queries, steps and every class's reported L1: the replay and a real screened scan agree exactly."""
    path, images, trace = traced
    cfg = dataclasses.replace(CFG, screening=True, screening_params=params, seed=seed)
    if seed:  # the class streams come from the seed too: trace that seed's plain scan
        trace = trace_scan(Oracle(path, threads=1), images, dataclasses.replace(CFG, seed=seed))
    real = ScanEngine(Oracle(path, threads=1), images, cfg).run().result
    got = replay(trace, params, cfg.outliers, seed)
    assert got["flagged"] == real.flagged
    assert got["queries"] == real.queries["scan"]
    assert got["steps"] == [c.steps for c in real.classes]
    assert got["screened_out"] == sum(c.status == SCREENED_OUT for c in real.classes)
    assert Paths(trace["classes"]).all_at(got["steps"]).tolist() == [c.l1 for c in real.classes]


def test_every_class_in_the_reference_is_the_plain_scan(traced):
    _, _, trace = traced
    got = replay(trace, ScreeningParams(reference_min=20), OutlierRule(), 0)
    assert got["flagged"] == trace["flagged"] and got["queries"] == trace["queries"] and got["screened_out"] == 0


def test_a_path_gives_the_l1_after_any_step():
    paths = Paths([{"path": [[0, 1024.0], [3, 500.0], [7, 80.0]]}])
    assert [paths.at(0, s) for s in (0, 2, 3, 6, 7, 100)] == [1024.0, 1024.0, 500.0, 500.0, 80.0, 80.0]


def test_stand_in_probabilities_keep_the_top_label_order():
    top = [[2, 0, 1], [1, 2, 0]]
    assert np.argsort(-top_probs(top, 4), axis=1)[:, :3].tolist() == top


def test_leave_one_out_chooses_on_the_other_traces_and_judges_on_the_one_left_out():
    from bench.screen_replay import COUNTS, leave_one_out

    def t(same, queries, runs=4):
        return dict.fromkeys(COUNTS, 0) | {"runs": runs, "same": same, "queries": queries, "queries_unscreened": 1000,
                                           "classes": 10, "lost_at": []}

    plans = [ScreeningParams(steps=150), ScreeningParams(steps=60)]
    traces = [{"model": "a"}, {"model": "b"}, {"model": "c"}]
    # the short screen is cheaper and agrees on a and b, but not on c
    grid = [[t(4, 500), t(4, 500), t(4, 500)], [t(4, 200), t(4, 200), t(1, 200)]]
    cv = leave_one_out(grid, plans, traces)
    # left out a or b: c's disagreement rules the short screen out; left out c: a and b choose it, and c shows why
    assert [steps for _, steps, _, _ in cv["chosen"]] == [150, 150, 60]
    assert cv["same"] == 4 + 4 + 1 and cv["runs"] == 12
    assert cv["per_class"] == pytest.approx((500 + 500 + 200) / 30)


def test_bench_verdicts_reads_a_trace_as_the_plain_scan(traced, tmp_path):
    import json

    from bench.verdicts import load_records

    _, _, trace = traced
    doc = {"fingerprint": {}, "trace": {**trace, "model": "linear20", "dataset": "gtsrb", "arch": "linear",
                                        "attack": "badnets", "backdoored": True, "targets": [3], "true_asr": [0.97]}}
    (tmp_path / "linear20.json").write_text(json.dumps(doc))
    (model,) = load_records([tmp_path])
    assert (model.name, model.method, model.backdoored, model.targets, model.asr) == ("linear20", "b3d", True, (3,),
                                                                                      (0.97,))
    assert model.l1.tolist() == [c["l1"] for c in trace["classes"]] and model.pixels == 36


def test_a_search_paired_with_itself_shows_the_same_columns(traced):
    from bench.screen_replay import pair_table

    _, _, trace = traced
    t = {**trace, "model": "linear20", "targets": [], "backdoored": False}
    row = pair_table([t], [t], ("a", "b"), range(2), OutlierRule()).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "linear20" and cells[2] == cells[3] and cells[4] == cells[5]
    assert cells[6] == cells[7] == f"{trace['queries'] / trace['num_classes']:,.0f}" and cells[8] == cells[9]
