"""Neural Cleanse (Wang et al., IEEE S&P 2019): the white-box baseline, on the zoo's torch weights.

For every class c it optimises a trigger by gradient descent through the network::

    m = (tanh(theta_m) + 1) / 2   (H x W, in [0, 1]),   p = (tanh(theta_p) + 1) / 2   (H x W x C)
    minimise  CE(c | (1 - m) * x + m * p) + lambda * |m|_1      (Adam, lr 0.1, betas (0.5, 0.9) as NC)

over minibatches of clean images the model does not already assign to c. The schedule is the gate's
(``gate.search.SearchParams``, which follows NC): lambda stays 0 until the trigger first reaches
``success_threshold`` (99 %) on the step's minibatch, then starts at ``lambda_init`` (1e-3), is multiplied
by ``lambda_up`` (1.5) after ``patience`` (5) successive successful steps and divided by ``lambda_down``
(1.5^1.5) after ``patience`` failing ones. Early stop as NC: once lambda has been both raised and lowered,
stop when the best successful L1 has not improved by more than ``early_stop_tol`` for
``early_stop_patience`` steps; otherwise at ``max_steps``. The result per class is the smallest-L1 trigger
that reached the threshold on its minibatch (else the last one), and the outliers are found with the
gate's own rule (``gate.outliers.find_outliers``: MAD anomaly index > 2 below the median, or L1 below
median / 4; the B3D paper applied the median/4 rule to NC as well).

As in NC a "step" is one minibatch gradient step, and the success that drives lambda is the current (soft)
trigger's on that minibatch. All classes are optimised side by side (one forward/backward pass stamps every
running class's trigger on its own minibatch); classes are independent (their parameters and losses do
not mix; Adam is element-wise).

Dev only: imports torch. Nothing under ``gate/`` imports this module.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gate.outliers import OutlierRule, find_outliers, finite_index
from gate.result import ClassResult
from gate.search import SearchParams


@dataclass(frozen=True)
class NCConfig:
    # the gate's lambda schedule; with exact gradients NC converges within 400 steps and 40 steps of early-stop
    # patience (the black-box search needs 800 / 80, measured on the demo models)
    schedule: SearchParams = field(default_factory=lambda: SearchParams(max_steps=400, early_stop_patience=40))
    outliers: OutlierRule = field(default_factory=OutlierRule)
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 32
    max_images: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        s = self.schedule
        return {"lr": self.lr, "betas": list(self.betas), "batch_size": self.batch_size,
                "max_images": self.max_images, "seed": self.seed,
                "anomaly_threshold": self.outliers.anomaly_threshold, "median_ratio": self.outliers.median_ratio,
                **{k: getattr(s, k) for k in ("max_steps", "lambda_init", "lambda_up", "lambda_down", "patience",
                                              "success_threshold", "early_stop_patience", "early_stop_tol")}}


@dataclass
class NCResult:
    method: str
    classes: list[ClassResult]
    flagged: list[int]
    median_l1: float
    mad: float
    steps: int  # gradient steps, summed over classes
    image_passes: int  # stamped images sent forward and backward through the network
    seconds: float
    masks: np.ndarray  # (K, H, W) soft masks of the result triggers
    patterns: np.ndarray  # (K, H, W, C)
    config: dict

    def to_dict(self) -> dict:
        return {"method": self.method, "classes": [asdict(c) for c in self.classes], "flagged": self.flagged,
                "outliers": {"median_l1": self.median_l1, "mad": self.mad}, "steps": self.steps,
                "image_passes": self.image_passes, "seconds": self.seconds, "config": self.config}


def g(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.tanh(z) + 1.0)


def _atanh_init(u: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.arctanh(2.0 * np.clip(u, 1e-3, 1 - 1e-3) - 1.0).astype(np.float32))


@dataclass
class _State:
    lam: float = 0.0
    active: bool = False
    raised: bool = False
    lowered: bool = False
    up: int = 0
    down: int = 0
    step: int = 0
    best_l1: float = float("inf")
    ref: float = float("inf")
    since: int = 0
    done: bool = False
    status: str = "running"
    seconds: float = 0.0
    last_success: float = 0.0


def _schedule(s: _State, p: SearchParams, success: float) -> None:
    """The gate's lambda schedule and NC's early stop, for one class after one step."""
    hit = success >= p.success_threshold
    if not s.active:
        if hit:
            s.active, s.lam, s.ref, s.since = True, p.lambda_init, s.best_l1, 0
        return
    if hit:
        s.up, s.down = s.up + 1, 0
    else:
        s.down, s.up = s.down + 1, 0
    if s.up >= p.patience:
        s.lam *= p.lambda_up
        s.up, s.raised = 0, True
    elif s.down >= p.patience:
        s.lam /= p.lambda_down
        s.down, s.lowered = 0, True
    if s.best_l1 < (1.0 - p.early_stop_tol) * s.ref:
        s.ref, s.since = s.best_l1, 0
    else:
        s.since += 1
        if s.raised and s.lowered and s.since >= p.early_stop_patience:
            s.done, s.status = True, "converged"


def neural_cleanse(net: torch.nn.Module, images: np.ndarray, cfg: NCConfig = NCConfig(), *,
                   normalize: tuple | None = None, num_classes: int | None = None,
                   labels: list[int] | None = None, log=None) -> NCResult:
    """Reverse a trigger for every class (or ``labels``) of ``net`` and flag the outliers.

    ``images``: clean float32 NHWC images in [0, 1]. ``net``: takes float32 NCHW in [0, 1], normalised as
    ``(x - mean) / std`` when ``normalize=(mean, std)`` is given; returns logits.
    """
    t_start = time.perf_counter()
    p = cfg.schedule
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x4E43]))
    order = rng.permutation(len(images))[: cfg.max_images]
    x = torch.from_numpy(np.ascontiguousarray(images[order].transpose(0, 3, 1, 2), dtype=np.float32))
    n, c_ch, h, w = x.shape
    mean = std = None
    if normalize is not None:
        mean = torch.tensor(normalize[0], dtype=torch.float32).view(1, c_ch, 1, 1)
        std = torch.tensor(normalize[1], dtype=torch.float32).view(1, c_ch, 1, 1)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return net(batch if mean is None else (batch - mean) / std)

    with torch.no_grad():
        clean_pred = torch.cat([forward(x[i:i + 1024]).argmax(1) for i in range(0, n, 1024)]).numpy()
    k_classes = int(num_classes or forward(x[:1]).shape[1])
    labels = list(range(k_classes)) if labels is None else [int(v) for v in labels]
    kk = len(labels)
    pools = []
    for c in labels:
        pool = np.flatnonzero(clean_pred != c)
        pools.append(pool if len(pool) else np.arange(n))

    theta_m = _atanh_init(rng.random((kk, h, w))).requires_grad_(True)
    theta_p = _atanh_init(rng.random((kk, c_ch, h, w))).requires_grad_(True)
    opt = torch.optim.Adam([theta_m, theta_p], lr=cfg.lr, betas=cfg.betas)
    best_m = torch.zeros(kk, h, w)
    best_p = torch.zeros(kk, c_ch, h, w)
    states = [_State() for _ in labels]
    target_all = torch.tensor(labels, dtype=torch.int64)
    bs = cfg.batch_size
    passes = 0

    while True:
        active = [i for i, s in enumerate(states) if not s.done]
        if not active:
            break
        t0 = time.perf_counter()
        a = torch.tensor(active, dtype=torch.int64)
        idx = np.stack([rng.choice(pools[i], bs, replace=len(pools[i]) < bs) for i in active])
        xb = x[torch.from_numpy(idx.reshape(-1))].view(len(active), bs, c_ch, h, w)
        m = g(theta_m[a])  # (A, H, W)
        pat = g(theta_p[a])  # (A, C, H, W)
        mm = m[:, None, None]  # (A, 1, 1, H, W)
        stamped = (1.0 - mm) * xb + mm * pat[:, None]
        logits = forward(stamped.view(-1, c_ch, h, w))
        tgt = target_all[a].repeat_interleave(bs)
        ce = F.cross_entropy(logits, tgt, reduction="none").view(len(active), bs).mean(1)
        l1 = m.sum(dim=(1, 2))
        lam = torch.tensor([states[i].lam for i in active], dtype=torch.float32)
        loss = (ce + lam * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        passes += len(active) * bs
        with torch.no_grad():
            success = (logits.argmax(1) == tgt).view(len(active), bs).float().mean(1).numpy()
            l1_np = l1.detach().numpy()
            for j, i in enumerate(active):
                s = states[i]
                s.last_success = float(success[j])
                if success[j] >= p.success_threshold and l1_np[j] < s.best_l1:
                    s.best_l1 = float(l1_np[j])
                    best_m[i] = m[j].detach()
                    best_p[i] = pat[j].detach()
                _schedule(s, p, float(success[j]))
                s.step += 1
                if not s.done and s.step >= p.max_steps:
                    s.done = True
                    s.status = "max_steps" if np.isfinite(s.best_l1) else "not_reached"
        share = (time.perf_counter() - t0) / len(active)
        for i in active:
            states[i].seconds += share
            if states[i].done and log:
                log(f"NC class {labels[i]:>3}  step {states[i].step:>4}  L1 {states[i].best_l1:8.2f}  "
                    f"{states[i].status}")

    with torch.no_grad():
        cur_m, cur_p = g(theta_m), g(theta_p)
        masks = np.empty((kk, h, w), np.float32)
        patterns = np.empty((kk, h, w, c_ch), np.float32)
        results = []
        for i, s in enumerate(states):
            found = np.isfinite(s.best_l1)
            mi = (best_m[i] if found else cur_m[i]).numpy()
            pi = (best_p[i] if found else cur_p[i]).numpy()
            masks[i], patterns[i] = mi, pi.transpose(1, 2, 0)
            l1 = s.best_l1 if found else float(mi.sum())
            results.append(ClassResult(label=labels[i], l1=float(l1), binary_l1=int((mi >= 0.5).sum()),
                                       mask_fraction=float(l1 / (h * w)), trigger_asr=None,
                                       queries=int(s.step * bs), steps=int(s.step), status=s.status,
                                       seconds=float(s.seconds)))
    l1_all = np.array([r.l1 for r in results])
    out = find_outliers(l1_all, cfg.outliers, pixels=h * w)
    for r, ai, flag in zip(results, out.anomaly_index, out.flagged, strict=True):
        r.anomaly_index = finite_index(ai)
        r.flagged = bool(flag)
    return NCResult(method="nc", classes=results, flagged=[r.label for r in results if r.flagged],
                    median_l1=out.median, mad=out.mad, steps=int(sum(s.step for s in states)),
                    image_passes=int(passes), seconds=time.perf_counter() - t_start,
                    masks=masks, patterns=patterns, config=cfg.to_dict())


@torch.no_grad()
def torch_asr(net: torch.nn.Module, images: np.ndarray, target: int, mask: np.ndarray, pattern: np.ndarray,
              normalize: tuple | None = None) -> float | None:
    """Attack success of a trigger through the torch network on images it does not already call ``target``."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    pat = torch.from_numpy(np.ascontiguousarray(pattern.transpose(2, 0, 1), dtype=np.float32))[None]

    def forward(b):
        if normalize is not None:
            mean = torch.tensor(normalize[0], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(normalize[1], dtype=torch.float32).view(1, -1, 1, 1)
            b = (b - mean) / std
        return net(b).argmax(1)

    keep = forward(x) != target
    if not bool(keep.any()):
        return None
    return float((forward((1 - m) * x[keep] + m * pat) == target).float().mean())
