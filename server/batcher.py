"""Dynamic batching: a bounded queue in front of the chip's one worker.

Requests wait at most ``max_delay_s`` for company (or until ``max_batch_size`` are
queued), then the scheduler picks the next batch, which may mix tasks; the chip worker
runs it as one forward pass (:meth:`core.engine.CrossbarEngine.forward_mixed`). A
full queue refuses new requests (:class:`~server.errors.QueueFull`: 429 and
``Retry-After``) instead of letting latency grow without bound. One batch runs at a
time; the next one forms meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from core.chip.config import Fidelity
from server.errors import QueueFull, ShuttingDown
from server.runtime import BatchItem, Prediction, TaskRuntime
from server.scheduler import BatchScheduler, ChipView, Pending
from server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    batches: int = 0
    requests: int = 0
    rejected: int = 0
    busy_seconds: float = 0.0

    @property
    def seconds_per_request(self) -> float:
        return self.busy_seconds / self.requests if self.requests else 0.0


class Batcher:
    """Queues requests and feeds the chip batches chosen by ``scheduler``.

    Args:
        runtime: the chip (its worker thread runs each batch).
        scheduler: which queued requests form the next batch.
        max_queue: requests waiting at most; more get :class:`~server.errors.QueueFull`.
        max_delay_s: how long the first request of a batch may wait for others.
        on_batch: told the size of every batch and each request's queue wait.
        on_reject: told the reason of every refused request.
    """

    def __init__(self, runtime: TaskRuntime, scheduler: BatchScheduler, *, max_queue: int,
                 max_delay_s: float,
                 on_batch: Callable[[int, list[tuple[str, float]]], None] | None = None,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self.on_reject = on_reject
        self.queue: list[Pending] = []
        self.stats = BatcherStats()
        self._wake = asyncio.Event()
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self.queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="xma2-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self.queue:
            future: asyncio.Future[Prediction] = pending.payload[1]
            if not future.done():
                future.set_exception(ShuttingDown())
        self.queue.clear()

    async def submit(self, task: str, x: Tensor, fidelity: Fidelity | None,
                     top_k: int) -> Prediction:
        if len(self.queue) >= self.max_queue:
            self.stats.rejected += 1
            if self.on_reject is not None:
                self.on_reject("queue_full")
            raise QueueFull(self.max_queue, self.retry_after_s())
        fidelity = fidelity or self.runtime.fidelity
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        item = BatchItem(task, x, fidelity, top_k)
        key = (tuple(x.shape[-2:]), fidelity)
        self.queue.append(Pending(task, key, time.monotonic(), (item, future), next(self._seq)))
        self._wake.set()
        return await future

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained at the recent service rate (at least 1)."""
        per_request = self.stats.seconds_per_request or 0.05
        return max(1, math.ceil(len(self.queue) * per_request))

    async def _run(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            oldest = min(p.arrival for p in self.queue)
            wait = oldest + self.max_delay_s - time.monotonic()
            if wait > 0 and len(self.queue) < self.scheduler.max_batch_size:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            now = time.monotonic()
            batch = self.scheduler.select(self.queue, now)
            chosen = {id(p) for p in batch}
            self.queue = [p for p in self.queue if id(p) not in chosen]
            await self._execute(batch, now)

    async def _execute(self, batch: list[Pending], started: float) -> None:
        items = [p.payload[0] for p in batch]
        try:
            results = await self.runtime.run(self.runtime.infer_batch, items)
        except Exception as e:  # a failure of the whole batch answers each of its requests
            results = [e] * len(batch)
        elapsed = time.monotonic() - started
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.busy_seconds += elapsed
        if self.on_batch is not None:
            self.on_batch(len(batch), [(p.task, started - p.arrival) for p in batch])
        for pending, result in zip(batch, results, strict=True):
            future: asyncio.Future[Prediction] = pending.payload[1]
            if future.done():  # the client went away
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def build_batcher(settings: Settings, runtime: TaskRuntime, *,
                  on_batch: Callable[[int, list[tuple[str, float]]], None] | None = None,
                  on_reject: Callable[[str], None] | None = None) -> Batcher:
    """The batcher and scheduler ``settings`` describe, in front of ``runtime`` (the same
    for ``xma2 serve`` and every Ray chip replica); not started yet."""
    chip = ChipView(resident=runtime.resident_tasks, fits=runtime.fits,
                    reload_energy_j=runtime.reload_energy_j)
    scheduler = BatchScheduler(settings.scheduler, settings.max_batch_size,
                               settings.max_reorder_wait_ms / 1e3, chip)
    return Batcher(runtime, scheduler, max_queue=settings.max_queue,
                   max_delay_s=settings.max_queue_delay_ms / 1e3, on_batch=on_batch,
                   on_reject=on_reject)
