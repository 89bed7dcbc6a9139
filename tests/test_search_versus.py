"""bench.search_versus: two searches' scans of the same models, each judged by its own cross-validated rule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from bench.search_versus import main, report


def write_trace(folder, name, l1, *, target=None, queries_per_class=1000.0):
    """A minimal bench.screen_replay trace: what bench.verdicts and bench.search_versus read of one."""
    folder.mkdir(parents=True, exist_ok=True)
    trace = {"model": name, "dataset": "cifar", "arch": "small_cnn_v1", "attack": "badnets" if target is not None
             else "clean", "backdoored": target is not None, "targets": [] if target is None else [target],
             "true_asr": [] if target is None else [1.0], "pixels": 1024, "num_classes": len(l1),
             "queries": queries_per_class * len(l1), "classes": [{"l1": float(v)} for v in l1]}
    (folder / f"{name}.json").write_text(json.dumps({"fingerprint": {}, "trace": trace}))


def natural(rng, k=10):
    return np.exp(rng.normal(np.log(150.0), 0.35, k))


@pytest.fixture
def two_searches(tmp_path):
    """Search A leaves every planted trigger as large as the natural ones; search B finds them (5 px) at a third
    of A's queries. Same models, same natural L1 norms on both sides."""
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(12):
        l1 = natural(rng)
        write_trace(a, f"clean_{i}", l1, queries_per_class=3000)
        write_trace(b, f"clean_{i}", l1, queries_per_class=1000)
    for i in range(8):
        l1 = natural(rng)
        write_trace(a, f"bad_{i}", l1, target=i % 10, queries_per_class=3000)
        l1b = l1.copy()
        l1b[i % 10] = 5.0
        write_trace(b, f"bad_{i}", l1b, target=i % 10, queries_per_class=1000)
    write_trace(b, "only_b", natural(rng))
    return a, b


def args(a, b, **kw):
    base = dict(a=[a], b=[b], a_name="A", b_name="B", folds=4, seeds=3, target_fpr=0.1, min_asr=0.9, b_best_of=False)
    return SimpleNamespace(**(base | kw))


def test_each_side_is_judged_on_the_models_both_scanned(two_searches):
    a, b = two_searches
    text, data = report(args(a, b))
    assert len(data["models"]) == 20 and "only_b" not in data["models"]
    assert "Scanned by one side only (not counted): 1." in text
    a0, b0 = data["cv"]["a"][0], data["cv"]["b"][0]
    assert a0["tpr"][1] == b0["tpr"][1] == 8 and a0["fpr"][1] == b0["fpr"][1] == 12
    assert b0["target_found"][0] == 8, "B's 5-px triggers stand out on every backdoored model"
    assert a0["tpr"][0] < b0["tpr"][0]
    assert len(data["cv"]["a"]) == 3, "one cross-validation per split seed"
    assert data["queries_per_class"]["a"]["bad_0"] == 3000 and data["queries_per_class"]["b"]["bad_0"] == 1000
    # every backdoored model A judged otherwise is listed, by name and with both verdicts
    for i in range(8):
        assert any(d.startswith(f"bad_{i} (targets [{i}]): A ") and f"B [{i}] (p " in d for d in data["differences"])
    assert "| all | B | 20 (12 clean) |" in text and "| 1,000 |" in text and "| 3,000 |" in text
    # agreement: B flags every backdoored model and no clean one, so the decisions agree where A is right
    assert b0["fpr"][0] == 0
    agree = (12 - a0["fpr"][0]) + a0["tpr"][0]
    assert data["same_decision"] == agree < 20 and data["same_flags"] <= data["same_decision"]
    assert f"the same decision (anything flagged or not) on {agree} of 20 models" in text


def test_no_model_in_common_is_an_error(tmp_path, capsys):
    write_trace(tmp_path / "a", "m1", np.full(10, 100.0))
    write_trace(tmp_path / "b", "m2", np.full(10, 100.0))
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b")]) == 2
    assert "no model in common" in capsys.readouterr().err


def test_the_report_can_be_recorded(two_searches, tmp_path, capsys):
    a, b = two_searches
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    assert main(["--a", str(a), "--b", str(b), "--folds", "4", "--seeds", "2", "--record",
                 "--results-md", str(md)]) == 0
    text = md.read_text()
    assert "## Two searches side by side on the same models (cross-validated)" in text
    assert "python -m bench.search_versus --a" in text
    # a named comparison gets a section of its own and leaves the first one in place
    assert main(["--a", str(a), "--b", str(b), "--folds", "4", "--seeds", "2", "--record", "--results-md", str(md),
                 "--section-name", "two seeds"]) == 0
    text = md.read_text()
    assert "## Two searches side by side on the same models (cross-validated): two seeds" in text
    assert text.count("## Two searches side by side on the same models (cross-validated)") == 2


def test_a_model_in_two_folders_counts_once_and_the_first_folder_wins(tmp_path):
    from bench.verdicts import load_records

    write_trace(tmp_path / "first", "m", np.full(10, 100.0))
    write_trace(tmp_path / "second", "m", np.full(10, 50.0))
    write_trace(tmp_path / "second", "other", np.full(10, 70.0))
    models = load_records([tmp_path / "first", tmp_path / "second"])
    assert sorted(m.name for m in models) == ["m", "other"]
    assert next(m for m in models if m.name == "m").l1[0] == 100.0


def test_best_of_starts_keeps_each_class_smallest_l1_and_adds_the_queries(tmp_path):
    """Two seeded starts of one search: a start that missed a planted trigger (the class as large as the natural
    ones) is rescued by the other; every class keeps its smaller L1; models one start lacks are left out."""
    from bench.search_versus import scans

    rng = np.random.default_rng(1)
    s0, s1 = tmp_path / "seed0", tmp_path / "seed1"
    for i in range(6):
        l1 = natural(rng)
        other = l1 * np.exp(rng.normal(0.0, 0.2, 10))
        if i % 2:  # the backdoor found by one start only
            l1[3], other[3] = 160.0, 4.0
        write_trace(s0, f"m{i}", l1, target=3 if i % 2 else None, queries_per_class=1000)
        write_trace(s1, f"m{i}", other, target=3 if i % 2 else None, queries_per_class=1200)
    write_trace(s0, "only_first", natural(rng))
    single, _ = scans([s0])
    second, _ = scans([s1])
    both, queries = scans([s0, s1], best_of=True)
    assert sorted(both) == [f"m{i}" for i in range(6)]
    for n, m in both.items():
        np.testing.assert_array_equal(m.l1, np.minimum(single[n].l1, second[n].l1))
        assert queries[n] == 2200.0
    assert both["m1"].l1[3] == 4.0 and single["m1"].l1[3] == 160.0
    # the comparison runs with the option (A one start, B the best of two)
    text, data = report(SimpleNamespace(**(vars(args(s0, s0, folds=2, seeds=1)) | {"b": [s0, s1], "b_best_of": True})))
    assert data["models"] == [f"m{i}" for i in range(6)]
    assert data["queries_per_class"]["b"]["m0"] == 2200.0


def test_judged_by_the_same_rules_identical_scans_agree_and_a_found_trigger_is_flagged(two_searches):
    a, b = two_searches
    _, same = report(args(a, a))
    assert same["a_rules"]["same_decision"] == same["a_rules"]["same_flags"] == 20
    # B's planted 5-px triggers, judged by rules fitted on A's scans (where nothing stands out), are still found
    text, data = report(args(a, b))
    assert data["a_rules"]["b"]["target_found"][0] == 8
    assert "Both judged by A's cross-validated rules" in text
