"""bench.class_count: the cross-validated rule judging models with some of their classes left out."""

import numpy as np
import pytest

from bench.class_count import judged_with_classes, keep_classes, report
from bench.verdicts import Model
from gate.outliers import OutlierRule


def _model(i, backdoored, n=43, targets=(7,)):
    rng = np.random.default_rng(i)
    l1 = 200.0 * np.exp(rng.normal(0, 0.3, n))
    if backdoored:
        l1[list(targets)] = 2.0
    return Model(f"m{i}", "gtsrb", "b3d", "arch", "badnets" if backdoored else "clean", backdoored,
                 tuple(targets) if backdoored else (), l1, (1.0,) if backdoored else ())


def test_kept_classes_keep_every_target_renumbered_and_their_own_l1():
    m = _model(1, True, targets=(7, 30))
    small = keep_classes(m, 10, np.random.default_rng(0))
    assert len(small.l1) == 10 and len(small.targets) == 2
    assert all(small.l1[t] == 2.0 for t in small.targets)
    assert set(small.l1) <= set(m.l1)
    assert list(small.l1) == [v for v in m.l1 if v in set(small.l1)]  # original order
    assert keep_classes(m, 43, np.random.default_rng(0)) is m
    with pytest.raises(ValueError):
        keep_classes(_model(2, True, targets=(1, 2, 3)), 4, np.random.default_rng(0))


def test_draws_differ_and_a_full_class_count_is_one_draw():
    ms = [_model(i, i % 3 == 0) for i in range(9)]
    rules = [OutlierRule()] * len(ms)
    assert len(judged_with_classes(ms, rules, 43, 5, 0)) == 1
    runs = judged_with_classes(ms, rules, 10, 5, 0)
    assert len(runs) == 5
    # the planted 2-px targets stand out among any ten 200-px classes: every backdoor found in every draw
    assert all(r["tpr"] == 1.0 and r["fpr"] == 0.0 for r in runs)


def test_the_report_has_a_row_per_rule_dataset_and_class_count():
    ms = [_model(i, i % 3 == 0) for i in range(30)]
    text, data = report(ms, [43, 10], 3, 3, 0.1, 0)
    assert "| calibrated | GTSRB | 43 (all) | 30 (20) |" in text
    assert "| within-model only | GTSRB | 10 | 30 (20) |" in text
    assert len(data["calibrated"]["gtsrb"]["10"]) == 3 and len(data["calibrated"]["gtsrb"]["43"]) == 1


def test_accuracy_rows_rank_correlate_the_manifests_accuracy_with_the_smallest_class(tmp_path):
    import json

    from bench.class_count import accuracy_rows, spearman

    ms = [_model(i, False, n=10) for i in range(5)] + [_model(9, True, n=10)]
    for i, m in enumerate(ms):
        (tmp_path / f"{m.name}.json").write_text(json.dumps({"clean_accuracy": 0.5 + 0.01 * i}))
    lines, data = accuracy_rows(ms, tmp_path)
    ratio = [float(m.l1.min() / np.median(m.l1)) for m in ms[:5]]
    assert data["gtsrb"]["ratio"] == ratio  # the backdoored model is not among them
    assert data["gtsrb"]["spearman"] == spearman([0.5, 0.51, 0.52, 0.53, 0.54], ratio)
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert lines[-1].startswith("| GTSRB | 5 |")
