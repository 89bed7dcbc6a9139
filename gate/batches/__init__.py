"""Reusable buffers of stamped, model-encoded images, each sent to the oracle in one call.

Many classes' candidates are stamped side by side into one preallocated buffer, then one
``InferenceSession.run`` answers for all of them:

    rows.py     Rows: hands out rows of a fixed capacity until ``run`` empties the batch
    host.py     HostBatch: the buffer in host memory, stamped by the numba CPU kernels (gate.kernels)
    device.py   DeviceBatch: the buffer in GPU memory, stamped by the numba.cuda kernels
                (gate.kernels_cuda) and fed to ORT's CUDA provider through IOBinding

:func:`make_batch` picks one for an oracle.
"""

from __future__ import annotations

from gate.batches.host import HostBatch
from gate.batches.rows import Rows
from gate.oracle import Oracle

__all__ = ["HostBatch", "Rows", "make_batch"]


def make_batch(oracle: Oracle, capacity: int):
    """A device-resident batch when the oracle runs on CUDA and numba.cuda works, else a host one."""
    if oracle.on_cuda and oracle.spec.dtype == "float32":  # the device buffer is float32, bound as the input
        from gate.batches.device import DeviceBatch
        from gate.kernels_cuda import cuda_usable

        if cuda_usable():
            return DeviceBatch(oracle, capacity)
    return HostBatch(oracle, capacity)
