"""The numba kernels (CPU, and CUDA under the simulator) equal plain numpy references."""

import os
import subprocess
import sys

import numpy as np
import pytest

from gate.kernels import (
    bernoulli_masks,
    group_cross_entropy,
    group_hits,
    noisy_patterns,
    perturb_encode,
    stamp_encode,
    stamp_encode_reference,
    standard_normals,
)
from tests.helpers import case, classes_case, perturb_reference, stamp_classes_reference


@pytest.mark.parametrize("channels_first", [True, False])
def test_stamp_encode_matches_reference(channels_first):
    a = case()
    ref = stamp_encode_reference(a["images"], a["masks"], a["patterns"], a["scale"], a["offset"], channels_first)
    out = np.full(ref.shape, np.nan, np.float32)
    stamp_encode(a["images"], a["masks"], a["patterns"], a["scale"], a["offset"], channels_first, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    # row j*B + i is trigger j on image i
    b = len(a["images"])
    m, p, x = a["masks"][2], a["patterns"][2], a["images"][3]
    v = ((1 - m[..., None]) * x + m[..., None] * p) * a["scale"] + a["offset"]
    got = out[2 * b + 3].transpose(1, 2, 0) if channels_first else out[2 * b + 3]
    np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-4)


def test_binary_mask_stamp_keeps_outside_pixels():
    a = case(1)
    masks = (a["masks"] > 0.5).astype(np.float32)
    one = np.ones(3, np.float32)
    zero = np.zeros(3, np.float32)
    out = np.empty((len(masks) * len(a["images"]), 6, 7, 3), np.float32)
    stamp_encode(a["images"], masks, a["patterns"], one, zero, False, out)
    on = masks[0].astype(bool)
    np.testing.assert_array_equal(out[0][~on], a["images"][0][~on])
    np.testing.assert_array_equal(out[0][on], a["patterns"][0][on])


def test_sampling_kernels_match_reference():
    rng = np.random.default_rng(2)
    u = rng.random((6, 5, 4), dtype=np.float32)
    prob = rng.random((5, 4), dtype=np.float32)
    out = np.empty_like(u)
    bernoulli_masks(u, prob, out)
    np.testing.assert_array_equal(out, (u < prob).astype(np.float32))
    theta = rng.normal(size=(5, 4, 3)).astype(np.float32)
    eps = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    pat = np.empty_like(eps)
    noisy_patterns(theta, eps, np.float32(0.1), pat)
    np.testing.assert_allclose(pat, (np.tanh(theta + 0.1 * eps) + 1) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_first", [True, False])
def test_perturb_encode_matches_reference(channels_first):
    rng = np.random.default_rng(3)
    x = rng.random((3, 4, 5, 3), dtype=np.float32)
    delta = rng.normal(size=(3, 6, 4, 5, 3)).astype(np.float32) * 5
    sc, of = np.array([1, 2, 3], np.float32), np.array([0, -1, 1], np.float32)
    ref = perturb_reference(x, delta, 0.1, sc, of, channels_first)
    out = np.empty(ref.shape, np.float32)
    perturb_encode(x, delta, np.float32(0.1), sc, of, channels_first, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_group_losses():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(5), size=12).astype(np.float32)
    ce = np.empty(3)
    group_cross_entropy(np.log(probs), 2, 4, ce)
    np.testing.assert_allclose(ce, -np.log(probs[:, 2]).reshape(3, 4).mean(1), rtol=1e-5)
    hits = np.empty(3)
    group_hits(probs, 2, 4, hits)
    np.testing.assert_allclose(hits, (probs.argmax(1) == 2).reshape(3, 4).mean(1))


def test_log_scores_stay_finite_and_ordered_where_probabilities_underflow():
    """Saturated outputs: logits 200 apart give float32 probabilities of exactly 0, log-softmax does not."""
    from gate.oracle import PROB_FLOOR, log_softmax, softmax

    logits = np.array([[0.0, -200.0, -300.0], [0.0, -150.0, -400.0]], np.float32)
    assert (softmax(logits.copy())[:, 1:] == 0).all()
    logp = log_softmax(logits.copy())
    assert np.isfinite(logp).all()
    np.testing.assert_allclose(logp[:, 1], [-200.0, -150.0], rtol=1e-6)
    ce = np.empty(2)
    group_cross_entropy(logp, 1, 1, ce)
    assert ce[1] < ce[0]  # the second image is closer to class 1: the search sees it
    floored = np.log(np.maximum(softmax(logits.copy()), np.float32(PROB_FLOOR)))
    group_cross_entropy(floored, 1, 1, ce)
    assert ce[0] == ce[1]  # probabilities of exactly 0 carry no signal


CUDASIM_SCRIPT = r"""
import numpy as np
from numba import cuda
from gate import kernels_cuda as K
from gate.kernels import stamp_encode_reference
from tests.helpers import case, classes_case, perturb_reference, stamp_classes_reference

for cf in (True, False):
    a = case(5)
    ref = stamp_encode_reference(a["images"], a["masks"], a["patterns"], a["scale"], a["offset"], cf)
    out = cuda.device_array(ref.shape, np.float32)
    K.stamp_encode(cuda.to_device(a["images"]), cuda.to_device(a["masks"]), cuda.to_device(a["patterns"]),
                   cuda.to_device(a["scale"]), cuda.to_device(a["offset"]), cf, out)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-4)
    rng = np.random.default_rng(6)
    x = rng.random((2, 3, 4, 3), dtype=np.float32)
    d = rng.normal(size=(2, 3, 3, 4, 3)).astype(np.float32) * 5
    sc, of = np.array([1, 2, 3], np.float32), np.array([0, -1, 1], np.float32)
    ref = perturb_reference(x, d, 0.1, sc, of, cf)
    out = cuda.device_array(ref.shape, np.float32)
    K.perturb_encode(cuda.to_device(x), cuda.to_device(d), 0.1, cuda.to_device(sc), cuda.to_device(of), cf, out)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5)

rng = np.random.default_rng(7)
u = rng.random((3, 4, 5), dtype=np.float32)
prob = rng.random((4, 5), dtype=np.float32)
out = cuda.device_array(u.shape, np.float32)
K.bernoulli_masks(cuda.to_device(u), cuda.to_device(prob), out)
np.testing.assert_array_equal(out.copy_to_host(), (u < prob).astype(np.float32))
theta = rng.normal(size=(4, 5, 3)).astype(np.float32)
eps = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)
out = cuda.device_array(eps.shape, np.float32)
K.noisy_patterns(cuda.to_device(theta), cuda.to_device(eps), 0.1, out)
np.testing.assert_allclose(out.copy_to_host(), (np.tanh(theta + 0.1 * eps) + 1) / 2, rtol=1e-5, atol=1e-6)
for cf, cell in ((True, 1), (False, 1), (True, 3), (False, 2)):
    a = classes_case(cell=cell)
    ref = stamp_classes_reference(**a, channels_first=cf)
    out = cuda.device_array(ref.shape, np.float32)
    K.stamp_classes(*(cuda.to_device(a[key]) for key in ("pool", "classes", "sample_idx", "eval_idx", "masks",
                                                          "patterns", "rows", "cols", "scale", "offset")), cf, out)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5)
# the device batch stamps exactly what the host batch does (its run() needs a real GPU and ORT's CUDA provider)
from gate.batches import HostBatch
from gate.batches.device import DeviceBatch
from gate.oracle import Oracle
from tests.helpers import DEMO
oracle = Oracle(DEMO / "gtsrb_badnets3x3.onnx", device="cpu")
rng = np.random.default_rng(9)
pool = rng.random((20, 32, 32, 3), dtype=np.float32)
masks = rng.random((4, 3, 32, 32), dtype=np.float32)
patterns = rng.random((4, 3, 32, 32, 3), dtype=np.float32)
sidx = rng.integers(0, 20, (4, 2)).astype(np.int64)
eidx = rng.integers(0, 20, (4, 3)).astype(np.int64)
classes = np.array([2, 0], np.int64)
from gate.grid import Grid
for grid in (Grid(32, 32), Grid(32, 32, 4)):
    gm, gp = masks[:, :, :grid.shape[0], :grid.shape[1]], patterns[:, :, :grid.shape[0], :grid.shape[1]]
    gm, gp = np.ascontiguousarray(gm), np.ascontiguousarray(gp)
    host, dev = HostBatch(oracle, 64), DeviceBatch(oracle, 64)
    rows_h = host.add_classes(pool, classes, sidx, eidx, gm, gp, grid)
    rows_d = dev.add_classes(pool, classes, sidx, eidx, gm, gp, grid)
    assert rows_h == rows_d == slice(0, 14)
    np.testing.assert_allclose(dev.buffer.copy_to_host()[rows_d], host.buffer[rows_h], rtol=1e-5, atol=1e-5)
print("CUDASIM-OK")
"""


def test_cuda_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", CUDASIM_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CUDASIM-OK" in r.stdout


@pytest.mark.parametrize("cell", [1, 2, 3])
@pytest.mark.parametrize("channels_first", [True, False])
def test_stamp_classes_matches_reference(channels_first, cell):
    from gate.kernels import stamp_classes

    a = classes_case(cell=cell)
    ref = stamp_classes_reference(**a, channels_first=channels_first)
    assert len(ref) == 3 * (3 * 2 + 4)
    out = np.full(ref.shape, np.nan, np.float32)
    stamp_classes(*(a[key] for key in ("pool", "classes", "sample_idx", "eval_idx", "masks", "patterns", "rows",
                                       "cols", "scale", "offset")), channels_first, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", [1, 2])
def test_stamp_classes_writes_the_same_values_in_either_layout(cell):
    """The channels-first path loops channel by channel, the channels-last path pixel by pixel: the values they
    write are the same bit for bit (a scan's result must not depend on the model's layout)."""
    from gate.kernels import stamp_classes

    a = classes_case(cell=cell)
    args = [a[key] for key in ("pool", "classes", "sample_idx", "eval_idx", "masks", "patterns", "rows", "cols",
                               "scale", "offset")]
    ref = stamp_classes_reference(**a, channels_first=False)
    last = np.full(ref.shape, np.nan, np.float32)
    first = np.full((ref.shape[0], ref.shape[3], ref.shape[1], ref.shape[2]), np.nan, np.float32)
    stamp_classes(*args, False, last)
    stamp_classes(*args, True, first)
    assert np.isfinite(last).all()
    np.testing.assert_array_equal(first, last.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("cell", [1, 2, 3])
def test_the_planar_kernel_writes_the_bytes_of_stamp_classes(cell):
    """stamp_classes_planar (every operand channels first; the pixel grid without the cell maps) writes exactly
    what stamp_classes writes for a channels-first model: only the memory order of its inputs differs."""
    from gate.kernels import stamp_classes, stamp_classes_planar

    a = classes_case(cell=cell)
    args = [a[key] for key in ("pool", "classes", "sample_idx", "eval_idx", "masks", "patterns", "rows", "cols",
                               "scale", "offset")]
    ref = stamp_classes_reference(**a, channels_first=True)
    want = np.full(ref.shape, np.nan, np.float32)
    stamp_classes(*args, True, want)
    pool = np.ascontiguousarray(a["pool"].transpose(0, 3, 1, 2))
    every = np.ascontiguousarray(a["patterns"].transpose(0, 1, 4, 2, 3))  # every class's, read by class
    some = np.ascontiguousarray(every[a["classes"]])  # the call's classes only, read by position
    for planar, which in ((every, a["classes"]), (some, np.arange(len(a["classes"])))):
        got = np.full(ref.shape, np.nan, np.float32)
        stamp_classes_planar(pool, a["classes"], a["sample_idx"], a["eval_idx"], a["masks"], planar, which,
                             a["rows"], a["cols"], a["scale"], a["offset"], cell > 1, got)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_host_batch_stamps_rounds_as_the_reference_in_either_layout(layout, tmp_path):
    """HostBatch.add_classes, channels first through the planar kernel (its pool transposed once and kept, the
    patterns per call), channels last through stamp_classes: the reference's values, call after call."""
    from types import SimpleNamespace

    from gate.batches.host import HostBatch
    from gate.grid import Grid

    a = classes_case(cell=2)
    channels_first = layout == "NCHW"
    per = 3 * 2 + 4
    ref = stamp_classes_reference(**a, channels_first=channels_first)
    spec = SimpleNamespace(channels_first=channels_first,
                           model_shape=lambda n: (n, 3, 9, 7) if channels_first else (n, 9, 7, 3))
    oracle = SimpleNamespace(spec=spec, affine=(a["scale"], a["offset"]))
    batch = HostBatch(oracle, 64)
    grid = Grid(9, 7, 2)
    kept = batch.planar_patterns(a["patterns"].shape)  # what the scan allocates: planar underneath when NCHW
    kept[...] = a["patterns"]
    assert kept.transpose(0, 1, 4, 2, 3).flags.c_contiguous == channels_first
    for patterns in (a["patterns"], kept):  # copied per call, or read in place
        for order in ([0, 1, 2], [2, 0]):  # a second call: the kept pool, the scratch reused for fewer classes
            batch.size = 0
            classes = a["classes"][order]
            rows = batch.add_classes(a["pool"], classes, a["sample_idx"], a["eval_idx"], a["masks"], patterns, grid)
            want = np.concatenate([ref[i * per:(i + 1) * per] for i in order])
            np.testing.assert_allclose(batch.buffer[rows], want, rtol=1e-5, atol=1e-5)
    assert batch._pool_planar is not None if channels_first else batch._pool_planar is None


def test_a_grid_trigger_stamps_as_its_upsampled_trigger():
    """The kernel reading the grid gives the bytes the full-resolution trigger gives (not only close)."""
    from gate.grid import Grid
    from gate.kernels import stamp_classes

    a = classes_case(cell=2)
    grid = Grid(9, 7, 2)
    full = dict(a, masks=np.ascontiguousarray(grid.up(a["masks"])),
                patterns=np.ascontiguousarray(grid.up(a["patterns"], channels=True)),
                rows=np.arange(9, dtype=np.int64), cols=np.arange(7, dtype=np.int64))
    keys = ("pool", "classes", "sample_idx", "eval_idx", "masks", "patterns", "rows", "cols", "scale", "offset")
    out_grid, out_full = (np.empty((30, 9, 7, 3), np.float32) for _ in range(2))
    stamp_classes(*(a[k] for k in keys), False, out_grid)
    stamp_classes(*(full[k] for k in keys), False, out_full)
    np.testing.assert_array_equal(out_grid, out_full)


def test_stamping_threads_sets_numba_inside_and_restores_it_after():
    import numba

    from gate.kernels import stamping_threads

    before = numba.get_num_threads()
    with stamping_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError), stamping_threads(1):
        raise RuntimeError("a failing round")
    assert numba.get_num_threads() == before
    with stamping_threads(None):
        assert numba.get_num_threads() == before
    with stamping_threads(10_000):  # never above numba's pool
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("n", [1, 2, 7, 200_001])
def test_standard_normals_are_standard_normal_and_reproducible(n):
    """Box-Muller from float32 uniforms: the moments and tail masses of N(0, 1) on many draws, every entry filled
    and finite, and the same values from the same generator state (odd lengths included)."""
    out = np.full(n, np.nan, np.float32)
    scratch = np.empty(n // 2 + 1, np.float32)
    standard_normals(np.random.default_rng(5), out, scratch)
    assert np.isfinite(out).all()
    again = np.empty(n, np.float32)
    standard_normals(np.random.default_rng(5), again, scratch)
    np.testing.assert_array_equal(out, again)
    if n > 1000:
        z = out.astype(np.float64)
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
        assert abs(np.mean(np.abs(z) > 2.0) - 0.0455) < 0.003  # two-sided tail beyond 2 sigma
        assert abs(np.mean(z > 1.0) - 0.1587) < 0.004
        assert abs(np.mean(z ** 3)) < 0.03 and abs(np.mean(z ** 4) - 3.0) < 0.06  # symmetric, normal kurtosis
        assert np.abs(z).max() < 6.0  # float32 uniforms: the tail ends near 5.8
