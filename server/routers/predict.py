"""``POST /predict?task=NAME``: classify one image with one task."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from core.chip.config import Fidelity
from server.deps import Runtime, ServicesDep
from server.errors import ApiError, recorded_outcome
from server.images import decode_base64, decodes_inline, open_image
from server.runtime import Prediction, TaskRuntime, resize_target
from server.schemas import ERROR_RESPONSES, LabelScore, PredictResponse, RequestEnergy, upload_body
from server.services import Services

router = APIRouter(tags=["inference"])

_BODY_DOC = upload_body("the image: raw bytes (image/jpeg, image/png, ...), a multipart "
                        "field 'file', or JSON {\"image_base64\": ...}", "image/*",
                        base64_json=True)


async def image_bytes(request: Request, field: str = "file") -> bytes:
    """The uploaded file of a raw, multipart or JSON/base64 body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form()
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise ApiError(422, f"the multipart body has no file field {field!r}")
        return await upload.read()
    if kind == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(422, f"the JSON body is not valid JSON: {e}") from e
        if not isinstance(payload, dict) or not isinstance(payload.get("image_base64"), str):
            raise ApiError(422, "the JSON body must be {\"image_base64\": \"<base64 image>\"}")
        return decode_base64(payload["image_base64"])
    return await request.body()


def prediction_response(p: Prediction) -> PredictResponse:
    return PredictResponse(
        task=p.task, version=p.version, fidelity=p.fidelity,
        predictions=[LabelScore(label=label, probability=prob) for label, prob in p.top],
        energy=RequestEnergy(crossbar_read_j=p.energy.cell_read_j, adc_j=p.energy.adc_j,
                             total_j=p.energy.total_j, reprogramming_j=p.reprogramming_j,
                             breakdown=p.energy.to_dict()),
        programmed=p.programmed, evicted=list(p.evicted),
        load_ms=round(p.load_seconds * 1e3, 3), compute_ms=round(p.compute_seconds * 1e3, 3),
        ood_score=p.ood_score, ood=p.ood)


@router.post("/predict", response_model=PredictResponse, openapi_extra=_BODY_DOC,
             responses={**ERROR_RESPONSES, 429: {
                 "model": ERROR_RESPONSES[401]["model"],
                 "description": "the request queue is full; retry after Retry-After"}})
async def predict(
    request: Request, runtime: Runtime, services: ServicesDep,
    task: Annotated[str, Query(description="the task to answer with", min_length=1)],
    fidelity: Annotated[Fidelity | None, Query(description="ideal or crossbar (default: "
                                                "the server's)")] = None,
    top_k: Annotated[int | None, Query(ge=1, le=100)] = None,
) -> Response:
    return await answer(request, runtime, services, task, fidelity, top_k)


async def answer(request: Request, runtime: TaskRuntime, services: Services, task: str,
                 fidelity: Fidelity | None, top_k: int | None) -> Response:
    """What ``POST /predict`` does once FastAPI has validated its parameters."""
    metrics = services.metrics
    assert metrics is not None
    label = task if task in runtime.served else "unknown"

    def record(status: str, seconds: float) -> None:
        metrics.requests.labels(label, status).inc()
        if status == "ok":
            metrics.latency.labels(label).observe(seconds)

    with recorded_outcome(record):
        served = runtime.task(task)
        data = await image_bytes(request)
        settings = services.settings
        image = open_image(data, max_pixels=settings.max_image_pixels,
                           shorter_side=resize_target(served))  # header only
        if decodes_inline(image):
            x = runtime.prepare(task, image)
        else:
            x = await run_in_threadpool(runtime.prepare, task, image)
        batcher = services.batcher
        assert batcher is not None
        prediction = await batcher.submit(task, x, fidelity, top_k or settings.top_k)
        # Serialised by pydantic-core in one call; FastAPI would validate the model again.
        return Response(prediction_response(prediction).model_dump_json(),
                        media_type="application/json")
