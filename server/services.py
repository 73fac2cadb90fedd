"""What one running server owns: settings, the chip runtime, jobs and metrics.

Created by the app's lifespan; the backbone loads in the background so that
``/healthz`` answers at once and ``/readyz`` turns ready when the chip is programmed.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from server.batcher import Batcher, build_batcher
from server.job_worker import WorkerConfig
from server.jobs import JobManager
from server.metrics import ServerMetrics
from server.runtime import TaskRuntime, build_runtime, freeze_loaded_objects
from server.scratch import remove_orphaned_scratch
from server.settings import Settings
from server.shipped_tasks import import_default_tasks
from task_store import JobStatus, TaskStore

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "job_checkpoints"


class Services:
    """The server's state; :meth:`start` runs in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: TaskRuntime | None = None
        self.metrics: ServerMetrics | None = None
        self.jobs: JobManager | None = None
        self.store: TaskStore | None = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        try:
            self._start()
        except Exception as e:  # reported by /readyz rather than crashing the process
            logger.exception("start-up failed")
            self.error = f"{type(e).__name__}: {e}"

    def _start(self) -> None:
        s = self.settings
        began = time.perf_counter()
        runtime = build_runtime(s)
        store = runtime.store
        self.store = store
        scratch = remove_orphaned_scratch(store.root)
        if scratch:
            logger.info("removed %d temporary folder(s) a stopped server left: %s",
                        len(scratch), ", ".join(scratch))
        if s.default_tasks:
            imported = import_default_tasks(store)
            logger.info("shipped tasks: imported=%s (each is imported once per store; a "
                        "deleted one stays deleted)", ",".join(imported) or "none")
        metrics = ServerMetrics(runtime.pool)
        metrics.add_collector(self._job_states)
        runtime.on_prediction = metrics.observe_prediction
        runtime.worker.submit(runtime.load_all).result()
        self.runtime, self.metrics = runtime, metrics
        worker = WorkerConfig(store_root=str(s.store_root),
                              backbone_file=str(s.backbone_file) if s.backbone_file else None,
                              threads=s.job_threads,
                              checkpoint_root=str(s.store_root / CHECKPOINTS_DIR),
                              log_level=s.log_level, data_root=str(s.data_dir))
        self.jobs = JobManager(store.index, worker, max_concurrent=s.max_concurrent_jobs,
                               cancel_grace_s=s.cancel_grace_s, on_success=self._job_done)
        interrupted = self.jobs.start()
        if interrupted:
            logger.warning("marked %d interrupted job(s) failed: %s", len(interrupted),
                           ", ".join(interrupted))
        logger.info("loaded in %.1f s: %d tasks (%s)", time.perf_counter() - began,
                    len(runtime.served), ", ".join(sorted(runtime.served)))
        for name, error in runtime.load_errors.items():
            logger.error("not serving %s: %s", name, error)

    def start_batching(self) -> None:
        """On the event loop, once :meth:`start` succeeded: the batcher, then ready."""
        runtime, metrics, s = self.runtime, self.metrics, self.settings
        if runtime is None or metrics is None:
            return
        batcher = build_batcher(s, runtime, on_batch=metrics.observe_batch,
                                on_reject=metrics.observe_reject)
        metrics.watch_queue(lambda: batcher.depth)
        batcher.start()
        self.batcher = batcher
        logger.info("heap: %d objects loaded at start-up frozen (full garbage collections "
                    "skip them)", freeze_loaded_objects())
        metrics.ready.set(1)
        self.ready.set()
        logger.info("ready: tasks=%d max_batch_size=%d scheduler=%s fidelity=%s; listening on "
                    "http://%s:%d (API docs at /docs)", len(runtime.served), s.max_batch_size,
                    s.scheduler, s.fidelity.value, s.host, s.port)

    def _job_done(self, task: str) -> None:
        runtime = self.runtime
        if runtime is not None:
            runtime.worker.submit(runtime.sync, task)

    def _job_states(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("xma2_adaptation_jobs", "Adaptation jobs by state",
                                  labels=["state"])
        if self.store is not None:
            counts = self.store.index.job_counts()
            for state in JobStatus:
                gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.shutdown()
        if self.runtime is not None:
            self.runtime.close()
            gc.unfreeze()  # a process that starts the app again collects this one's objects
        if self.store is not None:
            self.store.close()
