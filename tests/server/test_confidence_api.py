"""Calibrated probabilities and the OOD flag, through a real server on the shipped tasks."""

from __future__ import annotations

import io
import math

import httpx
import pytest
import torch
from PIL import Image

from core.backbones.preprocess import preprocess_fit
from core.backbones.shipped import load_backbone
from core.data.datasets import DatasetSpec, load_raw, split_indices
from core.engine import CrossbarEngine
from server.shipped_tasks import SHIPPED, SHIPPED_DIR
from task_store.archive import read_archive
from task_store.format import decode_task
from tests.server.live import LiveServer, encode, photo


def predict(client: httpx.Client, task: str, body: bytes, **params: object) -> dict:
    r = client.post("/predict", params={"task": task, **params}, content=body,
                    headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


def png(array: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")  # type: ignore[arg-type]
    return out.getvalue()


def test_the_readme_cat_is_flagged_out_of_distribution(server: LiveServer) -> None:
    cat = encode(photo("chelsea"))
    with server.client() as c:
        answer = predict(c, "animal-mnist", cat, top_k=3)
        imagenet = predict(c, "imagenet", cat)
    assert answer["ood"] is True and math.isfinite(answer["ood_score"])
    # the built-in ImageNet task has no threshold: nothing is flagged, T = 1
    assert imagenet["ood"] is False


def test_own_test_images_are_mostly_in_distribution(server: LiveServer) -> None:
    raw = load_raw("animal_mnist")
    test = split_indices(raw.labels, DatasetSpec("animal_mnist"), raw.test_start)["test"][:20]
    flagged = right = 0
    with server.client() as c:
        for i in test:
            answer = predict(c, "animal-mnist", png(raw.images[i]))
            flagged += answer["ood"]
            right += answer["predictions"][0]["label"] == raw.classes[raw.labels[i]]
    assert flagged <= 4 and right >= 15  # ~5% flagged and ~93% right by design


def test_task_description_carries_temperature_and_threshold(server: LiveServer) -> None:
    with server.operator() as op:
        for name in SHIPPED:
            detail = op.get(f"/tasks/{name}").json()
            manifest, _ = read_archive(SHIPPED_DIR / f"{name}.tar")
            assert manifest.confidence is not None
            assert detail["temperature"] == manifest.confidence.temperature
            assert detail["ood_threshold"] == manifest.confidence.ood_threshold
            assert detail["ood_score_kind"] == "logit_distance"
        builtin = op.get("/tasks/imagenet").json()
    assert builtin["temperature"] == 1.0 and builtin["ood_threshold"] is None


@pytest.mark.parametrize("task", ["fashion-mnist", "animal-mnist"])
def test_answers_are_the_tempered_softmax_of_the_served_logits(server: LiveServer,
                                                              task: str) -> None:
    manifest, data = read_archive(SHIPPED_DIR / f"{task}.tar")
    state = decode_task(data, manifest)
    temperature = state.confidence.temperature
    assert abs(temperature - 1) > 0.02  # else the check below could not tell
    spec = DatasetSpec(manifest.hyperparameters["dataset"])
    raw = load_raw(spec.name)
    candidates = split_indices(raw.labels, spec, raw.test_start)["test"][:32]
    engine = CrossbarEngine(load_backbone(None))
    engine.add_task(state)
    batch = torch.stack([preprocess_fit(Image.fromarray(raw.images[int(i)]), 64)
                         for i in candidates])
    all_logits = engine.forward(batch, task)
    # The least certain of them, where tempering visibly moves the probabilities.
    moved = ((all_logits / temperature).softmax(1) - all_logits.softmax(1)).abs().amax(1)
    pick = int(moved.argmax())
    index, logits = int(candidates[pick]), all_logits[pick]
    with server.client() as c:
        answer = predict(c, task, png(raw.images[index]), top_k=10)
    served = {p["label"]: p["probability"] for p in answer["predictions"]}
    expected = (logits / temperature).softmax(0)
    plain = logits.softmax(0)
    labels = manifest.labels
    assert served == pytest.approx({labels[i]: float(expected[i]) for i in range(10)},
                                   abs=1e-5)
    assert float((expected - plain).abs().max()) > 1e-3
    assert answer["predictions"][0]["label"] == labels[int(logits.argmax())]
    assert answer["ood_score"] == pytest.approx(float(state.confidence.scores(logits)),
                                                rel=1e-4, abs=1e-4)


def test_predict_schema_documents_the_new_fields(server: LiveServer) -> None:
    with server.client() as c:
        schema = c.get("/openapi.json").json()["components"]["schemas"]
    fields = schema["PredictResponse"]["properties"]
    assert {"ood", "ood_score"} <= set(schema["PredictResponse"]["required"])
    assert "95%" in fields["ood"]["description"]
    detail = schema["TaskDetail"]["properties"]
    assert {"temperature", "ood_threshold", "ood_score_kind"} <= set(detail)
