"""The server's errors, and their HTTP answers in one place.

The batcher, the chip runtime and the job manager raise the domain errors below
(:class:`QueueFull`, :class:`ShuttingDown`, :class:`ChipFailure`, :class:`JobNotFound`,
:class:`JobConflict`); ``core`` and ``task_store`` raise theirs. :func:`http_answer`
alone turns any of them into a status, message and headers, so bad input never surfaces
as a 500 and a client sees one answer whichever deployment (FastAPI or Ray) served it.
Only the HTTP layer raises :class:`ApiError`, which already is an answer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ConfigError, ResourceUnavailable, TaskNotFound, TaskStateError, Xma2Error
from core.lru import CapacityError
from task_store.errors import (
    ChecksumMismatch,
    FingerprintMismatch,
    FormatError,
    StoreError,
    TaskInUse,
)

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP refusal raised by the HTTP layer itself (routers, dependencies, request
    decoding), with its status and a message that says what to do."""

    def __init__(self, status_code: int, message: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes (Ray Serve)
        return (_rebuild_api_error, (self.status_code, self.message, self.headers))


def _rebuild_api_error(status_code: int, message: str,
                       headers: dict[str, str] | None) -> ApiError:
    return ApiError(status_code, message, headers=headers)


# -- the serving layer's own errors (no HTTP in them; http_answer maps them) -------------


class ServerError(Xma2Error):
    """Base of the errors of the batcher, the chip runtime and the job manager."""

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable across processes (Ray) whatever a subclass's constructor takes.
        return (_rebuild_server_error, (type(self), str(self), dict(self.__dict__)))


def _rebuild_server_error(kind: type[ServerError], message: str,
                          state: dict[str, object]) -> ServerError:
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class QueueFull(ServerError):
    """The request queue holds its limit: the client should retry later.

    Args:
        waiting: requests in the queue (its limit).
        retry_after_s: seconds until it has likely drained; None if unknown.
    """

    def __init__(self, waiting: int, retry_after_s: int | None = None) -> None:
        when = ("retry after the Retry-After seconds" if retry_after_s is not None
                else "retry shortly")
        super().__init__(f"the request queue is full ({waiting} waiting); {when}")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class ShuttingDown(ServerError):
    """The server stopped before it could answer a queued request."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class ChipFailure(ServerError):
    """A task's part of a batch failed on the chip (the other tasks were answered).

    Args:
        task: the task whose requests get this error.
        cause: what failed; its traceback goes to the server log, its type to the client
            (kept by name only: the error waits in request futures, the frames need not).
    """

    def __init__(self, task: str, cause: BaseException) -> None:
        self.task = task
        self.cause_type = type(cause).__name__
        super().__init__(f"task {task!r} failed on the chip ({self.cause_type}); the "
                         "server log has the details. Other tasks are not affected")


class JobNotFound(ServerError, LookupError):
    """No adaptation job has this id."""


class JobConflict(ServerError):
    """The job's state does not allow the request (cancelling a job that already ended).

    Args:
        job_id: the job.
        status: its state now.
    """

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} is already {status}")
        self.job_id = job_id
        self.status = status


# -- the one mapping to HTTP ---------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    """What a client receives for an error: status, message and headers."""

    status: int
    message: str
    headers: dict[str, str] | None = None


# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (QueueFull, 429),
    (ShuttingDown, 503),
    (ChipFailure, 500),
    (JobNotFound, 404),
    (JobConflict, 409),
    (TaskNotFound, 404),
    (TaskInUse, 409),
    (FingerprintMismatch, 409),
    (CapacityError, 409),
    (ChecksumMismatch, 422),
    (FormatError, 422),
    (TaskStateError, 422),
    (ConfigError, 422),
    (ResourceUnavailable, 422),
    (StoreError, 503),  # the store is busy (write lock) or damaged: not the client's fault
)


def http_answer(error: BaseException) -> HttpAnswer:
    """The answer to a client for ``error``; every error kind maps here and nowhere else
    (the FastAPI handlers and the Ray chip replicas both ask)."""
    if isinstance(error, ApiError):
        return HttpAnswer(error.status_code, error.message, error.headers)
    if isinstance(error, QueueFull) and error.retry_after_s is not None:
        return HttpAnswer(429, str(error), {"Retry-After": str(error.retry_after_s)})
    return HttpAnswer(status_of(error), str(error))


@contextmanager
def recorded_outcome(record: Callable[[str, float], None]) -> Iterator[None]:
    """Calls ``record(status, seconds)`` once the block ends: "ok", or the HTTP status
    its error maps to (the error still propagates)."""
    started = time.perf_counter()
    status = "ok"
    try:
        yield
    except Exception as e:
        status = str(status_of(e))
        raise
    finally:
        record(status, time.perf_counter() - started)


def status_of(error: BaseException) -> int:
    if isinstance(error, ApiError | StarletteHTTPException):
        return error.status_code
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 400 if isinstance(error, Xma2Error) else 500


def _body(status: int, message: str) -> dict[str, object]:
    return {"error": {"status": status, "message": message}}


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods the API document lists for this path (Starlette names only the first
    matching route's, so ``Allow`` would omit the others)."""
    path = request.url.path
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^}]+\})", template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


async def _known_error(_request: Request, error: Exception) -> JSONResponse:
    answer = http_answer(error)
    if answer.status >= 500 and not isinstance(error, ApiError | ServerError):
        # (ChipFailure is logged where it happens; ApiError is a deliberate answer)
        logger.exception("unexpected error", exc_info=error)
    return JSONResponse(_body(answer.status, answer.message), answer.status,
                        headers=answer.headers)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Starlette's own refusals (unknown path, wrong method, unparsable body) get the
    # same error shape as ours.
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == 404 and message == "Not Found":
        message = "no such endpoint; the API is described at /openapi.json and /docs"
    elif error.status_code == 405:
        allowed = _allowed_methods(request.app, request) or sorted(
            m.strip() for m in headers.get("Allow", "").split(",") if m.strip())
        message = (f"{request.method} is not allowed here; use "
                   f"{' or '.join(allowed) or 'another path'}")
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return JSONResponse(_body(error.status_code, message), error.status_code,
                        headers=headers or None)


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=error)
    return JSONResponse(_body(500, "internal error; the server log has the details"), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the way :func:`http_answer` says, in the ``{"error": ...}`` shape."""
    app.add_exception_handler(ApiError, _known_error)
    app.add_exception_handler(Xma2Error, _known_error)  # ServerError and the store's too
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return JSONResponse(_body(422, "; ".join(problems) or "invalid request"), 422)
