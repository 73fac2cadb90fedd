"""A chip replica of the Ray Serve application: one emulated chip and the tasks routed to it.

Each replica builds the same runtime and batcher as ``xma2 serve``
(:func:`server.runtime.build_runtime`, :func:`server.batcher.build_batcher`). Its
``@serve.multiplexed`` loader registers the store's active version of a task on this chip;
Serve unloads the least recently used task when a replica holds ``tasks_per_replica``.
Errors go back to the gateway as values (:class:`ChipAnswer`), already mapped to HTTP by
:func:`server.errors.http_answer`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from ray import serve
from ray.serve import metrics as ray_metrics

from core.chip.config import Fidelity
from core.errors import TaskNotFound, Xma2Error
from server.batcher import Batcher, build_batcher
from server.errors import ApiError, http_answer
from server.images import decode_image
from server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, LOAD_BUCKETS
from server.routers.predict import prediction_response
from server.runtime import (
    Prediction,
    ServedTask,
    TaskRuntime,
    build_runtime,
    freeze_loaded_objects,
    preprocess_for,
)
from server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChipAnswer:
    """A chip's reply to the ingress: a prediction or an error's HTTP answer, and who
    answered.

    Errors travel as values because Ray cannot re-raise exceptions whose constructor
    takes other arguments than their message (such as :class:`~server.errors.QueueFull`).
    """

    replica: str
    tasks: tuple[str, ...]
    response: dict[str, Any] | None = None
    status: int = 200
    message: str = ""
    headers: dict[str, str] | None = None


class _TaskHandle:
    """What the multiplexer caches per task; unloading it unregisters the task."""

    def __init__(self, chip: ChipReplica, name: str, served: ServedTask) -> None:
        self.chip = chip
        self.name = name
        self.served = served
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.chip._release(self)

    def __del__(self) -> None:  # Serve's unload hook (and GC; release is idempotent)
        self.release()


class _ChipMetrics:
    """The ``xma2_*`` series a chip can observe, through Ray's metrics (``ray_xma2_*``).

    Ray prefixes them with ``ray_``; deploy/prometheus/ray-rules.yml records them under
    the single-server names so one dashboard serves both deployments.
    """

    def __init__(self) -> None:
        task = ("task",)
        self.inference = ray_metrics.Counter(
            "xma2_inference_energy_joules", description="Emulated chip energy of inference",
            tag_keys=task)
        self.crossbar_read = ray_metrics.Counter(
            "xma2_crossbar_read_energy_joules",
            description="Emulated crossbar cell-read energy of inference", tag_keys=task)
        self.adc = ray_metrics.Counter(
            "xma2_adc_energy_joules", description="Emulated ADC energy of inference",
            tag_keys=task)
        self.reprogramming = ray_metrics.Counter(
            "xma2_reprogramming_energy_joules",
            description="Energy of the spare-PE writes and mask-buffer loads charged to a task",
            tag_keys=task)
        self.loads = ray_metrics.Counter(
            "xma2_task_loads", description="Times a task was made resident", tag_keys=task)
        self.evictions = ray_metrics.Counter(
            "xma2_task_evictions", description="Times a task lost residency", tag_keys=task)
        self.load_latency = ray_metrics.Histogram(
            "xma2_task_load_latency_seconds",
            description="Time to make a task current when it was not",
            boundaries=list(LOAD_BUCKETS), tag_keys=task)
        self.resident = ray_metrics.Gauge(
            "xma2_task_resident", description="1 while a task's spare PEs are on the chip",
            tag_keys=task)
        self.spare_free = ray_metrics.Gauge(
            "xma2_spare_pes_free", description="Spare PEs holding no resident task")
        self.queue_depth = ray_metrics.Gauge(
            "xma2_queue_depth", description="Requests waiting for a batch")
        self.batch_size = ray_metrics.Histogram(
            "xma2_batch_size", description="Requests per batch run on the chip",
            boundaries=list(BATCH_BUCKETS))
        self.queue_wait = ray_metrics.Histogram(
            "xma2_queue_wait_seconds",
            description="Time a request waited in the queue before its batch ran",
            boundaries=list(LATENCY_BUCKETS), tag_keys=task)
        self.rejected = ray_metrics.Counter(
            "xma2_rejected_requests", description="Requests refused before queueing",
            tag_keys=("reason",))
        self._resident: set[str] = set()

    def observe_batch(self, size: int, waits: list[tuple[str, float]]) -> None:
        self.batch_size.observe(size)
        for task, seconds in waits:
            self.queue_wait.observe(seconds, tags={"task": task})

    def observe_reject(self, reason: str) -> None:
        self.rejected.inc(1, tags={"reason": reason})

    def observe(self, p: Prediction, runtime: TaskRuntime) -> None:
        """One answered request (on the chip's worker, where the pool is consistent)."""
        tags = {"task": p.task}
        for counter, value in ((self.inference, p.energy.total_j),
                               (self.crossbar_read, p.energy.cell_read_j),
                               (self.adc, p.energy.adc_j),
                               (self.reprogramming, p.reprogramming_j)):
            if value > 0:  # Ray counters refuse increments of 0
                counter.inc(value, tags=tags)
        if p.programmed:
            self.loads.inc(1, tags=tags)
        if p.programmed or p.switched:
            self.load_latency.observe(p.load_seconds, tags=tags)
        for name in p.evicted:
            self.evictions.inc(1, tags={"task": name})
        resident = set(runtime.pool.resident_tasks())
        for name in resident | self._resident:
            self.resident.set(1.0 if name in resident else 0.0, tags={"task": name})
        self._resident = resident
        self.spare_free.set(runtime.pool.free_slots)


class ChipReplica:
    """One emulated chip: a backbone programmed once, and the tasks Serve routes to it.

    Args:
        settings: the chip and limits (the same ``XMA2_*`` settings as ``xma2 serve``).
        refresh_s: how often a held task's active version is re-read from the store.
    """

    def __init__(self, settings: Settings, refresh_s: float) -> None:
        self.runtime = build_runtime(settings)
        self.runtime.worker.submit(self.runtime.load_builtins).result()
        self.settings = settings
        self.refresh_s = refresh_s
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else "local"
        self.metrics = _ChipMetrics()
        self.runtime.on_prediction = partial(self.metrics.observe, runtime=self.runtime)
        self.batcher: Batcher | None = None
        self._handles: dict[str, _TaskHandle] = {}
        self._handles_lock = threading.Lock()
        self._checked: dict[str, float] = {}
        logger.info("chip replica %s ready (%d objects loaded at start-up frozen)",
                    self.replica_id, freeze_loaded_objects())

    async def _load_task(self, task: str) -> _TaskHandle:
        """Register the store's active version of ``task`` (the multiplexed loader's body)."""
        served = await self.runtime.run(self._register, task)
        handle = _TaskHandle(self, task, served)
        with self._handles_lock:
            self._handles[task] = handle
        logger.info("replica %s holds %s v%s", self.replica_id, task, served.version)
        return handle

    def _release(self, handle: _TaskHandle) -> None:
        with self._handles_lock:
            if self._handles.get(handle.name) is handle:
                del self._handles[handle.name]
        # Never wait here: GC may call this on the worker thread itself.
        try:
            self.runtime.worker.submit(self._unregister, handle.name)
        except RuntimeError:  # the worker has shut down with the replica
            pass

    async def load_task(self, task: str) -> _TaskHandle:
        """The multiplexed loader; :func:`chip_class` decorates it with its bound."""
        return await self._load_task(task)

    def held_tasks(self) -> tuple[str, ...]:
        with self._handles_lock:
            return tuple(sorted(self._handles))

    # -- on the chip's worker thread -----------------------------------------------------

    def _register(self, task: str) -> ServedTask:
        served = self.runtime.sync(task)
        if served is None:
            error = self.runtime.load_errors.get(task)
            raise TaskNotFound(f"unknown task {task!r}" + (f": {error}" if error else ""))
        self._checked[task] = time.monotonic()
        # Drop tasks re-registered behind the multiplexer's back (see _current).
        held = set(self.held_tasks()) | {task}
        for name in [n for n in self.runtime.served if not self.runtime.is_builtin(n)]:
            if name not in held:
                self._unregister(name)
        return served

    def _unregister(self, task: str) -> None:
        if task not in self.held_tasks():  # not loaded again since it was released
            self.runtime.unregister(task)
            self._checked.pop(task, None)

    def _current(self, task: str) -> ServedTask:
        """The task as served now: re-registered if a newer version became active, or if
        Serve unloaded it while this request waited."""
        served = self._fresh(task)
        if served is not None:
            return served
        runtime = self.runtime
        served = runtime.served.get(task)
        now = time.monotonic()
        active = runtime.store.index.task(task).active_version
        if served is None or served.version != active:
            return self._register(task)
        self._checked[task] = now
        return served

    def _fresh(self, task: str) -> ServedTask | None:
        """The served task if it needs no look at the store (any thread may ask)."""
        runtime = self.runtime
        if runtime.is_builtin(task):
            return runtime.task(task)
        served = runtime.served.get(task)
        if served is not None and time.monotonic() - self._checked.get(task, 0.0) < self.refresh_s:
            return served
        return None

    # -- requests --------------------------------------------------------------------------

    def _start_batcher(self) -> Batcher:
        """The same batcher and scheduler as ``xma2 serve``, on this replica's event loop."""
        batcher = build_batcher(self.settings, self.runtime, on_batch=self._observe_batch,
                                on_reject=self.metrics.observe_reject)
        batcher.start()
        return batcher

    def _observe_batch(self, size: int, waits: list[tuple[str, float]]) -> None:
        self.metrics.observe_batch(size, waits)
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.depth)

    async def predict(self, task: str, data: bytes, fidelity: Fidelity | None,
                      top_k: int | None) -> ChipAnswer:
        """Decode, preprocess and classify one image; errors come back as a status."""
        try:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                if model_id != task:
                    raise ApiError(500, f"routed for task {model_id!r} but asked for {task!r}")
                await self.load_task(model_id)
            served = self._fresh(task)
            if served is None:
                served = await self.runtime.run(self._current, task)
            image = await asyncio.to_thread(
                decode_image, data, max_pixels=self.settings.max_image_pixels)
            x = await asyncio.to_thread(preprocess_for, served, image)
            if self.batcher is None:
                self.batcher = self._start_batcher()
            k = top_k or self.settings.top_k
            self.metrics.queue_depth.set(self.batcher.depth + 1)
            try:
                prediction = await self.batcher.submit(task, x, fidelity, k)
            except TaskNotFound:  # Serve unloaded the task while this request was queued
                await self.runtime.run(self._current, task)
                prediction = await self.batcher.submit(task, x, fidelity, k)
        except (ApiError, Xma2Error) as e:  # (the store's errors are Xma2Errors too)
            answer = http_answer(e)
            return ChipAnswer(self.replica_id, self.held_tasks(), status=answer.status,
                              message=answer.message, headers=answer.headers)
        return ChipAnswer(self.replica_id, self.held_tasks(),
                          response=prediction_response(prediction).model_dump(mode="json"))

    def __del__(self) -> None:  # Serve calls this when it stops the replica
        self.runtime.close()
        self.runtime.store.close()


def chip_class(tasks_per_replica: int) -> type[ChipReplica]:
    """``ChipReplica`` with a multiplexed loader holding at most ``tasks_per_replica``.

    The bound is an argument of the ``@serve.multiplexed`` decorator, so the class is
    made per configuration.
    """

    class Chip(ChipReplica):
        @serve.multiplexed(max_num_models_per_replica=tasks_per_replica)
        async def load_task(self, task: str) -> _TaskHandle:
            return await self._load_task(task)

    return Chip
