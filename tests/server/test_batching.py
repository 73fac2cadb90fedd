"""Dynamic batching through a real server: mixed-task batches and backpressure."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.live import LiveServer, encode, photo

TASKS = ("mnist", "fashion-mnist", "animal-mnist")


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("batching"), max_queue=6, max_batch_size=8,
                      max_queue_delay_ms=200)
    live.start()
    try:
        yield live
    finally:
        live.stop()


async def _burst(url: str, requests: list[tuple[str, bytes]],
                 fidelity: str = "ideal") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*[
            client.post("/predict", params={"task": task, "fidelity": fidelity}, content=body)
            for task, body in requests])


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text,
                                            re.MULTILINE))


@pytest.mark.parametrize("fidelity", ["ideal", "crossbar"])
def test_mixed_task_batch_answers_like_single_requests(batching_server: LiveServer,
                                                       fidelity: str) -> None:
    images = [encode(photo(name)) for name in ("camera", "chelsea", "coffee")]
    requests = [(TASKS[i % 3], images[i % 2 + (i % 3 == 2)]) for i in range(6)]
    with batching_server.client() as c:
        before = c.get("/metrics").text
        alone = [c.post("/predict", params={"task": t, "fidelity": fidelity}, content=b).json()
                 for t, b in requests]
        middle = c.get("/metrics").text
    together = [r.json() for r in asyncio.run(_burst(batching_server.url, requests,
                                                      fidelity))]
    with batching_server.client() as c:
        after = c.get("/metrics").text
    # the burst ran in fewer batches than requests, so some batch mixed tasks
    batches = _metric(after, "xma2_batch_size_count") - _metric(middle, "xma2_batch_size_count")
    assert _metric(middle, "xma2_batch_size_count") - _metric(before, "xma2_batch_size_count") \
        == len(requests)
    assert batches < len(requests)
    for single, mixed, (task, _) in zip(alone, together, requests, strict=True):
        assert mixed["task"] == task and mixed["fidelity"] == fidelity
        assert [p["label"] for p in mixed["predictions"]] == \
            [p["label"] for p in single["predictions"]]
        for a, b in zip(single["predictions"], mixed["predictions"], strict=True):
            assert b["probability"] == pytest.approx(a["probability"], rel=1e-4, abs=1e-5)


def test_full_queue_answers_429_with_retry_after_and_recovers(batching_server: LiveServer,
                                                              tmp_path: Path) -> None:
    body = encode(photo("camera"))
    responses = asyncio.run(_burst(batching_server.url,
                                   [(TASKS[i % 3], body) for i in range(40)]))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}
    assert codes.count(429) > 0 and codes.count(200) >= 6
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["error"]["message"]
    with batching_server.client() as c:
        for task in TASKS:  # recovered: the queue drained and requests are served again
            assert c.post("/predict", params={"task": task}, content=body).status_code == 200
        metrics = c.get("/metrics").text
    assert _metric(metrics, 'xma2_rejected_requests_total{reason="queue_full"}') \
        == codes.count(429)
    assert _metric(metrics, "xma2_queue_depth") == 0
