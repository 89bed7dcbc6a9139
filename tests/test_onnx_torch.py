"""The ONNX graph run with torch ops (bench.onnx_torch): the white-box baseline's network for any zoo model."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bench import zoo
from gate.oracle import Oracle
from tests.helpers import ROOT, linear_model

torch = pytest.importorskip("torch")
from bench.onnx_torch import OnnxGraph, white_box  # noqa: E402  (needs torch)

WIDE = ROOT / "models" / "wide_zoo"
# one model of each architecture, between them every input encoding and both output kinds
MODELS = [
    "w_gtsrb_small_cnn_v1_clean_02",  # NCHW, mean/std, logits
    "w_cifar_deep_cnn_badnets_13",  # NHWC, 0..255 (Transpose + Mul in the graph), probs
    "w_cifar_resnet_bn_blended_25",  # NHWC, 0..255, probs (residual Add)
    "w_cifar_mobilenet_dw_clean_38",  # NCHW, mean/std, logits (grouped convolutions)
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name", MODELS)
def test_white_box_matches_onnxruntime_and_passes_gradients(name):
    path = WIDE / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{name} not built")
    man = zoo.load_manifest(path)
    x = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    probs = Oracle(man["_onnx"], zoo.spec_overrides(man), device="cpu", threads=1).probs(x)
    net, normalize = zoo.torch_model(man)  # no .pt in the wide zoo: the white box, encoding inside
    assert normalize is None
    xt = _nchw(x).requires_grad_(True)
    logits = net(xt)
    assert logits.shape == (16, man["num_classes"])
    assert np.abs(torch.softmax(logits, 1).detach().numpy() - probs).max() < 1e-4
    assert np.array_equal(logits.argmax(1).numpy(), probs.argmax(1))
    torch.nn.functional.cross_entropy(logits, torch.zeros(16, dtype=torch.long)).backward()
    assert torch.isfinite(xt.grad).all() and (xt.grad != 0).any()
    assert not list(net.parameters())  # weights are buffers: the NC search optimises only its trigger
    if man["input_spec"]["output_kind"] == "probs":  # white-box: NC gets the logits before the final Softmax
        assert net.logits is not None and not net.log_probs
        assert torch.isfinite(logits).all() and logits.detach().max() > 0  # log-probabilities never exceed 0


def test_an_unsupported_op_is_named(tmp_path):
    linear_model(tmp_path / "lin.onnx")  # Flatten -> MatMul -> Add -> Identity
    with pytest.raises(ValueError, match="'MatMul'"):
        OnnxGraph(tmp_path / "lin.onnx")


def _tiny(tmp_path, node):
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "W")
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads (onnx itself writes newer)
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    return tmp_path / "tiny.onnx"


def test_an_unsupported_attribute_value_is_named(tmp_path):
    path = _tiny(tmp_path, helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", name="c1"))
    with pytest.raises(ValueError, match="Conv node 'c1': auto_pad='SAME_UPPER'"):
        OnnxGraph(path)
    path = _tiny(tmp_path, helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], ceil_mode=1))
    with pytest.raises(ValueError, match="MaxPool.*ceil_mode=1"):
        OnnxGraph(path)


def test_asymmetric_conv_padding_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    path = _tiny(tmp_path, helper.make_node("Conv", ["x", "W"], ["y"], pads=[0, 1, 2, 0], strides=[2, 1]))
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = OnnxGraph(path)(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_white_box_rejects_an_incomplete_spec():
    man = zoo.load_manifest(WIDE / f"{MODELS[0]}.json") if (WIDE / f"{MODELS[0]}.json").is_file() else None
    if man is None:
        pytest.skip("no wide zoo model")
    with pytest.raises(ValueError, match="output_kind"):
        white_box(man["_onnx"], {**man["input_spec"], "output_kind": None})
