"""Every error's HTTP answer comes from one mapping: the FastAPI handlers answer with it,
the Ray chip replicas send it to their gateway, and the request metrics count by it.
Exercised in-process over ASGI (no uvicorn); the expected bytes are what clients got when
the batcher, the runtime and the job manager raised HTTP errors themselves."""

from __future__ import annotations

import asyncio
import pickle

import httpx
import pytest
from fastapi import FastAPI

from core.errors import TaskNotFound, TaskStateError
from server.errors import (
    ApiError,
    ChipFailure,
    JobConflict,
    JobNotFound,
    QueueFull,
    ShuttingDown,
    http_answer,
    install_error_handlers,
    recorded_outcome,
    status_of,
)
from task_store import StoreError

CASES: list[tuple[Exception, int, str, dict[str, str]]] = [
    (QueueFull(256, retry_after_s=3), 429,
     "the request queue is full (256 waiting); retry after the Retry-After seconds",
     {"retry-after": "3"}),
    (QueueFull(8), 429, "the request queue is full (8 waiting); retry shortly", {}),
    (ShuttingDown(), 503, "the server is shutting down", {}),
    (ChipFailure("digits", RuntimeError("boom")), 500,
     "task 'digits' failed on the chip (RuntimeError); the server log has the details. "
     "Other tasks are not affected", {}),
    (JobNotFound("no job 'job-x'; list jobs to see the known ids"), 404,
     "no job 'job-x'; list jobs to see the known ids", {}),
    (JobConflict("job-x", "succeeded"), 409, "job job-x is already succeeded", {}),
    (TaskNotFound("unknown task 'x'; served tasks: imagenet"), 404,
     "unknown task 'x'; served tasks: imagenet", {}),
    (TaskStateError("bad head"), 422, "bad head", {}),
    (StoreError("the store is locked"), 503, "the store is locked", {}),
    (ApiError(401, "needs the key", headers={"WWW-Authenticate": "Bearer"}), 401,
     "needs the key", {"www-authenticate": "Bearer"}),
]


def _app() -> FastAPI:
    """An app whose ``/raise/{i}`` raises ``CASES[i]``, and ``/gateway/{i}`` re-raises its
    answer the way the Ray gateway does with a chip's reply."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{i}")
    async def raise_case(i: int) -> None:
        raise CASES[i][0]

    @app.get("/gateway/{i}")
    async def relay_case(i: int) -> None:
        answer = http_answer(CASES[i][0])
        raise ApiError(answer.status, answer.message, headers=answer.headers)

    @app.get("/bug")
    async def bug() -> None:
        raise ZeroDivisionError("a bug")

    return app


def _get(paths: list[str]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(p) for p in paths]

    return asyncio.run(run())


def _expected_body(status: int, message: str) -> bytes:
    return httpx.Response(200, json={"error": {"status": status, "message": message}}).content


def test_each_error_gets_its_status_message_and_headers() -> None:
    responses = _get([f"/raise/{i}" for i in range(len(CASES))])
    for (error, status, message, headers), r in zip(CASES, responses, strict=True):
        assert r.status_code == status, (error, r.text)
        assert r.json() == {"error": {"status": status, "message": message}}
        assert r.content == _expected_body(status, message)
        for name, value in headers.items():
            assert r.headers[name] == value
        if not headers:
            assert "retry-after" not in r.headers and "www-authenticate" not in r.headers
        assert status_of(error) == status  # what the request metrics count it as


def test_a_replicas_relayed_answer_is_byte_identical() -> None:
    direct = _get([f"/raise/{i}" for i in range(len(CASES))])
    relayed = _get([f"/gateway/{i}" for i in range(len(CASES))])
    for a, b in zip(direct, relayed, strict=True):
        assert (a.status_code, a.content) == (b.status_code, b.content)
        assert {k: v for k, v in a.headers.items() if k != "content-length"} == \
            {k: v for k, v in b.headers.items() if k != "content-length"}


def test_an_unexpected_error_says_only_internal_error() -> None:
    (r,) = _get(["/bug"])
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "internal error; the server log has the details"
    assert "a bug" not in r.text


def test_recorded_outcome_counts_the_mapped_status() -> None:
    seen: list[str] = []
    for error in (QueueFull(1, 1), JobConflict("j", "failed")):
        with pytest.raises(type(error)), recorded_outcome(lambda s, _: seen.append(s)):
            raise error
    with recorded_outcome(lambda s, _: seen.append(s)):
        pass
    assert seen == ["429", "409", "ok"]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_errors_survive_pickling(case: int) -> None:
    """Ray moves errors between processes by pickle: each comes back with its type, its
    fields and so its answer, whatever its constructor takes."""
    error = CASES[case][0]
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)
    assert http_answer(copy) == http_answer(error)
