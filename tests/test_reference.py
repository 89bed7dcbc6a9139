"""gate.reference: a model's p-value among clean reference models, and when that comparison is withheld."""

import json
import math
from dataclasses import replace

import pytest

from gate.outliers import OutlierRule
from gate.policy import builtin_policy
from gate.reference import P_VALUE_FIELDS, REFERENCE_FILE, UNCOMPARED_SEARCH, CleanReference, load, standing


def _search():
    cfg = builtin_policy().scan_config()
    return {**cfg.search.to_dict(), **cfg.to_dict()}


def _reference(log10_p=(-4.0, -3.0, -2.0, -1.0, 0.0)):
    rule = OutlierRule()
    return CleanReference(tuple(log10_p), {k: getattr(rule, k) for k in P_VALUE_FIELDS},
                          {k: v for k, v in _search().items() if k not in UNCOMPARED_SEARCH}, 1024, "clean models")


def test_the_empirical_p_value_counts_clean_models_at_or_below_with_the_model_itself():
    ref = _reference()
    s = standing(1e-3, OutlierRule(), _search(), "b3d", 1024, False, ref)
    assert (s.clean_models, s.at_or_below, s.p_value) == (5, 2, 3 / 6)  # -4 and -3 are at or below -3
    assert standing(1e-9, OutlierRule(), _search(), "b3d", 1024, False, ref).p_value == 1 / 6
    assert standing(0.0, OutlierRule(), _search(), "b3d", 1024, False, ref).at_or_below == 0
    assert standing(1.0, OutlierRule(), _search(), "b3d", 1024, False, ref).p_value == 1.0
    assert "2 of 5 clean models had" in s.sentence and s.to_dict()["p_value"] == 0.5


def test_seed_image_counts_and_alpha_do_not_withhold_it():
    search = {**_search(), "seed": 7, "max_images": 300, "held_out": 30, "batch_images": 64}
    s = standing(1e-3, replace(OutlierRule(), alpha=1e-3), search, "b3d", 1024, False, _reference())
    assert s.unavailable is None


@pytest.mark.parametrize(("change", "why"), [
    ({"method": "b3d-ss"}, "synthetic"),
    ({"blend": True}, "blend mode"),
    ({"pixels": 128 * 128}, "32x32 inputs, this one 16384 pixels"),
    ({"rule": replace(OutlierRule(), scale_floor=0.3)}, "outlier rule"),
    ({"search": {**_search(), "max_steps": 25, "lambda_init": 0.001}}, "lambda_init, max_steps"),
])
def test_scans_unlike_the_reference_are_not_compared_and_say_why(change, why):
    args = {"rule": OutlierRule(), "search": _search(), "method": "b3d", "pixels": 1024, "blend": False, **change}
    s = standing(1e-3, args["rule"], args["search"], args["method"], args["pixels"], args["blend"], _reference())
    assert s.p_value is None and why in s.unavailable
    assert s.to_dict() == {"unavailable": s.unavailable} and "not compared" in s.sentence
    assert "no clean reference" in standing(1e-3, OutlierRule(), _search(), "b3d", 1024, False, None).unavailable


def test_the_shipped_reference_belongs_to_the_default_policy():
    """Fails when the default search or rule changes without `python -m bench.clean_reference` re-run."""
    ref = load(REFERENCE_FILE)
    assert ref is not None and len(ref.log10_p) >= 40
    s = standing(1e-3, builtin_policy().outlier_rule(), _search(), "b3d", 1024, False, ref)
    assert s.unavailable is None, s.unavailable
    doc = json.loads(REFERENCE_FILE.read_text())
    assert len(doc["models"]) == len(ref.log10_p) and all(v <= 0 for v in ref.log10_p)


def test_the_decision_carries_the_standing_of_a_default_scan_and_withholds_it_for_a_synthetic_one():
    from gate.decision import decide
    from tests.helpers import make_result

    result = make_result()
    result.search = _search()
    decision = decide(result, builtin_policy())
    ref = load(REFERENCE_FILE)
    s = decision.clean_reference
    assert s.unavailable is None and s.clean_models == len(ref.log10_p)
    assert s.at_or_below == sum(v <= math.log10(decision.model_p_value) for v in ref.log10_p)
    assert decision.to_dict()["clean_reference"]["p_value"] == (s.at_or_below + 1) / (len(ref.log10_p) + 1)
    result.method = "b3d-ss"
    assert "synthetic" in decide(result, builtin_policy()).to_dict()["clean_reference"]["unavailable"]


def test_a_damaged_reference_file_is_a_clear_error_not_a_silent_gap(tmp_path):
    from gate.errors import GateError

    assert load(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"log10_p": [')
    with pytest.raises(GateError, match="unreadable"):
        load(bad)
    bad.write_text('{"log10_p": [-1.0]}')
    with pytest.raises(GateError, match="KeyError"):
        load(bad)
