"""One HTTP status per error kind, so bad input never surfaces as a 500."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    """An error with its HTTP status and a message that says what to do."""

    def __init__(self, status_code: int, message: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes (Ray Serve)
        return (_api_error, (self.status_code, self.message, self.headers))


def _api_error(status_code: int, message: str, headers: dict[str, str] | None) -> ApiError:
    return ApiError(status_code, message, headers=headers)


# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
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


async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(_body(error.status_code, error.message), error.status_code,
                        headers=error.headers)


async def _xma2_error(_request: Request, error: Xma2Error) -> JSONResponse:
    status = status_of(error)
    if status >= 500:
        logger.exception("unexpected error", exc_info=error)
    return JSONResponse(_body(status, str(error)), status)


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
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(Xma2Error, _xma2_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return JSONResponse(_body(422, "; ".join(problems) or "invalid request"), 422)
