"""bench.class_seeds: one class of one zoo model searched with several seeds."""

import numpy as np
import pytest

from bench.class_seeds import main, patch_square
from tests.helpers import DEMO


def test_the_planted_patch_square_comes_from_the_manifest():
    man = {"triggers": [{"kind": "patch", "target": 29, "row": 26, "col": 25, "size": 3},
                        {"kind": "blend", "target": 4}]}
    rows, cols = patch_square(man, 29)
    assert (rows, cols) == (slice(26, 29), slice(25, 28))
    mask = np.zeros((32, 32))
    mask[26:29, 25:28] = 1.0
    assert mask[rows, cols].sum() == 9
    assert patch_square(man, 4) is None and patch_square(man, 7) is None


@pytest.mark.slow
def test_each_seed_is_a_row_and_a_seed_repeats_itself(capsys):
    args = ["gtsrb_badnets3x3", "--zoo-dir", str(DEMO), "--seeds", "2", "--max-images", "150",
            "--set", "search.max_steps=8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    rows = [line for line in first.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and "class 29 (a true target)" in first
    assert all(line.count("|") == 6 and line.endswith("% |") for line in rows)  # a patch target: its share shown
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded: the same table again


def test_bad_input_is_a_one_line_error(capsys):
    assert main(["no_such_model", "--zoo-dir", str(DEMO)]) == 2
    assert main(["gtsrb_clean", "--zoo-dir", str(DEMO)]) == 2  # a clean model has no target: --class needed
    assert main(["gtsrb_badnets3x3", "--zoo-dir", str(DEMO), "--set", "search.k=-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
