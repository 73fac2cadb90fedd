"""The job manager in-process over a real store index, no HTTP and no worker process:
lookups, cancelling, the events a job records, and the jobs a stopped server left."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import JobConflict, JobNotFound, http_answer
from server.job_worker import JOB_KIND, WorkerConfig
from server.jobs import JobManager
from task_store import JobStatus
from task_store.index import TaskIndex

PARAMS = {"method": "xma2", "dataset": "mnist5k"}


@pytest.fixture
def index(tmp_path: Path) -> Iterator[TaskIndex]:
    index = TaskIndex(tmp_path / "index.sqlite")
    try:
        yield index
    finally:
        index.close()


@pytest.fixture
def jobs(index: TaskIndex, tmp_path: Path) -> JobManager:
    """Not started: submitted jobs stay queued (no worker process is spawned)."""
    worker = WorkerConfig(store_root=str(tmp_path), backbone_file=None, threads=1,
                          checkpoint_root=str(tmp_path / "checkpoints"))
    return JobManager(index, worker)


def test_an_unknown_job_is_not_found_everywhere(jobs: JobManager, index: TaskIndex) -> None:
    for ask in (jobs.get, jobs.cancel, jobs.events):
        with pytest.raises(JobNotFound) as missing:
            ask("job-nope")
        answer = http_answer(missing.value)
        assert (answer.status, answer.message) == (
            404, "no job 'job-nope'; list jobs to see the known ids")
    other = index.create_job("export", task="t", params={})  # a job, but not an adaptation
    with pytest.raises(JobNotFound, match=f"no adaptation job '{other.id}'"):
        jobs.get(other.id)


def test_a_queued_job_cancels_at_once_and_records_why(jobs: JobManager) -> None:
    job = jobs.submit("digits", PARAMS)
    assert job.status is JobStatus.QUEUED and job.kind == JOB_KIND
    assert [e.message for e in jobs.events(job.id)] == [
        "queued: xma2 on mnist5k for task digits"]
    cancelled = jobs.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.error == "cancelled by request"
    events = jobs.events(job.id)
    assert [e.message for e in events][1:] == ["cancelled before it started"]
    assert [e.message for e in jobs.events(job.id, after=events[0].seq)] == [
        "cancelled before it started"]
    assert len(jobs.events(job.id, limit=1)) == 1


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_cancelling_a_job_that_ended_is_a_conflict(jobs: JobManager, index: TaskIndex,
                                                   status: JobStatus) -> None:
    job = jobs.submit("digits", PARAMS)
    index.update_job(job.id, status)
    before = jobs.events(job.id)
    with pytest.raises(JobConflict) as conflict:
        jobs.cancel(job.id)
    answer = http_answer(conflict.value)
    assert (answer.status, answer.message, answer.headers) == (
        409, f"job {job.id} is already {status.value}", None)
    assert jobs.get(job.id).status is status  # unchanged, and no event added
    assert jobs.events(job.id) == before


def test_a_job_running_when_the_server_stopped_is_failed_at_start(
        jobs: JobManager, index: TaskIndex, tmp_path: Path) -> None:
    running = jobs.submit("digits", PARAMS)
    index.update_job(running.id, JobStatus.RUNNING,
                     result={"progress": {"step": 3, "total_steps": 10}})
    ended = jobs.submit("letters", PARAMS)
    index.update_job(ended.id, JobStatus.SUCCEEDED)
    checkpoints = tmp_path / "checkpoints"
    for job_id in (running.id, "job-orphan"):
        (checkpoints / job_id).mkdir(parents=True)
    try:
        assert jobs.start() == [running.id]
    finally:
        jobs.shutdown()
    failed = jobs.get(running.id)
    assert failed.status is JobStatus.FAILED
    message = ("interrupted: the server stopped while this job ran at step 3/10; "
               "submit it again")
    assert failed.error == message and jobs.events(running.id)[-1].message == message
    assert jobs.events(running.id)[-1].level == "error"
    assert jobs.get(ended.id).status is JobStatus.SUCCEEDED
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
