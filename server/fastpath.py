"""``POST /predict`` without FastAPI's routing and dependency solving.

A profile of the server under load (docs/performance.md#request-path) puts a fifth of a
prediction's Python time, which it shares with the chip's thread through the GIL, in
FastAPI's per-request machinery: matching the route, solving dependencies, validating
query parameters. This ASGI middleware answers a prediction whose parameters are
plainly valid by calling the endpoint's own :func:`server.routers.predict.answer`; every
other request, and any prediction it is not sure of (unknown or repeated parameters, an
API key to check, a server still starting), goes to the app unchanged, so validation
and its error messages stay FastAPI's.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from core.config import Fidelity
from core.errors import Xma2Error
from server.errors import ApiError, error_response
from server.routers.predict import answer
from server.services import Services

PATH = "/predict"
_FIDELITIES = {f.value: f for f in Fidelity}
_MAX_TOP_K = 100


def plain_parameters(query: bytes) -> tuple[str, Fidelity | None, int | None] | None:
    """``task``, ``fidelity`` and ``top_k`` of a query string that holds nothing else,
    each once and valid as the endpoint declares them; None when FastAPI should judge."""
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True,
                          strict_parsing=True)
    except ValueError:
        return None
    params = dict(pairs)
    if len(params) != len(pairs) or not params.keys() <= {"task", "fidelity", "top_k"}:
        return None
    task = params.get("task", "")
    fidelity = params.get("fidelity")
    top_k = params.get("top_k")
    if not task or (fidelity is not None and fidelity not in _FIDELITIES):
        return None
    if top_k is not None and not (top_k.isascii() and top_k.isdigit()
                                  and 1 <= int(top_k) <= _MAX_TOP_K):
        return None
    return (task, _FIDELITIES[fidelity] if fidelity is not None else None,
            int(top_k) if top_k is not None else None)


class PredictFastPath:
    """Answers plainly valid ``POST /predict`` requests itself (see the module doc).

    Args:
        app: the rest of the application.
        services: the server's state once the lifespan has made it (None before).
        keyed: predictions need the API key (those go through the app's key check).
    """

    def __init__(self, app: ASGIApp, services: Callable[[], Services | None],
                 keyed: bool) -> None:
        self.app = app
        self.services = services
        self.keyed = keyed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST"
                or self.keyed):
            await self.app(scope, receive, send)
            return
        services = self.services()
        params = plain_parameters(scope["query_string"])
        runtime = services.runtime if services is not None else None
        if (params is None or services is None or runtime is None or services.error
                is not None or not services.ready.is_set()):
            await self.app(scope, receive, send)  # FastAPI validates or answers 503
            return
        request = Request(scope, receive)
        try:
            response = await answer(request, runtime, services, *params)
        except (ApiError, StarletteHTTPException, Xma2Error) as e:
            response = await error_response(request, e)
        await response(scope, receive, send)
