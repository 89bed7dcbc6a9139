"""The scan's input-convention check: a model that wants [0, 255], ImageNet-normalised or its data's own
mean/std-normalised images, scanned with nothing stated, is scanned under the convention its labelled data says
it was trained with; one that fits the convention in use, or whose convention is stated, is left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gate.cli import main
from gate.conventions import PROBE_IMAGES, chance_p, check_convention, data_stats, mcnemar_p
from gate.data import fit_to_model, load_images
from gate.oracle import Oracle
from gate.report.limits import blind_spots
from gate.result import ScanResult
from tests.helpers import DEMO, DEMO_MODEL, reconventioned_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
IMAGENET = {"scale": (0.229, 0.224, 0.225), "offset": (0.485, 0.456, 0.406)}

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo models not built yet")


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    """The demo model behind [0, 255] and behind ImageNet normalisation, and the demo's labelled images."""
    d = tmp_path_factory.mktemp("conventions")
    reconventioned_model(DEMO_MODEL, d / "range255.onnx", scale=(1 / 255,))
    reconventioned_model(DEMO_MODEL, d / "imagenet.onnx", **IMAGENET)
    mean, std = data_stats(load_images(DEMO / "gtsrb_sample.npz").x)  # a vendor normalising with its data's statistics
    reconventioned_model(DEMO_MODEL, d / "own.onnx", scale=std, offset=mean)
    return d


def labelled(oracle):
    images = fit_to_model(load_images(DEMO / "gtsrb_sample.npz"), oracle.image_shape)
    return images.x, images.y


def test_better_than_guessing():
    assert chance_p(0, 100, 0.1) == pytest.approx(1.0)
    assert chance_p(100, 100, 0.5) == pytest.approx(0.5 ** 100)
    assert chance_p(16, 100, 0.2) > 0.5 and chance_p(37, 100, 0.1) < 1e-9


def test_mcnemar_counts_only_the_images_the_two_disagree_on():
    a = np.array([True] * 10 + [False] * 5 + [True] * 20)
    b = np.array([False] * 10 + [False] * 5 + [True] * 20)
    assert mcnemar_p(a, b) == pytest.approx(2 / 2 ** 10) == mcnemar_p(b, a)
    assert mcnemar_p(a, a) == 1.0
    c = np.array([True, False] * 10)  # 10 each way: no evidence
    assert mcnemar_p(c, ~c) == 1.0


@pytest.mark.parametrize("name, want", [("range255", "NCHW [0,255]"),
                                        ("imagenet", "NCHW ImageNet mean/std on [0,1]"),
                                        ("own", "NCHW the data's own mean/std")])
def test_a_model_fed_the_wrong_convention_switches_to_the_one_that_fits(wrapped, name, want):
    oracle = Oracle(wrapped / f"{name}.onnx", device="cpu")
    check = check_convention(oracle, *labelled(oracle))
    assert check.accuracy < 0.6 and check.chosen is not None and check.chosen.label == want
    assert check.fits[0].convention == check.chosen and check.fits[0].accuracy > 0.7 and check.p_value < 1e-3
    measured = [f for f in check.fits if f.accuracy is not None]  # NHWC cannot read this input shape
    assert check.queries == PROBE_IMAGES * len(measured) and oracle.queries == 8  # views count, not the oracle


def test_a_model_that_fits_the_default_keeps_it(monkeypatch):
    oracle = Oracle(DEMO_MODEL, device="cpu")
    sent = []
    real = Oracle._run_raw
    monkeypatch.setattr(Oracle, "_run_raw", lambda self, batch: sent.append(len(batch)) or real(self, batch))
    check = check_convention(oracle, *labelled(oracle))
    assert sum(sent) == check.queries  # every image the model saw is counted, once
    assert check.chosen is None and check.accuracy > 0.7
    assert check.fits[0].convention == check.in_use or check.p_value >= 1e-3
    measured = [f for f in check.fits if f.accuracy is not None]  # views count their own queries
    assert check.queries == PROBE_IMAGES * len(measured) and oracle.queries == 8  # 8: the output-kind probe


def test_labels_no_convention_matches_switch_nothing(wrapped):
    oracle = Oracle(wrapped / "range255.onnx", device="cpu")
    x, y = labelled(oracle)
    rng = np.random.default_rng(0)
    for labels in ((y + 1) % 43, rng.integers(0, 43, len(y))):  # never the model's class, and at random
        check = check_convention(oracle, x, labels)
        assert check.chosen is None and len(check.fits) > 1


def test_gate_run_scans_under_the_convention_that_fits_and_says_so(wrapped, tmp_path, capsys):
    code = main(["run", str(wrapped / "range255.onnx"), "--data", str(DEMO / "gtsrb_sample.npz"), "--out",
                 str(tmp_path / "o"), *FAST[:-1]])  # not --quiet: the switch is said on stderr
    err = capsys.readouterr().err
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    conv = doc["data"]["convention"]
    assert conv["switched_to"] == "NCHW [0,255]" and "--input-range 255" in conv["flags"]
    assert "scanning under NCHW [0,255]" in err
    assert doc["input_spec"]["value_range"] == 255.0 and "convention" in doc["input_spec"]["detected"]
    assert doc["data"]["clean_accuracy"] >= 0.5  # the scan's own measure, under the chosen convention
    q = doc["queries"]
    assert q["convention"] == conv["queries"] == PROBE_IMAGES * len(conv["fits"]) and q["total"] == q["scan"] + q[
        "convention"]
    assert "BG006" not in {f["rule"] for f in doc["decision"]["findings"]} and code in (0, 1, 3)
    spots = blind_spots(ScanResult.from_dict(doc))  # the report page says the convention was not stated
    assert any(s.startswith("Input convention: nobody stated it; the scan ran under NCHW [0,255]") and
               "--input-range 255" in s for s in spots)


def test_a_stated_convention_is_never_second_guessed(wrapped, tmp_path, capsys):
    """--input-range 1 stated: no check, the model stays near chance, and the clean-accuracy rule says why."""
    code = main(["run", str(wrapped / "range255.onnx"), "--data", str(DEMO / "gtsrb_sample.npz"), "--input-range", "1",
                 "--out", str(tmp_path / "o"), *FAST])
    capsys.readouterr()
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "convention" not in doc["data"] and doc["queries"]["convention"] == 0
    assert doc["input_spec"]["value_range"] == 1.0 and doc["data"]["clean_accuracy"] < 0.2
    assert code == 3 and "BG006" in {f["rule"] for f in doc["decision"]["findings"]}


def test_a_uint8_input_has_no_convention_to_check(tmp_path, capsys):
    """Whole pixel values fix the range and leave any normalisation inside the model: the check is skipped."""
    from onnx import TensorProto

    from tests.helpers import linear_model

    linear_model(tmp_path / "u8.onnx", size=8, classes=4, in_type=TensorProto.UINT8, seed=2)
    x = (np.random.default_rng(1).random((120, 8, 8, 3)) * 255).astype(np.uint8)
    y = Oracle(tmp_path / "u8.onnx", device="cpu").predict(x / 255.0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    main(["run", str(tmp_path / "u8.onnx"), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"), *FAST])
    capsys.readouterr()
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert doc["input_spec"]["dtype"] == "uint8" and doc["input_spec"]["value_range"] == 255.0
    assert "convention" not in doc["data"] and doc["queries"]["convention"] == 0
    assert doc["data"]["clean_accuracy"] == 1.0  # its own labels, through the same rounding


def test_inspect_says_what_a_scan_would_do(wrapped, capsys):
    args = ["inspect", str(wrapped / "range255.onnx"), "--data", str(DEMO / "gtsrb_sample.npz")]
    assert main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scan_convention"]["switched_to"] == "NCHW [0,255]"
    assert main(args) == 0
    assert "gate run/scan would switch to NCHW [0,255] (McNemar p" in capsys.readouterr().out
    assert main([*args, "--input-range", "255", "--json"]) == 0  # stated: the scan would not check
    assert "scan_convention" not in json.loads(capsys.readouterr().out)
