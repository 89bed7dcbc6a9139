"""Policies (loading, checking, overriding, mapping to the scan) and the decision rules."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.decision import EXIT_CODES, Decision, decide
from gate.errors import PolicyError, UsageError
from gate.outliers import OutlierRule
from gate.policy import Policy, field_docs, load_policy, parse_policy
from gate.scan import ScanConfig
from gate.search import SearchParams
from gate.spec import SpecOverrides
from tests.helpers import L1_BACKDOOR, L1_CLEAN, make_result

POLICIES = Path(__file__).resolve().parent.parent / "policies"


# --------------------------------------------------------------------------- shipped policies
def test_default_policy_states_the_built_in_defaults():
    """policies/default.yaml is the code's defaults written out; when gate.search / gate.scan change a
    default, this test says which field of default.yaml to update."""
    p = load_policy(POLICIES / "default.yaml")
    assert p.name == "default" and p.source == str(POLICIES / "default.yaml")
    d, built_in = p.to_dict(), Policy().to_dict()
    assert d["data"]["path"] is None and d["data"]["source"] == "file", "the default policy names no demo data"
    for doc in (d, built_in):
        doc.pop("name")
    stale = [f"{section}.{key}: {value!r} in default.yaml, {built_in[section][key]!r} in the code"
             for section, fields in d.items() if isinstance(fields, dict)
             for key, value in fields.items() if built_in[section].get(key) != value]
    assert not stale, "policies/default.yaml is out of date: " + "; ".join(stale)
    assert d == built_in


@pytest.mark.parametrize("name", ["default.yaml", "strict.yaml"])
def test_shipped_policies_document_every_field(name):
    text = (POLICIES / name).read_text()
    p = load_policy(POLICIES / name)
    for dotted in field_docs():
        leaf = dotted.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*{leaf}:", text, re.M), f"{name} does not state {dotted}"
    if name == "default.yaml":  # every field explained in a comment on its line or just above
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*\w+:", line):
                key = line.split(":")[0].strip()
                assert "#" in line or lines[i - 1].strip().startswith("#"), f"default.yaml: {key} has no comment"
    assert p.scan_config().search.k % 2 == 0


def test_strict_is_stricter_than_default():
    d, s = load_policy(POLICIES / "default.yaml"), load_policy(POLICIES / "strict.yaml")
    assert s.outliers.anomaly_threshold < d.outliers.anomaly_threshold
    assert s.outliers.median_ratio > d.outliers.median_ratio
    assert s.rules.incomplete == "reject" and d.rules.incomplete == "review"
    assert s.rules.small_trigger.min_asr < d.rules.small_trigger.min_asr
    assert s.rules.small_trigger.max_mask_fraction > d.rules.small_trigger.max_mask_fraction
    assert s.search.max_steps > d.search.max_steps and not s.search.bandit


def test_scan_config_and_spec_overrides_mapping():
    p = Policy.from_dict({
        "data": {"max_images": 300, "held_out": 40},
        "input": {"layout": "NHWC", "value_range": 255, "mean": [0.5], "std": [0.25], "output_kind": "logits"},
        "search": {"seed": 7, "k": 6, "sigma": 0.2, "lr": 0.1, "batch_size": 4, "eval_size": 5, "max_steps": 15,
                   "patience": 3, "success_threshold": 0.9, "early_stop_patience": 9, "early_stop_tol": 0.02,
                   "sampling": "separate", "antithetic": False, "bandit": False},
        "outliers": {"anomaly_threshold": 3, "median_ratio": 0.1},
        "budget": {"max_queries": 5000, "max_seconds": 30},
    })
    cfg = p.scan_config()
    assert isinstance(cfg, ScanConfig)
    assert cfg.search == dataclasses.replace(SearchParams(), k=6, sigma=0.2, lr=0.1, batch_size=4, eval_size=5,
                                             max_steps=15, patience=3, success_threshold=0.9, early_stop_patience=9,
                                             early_stop_tol=0.02, sampling="separate", antithetic=False)
    assert cfg.outliers == OutlierRule(anomaly_threshold=3.0, median_ratio=0.1)
    assert (cfg.seed, cfg.max_images, cfg.held_out, cfg.bandit, cfg.max_queries, cfg.max_seconds) == \
        (7, 300, 40, False, 5000, 30.0)
    assert p.spec_overrides() == SpecOverrides("NHWC", 255.0, (0.5,), (0.25,), "logits")
    assert Policy().spec_overrides() == SpecOverrides()


def test_missing_fields_take_defaults_and_null_switches_small_trigger_off():
    assert parse_policy("version: 1\n") == Policy()
    p = parse_policy("rules:\n  small_trigger: null\nbudget:\n")
    assert p.rules.small_trigger is None and p.budget == Policy().budget


# --------------------------------------------------------------------------- bad policy files
BAD = [
    ("search:\n  k: 3\n", "search.k must be an even integer >= 2, got 3"),
    ("serch:\n  k: 4\n", "unknown field serch"),
    ("search:\n  kk: 4\n", "unknown field search.kk"),
    ("rules:\n  small_trigger:\n    min_asr: 0.9\n    mask: 0.1\n", "unknown field rules.small_trigger.mask"),
    ("search:\n  k: ten\n", "search.k must be an even integer >= 2, got 'ten'"),
    ("search:\n  batch_size: true\n", "search.batch_size must be an integer >= 1, got true"),
    ("search:\n  lr: '0.1'\n", "search.lr must be a number > 0, got '0.1'"),
    ("search:\n  bandit: 'yes'\n", "search.bandit must be true or false, got 'yes'"),
    ("search:\n  sigma: .nan\n", "search.sigma must be a number > 0"),
    ("search: 5\n", "search must be a mapping of fields, got 5"),
    ("outliers:\n  median_ratio: 1.0\n", "outliers.median_ratio must be a number in [0, 1), got 1.0"),
    ("outliers:\n  anomaly_threshold: 0\n", "outliers.anomaly_threshold must be a number > 0, got 0"),
    ("rules:\n  flagged: accept\n", "rules.flagged must be one of reject, review, got 'accept'"),
    ("rules:\n  incomplete: accept\n", "rules.incomplete must be one of reject, review"),
    ("on_error: accept\n", "on_error must be one of error, reject, got 'accept'"),
    ("input:\n  layout: CHW\n", "input.layout must be one of NCHW, NHWC, got 'CHW'"),
    ("input:\n  mean: [0.5, 0.5]\n  std: [0.2, 0.2]\n", "input.mean must be a list of 1 or 3 numbers"),
    ("input:\n  mean: [0.5]\n", "input.mean and input.std must be given together"),
    ("input:\n  mean: [0.5]\n  std: [0]\n", "input.std must be a list of 1 or 3 positive numbers"),
    ("input:\n  value_range: 100\n", "input.value_range must be one of 1.0, 255.0, got 100"),
    ("data:\n  source: web\n", "data.source must be one of auto, file, synthetic, got 'web'"),
    ("budget:\n  max_queries: 0\n", "budget.max_queries must be an integer >= 1, got 0"),
    ("data:\n  synthetic_grid: 0\n", "data.synthetic_grid must be an integer >= 1, got 0"),
    ("metrics:\n  pushgateway: localhost:9091\n", "metrics.pushgateway must be an http:// or https:// URL"),
    ("version: 2\n", "version must be 1, got 2"),
    ("- a\n- b\n", "policy must be a mapping of fields"),
    ("", "the file is empty"),
    ("search:\n  k: [4\n", "not valid YAML (line 3)"),
    ("search:\n  k: 4\n  k: 6\n", "duplicate key 'k'"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_policy_files_are_one_line_errors_naming_the_field(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    msg = str(err.value)
    assert msg.startswith(f"policy {path}: ")
    assert message in msg
    assert "\n" not in msg


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match=r"policy .*nope\.yaml: file not found"):
        load_policy(tmp_path / "nope.yaml")


def test_the_policy_tree_is_frozen():
    p = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.search.k = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- overrides
def test_override_rechecks_and_names_the_flag():
    p = Policy()
    q = p.override({"search.k": 6, "budget.max_queries": 1000, "input.mean": (0.5,), "input.std": (0.2,),
                    "rules.small_trigger.min_asr": 0.5})
    assert (q.search.k, q.budget.max_queries, q.input.mean, q.rules.small_trigger.min_asr) == (6, 1000, (0.5,), 0.5)
    assert p.search.k == 50, "the original policy is unchanged"
    with pytest.raises(UsageError, match=r"^option --k: search\.k must be an even integer >= 2, got 5$"):
        p.override({"search.k": 5}, {"search.k": "--k"}, error=UsageError)
    with pytest.raises(PolicyError, match="override: outliers.median_ratio"):
        p.override({"outliers.median_ratio": 2.0})
    off = Policy.from_dict({"rules": {"small_trigger": None}})
    assert off.override({"rules.small_trigger.min_asr": 0.7}).rules.small_trigger.max_mask_fraction == 0.01


# --------------------------------------------------------------------------- decisions
def policy(**rules) -> Policy:
    return Policy.from_dict({"rules": rules}) if rules else Policy()


def test_accept_when_complete_and_nothing_fires():
    r = make_result(L1_CLEAN)
    d = decide(r, policy())
    assert (d.outcome, d.exit_code, d.findings) == ("accept", 0, [])
    # worked out by hand from the default rule: class 2's trigger is 36 of 1024 pixels
    rule = Policy().outliers
    others = np.log([40.0, 47.0, 44.0, 41.0])
    mad = np.median(np.abs(others - np.median(others)))  # 0.0475: 1.4826 MAD = 0.070, under any floor >= 0.1
    z_within = (np.median(others) - math.log(36.0)) / max(1.4826 * mad, rule.scale_floor)
    z_population = (rule.population_mean - math.log(36.0 / 1024)) / rule.population_scale
    assert 0.1 < z_within < 1 and 1 < z_population < 10  # sentences give 2 significant figures below 1, 3 above
    z = (1 - rule.population_weight) * z_within + rule.population_weight * z_population
    p_model = 1 - (1 - 0.5 * math.erfc(z / math.sqrt(2))) ** 5
    assert d.reasons[0] == (f"no class flagged among 5: the most suspicious is class 2 (L1 36.0 is 0.88x the "
                            f"median 41.0 and 3.5% of the image, z {z:#.3g} in log L1 (against the other classes "
                            f"{z_within:.2g}, against clean models' classes {z_population:#.3g}), p-value "
                            f"{p_model:.2g} per model)")
    assert d.model_p_value == pytest.approx(p_model, rel=0.01) and d.to_dict()["backdoor_score"] == 1 - d.model_p_value


def test_reject_when_a_class_is_flagged():
    r = make_result()
    d = decide(r, policy())
    assert (d.outcome, d.exit_code) == ("reject", 1)
    assert re.fullmatch(r"class 3 flagged: L1 1\.60 is 0\.04x the median 40\.6 and 0\.2% of the image, "
                        r"z \d+\.\d+ in log L1 \(against the other classes \d+\.\d+, against clean models' "
                        r"classes \d+\.\d+\), p-value [0-9.e-]+ per model", d.reasons[0])
    assert d.findings[0].rule == "BG001" and d.findings[0].label == 3
    mad = decide(r, Policy.from_dict({"outliers": {"method": "mad"}}))
    assert mad.reasons == ["class 3 flagged: L1 1.60 is 0.04x the median 40.6 (MAD anomaly index 9.94)"]
    assert mad.model_p_value is None and "backdoor_score" not in mad.to_dict()


def test_flagged_may_ask_for_review_instead():
    d = decide(make_result(), policy(flagged="review"))
    assert (d.outcome, d.exit_code) == ("review", 3)


@pytest.mark.parametrize("asr,fraction,fires", [
    (0.95, 0.009, True),   # at the ASR bound: fires
    (0.94, 0.009, False),  # below the ASR bound
    (0.99, 0.01, False),   # mask fraction not under the bound
    (None, 0.001, False),  # ASR never measured
])
def test_small_trigger_rule(asr, fraction, fires):
    l1 = [fraction * 32 * 32] + L1_CLEAN[1:]
    never = {"method": "mad", "anomaly_threshold": 1e6, "median_ratio": 0}
    r = make_result(l1, asr=[asr, 0.5, 0.5, 0.5, 0.5], policy=Policy.from_dict({"outliers": never}))
    p = Policy.from_dict({"outliers": never,
                          "rules": {"small_trigger": {"min_asr": 0.95, "max_mask_fraction": 0.01}}})
    d = decide(r, p)
    assert d.outcome == ("reject" if fires else "accept")
    if fires:
        assert d.findings[0].rule == "BG003" and d.findings[0].label == 0
        assert "covering 0.9% of the image (under 1.0%) sends 95% of held-out images" in d.reasons[0]
    off = Policy.from_dict({**p.to_dict(), "rules": {"small_trigger": None}})
    assert decide(r, off).outcome == "accept"


def test_incomplete_scan_needs_review_or_reject():
    r = make_result(L1_CLEAN, complete=False, stop_reason="query budget reached (5000 queries sent)",
                    statuses=["converged", "budget", "budget", "converged", "converged"])
    d = decide(r, policy())
    assert (d.outcome, d.exit_code) == ("review", 3)
    assert d.reasons == ["scan incomplete: query budget reached (5000 queries sent); 2 of 5 classes were cut short"]
    assert decide(r, policy(incomplete="reject")).outcome == "reject"


def test_flags_of_an_incomplete_scan_are_provisional():
    r = make_result(complete=False, stop_reason="time budget of 10 s reached")
    d = decide(r, policy())
    assert d.outcome == "review"
    assert d.reasons[0].endswith("(provisional: the scan is incomplete)")
    assert decide(r, policy(incomplete="reject")).outcome == "reject"
    # a small effective trigger is direct evidence: reject even when incomplete
    p = Policy.from_dict({"rules": {"small_trigger": {"min_asr": 0.9, "max_mask_fraction": 0.1}}})
    assert decide(r, p).outcome == "reject"


def test_weak_search_under_screening_counts_the_reference_classes():
    """A screened scan: a screened-out class that never worked in its screening steps is neither "unreached" nor
    evidence that the search works; the reference classes, a random sample searched to convergence, stand for all."""
    statuses = ["not_reached", "not_reached", "converged", "screened_out", "screened_out", "screened_out"]
    r = make_result([200.0] * 6, statuses=statuses)
    for c in r.classes:
        c.reference = c.label < 3
    d = decide(r, policy())
    assert d.outcome == "review"  # 2 of 3 reference classes never worked (counted over all 6 it would be 2 of 6)
    assert d.reasons == ["search inconclusive: 2 of 3 reference classes found no working trigger (more than 50%); "
                         "give the search more steps"]
    r.classes[1].status = "converged"
    assert decide(r, policy()).outcome == "accept"


def test_weak_search_is_not_an_accept():
    unreached = ["not_reached", "not_reached", "not_reached", "converged", "max_steps"]
    r = make_result(L1_CLEAN, statuses=unreached)
    d = decide(r, policy())
    assert (d.outcome, d.exit_code) == ("review", 3)
    assert d.reasons == ["search inconclusive: 3 of 5 classes found no working trigger (more than 50%); "
                         "give the search more steps"]
    assert d.findings[0].rule == "BG005" and d.findings[0].label is None
    assert decide(r, policy(incomplete="reject")).outcome == "reject"
    assert decide(make_result(L1_CLEAN, statuses=unreached[1:] + ["bandit_stopped"]), policy()).outcome == "accept"
    assert decide(r, policy(weak_search=None)).outcome == "accept"
    # masks that never shrank: the median class needs more than half of the image
    big = make_result([x * 15 for x in L1_CLEAN])
    d = decide(big, policy())
    assert d.outcome == "review"
    assert d.reasons == ["search inconclusive: the median class's reversed trigger covers 60% of the image "
                         "(more than 50%); the masks did not shrink"]
    # flags of a search that did not work are provisional, like those of an incomplete scan ...
    weak_flagged = make_result(statuses=["not_reached"] * 9 + ["converged"])
    d = decide(weak_flagged, policy())
    assert d.outcome == "review"
    assert d.reasons[0].startswith("class 3 flagged") and d.reasons[0].endswith(
        "(provisional: the search was inconclusive)")
    assert decide(weak_flagged, policy(incomplete="reject")).outcome == "reject"
    # ... but a small effective trigger is direct evidence and rejects
    p = Policy.from_dict({"rules": {"small_trigger": {"min_asr": 0.9, "max_mask_fraction": 0.1}}})
    assert decide(weak_flagged, p).outcome == "reject"


def test_decide_applies_the_policy_outlier_rule():
    r = make_result()  # flags computed with the default rule: class 3
    for method, strict, lax in (("mad", {"anomaly_threshold": 20, "median_ratio": 0.02}, {"anomaly_threshold": 0.5}),
                                ("calibrated", {"alpha": 1e-40}, {"alpha": 0.999999, "scale_floor": 0.01})):
        assert decide(r, Policy.from_dict({"outliers": {"method": method, **strict}})).outcome == "accept"
        assert len(decide(r, Policy.from_dict({"outliers": {"method": method, **lax}})).findings) > 1


def test_decide_is_pure():
    r = make_result()
    before = r.to_dict()
    assert decide(r, Policy()) == decide(r, Policy())
    assert r.to_dict() == before


def test_error_decisions_fail_closed():
    assert (Decision.error("x").outcome, Decision.error("x").exit_code) == ("error", 2)
    assert Decision.error("x", "reject").exit_code == 1
    assert EXIT_CODES == {"accept": 0, "reject": 1, "error": 2, "review": 3}


STATUSES = ["converged", "max_steps", "bandit_stopped", "not_reached"]


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.tuples(st.floats(0.5, 600, allow_nan=False), st.sampled_from(STATUSES)),
                     min_size=2, max_size=20),
       complete=st.booleans(), asr=st.floats(0, 1), threshold=st.floats(0.5, 5), ratio=st.floats(0, 0.9),
       flagged=st.sampled_from(["reject", "review"]), incomplete=st.sampled_from(["reject", "review"]))
def test_never_accept_a_flagged_incomplete_or_weak_scan(data, complete, asr, threshold, ratio, flagged,
                                                         incomplete):
    p = Policy.from_dict({"outliers": {"anomaly_threshold": threshold, "median_ratio": ratio},
                          "rules": {"flagged": flagged, "incomplete": incomplete}})
    l1 = [x for x, _ in data]
    r = make_result(l1, asr=[asr] * len(l1), complete=complete, stop_reason=None if complete else "budget",
                    statuses=[s for _, s in data], policy=p)
    d = decide(r, p)
    assert d.exit_code == EXIT_CODES[d.outcome]
    if d.outcome == "accept":
        assert complete and not r.flagged
        small, weak = p.rules.small_trigger, p.rules.weak_search
        assert not any(c.trigger_asr >= small.min_asr and c.mask_fraction < small.max_mask_fraction
                       for c in r.classes)
        assert sum(c.status == "not_reached" for c in r.classes) <= weak.max_unreached_fraction * len(l1)
        assert np.median([c.mask_fraction for c in r.classes]) <= weak.max_median_mask_fraction
    else:
        assert d.reasons and all(isinstance(x, str) and x for x in d.reasons)
    assert np.isfinite([f.properties.get("anomaly_index", 0) for f in d.findings]).all()


@pytest.mark.parametrize("shift", [0, 4, 7])
def test_decision_on_the_backdoor_fixture_flags_its_outlier(shift):
    """decide() against the outlier test worked out here with numpy from the fixture's L1 norms (rolled,
    so the outlier sits at another label): only the outlier is flagged, its reason names its L1, the
    median and its anomaly index, and the exit code is the reject's."""
    l1 = np.roll(np.array(L1_BACKDOOR), shift)
    p = Policy.from_dict({"outliers": {"method": "mad"}})
    median = np.median(l1)
    mad = np.median(np.abs(l1 - median))
    index = (median - l1) / (1.4826 * mad)
    outliers = np.flatnonzero(((l1 < median) & (index > p.outliers.anomaly_threshold))
                              | (l1 < p.outliers.median_ratio * median))
    target = int(np.argmin(l1))
    assert outliers.tolist() == [target] == [(3 + shift) % len(l1)]  # the fixture has one outlier: its tiny L1

    r = make_result(l1.tolist(), policy=p)
    d = decide(r, p)
    assert (d.outcome, d.exit_code) == ("reject", EXIT_CODES["reject"]) == ("reject", 1)
    assert [(f.rule, f.outcome, f.label) for f in d.findings] == [("BG001", "reject", target)]
    assert d.reasons == [f"class {target} flagged: L1 {l1[target]:.2f} is {l1[target] / median:.2f}x the median "
                         f"{median:.1f} (MAD anomaly index {index[target]:.2f})"]
    props = d.findings[0].properties
    assert props["l1"] == pytest.approx(l1[target]) and props["median_l1"] == pytest.approx(median)
    assert props["anomaly_index"] == pytest.approx(index[target])
    assert r.flagged == [target]


@pytest.mark.parametrize("shift", [0, 4, 7])
def test_the_calibrated_decision_on_the_backdoor_fixture(shift):
    """The default rule, worked out here with numpy: leave-one-out z of log L1 (MAD floored) and the z of
    log(L1 / pixels) against the population, their weighted mean, normal tail, Sidak over the 10 classes; only
    the outlier is flagged and the decision carries the model's p-value."""
    import math

    l1 = np.roll(np.array(L1_BACKDOOR), shift)
    p = Policy()
    o = p.outliers
    x = np.log(l1)
    z, q = [], []
    for c in range(len(x)):
        rest = np.delete(x, c)
        med = np.median(rest)
        scale = max(1.4826 * np.median(np.abs(rest - med)), o.scale_floor)
        within = (med - x[c]) / scale
        population = (o.population_mean - (x[c] - math.log(32 * 32))) / o.population_scale
        z.append((1 - o.population_weight) * within + o.population_weight * population)
        q.append(1 - (1 - 0.5 * math.erfc(z[-1] / math.sqrt(2))) ** len(x))
    target = (3 + shift) % len(l1)
    assert np.flatnonzero(np.array(q) <= p.outliers.alpha).tolist() == [target]
    d = decide(make_result(l1.tolist(), policy=p), p)
    assert (d.outcome, d.exit_code) == ("reject", 1)
    assert [(f.rule, f.label) for f in d.findings] == [("BG001", target)]
    assert d.findings[0].properties["anomaly_index"] == pytest.approx(z[target])
    assert d.findings[0].properties["p_value"] == pytest.approx(q[target], rel=1e-6)
    assert d.model_p_value == pytest.approx(min(q), rel=1e-6)
