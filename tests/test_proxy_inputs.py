"""The proxy fails closed on request tensors: values outside the model's input range, NaN/inf, JSON nested
too deep, 'data' that are not numbers, datatypes and shapes that are not the model's. Each answers 400
with a one-line {"error": ...}, never a 500 or a 502.

The app runs in process on tiny linear models (2x2 RGB images, 3 classes); no network, no demo model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gate.proxy import codec
from gate.proxy.codec import MAX_JSON_DEPTH, TensorSpec, ValueRange, encode_infer_request, json_depth
from gate.shield import Shield
from gate.spec import InputSpec, SpecOverrides
from tests.helpers import InProcess, tiny_proxy

INFER = "/v2/models/tiny/infer"
IMAGENET = SpecOverrides(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    """The proxy of a [0, 1] NCHW FP32 model (the shield on; tau so small that it refuses nothing here)."""
    app, _ = tiny_proxy(tmp_path_factory.mktemp("unit") / "tiny.onnx", tau=1e-9)
    with InProcess(app) as client:
        yield client


def tensor_json(values, shape=(1, 3, 2, 2), datatype="FP32", **extra) -> dict:
    shape = list(shape) if isinstance(shape, tuple) else shape
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": values, **extra}]}


def post(client, payload, **kw):
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post(INFER, content=content, **kw)


def post_binary(client, x: np.ndarray, datatype: str = "FP32"):
    body, headers = encode_infer_request(TensorSpec("input", datatype, (-1, *x.shape[1:])), x, "output")
    return client.post(INFER, content=body, headers=headers)


def refused(r, message: str, status: int = 400) -> str:
    """Assert a one-line {"error": ...} answer with ``status`` that contains ``message``; return the error."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in r.text, r.text
    assert message in body["error"], body["error"]
    return body["error"]


def pixels(*values: float, n: int = 12) -> list[float]:
    """A 1x3x2x2 image of 0.5 with ``values`` in front."""
    return [*values, *[0.5] * (n - len(values))]


# ---------------------------------------------------------------------- value range
@pytest.mark.parametrize("values, message", [
    (pixels(-5, 200), "input 'input' values must lie in [0, 1] for this model (got min -5, max 200)"),
    (pixels(3e38), "values must lie in [0, 1] for this model (got min 0.5, max 3e+38)"),
    (pixels(1e39), "(got min 0.5, max 1e+39)"),  # beyond FP32: out of range, not turned into inf
    (pixels(-1e-2), "(got min -0.01, max 0.5)"),
    (pixels(1.01), "(got min 0.5, max 1.01)"),
], ids=["-5,200", "3e38", "1e39", "-0.01", "1.01"])
def test_values_outside_the_input_range_are_refused(unit, values, message):
    refused(post(unit, tensor_json(values)), message)


@pytest.mark.parametrize("values, message", [
    (pixels(-5, 200), "input 'input' values must lie in [0, 1] for this model (got min -5, max 200)"),
    (pixels(3e38), "values must lie in [0, 1] for this model (got min 0.5, max 3e+38)"),
    (pixels(-3e38), "(got min -3e+38, max 0.5)"),
], ids=["-5,200", "3e38", "-3e38"])
def test_binary_values_outside_the_input_range_are_refused(unit, values, message):
    refused(post_binary(unit, np.array(values, np.float32).reshape(1, 3, 2, 2)), message)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_values_are_refused(unit, token):
    body = json.dumps(tensor_json(pixels(0.25))).replace("0.25", token).encode()
    refused(post(unit, body), "input 'input': contains NaN or infinite values")
    x = np.full((1, 3, 2, 2), 0.5, np.float32)
    x[0, 1, 1, 0] = float(token.replace("1e400", "inf").replace("Infinity", "inf"))
    refused(post_binary(unit, x), "contains NaN or infinite values")


def test_the_range_ends_and_rounding_pass(unit):
    for values in (pixels(0.0, 1.0), pixels(-5e-4, 1 + 5e-4), [1] * 12, [0] * 12):  # within the 1e-3 allowance
        r = post(unit, tensor_json(values))
        assert r.status_code == 200, r.text
    assert post_binary(unit, np.array(pixels(0.0, 1.0), np.float32).reshape(1, 3, 2, 2)).status_code == 200
    refused(post(unit, tensor_json(pixels(1 + 2e-3))), "must lie in [0, 1]")


def test_a_0_to_255_model_takes_0_to_255(tmp_path):
    app, _ = tiny_proxy(tmp_path / "m.onnx", SpecOverrides(value_range=255.0))
    with InProcess(app) as client:
        assert post(client, tensor_json(pixels(0, 255, 17))).status_code == 200
        assert post(client, tensor_json(pixels(255.2))).status_code == 200  # 0.1 % of 255
        refused(post(client, tensor_json(pixels(256))), "values must lie in [0, 255] for this model (got min 0.5, "
                                                        "max 256)")
        refused(post(client, tensor_json(pixels(-1))), "[0, 255]")


def test_mean_std_gives_each_channel_its_own_range(tmp_path):
    """ImageNet normalisation: channel c takes ((0 - mean) / std, (1 - mean) / std); the error names the
    channel. Images the gate encodes itself (and the shield's stamped copies) always pass."""
    app, oracle = tiny_proxy(tmp_path / "m.onnx", IMAGENET)
    with InProcess(app) as client:
        x = np.zeros((1, 3, 2, 2), np.float32)
        x[0, 0] = 2.2  # inside channel 0's [-2.118, 2.249]
        assert post_binary(client, x).status_code == 200
        x[0, 1, 0, 0] = 2.5  # outside channel 1's [-2.036, 2.429]
        refused(post_binary(client, x), "input 'input' values of channel 1 must lie in [-2.036, 2.429] for this "
                                        "model (got min 0, max 2.5)")
        x[0, 1, 0, 0] = 0
        x[0, 2, 1, 1] = -1.9  # channel 2 is [-1.804, 2.64]
        refused(post(client, tensor_json(x.ravel().tolist())), "channel 2 must lie in [-1.804, 2.64]")
        images = np.random.default_rng(1).random((64, 2, 2, 3), dtype=np.float32)
        images[:8] = 0
        images[8:16] = 1
        encoded = oracle.encode(images)
        assert post_binary(client, encoded).status_code == 200
        assert post(client, tensor_json(encoded.ravel().tolist(), shape=encoded.shape)).status_code == 200


def test_stamped_batches_stay_in_range():
    """What a proxy in forward mode sends its upstream (x and its stamped copies) passes an upstream proxy's
    range check: stamping mixes two in-range values."""
    spec = InputSpec("NHWC", 4, 4, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    bounds = ValueRange.of(spec)
    rng = np.random.default_rng(2)
    from gate.result import Triggers

    shield = Shield(Triggers(np.arange(2), rng.random((2, 4, 4), dtype=np.float32) * 1.5 - 0.2,
                             rng.random((2, 4, 4, 3), dtype=np.float32) * 1.4 - 0.2, np.ones(2, bool)), spec)
    scale, offset = spec.affine()
    batch = (np.round(rng.random((16, 4, 4, 3)) * 255) / 255 * scale + offset).astype(np.float32)
    codec._check_values(shield.stamp(batch), bounds, "stamped")


def test_nhwc_and_fp16_models(tmp_path):
    from onnx import TensorProto

    app, _ = tiny_proxy(tmp_path / "nhwc.onnx", IMAGENET, layout="NHWC")
    with InProcess(app) as client:
        x = np.zeros((1, 2, 2, 3), np.float32)
        x[0, 1, 0, 2] = 2.63
        assert post_binary(client, x).status_code == 200
        x[0, 1, 0, 2] = 2.7  # channel 2 (the last axis) tops out at 2.64
        refused(post_binary(client, x), "values of channel 2 must lie in [-1.804, 2.64]")
    app, _ = tiny_proxy(tmp_path / "fp16.onnx", in_type=TensorProto.FLOAT16)
    with InProcess(app) as client:
        assert post_binary(client, np.full((1, 3, 2, 2), 1.0, np.float16), "FP16").status_code == 200
        refused(post_binary(client, np.full((1, 3, 2, 2), 2.0, np.float16), "FP16"), "[0, 1] for this model")
        refused(post(client, tensor_json(pixels(1e6), datatype="FP16")), "max 1e+06")  # not an FP16 inf
        refused(post_binary(client, np.full((1, 3, 2, 2), np.inf, np.float16), "FP16"), "NaN or infinite")


def test_a_uint8_model_takes_whole_pixels_and_its_stamped_pass_runs(tmp_path):
    from onnx import TensorProto

    app, oracle = tiny_proxy(tmp_path / "u8.onnx", in_type=TensorProto.UINT8, tau=1e-9)
    assert oracle.spec.dtype == "uint8"
    with InProcess(app) as client:
        meta = client.get("/v2/models/tiny").json()
        assert meta["inputs"][0]["datatype"] == "UINT8"
        r = post_binary(client, np.full((2, 3, 2, 2), 255, np.uint8), "UINT8")
        assert r.status_code == 200, r.text
        refused(post_binary(client, np.full((1, 3, 2, 2), 0.5, np.float32)), "datatype")


def test_the_range_allowance():
    unit = ValueRange.of(InputSpec("NCHW", 2, 2, 3))
    assert unit.low == (0, 0, 0) and unit.high == (1, 1, 1) and unit.axis == 1 and unit.uniform
    assert unit.slack == pytest.approx([codec.RANGE_TOLERANCE + np.finfo(np.float32).eps] * 3)
    half = ValueRange.of(InputSpec("NHWC", 2, 2, 1, dtype="float16", mean=(0.5,), std=(0.001,)))
    assert half.describe(0) == "[-500, 500]" and half.axis == 3
    assert half.slack[0] == pytest.approx(1e-3 * 1000 + np.finfo(np.float16).eps * 500)


# ---------------------------------------------------------------------- JSON depth
def test_json_nested_50000_deep_is_400_not_500(unit):
    deep = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    refused(post(unit, deep), f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    refused(post(unit, b"[" * 50_000), "deeper than 64 levels")  # not even well formed
    refused(post(unit, b'{"a": ' * 50_000), "deeper than 64 levels")


def test_json_depth_limit_is_exact(unit):
    def nested(levels: int) -> dict:  # the request object and its parameters are 2 levels
        params: object = 1
        for _ in range(levels - 2):
            params = {"p": params}
        return dict(tensor_json(pixels()), parameters={"x": params})

    assert json_depth(json.dumps(nested(MAX_JSON_DEPTH)).encode()) == MAX_JSON_DEPTH
    assert post(unit, nested(MAX_JSON_DEPTH)).status_code == 200
    refused(post(unit, nested(MAX_JSON_DEPTH + 1)), "deeper than 64 levels")
    # brackets inside strings are text, escaped quotes included
    tricky = dict(tensor_json(pixels()), id='\\"[[[' + "[" * 5000 + "{" * 5000)
    assert json_depth(json.dumps(tricky).encode()) == 4  # {"inputs": [{"data": [
    r = post(unit, tricky)
    assert r.status_code == 200 and r.json()["id"] == tricky["id"]


def test_json_depth():
    assert json_depth(b"1") == 0 and json_depth(b"[]") == 1 and json_depth(b"[[], {}]") == 2
    assert json_depth(b'["\\\\", ["]"], "\\"["]') == 2  # an escaped backslash ends its string; \" does not
    assert json_depth(b"[" * 3_000_000) == 3_000_000  # in chunks
    assert json_depth(b"[" * 100 + b"]" * 100 + b"[[]]") == 100


def test_json_recursion_is_caught_even_when_the_scan_misses_it(unit, monkeypatch):
    monkeypatch.setattr(codec, "json_depth", lambda text: 0)
    refused(post(unit, b"[" * 50_000 + b"]" * 50_000), "deeper than 64 levels")


# ---------------------------------------------------------------------- data types, datatypes, shapes
@pytest.mark.parametrize("values, found", [
    ([True] * 12, "a boolean"),
    (pixels(True), "a boolean"),
    (pixels(False), "a boolean"),
    ([[[[0.5, 0.5], [0.5, True]]] * 3], "a boolean"),
    (pixels("0.5"), "a string"),
    (pixels(None), "null"),
    (pixels({"v": 1}), "an object"),
    ([[0.5] * 6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "lists and values side by side"),
], ids=["bools", "true", "false", "nested-true", "string", "null", "object", "ragged"])
def test_data_must_be_numbers(unit, values, found):
    refused(post(unit, tensor_json(values)),
            f"input 'input': 'data' must be a flat or nested list of FP32 numbers, got {found}")


def test_nested_and_integer_data_are_numbers(unit):
    assert post(unit, tensor_json([[[[0, 1], [1, 0]]] * 3])).status_code == 200
    assert post(unit, tensor_json([[[[[[0.5]]]]]] * 12)).status_code == 200  # V2: any nesting of the right count
    refused(post(unit, tensor_json([[0.5] * 6, [0.5] * 5])), "list of FP32 numbers")  # ragged rows


@pytest.mark.parametrize("datatype, message", [
    ("FP64", "datatype 'FP64' does not match the model's FP32"),
    ("BOOL", "datatype 'BOOL' does not match the model's FP32"),
    ("BYTES", "datatype 'BYTES' does not match"),
    ("float32", "datatype 'float32' (not a V2 datatype) does not match the model's FP32"),
    (["FP32"], "datatype ['FP32'] (not a V2 datatype)"),
    ({"FP32": 1}, "datatype {'FP32': 1} (not a V2 datatype)"),
    (True, "datatype True (not a V2 datatype)"),
    (None, "datatype None (not a V2 datatype)"),
], ids=["FP64", "BOOL", "BYTES", "float32", "list", "object", "true", "missing"])
def test_datatype_must_be_the_models(unit, datatype, message):
    refused(post(unit, tensor_json(pixels(), datatype=datatype)), f"input 'input': {message}")


@pytest.mark.parametrize("shape, message", [
    ([1, 3, 2], "shape [1, 3, 2] does not match the model input [N, 3, 2, 2]"),
    ([2, 3, 2, 2], "'data' holds 12 values but shape [2, 3, 2, 2] needs 24"),
    ([1, 3, 2, 2.0], "'shape' must be a list of integers, got [1, 3, 2, 2.0]"),
    ([True, 3, 2, 2], "'shape' must be a list of integers"),
    (["1", 3, 2, 2], "'shape' must be a list of integers"),
    ("1x3x2x2", "'shape' must be a list of integers, got '1x3x2x2'"),
    ([-1, 3, 2, 2], "must not have negative dimensions"),
    ([10 ** 30, 3, 2, 2], "needs 12" + "0" * 30),
], ids=["rank", "count", "float", "bool", "string", "text", "negative", "huge"])
def test_shape_must_fit_the_model_and_the_data(unit, shape, message):
    refused(post(unit, tensor_json(pixels(), shape=shape)), message)


def test_binary_sizes_and_other_fields(unit):
    head = {"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32",
                        "parameters": {"binary_data_size": True}}]}
    h = json.dumps(head).encode()
    r = unit.post(INFER, content=h + bytes(48), headers={codec.HEADER_LENGTH: str(len(h))})
    refused(r, "binary_data_size must be a non-negative integer")
    refused(post(unit, b'{"inputs": [1e' + b"9" * 10 + b"]}"), "each input must be a JSON object")  # inf
    refused(post(unit, b'{"id": ' + b"1" * 5000 + b"}"), "request body is not valid JSON: Exceeds the limit")
    r = post(unit, dict(tensor_json(pixels()), inputs=[dict(tensor_json(pixels())["inputs"][0], name="x" * 10_000)]))
    assert len(refused(r, "unknown input 'xxx")) < 200  # what the client sent is quoted, cut short


def test_the_proxy_stamps_under_the_convention_the_scan_ran_under(tmp_path):
    """The scan may have chosen the convention from labelled data (report.json's input_spec): with no input flag
    the proxy takes it; a flag that contradicts it is refused; a report without one changes nothing."""
    from gate.commands.common import as_scanned
    from gate.errors import GateError
    from gate.oracle import Oracle
    from tests.helpers import linear_model

    linear_model(tmp_path / "m.onnx", size=2, classes=3, softmax=True)
    oracle = Oracle(tmp_path / "m.onnx", device="cpu")
    scanned = {"layout": "NCHW", "value_range": 255.0, "mean": None, "std": None}
    taken = as_scanned(oracle, scanned, SpecOverrides(), "r.json")
    assert (taken.spec.layout, taken.spec.value_range, taken.spec.output_kind) == ("NCHW", 255.0, "probs")
    assert as_scanned(oracle, {**scanned, "value_range": 1.0}, SpecOverrides(), "r.json") is oracle
    assert as_scanned(oracle, None, SpecOverrides(), "r.json") is oracle
    with pytest.raises(GateError, match=r"r.json: the scan ran under NCHW range \[0,255\], the input flags"):
        as_scanned(oracle, scanned, SpecOverrides(value_range=1.0), "r.json")
    normalised = as_scanned(oracle, {**scanned, "value_range": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3},
                            SpecOverrides(), "r.json")
    assert normalised.spec.mean == (0.5, 0.5, 0.5) and normalised.spec.std == (0.25, 0.25, 0.25)
