"""A restarted server serves the same tasks and versions, and says what it interrupted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.server.live import LiveServer, encode, photo, photo_dataset, wait_for
from tests.server.test_jobs import PHOTOS


def test_restart_keeps_tasks_versions_and_fails_interrupted_jobs(tmp_path: Path) -> None:
    body = encode(photo("camera"))
    first = LiveServer(tmp_path).start()
    try:
        with first.client() as c:
            archive = c.get("/tasks/mnist/archive").content
            for _ in range(2):
                assert c.post("/tasks", params={"name": "mnist-b"}, content=archive).status_code \
                    == 201
            assert c.post("/tasks/mnist-b/activate", params={"version": 1}).status_code == 200
            assert c.delete("/tasks/animal-mnist").status_code == 204
            tasks_before = c.get("/tasks").json()
            answers = {t: c.post("/predict", params={"task": t}, content=body).json()
                       for t in ("mnist", "mnist-b", "imagenet")}
            photo_dataset(first.data_root / "long", PHOTOS, per_class=30)
            job = c.post("/adaptations", json={"task": "never", "dataset_path": "long",
                                               "epochs": 100, "batch_size": 4}).json()
            wait_for(lambda: c.get(f"/adaptations/{job['id']}").json()["status"] == "running",
                     timeout=120, what="the job to run")
    finally:
        first.stop()

    second = LiveServer(tmp_path)
    second.start()
    try:
        with second.client() as c:
            assert c.get("/tasks").json() == tasks_before
            detail = c.get("/tasks/mnist-b").json()
            assert detail["version"] == 1 and [v["version"] for v in detail["versions"]] == [1, 2]
            assert c.get("/tasks/animal-mnist").status_code == 404  # deleted stays deleted
            for task, answer in answers.items():
                again = c.post("/predict", params={"task": task}, content=body).json()
                assert again["predictions"] == answer["predictions"]
                assert again["version"] == answer["version"]
            interrupted = c.get(f"/adaptations/{job['id']}").json()
            assert interrupted["status"] == "failed"
            assert "interrupted" in interrupted["error"]
            events = c.get(f"/adaptations/{job['id']}/events").json()["data"]
            assert "interrupted" in events[-1]["message"]
            assert c.get("/tasks/never").status_code == 404
    finally:
        second.stop()


def test_a_killed_server_leaves_no_orphan_job(tmp_path: Path) -> None:
    """SIGKILL: no shutdown code runs. The worker notices its server is gone and stops,
    and the next server reports the job as failed; the store is intact."""
    first = LiveServer(tmp_path).start()
    with first.client() as c:
        photo_dataset(first.data_root / "long", PHOTOS, per_class=30)
        job = c.post("/adaptations", json={"task": "never", "dataset_path": "long",
                                           "epochs": 100, "batch_size": 4}).json()
        wait_for(lambda: (c.get(f"/adaptations/{job['id']}").json()["progress"] or {})
                 .get("step", 0) >= 1, timeout=120, what="the job to take a step")
        tasks_before = c.get("/tasks").json()
    assert first.process is not None
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    first.process = None

    second = LiveServer(tmp_path).start()
    try:
        with second.client() as c:
            done = wait_for(lambda: (j := c.get(f"/adaptations/{job['id']}").json())["status"]
                            == "failed" and j, timeout=60, what="the job to be failed")
            assert "server" in done["error"]
            assert c.get("/tasks").json() == tasks_before
            assert c.get("/tasks/never").status_code == 404
            # the orphaned worker stopped: the job's progress no longer moves
            step = (done["progress"] or {}).get("step", 0)
            time.sleep(3)
            later = c.get(f"/adaptations/{job['id']}").json()
            assert (later["progress"] or {}).get("step", 0) == step
    finally:
        second.stop()
