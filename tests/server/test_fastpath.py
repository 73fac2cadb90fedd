"""The lean ``POST /predict`` path answers exactly as the FastAPI endpoint does."""

from __future__ import annotations

from typing import Any

import pytest

from core.config import Fidelity
from server.fastpath import plain_parameters
from tests.server.live import LiveServer, encode, photo


@pytest.mark.parametrize(("query", "expected"), [
    (b"task=mnist", ("mnist", None, None)),
    (b"task=fashion-mnist&fidelity=crossbar&top_k=3", ("fashion-mnist", Fidelity.CROSSBAR, 3)),
    (b"top_k=100&task=a%20b", ("a b", None, 100)),
    # everything else is FastAPI's to validate (and to word the error of)
    (b"", None), (b"task=", None), (b"task=a&task=b", None), (b"task=a&extra=1", None),
    (b"task=a&fidelity=IDEAL", None), (b"task=a&top_k=0", None), (b"task=a&top_k=101", None),
    (b"task=a&top_k=-1", None), (b"task=a&top_k=%EF%BC%95", None), (b"task=a&top_k", None),
    (b"task=a&&top_k=2", None),
])
def test_only_plainly_valid_parameters_take_the_lean_path(
        query: bytes, expected: tuple[str, Fidelity | None, int | None] | None) -> None:
    assert plain_parameters(query) == expected


def _without_timings(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ("load_ms", "compute_ms")}


def test_lean_and_fastapi_paths_give_the_same_answers(server: LiveServer) -> None:
    digit = encode(photo("camera")[::8, ::8])  # small: decoded on the event loop
    cat = encode(photo("chelsea"), "JPEG")  # larger: decoded on a worker thread
    with server.client() as c:
        for task, body in (("mnist", digit), ("imagenet", cat), ("animal-mnist", cat)):
            params = {"task": task, "top_k": 4}
            c.post("/predict", params=params, content=body)  # resident for both below
            lean = c.post("/predict", params=params, content=body)
            # an unknown parameter sends the request through FastAPI (which ignores it)
            full = c.post("/predict", params={**params, "via": "fastapi"}, content=body)
            assert lean.status_code == full.status_code == 200, (lean.text, full.text)
            assert lean.headers["content-type"] == full.headers["content-type"]
            assert _without_timings(lean.json()) == _without_timings(full.json())
            assert len(lean.json()["predictions"]) == 4
        for params, body, status in (({"task": "no-such-task"}, digit, 404),
                                     ({"task": "mnist"}, b"not an image", 415),
                                     ({"task": "mnist"}, b"", 422)):
            lean = c.post("/predict", params=params, content=body)
            full = c.post("/predict", params={**params, "via": "fastapi"}, content=body)
            assert lean.status_code == full.status_code == status
            assert lean.json() == full.json()
        metrics = c.get("/metrics").text
    assert 'xma2_requests_total{status="404",task="unknown"}' in metrics
