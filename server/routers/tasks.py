"""Tasks: list, inspect, import an archive, activate a version, export, delete."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from core.confidence import UNCALIBRATED, Confidence
from core.task_state import TASK_NAME_PATTERN
from server.deps import Runtime
from server.errors import ApiError
from server.routers.predict import image_bytes
from server.runtime import TaskRuntime
from server.schemas import (
    ERROR_RESPONSES,
    MAX_INDEX_INT,
    TaskDetail,
    TaskEnergy,
    TaskList,
    TaskSummary,
    VersionInfo,
    upload_body,
)
from server.scratch import scratch_prefix
from task_store import TaskStore

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)

_ARCHIVE_BODY = upload_body("a task archive made by GET /tasks/{name}/archive: the raw "
                            "bytes, or a multipart field 'file'", "application/x-tar")


def _energy(runtime: TaskRuntime, name: str) -> TaskEnergy:
    table = runtime.energy_table()
    return TaskEnergy(**table[name]) if name in table else TaskEnergy(
        requests=0, images=0, inference_j=0.0, crossbar_read_j=0.0, adc_j=0.0,
        reprogramming_j=0.0, cell_writes=0, residency_loads=0, residency_evictions=0,
        resident=False)


def _summary(runtime: TaskRuntime, name: str) -> TaskSummary:
    served = runtime.served.get(name)
    if served is None:  # stored but not loadable
        record = runtime.store.index.task(name)
        return TaskSummary(name=name, version=record.active_version, method="unknown",
                           builtin=False, image_size=0, classes=0, accuracy=None, bytes=0,
                           resident=False, serving=False, error=runtime.load_errors.get(name))
    return TaskSummary(
        name=name, version=served.version, method=served.method, builtin=served.builtin,
        image_size=served.image_size, classes=len(served.labels),
        accuracy=served.metrics.get("test_accuracy"), bytes=served.bytes,
        resident=runtime.pool.is_resident(name), serving=True)


def _detail(runtime: TaskRuntime, name: str) -> TaskDetail:
    if name not in runtime.served and name not in runtime.load_errors:
        runtime.task(name)  # raises the 404 with the served names
    summary = _summary(runtime, name)
    served = runtime.served.get(name)
    versions = [] if runtime.is_builtin(name) else [
        VersionInfo(version=v.version, method=v.method, created=v.created, bytes=v.bytes,
                    active=v.active) for v in runtime.store.versions(name)]
    return TaskDetail(
        **summary.model_dump(), labels=list(served.labels) if served else [],
        versions=versions, metrics=served.metrics if served else {},
        hyperparameters=served.hyperparameters if served else {},
        replaced_pes=served.replaced_pes if served else 0, energy=_energy(runtime, name),
        **_confidence(served.confidence if served else UNCALIBRATED))


def _confidence(confidence: Confidence) -> dict[str, Any]:
    return {"temperature": confidence.temperature, "ood_threshold": confidence.ood_threshold,
            "ood_score_kind": confidence.ood_score.value}


def _not_builtin(runtime: TaskRuntime, name: str) -> None:
    if runtime.is_builtin(name):
        raise ApiError(409, f"{name!r} is a built-in task; it has no stored versions")


@router.get("", response_model=TaskList)
def list_tasks(runtime: Runtime) -> TaskList:
    names = sorted(set(runtime.served) | set(runtime.load_errors))
    return TaskList(tasks=[_summary(runtime, n) for n in names])


@router.get("/{name}", response_model=TaskDetail)
def get_task(name: str, runtime: Runtime) -> TaskDetail:
    return _detail(runtime, name)


@router.post("", response_model=TaskDetail, status_code=201, openapi_extra=_ARCHIVE_BODY)
async def import_task(
    request: Request, runtime: Runtime,
    name: Annotated[str | None, Query(description="store under this name (default: the "
                                      "archive's)",
                                      pattern=TASK_NAME_PATTERN.pattern)] = None,
    activate: Annotated[bool, Query(
        description="serve the imported version now; a task's first version is served "
                    "whatever this says (a task without an active version could not "
                    "serve)")] = True,
) -> TaskDetail:
    if name is not None:
        _not_builtin(runtime, name)
    data = await image_bytes(request)
    if not data:
        raise ApiError(422, "the body holds no task archive")
    store = runtime.store

    def import_file() -> str:
        with tempfile.TemporaryDirectory(dir=store.root, prefix=scratch_prefix("upload")
                                         ) as folder:
            path = Path(folder) / "upload.tar"
            path.write_bytes(data)
            target = name or _archive_task_name(store, path)
            _not_builtin(runtime, target)
            record = store.import_archive(path, name=target, activate=activate)
        return record.task

    imported = await run_in_threadpool(import_file)
    await runtime.run(runtime.sync, imported)
    return _detail(runtime, imported)


def _archive_task_name(store: TaskStore, path: Path) -> str:
    from task_store.archive import read_archive

    manifest, _ = read_archive(path, max_bytes=store.max_archive_bytes)
    return manifest.task


@router.post("/{name}/activate", response_model=TaskDetail)
async def activate_version(
    name: str, runtime: Runtime,
    version: Annotated[int, Query(ge=1, le=MAX_INDEX_INT,
                                       description="the version to serve")],
) -> TaskDetail:
    _not_builtin(runtime, name)
    await run_in_threadpool(runtime.store.activate, name, version)
    await runtime.run(runtime.sync, name)
    return _detail(runtime, name)


@router.get("/{name}/archive", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}}}})
async def export_task(
    name: str, runtime: Runtime,
    version: Annotated[int | None, Query(ge=1, le=MAX_INDEX_INT,
                                              description="default: the active one")] = None,
) -> FileResponse:
    _not_builtin(runtime, name)
    folder = tempfile.mkdtemp(dir=runtime.store.root, prefix=scratch_prefix("export"))
    try:
        record = runtime.store.index.version(name, version)
        path = await run_in_threadpool(runtime.store.export, name,
                                       Path(folder) / f"{name}-v{record.version}.tar",
                                       record.version)
    except BaseException:
        _remove(folder)
        raise
    return FileResponse(path, media_type="application/x-tar", filename=path.name,
                        background=BackgroundTask(_remove, folder))


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@router.delete("/{name}", status_code=204)
async def delete_task(
    name: str, runtime: Runtime,
    version: Annotated[int | None, Query(ge=1, le=MAX_INDEX_INT,
                                              description="delete one version only")] = None,
) -> Response:
    _not_builtin(runtime, name)
    await run_in_threadpool(runtime.store.delete, name, version)
    await runtime.run(runtime.sync, name)
    return Response(status_code=204)
