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
from dataclasses import dataclass, field

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

# V2 datatype name -> numpy dtype (BYTES has no fixed-size numpy equivalent and is never a model input here)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
KNOWN_DATATYPES = set(DATATYPES) | {"BYTES", "BF16"}


def v2_datatype(dtype) -> str:
    dtype = np.dtype(dtype)
    for name, dt in DATATYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no V2 datatype for {dtype}")


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
            raise _bad(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise _bad(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], memoryview(body)[n:]
    if not head:
        raise _bad("empty request body: expected a JSON inference request")
    try:
        obj = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad("inference request must be a JSON object")
    return obj, tail


def _shape(desc: dict, where: str) -> tuple[int, ...]:
    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"{where}: 'shape' must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise _bad(f"{where}: 'shape' must not have negative dimensions, got {shape}")
    return tuple(shape)


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter '{key}' must be true or false, got {value!r}")
    return value


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return params


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
        raise _bad(f"unknown input {name!r}: the model's input is '{model_input.name}'")
    where = f"input '{name}'"
    datatype = desc.get("datatype")
    if datatype != model_input.datatype:
        known = "" if datatype in KNOWN_DATATYPES else " (not a V2 datatype)"
        raise _bad(f"{where}: datatype {datatype!r}{known} does not match the model's {model_input.datatype}")
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
        try:
            tensor = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise _bad(f"{where}: 'data' must be a flat or nested list of {datatype} numbers") from None
        if tensor.size != count:
            raise _bad(f"{where}: 'data' holds {tensor.size} values but shape {list(shape)} needs {count}")
        tensor = tensor.reshape(shape)
    if dtype.kind == "f" and not np.all(np.isfinite(tensor)):
        raise _bad(f"{where}: contains NaN or infinite values")

    binary_output = _flag(params, "binary_data_output", "request")
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("'outputs' must be a list")
        for out in outputs:
            if not isinstance(out, dict):
                raise _bad("each requested output must be a JSON object")
            if out.get("name") != model_output.name:
                raise _bad(f"unknown output {out.get('name')!r}: the model's output is '{model_output.name}'")
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
        if datatype not in DATATYPES or not isinstance(shape, list):
            raise ValueError(f"output {out.get('name')!r} has datatype {datatype!r} and shape {shape!r}")
        dtype = DATATYPES[datatype].newbyteorder("<")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = tail[offset:offset + size]
            offset += size
            if out.get("name") == output_name:
                if len(chunk) != size or size != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"output {output_name!r}: binary data does not match its shape")
                return np.frombuffer(chunk, dtype=dtype).reshape(shape)
        elif out.get("name") == output_name:
            arr = np.asarray(out.get("data"), dtype=dtype)
            if arr.size != math.prod(shape):
                raise ValueError(f"output {output_name!r}: data does not match its shape")
            return arr.reshape(shape)
    raise ValueError(f"response has no output {output_name!r}")
