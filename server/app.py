"""The FastAPI application: routers, error handlers, body limit, offline docs, lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.deps import require_operator
from server.errors import install_error_handlers
from server.routers import adaptations, energy, health, predict, tasks
from server.services import Services
from server.settings import Settings

logger = logging.getLogger(__name__)

SWAGGER_STATIC = "/static/swagger"


class BodyLimit:
    """Answers 413 before reading a body larger than ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)

    def _message(self) -> str:
        return (f"request body exceeds {self.max_bytes:,} bytes; send a smaller file or "
                "raise XMA2_MAX_BODY_BYTES")

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse({"error": {"status": 413, "message": self._message()}}, 413)
        await response({"type": "http"}, _no_body, send)


class _BodyTooLarge(HTTPException):
    """Raised while a handler reads the body, so its 413 is what the handler reports (and
    what the request metrics count); FastAPI passes HTTPExceptions through its body parser."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        app.state.services = services
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(None, services.start)

        async def finish_start() -> None:
            await loading
            services.start_batching()

        starting = loop.create_task(finish_start())
        try:
            yield
        finally:
            await starting
            if services.batcher is not None:
                await services.batcher.stop()
            await loop.run_in_executor(None, services.stop)

    app = FastAPI(
        title="xma2", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Multi-task inference on an emulated ReRAM crossbar accelerator: one "
                    "frozen 4-bit backbone, per-task XMA2 masks and spare PEs.")
    install_error_handlers(app)
    # Key checks are added only where a key is asked for, so the OpenAPI document declares
    # security exactly on the operations that enforce it.
    keyed = [Depends(require_operator)] if settings.api_key is not None else []
    app.include_router(predict.router, dependencies=keyed if settings.predict_requires_key
                       else [])
    for router in (tasks.router, adaptations.router):
        app.include_router(router, dependencies=keyed)
    for router in (energy.router, health.router):
        app.include_router(router)
    _offline_docs(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # outermost: first
    return app


def _offline_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package, so /docs needs no CDN."""
    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - a dependency; /docs is simply absent without it
        logger.warning("swagger-ui-bundle is not installed: /docs is disabled")
        return
    app.mount(SWAGGER_STATIC, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title="xma2 API",
            swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
            # no badge that posts the API document to an external validator
            swagger_ui_parameters={"validatorUrl": None})


def app_factory() -> Any:
    """``uvicorn --factory server.app:app_factory``: settings from the environment (host,
    port and keep-alive are then uvicorn's own flags: ``--timeout-keep-alive``)."""
    return create_app()
