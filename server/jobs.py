"""Adaptation jobs: a queue in the store's index, each job run in a worker process.

Jobs start in submission order, at most ``max_concurrent`` at a time. A job's process
reports progress and ends the job itself; this manager starts processes, relays cancel
requests (terminating a process that overstays ``cancel_grace_s``), ends jobs whose
process died, and tells the server when a new task version is ready to serve. Jobs
that were running when the server stopped are marked failed at the next start.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from server.errors import JobConflict, JobNotFound
from server.job_worker import JOB_KIND, WorkerConfig, run_job
from task_store import JobRecord, JobStatus, StoreError
from task_store.index import JobEvent, TaskIndex

logger = logging.getLogger(__name__)

POLL_S = 0.25


@dataclass
class _Running:
    process: SpawnProcess
    cancel: Any  # multiprocessing Event
    cancel_requested: float | None = None


class JobManager:
    """Runs adaptation jobs outside the request path.

    Args:
        index: the store's index, where jobs, their events and progress live.
        worker: what each worker process needs.
        max_concurrent: jobs running at once.
        cancel_grace_s: how long a cancelled job may take to stop by itself.
        on_success: called with the task name when a job registered a new version.
    """

    def __init__(self, index: TaskIndex, worker: WorkerConfig, *, max_concurrent: int = 1,
                 cancel_grace_s: float = 10.0,
                 on_success: Callable[[str], None] | None = None) -> None:
        self.index = index
        self.worker = worker
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.on_success = on_success
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[str, _Running] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="xma2-jobs", daemon=True)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> list[str]:
        """Fail the jobs a previous server left running, then start dispatching."""
        interrupted = []
        for job in self._all(JobStatus.RUNNING):
            progress = (job.result or {}).get("progress", {})
            where = (f" at step {progress['step']}/{progress['total_steps']}"
                     if progress.get("total_steps") else "")
            message = (f"interrupted: the server stopped while this job ran{where}; "
                       "submit it again")
            self.index.add_job_event(job.id, message, level="error")
            self.index.update_job(job.id, JobStatus.FAILED, result=job.result, error=message)
            self._discard_checkpoint(job.id)
            interrupted.append(job.id)
        self._remove_orphaned_checkpoints()
        self._thread.start()
        return interrupted

    def shutdown(self) -> None:
        """Stop dispatching; jobs still running are stopped and marked failed."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=5)
        for job_id, running in list(self._running.items()):
            running.process.terminate()
            running.process.join(timeout=5)
            if running.process.is_alive():
                running.process.kill()
                running.process.join()
            self._end_if_open(job_id, JobStatus.FAILED,
                              "interrupted: the server shut down while this job ran; "
                              "submit it again")
            self._discard_checkpoint(job_id)
        self._running.clear()

    # -- requests --------------------------------------------------------------------

    def submit(self, task: str, params: dict[str, Any]) -> JobRecord:
        job = self.index.create_job(JOB_KIND, task=task, params=params)
        self.index.add_job_event(job.id, f"queued: {params['method']} on "
                                         f"{params.get('dataset') or params['dataset_path']} "
                                         f"for task {task}")
        logger.info("job %s queued: task=%s method=%s", job.id, task, params["method"])
        with self._wake:
            self._wake.notify_all()
        return job

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status.terminal:
            raise JobConflict(job_id, job.status.value)
        with self._wake:
            running = self._running.get(job_id)
            if running is None:
                self.index.add_job_event(job_id, "cancelled before it started")
                self.index.update_job(job_id, JobStatus.CANCELLED, error="cancelled by request")
            elif running.cancel_requested is None:
                running.cancel_requested = time.monotonic()
                running.cancel.set()
                self.index.add_job_event(job_id, "cancel requested; stopping after this step")
                logger.info("job %s cancel requested", job_id)
            self._wake.notify_all()
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        try:
            job = self.index.job(job_id)
        except StoreError as e:
            raise JobNotFound(str(e)) from e
        if job.kind != JOB_KIND:
            raise JobNotFound(f"no adaptation job {job_id!r}")
        return job

    def events(self, job_id: str, *, after: int = 0, limit: int = 50) -> list[JobEvent]:
        """The job's events after the one numbered ``after``, oldest first."""
        self.get(job_id)
        return self.index.job_events(job_id, after=after, limit=limit)

    def _all(self, status: JobStatus) -> list[JobRecord]:
        return [j for j in self.index.jobs(status=status, limit=1_000_000)
                if j.kind == JOB_KIND]

    # -- the dispatcher thread -------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                try:
                    self._reap()
                    self._dispatch()
                except Exception:  # the dispatcher must outlive any one bad job
                    logger.exception("job dispatcher error")
                self._wake.wait(POLL_S)

    def _dispatch(self) -> None:
        queued = list(reversed(self._all(JobStatus.QUEUED)))  # oldest first
        for job in queued:
            if len(self._running) >= self.max_concurrent:
                return
            if job.id in self._running:
                continue
            cancel = self._context.Event()
            process = self._context.Process(target=run_job, args=(job.id, self.worker, cancel),
                                            name=f"xma2-{job.id}", daemon=True)
            process.start()
            logger.info("job %s started in process %s", job.id, process.pid)
            self._running[job.id] = _Running(process, cancel)

    def _reap(self) -> None:
        now = time.monotonic()
        for job_id, running in list(self._running.items()):
            process = running.process
            if (process.is_alive() and running.cancel_requested is not None
                    and now - running.cancel_requested > self.cancel_grace_s):
                logger.warning("job %s did not stop within %.0f s of cancel; terminating",
                               job_id, self.cancel_grace_s)
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                continue
            process.join()
            del self._running[job_id]
            if running.cancel_requested is not None:
                self._end_if_open(job_id, JobStatus.CANCELLED,
                                  "cancelled by request (the worker process was stopped)")
            else:
                self._end_if_open(job_id, JobStatus.FAILED,
                                  f"the worker process exited with code {process.exitcode} "
                                  "before finishing")
            self._discard_checkpoint(job_id)
            job = self.index.job(job_id)
            logger.info("job %s ended: status=%s task=%s%s", job_id, job.status.value, job.task,
                        f" error={job.error}" if job.error else "")
            if job.status is JobStatus.SUCCEEDED and self.on_success is not None and job.task:
                self.on_success(job.task)

    def _remove_orphaned_checkpoints(self) -> None:
        """Checkpoints of jobs that are not running (a killed server or worker left them)."""
        root = Path(self.worker.checkpoint_root)
        if not root.is_dir():
            return
        running = {j.id for j in self._all(JobStatus.RUNNING)}
        for folder in root.iterdir():
            if folder.name not in running:
                logger.info("removing the orphaned checkpoint of job %s", folder.name)
                shutil.rmtree(folder, ignore_errors=True)

    def _discard_checkpoint(self, job_id: str) -> None:
        """A job is never resumed (a resubmission is a new job), so its checkpoint goes."""
        shutil.rmtree(Path(self.worker.checkpoint_root) / job_id, ignore_errors=True)

    def _end_if_open(self, job_id: str, status: JobStatus, message: str) -> None:
        job = self.index.job(job_id)
        if job.status.terminal:
            return
        self.index.add_job_event(job_id, message, level="error")
        self.index.update_job(job_id, status, result=job.result, error=message)
