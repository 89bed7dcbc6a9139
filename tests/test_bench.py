"""The detection benchmark: Neural Cleanse on the demo backdoored model, case logic, tables, a quick run."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from bench import compare, zoo
from tests.helpers import DATASETS, DEMO, ROOT

GTSRB = DATASETS / "gtsrb32.npz"
needs_gtsrb = pytest.mark.skipif(not GTSRB.is_file(), reason="no GTSRB dataset in shared/datasets")
# the forge extra: Neural Cleanse and the torch rebuild of the demo model need torch
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")


@pytest.fixture(scope="module")
def demo():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    man = zoo.load_manifest(DEMO / "gtsrb_badnets3x3.json")
    net, normalize = zoo.torch_model(man)
    assert normalize is None  # no .pt beside the demo models: the ONNX graph itself, encoding inside
    return man, net


@needs_torch
def test_torch_rebuild_of_the_demo_model_matches_onnx(demo):
    import torch

    man, net = demo
    x = np.load(DEMO / "gtsrb_sample.npz")["x"][:32].astype(np.float32) / 255
    probs = zoo.open_oracle(man, threads=1).probs(x)
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    assert np.abs(torch.softmax(logits, 1).numpy() - probs).max() < 1e-4


@needs_torch
def test_neural_cleanse_finds_the_small_trigger_of_the_target(demo):
    from bench.neural_cleanse import NCConfig, neural_cleanse, torch_asr
    from gate.search import SearchParams

    man, net = demo
    target = man["triggers"][0]["target"]
    x = np.load(DEMO / "gtsrb_sample.npz")["x"].astype(np.float32) / 255
    cfg = NCConfig(schedule=SearchParams(max_steps=80), batch_size=16)
    res = neural_cleanse(net, x, cfg, labels=[target, 1, 2])
    by = {c.label: c for c in res.classes}
    assert res.steps == sum(c.steps for c in res.classes) == 3 * 80
    assert res.image_passes == res.steps * 16
    assert by[target].l1 < 0.25 * min(by[1].l1, by[2].l1)
    assert res.masks.shape == (3, 32, 32) and res.patterns.shape == (3, 32, 32, 3)
    assert 0 <= res.masks.min() and res.masks.max() <= 1
    i = [c.label for c in res.classes].index(target)
    assert torch_asr(net, x, target, res.masks[i], res.patterns[i]) >= 0.9
    json.dumps(res.to_dict())  # JSON-serialisable


@pytest.mark.parametrize("flagged,targets,case", [
    ([29], [29], "I"), ([], [29], "IV"), ([3], [29], "III"), ([29, 3], [29], "II"),
    ([4], [4, 9], "I"), ([4, 9], [4, 9], "I"), ([4, 1], [4, 9], "II"), ([], [], "IV"), ([5], [], "III"),
])
def test_detection_cases(flagged, targets, case):
    assert compare.detection_case(flagged, targets) == case


def _record(model, method, flagged, targets, l1_target=5.0):
    rec = {"model": model, "dataset": model.split("_")[0], "group": zoo.group_of(model), "attack": "x",
           "backdoored": bool(targets), "targets": targets, "method": method, "flagged": flagged,
           "case": compare.detection_case(flagged, targets), "median_l1": 80.0, "l1_per_class": [80.0] * 10,
           "cost": 1000 if method == "nc" else 2_000_000, "cost_unit": compare.COST_UNIT[method],
           "cost_per_class": 100.0 if method == "nc" else 200_000.0, "seconds": 20.0, "seconds_scan": 15.0,
           "seconds_synthesis": 5.0 if method == "b3d-ss" else 0.0,
           "ort_fraction": None if method == "nc" else 0.5, "complete": True,
           "queries": None if method == "nc" else {"scan_per_class": 150_000.0,
                                                   "synthesis_per_class": 50_000.0 if method == "b3d-ss" else 0.0},
           "per_target": [{"target": t, "l1": l1_target, "true_l1": 9.0, "anomaly_index": 4.0, "asr_eval": 0.97}
                          for t in targets]}
    return rec


def test_tables_use_the_paper_layout_and_label_paper_numbers():
    recs = [_record("cifar_clean_s0", m, [], []) for m in compare.METHODS]
    recs += [_record("cifar_badnets3x3", "nc", [2], [2]), _record("cifar_badnets3x3", "b3d", [2, 5], [2]),
             _record("cifar_badnets3x3", "b3d-ss", [], [2]), _record("cifar_two_triggers", "b3d", [4], [4, 7])]
    text = compare.render(recs, compare.METHODS, compare.Settings())
    assert "### CIFAR-10: detection cases (paper Table 3/4 layout)" in text
    assert "| clean | 1 | - | - | 0 | 1 | - | - | 0 | 1 | - | - | 0 | 1 |" in text
    assert "| BadNets 3x3 | 1 | 1 | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 0 | 0 | 1 |" in text
    assert "| NC | 100.0% (2) | 100.0% | 95.0% (paper) |" in text
    assert "| B3D-SS | 50.0% (2) | 50.0% | 97.5% (paper) |" in text
    assert "| TABOR | not run | not run | - |" in text
    agg = compare.aggregate(recs)["cifar"]
    assert agg["accuracy"]["b3d"] == {"models": 3, "detected": 1.0, "with_target": 1.0}
    assert agg["per_class"]["b3d-ss"]["synthesis_queries_per_class"] == 50_000.0
    assert "GTSRB" not in text  # only datasets that were run


def test_results_section_replaces_only_its_own(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Runtime shield\n\nshield numbers\n")
    compare.write_results_section(md, "first", "python -m bench.compare")
    compare.write_results_section(md, "second", "python -m bench.compare")
    text = md.read_text()
    assert text.count(compare.SECTION) == 1 and "second" in text and "first" not in text
    assert "## Runtime shield\n\nshield numbers" in text
    md.write_text(f"# R\n\n{compare.SECTION}\n\nold\n\n## Runtime shield\n\nkeep\n")
    compare.write_results_section(md, "new", "cmd")
    text = md.read_text()
    assert "old" not in text and text.index("new") < text.index("## Runtime shield") and "keep" in text


def test_bench_compare_does_not_import_torch_until_nc_runs():
    code = ("import sys, bench.compare, bench.zoo, gate.scan, gate.synth; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@needs_gtsrb
def test_clean_data_are_held_out_and_disjoint():
    data = zoo.clean_data("gtsrb", cap=300, n_eval=50, seed=0)
    assert len(data.scan) == 300 and len(data.eval) == 50
    assert data.scan.x.dtype == np.float32 and 0 <= data.scan.x.min() and data.scan.x.max() <= 1
    flat = {x.tobytes() for x in (data.scan.x * 255).round().astype(np.uint8)}
    assert not any(x.tobytes() in flat for x in (data.eval.x * 255).round().astype(np.uint8))


@needs_gtsrb
@needs_torch
def test_quick_compare_end_to_end_on_the_demo_model(tmp_path):
    out = tmp_path / "out"
    code = compare.main(["--quick", "--zoo-dir", str(DEMO), "--models", "gtsrb_badnets3x3", "--out", str(out),
                         "--max-images", "100", "--eval-images", "40", "--threads", "1",
                         "--results-md", str(tmp_path / "RESULTS.md")])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["records"]] == ["nc", "b3d", "b3d-ss"]
    for r in summary["records"]:
        assert r["case"] in ("I", "II", "III", "IV") and r["targets"] == [29]
        assert r["per_target"][0]["asr_eval"] is not None
        assert (out / "compare" / f"gtsrb_badnets3x3.{r['method']}.json").is_file()
    ss = summary["records"][2]
    assert ss["queries"]["synthesis"] > 0 and ss["queries"]["total"] == ss["queries"]["scan"] + ss["queries"][
        "synthesis"]
    assert summary["records"][0]["cost_unit"] == "gradient steps"
    assert "(paper)" in (out / "compare.md").read_text()
    assert not (tmp_path / "RESULTS.md").exists()  # quick / custom runs are not recorded unless --record


# --------------------------------------------------------------------------- bench.serve: child servers
def _http_server(directory) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", "{host}", "{port}", "--directory", str(directory)]


def test_serve_starts_on_loopback_waits_until_ready_and_stops(tmp_path):
    from bench.serve import HOST, serve

    with serve(_http_server(tmp_path), ready_path="/", timeout=60, log=tmp_path / "server.log") as s:
        assert s.url == f"http://{HOST}:{s.port}" and HOST == "127.0.0.1"
        assert s.ready("/") and s.proc.poll() is None and s.rss_kib() > 0 and s.cpu_seconds() >= 0
        assert "GET / HTTP/1.1" in s.output()  # the readiness probe, read from the child's stderr
    assert s.proc.returncode is not None
    assert f"port {s.port}" in (tmp_path / "server.log").read_text()


def test_serve_surfaces_the_output_of_a_child_that_fails_to_start():
    from bench.serve import ServerError, serve

    code = "import sys; print('to stdout'); print('no such model', file=sys.stderr); sys.exit(3)"
    with pytest.raises(ServerError, match=r"exited with code 3 before it was ready") as err:
        with serve([sys.executable, "-c", code], timeout=60, name="dummy"):
            pass
    assert "to stdout" in str(err.value) and "no such model" in str(err.value)
    with pytest.raises(ServerError, match=r"sleeper did not answer 200 on /v2/health/ready within 0.5s"):
        with serve([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5, name="sleeper"):
            pass


def test_serve_keeps_draining_a_chatty_child(tmp_path):
    """20 MB of output before it listens (far beyond a pipe's buffer): the child neither blocks nor dies."""
    from bench.serve import serve

    code = ("import functools, http.server, sys\n"
            "sys.stdout.write('x' * 20_000_000); sys.stdout.flush()\n"
            "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])\n"
            "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()\n")
    with serve(lambda port: [sys.executable, "-c", code, str(port), str(tmp_path)], ready_path="/",
               timeout=60) as s:
        assert s.proc.poll() is None
        out = s.output()
        assert out.startswith("x" * 1000) and "bytes of output left out" in out and len(out) < 5_000_000


# --------------------------------------------------------------------------- bench.verdicts
def test_wilson_interval_and_auc():
    from bench.verdicts import auc_interval, roc_auc, wilson

    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5 and roc_auc([], [1]) is None
    lo, hi = auc_interval(0.9, 20, 20)
    assert lo < 0.9 < hi <= 1.0


def _fake_models(n_clean=12, n_bad=12, seed=0):
    from bench.verdicts import Model

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_clean + n_bad):
        bad = i >= n_clean
        l1 = np.exp(rng.normal(4.5, 0.4, 10))
        if bad:
            l1[3] = 2.0
        out.append(Model(f"m{i}", "cifar" if i % 2 else "gtsrb", "b3d", "small_cnn_v1",
                         "badnets" if bad else "clean", bad, (3,) if bad else (), l1, (0.99,) if bad else ()))
    return out


def test_cross_validation_never_judges_a_model_with_a_rule_fitted_on_it(monkeypatch):
    from bench import verdicts

    models = _fake_models()
    fitted_on = []
    real_fit = verdicts.fit

    def spy(train, target_fpr, *args):
        fitted_on.append({m.name for m in train})
        return real_fit(train, target_fpr, *args)

    monkeypatch.setattr(verdicts, "fit", spy)
    judged, rules = verdicts.cross_validate(models, 4, 0.05, seed=1)
    folds = verdicts.folds_of(models, 4, 1)
    assert len(rules) == 4 and len(fitted_on) == 4
    for f, names in enumerate(fitted_on):
        held = {m.name for m, g in zip(models, folds, strict=True) if g == f}
        assert held and not (held & names) and held | names == {m.name for m in models}
    for g in range(4):  # stratified: every fold holds clean and backdoored models of both datasets
        kinds = {(m.dataset, m.backdoored) for m, x in zip(models, folds, strict=True) if x == g}
        assert len(kinds) == 4
    s = verdicts.summary(judged)
    assert s["tpr"] == (12, 12) and s["target_found"] == (12, 12)
    assert s["auc"][0] > 0.95


def test_the_fit_chooses_the_population_test_where_the_within_model_test_cannot_separate():
    """Backdoored models whose natural classes are small and spread widely (the wide zoo's CIFAR-10 failure):
    the planted 3 px is no outlier within its model, but far below the clean models' natural classes. The fit
    gives the population test weight, and its rule (re-applied through find_outliers) finds every target."""
    from bench import verdicts

    rng = np.random.default_rng(3)
    models = []
    for i in range(24):
        bad = i >= 12
        l1 = np.exp(rng.normal(np.log(120.0), 0.4, 10))
        if bad:  # a small, widely spread model: naturals of about 8-60 px, the target at 3 px
            l1 = np.exp(rng.normal(np.log(22.0), 0.8, 10))
            l1[3] = 3.0
        models.append(verdicts.Model(f"m{i}", "cifar", "b3d", "small_cnn_v1", "badnets" if bad else "clean", bad,
                                     (3,) if bad else (), l1, (0.99,) if bad else ()))
    within = verdicts.fit(models, 0.05, weights=(0.0,))
    both = verdicts.fit(models, 0.05)
    s_within = verdicts.summary([verdicts.judge(m, within) for m in models])
    s_both = verdicts.summary([verdicts.judge(m, both) for m in models])
    assert both.population_weight > 0
    assert s_both["fpr"][0] == 0 and s_both["target_found"] == (12, 12)
    assert s_within["target_found"][0] < 12
    clean_classes = np.concatenate([np.log(m.l1 / 1024) for m in models if not m.backdoored])
    assert both.population_mean == pytest.approx(np.median(clean_classes))


def test_failed_attacks_are_listed_not_counted():
    from dataclasses import replace

    from bench import verdicts

    models = _fake_models(6, 6)
    models[-1] = replace(models[-1], asr=(0.5,))
    models[-2] = replace(models[-2], asr=(0.8,), l1=np.full(10, 90.0))  # partly learned, its trigger not found
    text, data = verdicts.report(models, 2, 0.05, 0.9, 0)
    assert data["b3d"]["cv"]["models"] == 10
    assert "Not counted, the attack did not take" in text and models[-1].name in text
    # judged apart by the rule fitted on the 10 counted models: the planted 2-px target found, the flat one not
    weak = {w["model"]: w for w in data["b3d"]["not_taken"]}
    assert weak[models[-1].name]["target_found"] and not weak[models[-2].name]["target_found"]
    assert f"| {models[-2].name} | badnets | 0.80 | none | [3] missed |" in text
    assert "With a true ASR of at least 75 %, true target found: badnets 0/1." in text


def test_blend_records_add_the_blend_modes_flags_with_the_same_fold_rules(tmp_path):
    """A blended backdoor whose patch L1 is ordinary but whose blend amplitude stands out: the patch rows miss
    it, the patch + blend row finds it; amplitudes reach the models from records of a --blend scan."""
    from dataclasses import replace

    from bench import verdicts

    rng = np.random.default_rng(5)
    models = _fake_models(8, 8)
    blended = []
    for i, m in enumerate(models[-4:]):  # four of the backdoored: patch L1 ordinary, blend amplitude tiny
        l1 = m.l1.copy()
        l1[3] = float(np.median(l1))
        blended.append(replace(m, name=f"b{i}", attack="blended", l1=l1))
    models = models[:-4] + blended
    natural = np.geomspace(0.2, 0.4, 10)  # the blend amplitudes of natural classes, evenly spread
    blend_scans = [replace(m, blend=np.where(np.arange(10) == 3, 0.004, rng.permutation(natural))
                           if m.attack == "blended" else rng.permutation(natural)) for m in models]
    both = verdicts.with_blend(models, blend_scans)
    assert all(b.blend is not None and np.array_equal(b.l1, m.l1) and np.array_equal(b.blend_l1, m.l1)
               for b, m in zip(both, models, strict=True))
    text, data = verdicts.report(both, 2, 0.05, 0.9, 0)
    patch, with_blend = data["b3d"]["cv_blend_models_patch"], data["b3d"]["cv_blend_models_with_blend"]
    assert patch["target_found"] == (4, 8) and with_blend["target_found"] == (8, 8)  # the 4 blended: blend only
    assert with_blend["fpr"] == patch["fpr"]  # the blend mode adds no false positive here
    assert "patch + blend (CV)" in text
    # every blended target's amplitude row: 0.004, the smallest of its 10 classes
    for i in range(4):
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| b{i} | blended |"))
        assert "| 0.004 | 1 of 10 |" in row
    assert not any(ln.startswith("| m") and "| model |" not in ln for ln in text.splitlines())  # no clean, BadNets row
    # the record field a --blend scan writes is what load_records reads
    rec = {"model": "x", "dataset": "cifar", "method": "b3d", "backdoored": False, "targets": [],
           "l1_per_class": [50.0] * 10, "blend_amplitude_per_class": [0.3] * 10}
    (tmp_path / "x.b3d.json").write_text(json.dumps({"record": rec}))
    assert verdicts.load_records([tmp_path])[0].blend.tolist() == [0.3] * 10


def test_blend_scans_have_their_own_fingerprint_and_leave_old_records_valid():
    """--resume compares fingerprints: a blend-mode scan must never reuse a patch-only record (or the reverse),
    and the patch-only fingerprint must stay what it was before the option existed."""
    from bench.compare import Settings, fingerprint

    plain, blend = fingerprint(Settings(), "b3d"), fingerprint(Settings(blend=True), "b3d")
    assert plain != blend
    assert "blend" not in plain["settings"] and "blend" not in plain["scan"]
    assert blend["settings"]["blend"] is True and blend["scan"]["blend"] is True
    assert Settings(blend=True).scan_config().blend and not Settings().scan_config().blend


def _cost_record(model, k, flagged, queries, statuses):
    return {"record": {"model": model, "num_classes": k, "flagged": flagged, "complete": True,
                       "queries": {"scan": queries, "scan_per_class": queries / k}, "statuses": statuses}}


def test_cost_pairs_models_and_counts_verdicts_and_queries(tmp_path):
    from bench import cost

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder, recs in ((a, [("m43", 43, [29], 4_300_000, {"converged": 43}), ("m10", 10, [], 500_000, {}),
                              ("only_a", 10, [], 1, {})]),
                         (b, [("m43", 43, [29, 3], 2_150_000, {"converged": 12, "screened_out": 31}),
                              ("m10", 10, [], 500_000, {})])):
        for name, k, flagged, q, st in recs:
            (folder / f"{name}.b3d.json").write_text(json.dumps(_cost_record(name, k, flagged, q, st)))
    rows = cost.pairs(cost.load_records(a), cost.load_records(b))
    assert [ra["model"] for ra, _ in rows] == ["m10", "m43"]
    totals = cost.compare(rows)
    assert totals["same_flags"] == 1 and totals["classes"] == 53
    assert totals["per_class_unscreened"] == pytest.approx(4_800_000 / 53)
    assert totals["per_class_screened"] == pytest.approx(2_650_000 / 53)
    assert totals["by_classes"][43]["per_class_screened"] == pytest.approx(50_000)
    text = cost.table(rows, totals)
    assert "| m43 | 43 | [29] | [29, 3] | **no** |" in text and "12 / 31" in text


def test_cpu_description_names_the_model_and_its_simd_sets(tmp_path):
    from bench.compare import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512f\n")
    assert cpu_description(info) == "Test CPU 9000 (avx2 fma avx512f)"
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert cpu_description(info) == "Old CPU (no avx2)"
    assert isinstance(cpu_description(tmp_path / "missing"), str)


def test_methods_side_by_side_on_the_models_all_of_them_scanned():
    from dataclasses import replace

    from bench import verdicts

    b3d = _fake_models(8, 8)
    # NC scanned only 12 of the 16 models, and its clean models carry one small natural trigger each (MAD flags it)
    nc = []
    for m in b3d[2:14]:
        l1 = m.l1.copy()
        if not m.backdoored:
            l1[5] = l1.min() / 3
        nc.append(replace(m, method="nc", l1=l1))
    text, data = verdicts.report(b3d + nc, 2, 0.05, 0.9, 0)
    same = data["same_models"]
    assert same["models"] == sorted(m.name for m in nc)
    assert "Side by side on the 12 models every method scanned (6 clean)" in text
    for key in ("b3d calibrated (CV)", "b3d MAD (paper rule)", "nc calibrated (CV)", "nc MAD (paper rule)"):
        assert same[key]["models"] == 12 and same[key]["clean"] == 6
    assert same["nc MAD (paper rule)"]["fpr"] == (6, 6)  # every NC clean model's small natural class
    text_one, data_one = verdicts.report(b3d, 2, 0.05, 0.9, 0)
    assert "same_models" not in data_one and "Side by side" not in text_one
    # a third method on fewer models: NC beside B3D keeps its 12, and every method meets on the 6 all three scanned
    ss = [replace(m, method="b3d-ss") for m in b3d[5:11]]
    text_three, data_three = verdicts.report(b3d + nc + ss, 2, 0.05, 0.9, 0)
    assert data_three["same_models_nc_b3d"]["models"] == same["models"]
    assert data_three["same_models"]["models"] == sorted(m.name for m in ss)
    assert text_three.index("12 models NC and B3D scanned") < text_three.index("6 models every method scanned")


def test_the_blend_calibration_is_fitted_on_the_decision_with_its_own_false_positive_bound():
    """fit_blend: the blend population comes from the clean models' amplitudes; a backdoor the patch rule already
    finds needs no blend flag; the clean models' blend flags (not the patch rule's) are what the bound counts, so
    a patch false positive does not stop the blend rule from being fitted."""
    from dataclasses import replace

    from bench import verdicts

    rng = np.random.default_rng(11)
    models = _fake_models(10, 6)
    out = []
    for i, m in enumerate(models):
        amps = np.exp(rng.normal(np.log(0.3), 0.2, 10))
        l1 = m.l1.copy()
        if m.backdoored and i % 2:  # a blended backdoor: patch L1 ordinary, amplitude far below the population
            l1[3] = float(np.median(l1))
            amps[3] = 0.06
        out.append(replace(m, l1=l1, blend=amps, blend_l1=l1))
    patch = verdicts.fit(out, 0.05)
    params = verdicts.fit_blend(out, patch, 0.05)
    clean_amps = np.concatenate([np.log(m.blend) for m in out if not m.backdoored])
    assert params.population_mean == pytest.approx(np.median(clean_amps))
    judged = [verdicts.judge(m, patch, params) for m in out]
    s = verdicts.summary(judged)
    assert s["target_found"] == (6, 6)  # patch finds three, the blend amplitudes the other three
    blend_only = [j for j in judged if not j.model.backdoored
                  and verdicts.blend_outliers(j.model.blend, patch, params).flagged.any()]
    assert not blend_only  # no clean model flagged by its amplitudes
    # without the blend mode's amplitudes the same models lose the three blended targets
    assert verdicts.summary([verdicts.judge(m, patch) for m in out])["target_found"][0] == 3
    # a clean model the other rule flags (a patch false positive) does not count against the blend rule's bound
    prior = [tuple(int(c) for c in np.flatnonzero(verdicts.find_outliers(m.l1, patch, pixels=m.pixels).flagged))
             for m in out]
    with_fp = [(5,) if i == 0 else p for i, p in enumerate(prior)]
    a = verdicts.fit(out, 0.05, sizes=verdicts.BLEND, prior=prior)
    b = verdicts.fit(out, 0.05, sizes=verdicts.BLEND, prior=with_fp)
    assert (a.alpha, a.scale_floor, a.population_weight) == (b.alpha, b.scale_floor, b.population_weight)
    assert a.alpha > verdicts.ALPHAS[0]


def test_check_records_are_judged_by_the_shipped_rule_and_by_the_methods_own_fit():
    """B3D-SS scans made with other settings (--check-records) get a table of their own: each model judged by the
    policy's shipped rule and by the rule fitted on the method's records; the CV tables stay the records' own."""
    from dataclasses import replace

    from bench import verdicts

    ss = [replace(m, method="b3d-ss") for m in _fake_models(8, 8)]
    checks = [replace(m, name=f"check{i}") for i, m in enumerate(ss[6:10])]  # 2 clean, 2 backdoored
    text, data = verdicts.report(ss, 2, 0.05, 0.9, 0, checks)
    assert "(--check-records: 4 models)" in text
    assert "| check2 | [3] | [3] (" in text and "| check0 | none |" in text
    fitted = verdicts.fit(ss, 0.05)
    got = data["b3d-ss"]["check_records"]
    assert got["shipped rule"] == verdicts.summary([verdicts.judge(m, verdicts.OutlierRule()) for m in checks])
    assert got["rule fitted on these B3D-SS records"] == verdicts.summary([verdicts.judge(m, fitted) for m in checks])
    assert data["b3d-ss"]["cv"]["models"] == 16  # the checks are not counted in the cross-validation
    plain, plain_data = verdicts.report(ss, 2, 0.05, 0.9, 0)
    assert "check-records" not in plain and "check_records" not in plain_data["b3d-ss"]


def test_check_records_of_the_same_models_are_set_beside_their_records_scans_with_their_cost():
    from dataclasses import replace

    from bench import verdicts

    ss = [replace(m, method="b3d-ss", queries_per_class=1000.0) for m in _fake_models(8, 8)]
    # the same four models scanned another way: the backdoored ones' targets no longer small, five times the cost
    checks = [replace(m, queries_per_class=5000.0, l1=np.where(np.arange(10) == 3, 90.0, m.l1) if m.backdoored
                      else m.l1) for m in ss[6:10]]
    text, data = verdicts.report(ss, 2, 0.05, 0.9, 0, checks)
    side = data["b3d-ss"]["check_side_by_side"]
    assert side["the records' scans"]["tpr"] == (2, 2) and side["the --check-records scans"]["tpr"][0] < 2
    assert "The 4 models with both scans" in text
    assert "the records' scans 1,000, the --check-records scans 5,000" in text
