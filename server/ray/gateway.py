"""The HTTP ingress of the Ray Serve application: ``POST /predict`` forwarded to a chip.

It accepts a request exactly as ``xma2 serve`` does, checks the task against the store's
index and forwards the image bytes. A stored task's name is Serve's multiplexed model id,
so Serve routes it to a replica that already holds the task; the built-in task lives on
every replica and is balanced freely.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray.serve import metrics as ray_metrics
from ray.serve.handle import DeploymentHandle

from core.chip.config import Fidelity
from core.errors import TaskNotFound
from server.app import BodyLimit
from server.errors import ApiError, install_error_handlers, recorded_outcome
from server.metrics import LATENCY_BUCKETS
from server.ray.replica import ChipAnswer
from server.routers.predict import image_bytes
from server.runtime import BUILTIN_TASK
from server.schemas import ERROR_RESPONSES, Health, PredictResponse
from server.settings import Settings
from task_store.index import TaskIndex
from task_store.store import INDEX_FILE

REPLICA_HEADER = "X-Xma2-Replica"
"""Response header: the chip replica that answered."""
REPLICA_TASKS_HEADER = "X-Xma2-Replica-Tasks"
"""Response header: the stored tasks that replica holds after answering (comma-separated)."""


class _RequestMetrics:
    """Request count and latency per task, as the single server reports them."""

    def __init__(self) -> None:
        self.requests = ray_metrics.Counter(
            "xma2_requests", description="Prediction requests by task and outcome",
            tag_keys=("task", "status"))  # type: ignore[arg-type]  # Ray types it a 1-tuple
        self.latency = ray_metrics.Histogram(
            "xma2_request_latency_seconds",
            description="Prediction latency from arrival to answer",
            boundaries=list(LATENCY_BUCKETS), tag_keys=("task",))


class Gateway:
    """The HTTP ingress: validates a request, then forwards it to a chip for its task.

    Args:
        chip: handle to the chip deployment.
        settings: limits and defaults (body size, top-k) and the store to read tasks from.
        refresh_s: how long the list of stored tasks is reused before it is read again.
    """

    def __init__(self, chip: DeploymentHandle[Any], settings: Settings, refresh_s: float) -> None:
        self.chip = chip
        self.settings = settings
        self.refresh_s = refresh_s
        self.index = TaskIndex(settings.store_root / INDEX_FILE)
        self.metrics = _RequestMetrics()
        self._tasks: set[str] = set()
        self._read_at = float("-inf")

    def _stored_tasks(self, *, fresh: bool = False) -> set[str]:
        now = time.monotonic()
        if fresh or now - self._read_at > self.refresh_s:
            self._tasks = {r.name for r in self.index.tasks() if r.active_version is not None}
            self._read_at = now
        return self._tasks

    def _check_task(self, task: str) -> None:
        if task == BUILTIN_TASK or task in self._stored_tasks():
            return
        stored = self._stored_tasks(fresh=True)  # imported since the last read?
        if task not in stored:
            known = ", ".join(sorted(stored | {BUILTIN_TASK}))
            raise TaskNotFound(f"unknown task {task!r}; served tasks: {known}")

    async def predict(self, request: Request, task: str, fidelity: Fidelity | None,
                      top_k: int | None) -> JSONResponse:
        label = "unknown"

        def record(status: str, seconds: float) -> None:
            self.metrics.requests.inc(1, tags={"task": label, "status": status})
            if status == "ok":
                self.metrics.latency.observe(seconds, tags={"task": label})

        with recorded_outcome(record):
            self._check_task(task)
            label = task
            data = await image_bytes(request)
            # Stored tasks go where they are held; the built-in task runs on any replica.
            chip = self.chip if task == BUILTIN_TASK else self.chip.options(
                multiplexed_model_id=task)
            answer: ChipAnswer = await chip.predict.remote(task, data, fidelity, top_k)
            if answer.response is None:  # the chip's error, already mapped to its answer
                raise ApiError(answer.status, answer.message, headers=answer.headers)
            return JSONResponse(answer.response, headers={
                REPLICA_HEADER: answer.replica, REPLICA_TASKS_HEADER: ",".join(answer.tasks)})

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app, built per replica so that it can use this replica's settings."""
        app = FastAPI(title="xma2 on Ray Serve", version="0.1.0", docs_url=None,
                      redoc_url=None)
        install_error_handlers(app)
        app.add_middleware(BodyLimit, max_bytes=self.settings.max_body_bytes)

        @app.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
        async def predict(
            request: Request,
            task: Annotated[str, Query(min_length=1, description="the task to answer with")],
            fidelity: Annotated[Fidelity | None, Query()] = None,
            top_k: Annotated[int | None, Query(ge=1, le=100)] = None,
        ) -> JSONResponse:
            return await self.predict(request, task, fidelity, top_k)

        @app.get("/healthz", response_model=Health)
        def healthz() -> Health:
            return Health(status="ok")

        @app.get("/readyz", response_model=Health)
        def readyz() -> Health:
            # Serve routes traffic here only once the chips have started.
            return Health(status="ready", tasks=len(self._stored_tasks()) + 1)

        return app
