"""B3D-SS: synthesise clean-looking samples per class when no clean data is available (paper Sec. 3.4).

For each class c, n images start as uniform noise (or as the buyer's unlabelled seed images) and are
optimised with the gradient-free estimate of paper Eq. 7::

    x <- clip(x - eta * step(1/(k sigma) sum_j l(c, f(x + sigma delta_j)) delta_j), 0, 1)

with antithetic probes (their loss differences), averaged over steps with momentum. ``update="sign"``
(default) takes a signed step of size eta per searched value (as black-box NES attacks do; robust to the
estimate's scale), ``"plain"`` the raw gradient step of Eq. 7. Every image of every class is probed in the
same large model calls.

Three changes from Eq. 7 as written (``SynthConfig.paper()`` turns all three off). Per-pixel synthesis
stopped at p(c | x) >= 0.5 makes noise-like images just past a decision boundary that any small patch
flips, mostly into a clean model's "sink" class (GTSRB 12): on them that class's reversed trigger was a
fifth of the median and B3D-SS flagged clean models. The gate's synthetic images are meant to be as hard
to flip as real ones:

* ``grid`` (4): the searched values are a grid x grid x C image, upsampled bilinearly to the model's
  size; the noise start and the probes live on that grid (seed images are kept and the grid is searched
  on top of them). Smooth images are closer to natural ones, and the estimate has 48 dimensions, not 3072.
* ``occlusion`` (8): both probes of each antithetic pair carry the same random square patch (side 1-8,
  random place and colour), so the estimate follows the expected loss under occlusion.
* ``robust_stop`` with ``confidence`` 0.95: an image stops only when p(c) averaged over its occluded,
  noisy probes reaches 0.95.

Measured on the clean GTSRB demo (10 images per class): a random 8x8 patch moves 38 % of real images to
another class and 1.5 % into class 12; per-pixel synthetic images 69 % and 9.8 %; the gate's 11 % and
1.0 %. Scans on them: class 12's trigger went from 0.20 of the median L1 (flagged) to 0.60 (real data
0.68), while the backdoored demo's target still falls to 0.05 of the median. bench/RESULTS.md has the
zoo benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from gate.batches import make_batch
from gate.data import ImageSet
from gate.errors import GateError
from gate.oracle import Oracle
from gate.progress import Message, Progress
from gate.settings import Settings, boolean, choice, even_integer, integer, number, optional, setting


@dataclass(frozen=True)
class SynthConfig(Settings):
    """B3D-SS synthesis settings (policy section ``synthesis``; the two most used sit under ``data``)."""

    SECTION = "synthesis"
    FLAG_PREFIX = "synth-"

    per_class: int = setting(100, integer(1), "synthetic images per class (B3D-SS)",
                             place="data.synthetic_per_class", flag="--synthetic-per-class")
    grid: int | None = setting(4, optional(integer(1), none_text="0"),
                               "synthetic images are searched on this grid, upsampled (null, or 0 on the command "
                               "line: every pixel, paper Eq. 7)", place="data.synthetic_grid", flag="--synthetic-grid")
    k: int = setting(20, even_integer(2), "probes per image per step (antithetic pairs)")
    sigma: float = setting(0.1, number(0, lo_open=True), "probe noise scale")
    lr: float = setting(0.02, number(0, lo_open=True), "step size")
    update: str = setting("sign", choice("sign", "plain"), "sign: signed steps of size lr | plain: Eq. 7's raw step")
    momentum: float = setting(0.9, number(0, 1, hi_open=True), "averages the estimates over steps (0: Eq. 7)")
    max_steps: int = setting(200, integer(1), "steps per image at most")
    confidence: float = setting(0.95, number(0, 1, lo_open=True), "an image stops once p(class) reaches this")
    occlusion: int = setting(8, integer(0), "each probe pair carries a random square patch of side 1..this (0: none)")
    robust_stop: bool = setting(True, boolean, "p(class) averaged over the occluded probes must reach confidence, "
                                "not only p(class | x)")
    batch_images: int = setting(4096, integer(1), "model rows per call", flag=False)
    seed: int = setting(0, integer(0), "random seed (the pipeline passes the scan's seed)", place=False, flag=False)

    @classmethod
    def paper(cls, **changes) -> SynthConfig:
        """Eq. 7 as the paper writes it: every pixel, no occlusion, stop at the first p(c | x) >= 0.5."""
        return cls(**{**PAPER_SYNTHESIS, **changes})


# what SynthConfig.paper() changes: every pixel, no occlusion, stop at the first p(c | x) >= 0.5
PAPER_SYNTHESIS = {"grid": None, "occlusion": 0, "robust_stop": False, "confidence": 0.5, "max_steps": 60}


def _lifter(shape: tuple[int, int, int], grid: int | None):
    """(lift, searched shape): lift maps searched values (..., g, g, C) to images (..., H, W, C)."""
    if grid is None:
        return (lambda z: z), shape
    h, w, ch = shape
    up_h, up_w = upsample_matrix(h, grid), upsample_matrix(w, grid)

    def lift(z: np.ndarray) -> np.ndarray:
        return np.einsum("Hh,...hwc,Ww->...HWc", up_h, z, up_w, optimize=True).astype(np.float32, copy=False)
    return lift, (grid, grid, ch)


def upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights, pixel centres aligned (half-pixel convention)."""
    pos = (np.arange(size) + 0.5) * grid / size - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 1)
    hi = np.clip(lo + 1, 0, grid - 1)
    frac = np.clip(pos - np.floor(pos), 0.0, 1.0)
    frac[pos < 0] = 0.0
    m = np.zeros((size, grid), np.float32)
    np.add.at(m, (np.arange(size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size), hi), frac)
    return m


def occlude_pairs(d: np.ndarray, x: np.ndarray, max_side: int, sigma: float, rng: np.random.Generator) -> None:
    """Put one random square patch (side 1..max_side, at most the image's, random place and colour) on both
    probes of every antithetic pair, in place. ``d`` (n, 1 + 2*half, H, W, C) holds probe offsets in units
    of sigma after the image row; the patched pixels get the offset that lands exactly on the colour."""
    n, h, w, ch = x.shape
    half = (d.shape[1] - 1) // 2
    side = rng.integers(1, min(max_side, h, w) + 1, (n, half, 1))
    top = (rng.random((n, half, 1)) * (h - side + 1)).astype(np.int64)
    left = (rng.random((n, half, 1)) * (w - side + 1)).astype(np.int64)
    colour = rng.random((n, half, 1, 1, ch), dtype=np.float32)
    rows, cols = np.arange(h), np.arange(w)
    inside = (((rows >= top) & (rows < top + side))[..., :, None]
              & ((cols >= left) & (cols < left + side))[..., None, :])[..., None]  # (n, half, H, W, 1)
    onto = (colour - x[:, None]) / np.float32(sigma)
    for pair in (slice(1, half + 1), slice(half + 1, 2 * half + 1)):
        np.copyto(d[:, pair], onto, where=inside)


def synthesize(oracle: Oracle, cfg: SynthConfig = SynthConfig(), *, seed_images: ImageSet | None = None,
               progress: Progress | None = None, max_queries: int | None = None) -> tuple[ImageSet, dict]:
    """Synthetic images for every class and statistics (queries, seconds, success per class)."""
    t0 = time.perf_counter()
    q0 = oracle.queries
    progress = progress or Progress(enabled=False)
    k_classes = oracle.num_classes
    shape = oracle.image_shape
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x55]))
    total = k_classes * cfg.per_class
    labels = np.repeat(np.arange(k_classes), cfg.per_class)
    if cfg.grid is not None and cfg.grid > min(shape[:2]):
        raise GateError(f"synthesis grid {cfg.grid} is larger than the model's {shape[0]}x{shape[1]} images")
    lift, zshape = _lifter(shape, cfg.grid)
    # x = clip(base + lift(z)): z is searched; base holds the seed images when a grid is searched on top
    base = None
    if seed_images is not None:
        if len(seed_images) == 0:
            raise GateError("seed images: the set is empty")
        seeds = seed_images.x[rng.integers(0, len(seed_images), total)].astype(np.float32)
        if cfg.grid is None:
            z = seeds
        else:
            base, z = seeds, np.zeros((total, *zshape), np.float32)
    else:
        z = rng.random((total, *zshape), dtype=np.float32)
    z_low = 0.0 if base is None else -1.0

    def render(ids: np.ndarray) -> np.ndarray:
        img = lift(z[ids])
        return img if base is None else np.clip(base[ids] + img, 0.0, 1.0)

    x = render(np.arange(total))

    probes = cfg.k + 1  # the image itself, then k antithetic probes
    group = max(1, cfg.batch_images // probes)
    batch = make_batch(oracle, group * probes)
    delta = np.zeros((group, probes, *shape), np.float32)
    half = cfg.k // 2
    noise = np.empty((group, half, *zshape), np.float32)  # contiguous, for rng.standard_normal(out=...)
    velocity = np.zeros_like(z)  # momentum of the gradient estimates, per image
    done = np.zeros(total, bool)
    steps_taken = np.zeros(total, np.int32)
    stop_reason = None
    progress.emit(Message(f"synthesising {cfg.per_class} images for each of {k_classes} classes (B3D-SS)"))

    for _ in range(cfg.max_steps):
        active = np.flatnonzero(~done)
        if len(active) == 0:
            break
        for start in range(0, len(active), group):
            idx = active[start:start + group]
            n = len(idx)
            if max_queries is not None and oracle.queries - q0 + n * probes > max_queries:
                stop_reason = f"query budget reached during synthesis ({oracle.queries - q0} queries)"
                break
            d = delta[:n]
            rng.standard_normal(out=noise[:n], dtype=np.float32)
            d[:, 1:half + 1] = lift(noise[:n])
            np.negative(d[:, 1:half + 1], out=d[:, half + 1:])
            if cfg.occlusion:
                occlude_pairs(d, x[idx], cfg.occlusion, cfg.sigma, rng)
            batch.add_perturbed(x[idx], d, cfg.sigma)
            p = batch.run().reshape(n, probes, k_classes)
            lab = labels[idx]
            rows = np.arange(n)
            p_c = p[rows, :, lab]  # (n, probes): probability of the wanted class per probe
            reached = (p[:, 0].argmax(axis=1) == lab) & (p_c[:, 0] >= cfg.confidence)
            if cfg.robust_stop:
                reached &= p_c[:, 1:].mean(axis=1) >= cfg.confidence
            done[idx[reached]] = True
            loss = -np.log(np.maximum(p_c[:, 1:].astype(np.float64), 1e-37))
            # antithetic pairs: sum_j l_j d_j = sum_{j<half} (l_j - l_{j+half}) noise_j (any baseline cancels)
            grad = np.einsum("nk,nk...->n...", loss[:, :half] - loss[:, half:], noise[:n]) / (cfg.k * cfg.sigma)
            move = ~reached
            v = cfg.momentum * velocity[idx] + (1.0 - cfg.momentum) * grad
            velocity[idx] = v
            step_dir = np.sign(v) if cfg.update == "sign" else v
            z[idx[move]] = np.clip(z[idx[move]] - cfg.lr * step_dir[move], z_low, 1.0)
            x[idx[move]] = render(idx[move])
            steps_taken[idx[move]] += 1
        if stop_reason:
            break

    # final assignment of the images still moving (one query each), when the budget allows
    final = np.full(total, -1, np.int64)
    final[done] = labels[done]
    rest = np.flatnonzero(~done)
    if len(rest) and (max_queries is None or oracle.queries - q0 + len(rest) <= max_queries):
        final[rest] = oracle.predict(x[rest])
    assigned = np.bincount(final[final >= 0], minlength=k_classes)
    success = np.array([np.mean(final[labels == c] == c) for c in range(k_classes)])
    unreached = [int(c) for c in range(k_classes) if assigned[c] == 0]
    stats = {
        "config": cfg.to_dict(),
        "seeded": seed_images is not None,
        "images": int(total),
        "queries": int(oracle.queries - q0),
        "seconds": time.perf_counter() - t0,
        "success_rate": float(np.mean(final == labels)),
        "success_per_class": [float(s) for s in success],
        "assigned_per_class": [int(a) for a in assigned],
        "unreached_classes": unreached,
        "mean_steps": float(steps_taken.mean()),
        "stop_reason": stop_reason,
    }
    progress.emit(Message(f"synthesis: {stats['success_rate']:.0%} of {total} images reached their class "
                     f"({stats['queries']:,} queries, {stats['seconds']:.1f}s); "
                     f"unreached classes: {unreached or 'none'}"))
    return ImageSet(x, None, "synthetic (B3D-SS)"), stats

