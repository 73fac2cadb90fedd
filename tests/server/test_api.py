"""Inference, task management, auth and bad input through a real server."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from server.shipped_tasks import SHIPPED
from tests.server.live import LiveServer, encode, photo

CAT_CLASSES = range(281, 286)  # ImageNet's five domestic cats


def predict(client: httpx.Client, task: str, body: bytes, **params: object) -> httpx.Response:
    return client.post("/predict", params={"task": task, **params}, content=body,
                       headers={"content-type": "image/png"})


def test_shipped_tasks_are_served(server: LiveServer) -> None:
    with server.client() as c:
        tasks = {t["name"]: t for t in c.get("/tasks", headers={
            "Authorization": f"Bearer {server.api_key}"}).json()["tasks"]}
    assert {"imagenet", *SHIPPED} <= set(tasks)
    for name in SHIPPED:
        assert tasks[name]["serving"] and tasks[name]["method"] == "xma2"
        assert tasks[name]["version"] == 1 and tasks[name]["accuracy"] > 0.7
    assert tasks["imagenet"]["builtin"] and tasks["imagenet"]["classes"] == 1000


def test_interleaved_predictions_on_several_tasks(server: LiveServer) -> None:
    cat = encode(photo("chelsea"))
    digit = encode(photo("camera")[::8, ::8])
    with server.client() as c, server.operator() as op:
        labels = {n: op.get(f"/tasks/{n}").json()["labels"] for n in ("imagenet", *SHIPPED)}
        first: dict[str, list[dict[str, object]]] = {}
        for round_ in range(2):
            for task in ("imagenet", "fashion-mnist", "mnist", "animal-mnist"):
                body = cat if task in ("imagenet", "animal-mnist") else digit
                r = predict(c, task, body, top_k=3)
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["task"] == task
                assert out["version"] == (None if task == "imagenet" else 1)
                assert len(out["predictions"]) == 3
                assert {p["label"] for p in out["predictions"]} <= set(labels[task])
                probs = [p["probability"] for p in out["predictions"]]
                assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
                energy = out["energy"]
                assert energy["total_j"] > energy["crossbar_read_j"] > 0 and energy["adc_j"] > 0
                if round_ == 0:
                    first[task] = out["predictions"]
                else:  # the same answer after switching through every other task
                    assert out["predictions"] == first[task]
    top = first["imagenet"][0]["label"]
    assert labels["imagenet"].index(top) in CAT_CLASSES, top


def test_body_forms_give_the_same_answer(server: LiveServer) -> None:
    png = encode(photo("coffee"))
    with server.client() as c:
        raw = predict(c, "imagenet", png).json()["predictions"]
        multipart = c.post("/predict", params={"task": "imagenet"},
                           files={"file": ("coffee.png", png, "image/png")}).json()
        as_json = c.post("/predict", params={"task": "imagenet"},
                         json={"image_base64": base64.b64encode(png).decode()}).json()
    assert multipart["predictions"] == raw and as_json["predictions"] == raw


def test_crossbar_fidelity_per_request(server: LiveServer) -> None:
    body = encode(photo("chelsea"))
    with server.client() as c:
        r = predict(c, "animal-mnist", body, fidelity="crossbar")
    assert r.status_code == 200, r.text
    assert r.json()["fidelity"] == "crossbar"


@pytest.mark.parametrize(("body", "params", "status", "words"), [
    (b"this is not an image", {"task": "imagenet"}, 415, "not an image"),
    (encode(photo("chelsea"), "JPEG")[:3000], {"task": "imagenet"}, 422, "truncated"),
    (encode(photo("camera")[::8, ::8], "JPEG")[:1000], {"task": "mnist"}, 422, "truncated"),
    (encode(np.zeros((2500, 2500), np.uint8)), {"task": "imagenet"}, 413, "pixels"),
    (b"\xff" * 2_100_000, {"task": "imagenet"}, 413, "exceeds"),
    (encode(photo("chelsea")), {"task": "no-such-task"}, 404, "unknown task"),
    (encode(photo("chelsea")), {"task": "imagenet", "fidelity": "quantum"}, 422, "fidelity"),
    (encode(photo("chelsea")), {"task": "imagenet", "top_k": 0}, 422, "top_k"),
    (b"", {"task": "imagenet"}, 422, "no image"),
])
def test_bad_input_is_refused_with_its_status(server: LiveServer, body: bytes,
                                              params: dict[str, object], status: int,
                                              words: str) -> None:
    with server.client() as c:
        r = c.post("/predict", params=params, content=body,
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]
        # nothing lost: the server still answers
        assert predict(c, "mnist", encode(photo("camera")[::4, ::4])).status_code == 200


def test_bad_json_bodies(server: LiveServer) -> None:
    with server.client() as c:
        for body in (b"{not json", json.dumps({"image": "x"}).encode(),
                     json.dumps({"image_base64": "!!!"}).encode()):
            r = c.post("/predict", params={"task": "imagenet"}, content=body,
                       headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text


def test_operator_endpoints_need_the_key(server: LiveServer) -> None:
    with server.client() as anonymous, server.client(key="wrong") as wrong, \
            server.operator() as op:
        for method, path in (("GET", "/tasks"), ("GET", "/tasks/mnist"),
                             ("POST", "/adaptations"), ("GET", "/adaptations"),
                             ("DELETE", "/tasks/mnist"), ("POST", "/tasks/mnist/activate")):
            assert anonymous.request(method, path).status_code == 401, path
            assert wrong.request(method, path).status_code == 403, path
        assert op.get("/tasks").status_code == 200
        assert op.get("/tasks/mnist").json()["versions"][0]["version"] == 1
        # predict is open by default, and health never needs a key
        assert predict(anonymous, "mnist", encode(photo("camera"))).status_code == 200
        assert anonymous.get("/readyz").json()["status"] == "ready"


def test_import_activate_delete(server: LiveServer) -> None:
    body = encode(photo("camera"))
    with server.operator() as op, server.client() as c:
        archive = op.get("/tasks/mnist/archive")
        assert archive.status_code == 200
        assert archive.headers["content-type"] == "application/x-tar"

        r = op.post("/tasks", params={"name": "digits-copy"}, content=archive.content,
                    headers={"content-type": "application/x-tar"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["serving"]
        original = predict(c, "mnist", body).json()["predictions"]
        assert predict(c, "digits-copy", body).json()["predictions"] == original

        r = op.post("/tasks", params={"name": "digits-copy", "activate": "false"},
                    files={"file": ("mnist.tar", archive.content, "application/x-tar")})
        assert r.status_code == 201, r.text
        detail = op.get("/tasks/digits-copy").json()
        assert [v["version"] for v in detail["versions"]] == [1, 2]
        assert detail["version"] == 1
        assert op.post("/tasks/digits-copy/activate", params={"version": 2}).json()[
            "version"] == 2
        assert predict(c, "digits-copy", body).json()["version"] == 2
        assert op.post("/tasks/digits-copy/activate",
                       params={"version": 9}).status_code == 404

        assert op.delete("/tasks/digits-copy", params={"version": 2}).status_code == 409
        assert op.delete("/tasks/digits-copy", params={"version": 1}).status_code == 204
        assert [v["version"] for v in op.get("/tasks/digits-copy").json()["versions"]] == [2]
        assert op.delete("/tasks/digits-copy").status_code == 204
        assert predict(c, "digits-copy", body).status_code == 404
        assert op.get("/tasks/digits-copy").status_code == 404
        assert op.delete("/tasks/digits-copy").status_code == 404
        # the source task is untouched
        assert predict(c, "mnist", body).json()["predictions"] == original


def test_bad_archives_and_names_are_refused(server: LiveServer) -> None:
    with server.operator() as op:
        archive = op.get("/tasks/mnist/archive").content
        tampered = bytearray(archive)
        tampered[len(tampered) // 2] ^= 0xFF
        before = op.get("/tasks").json()
        for body, params, status in (
            (b"not a tar file", {}, 422),
            (bytes(tampered), {"name": "tampered"}, 422),
            (archive, {"name": "imagenet"}, 409),
            (archive, {"name": "Bad Name!"}, 422),
        ):
            r = op.post("/tasks", params=params, content=body,
                        headers={"content-type": "application/x-tar"})
            assert r.status_code == status, (params, r.text)
        assert op.delete("/tasks/imagenet").status_code == 409
        assert op.get("/tasks").json() == before


def test_energy_and_metrics_follow_requests(server: LiveServer) -> None:
    body = encode(photo("camera"))
    with server.client() as c:
        before = c.get("/energy").json()["tasks"]["mnist"]
        for _ in range(3):
            assert predict(c, "mnist", body).status_code == 200
        after = c.get("/energy").json()["tasks"]["mnist"]
        metrics = c.get("/metrics").text
    assert after["requests"] == before["requests"] + 3
    assert after["inference_j"] > before["inference_j"]
    assert after["residency_loads"] >= 1 and after["cell_writes"] > 0
    for series in ("xma2_requests_total", "xma2_request_latency_seconds_bucket",
                   "xma2_inference_energy_joules_total", "xma2_reprogramming_energy_joules_total",
                   "xma2_task_loads_total", "xma2_task_load_latency_seconds_bucket",
                   "xma2_adaptation_jobs", "xma2_task_resident"):
        assert f'{series}' in metrics, series
    assert 'xma2_requests_total{status="ok",task="mnist"}' in metrics


def test_offline_docs(server: LiveServer) -> None:
    with server.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "cdn" not in page.text.lower()
        assert c.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
        spec = c.get("/openapi.json").json()
        assert "/predict" in spec["paths"] and "/adaptations/{job_id}/cancel" in spec["paths"]
