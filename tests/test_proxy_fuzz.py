"""Fuzzing the proxy's V2 codec through the app: whatever a client sends (JSON of any shape, binary tensors
with wrong sizes and header lengths, compressed or random bytes) is answered 2xx or 4xx with a one-line
error, never a 5xx. And the upstream response decoder answers a tensor or a ValueError, nothing else.

The app runs in process on a tiny linear model with the shield on; hypothesis is derandomized (the same
examples on every run) and bounded (200 examples a test).
"""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gate.proxy.codec import HEADER_LENGTH, decode_infer_response
from tests.helpers import InProcess, tiny_proxy

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INFER = "/v2/models/tiny/infer"
SHAPE = (3, 2, 2)  # the tiny model's image: NCHW, 12 values
CLASSES = 3


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app, _ = tiny_proxy(tmp_path_factory.mktemp("fuzz") / "tiny.onnx", tau=0.05)
    with InProcess(app) as c:
        yield c


def answered(r) -> None:
    """A 2xx with a decodable output, or a 4xx whose body is {"error": one line} (403 adds its score)."""
    assert r.status_code < 500, r.text
    event(f"HTTP {r.status_code}")  # pytest --hypothesis-show-statistics: how many reach the model
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("error"), str) and "\n" not in body["error"], r.text
        assert set(body) == ({"error", "score"} if r.status_code == 403 else {"error"}), r.text
        return
    assert r.status_code == 200
    out = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH), "output")
    assert out.ndim == 2 and out.shape[1] == CLASSES and np.all(np.isfinite(out))


# ---------------------------------------------------------------------- strategies
INTS = st.integers(-(10 ** 30), 10 ** 30)
SCALARS = st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=6)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=16)
PIXELS = st.floats(0, 1) | st.sampled_from([0, 1, 0.0, 1.0, 1 + 5e-4, -5e-4])
ODD_VALUES = (st.floats() | st.sampled_from([-5, 200, 3e38, -3e38, 1e39, 1e-45, float("nan"), float("inf")])
              | st.booleans() | st.none() | st.text(max_size=3) | INTS | JSON)
DATATYPES = st.sampled_from(["FP32", "FP16", "FP64", "BOOL", "INT8", "UINT8", "INT64", "BYTES", "BF16", "float32",
                             ""]) | JSON
SHAPES = (st.lists(st.integers(-2, 13), max_size=5) | st.lists(INTS, min_size=4, max_size=4)
          | st.lists(SCALARS, max_size=4) | JSON)


def _set(obj: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


@st.composite
def tensors(draw, binary: bool) -> tuple[dict, np.ndarray]:
    """A valid request (JSON header) for 1-3 images and the images; ``binary``: the data go in the tail."""
    n = draw(st.integers(1, 3))
    x = np.array(draw(st.lists(PIXELS, min_size=12 * n, max_size=12 * n)), np.float32).reshape(n, *SHAPE)
    desc = {"name": "input", "shape": [n, *SHAPE], "datatype": "FP32"}
    if binary:
        desc["parameters"] = {"binary_data_size": x.nbytes}
    else:
        desc["data"] = x.tolist() if draw(st.booleans()) else x.ravel().tolist()
    req = {"inputs": [desc]}
    if draw(st.booleans()):
        req["outputs"] = [{"name": "output", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        req["id"] = draw(st.text(max_size=8))
    return req, x


@st.composite
def mutated(draw, req: dict) -> dict:
    """``req`` with up to three things wrong: a field replaced, dropped or added, odd values in 'data'."""
    for _ in range(draw(st.integers(0, 3))):
        desc = req["inputs"][0] if isinstance(req.get("inputs"), list) and req["inputs"] \
            and isinstance(req["inputs"][0], dict) else None
        what = draw(st.sampled_from(["value", "data", "shape", "datatype", "name", "drop", "size", "inputs",
                                     "outputs", "parameters", "id", "top"]))
        if what == "value" and desc is not None and isinstance(desc.get("data"), list) and desc["data"]:
            flat = desc["data"] if not isinstance(desc["data"][0], list) else None
            if flat is not None:
                flat[draw(st.integers(0, len(flat) - 1))] = draw(ODD_VALUES)
            else:
                desc["data"][draw(st.integers(0, len(desc["data"]) - 1))] = draw(ODD_VALUES)
        elif what == "data" and desc is not None:
            desc["data"] = draw(JSON | st.lists(ODD_VALUES, max_size=14) | st.lists(PIXELS, min_size=11, max_size=13))
        elif what in ("shape", "datatype", "name") and desc is not None:
            desc[what] = draw({"shape": SHAPES, "datatype": DATATYPES,
                               "name": st.sampled_from(["input", "output", "x"]) | JSON}[what])
        elif what == "drop" and desc is not None and desc:
            del desc[draw(st.sampled_from(sorted(desc)))]
        elif what == "size" and desc is not None:
            desc["parameters"] = draw(st.fixed_dictionaries({}, optional={"binary_data_size": INTS | JSON}) | JSON)
        elif what == "inputs":
            req["inputs"] = draw(st.lists(st.just(desc) if desc is not None else JSON, max_size=3) | JSON)
        elif what == "outputs":
            req["outputs"] = draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["output", "input"]) | JSON},
                optional={"parameters": st.fixed_dictionaries({}, optional={
                    "binary_data": JSON, "classification": JSON}) | JSON}), max_size=2) | JSON)
        elif what == "parameters":
            req["parameters"] = draw(st.fixed_dictionaries({}, optional={"binary_data_output": JSON}) | JSON)
        elif what == "id":
            req["id"] = draw(JSON)
        elif what == "top":
            return draw(JSON)
    return req


def post(client, body: bytes, headers: dict | None = None):
    return client.post(INFER, content=body, headers=headers or {})


# ---------------------------------------------------------------------- the fuzz tests
@FUZZ
@given(data=st.data())
def test_fuzz_json_requests(client, data):
    req, _ = data.draw(tensors(binary=False))
    req = data.draw(mutated(req))
    answered(post(client, json.dumps(req).encode()))  # NaN and Infinity as JSON's non-standard tokens


@FUZZ
@given(data=st.data())
def test_fuzz_binary_requests(client, data):
    req, x = data.draw(tensors(binary=True))
    tail = x.tobytes()
    if data.draw(st.booleans()):  # any float32 bit patterns, NaN and inf included
        tail = data.draw(st.binary(min_size=len(tail), max_size=len(tail)))
    req = data.draw(mutated(req))
    cut = data.draw(st.integers(0, max(len(tail) - 1, 0)))
    tail = {"keep": tail, "cut": tail[:cut], "extra": tail + data.draw(st.binary(min_size=1, max_size=8)),
            "none": b""}[data.draw(st.sampled_from(["keep", "cut", "extra", "none"]))]
    head = json.dumps(req).encode()
    length = data.draw(st.sampled_from(["right", "number", "text", "missing"]))
    headers = {"right": {HEADER_LENGTH: str(len(head))},
               "number": {HEADER_LENGTH: str(data.draw(st.integers(-3, len(head) + len(tail) + 3)))},
               "text": {HEADER_LENGTH: data.draw(st.text("0123456789 -+_xe", max_size=6))},
               "missing": {}}[length]
    answered(post(client, head + tail, headers))


@FUZZ
@given(body=st.binary(max_size=300),
       length=st.none() | st.integers(-3, 310).map(str) | st.text("0123456789-", max_size=4),
       encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", ""]))
def test_fuzz_raw_bytes(client, body, length, encoding):
    headers = {}
    if length is not None:
        headers[HEADER_LENGTH] = length
    if encoding is not None:
        headers["content-encoding"] = encoding
    answered(post(client, body, headers))


@FUZZ
@given(data=st.data())
def test_fuzz_damaged_and_compressed_json(client, data):
    """Valid requests cut short, with bytes flipped or nesting piled on, sent plain, gzip or deflate."""
    req, _ = data.draw(tensors(binary=False))
    body = bytearray(json.dumps(req).encode())
    damage = data.draw(st.sampled_from(["none", "cut", "flip", "nest"]))
    if damage == "cut":
        body = body[:data.draw(st.integers(0, len(body)))]
    elif damage == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    elif damage == "nest":
        k = data.draw(st.integers(1, 3000))
        body = body.replace(b'"data": ', b'"data": ' + b"[" * k, 1) + b"]" * data.draw(st.sampled_from([0, k]))
    encoding = data.draw(st.sampled_from(["identity", "gzip", "deflate"]))
    content = {"identity": bytes, "gzip": gzip.compress, "deflate": zlib.compress}[encoding](bytes(body))
    answered(post(client, content, {"content-encoding": encoding}))


@FUZZ
@given(data=st.data())
def test_fuzz_upstream_responses(data):
    """What an upstream V2 server might answer: decoded to a tensor, or a ValueError (the proxy's 502)."""
    outputs = data.draw(st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["output", "other"]) | JSON, "datatype": DATATYPES, "shape": SHAPES},
        optional={"data": st.lists(ODD_VALUES, max_size=8) | JSON,
                  "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": INTS | JSON}) | JSON}),
        max_size=3) | JSON)
    head = json.dumps({"model_name": "m", "outputs": outputs}).encode()
    tail = data.draw(st.binary(max_size=32))
    length = data.draw(st.none() | st.just(str(len(head))) | st.integers(-2, len(head) + 40).map(str))
    try:
        out = decode_infer_response(head + tail if length is not None else head, length, "output")
    except ValueError:
        return
    assert isinstance(out, np.ndarray)
