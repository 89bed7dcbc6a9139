"""Micro-batching across concurrent requests, in the manner of Triton's dynamic batcher.

Requests wait in a bounded queue. One worker takes the oldest request and, while the total stays within
``max_batch_size`` images, every request queued behind it; with ``max_queue_delay_us > 0`` it also waits
up to that long for more to arrive. The batch goes to the model in one call; each request gets its own
rows back. A request larger than ``max_batch_size`` runs alone (it is never split). ``max_batch_size=1``
turns batching off. One batch is in the model at a time.

A full queue refuses at once (:class:`QueueFull`, HTTP 503) instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from gate.shield import Scored

log = logging.getLogger("gate.proxy")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already (HTTP 503)."""


class ShuttingDown(Exception):
    """The batcher is not running: the server is starting or stopping (HTTP 503)."""


@dataclass
class Answer:
    raw: np.ndarray
    scores: np.ndarray
    queue_seconds: float
    model_seconds: float
    batch_images: int


@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


RunBatch = Callable[[np.ndarray], Awaitable[Scored]]


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int = 8, max_queue_delay_us: int = 0,
                 max_queue: int = 1024, on_depth: Callable[[int], None] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_us < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_queue_delay_us >= 0")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.delay = max_queue_delay_us / 1e6
        self.max_queue = int(max_queue)
        self._on_depth = on_depth or (lambda n: None)
        self._on_batch = on_batch or (lambda n: None)
        self._queue: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="gate-proxy-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))

    async def submit(self, x: np.ndarray) -> Answer:
        if self._task is None:
            raise ShuttingDown("the server is not accepting requests (starting or shutting down)")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
        job = _Job(x, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(job)
        self._on_depth(len(self._queue))
        self._wakeup.set()
        return await job.future

    # ------------------------------------------------------------------ the worker
    def _take(self, jobs: list[_Job], n: int) -> int:
        """Move queued jobs that fit into the batch; returns the image count."""
        while self._queue and n + len(self._queue[0].x) <= self.max_batch_size:
            job = self._queue.popleft()
            if job.future.done():  # the client went away while it waited
                continue
            jobs.append(job)
            n += len(job.x)
        return n

    async def _collect(self) -> list[_Job]:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue.popleft()
            if not first.future.done():
                break
        jobs = [first]
        n = self._take(jobs, len(first.x))
        if self.delay > 0 and n < self.max_batch_size:
            deadline = time.perf_counter() + self.delay
            while n < self.max_batch_size and (self._queue or (left := deadline - time.perf_counter()) > 0):
                if self._queue:
                    before = n
                    n = self._take(jobs, n)
                    if n == before:  # the next request does not fit: go now
                        break
                    continue
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
        self._on_depth(len(self._queue))
        return jobs

    async def _worker(self) -> None:
        while True:
            jobs = await self._collect()
            started = time.perf_counter()
            try:
                x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
                self._on_batch(len(x))
                scored = await self.run_batch(x)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ShuttingDown("the server is shutting down"))
                raise
            except Exception as exc:  # the requests fail, the worker lives on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            model_seconds = time.perf_counter() - started
            i = 0
            for job in jobs:
                k = len(job.x)
                if not job.future.done():
                    job.future.set_result(Answer(scored.raw[i:i + k], scored.scores[i:i + k],
                                                 started - job.enqueued, model_seconds, len(x)))
                i += k
