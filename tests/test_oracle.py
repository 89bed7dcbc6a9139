"""The oracle against direct InferenceSession calls, its budget, and every bad-input error."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from gate.errors import ModelError, QueryBudgetExceeded
from gate.oracle import Oracle, softmax
from gate.spec import SpecOverrides
from tests.helpers import linear_model, pooled_model


def direct(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture
def images():
    return np.random.default_rng(1).random((7, 4, 4, 3), dtype=np.float32)


@pytest.mark.parametrize("softmax_out", [False, True])
def test_nchw_unit_range_matches_direct_session(tmp_path, images, softmax_out):
    path = tmp_path / "m.onnx"
    linear_model(path, softmax=softmax_out)
    o = Oracle(path, device="cpu")
    assert o.spec.layout == "NCHW" and o.spec.output_kind == ("probs" if softmax_out else "logits")
    assert set(o.spec.detected) == {"layout", "output_kind"}
    raw = direct(path, images.transpose(0, 3, 1, 2).copy())
    want = raw if softmax_out else softmax(raw.astype(np.float64))
    np.testing.assert_allclose(o.probs(images), want, rtol=1e-5, atol=1e-6)
    assert o.providers == ["CPUExecutionProvider"]


def test_nhwc_255_range_with_normalisation(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, layout="NHWC")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    o = Oracle(path, SpecOverrides(value_range=255.0, mean=tuple(m * 255 for m in mean),
                                   std=tuple(s * 255 for s in std), output_kind="logits"), device="cpu")
    assert o.spec.layout == "NHWC"
    encoded = ((images * 255 - np.array(mean) * 255) / (np.array(std) * 255)).astype(np.float32)
    np.testing.assert_allclose(o.probs(images), softmax(direct(path, encoded).astype(np.float64)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(o.encode(images), encoded, rtol=1e-5, atol=1e-5)


def test_layout_override_and_fixed_batch_of_one(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, batch=1)
    o = Oracle(path, SpecOverrides(layout="NCHW"), device="cpu")
    assert o.spec.batch == 1 and "layout" not in o.spec.detected
    want = np.concatenate([direct(path, im[None].transpose(0, 3, 1, 2).copy()) for im in images])
    np.testing.assert_allclose(o.probs(images), softmax(want.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_fixed_batch_pads_last_chunk(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, batch=3, softmax=True)
    o = Oracle(path, device="cpu")
    want = np.concatenate([direct(path, im[None].transpose(0, 3, 1, 2).repeat(3, 0).copy())[:1] for im in images])
    np.testing.assert_allclose(o.probs(images), want, rtol=1e-5, atol=1e-6)


def test_max_batch_chunks_and_query_counter(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, softmax=True)
    o = Oracle(path, SpecOverrides(output_kind="probs"), device="cpu", max_batch=2)
    assert o.queries == 0  # stated output kind: no probing
    p = o.probs(images)
    assert p.shape == (7, 5) and o.queries == 7
    o.predict(images[:3])
    assert o.queries == 10


@pytest.mark.parametrize("batch", ["N", 3])
@pytest.mark.parametrize("max_batch", [2, 4096])
def test_concurrent_calls_answer_as_one_call(tmp_path, batch, max_batch):
    """A batch split over concurrent single-thread calls: the same rows, in order, and the same count."""
    path = tmp_path / "m.onnx"
    linear_model(path, batch=batch, softmax=True, classes=7)
    x = np.random.default_rng(3).random((11, 4, 4, 3), dtype=np.float32)
    one = Oracle(path, SpecOverrides(output_kind="probs"), device="cpu", max_batch=max_batch)
    many = Oracle(path, SpecOverrides(output_kind="probs"), device="cpu", max_batch=max_batch, calls=3)
    np.testing.assert_allclose(many.probs(x), one.probs(x), rtol=1e-6, atol=1e-7)
    assert many.probs(x[:1]).shape == (1, 7) and many.queries == one.queries + 1 == 12
    with pytest.raises(ValueError, match="calls"):
        Oracle(path, device="cpu", calls=0)


def test_probing_counts_queries(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path)
    assert Oracle(path, device="cpu").queries == 8


def test_query_budget_refuses_before_exceeding(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, softmax=True)
    o = Oracle(path, SpecOverrides(output_kind="probs"), device="cpu", max_queries=10)
    o.probs(images)
    with pytest.raises(QueryBudgetExceeded, match="budget"):
        o.probs(images)
    assert o.queries == 7  # the refused call sent nothing
    o.probs(images[:3])
    assert o.queries == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"extra_input": True}, "exactly one input"),
    ({"in_type": TensorProto.INT64}, "unsupported input dtype"),
    ({"output_rank3": True}, "gives no score for every class"),
    ({"nan": True}, "non-finite"),
])
def test_bad_models_give_one_line_errors(tmp_path, kwargs, message):
    path = tmp_path / "m.onnx"
    linear_model(path, **kwargs)
    with pytest.raises(ModelError, match=message) as err:
        Oracle(path, device="cpu")
    assert "\n" not in str(err.value)


def test_rank3_input_is_refused(tmp_path):
    import onnx
    from onnx import helper

    g = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 4])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "r3.onnx"))
    with pytest.raises(ModelError, match="rank 4"):
        Oracle(tmp_path / "r3.onnx", device="cpu")


def test_missing_and_not_onnx(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Oracle(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX model") as err:
        Oracle(junk)
    assert "\n" not in str(err.value)


def test_wrong_image_shape_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path, softmax=True)
    o = Oracle(path, device="cpu")
    with pytest.raises(ModelError, match="do not match"):
        o.probs(np.zeros((2, 5, 5, 3), np.float32))


def test_float16_model(tmp_path, images):
    path = tmp_path / "m.onnx"
    linear_model(path, in_type=TensorProto.FLOAT16, softmax=True)
    o = Oracle(path, device="cpu")
    assert o.spec.dtype == "float16"
    want = direct(path, images.transpose(0, 3, 1, 2).astype(np.float16))
    np.testing.assert_allclose(o.probs(images), want, rtol=1e-3, atol=1e-4)


def test_uint8_model_gets_whole_pixel_values(tmp_path, images):
    """A uint8 input: [0, 255] whatever is stated about the range, every value rounded to the nearest pixel value."""
    path = tmp_path / "m.onnx"
    linear_model(path, in_type=TensorProto.UINT8, softmax=True)
    o = Oracle(path, device="cpu")
    assert (o.spec.dtype, o.spec.value_range) == ("uint8", 255.0) and "value_range" in o.spec.detected
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    want = direct(path, pixels.transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(o.probs(images), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(o.encode(images), pixels.transpose(0, 3, 1, 2))
    assert Oracle(path, SpecOverrides(value_range=255.0), device="cpu").spec.detected == ("layout", "output_kind")
    with pytest.raises(ModelError, match="uint8 pixels .* an input range of 1 cannot apply"):
        Oracle(path, SpecOverrides(value_range=1.0), device="cpu")
    with pytest.raises(ModelError, match="a mean/std cannot apply"):
        Oracle(path, SpecOverrides(mean=(0.5,), std=(0.5,)), device="cpu")


def _sessions_built(monkeypatch, fake_gpu: bool):
    """Record every session the oracle builds (its providers and threads); with ``fake_gpu`` the sessions say they
    got the CUDA provider, as on a machine with a GPU."""
    built = []
    real = Oracle._session

    def spy(self, ort_module, providers, threads):
        built.append((list(providers), threads))
        session = real(self, ort_module, ["CPUExecutionProvider"], threads)
        if not fake_gpu:
            return session

        class OnGpu:
            def __getattr__(self, name):
                return getattr(session, name)

            def get_providers(self):
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        return OnGpu()

    monkeypatch.setattr(Oracle, "_session", spy)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return built


def test_a_gpu_session_is_built_once_with_calls(tmp_path, monkeypatch):
    """On a GPU the model is loaded once, with onnxruntime's own threads, whatever ``calls`` says."""
    path = tmp_path / "m.onnx"
    linear_model(path)
    built = _sessions_built(monkeypatch, fake_gpu=True)
    oracle = Oracle(path, device="auto", calls=2)
    assert oracle.on_cuda and built == [(["CUDAExecutionProvider", "CPUExecutionProvider"], 0)]


def test_a_cuda_session_that_fell_back_to_the_cpu_gets_one_thread_per_call(tmp_path, monkeypatch):
    """onnxruntime-gpu with no GPU: the session asked for CUDA got the CPU, so it is rebuilt with the one thread each
    of the CPU calls runs on; a CPU-only request builds that session at once; one call keeps the library's threads."""
    path = tmp_path / "m.onnx"
    linear_model(path)
    built = _sessions_built(monkeypatch, fake_gpu=False)
    oracle = Oracle(path, device="auto", calls=2)
    assert not oracle.on_cuda and oracle.providers == ["CPUExecutionProvider"]
    assert [t for _, t in built] == [0, 1]
    built.clear()
    Oracle(path, device="cpu", calls=2)
    assert built == [(["CPUExecutionProvider"], 1)]
    built.clear()
    Oracle(path, device="auto", calls=1)
    assert [t for _, t in built] == [0]


# --------------------------------------------------------------------------- dynamic height and width
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_dynamic_height_and_width_take_the_stated_size(tmp_path, layout):
    """An input declared [N, 3, h, w] (or [N, h, w, 3]) is refused until the size is stated, then runs at it."""
    path = tmp_path / "dyn.onnx"
    pooled_model(path, layout=layout)
    with pytest.raises(ModelError, match=r"dynamic height or width.*--image-size HxW") as err:
        Oracle(path, device="cpu")
    assert "\n" not in str(err.value)

    o = Oracle(path, SpecOverrides(size=(8, 6)), device="cpu")
    assert (o.spec.layout, o.spec.image_shape) == (layout, (8, 6, 3))
    assert "layout" in o.spec.detected  # read from the one fixed dimension, the channels
    x = np.random.default_rng(3).random((5, 8, 6, 3), dtype=np.float32)
    raw = direct(path, x.transpose(0, 3, 1, 2).copy() if layout == "NCHW" else x)
    np.testing.assert_allclose(o.probs(x), softmax(raw.astype(np.float64)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="do not match"):
        o.probs(np.zeros((2, 6, 8, 3), np.float32))


def test_a_fixed_size_must_agree_with_the_stated_one(tmp_path):
    path = tmp_path / "m.onnx"
    linear_model(path, size=4, softmax=True)
    assert Oracle(path, SpecOverrides(size=(4, 4)), device="cpu").spec.image_shape == (4, 4, 3)
    with pytest.raises(ModelError, match=r"takes 4x4 images, not the stated size 4x5"):
        Oracle(path, SpecOverrides(size=(4, 5)), device="cpu")
    half = tmp_path / "half.onnx"  # a fixed height and a dynamic width: the height must agree too
    pooled_model(half, dims=(8, "w"))
    assert Oracle(half, SpecOverrides(size=(8, 3)), device="cpu").spec.image_shape == (8, 3, 3)
    with pytest.raises(ModelError, match="fixed height of 8, not the stated size 7x3"):
        Oracle(half, SpecOverrides(size=(7, 3)), device="cpu")


def test_a_dynamic_channel_dimension_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "c.onnx"
    pooled_model(path, channels="c")
    with pytest.raises(ModelError, match="no single fixed channel dimension.*--layout"):
        Oracle(path, SpecOverrides(size=(8, 8)), device="cpu")
    with pytest.raises(ModelError, match="read as NCHW has channels 'c'"):
        Oracle(path, SpecOverrides(size=(8, 8), layout="NCHW"), device="cpu")


@pytest.mark.parametrize("given, want", [("32x32", (32, 32)), ("64X48", (64, 48)), ("28", (28, 28)),
                                         ([16, 24], (16, 24)), (96, (96, 96)), ("32,32", (32, 32))])
def test_image_size_setting_reads_its_forms(given, want):
    assert SpecOverrides(size=given).size == want


@pytest.mark.parametrize("given", ["0x32", "a", "32x32x3", [1, 2, 3], True, 5000, "", 3.5])
def test_image_size_setting_refuses_the_rest(given):
    from gate.settings import SettingError

    with pytest.raises(SettingError, match="size must be HxW"):
        SpecOverrides(size=given)


def test_workers_open_a_dynamic_model_with_the_resolved_size(tmp_path):
    """Ray workers get the gate's resolved spec as stated overrides: they must not need the flag again."""
    from gate.distributed import stated_spec

    path = tmp_path / "dyn.onnx"
    pooled_model(path)
    o = Oracle(path, SpecOverrides(size=(8, 6)), device="cpu")
    worker = Oracle(path, stated_spec(o), device="cpu")
    assert worker.spec.image_shape == o.spec.image_shape and worker.spec.detected == ()


# --------------------------------------------------------------------------- which output is scanned
def outputs_model(path, first: str) -> np.ndarray:
    """A linear model over 4x4 RGB images whose outputs are ``first`` (label: the ArgMax, int64 (N,);
    embedding: another linear map, (N, 16); probs: the softmax) and then 'logits' (N, 5). Returns the
    logits' weights."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    w, w2 = rng.normal(size=(48, 5)).astype(np.float32), rng.normal(size=(48, 16)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["logits"])]
    extra = {"label": (helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0), TensorProto.INT64, ["N"]),
             "embedding": (helper.make_node("MatMul", ["flat", "W2"], ["embedding"]), TensorProto.FLOAT, ["N", 16]),
             "probs": (helper.make_node("Softmax", ["logits"], ["probs"], axis=1), TensorProto.FLOAT, ["N", 5])}
    node, dtype, shape = extra[first]
    graph = helper.make_graph(nodes + [node], "outputs",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info(first, dtype, shape),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


@pytest.mark.parametrize("first, scanned", [("label", "logits"), ("probs", "probs")])
def test_the_class_scores_are_found_among_several_outputs(tmp_path, images, first, scanned):
    """A label beside the logits: the logits; probabilities beside them (the same scores): the first."""
    path = tmp_path / "m.onnx"
    w = outputs_model(path, first)
    o = Oracle(path, device="cpu")
    assert o.output_name == scanned and o.num_classes == 5 and o.describe()["output_name"] == scanned
    logits = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float64) @ w
    np.testing.assert_allclose(o.probs(images), softmax(logits), rtol=1e-4, atol=1e-5)


def test_outputs_of_different_widths_must_be_named(tmp_path, images):
    """An embedding beside the logits could be either: refused until --output-name says which."""
    from gate.distributed import stated_spec

    path = tmp_path / "m.onnx"
    outputs_model(path, "embedding")
    with pytest.raises(ModelError, match=r"several score outputs of different widths .*'embedding'.*--output-name"):
        Oracle(path, device="cpu")
    o = Oracle(path, SpecOverrides(output_name="logits"), device="cpu")
    assert (o.output_name, o.num_classes, o.probs(images).shape) == ("logits", 5, (7, 5))
    assert Oracle(path, stated_spec(o), device="cpu").output_name == "logits"  # a Ray worker's oracle
    with pytest.raises(ModelError, match=r"has no output 'scores' \(outputs: 'embedding'"):
        Oracle(path, SpecOverrides(output_name="scores"), device="cpu")
    label = tmp_path / "label.onnx"
    outputs_model(label, "label")
    with pytest.raises(ModelError, match=r"output 'label' tensor\(int64\) \['N'\] is not a score per class"):
        Oracle(label, SpecOverrides(output_name="label"), device="cpu")
