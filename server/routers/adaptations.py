"""Adaptation jobs: create, list, inspect, follow the events of, and cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query

from core.chip.adc import chip_is_lossless
from core.data.datasets import dataset_names
from core.data.published_datasets import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGE_SIZE,
    LAYOUTS,
    OutsideDataRoot,
    scan_layout,
)
from core.learning import default_config
from core.learning.registry import METHODS
from server.deps import Jobs, Runtime, ServicesDep
from server.errors import ApiError
from server.job_worker import outside_links
from server.schemas import (
    ERROR_RESPONSES,
    MAX_INDEX_INT,
    AdaptationJob,
    AdaptationList,
    AdaptationRequest,
    JobEventList,
    JobEventOut,
)
from task_store import JobRecord, JobStatus

router = APIRouter(prefix="/adaptations", tags=["adaptations"], responses=ERROR_RESPONSES)


def job_out(job: JobRecord) -> AdaptationJob:
    result = job.result or {}
    return AdaptationJob(id=job.id, task=job.task, status=job.status.value,
                         created=job.created, updated=job.updated, params=job.params,
                         progress=result.get("progress"),
                         result=({k: v for k, v in result.items() if k != "progress"}
                                 if job.status is JobStatus.SUCCEEDED else None),
                         error=job.error)


def _resolve_dataset_path(raw: str, root: Path, layout: str | None = None) -> str:
    if "\x00" in raw:
        raise ApiError(422, "dataset_path holds a NUL character; give a folder name below "
                            "the data root")
    root = root.resolve()
    try:
        path = Path(raw).expanduser()
        resolved = (path if path.is_absolute() else root / path).resolve()
        inside = resolved.is_relative_to(root)
        is_dir = inside and resolved.is_dir()
    except (OSError, RuntimeError, ValueError) as e:  # too long, a symlink loop, ...
        raise ApiError(422, f"dataset_path {raw[:200]!r} cannot be resolved "
                            f"({type(e).__name__}); give a folder below the data root") from e
    if not inside:
        raise ApiError(403, f"dataset_path {raw[:200]!r} is outside the data root {root}; "
                            "copy the dataset below it")
    if not is_dir:
        what = (f"the folder {layout} was unpacked to" if layout else
                "one sub-folder of images per class")
        raise ApiError(422, f"dataset_path {raw[:200]!r} is not a folder below the data "
                            f"root {root} ({what})")
    if layout is not None:
        try:  # the whole tree, now: a job must not fail on a missing file
            scan_layout(layout, resolved, data_root=root)
        except OutsideDataRoot as e:
            raise ApiError(403, str(e)) from e
        except (OSError, RuntimeError) as e:  # a file name too long, a symlink loop, ...
            raise ApiError(422, f"dataset_path {raw[:200]!r}: the {layout} files cannot be "
                                f"resolved ({type(e).__name__}: {e})") from e
        return str(resolved)
    if not any(p.is_dir() and not p.name.startswith(".") for p in resolved.iterdir()):
        raise ApiError(422, f"dataset_path {raw[:200]!r} has no class sub-folders (one "
                            "sub-folder of images per class)")
    escaped = outside_links(resolved, root)
    if escaped:
        raise ApiError(403, f"dataset_path {raw[:200]!r} links outside the data root "
                            f"({', '.join(escaped[:3])}); copy those images below it")
    return str(resolved)


def validated_params(request: AdaptationRequest, runtime: Any, data_root: Path
                     ) -> dict[str, Any]:
    """The job's parameters, every one checked now so that a job cannot fail on a typo."""
    spec = METHODS.get(request.method)
    if spec is None:
        raise ApiError(422, f"unknown method {request.method!r}; choose one of "
                            f"{', '.join(n for n, m in METHODS.items() if m.servable)}")
    if not spec.servable:
        raise ApiError(422, f"{request.method} makes an fp32 model, not a task the chip can "
                            "serve; choose another method")
    if runtime.is_builtin(request.task):
        raise ApiError(409, f"{request.task!r} is a built-in task; choose another name")
    chip_levels = runtime.engine.mapping.config.shift_levels
    if request.shift_levels is not None and request.shift_levels != chip_levels:
        raise ApiError(422, f"shift_levels={request.shift_levels}, but this chip's mask "
                            f"buffers hold N={chip_levels} shift levels; omit it or use "
                            f"{chip_levels}")
    params = request.model_dump()
    params["shift_levels"] = chip_levels
    if params["chip_in_loop"] is None:
        mapping = runtime.engine.mapping
        params["chip_in_loop"] = not chip_is_lossless(mapping.crossbar_layers, mapping.config)
    layout = request.dataset if request.dataset in LAYOUTS else None
    if request.dataset is not None and layout is None and request.dataset not in dataset_names():
        raise ApiError(422, f"unknown dataset {request.dataset!r}; built-in datasets are "
                            f"{', '.join(dataset_names())}, published layouts "
                            f"{', '.join(LAYOUTS)} (with dataset_path), or give dataset_path")
    if request.dataset_path is not None:
        params["dataset_path"] = _resolve_dataset_path(request.dataset_path, data_root, layout)
    if params["image_size"] is None:
        params["image_size"] = DEFAULT_IMAGE_SIZE if layout else 64
    if layout and params["batch_size"] is None:
        params["batch_size"] = DEFAULT_BATCH_SIZE
    default_config(request.method, pe_fraction=request.pe_fraction, epochs=request.epochs,
                   batch_size=request.batch_size, seed=request.seed)  # ConfigError -> 422
    return params


@router.post("", response_model=AdaptationJob, status_code=201)
def create_adaptation(request: AdaptationRequest, runtime: Runtime, jobs: Jobs,
                      services: ServicesDep) -> AdaptationJob:
    params = validated_params(request, runtime, services.settings.data_dir)
    return job_out(jobs.submit(request.task, params))


@router.get("", response_model=AdaptationList)
def list_adaptations(
    jobs: Jobs,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="id of the last job of the previous "
                                       "page")] = None,
    status: JobStatus | None = None,
) -> AdaptationList:
    if after is not None:
        jobs.get(after)
    page = jobs.index.jobs(status=status, limit=limit + 1, after=after)
    return AdaptationList(data=[job_out(j) for j in page[:limit]], has_more=len(page) > limit)


@router.get("/{job_id}", response_model=AdaptationJob)
def get_adaptation(job_id: str, jobs: Jobs) -> AdaptationJob:
    return job_out(jobs.get(job_id))


@router.get("/{job_id}/events", response_model=JobEventList)
def adaptation_events(
    job_id: str, jobs: Jobs,
    after: Annotated[int, Query(ge=0, le=MAX_INDEX_INT,
                                       description="seq of the last event already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobEventList:
    events = jobs.events(job_id, after=after, limit=limit + 1)
    return JobEventList(data=[JobEventOut(seq=e.seq, created=e.created, level=e.level,
                                          message=e.message) for e in events[:limit]],
                        has_more=len(events) > limit)


@router.post("/{job_id}/cancel", response_model=AdaptationJob)
def cancel_adaptation(job_id: str, jobs: Jobs) -> AdaptationJob:
    return job_out(jobs.cancel(job_id))
