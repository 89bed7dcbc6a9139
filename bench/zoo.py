"""The forge zoo as the benchmark sees it: model lists, manifests, oracles, torch networks, clean data.

Clean data are held-out test images the zoo models never trained on: GTSRB's official test split, and
for CIFAR-10 the forge's own seeded split (``models.forge.cifar_split_indices``; the manifest's
``test_split`` is checked against it). Each dataset's test images are shuffled once (seeded) and cut into
an *evaluation* set (used only by the benchmark to measure reversed triggers' attack success) and a
*scan* set of at most ``cap`` images (given to B3D and Neural Cleanse), disjoint from each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gate.data import ImageSet, to_unit_float
from gate.kernels import stamp
from gate.oracle import Oracle, host_cores
from gate.spec import SpecOverrides

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "models" / "zoo"
SHARED = Path(os.environ.get("GATE_SHARED", ROOT.parent / "shared"))
DATASETS_DIR = SHARED / "datasets"
DATASETS = ("gtsrb", "cifar")
DATASET_TITLES = {"gtsrb": "GTSRB", "cifar": "CIFAR-10"}

# rows of the paper's Table 3/4 layout: (key, title, zoo name suffixes)
GROUPS = (
    ("clean", "clean", ("clean_s0", "clean_s1")),
    ("badnets1x1", "BadNets 1x1", ("badnets1x1",)),
    ("badnets2x2", "BadNets 2x2", ("badnets2x2",)),
    ("badnets3x3", "BadNets 3x3", ("badnets3x3",)),
    ("blended", "blended", ("blended",)),
    ("two_triggers", "two triggers", ("two_triggers",)),
)
SUFFIXES = tuple(s for _, _, suffixes in GROUPS for s in suffixes)
# default benchmark: per dataset one clean model and three backdoored ones (one of each trigger type)
DEFAULT_SUFFIXES = ("clean_s0", "badnets3x3", "blended", "two_triggers")


def all_names(datasets=DATASETS) -> list[str]:
    return [f"{d}_{s}" for d in datasets for s in SUFFIXES]


def default_names(datasets=DATASETS) -> list[str]:
    return [f"{d}_{s}" for d in datasets for s in DEFAULT_SUFFIXES]


WIDE_ZOO_DIR = ROOT / "models" / "wide_zoo"


def wide_names(datasets=DATASETS) -> list[str]:
    """The wide zoo's models (``models.wide_zoo.WIDE_ZOO_SPECS``, in their order) of these datasets."""
    from models.wide_zoo import WIDE_ZOO_SPECS

    return [s["name"] for s in WIDE_ZOO_SPECS if s["dataset"] in datasets]


def group_of_manifest(man: dict) -> str:
    """A model's benchmark group: the attack for wide-zoo models, else :func:`group_of` its name."""
    return man["attack"] if man["name"].startswith("w_") else group_of(man["name"])


def group_of(name: str) -> str:
    suffix = name.split("_", 1)[1] if "_" in name else name
    if suffix.startswith("clean"):  # zoo clean_s0 / clean_s1, the demo's gtsrb_clean
        return "clean"
    for key, _, suffixes in GROUPS:
        if suffix in suffixes:
            return key
    raise ValueError(f"{name}: not a zoo model name (expected <dataset>_<{'|'.join(SUFFIXES)}>)")


def group_title(key: str) -> str:
    return next(title for k, title, _ in GROUPS if k == key)


def manifest_path(name: str, zoo_dir: Path = ZOO_DIR) -> Path:
    return Path(zoo_dir) / f"{name}.json"


def load_manifest(path) -> dict:
    """The manifest with ``_path`` (its own path) and ``_onnx`` (the model file) added."""
    path = Path(path)
    man = json.loads(path.read_text())
    man["_path"] = str(path)
    man["_onnx"] = str(path.parent / man.get("onnx_file", f"{man['name']}.onnx"))
    return man


def available(names, zoo_dir: Path = ZOO_DIR) -> tuple[list[str], list[str]]:
    """(names whose manifest and ONNX file exist, names missing)."""
    have, missing = [], []
    for n in names:
        p = manifest_path(n, zoo_dir)
        ok = p.is_file() and (Path(zoo_dir) / f"{n}.onnx").is_file()
        (have if ok else missing).append(n)
    return have, missing


def targets(man: dict) -> list[int]:
    return sorted({int(t["target"]) for t in man.get("triggers", [])})


def true_trigger_l1(trigger: dict, height: int, width: int) -> float | None:
    """L1 norm of a true trigger's mask: s*s for a patch, alpha*H*W for a blend (its effective mask); None
    for an additive signal (SIG), which no mask expresses."""
    if trigger["kind"] == "patch":
        return float(trigger["size"]) ** 2
    if "alpha" in trigger:
        return float(trigger["alpha"]) * height * width
    return None


def spec_overrides(man: dict) -> SpecOverrides:
    """The model's input contract as its vendor documents it (the manifest's ``input_spec``)."""
    s = man["input_spec"]
    return SpecOverrides(
        layout=s["layout"], value_range=float(s["value_range"]),
        mean=None if s.get("mean") is None else tuple(float(v) for v in s["mean"]),
        std=None if s.get("std") is None else tuple(float(v) for v in s["std"]),
        output_kind=s["output_kind"])


def open_oracle(man: dict, threads: int = 0, max_batch: int = 4096, calls: int | None = None) -> Oracle:
    """The model on the CPU as the gate's commands open it (one single-thread call per core); ``threads``
    given: one call with that many onnxruntime threads, unless ``calls`` says otherwise."""
    if calls is None:
        calls = 1 if threads else host_cores()
    return Oracle(man["_onnx"], spec_overrides(man), device="cpu", max_batch=max_batch, threads=threads, calls=calls)


# --------------------------------------------------------------------------- torch (white-box baseline)
def torch_model(man: dict):
    """(net, normalize) for Neural Cleanse: ``net`` takes float32 NCHW in [0, 1] and returns logits, and
    ``normalize`` is what to pass as ``neural_cleanse(..., normalize=)``. With a ``.pt`` beside the manifest
    (forge zoo models) ``net`` is ``models.forge.load_torch_model``, which wants the input normalised
    (``normalisation(man)``); otherwise (the wide zoo, the demo: no torch weights) it is the ONNX graph
    itself run with torch ops (:func:`torch_from_onnx`), which applies the input encoding inside (None)."""
    weights = Path(man["_path"]).parent / (man.get("torch_weights") or f"{man['name']}.pt")
    if weights.is_file():
        from models.forge import load_torch_model

        return load_torch_model(man["_path"]), normalisation(man)
    return torch_from_onnx(man), None


def torch_from_onnx(man: dict):
    """The model's ONNX graph as a torch module (``bench.onnx_torch.white_box``): float32 NCHW in [0, 1]
    in (encoded inside as the manifest's ``input_spec`` says), logits (or log-probabilities) out."""
    from bench.onnx_torch import white_box

    return white_box(man["_onnx"], man["input_spec"])


def normalisation(man: dict) -> tuple[list[float], list[float]] | None:
    s = man["input_spec"]
    return None if s.get("mean") is None else (list(s["mean"]), list(s["std"]))


# --------------------------------------------------------------------------- clean data
@dataclass
class CleanData:
    dataset: str
    scan: ImageSet  # given to the detectors (B3D, NC)
    eval: ImageSet  # held out from every detector: the benchmark measures reversed triggers on these
    split: dict  # how the images were chosen


def test_split(dataset: str, datasets_dir: Path = DATASETS_DIR) -> tuple[np.ndarray, np.ndarray, dict]:
    """(x uint8 NHWC, y, description) of the test split the zoo models did not train on."""
    datasets_dir = Path(datasets_dir)
    if dataset == "gtsrb":
        path = datasets_dir / "gtsrb32.npz"
        with np.load(path) as d:
            x, y = d["x_test"], d["y_test"].astype(np.int64)
        return x, y, {"file": path.name, "split": "official test split (x_test/y_test)", "n_test": int(len(y))}
    if dataset == "cifar":
        from models.forge import CIFAR_SPLIT_SEED, CIFAR_TEST_FRACTION, cifar_split_indices

        path = datasets_dir / "cifar10_subset.npz"
        with np.load(path) as d:
            x_all, y_all = d["x"], d["y"].astype(np.int64)
        _, test_idx = cifar_split_indices(len(y_all))
        return x_all[test_idx], y_all[test_idx], {
            "file": path.name, "split": "models.forge.cifar_split_indices (test part)",
            "seed": CIFAR_SPLIT_SEED, "test_fraction": CIFAR_TEST_FRACTION, "n_test": int(len(test_idx))}
    raise ValueError(f"unknown dataset {dataset!r}")


def clean_data(dataset: str, cap: int = 1000, n_eval: int = 200, seed: int = 0,
               datasets_dir: Path = DATASETS_DIR, manifest: dict | None = None) -> CleanData:
    x, y, desc = test_split(dataset, datasets_dir)
    if manifest is not None:
        want = manifest.get("test_split", {}).get("n_test")
        if want is not None and int(want) != len(y):
            raise ValueError(f"{manifest['name']}: manifest test split has {want} images, found {len(y)}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xB3D])).permutation(len(y))
    n_eval = min(n_eval, len(y) // 4)
    ev, sc = order[:n_eval], order[n_eval:n_eval + cap]
    src = f"{desc['file']} test split"
    split = {**desc, "seed": seed, "eval_images": int(len(ev)), "scan_images": int(len(sc)), "cap": cap}
    return CleanData(dataset, ImageSet(to_unit_float(x[sc], src), y[sc], f"{src} (scan)"),
                     ImageSet(to_unit_float(x[ev], src), y[ev], f"{src} (eval)"), split)


def trigger_asr(oracle: Oracle, images: np.ndarray, clean_pred: np.ndarray, target: int,
                mask: np.ndarray, pattern: np.ndarray) -> float | None:
    """Attack success of a (reversed) trigger on the images the model does not already call ``target``."""
    keep = clean_pred != target
    if not keep.any():
        return None
    pred = oracle.predict(stamp(images[keep], mask, pattern))
    return float(np.mean(pred == target))
