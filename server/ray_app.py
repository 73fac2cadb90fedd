"""xma2 on Ray Serve: many emulated chips behind one HTTP ingress, with task-affine routing.

Two deployments make one Serve application:

- ``Gateway`` (the ingress) is a FastAPI app that accepts ``POST /predict`` exactly as
  ``xma2 serve`` does, checks the task against the store's index, and forwards the
  image bytes to a chip. Requests for a stored task carry the task name as Serve's
  multiplexed model id, so Serve routes them to a replica that already holds the task;
  the built-in ``imagenet`` task lives on every replica and is balanced freely.
- ``Chip`` replicas each own one emulated chip (backbone, spare-PE pool, engine; a
  :class:`~server.runtime.TaskRuntime`). Their ``@serve.multiplexed`` loader registers
  the store's active version of a task on that chip; Serve unloads the least recently
  used task when a replica holds ``tasks_per_replica`` of them.

Every replica reads the same task store (a directory). Task management (imports,
adaptation jobs, activation) stays with one ``xma2 serve`` on that store; chips pick up
a newly activated version within ``refresh_s`` seconds. Start on a local Ray cluster::

    python -m server.ray_app --replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics as ray_metrics
from ray.serve.handle import DeploymentHandle

from core.backbones.shipped import imagenet_task, load_backbone
from core.config import Fidelity
from core.errors import TaskNotFound, Xma2Error
from core.pool import PoolConfig
from server.app import BodyLimit
from server.batcher import Batcher
from server.cli import MALLOC_ENV
from server.errors import ApiError, install_error_handlers, recorded_outcome, status_of
from server.images import decode_image
from server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, LOAD_BUCKETS
from server.routers.predict import image_bytes, prediction_response
from server.runtime import Prediction, ServedTask, TaskRuntime, preprocess_for
from server.scheduler import BatchScheduler, ChipView
from server.schemas import ERROR_RESPONSES, Health, PredictResponse
from server.services import IMAGENET_INPUT_SIZE
from server.settings import Settings
from server.shipped_tasks import import_default_tasks
from task_store import StoreError, TaskStore
from task_store.index import TaskIndex
from task_store.store import INDEX_FILE

logger = logging.getLogger(__name__)

APP_NAME = "xma2"
BUILTIN_TASK = "imagenet"
REPLICA_HEADER = "X-Xma2-Replica"
"""Response header: the chip replica that answered."""
REPLICA_TASKS_HEADER = "X-Xma2-Replica-Tasks"
"""Response header: the stored tasks that replica holds after answering (comma-separated)."""


@dataclass(frozen=True)
class RayOptions:
    """How the Serve application is laid out; the chip itself is set by ``Settings``."""

    replicas: int = 2
    """Chip replicas (each loads its own backbone: about 0.5 GB)."""
    tasks_per_replica: int = 4
    """Stored tasks a replica holds before Serve unloads its least recently used one."""
    replica_cpus: float = 1.0
    """Ray CPUs reserved per chip replica (match XMA2_INFERENCE_THREADS)."""
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256
    """Requests an ingress replica holds at once; it only waits on chips, so this is high:
    at Serve's default (5) the proxy backs off and retries, and throughput collapses."""
    max_ongoing_requests: int = 32
    """Requests a chip replica accepts at once (room for a batch running and one forming);
    the router sends more to a replica that does not hold the task yet."""
    refresh_s: float = 2.0
    """How stale a replica's view of a task's active version (and the ingress's task list)
    may be."""

    def __post_init__(self) -> None:
        for name in ("replicas", "tasks_per_replica", "ingress_replicas",
                     "max_ongoing_requests", "ingress_max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.replica_cpus < 0 or self.ingress_cpus < 0 or self.refresh_s < 0:
            raise ValueError("replica_cpus, ingress_cpus and refresh_s cannot be negative")


@dataclass(frozen=True)
class ChipAnswer:
    """A chip's reply to the ingress: a prediction or an HTTP error, and who answered.

    Errors travel as values because Ray cannot re-raise exceptions whose constructor
    takes other arguments than their message (such as ``ApiError``).
    """

    replica: str
    tasks: tuple[str, ...]
    response: dict[str, Any] | None = None
    status: int = 200
    message: str = ""
    headers: dict[str, str] | None = None


def prepare_store(settings: Settings) -> list[str]:
    """Create the store and import the shipped tasks once, before any replica starts.

    Done in one process because ``import_default_tasks`` is not safe to run from many
    replicas at once. Returns the names imported.
    """
    model = load_backbone(settings.backbone_file)
    with TaskStore.for_model(settings.store_root, model) as store:
        return import_default_tasks(store) if settings.default_tasks else []


# -- chip replicas ----------------------------------------------------------------------


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
        torch.set_num_threads(settings.inference_threads)
        model = load_backbone(settings.backbone_file)
        store = TaskStore.for_model(settings.store_root, model,
                                    max_archive_bytes=settings.max_body_bytes)
        builtin = {BUILTIN_TASK: (imagenet_task(model), IMAGENET_INPUT_SIZE)}
        self.runtime = TaskRuntime(
            model, store, builtin=builtin, fidelity=settings.fidelity,
            pool=PoolConfig(spare_pes=settings.spare_pes, mask_entries=settings.mask_entries),
            eviction=settings.eviction, max_prepared_tasks=settings.max_prepared_tasks)
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
        logger.info("chip replica %s ready", self.replica_id)

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
        s, runtime = self.settings, self.runtime
        chip = ChipView(resident=runtime.resident_tasks, fits=runtime.fits,
                        reload_energy_j=runtime.reload_energy_j)
        scheduler = BatchScheduler(s.scheduler, s.max_batch_size, s.max_reorder_wait_ms / 1e3,
                                   chip)
        batcher = Batcher(runtime, scheduler, max_queue=s.max_queue,
                          max_delay_s=s.max_queue_delay_ms / 1e3,
                          on_batch=self._observe_batch, on_reject=self.metrics.observe_reject)
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
            served = self._fresh(task) or await self.runtime.run(self._current, task)
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
        except ApiError as e:
            return ChipAnswer(self.replica_id, self.held_tasks(), status=e.status_code,
                              message=e.message, headers=e.headers)
        except (Xma2Error, StoreError) as e:
            return ChipAnswer(self.replica_id, self.held_tasks(), status=status_of(e),
                              message=str(e))
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


# -- ingress ----------------------------------------------------------------------------


class _RequestMetrics:
    """Request count and latency per task, as the single server reports them."""

    def __init__(self) -> None:
        self.requests = ray_metrics.Counter(
            "xma2_requests", description="Prediction requests by task and outcome",
            tag_keys=("task", "status"))
        self.latency = ray_metrics.Histogram(
            "xma2_request_latency_seconds",
            description="Prediction latency from arrival to answer",
            boundaries=list(LATENCY_BUCKETS), tag_keys=("task",))


class Gateway:
    """The HTTP ingress: validates a request, then forwards it to a chip for its task.

    Args:
        chip: handle to the chip deployment.
        settings: limits and defaults (body size, top-k) and the store to read tasks from.
        refresh_s: how long the list of stored tasks is reused before it is read again.
    """

    def __init__(self, chip: DeploymentHandle, settings: Settings, refresh_s: float) -> None:
        self.chip = chip
        self.settings = settings
        self.refresh_s = refresh_s
        self.index = TaskIndex(settings.store_root / INDEX_FILE)
        self.metrics = _RequestMetrics()
        self._tasks: set[str] = set()
        self._read_at = float("-inf")

    def _stored_tasks(self, *, fresh: bool = False) -> set[str]:
        now = time.monotonic()
        if fresh or now - self._read_at > self.refresh_s:
            self._tasks = {r.name for r in self.index.tasks() if r.active_version is not None}
            self._read_at = now
        return self._tasks

    def _check_task(self, task: str) -> None:
        if task == BUILTIN_TASK or task in self._stored_tasks():
            return
        stored = self._stored_tasks(fresh=True)  # imported since the last read?
        if task not in stored:
            known = ", ".join(sorted(stored | {BUILTIN_TASK}))
            raise ApiError(404, f"unknown task {task!r}; served tasks: {known}")

    async def predict(self, request: Request, task: str, fidelity: Fidelity | None,
                      top_k: int | None) -> JSONResponse:
        label = "unknown"

        def record(status: str, seconds: float) -> None:
            self.metrics.requests.inc(1, tags={"task": label, "status": status})
            if status == "ok":
                self.metrics.latency.observe(seconds, tags={"task": label})

        with recorded_outcome(record):
            self._check_task(task)
            label = task
            data = await image_bytes(request)
            # Stored tasks go where they are held; the built-in task runs on any replica.
            chip = self.chip if task == BUILTIN_TASK else self.chip.options(
                multiplexed_model_id=task)
            answer: ChipAnswer = await chip.predict.remote(task, data, fidelity, top_k)
            if answer.response is None:
                raise ApiError(answer.status, answer.message, headers=answer.headers)
            return JSONResponse(answer.response, headers={
                REPLICA_HEADER: answer.replica, REPLICA_TASKS_HEADER: ",".join(answer.tasks)})

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app, built per replica so that it can use this replica's settings."""
        app = FastAPI(title="xma2 on Ray Serve", version="0.1.0", docs_url=None,
                      redoc_url=None)
        install_error_handlers(app)
        app.add_middleware(BodyLimit, max_bytes=self.settings.max_body_bytes)

        @app.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
        async def predict(
            request: Request,
            task: Annotated[str, Query(min_length=1, description="the task to answer with")],
            fidelity: Annotated[Fidelity | None, Query()] = None,
            top_k: Annotated[int | None, Query(ge=1, le=100)] = None,
        ) -> JSONResponse:
            return await self.predict(request, task, fidelity, top_k)

        @app.get("/healthz", response_model=Health)
        def healthz() -> Health:
            return Health(status="ok")

        @app.get("/readyz", response_model=Health)
        def readyz() -> Health:
            # Serve routes traffic here only once the chips have started.
            return Health(status="ready", tasks=len(self._stored_tasks()) + 1)

        return app


# -- the application --------------------------------------------------------------------


def build(settings: Settings, options: RayOptions) -> serve.Application:
    """The Serve application (call ``serve.run`` on it); the store must exist already."""
    if settings.predict_requires_key:  # refuse rather than serve /predict unkeyed
        raise ValueError("XMA2_PREDICT_REQUIRES_KEY is not supported on Ray Serve: the "
                         "Gateway does not check API keys; put an authenticating proxy in "
                         "front of it")
    chip = serve.deployment(
        chip_class(options.tasks_per_replica), name="Chip", num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        # The same malloc settings as `xma2 serve` (freed activations stay in the process);
        # glibc reads them at start, so they go into the replica's environment.
        ray_actor_options={"num_cpus": options.replica_cpus,
                           "runtime_env": {"env_vars": dict(MALLOC_ENV)}})
    gateway = serve.deployment(
        serve.ingress()(Gateway), name="Gateway", num_replicas=options.ingress_replicas,
        max_ongoing_requests=options.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": options.ingress_cpus})
    return gateway.bind(chip.bind(settings, options.refresh_s), settings, options.refresh_s)


def build_app(args: dict[str, str]) -> serve.Application:
    """For ``serve run server.ray_app:build_app replicas=2 tasks_per_replica=4``.

    Settings come from the ``XMA2_*`` environment; the store is prepared here.
    """
    types = {f: type(getattr(RayOptions(), f)) for f in RayOptions.__dataclass_fields__}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; choose from {sorted(types)}")
    options = RayOptions(**{k: types[k](v) for k, v in args.items()})
    settings = Settings()
    prepare_store(settings)
    return build(settings, options)


def main(argv: list[str] | None = None) -> int:
    """Start (or join) a Ray cluster, deploy the app, serve until SIGINT/SIGTERM."""
    import ray

    defaults = RayOptions()
    parser = argparse.ArgumentParser(
        prog="python -m server.ray_app",
        description="Serve xma2 on Ray Serve with task-affine routing. Chip and server "
                    "settings come from the XMA2_* environment (as for xma2 serve).")
    parser.add_argument("--address", default="local",
                        help="Ray cluster: 'local' starts one here (default), 'auto' joins "
                             "the cluster this node belongs to, or ray://host:port")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of a local cluster (default: all)")
    for name in RayOptions.__dataclass_fields__:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default),
                            default=default, help=f"(default {default})")
    args = parser.parse_args(argv)
    settings = Settings()
    options = RayOptions(**{n: getattr(args, n) for n in RayOptions.__dataclass_fields__})
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # In a child process, so that the driver does not keep a backbone's memory.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        imported = child.submit(prepare_store, settings).result()
    if imported:
        logger.info("imported the shipped tasks %s", ", ".join(imported))
    ray.init(address=args.address, num_cpus=args.num_cpus if args.address == "local" else None)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings, options), name=APP_NAME, route_prefix="/")
    logger.info("serving on http://%s:%d with %d chip replica(s)", settings.host,
                settings.port, options.replicas)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run the copy imported under its real name: Ray pickles classes of ``__main__`` by
    # value, which loses the names their (postponed) annotations refer to.
    from server.ray_app import main as _main

    raise SystemExit(_main())
