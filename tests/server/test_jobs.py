"""Adaptation jobs through a real server: success, bad parameters, cancel."""

from __future__ import annotations

import httpx

from tests.server.live import LiveServer, encode, photo, photo_dataset, wait_for, wait_job

PHOTOS = {"cat": "chelsea", "coffee": "coffee", "astronaut": "astronaut"}


def _submit(op: httpx.Client, **body: object) -> dict[str, object]:
    r = op.post("/adaptations", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"
    return r.json()


def test_job_makes_a_servable_task_and_a_new_version_changes_predictions(
        server: LiveServer) -> None:
    photo_dataset(server.data_root / "photos", PHOTOS, per_class=16)
    renamed = {"kitten": "chelsea", "mug": "coffee", "person": "astronaut"}
    photo_dataset(server.data_root / "renamed", renamed, per_class=16, seed=1)
    cat = encode(photo("chelsea"))
    with server.operator() as op, server.client() as c:
        assert c.post("/predict", params={"task": "photos"}, content=cat).status_code == 404
        job = _submit(op, task="photos", dataset_path="photos", epochs=2, batch_size=8)
        done = wait_job(op, str(job["id"]))
        assert done["status"] == "succeeded", done
        assert done["result"]["task"] == "photos" and done["result"]["version"] == 1
        assert done["progress"]["fraction"] == 1.0
        events = op.get(f"/adaptations/{job['id']}/events").json()["data"]
        messages = [e["message"] for e in events]
        assert messages[0].startswith("queued") and "registered photos version 1" in messages[-1]
        # the shipped chip is lossy: a job trains with it in the loop unless told not to
        assert done["params"]["chip_in_loop"] is True
        assert any("chip in the loop" in m for m in messages)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        page = op.get(f"/adaptations/{job['id']}/events", params={"after": 2, "limit": 1}).json()
        assert [e["seq"] for e in page["data"]] == [3] and page["has_more"]

        # servable without a restart
        first = wait_for(lambda: (r := c.post("/predict", params={"task": "photos"},
                                              content=cat)).status_code == 200 and r.json(),
                         timeout=30, what="the new task to be served")
        assert first["version"] == 1 and first["predictions"][0]["label"] == "cat"
        detail = op.get("/tasks/photos").json()
        assert detail["method"] == "xma2" and detail["replaced_pes"] > 0
        assert detail["hyperparameters"]["job"] == job["id"]

        job2 = _submit(op, task="photos", dataset_path="renamed", epochs=2, batch_size=8,
                       seed=1, chip_in_loop=False)
        done2 = wait_job(op, str(job2["id"]))
        assert done2["status"] == "succeeded" and done2["params"]["chip_in_loop"] is False
        events2 = op.get(f"/adaptations/{job2['id']}/events").json()["data"]
        assert not any("chip in the loop" in e["message"] for e in events2)
        second = wait_for(lambda: (r := c.post("/predict", params={"task": "photos"},
                                               content=cat)).json()["version"] == 2 and r.json(),
                          timeout=30, what="version 2 to be served")
        assert second["predictions"][0]["label"] == "kitten"
        listed = op.get("/adaptations", params={"limit": 1}).json()
        assert listed["data"][0]["id"] == job2["id"] and listed["has_more"]


def test_bad_job_parameters_are_refused_before_queueing(server: LiveServer) -> None:
    (server.data_root / "empty").mkdir(exist_ok=True)
    with server.operator() as op:
        before = op.get("/adaptations", params={"limit": 100}).json()["data"]
        cases = [
            ({"task": "x", "dataset": "mnist5k", "method": "nope"}, 422, "unknown method"),
            ({"task": "x", "dataset": "mnist5k", "method": "finetune_fp32"}, 422, "fp32"),
            ({"task": "x", "dataset": "mnist5k", "pe_fraction": 1.5}, 422, "pe_fraction"),
            ({"task": "x", "dataset": "mnist5k", "method": "xma", "pe_fraction": 0.1}, 422,
             "only applies to xma2"),
            ({"task": "x", "dataset": "mnist5k", "shift_levels": 5}, 422, "shift levels"),
            ({"task": "x", "dataset": "mnist5k", "epochs": 0}, 422, "epochs"),
            ({"task": "x", "dataset": "cifar"}, 422, "unknown dataset"),
            ({"task": "x"}, 422, "exactly one"),
            ({"task": "x", "dataset": "mnist5k", "dataset_path": "photos"}, 422, "exactly one"),
            ({"task": "x", "dataset_path": "/etc"}, 403, "outside the data root"),
            ({"task": "x", "dataset_path": "../../"}, 403, "outside the data root"),
            ({"task": "x", "dataset_path": "missing"}, 422, "not a folder"),
            ({"task": "imagenet", "dataset": "mnist5k"}, 409, "built-in"),
            ({"task": "Not A Name", "dataset": "mnist5k"}, 422, "task"),
            ({"task": "x", "dataset": "mnist5k", "learning_rate": 1}, 422, "learning_rate"),
        ]
        for body, status, words in cases:
            r = op.post("/adaptations", json=body)
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
        assert op.get("/adaptations", params={"limit": 100}).json()["data"] == before
        assert op.get("/adaptations/job-nope").status_code == 404
        assert op.post("/adaptations/job-nope/cancel").status_code == 404


def test_cancel_a_running_and_a_queued_job(server: LiveServer) -> None:
    photo_dataset(server.data_root / "long", PHOTOS, per_class=40, seed=2)
    with server.operator() as op, server.client() as c:
        running = _submit(op, task="long-run", dataset_path="long", epochs=100, batch_size=4)
        queued = _submit(op, task="long-run-2", dataset_path="long", epochs=1)
        wait_for(lambda: (op.get(f"/adaptations/{running['id']}").json()["progress"] or {})
                 .get("step", 0) >= 2, timeout=180, what="the job to take steps")
        # inference keeps answering while the job trains
        assert c.post("/predict", params={"task": "mnist"},
                      content=encode(photo("camera"))).status_code == 200

        r = op.post(f"/adaptations/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = op.post(f"/adaptations/{running['id']}/cancel")
        assert r.status_code == 200, r.text
        done = wait_job(op, str(running["id"]), timeout=60)
        assert done["status"] == "cancelled", done
        assert done["progress"]["step"] < done["progress"]["total_steps"]
        messages = [e["message"] for e in
                    op.get(f"/adaptations/{running['id']}/events").json()["data"]]
        assert any("cancel requested" in m for m in messages)
        # jobs never resume: the last word does not point at a checkpoint, which is gone
        assert "resume from" not in messages[-1] and "submit it again" in messages[-1]
        assert not (server.store / "job_checkpoints" / str(running["id"])).exists()
        assert op.post(f"/adaptations/{running['id']}/cancel").status_code == 409
        # nothing was registered, and the queued job never ran
        assert op.get("/tasks/long-run").status_code == 404
        assert op.get(f"/adaptations/{queued['id']}").json()["status"] == "cancelled"
        cancelled = op.get("/adaptations", params={"status": "cancelled"}).json()["data"]
        assert {j["id"] for j in cancelled} >= {running["id"], queued["id"]}
