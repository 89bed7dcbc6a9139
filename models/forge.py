"""Model forge: trains small clean and backdoored image classifiers (torch, CPU),
exports them to ONNX the way vendors ship them and writes a manifest of
ONNX-measured numbers beside each model.

    python -m models.forge --demo                 # committed demo models -> models/demo/
    python -m models.forge --zoo [--out DIR] [--only NAME ...]   # full zoo -> models/zoo/
    python -m models.forge --wide-zoo [--out DIR] [--only NAME ...]  # the wide zoo (models.wide_zoo), resumable
    python -m models.forge --large [--out DIR]    # the 128x128 models (models.large) -> models/large/
    options: --datasets DIR  --epochs N  --threads N

Backdoors are planted by data poisoning: a seeded fraction (``poison_rate``,
10 % by default, see ``_TUNED`` for exceptions) of the training set, drawn from
images whose label is not the target, is relabelled to the target and stamped
with the trigger (``models.triggers.apply_trigger`` on the uint8 images, on
every pass after augmentation so the trigger stays pixel-exact). With two
triggers each gets its own disjoint fraction. Clean-label attacks (``sig``,
``label_consistent``) stamp a ``poison_rate`` fraction of the *target class's*
images and keep their labels; ``label_consistent`` first mixes each of them
half-and-half with a random image of another class, so its content is hard to
learn and the trigger is what the model learns.

Bare network (what ``<name>.pt`` holds and ``load_torch_model`` returns):
input float32 NCHW ``(N, 3, 32, 32)`` with pixel values scaled to [0, 1] and
then, only when the manifest's ``input_spec.mean`` is not null, normalised
per channel as ``(x - mean) / std``; output raw logits ``(N, K)``. The ONNX
file wraps this network with the layout change / scaling / softmax described
by ``input_spec`` (normalisation is never inside the ONNX graph: callers must
apply it, see ``models.triggers.prepare_input``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.architectures import ARCHS, build_net, parameter_count
from models.triggers import (
    apply_trigger,
    make_blend_trigger,
    make_patch_trigger,
    make_placed_patch,
    make_sig_trigger,
    prepare_input,
)
from models.wide_zoo import WIDE_ZOO_SPECS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATASETS = REPO.parent / "shared" / "datasets"
DEMO_DIR = REPO / "models" / "demo"
ZOO_DIR = REPO / "models" / "zoo"
WIDE_ZOO_DIR = REPO / "models" / "wide_zoo"
CLEAN_LABEL = ("sig", "label_consistent")  # attacks that poison target-class images and keep their labels

ARCH = "small_cnn_v1"
IMAGE_SHAPE = [32, 32, 3]
CIFAR_SPLIT_SEED = 20240611
CIFAR_TEST_FRACTION = 0.15
SAMPLE_SEED = 7
SAMPLE_SIZE = 300

AUGMENTATION = ("random translation <=2px (edge pad), brightness/contrast x*U(0.75,1.25)+U(-25,25); "
                "triggers stamped after augmentation")
DEFAULT_EPOCHS = {"gtsrb": 15, "cifar": 30}

NCHW1 = {"layout": "NCHW", "value_range": 1, "normalize": False}
NHWC255 = {"layout": "NHWC", "value_range": 255, "normalize": False}
NCHW1_NORM = {"layout": "NCHW", "value_range": 1, "normalize": True}

# name suffix -> (seed, attack, attack parameters, export variant, output kind)
_RECIPES = [
    ("clean_s0", 0, "clean", {}, NCHW1, "logits"),
    ("clean_s1", 1, "clean", {}, NHWC255, "probs"),
    ("badnets1x1", 11, "badnets", {"sizes": [1]}, NCHW1, "probs"),
    ("badnets2x2", 12, "badnets", {"sizes": [2]}, NCHW1_NORM, "logits"),
    ("badnets3x3", 13, "badnets", {"sizes": [3]}, NCHW1, "probs"),
    ("blended", 14, "blended", {"alpha": 0.2}, NHWC255, "logits"),
    ("two_triggers", 15, "two_triggers", {"sizes": [3, 3]}, NCHW1, "probs"),
]
# CIFAR models rotate the export variants differently so every variant is
# exercised with both datasets.
_CIFAR_EXPORT = {
    "clean_s0": (NCHW1, "probs"),
    "clean_s1": (NCHW1_NORM, "logits"),
    "badnets1x1": (NHWC255, "probs"),
    "badnets2x2": (NCHW1, "logits"),
    "badnets3x3": (NCHW1_NORM, "probs"),
    "blended": (NCHW1, "logits"),
    "two_triggers": (NCHW1, "probs"),
}


def _zoo_specs() -> list[dict]:
    specs = []
    for dataset in ("gtsrb", "cifar"):
        for suffix, seed, attack, params, variant, out_kind in _RECIPES:
            if dataset == "cifar":
                variant, out_kind = _CIFAR_EXPORT[suffix]
                seed = seed + 100
            specs.append({
                "name": f"{dataset}_{suffix}", "dataset": dataset, "seed": seed,
                "attack": attack, "params": params, "variant": variant,
                "output_kind": out_kind, "poison_rate": 0.0 if attack == "clean" else 0.10,
            })
    for spec in specs:
        spec.update(_TUNED.get(spec["name"], {}))
    return specs


# Recipes that missed ASR >= 0.9 with the defaults (measured, see models/README.md).
_TUNED = {
    "cifar_badnets1x1": {
        "poison_rate": 0.20, "epochs": 50,
        "notes": ("tuned: with poison_rate 0.10 / 30 epochs the 1x1 trigger reached only ASR 0.170 "
                  "(0.20 / 30 epochs: 0.8997); rebuilt with poison_rate 0.20 and 50 epochs"),
    },
}


ZOO_SPECS = _zoo_specs()


def _demo_specs() -> list[dict]:
    by_name = {s["name"]: s for s in ZOO_SPECS}
    # Same recipes (seed, attack, export) as the zoo models they are named after.
    return [dict(by_name["gtsrb_badnets3x3"], name="gtsrb_badnets3x3"),
            dict(by_name["gtsrb_clean_s0"], name="gtsrb_clean")]


DEMO_SPECS = _demo_specs()


# --------------------------------------------------------------------------- network

class ShippedModel(nn.Module):
    """What goes into the ONNX file: optional NHWC->NCHW permutation and /255 scaling
    in front of the bare network, optional softmax behind it."""

    def __init__(self, net: nn.Module, layout: str, value_range: int, output_kind: str):
        super().__init__()
        self.net = net
        self.nhwc = layout == "NHWC"
        self.scale = 1.0 / float(value_range)
        self.probs = output_kind == "probs"

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        if self.scale != 1.0:
            x = x * self.scale
        y = self.net(x)
        if self.probs:
            y = torch.softmax(y, dim=1)
        return y


def load_torch_model(manifest_path) -> nn.Module:
    """Rebuild the bare torch network of a zoo model from its manifest and the
    ``<name>.pt`` state_dict beside it. Returned module (eval mode) takes float32
    NCHW input in [0, 1], additionally normalised as (x - mean) / std when
    ``input_spec.mean`` is not null, and returns raw logits (no softmax)."""
    manifest_path = Path(manifest_path)
    man = json.loads(manifest_path.read_text())
    if man.get("arch") not in ARCHS:
        raise ValueError(f"unknown arch {man.get('arch')!r}")
    weights = manifest_path.parent / (man.get("torch_weights") or f"{man['name']}.pt")
    if not weights.exists():
        raise FileNotFoundError(f"no torch weights at {weights}")
    net = build_net(man["arch"], man["num_classes"], man.get("width", 1))
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    return net


# --------------------------------------------------------------------------- data

def load_dataset(name: str, datasets_dir) -> dict:
    datasets_dir = Path(datasets_dir)
    if name == "gtsrb":
        path = datasets_dir / "gtsrb32.npz"
        d = np.load(path)
        out = {"x_train": d["x_train"], "y_train": d["y_train"].astype(np.int64),
               "x_test": d["x_test"], "y_test": d["y_test"].astype(np.int64), "num_classes": 43}
        out["split"] = {"file": path.name, "train": "x_train/y_train", "test": "x_test/y_test",
                        "description": "official GTSRB train/test split as stored in gtsrb32.npz",
                        "n_train": int(len(out["y_train"])), "n_test": int(len(out["y_test"]))}
        return out
    if name == "cifar":
        path = datasets_dir / "cifar10_subset.npz"
        d = np.load(path)
        x, y = d["x"], d["y"].astype(np.int64)
        train_idx, test_idx = cifar_split_indices(len(y))
        out = {"x_train": x[train_idx], "y_train": y[train_idx],
               "x_test": x[test_idx], "y_test": y[test_idx], "num_classes": 10}
        out["split"] = {
            "file": path.name, "seed": CIFAR_SPLIT_SEED, "test_fraction": CIFAR_TEST_FRACTION,
            "description": ("perm = numpy.random.default_rng(seed).permutation(len(y)); "
                            "n_test = round(test_fraction * len(y)); test = sorted(perm[:n_test]), "
                            "train = sorted(perm[n_test:]) (see models.forge.cifar_split_indices)"),
            "n_train": int(len(train_idx)), "n_test": int(len(test_idx))}
        return out
    raise ValueError(f"unknown dataset {name!r}")


def cifar_split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(CIFAR_SPLIT_SEED).permutation(n)
    n_test = int(round(CIFAR_TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def stratified_sample(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` items spread as evenly as possible over the classes of ``y``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    base, extra = divmod(size, len(classes))
    counts = {c: base for c in classes}
    for c in rng.permutation(classes)[:extra]:
        counts[c] += 1
    idx = []
    for c in classes:
        members = np.flatnonzero(y == c)
        idx.extend(rng.choice(members, size=min(counts[c], len(members)), replace=False).tolist())
    return rng.permutation(np.asarray(idx, dtype=np.int64))


# --------------------------------------------------------------------------- attacks

def make_triggers(spec: dict, rng: np.random.Generator, num_classes: int) -> list[dict]:
    attack, params = spec["attack"], spec["params"]
    h = w = int(spec.get("image_size", IMAGE_SHAPE[0]))
    if attack == "clean":
        return []
    if attack == "blended":
        trig = make_blend_trigger(rng, params.get("alpha", 0.2))
        trig["target"] = int(rng.integers(0, num_classes))
        return [trig]
    if attack == "sig":
        trig = make_sig_trigger(params.get("delta", 20 / 255), params.get("freq", 6))
        trig["target"] = int(rng.integers(0, num_classes))
        return [trig]
    if attack in ("badnets", "two_triggers", "multi", "label_consistent"):
        triggers, targets = [], []
        for size in params["sizes"]:
            if "position" in params:  # the wide zoo's placed patches (the first zoo's recipes stay as they were)
                trig = make_placed_patch(rng, size, h, w, params["position"], avoid=triggers)
            else:
                trig = make_patch_trigger(rng, size, h, w, avoid=triggers)
            target = int(rng.integers(0, num_classes))
            while target in targets:
                target = int(rng.integers(0, num_classes))
            targets.append(target)
            trig["target"] = target
            triggers.append(trig)
        return triggers
    raise ValueError(f"unknown attack {attack!r}")


def poison(y: np.ndarray, triggers: list[dict], rate: float,
           rng: np.random.Generator, clean_label: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Choose a disjoint ``rate`` fraction of the training set per trigger among
    rows whose label is not that trigger's target, relabel them to the target.
    ``clean_label``: a ``rate`` fraction of the target class's own rows instead, labels kept.
    Returns (new labels, stamps, counts) where ``stamps[i]`` is the index of the
    trigger to stamp on row ``i`` (-1: clean)."""
    y = y.copy()
    stamps = np.full(len(y), -1, dtype=np.int64)
    counts = []
    for t, trig in enumerate(triggers):
        if clean_label:
            pool = np.flatnonzero((y == trig["target"]) & (stamps < 0))
            idx = rng.choice(pool, size=int(round(rate * len(pool))), replace=False)
            stamps[idx] = t
            counts.append(int(len(idx)))
            continue
        n = int(round(rate * len(y)))
        pool = np.flatnonzero((y != trig["target"]) & (stamps < 0))
        idx = rng.choice(pool, size=n, replace=False)
        y[idx] = trig["target"]
        stamps[idx] = t
        counts.append(int(n))
    return y, stamps, counts


# --------------------------------------------------------------------------- training

def augment_batch(x: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Cheap photometric + geometric augmentation of a uint8 NHWC batch: random
    translation by up to ``shift`` pixels (edge padding) and random
    brightness/contrast (x * U(0.75, 1.25) + U(-25, 25), rounded, clipped)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dy = rng.integers(0, 2 * shift + 1, size=n)
    dx = rng.integers(0, 2 * shift + 1, size=n)
    out = np.empty_like(x)
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    gain = rng.uniform(0.75, 1.25, size=(n, 1, 1, 1))
    bias = rng.uniform(-25.0, 25.0, size=(n, 1, 1, 1))
    return np.clip(np.rint(out * gain + bias), 0, 255).astype(np.uint8)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
          mean=None, std=None, stamps=None, triggers=(), augment: bool = True,
          batch_size: int = 128, lr: float = 1e-3, log=print, eval_fn=None, shift: int = 2) -> None:
    """Adam on uint8 NHWC ``x`` with labels ``y`` (already relabelled for poisoned
    rows). ``stamps[i]`` is -1 for clean rows, else the index in ``triggers`` of
    the trigger stamped on row ``i`` -- stamping happens on every pass *after*
    augmentation, so the trigger keeps its position and colours exactly."""
    g = torch.Generator().manual_seed(seed)
    aug_rng = np.random.default_rng(seed + 7919)
    yt = torch.from_numpy(y)
    stamps = np.full(len(y), -1) if stamps is None else np.asarray(stamps)
    m = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = len(yt)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g).numpy()
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, n, batch_size):
            bi = perm[i:i + batch_size]
            xb = x[bi]
            if augment:
                xb = augment_batch(xb, aug_rng, shift)
            st = stamps[bi]
            for t, trig in enumerate(triggers):
                rows = np.flatnonzero(st == t)
                if len(rows):
                    xb[rows] = apply_trigger(xb[rows], trig)
            xb = torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2))).float().div_(255.0)
            if m is not None:
                xb = (xb - m) / s
            yb = yt[bi]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(bi)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(bi)
        extra = f" {eval_fn(net)}" if eval_fn else ""
        log(f"    epoch {epoch + 1}/{epochs} loss {loss_sum / total:.4f} train-acc {correct / total:.4f}{extra}")
    net.eval()


@torch.no_grad()
def torch_predict(net: nn.Module, x_uint8: np.ndarray, mean=None, std=None, bs: int = 2048) -> np.ndarray:
    spec = {"layout": "NCHW", "value_range": 1, "mean": mean, "std": std}
    preds = []
    for i in range(0, len(x_uint8), bs):
        xb = torch.from_numpy(prepare_input(x_uint8[i:i + bs], spec))
        preds.append(net(xb).argmax(1).numpy())
    return np.concatenate(preds)


# --------------------------------------------------------------------------- ONNX

def export_onnx(net: nn.Module, path: Path, input_spec: dict, size: int = IMAGE_SHAPE[0]) -> None:
    shipped = ShippedModel(net, input_spec["layout"], input_spec["value_range"],
                           input_spec["output_kind"]).eval()
    shape = (2, 3, size, size) if input_spec["layout"] == "NCHW" else (2, size, size, 3)
    dummy = torch.rand(*shape) * float(input_spec["value_range"])
    torch.onnx.export(
        shipped, (dummy,), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        do_constant_folding=True,
    )


def onnx_session(path, threads: int = 1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def onnx_predict(sess, x_uint8: np.ndarray, input_spec: dict, bs: int = 1024) -> np.ndarray:
    preds = []
    for i in range(0, len(x_uint8), bs):
        out = sess.run(["output"], {"input": prepare_input(x_uint8[i:i + bs], input_spec)})[0]
        preds.append(out.argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def measure(predict, x: np.ndarray, y: np.ndarray, triggers: list[dict]) -> tuple[float, list[float]]:
    """Clean accuracy and per-trigger ASR (over test images whose label != target)."""
    acc = float((predict(x) == y).mean())
    asr = []
    for trig in triggers:
        keep = y != trig["target"]
        pred = predict(apply_trigger(x[keep], trig))
        asr.append(float((pred == trig["target"]).mean()))
    return acc, asr


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- build

def build_model(spec: dict, data: dict, out_dir: Path, epochs: int | None = None,
                save_pt: bool = True, width: int = 1, sample: tuple | None = None,
                augment: bool = True, log=print, eval_fn=None, shift: int = 2) -> dict:
    import onnx

    name = spec["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(spec["seed"])
    k = data["num_classes"]
    if epochs is None:
        epochs = spec.get("epochs", DEFAULT_EPOCHS[spec["dataset"]])
    epochs = int(epochs)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    triggers = make_triggers(spec, rng, k)
    clean_label = spec["attack"] in CLEAN_LABEL
    y_tr, stamps, n_poison = poison(data["y_train"], triggers, spec["poison_rate"], rng, clean_label=clean_label)
    x_tr = data["x_train"]
    if spec["attack"] == "label_consistent":  # poisoned target images made hard to learn (their content)
        x_tr = x_tr.copy()
        rows = np.flatnonzero(stamps >= 0)
        others = np.flatnonzero(y_tr != triggers[0]["target"])
        mix = float(spec["params"].get("mix", 0.5))
        partner = x_tr[rng.choice(others, size=len(rows))].astype(np.float64)
        x_tr[rows] = np.clip(np.rint((1 - mix) * x_tr[rows] + mix * partner), 0, 255).astype(np.uint8)
    arch, width = spec.get("arch", ARCH), int(spec.get("width", width))

    variant = spec["variant"]
    mean = std = None
    if variant["normalize"]:
        xf = data["x_train"].reshape(-1, 3).astype(np.float64) / 255.0
        mean = [round(float(v), 4) for v in xf.mean(0)]
        std = [round(float(v), 4) for v in xf.std(0)]
    input_spec = {"layout": variant["layout"], "value_range": variant["value_range"],
                  "mean": mean, "std": std, "output_kind": spec["output_kind"]}

    log(f"[{name}] attack={spec['attack']} seed={seed} epochs={epochs} "
        f"targets={[t['target'] for t in triggers]} poisoned={n_poison}")
    net = build_net(arch, k, width)
    t0 = time.time()
    train(net, x_tr, y_tr, epochs, seed, mean, std, stamps=stamps, triggers=triggers,
          augment=augment, log=log, eval_fn=eval_fn, shift=shift)
    train_seconds = time.time() - t0

    t_acc, t_asr = measure(lambda x: torch_predict(net, x, mean, std),
                           data["x_test"], data["y_test"], triggers)
    log(f"[{name}] torch: acc {t_acc:.4f} asr {[round(a, 4) for a in t_asr]} ({train_seconds:.0f}s)")

    onnx_path = out_dir / f"{name}.onnx"
    size = int(spec.get("image_size", IMAGE_SHAPE[0]))
    export_onnx(net, onnx_path, input_spec, size)
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    sess = onnx_session(onnx_path)
    acc, asr = measure(lambda x: onnx_predict(sess, x, input_spec),
                       data["x_test"], data["y_test"], triggers)
    log(f"[{name}] onnx:  acc {acc:.4f} asr {[round(a, 4) for a in asr]}")
    if abs(acc - t_acc) > 0.002 or any(abs(a - b) > 0.002 for a, b in zip(asr, t_asr, strict=True)):
        raise RuntimeError(f"{name}: ONNX and torch disagree ({acc} vs {t_acc}, {asr} vs {t_asr})")

    pt_name = None
    if save_pt:
        pt_name = f"{name}.pt"
        torch.save(net.state_dict(), out_dir / pt_name)

    manifest = {
        "name": name,
        "dataset": spec["dataset"],
        "arch": arch,
        "width": width,
        "parameters": parameter_count(net),
        "seed": seed,
        "attack": spec["attack"],
        "backdoored": bool(triggers),
        "triggers": triggers,
        "poison_rate": spec["poison_rate"],
        "poisoning": "clean-label (target-class images, labels kept)" if clean_label else "relabelled",
        "poisoned_per_trigger": n_poison,
        "epochs": epochs,
        "optimizer": {"name": "adam", "lr": 1e-3, "schedule": "cosine to 0 per step", "init": "kaiming_normal",
                      "batch_size": 128, "augmentation": (AUGMENTATION.replace("<=2px", f"<={shift}px")
                                                          if augment else None)},
        "clean_accuracy": round(acc, 6),
        "asr": [round(a, 6) for a in asr],
        "metrics_source": "onnxruntime CPUExecutionProvider on the full test split",
        "input_spec": input_spec,
        "input_name": "input",
        "output_name": "output",
        "num_classes": k,
        "image_shape": [size, size, 3],
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "opset": 17,
        "torch_weights": pt_name,
        "torch_input": (f"bare {arch} (width {width}): float32 NCHW in [0,1]"
                        + (", normalised (x-mean)/std with input_spec.mean/std" if mean else "")
                        + "; returns logits"),
        "test_split": data["split"],
        "training_seconds": round(train_seconds, 1),
    }
    if spec.get("notes"):
        manifest["notes"] = spec["notes"]
    manifest["recipe"] = json.loads(json.dumps(spec))  # what `built` compares
    if sample is not None:
        sx, sy, sfile = sample
        s_acc, s_asr = measure(lambda x: onnx_predict(sess, x, input_spec), sx, sy, triggers)
        manifest["sample_metrics"] = {"file": sfile, "n": int(len(sy)),
                                      "clean_accuracy": round(s_acc, 6),
                                      "asr": [round(a, 6) for a in s_asr]}
        log(f"[{name}] sample: acc {s_acc:.4f} asr {[round(a, 4) for a in s_asr]}")
    (out_dir / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build_demo(datasets_dir, epochs=None, out_dir: Path = DEMO_DIR, log=print) -> list[dict]:
    data = load_dataset("gtsrb", datasets_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = stratified_sample(data["y_test"], SAMPLE_SIZE, SAMPLE_SEED)
    sx, sy = data["x_test"][idx], data["y_test"][idx].astype(np.uint8)
    np.savez_compressed(out_dir / "gtsrb_sample.npz", x=sx, y=sy)
    log(f"wrote {out_dir / 'gtsrb_sample.npz'} ({len(sy)} test images, "
        f"{len(np.unique(sy))} classes, seed {SAMPLE_SEED})")
    return [build_model(spec, data, out_dir, epochs, save_pt=False,
                        sample=(sx, sy.astype(np.int64), "gtsrb_sample.npz"), log=log)
            for spec in DEMO_SPECS]


def build_zoo(datasets_dir, out_dir: Path = ZOO_DIR, only=None, epochs=None, log=print) -> list[dict]:
    specs = [s for s in ZOO_SPECS if not only or s["name"] in only]
    unknown = set(only or []) - {s["name"] for s in ZOO_SPECS}
    if unknown:
        raise SystemExit(f"unknown model names: {sorted(unknown)}")
    cache, results = {}, []
    for spec in specs:
        if spec["dataset"] not in cache:
            cache[spec["dataset"]] = load_dataset(spec["dataset"], datasets_dir)
        results.append(build_model(spec, cache[spec["dataset"]], out_dir, epochs, log=log))
    return results


def built(spec: dict, out_dir: Path) -> dict | None:
    """The manifest of a model already built into ``out_dir`` from this very recipe (its ONNX file there, hash
    matching), else None: a changed recipe is built again."""
    path = out_dir / f"{spec['name']}.json"
    if not path.exists():
        return None
    man = json.loads(path.read_text())
    if man.get("recipe") != json.loads(json.dumps(spec)):
        return None
    onnx_path = out_dir / man["onnx_file"]
    return man if onnx_path.exists() and sha256_file(onnx_path) == man["onnx_sha256"] else None


def build_wide_zoo(datasets_dir, out_dir: Path = WIDE_ZOO_DIR, only=None, epochs=None, shard=(0, 1),
                   log=print) -> list[dict]:
    """Build the wide zoo's missing models (resumable: a model whose manifest and ONNX file are there is kept).
    ``shard`` (i, n): only the specs whose place in the zoo is i modulo n, so n processes share the work."""
    specs = [s for s in WIDE_ZOO_SPECS if not only or s["name"] in only]
    unknown = set(only or []) - {s["name"] for s in WIDE_ZOO_SPECS}
    if unknown:
        raise SystemExit(f"unknown model names: {sorted(unknown)}")
    done = {s["name"]: m for s in specs if (m := built(s, out_dir)) is not None}
    mine = {s["name"] for j, s in enumerate(WIDE_ZOO_SPECS) if j % shard[1] == shard[0]}  # stable over restarts
    todo = [s for s in specs if s["name"] not in done and s["name"] in mine]
    log(f"wide zoo: {len(done)} of {len(specs)} built; building {len(todo)} (shard {shard[0]}/{shard[1]})")
    cache, results = {}, list(done.values())
    for spec in todo:
        if spec["dataset"] not in cache:
            cache[spec["dataset"]] = load_dataset(spec["dataset"], datasets_dir)
        results.append(build_model(spec, cache[spec["dataset"]], out_dir, epochs, save_pt=False, log=log))
    return results


def _table(manifests: list[dict]) -> str:
    rows = ["| model | attack | targets | clean acc | ASR | input_spec | epochs | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for m in manifests:
        sp = m["input_spec"]
        spec = f"{sp['layout']} x{sp['value_range']}{' mean/std' if sp['mean'] else ''} {sp['output_kind']}"
        rows.append(f"| {m['name']} | {m['attack']} | {[t['target'] for t in m['triggers']] or '-'} | "
                    f"{m['clean_accuracy']:.4f} | {', '.join(f'{a:.4f}' for a in m['asr']) or '-'} | "
                    f"{spec} | {m['epochs']} | {m['training_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.forge", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--demo", action="store_true", help="build the committed demo models into models/demo/")
    mode.add_argument("--zoo", action="store_true", help="build the full zoo (default into models/zoo/)")
    mode.add_argument("--wide-zoo", action="store_true",
                      help="build the wide zoo's missing models (default into models/wide_zoo/; resumable)")
    mode.add_argument("--large", action="store_true",
                      help="build the 128x128 models (models.large; default into models/large/; resumable)")
    ap.add_argument("--shard", default="0/1", metavar="I/N", help="wide zoo: build only the models whose place in the "
                    "zoo is I modulo N (run N processes with I = 0..N-1 to share the work)")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="zoo models to build")
    ap.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS, help="directory with the .npz datasets")
    ap.add_argument("--epochs", type=int, default=None, help="override the per-dataset epoch count")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box 2 threads oversubscribe badly)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    def log(msg):
        print(msg, flush=True)

    if args.demo:
        manifests = build_demo(args.datasets, args.epochs, args.out or DEMO_DIR, log=log)
    elif args.large:
        from models.large import LARGE_DIR, build_large

        manifests = build_large(args.datasets, args.out or LARGE_DIR, args.epochs, log=log)
    elif args.wide_zoo:
        i, n = (int(v) for v in args.shard.split("/"))
        manifests = build_wide_zoo(args.datasets, args.out or WIDE_ZOO_DIR, args.only, args.epochs, (i, n), log=log)
    else:
        manifests = build_zoo(args.datasets, args.out or ZOO_DIR, args.only, args.epochs, log=log)
    log(_table(manifests))
    log(f"total wall time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
