"""Small hand-built ONNX models for oracle tests (no torch needed), and paths to shipped assets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
SHARED = Path(os.environ.get("GATE_SHARED", ROOT.parent / "shared"))
DATASETS = SHARED / "datasets"


def demo_manifest(name: str) -> dict:
    return json.loads((DEMO / f"{name}.json").read_text())


def linear_model(path, *, layout="NCHW", size=4, channels=3, classes=5, batch="N", softmax=False,
                 seed=0, in_type=TensorProto.FLOAT, extra_input=False, output_rank3=False, nan=False):
    """A linear classifier: flatten -> x W + b (-> softmax). Weights are returned for reference checks."""
    rng = np.random.default_rng(seed)
    shape = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    d = size * size * channels
    w = rng.normal(size=(d, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    x = "input"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    nodes += [helper.make_node("Flatten", [x], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "W"], ["mm"]),
              helper.make_node("Add", ["mm", "B"], ["logits"])]
    last = "logits"
    if nan:
        inits.append(numpy_helper.from_array(np.zeros((classes,), np.float32), "Z"))
        nodes += [helper.make_node("Mul", [last, "Z"], ["zero"]), helper.make_node("Div", ["zero", "Z"], ["nanout"])]
        last = "nanout"
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=1))
        last = "probs"
    out_shape = [batch, classes]
    if output_rank3:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "AX"))
        nodes.append(helper.make_node("Unsqueeze", [last, "AX"], ["u"]))
        last, out_shape = "u", [batch, 1, classes]
    nodes.append(helper.make_node("Identity", [last], ["output"]))
    inputs = [helper.make_tensor_value_info("input", in_type, shape)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, [batch, 1]))
    graph = helper.make_graph(nodes, "linear", inputs,
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w, b
