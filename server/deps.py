"""Dependencies shared by the routers: the server's state and API-key checks.

They are ``async def`` because none of them blocks: FastAPI runs a plain ``def``
dependency on a worker thread, a round trip through the thread pool per dependency and
request that costs more than the dependency itself."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError
from server.jobs import JobManager
from server.runtime import TaskRuntime
from server.services import Services

STARTING_RETRY_AFTER_S = 5
_bearer = HTTPBearer(auto_error=False, description="the operator API key")


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_runtime(services: Annotated[Services, Depends(get_services)]) -> TaskRuntime:
    if services.error is not None:
        raise ApiError(503, f"the server failed to start: {services.error}")
    if services.runtime is None or not services.ready.is_set():
        raise ApiError(503, "starting: the backbone is being programmed; retry shortly",
                       headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})
    return services.runtime


async def get_jobs(services: Annotated[Services, Depends(get_services)],
             _runtime: Annotated[TaskRuntime, Depends(get_runtime)]) -> JobManager:
    assert services.jobs is not None
    return services.jobs


def _check_key(services: Services, credentials: HTTPAuthorizationCredentials | None) -> None:
    key = services.settings.api_key
    if key is None:
        return
    if credentials is None:
        raise ApiError(401, "this endpoint needs the API key: send 'Authorization: Bearer "
                            "<key>'", headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(),
                                  key.get_secret_value().encode()):
        raise ApiError(403, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})


async def require_operator(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    _check_key(services, credentials)


Runtime = Annotated[TaskRuntime, Depends(get_runtime)]
Jobs = Annotated[JobManager, Depends(get_jobs)]
ServicesDep = Annotated[Services, Depends(get_services)]
