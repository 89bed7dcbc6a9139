"""bench.conventions: the wide zoo's export variants with nothing stated, against their documented conventions."""

import json

import pytest

from bench.conventions import main
from bench.zoo import WIDE_ZOO_DIR

THREE = ["w_gtsrb_small_cnn_v1_clean_00", "w_gtsrb_small_cnn_v1_badnets_01", "w_gtsrb_small_cnn_v1_clean_02"]


@pytest.mark.skipif(not all((WIDE_ZOO_DIR / f"{n}.onnx").is_file() for n in THREE), reason="wide zoo not built")
def test_each_documented_convention_is_found_or_kept(tmp_path, capsys):
    """[0,1] kept; [0,255] and the dataset's own mean/std found from a start near chance or well under."""
    assert main(["--models", *THREE, "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    kept, range255, own = (rows[n] for n in THREE)
    assert kept["documented"] == "NCHW [0,1]" and kept["switched_to"] is None and kept["final_is_documented"]
    assert range255["documented"] == "NHWC [0,255]" and range255["switched_to"] == "NHWC [0,255]"
    assert range255["start_accuracy"] < 0.2 < 0.6 < range255["accuracy"] == range255["documented_accuracy"]
    assert own["switched_to"] == "NCHW the data's own mean/std" and own["final_is_documented"]
    assert own["accuracy"] > own["start_accuracy"] + 0.1
    assert all(r["output_kind"] == r["output_kind_documented"] for r in rows.values())
    assert "| NHWC [0,255] | 1 |" in out and "Output kind (probabilities or logits) as probed: 3 of 3" in out


def test_unknown_models_are_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--models", "no_such_model", "--zoo-dir", str(tmp_path)])
    assert exc.value.code == 2
