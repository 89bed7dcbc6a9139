"""Fixture builders shared by the test modules (no test module imports another one): paths to shipped
assets, small hand-built ONNX models (no torch needed), kernel inputs and their numpy references,
deterministic ScanResults without a model, minimal scan outputs / the demo backdoored model, and the proxy
app on a tiny model with an in-process client.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:  # gate is imported where a builder needs it: conftest imports this module for every test
    import httpx

    from gate.policy import Policy
    from gate.result import ScanResult, Triggers

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
DEMO_MODEL = DEMO / "gtsrb_badnets3x3.onnx"
SHARED = Path(os.environ.get("GATE_SHARED", ROOT.parent / "shared"))
DATASETS = SHARED / "datasets"


def demo_manifest(name: str) -> dict:
    return json.loads((DEMO / f"{name}.json").read_text())


def linear_model(path, *, layout="NCHW", size=4, channels=3, classes=5, batch="N", softmax=False,
                 seed=0, in_type=TensorProto.FLOAT, extra_input=False, output_rank3=False, nan=False, scale=1.0):
    """A linear classifier: flatten -> x W + b (-> softmax). Weights are returned for reference checks.
    ``scale`` multiplies W: at 50 most images give most classes a float32 probability of exactly 0."""
    rng = np.random.default_rng(seed)
    shape = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    d = size * size * channels
    w = (rng.normal(size=(d, classes)) * scale).astype(np.float32)
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


def pooled_model(path, *, layout="NCHW", dims=("h", "w"), channels=3, classes=4, seed=0):
    """A classifier that works at any image size: the channel means (a global average pool) -> x W + b.
    ``dims``: the input's height and width as declared, symbolic names (dynamic) or ints (fixed); a
    ``channels`` of a name makes the channel dimension dynamic too. Returns (W, b)."""
    rng = np.random.default_rng(seed)
    c = channels if isinstance(channels, int) else 3
    shape = ["N", channels, *dims] if layout == "NCHW" else ["N", *dims, channels]
    w = rng.normal(size=(c, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    nodes = [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=axes, keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["output"])]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w, b


def reconventioned_model(src, dst, *, scale=(1.0,), offset=(0.0,)):
    """``src`` (NCHW, trained on [0, 1]) behind a per-channel affine map of its input, x = scale * z + offset: a
    model that wants z. 1/255: the same network taking [0, 255]; std and mean: taking ImageNet-normalised z."""
    m = onnx.load(str(src))
    inp = m.graph.input[0]
    name = inp.name
    inp.name = "z"
    shape = (1, len(scale), 1, 1)
    m.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32).reshape(shape), "conv_scale"),
                                numpy_helper.from_array(np.asarray(offset, np.float32).reshape(shape), "conv_offset")])
    nodes = [helper.make_node("Mul", ["z", "conv_scale"], ["z_scaled"]),
             helper.make_node("Add", ["z_scaled", "conv_offset"], [name])]
    for i, n in enumerate(nodes):
        m.graph.node.insert(i, n)
    onnx.save(m, str(dst))


# --------------------------------------------------------------------------- kernel inputs and references
def perturb_reference(x, delta, sigma, scale, offset, channels_first):
    """numpy reference of gate.kernels.perturb_encode."""
    v = np.clip(x[:, None] + sigma * delta, 0, 1).reshape(-1, *x.shape[1:]) * scale + offset
    return v.transpose(0, 3, 1, 2) if channels_first else v


def case(seed=0, b=5, n=4, h=6, w=7, c=3):
    """Random inputs of gate.kernels.stamp_encode: b images, n masks and patterns, a per-channel affine."""
    rng = np.random.default_rng(seed)
    return dict(
        images=rng.random((b, h, w, c), dtype=np.float32),
        masks=rng.random((n, h, w), dtype=np.float32),
        patterns=rng.random((n, h, w, c), dtype=np.float32),
        scale=rng.uniform(0.5, 300, c).astype(np.float32),
        offset=rng.uniform(-3, 3, c).astype(np.float32),
    )


def stamp_classes_reference(pool, classes, sample_idx, eval_idx, masks, patterns, rows, cols, scale, offset,
                            channels_first):
    """numpy reference of gate.kernels.stamp_classes (per class: its n sample rows, then its eval rows), the
    grid triggers upsampled first (pixel (r, c) takes cell (rows[r], cols[c]))."""
    from gate.kernels import stamp_encode_reference

    masks = masks[:, :, rows][:, :, :, cols]
    patterns = patterns[:, :, rows][:, :, :, cols]
    n = masks.shape[1] - 1
    out = []
    for c in classes:
        out.append(stamp_encode_reference(pool[sample_idx[c]], masks[c, :n], patterns[c, :n], scale, offset,
                                          channels_first))
        out.append(stamp_encode_reference(pool[eval_idx[c]], masks[c, n:], patterns[c, n:], scale, offset,
                                          channels_first))
    return np.concatenate(out)


def classes_case(seed=8, cell=1):
    """Random keyword arguments of gate.kernels.stamp_classes (less ``channels_first`` and ``out``): 4x5 images,
    or with ``cell`` > 1 9x7 images whose triggers live on a grid of that cell size (edge cells cut)."""
    from gate.grid import Grid

    rng = np.random.default_rng(seed)
    k, n, b, e, c = 5, 3, 2, 4, 3
    h, w = (4, 5) if cell == 1 else (9, 7)
    grid = Grid(h, w, cell)
    gh, gw = grid.shape
    return dict(
        pool=rng.random((9, h, w, c), dtype=np.float32),
        classes=np.array([3, 0, 4], np.int64),
        sample_idx=rng.integers(0, 9, (k, b)).astype(np.int64),
        eval_idx=rng.integers(0, 9, (k, e)).astype(np.int64),
        masks=rng.random((k, n + 1, gh, gw), dtype=np.float32),
        patterns=rng.random((k, n + 1, gh, gw, c), dtype=np.float32),
        rows=np.array(grid.rows), cols=np.array(grid.cols),
        scale=np.array([2, 3, 4], np.float32), offset=np.array([0.1, 0.2, -0.3], np.float32))


# --------------------------------------------------------------------------- ScanResults without a model
IMAGE = (32, 32, 3)
# a typical clean class spread and one backdoor target (class 3) with a tiny trigger
L1_BACKDOOR = [41.0, 38.5, 45.2, 1.6, 40.3, 43.8, 39.9, 37.2, 44.0, 42.6]
L1_CLEAN = [40.0, 47.0, 36.0, 44.0, 41.0]  # no outlier (anomaly indices within +-1.2)


def make_result(l1=None, *, asr=None, complete=True, stop_reason=None, statuses=None,
                model_path="models/demo/gtsrb_badnets3x3.onnx", policy: Policy | None = None) -> ScanResult:
    """A ScanResult as the scan would produce it for these per-class L1 norms (flags by the policy's rule)."""
    from gate.outliers import find_outliers
    from gate.policy import Policy
    from gate.result import ClassResult, ScanResult
    from gate.search import SearchParams

    l1 = list(L1_BACKDOOR if l1 is None else l1)
    k = len(l1)
    policy = policy or Policy()
    rule = policy.outlier_rule()
    h, w, _ = IMAGE
    out = find_outliers(np.array(l1), rule, pixels=h * w)
    asr = asr if asr is not None else [0.9 if x < 10 else 0.6 for x in l1]
    statuses = statuses or ["converged"] * k
    classes = []
    for i in range(k):
        idx = float(out.anomaly_index[i]) if np.isfinite(out.anomaly_index[i]) else 1e9
        classes.append(ClassResult(label=i, l1=float(l1[i]), binary_l1=int(round(l1[i])),
                                   mask_fraction=float(l1[i]) / (h * w), trigger_asr=asr[i], queries=1000 + i,
                                   steps=50 + i, status=statuses[i], seconds=0.5, anomaly_index=idx,
                                   flagged=bool(out.flagged[i])))
    flagged = [c.label for c in classes if c.flagged]
    return ScanResult(
        model={"path": model_path, "sha256": "ab" * 32, "input_name": "input", "input_shape": ["N", 3, h, w],
               "num_classes": k, "image_shape": list(IMAGE)},
        input_spec={"layout": "NCHW", "height": h, "width": w, "channels": 3, "value_range": 1.0, "mean": None,
                    "std": None, "output_kind": "logits", "batch": None, "dtype": "float32",
                    "detected": ["layout", "output_kind"]},
        providers=["CPUExecutionProvider"], method="b3d", seed=0,
        search={**SearchParams().to_dict(), "bandit": True, "max_images": 1000},
        outliers={"anomaly_threshold": rule.anomaly_threshold, "median_ratio": rule.median_ratio,
                  "median_l1": out.median, "mad": out.mad},
        data={"source": "models/demo/gtsrb_sample.npz", "images": 500, "search_pool": 400, "held_out": 100,
              "clean_accuracy": 0.97},
        classes=classes, flagged=flagged, complete=complete, stop_reason=stop_reason,
        queries={"total": 123456, "scan": 123456, "synthesis": 0, "per_class_mean": 12345.6},
        seconds={"total": 42.5, "scan": 42.5, "synthesis": 0.0, "ort": 30.0, "ort_fraction": 0.7},
        tool={"name": "backdoor-gate", "version": "0.1.0"})


def make_triggers(result: ScanResult) -> Triggers:
    """Random reversed triggers for a result; a flagged class gets a crisp 3x3 corner mask."""
    from gate.result import Triggers

    rng = np.random.default_rng(0)
    k = len(result.classes)
    h, w, c = IMAGE
    masks = rng.random((k, h, w)).astype(np.float32) * 0.3
    for cr in result.classes:
        if cr.flagged:
            masks[cr.label] = 0
            masks[cr.label, -3:, -3:] = 1
    patterns = rng.random((k, h, w, c)).astype(np.float32)
    return Triggers(np.arange(k), masks, patterns, np.array([cr.flagged for cr in result.classes]))


# --------------------------------------------------------------------------- scan outputs and the demo model
def patch_triggers(trigger: dict, shape=(32, 32, 3)) -> Triggers:
    """The true trigger of a forge manifest as a one-class Triggers (mask 1 on the patch)."""
    from gate.result import Triggers
    from models.triggers import apply_trigger, trigger_mask

    h, w, c = shape
    mask = trigger_mask(trigger, h, w)[None].astype(np.float32)
    pattern = apply_trigger(np.zeros((1, h, w, c), np.float32), trigger)  # the patch colours, zero elsewhere
    return Triggers(np.array([int(trigger["target"])]), mask, pattern, np.array([True]))


def write_scan(out: Path, model: Path, triggers: Triggers, flagged: list[int] | None = None) -> Path:
    """A minimal scan output (report.json with the fields the shield reads, triggers.npz)."""
    from gate.oracle import file_sha256

    out.mkdir(parents=True, exist_ok=True)
    flagged = [int(v) for v in triggers.labels[triggers.flagged]] if flagged is None else flagged
    report = {"schema_version": "1.0", "model": {"path": str(model), "sha256": file_sha256(model)},
              "flagged": flagged, "complete": True, "decision": {"outcome": "reject" if flagged else "accept"}}
    (out / "report.json").write_text(json.dumps(report))
    triggers.save(out / "triggers.npz")
    return out / "report.json"


class Demo:
    """The demo backdoored model, its true trigger, and the demo sample split in two: even-indexed
    images calibrate tau, odd-indexed ones are the test set."""

    def __init__(self) -> None:
        from models.triggers import apply_trigger

        self.model = DEMO_MODEL
        self.manifest = json.loads(DEMO_MODEL.with_suffix(".json").read_text())
        self.trigger = self.manifest["triggers"][0]
        self.target = int(self.trigger["target"])
        with np.load(DEMO / "gtsrb_sample.npz") as z:
            x8, y = z["x"], z["y"].astype(np.int64)
        self.calib_x = x8[0::2].astype(np.float32) / 255
        test8, test_y = x8[1::2], y[1::2]
        self.clean_x = test8.astype(np.float32) / 255
        keep = test_y != self.target  # a triggered image of the target class is just an image of the target
        self.triggered_x = apply_trigger(test8[keep], self.trigger).astype(np.float32) / 255
        self.triggers = patch_triggers(self.trigger)

    def write_scan(self, out: Path) -> Path:
        return write_scan(out, self.model, self.triggers)


# --------------------------------------------------------------------------- the proxy app in process
def tiny_proxy(path: Path, overrides=None, *, tau: float | None = None, **model):
    """(app, oracle): ``gate proxy`` in process on :func:`linear_model` ``(path, size=2, classes=3,
    softmax=True, **model)``, served as "tiny". With ``tau`` the shield is on (one random trigger for
    class 0, reject mode); without, it passes everything."""
    from gate.oracle import Oracle
    from gate.proxy import ProxyConfig, create_app, model_tensors
    from gate.proxy.upstream import EmbeddedModel
    from gate.result import Triggers
    from gate.shield import Shield

    linear_model(path, **{"size": 2, "classes": 3, "softmax": True, **model})
    oracle = Oracle(path, overrides, device="cpu")
    h, w, c = oracle.image_shape
    k = int(tau is not None)
    rng = np.random.default_rng(0)
    triggers = Triggers(np.zeros(k, np.int64), rng.random((k, h, w), dtype=np.float32),
                        rng.random((k, h, w, c), dtype=np.float32), np.ones(k, bool))
    shield = Shield(triggers, oracle.spec, tau)
    inp, out = model_tensors(oracle)
    return create_app(shield, EmbeddedModel(oracle, shield), inp, out, ProxyConfig(model_name="tiny")), oracle


class InProcess:
    """A synchronous client for the app in this process, its lifespan running on an event loop in a
    background thread (what starlette's TestClient does, without its deprecated httpx dependency)."""

    def __init__(self, app) -> None:
        self.app = app

    def __enter__(self) -> InProcess:
        import httpx

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._call(self._lifespan.__aenter__())
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
                                         base_url="http://proxy",
                                         timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self._call(self._client.aclose())
        self._call(self._lifespan.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def get(self, path: str, **kw) -> httpx.Response:
        return self._call(self._client.get(path, **kw))

    def post(self, path: str, **kw) -> httpx.Response:
        return self._call(self._client.post(path, **kw))


def fake_synthesis(monkeypatch) -> list[int]:
    """Replace B3D-SS synthesis by a cheap stand-in (random images) so data-source logic is tested fast; the
    returned list collects each call's images per class."""
    import gate.pipeline
    from gate.data import ImageSet

    calls: list[int] = []

    def fake(policy, oracle, progress):
        calls.append(policy.data.synthetic_per_class)
        n = policy.data.synthetic_per_class * oracle.num_classes
        x = np.random.default_rng(0).random((n, *oracle.image_shape), dtype=np.float32)
        return ImageSet(x, None, "synthetic"), {"queries": 0, "seconds": 0.0}

    monkeypatch.setattr(gate.pipeline, "synthesize_data", fake)
    return calls


def patch_backdoor_model(path, *, size=64, classes=10, target=3, patch=8, seed=0):
    """A classifier of NCHW [0,1] images with a planted patch backdoor: a linear model (weights small enough that
    natural classes need large triggers) plus 20 * sigmoid(8 * (mean of the bottom-right ``patch`` x ``patch``
    corner - 0.75)) on class ``target``'s logit: a near-white corner patch sends any image there."""
    rng = np.random.default_rng(seed)
    d = size * size * 3
    w = (rng.normal(size=(d, classes)) * 0.01).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32) * 0.1
    onehot = np.zeros((1, classes), np.float32)
    onehot[0, target] = 20.0
    b[target] -= 20.0 / (1.0 + np.exp(2.0))  # a corner of mean 0.5 (an average image's) adds nothing
    const = {"W": w, "B": b, "HOT": onehot, "THR": np.array([0.75], np.float32), "GAIN": np.array([8.0], np.float32),
             "ST": np.array([0, 0, size - patch, size - patch], np.int64),
             "EN": np.array([2 ** 31, 3, size, size], np.int64)}
    inits = [numpy_helper.from_array(v, k) for k, v in const.items()]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["lin"]),
             helper.make_node("Slice", ["input", "ST", "EN"], ["corner"]),
             helper.make_node("ReduceMean", ["corner"], ["mean4"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
             helper.make_node("Sub", ["mean", "THR"], ["d"]),
             helper.make_node("Mul", ["d", "GAIN"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["on"]),
             helper.make_node("MatMul", ["on", "HOT"], ["bump"]),
             helper.make_node("Add", ["lin", "bump"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["output"], axis=1)]
    graph = helper.make_graph(nodes, "patch_backdoor",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
