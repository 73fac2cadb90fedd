"""Liveness and readiness (ready once the backbone is programmed and tasks are loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.deps import STARTING_RETRY_AFTER_S, ServicesDep
from server.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(services: ServicesDep) -> Health:
    """Liveness: answers while the process runs; ``tasks`` counts what /readyz counts."""
    runtime = services.runtime
    ready = runtime is not None and services.ready.is_set()
    return Health(status="ok", tasks=len(runtime.served) if ready and runtime else 0)


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(services: ServicesDep) -> Health | JSONResponse:
    if services.error is not None:
        return JSONResponse(Health(status="failed", detail=services.error).model_dump(), 503)
    runtime = services.runtime
    if runtime is None or not services.ready.is_set():
        return JSONResponse(Health(status="starting",
                                   detail="programming the backbone").model_dump(), 503,
                            headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})
    return Health(status="ready", tasks=len(runtime.served))
