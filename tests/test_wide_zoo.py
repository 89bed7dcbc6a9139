"""The wide zoo's recipes, the new architectures and attacks, and one tiny real build (seconds, no dataset)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from models.triggers import apply_trigger, make_placed_patch, make_sig_trigger, trigger_mask
from models.wide_zoo import WIDE_ZOO_SPECS

H = W = 32


def test_the_zoo_can_measure_a_few_percent():
    names = [s["name"] for s in WIDE_ZOO_SPECS]
    assert len(names) == len(set(names)) == 96
    assert len({s["seed"] for s in WIDE_ZOO_SPECS}) == 96
    for dataset in ("gtsrb", "cifar"):
        mine = [s for s in WIDE_ZOO_SPECS if s["dataset"] == dataset]
        clean = [s for s in mine if s["attack"] == "clean"]
        assert len(clean) == 24 and len(mine) - len(clean) == 24
        assert len({s["arch"] for s in mine}) >= 3
        assert len({(s["arch"], s["width"]) for s in mine}) > len({s["arch"] for s in mine}), "several widths"
        families = collections.defaultdict(set)
        for s in mine:
            families[s["attack"]].add(s["arch"])
        assert {"badnets", "blended", "sig", "label_consistent", "multi"} <= set(families)
        assert all(len(f) >= 2 for a, f in families.items() if a != "clean"), "every attack on 2+ architectures"
        sizes = {n for s in mine if s["attack"] == "badnets" for n in s["params"]["sizes"]}
        assert sizes == {1, 2, 3, 4, 5, 6}
        assert {len(s["params"]["sizes"]) for s in mine if s["attack"] == "multi"} == {2, 3}
        assert {s["params"]["alpha"] for s in mine if s["attack"] == "blended"} == {0.1, 0.2}
    first = WIDE_ZOO_SPECS[:16]  # any prefix of the build is a mixed sample
    assert {s["dataset"] for s in first} == {"gtsrb", "cifar"} and len({s["arch"] for s in first}) == 4
    assert 6 <= sum(s["attack"] == "clean" for s in first) <= 10


@pytest.mark.parametrize("position", ["corner", "edge", "centre", "random"])
def test_placed_patches_sit_where_asked(position):
    rng = np.random.default_rng(3)
    for size in range(1, 7):
        t = make_placed_patch(rng, size, H, W, position)
        r, c, last = t["row"], t["col"], H - size
        assert 0 <= r <= last and 0 <= c <= last
        if position == "corner":
            assert r in (0, last) and c in (0, last)
        elif position == "edge":
            assert (r in (0, last)) != (c in (0, last)), "on one border, not in a corner"
        elif position == "centre":
            assert abs(r - last // 2) <= 2 and abs(c - last // 2) <= 2
    a = make_placed_patch(rng, 6, H, W, "corner")
    b = make_placed_patch(rng, 6, H, W, "corner", avoid=[a])
    assert not (trigger_mask(a, H, W) & trigger_mask(b, H, W)).any()
    with pytest.raises(ValueError, match="position"):
        make_placed_patch(rng, 2, H, W, "middle")


def test_sig_trigger_by_hand():
    t = make_sig_trigger(20 / 255, 6)
    x = np.full((2, H, W, 3), 128, np.uint8)
    out = apply_trigger(x, t)
    wave = 20 * np.sin(2 * np.pi * np.arange(W) * 6 / W)
    assert out.dtype == np.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out[0, 5, :, 1], np.rint(128 + wave).astype(np.uint8))
    assert (out[:, 0] == out[:, 17]).all(), "the same signal on every row"
    hi = apply_trigger(np.full((1, H, W, 3), 250, np.uint8), t)
    assert hi.max() == 255, "clipped at the top"
    f = apply_trigger(np.full((1, H, W, 3), 0.5, np.float32), t)
    np.testing.assert_allclose(f[0, 0, :, 0], 0.5 + wave / 255, atol=1e-6)
    assert trigger_mask(t, H, W).all()


def test_every_architecture_exports_and_onnx_agrees_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from models.architectures import ARCHS, build_net
    from models.forge import export_onnx

    x = np.random.default_rng(0).random((4, 3, H, W), dtype=np.float32)
    for arch in ARCHS:
        for width in (1, 2):
            net = build_net(arch, 10, width).eval()
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            assert ref.shape == (4, 10)
            path = tmp_path / f"{arch}_{width}.onnx"
            export_onnx(net, path, {"layout": "NCHW", "value_range": 1, "output_kind": "logits"})
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(sess.run(["output"], {"input": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_clean_label_poisoning_keeps_labels_and_stamps_the_target_class():
    pytest.importorskip("torch")
    from models.forge import poison

    y = np.repeat(np.arange(5), 20)
    labels, stamps, counts = poison(y, [{"target": 3}], 0.8, np.random.default_rng(0), clean_label=True)
    np.testing.assert_array_equal(labels, y)
    assert counts == [16] and set(np.flatnonzero(stamps >= 0)) <= set(np.flatnonzero(y == 3))


def _tiny_data(k: int = 4, n: int = 240) -> dict:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(k), n // k)
    x = (rng.random((n, H, W, 3)) * 60 + 40 * y[:, None, None, None] + 20).astype(np.uint8)  # a bright class each
    return {"x_train": x, "y_train": y, "x_test": x[::4], "y_test": y[::4], "num_classes": k,
            "split": {"description": "synthetic, for this test"}}


@pytest.mark.parametrize("arch,attack,params,rate", [
    ("resnet_bn", "label_consistent", {"sizes": [3], "position": "corner", "mix": 0.5}, 0.8),
    ("mobilenet_dw", "sig", {"delta": 20 / 255, "freq": 6}, 1.0),
    ("deep_cnn", "multi", {"sizes": [2, 3, 2], "position": "random"}, 0.1),
])
def test_a_tiny_wide_zoo_build_records_its_truth_and_resumes(tmp_path, arch, attack, params, rate):
    torch = pytest.importorskip("torch")
    from models import forge

    torch.set_num_threads(1)
    spec = {"name": f"tiny_{arch}", "dataset": "gtsrb", "seed": 5, "arch": arch, "width": 1, "attack": attack,
            "params": params, "variant": {"layout": "NHWC", "value_range": 255, "normalize": False},
            "output_kind": "probs", "poison_rate": rate, "epochs": 1}
    man = forge.build_model(spec, _tiny_data(), tmp_path, save_pt=False, log=lambda *_: None)
    assert man["arch"] == arch and man["backdoored"] and len(man["asr"]) == len(params.get("sizes", [1]))
    assert len({t["target"] for t in man["triggers"]}) == len(man["triggers"]), "one target per trigger"
    assert man["poisoning"].startswith("clean-label") == (attack in forge.CLEAN_LABEL)
    assert forge.built(spec, tmp_path) == man
    assert forge.built({**spec, "epochs": 2}, tmp_path) is None, "a changed recipe is built again"
    (tmp_path / f"{spec['name']}.onnx").write_bytes(b"truncated")
    assert forge.built(spec, tmp_path) is None, "a damaged model is built again"
