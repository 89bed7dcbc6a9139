"""numba.cuda versions of the hot-path kernels (the documented twins of :mod:`gate.kernels`).

Same contracts as :mod:`gate.kernels` (one thread per output element); :class:`gate.batches.device.DeviceBatch`
uses them to stamp in GPU memory. Kernel logic is tested on the CPU with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from gate.kernels import blend, round_rows, round_source

THREADS = 256


def cuda_usable() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit
        return False


def _blocks(n: int) -> int:
    return (n + THREADS - 1) // THREADS


_blend = cuda.jit(device=True)(blend)
_round_rows = cuda.jit(device=True)(round_rows)
_round_source = cuda.jit(device=True)(round_source)


@cuda.jit(device=True)
def _put(out, row, r, c, q, v, scale, offset, channels_first):
    """Write pixel value v (in [0,1]) encoded for the model at (row, r, c, q) of out."""
    if channels_first:
        out[row, q, r, c] = scale[q] * v + offset[q]
    else:
        out[row, r, c, q] = scale[q] * v + offset[q]


@cuda.jit(device=True)
def _unravel(t, h, w, ch):
    """Flat thread index -> (row, r, c, q) of a (rows, H, W, C) grid."""
    q = t % ch
    rest = t // ch
    c = rest % w
    rest //= w
    r = rest % h
    return rest // h, r, c, q


@cuda.jit
def bernoulli_masks_kernel(u, prob, out):
    t = cuda.grid(1)
    k, h, w = out.shape
    if t < k * h * w:
        j = t // (h * w)
        rc = t - j * h * w
        r = rc // w
        c = rc - r * w
        out[j, r, c] = 1.0 if u[j, r, c] < prob[r, c] else 0.0


@cuda.jit
def noisy_patterns_kernel(theta_p, eps, sigma, out):
    t = cuda.grid(1)
    k, h, w, ch = out.shape
    if t < k * h * w * ch:
        j, r, c, q = _unravel(t, h, w, ch)
        out[j, r, c, q] = 0.5 * (math.tanh(theta_p[r, c, q] + sigma * eps[j, r, c, q]) + 1.0)


@cuda.jit
def stamp_encode_kernel(images, masks, patterns, scale, offset, channels_first, out):
    """out row j*B + i = encode((1 - m_j) * x_i + m_j * p_j); one thread per (row, pixel, channel)."""
    t = cuda.grid(1)
    b, h, w, ch = images.shape
    n = masks.shape[0]
    if t < n * b * h * w * ch:
        row, r, c, q = _unravel(t, h, w, ch)
        j = row // b
        i = row - j * b
        m = masks[j, r, c]
        _put(out, row, r, c, q, _blend(images[i, r, c, q], m, patterns[j, r, c, q]), scale, offset, channels_first)


@cuda.jit
def stamp_classes_kernel(pool, classes, sample_idx, eval_idx, masks, patterns, rows, cols, scale, offset,
                         channels_first, out):
    """Same rows as :func:`gate.kernels.stamp_classes`; one thread per (row, pixel, channel)."""
    t = cuda.grid(1)
    h, w, ch = pool.shape[1], pool.shape[2], pool.shape[3]
    n = masks.shape[1] - 1
    b = sample_idx.shape[1]
    e = eval_idx.shape[1]
    per = _round_rows(n, b, e)
    if t < classes.shape[0] * per * h * w * ch:
        row, r, c, q = _unravel(t, h, w, ch)
        g = row // per
        cls = classes[g]
        j, x = _round_source(row - g * per, n, b, cls, sample_idx, eval_idx)
        gr = rows[r]
        gc = cols[c]
        m = masks[cls, j, gr, gc]
        _put(out, row, r, c, q, _blend(pool[x, r, c, q], m, patterns[cls, j, gr, gc, q]), scale, offset,
             channels_first)


@cuda.jit
def perturb_encode_kernel(x, delta, sigma, scale, offset, channels_first, out):
    t = cuda.grid(1)
    n, k, h, w, ch = delta.shape
    if t < n * k * h * w * ch:
        row, r, c, q = _unravel(t, h, w, ch)
        i = row // k
        j = row - i * k
        v = x[i, r, c, q] + sigma * delta[i, j, r, c, q]
        _put(out, row, r, c, q, min(max(v, 0.0), 1.0), scale, offset, channels_first)


# ---------------------------------------------------------------------- host-callable wrappers
def bernoulli_masks(u, prob, out) -> None:
    bernoulli_masks_kernel[_blocks(out.size), THREADS](u, prob, out)


def noisy_patterns(theta_p, eps, sigma, out) -> None:
    noisy_patterns_kernel[_blocks(out.size), THREADS](theta_p, eps, np.float32(sigma), out)


def stamp_encode(images, masks, patterns, scale, offset, channels_first, out) -> None:
    n = masks.shape[0] * images.shape[0] * images.shape[1] * images.shape[2] * images.shape[3]
    stamp_encode_kernel[_blocks(n), THREADS](images, masks, patterns, scale, offset, channels_first, out)


def stamp_classes(pool, classes, sample_idx, eval_idx, masks, patterns, rows, cols, scale, offset, channels_first,
                  out) -> None:
    h, w, ch = pool.shape[1], pool.shape[2], pool.shape[3]
    per = round_rows(masks.shape[1] - 1, sample_idx.shape[1], eval_idx.shape[1])
    n = classes.shape[0] * per * h * w * ch
    stamp_classes_kernel[_blocks(n), THREADS](pool, classes, sample_idx, eval_idx, masks, patterns, rows, cols, scale,
                                              offset, channels_first, out)


def perturb_encode(x, delta, sigma, scale, offset, channels_first, out) -> None:
    perturb_encode_kernel[_blocks(delta.size), THREADS](x, delta, np.float32(sigma), scale, offset,
                                                       channels_first, out)
