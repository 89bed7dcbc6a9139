"""Any zoo model as a torch network, from its ONNX file alone: the white-box baseline's way in.

The wide zoo keeps no torch weights (BatchNorm is folded into the convolutions of the exported graph, so
the training modules cannot be reloaded). :class:`OnnxGraph` evaluates the ONNX graph itself with torch
ops, so gradients reach the input; :func:`white_box` wraps it in Neural Cleanse's contract (float32 NCHW
in [0, 1] in, logits out), applying the model's documented input encoding on the way in.

Only the operators the zoo graphs use are implemented (``SUPPORTED_OPS``); any other operator, or an
attribute value this module does not implement, raises ``ValueError`` naming the node when the graph is
loaded, never a silently different network. Dev only: imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from gate.oracle import PROB_FLOOR
from gate.spec import LAYOUTS, OUTPUT_KINDS

Op = Callable[..., torch.Tensor]  # op(inputs: list[Tensor | None]) -> Tensor


class _Node:
    """What a graph node needs at build time: its name (for errors), attributes, opset."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self.op = node.op_type
        self.label = f"{node.op_type} node {node.name or node.output[0]!r}"
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.opset = opset
        self.used: set[str] = set()

    def get(self, name: str, default=None):
        self.used.add(name)
        return self.attrs.get(name, default)

    def bad(self, what: str) -> ValueError:
        return ValueError(f"ONNX {self.label}: {what} is not supported by bench.onnx_torch")

    def only(self, name: str, allowed: tuple, default) -> None:
        value = self.get(name, default)
        if isinstance(value, bytes):
            value = value.decode()
        if value not in allowed:
            raise self.bad(f"{name}={value!r}")

    def done(self) -> None:
        extra = sorted(set(self.attrs) - self.used)
        if extra:
            raise self.bad(f"attribute {extra[0]!r}")


def _ints(node: _Node, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.get(name, default)]


def _pads_2d(node: _Node) -> tuple[int, int, int, int]:
    """ONNX pads [top, left, bottom, right] of a 2-D op, as F.pad's (left, right, top, bottom)."""
    node.only("auto_pad", ("NOTSET",), "NOTSET")
    pads = _ints(node, "pads", [0, 0, 0, 0])
    if len(pads) != 4 or min(pads) < 0:
        raise node.bad(f"pads={pads} (only 2-D, non-negative)")
    top, left, bottom, right = pads
    return left, right, top, bottom


def _pair(node: _Node, name: str, default: int = 1) -> tuple[int, int]:
    values = _ints(node, name, [default, default])
    if len(values) != 2 or min(values) < 1:
        raise node.bad(f"{name}={values} (only 2-D, positive)")
    return values[0], values[1]


def _conv(node: _Node) -> Op:
    pad = _pads_2d(node)
    stride, dilation = _pair(node, "strides"), _pair(node, "dilations")
    group = int(node.get("group", 1))
    kernel = node.get("kernel_shape")  # checked against the weight at run time
    kernel = None if kernel is None else tuple(int(k) for k in kernel)
    symmetric = pad[0] == pad[1] and pad[2] == pad[3]

    def conv(ins):
        x, w, b = (ins + [None])[:3]
        if x.dim() != 4 or w.dim() != 4:
            raise node.bad(f"input of rank {x.dim()} / weight of rank {w.dim()} (only 2-D convolution)")
        if kernel is not None and tuple(w.shape[2:]) != kernel:
            raise node.bad(f"kernel_shape={list(kernel)} with a weight of shape {list(w.shape)}")
        if symmetric:
            return F.conv2d(x, w, b, stride, (pad[2], pad[0]), dilation, group)
        return F.conv2d(F.pad(x, pad), w, b, stride, 0, dilation, group)

    return conv


def _max_pool(node: _Node) -> Op:
    pad = _pads_2d(node)
    kernel, stride, dilation = _pair(node, "kernel_shape", 0), _pair(node, "strides"), _pair(node, "dilations")
    node.only("ceil_mode", (0,), 0)
    node.only("storage_order", (0,), 0)
    # torch pads inside max_pool2d only symmetrically and by at most half the kernel; otherwise pad with -inf
    inner = pad[0] == pad[1] and pad[2] == pad[3] and pad[2] <= kernel[0] // 2 and pad[0] <= kernel[1] // 2

    def max_pool(ins):
        x = ins[0]
        if x.dim() != 4:
            raise node.bad(f"input of rank {x.dim()} (only 2-D pooling)")
        if inner:
            return F.max_pool2d(x, kernel, stride, (pad[2], pad[0]), dilation)
        return F.max_pool2d(F.pad(x, pad, value=-math.inf), kernel, stride, 0, dilation)

    return max_pool


def _gemm(node: _Node) -> Op:
    alpha, beta = float(node.get("alpha", 1.0)), float(node.get("beta", 1.0))
    trans_a, trans_b = int(node.get("transA", 0)), int(node.get("transB", 0))

    def gemm(ins):
        a, b, c = (ins + [None])[:3]
        if a.dim() != 2 or b.dim() != 2:
            raise node.bad(f"inputs of rank {a.dim()} and {b.dim()} (Gemm takes matrices)")
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    return gemm


def _flatten(node: _Node) -> Op:
    axis = int(node.get("axis", 1))

    def flatten(ins):
        x = ins[0]
        k = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:k]), math.prod(x.shape[k:]))

    return flatten


def _softmax(node: _Node) -> Op:
    # opset 13 changed the default axis (1 -> -1) and the meaning: before it, softmax over the input
    # flattened to 2-D at ``axis``; from it, softmax along ``axis`` alone
    axis = int(node.get("axis", -1 if node.opset >= 13 else 1))

    def softmax(ins):
        x = ins[0]
        if node.opset >= 13:
            return torch.softmax(x, axis)
        k = axis + x.dim() if axis < 0 else axis
        flat = x.reshape(math.prod(x.shape[:k]), math.prod(x.shape[k:]))
        return torch.softmax(flat, 1).reshape(x.shape)

    return softmax


def _transpose(node: _Node) -> Op:
    perm = node.get("perm")
    return lambda ins: ins[0].permute(*(reversed(range(ins[0].dim())) if perm is None else perm))


def _simple(fn: Callable[..., torch.Tensor]) -> Callable[[_Node], Op]:
    return lambda node: (lambda ins: fn(*ins))


BUILDERS: dict[str, Callable[[_Node], Op]] = {
    "Conv": _conv,
    "Relu": _simple(F.relu),
    "MaxPool": _max_pool,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "GlobalAveragePool": _simple(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Add": _simple(torch.add),  # ONNX's multidirectional broadcasting is numpy's, as torch's
    "Mul": _simple(torch.mul),
    "Softmax": _softmax,
    "Transpose": _transpose,
}
SUPPORTED_OPS = (*BUILDERS, "Constant")
ARITY = {"Relu": (1, 1), "GlobalAveragePool": (1, 1), "Flatten": (1, 1), "Softmax": (1, 1), "Transpose": (1, 1),
         "Add": (2, 2), "Mul": (2, 2), "Conv": (2, 3), "Gemm": (2, 3), "MaxPool": (1, 1)}


def _constant_value(node: _Node) -> np.ndarray:
    """A Constant node's value ('value', 'value_float' or 'value_floats' only)."""
    if len(node.attrs) != 1:
        raise node.bad(f"attributes {sorted(node.attrs)}")
    (name, value), = node.attrs.items()
    if name == "value":
        return numpy_helper.to_array(value)
    if name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    raise node.bad(f"attribute {name!r}")


class OnnxGraph(torch.nn.Module):
    """An ONNX graph run with torch ops: ``forward(x)`` is the graph's first output for its one input.

    ``x`` is exactly what the ONNX model takes (its layout, range and normalisation). Initializers and
    Constant values become float32 buffers (so ``.to(device)`` moves them); the module has no parameters.
    """

    def __init__(self, model: onnx.ModelProto | str | Path):
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise ValueError("ONNX model imports no default-domain opset")
        self._consts: dict[str, str] = {}  # ONNX value name -> buffer name
        for init in graph.initializer:
            self._add_const(init.name, numpy_helper.to_array(init))
        inputs = [i.name for i in graph.input if i.name not in self._consts]
        if len(inputs) != 1:
            raise ValueError(f"ONNX graph has {len(inputs)} data inputs {inputs}; bench.onnx_torch takes one")
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name
        self._steps: list[tuple[Op, list[str], str]] = []
        self._producer: dict[str, tuple[str, list[str]]] = {}  # value name -> (op type, its inputs)
        known = {self.input_name, *self._consts}
        for proto in graph.node:
            node = _Node(proto, opset)
            if proto.domain not in ("", "ai.onnx") or node.op not in SUPPORTED_OPS:
                domain = f" (domain {proto.domain!r})" if proto.domain not in ("", "ai.onnx") else ""
                raise ValueError(f"ONNX op {node.op!r}{domain} ({node.label}) is not supported by bench.onnx_torch "
                                 f"(supported: {', '.join(SUPPORTED_OPS)})")
            if node.op == "Constant":
                self._add_const(proto.output[0], _constant_value(node))
                known.add(proto.output[0])
                continue
            lo, hi = ARITY[node.op]
            ins = list(proto.input)
            while ins and not ins[-1]:
                ins.pop()  # trailing optional inputs left out
            if not lo <= len(ins) <= hi or any(not n for n in ins):
                raise node.bad(f"{len(ins)} inputs {ins}")
            if len([o for o in proto.output if o]) != 1 or not proto.output[0]:
                raise node.bad(f"outputs {list(proto.output)} (only the first, single output)")
            missing = [n for n in ins if n not in known]
            if missing:
                raise ValueError(f"ONNX {node.label}: input {missing[0]!r} is not computed before it "
                                 f"(graph not in topological order?)")
            op = BUILDERS[node.op](node)
            node.done()
            self._steps.append((op, ins, proto.output[0]))
            self._producer[proto.output[0]] = (node.op, ins)
            known.add(proto.output[0])
        if self.output_name not in known:
            raise ValueError(f"ONNX graph output {self.output_name!r} is not computed by any node")

    def logits_name(self) -> str | None:
        """The input of the Softmax that computes the graph's output, if the graph ends in one."""
        op, ins = self._producer.get(self.output_name, (None, []))
        return ins[0] if op == "Softmax" else None

    def _add_const(self, name: str, value: np.ndarray) -> None:
        buf = f"c{len(self._consts)}"
        self.register_buffer(buf, torch.from_numpy(np.array(value, dtype=np.float32)))
        self._consts[name] = buf

    def forward(self, x: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """The graph's output (or the named intermediate value ``output``) for ``x``."""
        env = {self.input_name: x}
        for name, buf in self._consts.items():
            env[name] = getattr(self, buf)
        for op, ins, out in self._steps:
            env[out] = op([env[n] for n in ins])
        return env[output or self.output_name]


class WhiteBox(torch.nn.Module):
    """Neural Cleanse's contract over an :class:`OnnxGraph`: float32 NCHW images in [0, 1] in, logits out.

    On the way in it encodes the images as the model's ``input_spec`` says, as ``gate.oracle.Oracle``
    does: ``(x * value_range - mean) / std`` per channel (computed as ``x * scale + offset``, the oracle's
    own float32 constants), then NHWC when the model wants it. On the way out: the graph's output when
    it gives logits; when it gives probabilities from a final Softmax, that Softmax's input (the logits:
    white-box, and no gradient lost where a probability underflows); else ``log(max(p, PROB_FLOOR))``,
    log-probabilities (which act as logits for cross-entropy and for softmax: ``softmax(log p) == p``).
    """

    def __init__(self, graph: OnnxGraph, input_spec: dict):
        super().__init__()
        layout, kind = input_spec.get("layout"), input_spec.get("output_kind")
        if layout not in LAYOUTS:
            raise ValueError(f"input_spec layout {layout!r}: expected one of {LAYOUTS}")
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"input_spec output_kind {kind!r}: expected one of {OUTPUT_KINDS}")
        mean, std = input_spec.get("mean"), input_spec.get("std")
        if (mean is None) != (std is None):
            raise ValueError("input_spec mean and std must be given together")
        value_range = float(input_spec.get("value_range") or 1.0)
        mean = np.zeros(1) if mean is None else np.asarray(mean, dtype=np.float64)
        std = np.ones(1) if std is None else np.asarray(std, dtype=np.float64)
        self.graph = graph
        self.channels_last = layout == "NHWC"
        self.logits = graph.logits_name() if kind == "probs" else None
        self.log_probs = kind == "probs" and self.logits is None
        self.register_buffer("scale", torch.from_numpy((value_range / std).astype(np.float32)).view(1, -1, 1, 1))
        self.register_buffer("offset", torch.from_numpy((-mean / std).astype(np.float32)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale + self.offset
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)
        out = self.graph(y, self.logits)
        if self.log_probs:
            out = torch.log(out.clamp_min(PROB_FLOOR))
        return out


def white_box(onnx_path: str | Path, input_spec: dict) -> WhiteBox:
    """The ONNX model as a torch module (eval mode) taking float32 NCHW in [0, 1], returning logits.

    ``input_spec``: the manifest's (``layout``, ``value_range``, ``mean``, ``std``, ``output_kind``).
    Callers pass Neural Cleanse ``normalize=None``: the normalisation is inside.
    """
    return WhiteBox(OnnxGraph(onnx_path), input_spec).eval()
