"""Open Inference Protocol (KServe V2) REST: infer requests in, infer responses out.

Both tensor encodings are supported: JSON ``data`` (flat or nested lists) and the binary tensor data
extension, where the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
raw little-endian tensor bytes (an input says ``parameters.binary_data_size``; an output is asked for
with ``parameters.binary_data: true`` or the request-level ``parameters.binary_data_output``).

Every problem with a request raises :class:`ProtocolError` carrying the HTTP status and a one-line
message for the ``{"error": ...}`` body; nothing here touches the network or the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
MAX_JSON_DEPTH = 64  # arrays and objects nested deeper than this are refused (a 4-d nested 'data' needs 5)
# Values a little outside a model's input range still pass: clients round (a [0, 1] image normalised with
# mean/std in float32, or cast to FP16). The allowance is this fraction of each channel's interval, plus the
# rounding of the model's datatype at the interval's ends.
RANGE_TOLERANCE = 1e-3

# V2 datatype name -> numpy dtype (BYTES has no fixed-size numpy equivalent and is never a model input here)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
KNOWN_DATATYPES = set(DATATYPES) | {"BYTES", "BF16"}


# JSON types a 'data' list of each kind of datatype may hold (bool is an int subclass in Python: checked by type)
_JSON_NUMBERS = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a fractional number", str: "a string", type(None): "null",
               dict: "an object", list: "a list"}
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = np.zeros(256, np.int32)
_BRACKET_STEP[list(b"[{")] = 1
_BRACKET_STEP[list(b"]}")] = -1


def v2_datatype(dtype) -> str:
    dtype = np.dtype(dtype)
    for name, dt in DATATYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no V2 datatype for {dtype}")


def show(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that quote what a client sent.

    >>> show("x" * 100, 10)
    "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def json_depth(text: bytes) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (brackets inside strings do not count), without
    parsing it: strings are cut out, the brackets left are counted up and down.

    >>> json_depth(b'{"a": [1, [2, "]]"]], "b": {}}')
    3
    """
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    chunk = 1 << 20  # bounded memory however many brackets a body holds
    for i in range(0, len(brackets), chunk):
        levels = np.cumsum(_BRACKET_STEP[np.frombuffer(brackets, np.uint8, min(chunk, len(brackets) - i), i)])
        deepest = max(deepest, depth + int(levels.max()))
        depth += int(levels[-1])
    return deepest


@dataclass(frozen=True)
class ValueRange:
    """The values a model input accepts, per channel: what images in [0, 1] encode to (see
    :mod:`gate.spec`), give or take ``slack`` for rounding. ``axis`` is the channel axis of an (n, ...) batch."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    slack: tuple[float, ...]
    axis: int

    @classmethod
    def of(cls, spec) -> ValueRange:
        """The range of a :class:`gate.spec.InputSpec`: ``scale * [0, 1] + offset`` per channel.

        >>> from gate.spec import InputSpec
        >>> ValueRange.of(InputSpec("NHWC", 2, 2, 1, value_range=255.0)).describe(0)
        '[0, 255]'
        """
        scale, offset = (v.astype(np.float64) for v in spec.affine())
        low = np.minimum(offset, scale + offset) + 0.0  # + 0.0: an offset of -0.0 reads as 0
        high = np.maximum(offset, scale + offset) + 0.0
        dtype = np.dtype(spec.dtype)
        rounding = (np.finfo(dtype).eps if dtype.kind == "f" else 0.0) * np.maximum(abs(low), abs(high))
        slack = RANGE_TOLERANCE * (high - low) + rounding
        return cls(tuple(low.tolist()), tuple(high.tolist()), tuple(slack.tolist()), 1 if spec.channels_first else 3)

    @property
    def uniform(self) -> bool:
        """Every channel has the same interval."""
        return len(set(zip(self.low, self.high, strict=True))) == 1

    def describe(self, channel: int) -> str:
        return f"[{self.low[channel]:.4g}, {self.high[channel]:.4g}]"

    def check(self, low: np.ndarray, high: np.ndarray, where: str) -> None:
        """Raise a 400 unless every channel's smallest and largest value (``low``, ``high``) lie in range."""
        lo, hi, slack = (np.asarray(v) for v in (self.low, self.high, self.slack))
        outside = np.flatnonzero((low < lo - slack) | (high > hi + slack))
        if not len(outside):
            return
        if self.uniform:
            raise _bad(f"{where} values must lie in {self.describe(0)} for this model (got min {low.min():.6g}, "
                       f"max {high.max():.6g})")
        c = int(outside[0])
        raise _bad(f"{where} values of channel {c} must lie in {self.describe(c)} for this model (got min "
                   f"{low[c]:.6g}, max {high[c]:.6g})")


class ProtocolError(Exception):
    """A request the server cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One model tensor as the server advertises it; ``shape[0] == -1`` is the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    bounds: ValueRange | None = None  # an input's valid values (None: any finite value)

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    id: str | None
    tensor: np.ndarray  # the model input, shape (n, *dims), dtype of the declared datatype
    binary_output: bool  # answer the output tensor in the binary extension
    parameters: dict = field(default_factory=dict)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(JSON header, binary tail) of a request or response body."""
    if header_length is None:
        head, tail = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length must be an integer, got {show(header_length)}") from None
        if not 0 <= n <= len(body):
            raise _bad(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], memoryview(body)[n:]
    if not head:
        raise _bad("empty request body: expected a JSON inference request")
    deep = f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    if head.count(b"[") + head.count(b"{") > MAX_JSON_DEPTH and json_depth(head) > MAX_JSON_DEPTH:
        raise _bad(deep)
    try:
        obj = json.loads(head)
    except RecursionError:  # a body that is not UTF-8 can hide its brackets from json_depth
        raise _bad(deep) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise _bad(f"request body is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise _bad("inference request must be a JSON object")
    return obj, tail


def _shape(desc: dict, where: str) -> tuple[int, ...]:
    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"{where}: 'shape' must be a list of integers, got {show(shape)}")
    if any(d < 0 for d in shape):
        raise _bad(f"{where}: 'shape' must not have negative dimensions, got {shape}")
    return tuple(shape)


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter '{key}' must be true or false, got {show(value)}")
    return value


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return params


def _check_leaves(data: list, dtype: np.dtype, message: str) -> None:
    """Raise a 400 (``message``, and what was found) unless every value in the nested lists ``data`` is a
    JSON value of ``dtype``'s kind: numbers for numeric datatypes (never true/false, strings or null)."""
    allowed = _JSON_NUMBERS.get(dtype.kind, ())
    lists = [data]
    while lists:
        values = lists.pop()
        types = set(map(type, values))  # C speed, however long the list
        if list in types and len(types) > 1:
            raise _bad(f"{message}, got lists and values side by side")
        if list in types:
            lists.extend(values)
        elif not types.issubset(allowed):
            found = next(t for t in types if t not in allowed)
            raise _bad(f"{message}, got {_JSON_NAMES.get(found, found.__name__)}")


def _check_values(tensor: np.ndarray, bounds: ValueRange | None, where: str) -> None:
    """Raise a 400 for NaN or infinite values, or values outside ``bounds``: one min and one max per channel."""
    if not tensor.size:
        return
    axes = tuple(a for a in range(tensor.ndim) if bounds is None or a != bounds.axis)
    low, high = tensor.min(axis=axes), tensor.max(axis=axes)  # NaN, if any, propagates into both
    if tensor.dtype.kind == "f" and not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise _bad(f"{where}: contains NaN or infinite values")
    if bounds is not None:
        bounds.check(np.atleast_1d(low).astype(np.float64), np.atleast_1d(high).astype(np.float64), where)


def parse_infer_request(body: bytes, header_length: str | None, model_input: TensorSpec,
                        model_output: TensorSpec) -> InferRequest:
    """Decode and check one inference request against the model's single input and output."""
    obj, tail = split_body(body, header_length)
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise _bad("'id' must be a string")
    params = _parameters(obj, "request")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise _bad(f"model takes exactly one input '{model_input.name}', got {len(inputs)} inputs")
    desc = inputs[0]
    if not isinstance(desc, dict):
        raise _bad("each input must be a JSON object")
    name = desc.get("name")
    if name != model_input.name:
        raise _bad(f"unknown input {show(name)}: the model's input is '{model_input.name}'")
    where = f"input '{name}'"
    datatype = desc.get("datatype")
    if datatype != model_input.datatype:
        known = "" if isinstance(datatype, str) and datatype in KNOWN_DATATYPES else " (not a V2 datatype)"
        raise _bad(f"{where}: datatype {show(datatype)}{known} does not match the model's {model_input.datatype}")
    shape = _shape(desc, where)
    dims = model_input.shape[1:]
    if len(shape) != len(model_input.shape) or shape[1:] != dims:
        want = "[N, " + ", ".join(str(d) for d in dims) + "]"
        raise _bad(f"{where}: shape {list(shape)} does not match the model input {want}")
    if shape[0] < 1:
        raise _bad(f"{where}: batch dimension must be at least 1, got {shape[0]}")
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    in_params = _parameters(desc, where)
    size = in_params.get("binary_data_size")
    if size is not None:
        if "data" in desc:
            raise _bad(f"{where}: has both 'data' and 'binary_data_size'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"{where}: binary_data_size must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise _bad(f"{where}: binary_data_size {size} does not match shape {list(shape)} of "
                       f"{datatype} ({count * dtype.itemsize} bytes)")
        if size != len(tail):
            raise _bad(f"{where}: binary_data_size {size} but the body carries {len(tail)} binary bytes")
        tensor = np.frombuffer(tail, dtype=dtype.newbyteorder("<")).reshape(shape)
    else:
        if len(tail):
            raise _bad(f"request carries {len(tail)} binary bytes but no input declares binary_data_size")
        if "data" not in desc:
            raise _bad(f"{where}: no 'data' (and no binary_data_size)")
        data = desc["data"]
        if not isinstance(data, list):
            raise _bad(f"{where}: 'data' must be a list")
        _check_leaves(data, dtype, f"{where}: 'data' must be a flat or nested list of {datatype} numbers")
        try:  # floats are checked as the float64 JSON gives them: 1e39 is out of range, not an FP32 inf
            tensor = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else dtype)
        except (ValueError, TypeError, OverflowError):
            raise _bad(f"{where}: 'data' must be a flat or nested list of {datatype} numbers "
                       f"of one shape") from None
        if tensor.size != count:
            raise _bad(f"{where}: 'data' holds {tensor.size} values but shape {list(shape)} needs {count}")
        tensor = tensor.reshape(shape)
    _check_values(tensor, model_input.bounds, where)
    tensor = tensor.astype(dtype, copy=False)

    binary_output = _flag(params, "binary_data_output", "request")
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("'outputs' must be a list")
        for out in outputs:
            if not isinstance(out, dict):
                raise _bad("each requested output must be a JSON object")
            if out.get("name") != model_output.name:
                raise _bad(f"unknown output {show(out.get('name'))}: the model's output is '{model_output.name}'")
            out_params = _parameters(out, f"output '{model_output.name}'")
            if "classification" in out_params:
                raise _bad("the classification extension is not supported")
            if "binary_data" in out_params:
                binary_output = _flag(out_params, "binary_data", f"output '{model_output.name}'")
    return InferRequest(req_id, tensor, binary_output, params)


def encode_infer_response(model_name: str, model_version: str, request_id: str | None, output: TensorSpec,
                          data: np.ndarray, binary: bool, parameters: dict | None = None
                          ) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an inference response carrying one output tensor."""
    data = np.ascontiguousarray(data, dtype=DATATYPES[output.datatype].newbyteorder("<"))
    tensor: dict = {"name": output.name, "datatype": output.datatype, "shape": list(data.shape)}
    resp: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        resp["id"] = request_id
    if parameters:
        resp["parameters"] = parameters
    resp["outputs"] = [tensor]
    if binary:
        raw = data.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(resp, separators=(",", ":")).encode()
        return head + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    tensor["data"] = data.reshape(-1).tolist()
    return json.dumps(resp, separators=(",", ":")).encode(), {"content-type": "application/json"}


def encode_infer_request(input_spec: TensorSpec, tensor: np.ndarray, output_name: str,
                         request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-extension inference request (what the proxy sends to an upstream V2 server)."""
    raw = np.ascontiguousarray(tensor, dtype=DATATYPES[input_spec.datatype].newbyteorder("<")).tobytes()
    head: dict = {"inputs": [{"name": input_spec.name, "shape": list(tensor.shape), "datatype": input_spec.datatype,
                              "parameters": {"binary_data_size": len(raw)}}],
                  "outputs": [{"name": output_name, "parameters": {"binary_data": True}}]}
    if request_id is not None:
        head["id"] = request_id
    h = json.dumps(head, separators=(",", ":")).encode()
    return h + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(h))}


def decode_infer_response(body: bytes, header_length: str | None, output_name: str) -> np.ndarray:
    """The named output tensor of an inference response (JSON or binary). Raises ValueError."""
    try:
        obj, tail = split_body(body, header_length)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    outputs = obj.get("outputs")
    if not isinstance(outputs, list):
        raise ValueError("response has no 'outputs' list")
    offset = 0
    for out in outputs:
        if not isinstance(out, dict):
            raise ValueError("malformed output in response")
        datatype = out.get("datatype")
        shape = out.get("shape")
        if not isinstance(datatype, str) or datatype not in DATATYPES or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"output {show(out.get('name'))} has datatype {show(datatype)} and shape {show(shape)}")
        dtype = DATATYPES[datatype].newbyteorder("<")
        params = out.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"output {show(out.get('name'))}: binary_data_size {show(size)} is not a size")
            chunk = tail[offset:offset + size]
            offset += size
            if out.get("name") == output_name:
                if len(chunk) != size or size != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"output {output_name!r}: binary data does not match its shape")
                return np.frombuffer(chunk, dtype=dtype).reshape(shape)
        elif out.get("name") == output_name:
            try:
                arr = np.asarray(out.get("data"), dtype=dtype)
            except (TypeError, OverflowError):
                raise ValueError(f"output {output_name!r}: data is not a list of {datatype} numbers") from None
            if arr.size != math.prod(shape):
                raise ValueError(f"output {output_name!r}: data does not match its shape")
            return arr.reshape(shape)
    raise ValueError(f"response has no output {output_name!r}")
