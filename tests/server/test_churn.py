"""Importing, activating and deleting tasks while requests run never fails a valid request."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import torch

from core.backbones.shipped import imagenet_task, load_backbone
from core.chip.config import Fidelity
from server.runtime import BatchItem, Prediction, TaskRuntime
from server.shipped_tasks import import_default_tasks
from task_store import TaskStore
from tests.server.live import LiveServer, encode, photo

SECONDS = 25.0
CLIENTS = 5
STABLE = ("mnist", "fashion-mnist", "animal-mnist", "imagenet")
CHURNED = ("churn-0", "churn-1")
"""Imported, re-imported, activated and deleted in a loop; a request for one of them may
find it gone (404), never anything else."""
MIX = ("mnist", "churn-0", "fashion-mnist", "churn-1", "animal-mnist", "churn-0", "imagenet",
       "churn-1")


def test_requests_never_fail_while_tasks_come_and_go(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, max_body_bytes=2_000_000, max_queue_delay_ms=20).start()
    body = encode(photo("camera")[::8, ::8])
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    churned = Counter[str]()
    stop = threading.Event()
    lock = threading.Lock()

    def predict(worker: int) -> None:
        with server.client() as c:
            i = worker
            while not stop.is_set():
                task = MIX[i % len(MIX)]
                i += 1
                r = c.post("/predict", params={"task": task}, content=body)
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code != 200 and not (task in CHURNED and r.status_code == 404):
                        failures.append(f"{task}: {r.status_code} {r.text[:300]}")

    def churn() -> None:
        with server.client() as c:
            archives = [c.get(f"/tasks/{n}/archive").content for n in STABLE[:3]]
            round_ = 0
            while not stop.is_set():
                first, second = archives[round_ % 3], archives[(round_ + 1) % 3]
                steps = [(f"import {n}", lambda n=n, a=a: c.post(
                    "/tasks", params={"name": n}, content=a))
                    for n, a in zip(CHURNED, (first, second), strict=True)]
                steps.append(("import again", lambda a=second: c.post(
                    "/tasks", params={"name": CHURNED[0], "activate": "false"}, content=a)))
                steps.append(("activate", lambda: c.post(f"/tasks/{CHURNED[0]}/activate",
                                                         params={"version": 2})))
                steps += [(f"delete {n}", lambda n=n: c.delete(f"/tasks/{n}")) for n in CHURNED]
                for step, call in steps:
                    r = call()
                    churned[f"{step.split()[0]} {r.status_code}"] += 1
                    if r.status_code >= 300:
                        with lock:
                            failures.append(f"{step}: {r.status_code} {r.text[:300]}")
                round_ += 1

    threads = [threading.Thread(target=predict, args=(i,)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=churn))
    try:
        for t in threads:
            t.start()
        time.sleep(SECONDS)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        server.stop()
    assert not failures, (statuses, churned, failures[:10])
    assert statuses[200] >= 50 and churned["delete 204"] >= 3, (statuses, churned)



def test_a_batch_that_no_longer_fits_runs_in_parts(tmp_path: Path) -> None:
    """The scheduler picks a batch that fits the chip as it sees it; by the time the batch
    runs, imports and deletes may have changed that. Here three tasks of 102 spare PEs
    each meet a chip of 206: every request is still answered."""
    model = load_backbone(None)
    store = TaskStore.for_model(tmp_path / "store", model)
    import_default_tasks(store)
    runtime = TaskRuntime(model, store, builtin={"imagenet": (imagenet_task(model), 64)})
    try:
        runtime.worker.submit(runtime.load_all).result()
        tasks = ["mnist", "fashion-mnist", "animal-mnist"]
        assert not runtime.fits(set(tasks)) and runtime.fits(set(tasks[:2]))
        x = torch.rand(3, 64, 64)
        items = [BatchItem(t, x, Fidelity.IDEAL, 2) for t in tasks * 2]
        results = runtime.worker.submit(runtime.infer_batch, items).result()
        assert all(isinstance(r, Prediction) for r in results), results
        assert [r.task for r in results if isinstance(r, Prediction)] == tasks * 2
    finally:
        runtime.close()
        store.close()
