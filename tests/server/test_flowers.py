"""``/predict?task=flowers``: a Flowers-102 tree in its published layout, adapted through
the HTTP API of a real server and served with the preprocessing it was trained with."""

from __future__ import annotations

import re

import httpx

from tests.layouts import (
    cub200_tree,
    flowers102_tree,
    split_folders_tree,
    stanford_cars_tree,
)
from tests.server.live import LiveServer, encode, photo, wait_for, wait_job


def _submit(op: httpx.Client, **body: object) -> dict[str, object]:
    r = op.post("/adaptations", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_flowers_job_by_layout_name_then_predict_task_flowers(server: LiveServer) -> None:
    root = server.data_root
    flowers102_tree(root / "flowers", per_split=(8, 2, 4))
    layouts = {"cub200": cub200_tree(root / "cub").parent,
               "cub200_cropped": root / "cub",
               "stanford_cars": stanford_cars_tree(root / "cars"),
               "stanford_cars_cropped": root / "cars",
               "split_folders": split_folders_tree(root / "sketch")}
    cat = photo("chelsea")[40:260, 60:340]  # the class "pink primrose" was cut from it
    with server.operator() as op, server.client() as c:
        job = _submit(op, task="flowers", dataset="flowers102", dataset_path="flowers",
                      image_size=64, epochs=2, batch_size=8, seed=0)
        # every layout is accepted by name (queued behind the first job, then cancelled);
        # a published layout defaults to 224 px at piggyback's batch of 32
        for layout, path in layouts.items():
            queued = _submit(op, task=f"t-{layout.replace('_', '-')}", dataset=layout,
                             dataset_path=str(path.relative_to(root)))
            assert queued["params"]["image_size"] == 224, queued
            assert queued["params"]["batch_size"] == 32
            assert op.post(f"/adaptations/{queued['id']}/cancel").json()["status"] == \
                "cancelled"

        done = wait_job(op, str(job["id"]))
        assert done["status"] == "succeeded", done
        progress = done["progress"]
        assert progress["fraction"] == 1.0 and progress["images_per_second"] > 0
        assert progress["eta_s"] == 0
        messages = [e["message"] for e in
                    op.get(f"/adaptations/{job['id']}/events").json()["data"]]
        assert any(m.startswith("dataset flowers102:") and "'train': 24, 'val': 6, "
                   "'test': 12" in m for m in messages), messages
        assert any(re.search(r"step 6/6 .* [\d.]+ images/s, training ETA 0s", m)
                   for m in messages), messages

        answer = wait_for(lambda: (r := c.post("/predict", params={"task": "flowers"},
                                               content=encode(cat, "JPEG"))).status_code == 200
                          and r.json(), timeout=30, what="task flowers to be served")
        assert answer["task"] == "flowers" and answer["version"] == 1
        assert answer["predictions"][0]["label"] == "pink primrose", answer
        assert answer["energy"]["reprogramming_j"] > 0  # its spare PEs were written
        detail = op.get("/tasks/flowers").json()
        hyper = detail["hyperparameters"]
        assert hyper["preprocess"] == "imagenet" and hyper["image_size"] == 64
        assert hyper["augmentation"] == {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                                         "flip": True}
        assert detail["labels"] == ["pink primrose", "hard-leaved pocket orchid",
                                    "canterbury bells"]

        energy = op.get("/energy").json()["tasks"]["flowers"]
        assert energy["reprogramming_j"] > 0 and energy["cell_writes"] > 0
        metrics = c.get("/metrics").text
        assert re.search(r'xma2_reprogramming_energy_joules_total\{task="flowers"\} [1-9]',
                         metrics), "the dashboard's reprogramming panel has no flowers series"


def test_a_bad_layout_is_refused_at_submission(server: LiveServer) -> None:
    root = server.data_root
    broken = flowers102_tree(root / "flowers-broken", per_split=(1, 1, 1))
    (broken / "setid.mat").unlink()
    escaping = flowers102_tree(root / "flowers-link", per_split=(1, 1, 1))
    outside = server.root / "outside.jpg"
    (escaping / "jpg" / "image_00002.jpg").rename(outside)
    (escaping / "jpg" / "image_00002.jpg").symlink_to(outside)
    with server.operator() as op:
        before = op.get("/adaptations", params={"limit": 100}).json()["data"]
        for body, status, words in [
            ({"dataset": "flowers102"}, 422, "give dataset_path"),
            ({"dataset": "flowers102", "dataset_path": "flowers-broken"}, 422,
             "setid.mat (trnid, valid and tstid: the official split) is missing"),
            ({"dataset": "flowers102", "dataset_path": "flowers-link"}, 403,
             "jpg/image_00002.jpg resolves to"),
            ({"dataset": "cub200", "dataset_path": "flowers-broken"}, 422, "images/"),
            ({"dataset": "flowers102", "dataset_path": "/etc"}, 403, "outside the data root"),
            ({"dataset": "flowers102", "dataset_path": "nowhere"}, 422,
             "the folder flowers102 was unpacked to"),
        ]:
            r = op.post("/adaptations", json={"task": "x", **body})
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
        assert op.get("/adaptations", params={"limit": 100}).json()["data"] == before
