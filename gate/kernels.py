"""Numba CPU kernels for the hot path: sampling triggers and stamping whole batches.

All kernels write into buffers the caller preallocated, so a search step allocates nothing large.
Random numbers come from numpy Generators (``rng.random(out=...)``, ``rng.standard_normal(out=...)``):
deterministic for a seed whatever the thread count; the kernels only transform them.

Stamping and encoding are fused: the stamped image ``(1-m)*x + m*p`` is written straight in the model's
layout and value range (``scale[c]*v + offset[c]``), ready for ``InferenceSession.run``.
:mod:`gate.kernels_cuda` has the same kernels for the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# numba's parallel kernels run on OpenMP threads (its "omp" layer) that, by default, spin after each kernel
# waiting for the next one: on a CPU scan they would spin on the cores onnxruntime's calls need (the stamping of
# one group runs beside the model call of the previous one). Passive waiting measured 5 % more queries per second
# (bench/RESULTS.md "Scan speed"); set before numba starts its threads, and never over the user's own choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402


def blend(x, m, p):
    """The stamping formula A(x, m, p) = (1 - m) x + m p, written once.

    Compiled into the numba CPU kernels below and the CUDA kernels (:mod:`gate.kernels_cuda`), and applied
    as it is to numpy arrays by :func:`stamp`.
    """
    return (1.0 - m) * x + m * p


def round_rows(n, b, e):
    """Rows one class takes in a scan round: its n search samples on B images each, then its trigger on E."""
    return n * b + e


def round_source(rem, n, b, cls, sample_idx, eval_idx):
    """(candidate j, pool image) that row ``rem`` of class ``cls``'s block in a scan round stamps."""
    if rem < n * b:
        j = rem // b
        return j, sample_idx[cls, rem - j * b]
    return n, eval_idx[cls, rem - n * b]


_blend = njit(inline="always", fastmath=True)(blend)
_round_rows = njit(inline="always")(round_rows)
_round_source = njit(inline="always")(round_source)


@contextmanager
def stamping_threads(n: int | None) -> Iterator[None]:
    """The parallel kernels below use at most ``n`` threads while inside (None: numba's setting as it is).

    The shield stamps small batches on one thread (starting threads costs more than it saves there). The
    kernels have no reductions, so the values they write do not depend on the thread count. numba's setting is
    per calling thread; it is restored on exit. (A scan's rounds keep numba's setting: one stamping thread
    beside a CPU model's calls was measured no faster, bench/RESULTS.md "Scan speed".)
    """
    if n is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def stamp(images: np.ndarray, masks: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """:func:`blend` on numpy arrays, float32: images (..., H, W, C), masks (..., H, W), patterns (..., H, W, C)
    broadcast against each other (one trigger on many images, or one trigger per image)."""
    m = np.asarray(masks, dtype=np.float32)[..., None]
    return blend(np.asarray(images, dtype=np.float32), m, np.asarray(patterns, dtype=np.float32))


TWO_PI = np.float32(2.0 * np.pi)


def standard_normals(rng: np.random.Generator, out: np.ndarray, scratch: np.ndarray) -> None:
    """Fill the float32 vector ``out`` with standard normals from ``rng``'s uniforms by the Box-Muller transform.

    For pairs of uniforms (u1, u2): r = sqrt(-2 log(1 - u1)), out = (r cos 2 pi u2, r sin 2 pi u2); exact normals
    for exact uniforms. From float32 uniforms (24 bits) the tail ends at |z| = sqrt(-2 log 2^-24) = 5.8 (a
    probability of 7e-9 a draw beyond it): nothing an NES sample misses. numpy's SIMD log, sqrt, sin and cos make
    it about 3x faster than ``Generator.standard_normal(dtype=float32)`` (its ziggurat), which was most of a dense
    step's sampling time. ``scratch``: float32, at least ``len(out) // 2`` entries, not overlapping ``out``.
    Deterministic for a given generator state; an odd length draws its last value from ``standard_normal``.
    """
    n = len(out)
    m = n // 2
    if m:
        radius, angle, tmp = out[:m], out[m:2 * m], scratch[:m]
        rng.random(out=radius, dtype=np.float32)
        rng.random(out=angle, dtype=np.float32)
        np.subtract(np.float32(1.0), radius, out=radius)  # (0, 1]: no log of 0
        np.log(radius, out=radius)
        np.multiply(radius, np.float32(-2.0), out=radius)
        np.sqrt(radius, out=radius)
        np.multiply(angle, TWO_PI, out=angle)
        np.sin(angle, out=tmp)
        np.cos(angle, out=angle)
        np.multiply(angle, radius, out=angle)
        np.multiply(radius, tmp, out=radius)
    if n % 2:
        out[n - 1] = rng.standard_normal(dtype=np.float32)


@njit(fastmath=True, cache=True)
def bernoulli_masks(u, prob, out):
    """out[j] = 1[u[j] < prob] — binary masks m_j ~ Bernoulli(prob). u, out: (k, H, W); prob: (H, W).

    Returns how many ones were written (the pixels the masks show, all masks together)."""
    k, h, w = out.shape
    shown = 0
    for j in range(k):
        for r in range(h):
            for c in range(w):
                if u[j, r, c] < prob[r, c]:
                    out[j, r, c] = 1.0
                    shown += 1
                else:
                    out[j, r, c] = 0.0
    return shown


@njit(fastmath=True, cache=True)
def shown_noise(masks, theta_p, sigma, n, buf, eps):
    """Spread ``buf``'s normals over the pixels the binary ``masks`` show and prepare the paired patterns' args.

    masks (h, H, W) binary with S ones (:func:`bernoulli_masks` counts them); buf (>= 2n) holds n = S*C
    standard normals in its first n entries, in mask order (j, r, c, q). Writes eps[j, r, c] (h, H, W, C) where
    m_j = 1 (the caller zeroes eps first: a memset, faster than writing the hidden pixels here); and overwrites buf
    with the arguments of g for the shown pixels: buf[t] = theta_p + sigma*z_t (the +eps_j pattern),
    buf[n + t] = theta_p - sigma*z_t (its mirror).
    """
    h, gh, gw = masks.shape
    ch = eps.shape[3]
    t = 0
    for j in range(h):
        for r in range(gh):
            for c in range(gw):
                if masks[j, r, c] != 0.0:
                    for q in range(ch):
                        z = buf[t]
                        eps[j, r, c, q] = z
                        th = theta_p[r, c, q]
                        buf[t] = th + sigma * z
                        buf[n + t] = th - sigma * z
                        t += 1


@njit(fastmath=True, cache=True)
def shown_patterns(masks, values, n, out):
    """The paired pattern samples from :func:`shown_noise`'s args after g: where m_j = 1, out[j] takes values[t]
    and out[h + j] (h masks) values[n + t]. The caller fills both first with any finite pattern (the mean one): a
    pixel the mask hides never reaches the model, so its value does not matter as long as it is finite."""
    h, gh, gw = masks.shape
    ch = out.shape[3]
    t = 0
    for j in range(h):
        for r in range(gh):
            for c in range(gw):
                if masks[j, r, c] != 0.0:
                    for q in range(ch):
                        out[j, r, c, q] = values[t]
                        out[h + j, r, c, q] = values[n + t]
                        t += 1


def noisy_patterns(theta_p, eps, sigma, out):
    """out[j] = g(theta_p + sigma * eps[j]) with g(z) = (tanh z + 1) / 2. eps, out: (k, H, W, C).

    numpy's SIMD tanh with ``out=`` (no allocation) is ~30x faster than a numba loop here: numba has no
    vectorised tanh without Intel SVML.
    """
    np.multiply(eps, sigma, out=out)
    np.add(out, theta_p, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    np.multiply(out, 0.5, out=out)


@njit(inline="always", fastmath=True)
def _put(out, row, r, c, q, v, scale, offset, channels_first):
    """Write pixel value v (in [0,1]) encoded for the model at (row, r, c, q) of out."""
    if channels_first:
        out[row, q, r, c] = scale[q] * v + offset[q]
    else:
        out[row, r, c, q] = scale[q] * v + offset[q]


@njit(parallel=True, fastmath=True, cache=True)
def stamp_encode(images, masks, patterns, scale, offset, channels_first, out):
    """Stamp every trigger j on every image i and encode for the model.

    images (B, H, W, C) in [0,1]; masks (n, H, W); patterns (n, H, W, C);
    out (n*B, C, H, W) when channels_first else (n*B, H, W, C); row j*B + i holds trigger j on image i.
    """
    b, h, w, ch = images.shape
    n = masks.shape[0]
    for t in prange(n * b):
        j = t // b
        i = t - j * b
        for r in range(h):
            for c in range(w):
                m = masks[j, r, c]
                for q in range(ch):
                    _put(out, t, r, c, q, _blend(images[i, r, c, q], m, patterns[j, r, c, q]),
                         scale, offset, channels_first)


@njit(parallel=True, fastmath=True, cache=True)
def stamp_classes(pool, classes, sample_idx, eval_idx, masks, patterns, rows, cols, scale, offset, channels_first,
                  out):
    """One scan round for many classes in one pass: what one model call answers.

    For each class c = classes[g]: its n search samples (masks[c, :n], patterns[c, :n]) each on its B
    minibatch images pool[sample_idx[c]], then its current trigger (masks[c, n], patterns[c, n]) on its
    E check images pool[eval_idx[c]]. Rows per class: n*B + E, sample-major, then the trigger rows.
    pool (N, H, W, C); sample_idx (K, B); eval_idx (K, E); masks (K, n+1, gh, gw); patterns (K, n+1, gh, gw, C)
    on the search grid, whose cell (rows[r], cols[c]) covers pixel (r, c) (:class:`gate.grid.Grid`; on a
    pixel grid rows and cols are 0..H-1 and 0..W-1).
    """
    h, w, ch = pool.shape[1], pool.shape[2], pool.shape[3]
    n = masks.shape[1] - 1
    b = sample_idx.shape[1]
    e = eval_idx.shape[1]
    per = _round_rows(n, b, e)
    for t in prange(classes.shape[0] * per):
        g = t // per
        cls = classes[g]
        j, x = _round_source(t - g * per, n, b, cls, sample_idx, eval_idx)
        if channels_first:  # channel planes one after the other: each written in order (1.3x faster than by pixel)
            for q in range(ch):
                s, o = scale[q], offset[q]
                for r in range(h):
                    gr = rows[r]
                    for c in range(w):
                        gc = cols[c]
                        out[t, q, r, c] = s * _blend(pool[x, r, c, q], masks[cls, j, gr, gc],
                                                     patterns[cls, j, gr, gc, q]) + o
        else:
            for r in range(h):
                gr = rows[r]
                for c in range(w):
                    gc = cols[c]
                    m = masks[cls, j, gr, gc]
                    for q in range(ch):
                        v = _blend(pool[x, r, c, q], m, patterns[cls, j, gr, gc, q])
                        out[t, r, c, q] = scale[q] * v + offset[q]


@njit(parallel=True, fastmath=True, cache=True)
def stamp_classes_planar(pool, classes, sample_idx, eval_idx, masks, patterns, which, rows, cols, scale, offset,
                         coarse, out):
    """:func:`stamp_classes` for a channels-first model, every operand laid out as the output is: the same rows,
    the same values (the same arithmetic, in the same order), 3x faster on a pixel grid.

    pool (N, C, H, W); patterns (P, n+1, C, gh, gw), the g-th class of the call reading patterns[which[g]] (the
    scan's planar array with ``which`` = ``classes``, or a per-call copy with ``which`` = 0..G-1); masks
    (K, n+1, gh, gw) as for :func:`stamp_classes`; out (G*rows, C, H, W). Read with the
    channel last, the pattern's stride of C floats stopped the inner loop from vectorising (5.2 against 1.6 us
    a 32x32 row on one core, bench/RESULTS.md "Scan speed"); ``coarse`` False skips the pixel -> cell maps.
    """
    ch, h, w = pool.shape[1], pool.shape[2], pool.shape[3]
    n = masks.shape[1] - 1
    b = sample_idx.shape[1]
    e = eval_idx.shape[1]
    per = _round_rows(n, b, e)
    for t in prange(classes.shape[0] * per):
        g = t // per
        cls = classes[g]
        pi = which[g]
        j, x = _round_source(t - g * per, n, b, cls, sample_idx, eval_idx)
        for q in range(ch):
            s, o = scale[q], offset[q]
            if coarse:
                for r in range(h):
                    gr = rows[r]
                    for c in range(w):
                        gc = cols[c]
                        v = _blend(pool[x, q, r, c], masks[cls, j, gr, gc], patterns[pi, j, q, gr, gc])
                        out[t, q, r, c] = s * v + o
            else:
                for r in range(h):
                    for c in range(w):
                        v = _blend(pool[x, q, r, c], masks[cls, j, r, c], patterns[pi, j, q, r, c])
                        out[t, q, r, c] = s * v + o


@njit(parallel=True, fastmath=True, cache=True)
def perturb_encode(x, delta, sigma, scale, offset, channels_first, out):
    """Gaussian probes around images for B3D-SS: row i*k + j holds clip(x[i] + sigma*delta[i, j], 0, 1).

    x (n, H, W, C); delta (n, k, H, W, C); out (n*k, C, H, W) or (n*k, H, W, C), encoded for the model.
    """
    n, k = delta.shape[0], delta.shape[1]
    h, w, ch = x.shape[1], x.shape[2], x.shape[3]
    for t in prange(n * k):
        i = t // k
        j = t - i * k
        for r in range(h):
            for c in range(w):
                for q in range(ch):
                    v = x[i, r, c, q] + sigma * delta[i, j, r, c, q]
                    _put(out, t, r, c, q, min(max(v, 0.0), 1.0), scale, offset, channels_first)


@njit(fastmath=True, cache=True)
def group_cross_entropy(log_probs, target, group, out):
    """out[j] = mean over the j-th group of ``group`` rows of -log p[row, target], from log-probabilities."""
    n = out.shape[0]
    for j in range(n):
        s = 0.0
        for i in range(group):
            s -= log_probs[j * group + i, target]
        out[j] = s / group


@njit(fastmath=True, cache=True)
def group_hits(probs, target, group, out):
    """out[j] = fraction of the j-th group of rows whose arg-max is ``target``."""
    n = out.shape[0]
    k = probs.shape[1]
    for j in range(n):
        hits = 0
        for i in range(group):
            row = j * group + i
            best = 0
            for q in range(1, k):
                if probs[row, q] > probs[row, best]:
                    best = q
            if best == target:
                hits += 1
        out[j] = hits / group


def stamp_encode_reference(images, masks, patterns, scale, offset, channels_first):
    """Plain numpy version of :func:`stamp_encode`, for tests."""
    v = stamp(images[None], masks[:, None], patterns[:, None])
    e = v * scale + offset
    e = e.reshape(-1, *images.shape[1:])
    return e.transpose(0, 3, 1, 2) if channels_first else e
