"""One adaptation job, run in its own process so that inference latency stays steady.

The process loads the backbone, adapts it to the job's dataset with the job's method,
and stores the result as the task's next version. It reports progress and events
through the store's index (SQLite, safe across processes) and ends the job in a
terminal state itself; the parent only steps in when the process dies or overstays a
cancel.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

JOB_KIND = "adaptation"
PROGRESS_INTERVAL_S = 1.0


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker process needs from the server's settings (picklable)."""

    store_root: str
    backbone_file: str | None
    threads: int
    checkpoint_root: str
    log_level: str = "info"
    data_root: str | None = None
    """Every file a dataset loader opens must resolve below it (symlinks included), also
    when links in an image folder changed after submission."""


def outside_links(folder: Path, root: Path) -> list[str]:
    """Entries of an ImageFolder (class folders and their images) that are symbolic links
    resolving outside ``root``, so a job never reads files an operator did not put there."""
    found = []
    for current, dirs, files in os.walk(folder):
        for entry in (*dirs, *files):
            path = Path(current) / entry
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):
                    found.append(str(path.relative_to(folder)))
                    continue
                if not target.is_relative_to(root):
                    found.append(str(path.relative_to(folder)))
    return found


def dataset_spec_name(params: dict[str, Any]) -> str:
    """The core dataset name of a job: a built-in name, ``imagefolder:<resolved path>`` or
    ``<layout>:<resolved path>`` for a published layout (``flowers102``)."""
    from core.data.datasets import IMAGEFOLDER_PREFIX
    from core.data.published_datasets import LAYOUTS, layout_name

    if params.get("dataset") in LAYOUTS:
        return layout_name(params["dataset"], params["dataset_path"])
    if params.get("dataset_path"):
        return f"{IMAGEFOLDER_PREFIX}{params['dataset_path']}"
    return str(params["dataset"])


def run_job(job_id: str, config: WorkerConfig, cancel: CancelFlag) -> None:
    """Process entry point: run ``job_id`` to a terminal state."""
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s level=%(levelname)s job={job_id} %(message)s")
    import torch

    torch.set_num_threads(config.threads)
    from core.backbones.shipped import load_backbone
    from task_store import JobStatus, TaskStore

    model = load_backbone(Path(config.backbone_file) if config.backbone_file else None)
    store = TaskStore.for_model(config.store_root, model)
    index = store.index
    try:
        job = index.job(job_id)
        if job.status.terminal:
            return
        index.update_job(job_id, JobStatus.RUNNING, result={"progress": _progress(0, 0)})
        index.add_job_event(job_id, f"started (worker process {os.getpid()}, "
                                    f"{config.threads} thread(s))")
        _adapt(job_id, job.task or "", job.params, model, store, config, cancel)
    except BaseException as e:  # every failure ends the job with its reason
        from core.errors import TrainingCancelled

        current = index.job(job_id)
        if current.status.terminal:  # ended by the server meanwhile: nothing to record
            logging.warning("job already %s; its result is discarded (%s)",
                            current.status.value, e)
            return
        if isinstance(e, TrainingCancelled) or cancel.is_set():
            step = f" after step {e.step}" if isinstance(e, TrainingCancelled) else ""
            index.add_job_event(job_id, f"cancelled{step}; jobs do not resume: submit it "
                                        "again to start afresh")
            index.update_job(job_id, JobStatus.CANCELLED, result=current.result,
                             error="cancelled by request")
        else:
            logging.exception("job failed")
            index.add_job_event(job_id, f"failed: {e}", level="error")
            index.update_job(job_id, JobStatus.FAILED, result=current.result,
                             error=f"{type(e).__name__}: {e}")
        if not isinstance(e, Exception):
            raise
    finally:
        # Jobs never resume (a resubmission is a new job): the checkpoint goes whatever
        # the outcome, also when this worker outlived its server.
        shutil.rmtree(Path(config.checkpoint_root) / job_id, ignore_errors=True)
        store.close()


def registration_fence(index: Any, job_id: str, summary: dict[str, Any]
                       ) -> Callable[[Any, Any], None]:
    """The store commits a job's version only while the job still runs, and ends the job
    as succeeded in that same transaction: a worker orphaned by a server restart (which
    marked its job failed) registers nothing."""
    from task_store import JobStatus

    def fence(db: Any, record: Any) -> None:
        row = db.execute("SELECT active_version FROM tasks WHERE name = ?",
                         (record.task,)).fetchone()
        result = {**summary, "version": record.version,
                  "activated": row is not None and row["active_version"] == record.version}
        index.finish_job_in(db, job_id, JobStatus.SUCCEEDED, result=result)

    return fence


def _progress(step: int, total: int, **metrics: float) -> dict[str, Any]:
    return {"step": step, "total_steps": total,
            "fraction": round(step / total, 4) if total else 0.0, **metrics}


def _images_per_second(first: tuple[int, float], done: int, now: float,
                       batch_size: int) -> float | None:
    """Training images per second since the first step (which also paid for warm-up)."""
    steps, seconds = done - first[0], now - first[1]
    return steps * batch_size / seconds if steps > 0 and seconds > 0 else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _adapt(job_id: str, task_name: str, params: dict[str, Any], model: Any, store: Any,
           config: WorkerConfig, cancel: CancelFlag) -> None:
    from core.data.datasets import DatasetSpec, load_dataset
    from core.data.photo_split import PhotoSplit
    from core.data.published_datasets import LAYOUTS, photo_method_config, training_record
    from core.engine import CrossbarEngine
    from core.errors import TrainingCancelled as Cancelled
    from core.learning import RunOptions, adapt, default_config
    from core.learning.chip_loop import SERVED_CHIP_AGREEMENT
    from core.learning.common import StepInfo, accuracy
    from core.learning.registry import override_config
    from task_store import JobStatus

    index = store.index
    # A published layout is confined file by file by its loader (data_root); an ImageFolder
    # is walked here for links that escape.
    image_folder = params.get("dataset_path") and params.get("dataset") not in LAYOUTS
    if image_folder and config.data_root is not None:
        escaped = outside_links(Path(params["dataset_path"]), Path(config.data_root).resolve())
        if escaped:
            raise PermissionError(f"{', '.join(escaped[:3])} link(s) outside the data root; "
                                  "copy those images below it")
    spec = DatasetSpec(dataset_spec_name(params), image_size=params["image_size"],
                       seed=params["seed"], train_limit=params.get("train_limit"),
                       test_limit=params.get("test_limit"))
    data = load_dataset(spec, data_root=config.data_root)
    sizes = data.describe()["sizes"]
    index.add_job_event(job_id, f"dataset {spec.name}: {sizes}, {len(data.classes)} classes")
    method_config = default_config(params["method"], pe_fraction=params.get("pe_fraction"),
                                   epochs=params.get("epochs"),
                                   batch_size=params.get("batch_size"), seed=params["seed"])
    if isinstance(data.train, PhotoSplit):
        method_config = photo_method_config(method_config)
    if params.get("chip_in_loop"):
        method_config = override_config(method_config, {
            "train.chip_periphery": "true",
            "train.chip_agreement": str(SERVED_CHIP_AGREEMENT)})
        index.add_job_event(job_id, "training with the chip in the loop (its ADCs in every "
                                    "forward pass, the ideal view taught the chip's answers)")
    batch_size = method_config.train.batch_size
    last = [0.0]
    first: list[tuple[int, float]] = []  # (step, time) of the first step, for the rate
    pace: dict[str, float] = {}  # the latest rate and ETA, kept in the final progress
    server_pid = os.getppid()

    def on_step(info: StepInfo) -> None:
        if os.getppid() != server_pid:  # orphaned: nobody would serve or cancel the result
            raise RuntimeError("the server process exited while this job ran")
        now = time.monotonic()
        done = info.step + 1
        if not first:
            first.append((done, now))
        if info.epoch_metrics:  # e.g. the share of columns at each mask level
            index.add_job_event(job_id, f"epoch {info.epoch} " + ", ".join(
                f"{k} {v:.4g}" for k, v in info.epoch_metrics.items()))
        if now - last[0] < PROGRESS_INTERVAL_S and done < info.total_steps:
            return
        last[0] = now
        rate = _images_per_second(first[0], done, now, batch_size)
        eta = (info.total_steps - done) * batch_size / rate if rate else None
        timing = {} if rate is None else {"images_per_second": round(rate, 2),
                                          "eta_s": round(eta or 0.0, 1)}
        pace.update(timing)
        index.update_job(job_id, JobStatus.RUNNING, result={"progress": _progress(
            done, info.total_steps, epoch=info.epoch, loss=round(info.loss, 5),
            train_accuracy=round(info.accuracy, 5), **timing)})
        if done == info.total_steps or done % 50 == 0 or done == first[0][0] + 5:
            speed = ("" if rate is None else
                     f", {rate:.1f} images/s, training ETA {_duration(eta or 0.0)}")
            index.add_job_event(job_id, f"step {done}/{info.total_steps} epoch {info.epoch} "
                                        f"loss {info.loss:.4f} train accuracy "
                                        f"{info.accuracy:.1%}{speed}")

    checkpoint = Path(config.checkpoint_root) / job_id
    options = RunOptions(cancel=cancel, checkpoint_dir=checkpoint, on_step=on_step)  # type: ignore[arg-type]
    result = adapt(params["method"], model, data, task_name, method_config, options)
    assert result.task is not None
    engine = CrossbarEngine(model)
    engine.add_task(result.task)
    test_accuracy = accuracy(lambda x: engine.forward(x, task_name), data.test)
    if cancel.is_set():
        raise Cancelled(result.steps, None)
    metrics = {"val_accuracy": result.val_accuracy, "test_accuracy": test_accuracy}
    hyper = {"dataset": spec.name, "image_size": spec.image_size, **training_record(data),
             "seed": spec.seed, "train_limit": spec.train_limit, "test_limit": spec.test_limit,
             "job": job_id, "config": result.config}
    summary = {"progress": _progress(result.steps, result.steps, **pace), "task": task_name,
               **metrics, "steps": result.steps, "seconds": round(result.seconds, 2)}
    record = store.put(result.task, method=params["method"], hyperparameters=hyper,
                       metrics=metrics, activate=params.get("activate", True),
                       fence=registration_fence(index, job_id, summary))
    index.add_job_event(job_id, f"registered {task_name} version {record.version} "
                                f"(test accuracy {test_accuracy:.1%})")
