"""What a crash leaves: an orphaned job worker registers nothing once its job was ended,
and start-up removes the upload folders and checkpoints a killed server left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.job_worker import registration_fence
from server.services import CHECKPOINTS_DIR
from task_store import JobFenced, JobStatus, TaskStore
from tests.server.live import LiveServer
from tests.task_store.helpers import FINGERPRINT, method_task, tiny_mapping


def test_a_worker_whose_job_was_failed_registers_nothing(tmp_path: Path) -> None:
    mapping = tiny_mapping()
    store = TaskStore(tmp_path / "store", backbone_fingerprint=FINGERPRINT, mapping=mapping)
    try:
        index = store.index
        job = index.create_job("adaptation", task="late", params={})
        index.update_job(job.id, JobStatus.RUNNING)
        # The server restarted and marked the job failed while the worker was still busy.
        index.update_job(job.id, JobStatus.FAILED, error="interrupted")
        task = method_task("late", mapping, "xma2")
        with pytest.raises(JobFenced, match="failed"):
            store.put(task, method="xma2",
                      fence=registration_fence(index, job.id, {"task": "late"}))
        assert [r.name for r in store.list()] == []
        assert not (tmp_path / "store" / "tasks" / "late").exists()
        assert index.job(job.id).status is JobStatus.FAILED and index.job(job.id).result is None

        # A worker whose job still runs commits the version and ends the job in one go.
        job = index.create_job("adaptation", task="late", params={})
        index.update_job(job.id, JobStatus.RUNNING)
        record = store.put(task, method="xma2",
                           fence=registration_fence(index, job.id, {"task": "late"}))
        done = index.job(job.id)
        assert done.status is JobStatus.SUCCEEDED
        assert done.result == {"task": "late", "version": record.version, "activated": True}
    finally:
        store.close()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_start_up_removes_what_a_killed_server_left(tmp_path: Path) -> None:
    server = LiveServer(tmp_path)
    store = server.store
    # What SIGKILL during an import and during a job leaves behind.
    upload = store / f".scratch-upload-{_dead_pid()}-abc123"
    legacy = store / "tmpk1ll3d"
    checkpoint = store / CHECKPOINTS_DIR / "job-0123456789abcdef0123"
    for folder in (upload, legacy, checkpoint):
        folder.mkdir(parents=True)
    (upload / "upload.tar").write_bytes(b"\0" * 4096)
    (legacy / "upload.tar").write_bytes(b"\0" * 4096)
    (checkpoint / "state.pt").write_bytes(b"\0" * 4096)
    unrelated = store / "notes"
    unrelated.mkdir()
    server.start()
    try:
        assert not upload.exists() and not legacy.exists() and not checkpoint.exists()
        assert unrelated.exists()
        with server.client() as c:
            assert c.get("/readyz").json()["status"] == "ready"
        assert "temporary folder" in server.log() and "orphaned checkpoint" in server.log()
    finally:
        server.stop()
