"""The served chip: one engine, its spare-PE pool and the task store, behind one worker thread.

The engine is not thread-safe, so every call that touches it (registering a task,
switching, inference) runs on :attr:`TaskRuntime.worker`, a single thread; request
handlers await it. Decoding and resizing images happens before, on the request's
own thread, so the worker only runs the chip.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import Tensor

from core.backbones.preprocess import imagenet_resize_size, preprocess_fit, preprocess_image
from core.backbones.shipped import IMAGENET_TASK, load_backbone
from core.chip.config import Fidelity
from core.chip.energy import EnergyReport
from core.chip.pool import EnergyAwareEviction, LRUEviction, PoolConfig, SparePEPool
from core.confidence import UNCALIBRATED, Confidence
from core.engine import CrossbarEngine
from core.errors import TaskNotFound, TaskStateError
from core.lru import CapacityError
from core.nn.model import CrossbarModel
from core.task_state import TaskState
from server.errors import ChipFailure
from server.imagenet_task import builtin_imagenet_task
from server.images import load_image
from server.settings import Settings
from task_store import StoredTask, TaskStore, VersionRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREPROCESS_IMAGENET = "imagenet"
"""Resize the short side to 256/224 of the input size, then centre-crop (ImageNet eval)."""
PREPROCESS_FIT = "fit"
"""Resize the centre square to the input size (how task datasets are read)."""
BUILTIN_TASK = IMAGENET_TASK
"""The backbone's own ImageNet classifier, served on every chip without a store entry: the
distilled task of ``server/default_tasks/imagenet.tar`` when it was made on the loaded
backbone, else the fp32 head and BatchNorms on the 4-bit crossbars
(:mod:`server.imagenet_task`)."""
IMAGENET_INPUT_SIZE = 224


@dataclass(frozen=True)
class ServedTask:
    """What the server knows about a task it serves."""

    name: str
    version: int | None
    """Store version; None for a built-in task."""
    method: str
    image_size: int
    preprocess: str
    labels: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    builtin: bool = False
    replaced_pes: int = 0
    confidence: Confidence = UNCALIBRATED
    """Temperature of its probabilities and threshold of its OOD flag."""


@dataclass
class TaskUsage:
    """Inference served for one task since the server started."""

    requests: int = 0
    images: int = 0
    inference: EnergyReport = field(default_factory=EnergyReport)


@dataclass(frozen=True)
class BatchItem:
    """One request as the chip runs it: a preprocessed image ``[3, H, W]`` of a task."""

    task: str
    x: Tensor
    fidelity: Fidelity
    top_k: int


_PENDING = RuntimeError("not run")


@dataclass(frozen=True)
class Prediction:
    task: str
    version: int | None
    fidelity: Fidelity
    top: list[tuple[str, float]]
    energy: EnergyReport
    """Inference energy of this request."""
    reprogramming_j: float
    """Energy of the spare-PE and mask writes this request caused (0 when resident)."""
    programmed: bool
    """This request made the task resident (its spare PEs were written)."""
    switched: bool
    """The task was not ready on the chip (programmed, or its weights folded) before."""
    evicted: tuple[str, ...]
    load_seconds: float
    """Time spent making the task current (folding, programming); ~0 when it already was."""
    compute_seconds: float
    ood_score: float
    """The task's OOD score of the image (:mod:`core.confidence`; higher: more like its own)."""
    ood: bool
    """The score is below the task's threshold: the image is unlike the task's own."""


def served_from_store(stored: StoredTask, record: VersionRecord) -> ServedTask:
    manifest = stored.manifest
    hyper = manifest.hyperparameters
    return ServedTask(
        name=manifest.task, version=manifest.version, method=manifest.method,
        image_size=int(hyper.get("image_size", 224)),
        preprocess=str(hyper.get("preprocess", PREPROCESS_FIT)),
        labels=manifest.labels, metrics=dict(manifest.metrics), hyperparameters=dict(hyper),
        bytes=record.bytes, replaced_pes=stored.task.replaced_pes,
        confidence=stored.task.confidence,
    )


def preprocess_for(served: ServedTask, image: Image.Image) -> Tensor:
    """An image as ``served``'s input: resized the way its training images were."""
    if served.preprocess == PREPROCESS_IMAGENET:
        return preprocess_image(image, served.image_size)
    return preprocess_fit(image, served.image_size)


def resize_target(served: ServedTask) -> int:
    """The size ``served``'s preprocessing resizes an image's shorter side to."""
    if served.preprocess == PREPROCESS_IMAGENET:
        return imagenet_resize_size(served.image_size)
    return served.image_size


class TaskRuntime:
    """Serves every task of one store on one emulated chip.

    Args:
        model: the calibrated, quantized backbone (programmed once, shared by all tasks).
        store: where task versions live; the active version of each task is served.
        builtin: tasks served without a store entry (the backbone's own ImageNet head),
            with their input size.
        fidelity: default fidelity of :meth:`predict`.
        pool: spare-PE and mask-buffer capacity and the eviction policy's name.
    """

    def __init__(
        self, model: CrossbarModel, store: TaskStore, *, builtin: dict[str, tuple[TaskState, int]],
        fidelity: Fidelity = Fidelity.IDEAL, pool: PoolConfig | None = None,
        eviction: str = "lru", max_prepared_tasks: int = 8,
    ) -> None:
        assert model.mapping is not None
        policy = EnergyAwareEviction() if eviction == "energy" else LRUEviction()
        self.pool = SparePEPool(model.mapping, pool, policy=policy)
        self.engine = CrossbarEngine(model, max_prepared_tasks=max_prepared_tasks,
                                     fidelity=fidelity, pool=self.pool)
        self.store = store
        self.fidelity = fidelity
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="xma2-chip")
        self.served: dict[str, ServedTask] = {}
        self.usage: dict[str, TaskUsage] = {}
        self.load_errors: dict[str, str] = {}
        """Stored tasks that could not be served, and why."""
        self.ready = threading.Event()
        self.on_prediction: Callable[[Prediction], None] | None = None
        self._builtin = builtin
        self._features = next(iter(builtin.values()))[0].head.weight.shape[1] if builtin else None
        self._digital = {
            f"{module_name}.{attr}": tensor
            for module_name, module in model.body.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for attr, tensor in (*module.named_parameters(recurse=False),
                                 *module.named_buffers(recurse=False))
            if attr in ("weight", "bias", "running_mean", "running_var")}
        store.check = self.check_task
        self._crossbar_used = False

    # -- validation ----------------------------------------------------------------------

    def check_task(self, task: TaskState) -> None:
        """Refuse a task this backbone cannot run (the store calls it before it writes or
        serves one): its head must read the backbone's features, its digital tensors must
        be BatchNorm terms of the backbone of the same shape and dtype. The store's format
        has already checked that every such tensor is finite float32."""
        where = f"task {task.task_id}"
        weight = task.head.weight
        if self._features is not None and weight.shape[1] != self._features:
            raise TaskStateError(f"{where}: tensor head/weight is {list(weight.shape)}, but the "
                                 f"backbone has {self._features} features")
        for name, value in (("head/weight", weight), ("head/bias", task.head.bias),
                            *((f"digital/{n}", t) for n, t in task.digital.items())):
            if value.dtype != torch.float32 or not bool(torch.isfinite(value).all()):
                raise TaskStateError(f"{where}: tensor {name} must be finite float32")
        for name, value in task.digital.items():
            own = self._digital.get(name)
            if own is None:
                raise TaskStateError(f"{where}: tensor digital/{name} is not a BatchNorm "
                                     "tensor of this backbone")
            if value.shape != own.shape or value.dtype != own.dtype:
                raise TaskStateError(f"{where}: tensor digital/{name} is {value.dtype} "
                                     f"{list(value.shape)}, the backbone's is {own.dtype} "
                                     f"{list(own.shape)}")

    # -- running on the chip's thread --------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)

    # -- registration (on the worker) --------------------------------------------------

    def load_builtins(self) -> None:
        """Register the built-in tasks (they have no store entry)."""
        for name, (task, size) in self._builtin.items():
            self.engine.add_task(task)
            self.served[name] = ServedTask(
                name=name, version=None, method="builtin", image_size=size,
                preprocess=PREPROCESS_IMAGENET, labels=task.head.labels, builtin=True,
                replaced_pes=task.replaced_pes, confidence=task.confidence)

    def load_all(self) -> None:
        """Register the built-in tasks and the active version of every stored task."""
        self.load_builtins()
        for record in self.store.list():
            if record.name in self._builtin:
                self.load_errors[record.name] = "shadowed by the built-in task of that name"
                continue
            if record.active_version is not None:
                self._load(record.name)
        self.ready.set()

    def sync(self, name: str) -> ServedTask | None:
        """Serve the store's active version of ``name`` (or stop serving it if gone)."""
        if name in self._builtin:
            raise TaskStateError(f"{name!r} is a built-in task; choose another name")
        names = {r.name: r for r in self.store.list()}
        if name not in names or names[name].active_version is None:
            self.unregister(name)
            return None
        return self._load(name)

    def _load(self, name: str) -> ServedTask | None:
        try:
            record = self.store.index.version(name)
            stored = self.store.get(name, record.version)
            self.engine.add_task(stored.task)
        except Exception as e:  # a bad version must not stop the others from serving
            logger.error("cannot serve task %s: %s", name, e)
            self.load_errors[name] = str(e)
            return None
        self.load_errors.pop(name, None)
        served = served_from_store(stored, record)
        self.served[name] = served
        return served

    def unregister(self, name: str) -> None:
        if name in self._builtin:
            raise TaskStateError(f"{name!r} is a built-in task and cannot be removed")
        self.served.pop(name, None)
        self.load_errors.pop(name, None)
        if name in self.engine.tasks:
            self.engine.remove_task(name)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtin

    # -- inference ---------------------------------------------------------------------

    def task(self, name: str) -> ServedTask:
        served = self.served.get(name)
        if served is None:
            known = ", ".join(sorted(self.served)) or "none"
            raise TaskNotFound(f"unknown task {name!r}; served tasks: {known}")
        return served

    def preprocess(self, name: str, image: Image.Image) -> Tensor:
        """An image as the task's input (runs on the caller's thread)."""
        return preprocess_for(self.task(name), image)

    def prepare(self, name: str, image: Image.Image) -> Tensor:
        """An opened image (:func:`server.images.open_image`) decoded and preprocessed as
        the task's input (runs on the caller's thread)."""
        return preprocess_for(self.task(name), load_image(image))

    def infer(self, name: str, x: Tensor, fidelity: Fidelity | None, top_k: int) -> Prediction:
        """Run one request on the chip (call it on the worker)."""
        result = self.infer_batch([BatchItem(name, x, fidelity or self.fidelity, top_k)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def infer_batch(self, items: list[BatchItem]) -> list[Prediction | Exception]:
        """Run a batch that may mix tasks (same input size and fidelity) on the chip.

        Call it on the worker. A request whose task is gone gets its error; the others
        still run. Reprogramming caused by the batch is charged to the first request of
        the task that needed it.
        """
        results: list[Prediction | Exception] = []
        runnable: list[int] = []
        for i, item in enumerate(items):
            try:
                self.task(item.task)
            except TaskNotFound as e:
                results.append(e)
                continue
            results.append(_PENDING)
            runnable.append(i)
        if not runnable:
            return results
        for part in self._fitting_parts(items, runnable):
            self._run_isolated(items, part, results)
        return results

    def _fitting_parts(self, items: list[BatchItem], runnable: list[int]) -> list[list[int]]:
        """The batch split, by task, into parts whose tasks fit on the chip at once.

        The scheduler chose the batch from what it saw then; tasks imported, activated
        or deleted since (their registration runs on this thread before the batch) may
        have changed what fits. Checked here, where nothing else changes the chip, a
        valid request never meets a capacity error because of such churn.
        """
        tasks = list(dict.fromkeys(items[i].task for i in runnable))
        if self.fits(set(tasks)):
            return [runnable]
        groups: list[list[str]] = []
        for task in tasks:
            home = next((g for g in groups if self.fits({*g, task})), None)
            if home is None:
                groups.append([task])
            else:
                home.append(task)
        logger.info("a batch of %d tasks no longer fits on the chip; running it in %d parts",
                    len(tasks), len(groups))
        return [[i for i in runnable if items[i].task in group] for group in groups]

    def _run_isolated(self, items: list[BatchItem], runnable: list[int],
                      results: list[Prediction | Exception]) -> None:
        """Run a batch; if it fails, run its tasks one by one so that only the failing
        task's requests get the error."""
        try:
            self._run_batch(items, runnable, results)
        except Exception as e:
            tasks = list(dict.fromkeys(items[i].task for i in runnable))
            if len(tasks) > 1:
                logger.warning("a batch of %d tasks failed (%s); running them one by one",
                               len(tasks), e)
            for task in tasks:
                group = [i for i in runnable if items[i].task == task]
                try:
                    if len(tasks) == 1:
                        raise
                    self._run_batch(items, group, results)
                except CapacityError as error:  # this task alone exceeds the chip
                    for i in group:
                        results[i] = error
                except Exception as error:
                    logger.exception("task %s failed on the chip", task, exc_info=error)
                    for i in group:
                        results[i] = ChipFailure(task, error)

    def _run_batch(self, items: list[BatchItem], runnable: list[int],
                   results: list[Prediction | Exception]) -> None:
        batch = [items[i] for i in runnable]
        fidelity = batch[0].fidelity
        tasks = [item.task for item in batch]
        x = torch.stack([item.x for item in batch])
        started = time.perf_counter()
        first_crossbar = fidelity == Fidelity.CROSSBAR and not self._crossbar_used
        if first_crossbar:
            logger.info("first crossbar-fidelity batch: building the crossbar operator (a "
                        "C++ extension, compiled once and cached; up to a minute)")
        result = self.engine.run_batch(x, tasks, fidelity)
        logits = result.logits
        seconds = time.perf_counter() - started
        if first_crossbar:
            self._crossbar_used = True
            logger.info("crossbar operator ready: seconds=%.1f", seconds)
        for task, residency in result.residencies.items():
            if residency.programmed or residency.evicted:
                logger.debug("task %s made resident: evicted=%s", task,
                             ",".join(residency.evicted) or "none")
        bad = sorted({t for t, row in zip(tasks, logits, strict=True)
                      if not bool(torch.isfinite(row).all())})
        if bad:
            raise TaskStateError(f"task(s) {', '.join(bad)} produced non-finite logits")
        load = result.load_seconds
        residencies = dict(result.residencies)
        cold = set(result.prepared_now)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        for i, item, row in zip(runnable, batch, logits, strict=True):
            served = self.served[item.task]
            probs = served.confidence.probabilities(row)
            score = served.confidence.scores(row)
            values, indices = probs.topk(min(item.top_k, probs.numel()))
            top = [(served.labels[int(j)], float(v)) for v, j in zip(values, indices,
                                                                      strict=True)]
            charged = residencies.pop(item.task, None)  # charged once per batch
            event = charged.event if charged is not None else None
            energy = self.engine.energy_per_image(item.task, size)
            usage = self.usage.setdefault(item.task, TaskUsage())
            usage.requests += 1
            usage.images += 1
            usage.inference = usage.inference + energy
            programmed = bool(charged and charged.programmed)
            prediction = Prediction(
                item.task, served.version, Fidelity(fidelity), top, energy,
                event.energy_j if event is not None else 0.0, programmed,
                programmed or item.task in cold,
                charged.evicted if charged is not None else (), load, seconds - load,
                float(score), bool(served.confidence.flags(score)))
            cold.discard(item.task)
            results[i] = prediction
            if self.on_prediction is not None:
                self.on_prediction(prediction)

    # -- what the scheduler asks -------------------------------------------------------

    def resident_tasks(self) -> set[str]:
        return set(self.pool.resident_tasks())

    def fits(self, tasks: set[str]) -> bool:
        """Whether these tasks' spare PEs and column masks fit on the chip at once."""
        needing = [t for t in tasks if t in self.engine.tasks and self.engine.tasks[t].layers]
        spare = sum(self.served[t].replaced_pes if t in self.served
                    else self.engine.tasks[t].replaced_pes for t in needing)
        return spare <= self.pool.num_slots and len(needing) <= self.pool.config.mask_entries

    def reload_energy_j(self, task: str) -> float:
        """Energy to make ``task`` resident: the mean of its past loads, else an estimate
        from its replaced PEs at the mean energy per replaced PE seen so far."""
        stats = self.pool.task_stats.get(task)
        if stats is not None and stats.loads:
            return stats.energy_j / stats.loads
        served = self.served.get(task)
        pes = served.replaced_pes if served is not None else 0
        seen = [(s.energy_j, self.served[t].replaced_pes) for t, s in
                list(self.pool.task_stats.items()) if s.loads and t in self.served
                and self.served[t].replaced_pes]
        per_pe = (sum(e for e, _ in seen) / sum(n for _, n in seen)) if seen else 1e-6
        return pes * per_pe

    # -- reports -----------------------------------------------------------------------

    def energy_table(self) -> dict[str, dict[str, float | int]]:
        """Per task: reprogramming and inference energy, requests, cell writes, switches."""
        names = set(self.served) | set(self.usage) | set(self.pool.task_stats)
        table = {}
        for name in sorted(names):
            usage = self.usage.get(name, TaskUsage())
            pool = self.pool.task_stats.get(name)
            table[name] = {
                "requests": usage.requests,
                "images": usage.images,
                "inference_j": usage.inference.total_j,
                "crossbar_read_j": usage.inference.cell_read_j,
                "adc_j": usage.inference.adc_j,
                "reprogramming_j": pool.energy_j if pool else 0.0,
                "cell_writes": pool.programming.cells_written if pool else 0,
                "residency_loads": pool.loads if pool else 0,
                "residency_evictions": pool.evictions if pool else 0,
                "resident": self.pool.is_resident(name),
            }
        return table


def freeze_loaded_objects() -> int:
    """Collect once, then take every object alive now (the backbone, the loaded tasks,
    the libraries' modules) out of the garbage collector's sight, and return how many.

    A full collection walks every tracked object: with the model and libraries loaded,
    about 200 ms during which neither the event loop nor the chip thread runs, every
    20-40 s under load, which set the servers' tail latency (p99 200-400 ms against ~80
    ms without one; docs/performance.md). Frozen objects are never collected, so call
    this once, when loading is done: what start-up left behind is then either garbage
    (collected first) or lives as long as the server."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def build_runtime(settings: Settings) -> TaskRuntime:
    """The chip ``settings`` describe, as ``xma2 serve`` and every Ray chip replica run it.

    Loads (and programs) the backbone, opens the store for it and serves the built-in
    ImageNet task (the distilled one when its shipped archive fits the backbone); registers
    nothing yet: the caller runs :meth:`TaskRuntime.load_all` or
    :meth:`TaskRuntime.load_builtins` on the worker. Sets this process's torch threads.
    """
    torch.set_num_threads(settings.inference_threads)
    began = time.perf_counter()
    logger.info("loading the backbone: file=%s threads=%d",
                settings.backbone_file or "shipped MobileNetV2 (4-bit)",
                settings.inference_threads)
    model = load_backbone(settings.backbone_file)
    logger.info("backbone loaded and programmed: seconds=%.1f fingerprint=%s",
                time.perf_counter() - began, model.fingerprint()[:12])
    store = TaskStore.for_model(settings.store_root, model,
                                max_archive_bytes=settings.max_body_bytes)
    try:
        builtin = {BUILTIN_TASK: (builtin_imagenet_task(model), IMAGENET_INPUT_SIZE)}
        return TaskRuntime(
            model, store, builtin=builtin,
            fidelity=settings.fidelity,
            pool=PoolConfig(spare_pes=settings.spare_pes, mask_entries=settings.mask_entries),
            eviction=settings.eviction, max_prepared_tasks=settings.max_prepared_tasks)
    except BaseException:
        store.close()
        raise
