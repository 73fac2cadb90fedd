"""A first run explains itself: what loads, when it is ready, what compiles, what jobs do."""

from __future__ import annotations

from pathlib import Path

from tests.server.live import LiveServer, encode, photo, photo_dataset, wait_for, wait_job
from tests.server.test_jobs import PHOTOS


def test_a_first_run_logs_what_it_does(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, log_level="debug").start()
    try:
        with server.client(timeout=600) as c:  # a cold operator build can take minutes
            ready = c.get("/readyz").json()
            assert c.get("/healthz").json()["tasks"] == ready["tasks"] == 4
            body = encode(photo("camera")[::8, ::8])
            assert c.post("/predict", params={"task": "mnist"}, content=body).status_code == 200
            r = c.post("/predict", params={"task": "mnist", "fidelity": "crossbar"},
                       content=body)
            assert r.status_code == 200, r.text
            photo_dataset(server.data_root / "photos", PHOTOS, per_class=4)
            job = c.post("/adaptations", json={"task": "photos", "dataset_path": "photos",
                                               "epochs": 1, "batch_size": 4}).json()
            assert wait_job(c, job["id"])["status"] == "succeeded"
            ended = f"job {job['id']} ended: status=succeeded"
            wait_for(lambda: ended in server.log_path.read_text(), timeout=30,
                     what="the job's end to be logged")
    finally:
        server.stop()
    log = server.log_path.read_text()
    for line in ("loading the backbone", "backbone loaded and programmed",
                 "shipped tasks: imported=fashion-mnist,mnist,animal-mnist",
                 "ready: tasks=4", "building the crossbar operator",
                 "crossbar operator ready", "task mnist made resident",
                 f"job {job['id']} queued", f"job {job['id']} started",
                 f"job {job['id']} ended: status=succeeded", "level=DEBUG"):
        assert line in log, line
