"""``--labels`` (class names for the reports) and ``--model-name`` (the metrics' label) on the command line:
what they accept, and the one-line usage error (exit 4) for everything else, never a report with wrong names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gate.cli import main
from gate.errors import UsageError
from gate.labels import check_count, parse_class_names, read_class_names
from tests.helpers import linear_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
LENIENT = {"name": "lenient", "outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
           "rules": {"small_trigger": None, "weak_search": None}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("labels")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8))
    (d / "lenient.yaml").write_text(yaml.safe_dump(LENIENT))
    return d


def run(capsys, tiny: Path, out: Path, *extra) -> tuple[int, str, str]:
    code = main(["run", str(tiny / "tiny.onnx"), "--policy", str(tiny / "lenient.yaml"), "--out", str(out),
                 "--data", str(tiny / "data.npz"), *FAST, *map(str, extra)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


# --------------------------------------------------------------------------- the file
def test_names_one_per_line_or_a_json_list(tmp_path):
    (tmp_path / "a.txt").write_text("  cat \ndog\r\nbird\n\n\n")
    (tmp_path / "b.json").write_text(json.dumps(["cat", "dog", "bird"]))
    (tmp_path / "c.names").write_text('\n ["cat", "dog", "bird"]\n')  # JSON by its content
    (tmp_path / "d.txt").write_bytes("\ufeffcat\ndog\nbird\n".encode())  # a BOM from an editor
    for name in ("a.txt", "b.json", "c.names", "d.txt"):
        assert read_class_names(tmp_path / name) == ["cat", "dog", "bird"], name
    assert check_count(["a", "b"], 2, "x") == ["a", "b"]


@pytest.mark.parametrize("content,message", [
    (b"cat\n\ndog\n", "line 2 is empty"),
    (b"", "no class names"),
    (b"\n\n", "no class names"),
    (b'["cat", 3]', "one list of strings"),
    (b'{"0": "cat"}', None),  # not JSON by content, not .json: one (odd) name per line is fine
    (b'["cat", ""]', "entry 2 is empty"),
    (b'["cat", "dog"', "not valid JSON"),
    (b"caf\xe9\n", "not UTF-8 text"),
])
def test_a_bad_labels_file_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    if message is None:
        assert read_class_names(path) == ['{"0": "cat"}']
        return
    with pytest.raises(UsageError) as exc:
        read_class_names(path)
    text = str(exc.value)
    assert text.startswith(f"--labels {path}: ") and message in text and "\n" not in text


def test_a_json_file_must_hold_a_list(tmp_path):
    (tmp_path / "l.json").write_text('{"0": "cat"}')
    with pytest.raises(UsageError, match="one list of strings"):
        read_class_names(tmp_path / "l.json")
    with pytest.raises(UsageError, match="cannot read it"):
        read_class_names(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="cannot read it"):
        read_class_names(tmp_path)  # a folder
    with pytest.raises(UsageError, match="2 class names for a model with 5 classes"):
        check_count(["a", "b"], 5, "l.txt")
    with pytest.raises(ValueError):
        parse_class_names("[1, 2]")


# --------------------------------------------------------------------------- gate run
def test_gate_run_names_the_classes_in_every_report(tiny, tmp_path, capsys):
    names = ["cat", "dog", "bird <b>", "fish", "horse"]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, tiny, out, "--labels", tmp_path / "labels.txt")
    assert code == 0, stdout
    doc = json.loads((out / "report.json").read_text())
    assert doc["class_names"] == names
    html = (out / "report.html").read_text()
    assert "bird &lt;b&gt;" in html and "bird <b>" not in html
    assert 'id="reproduce"' in html and "--labels" in html  # the command that reproduces it says so
    for link in ("report.json", "report.sarif", "junit.xml", "attestation.json", "metrics.prom"):
        assert f'href="{link}"' in html and (out / link).is_file(), link


def test_gate_scan_writes_the_names_into_report_json(tiny, tmp_path, capsys):
    (tmp_path / "labels.json").write_text(json.dumps(list("abcde")))
    code = main(["scan", str(tiny / "tiny.onnx"), "--data", str(tiny / "data.npz"), "--out", str(tmp_path / "o"),
                 "--labels", str(tmp_path / "labels.json"), *FAST])
    capsys.readouterr()
    assert code in (0, 3)
    assert json.loads((tmp_path / "o" / "report.json").read_text())["class_names"] == list("abcde")


def test_an_unreadable_labels_file_is_a_usage_error_before_the_run(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, tiny, out, "--labels", tmp_path / "missing.txt")
    assert code == 4 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--labels" in lines[0] and "missing.txt: cannot read it" in lines[0]
    assert not out.exists(), "a usage error found before the run writes nothing"


def test_the_wrong_number_of_names_is_a_usage_error_never_a_report(tiny, tmp_path, capsys):
    """The count is known once the model is open: the folder then says usage, and holds no verdict."""
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, tiny, out, "--labels", tmp_path / "labels.txt")
    assert code == 4
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "2 class names for a model with 5 classes" in lines[0]
    assert (out / "outcome").read_text() == "usage\n" and (out / "exit_code").read_text() == "4\n"
    assert json.loads((out / "report.json").read_text())["decision"]["outcome"] == "running"
    assert not (out / "report.html").exists() and not (out / "attestation.json").exists()


def test_model_name_labels_the_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, tiny, out, "--model-name", "vendor-a/tiny")
    assert code == 0
    text = (out / "metrics.prom").read_text()
    assert 'backdoor_gate_decision{model="vendor-a/tiny",outcome="accept"} 1.0' in text
    assert "sha256-" not in text.split("backdoor_gate_model_info")[0]
    code, stdout, stderr = run(capsys, tiny, tmp_path / "bad", "--model-name", "vendor a")
    assert code == 4 and stdout == "" and "--model-name 'vendor a'" in stderr and len(stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
