"""Per-task energy so far, and the Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import Runtime, ServicesDep
from server.schemas import EnergyResponse, TaskEnergy

router = APIRouter(tags=["energy"])


@router.get("/energy", response_model=EnergyResponse)
def energy(runtime: Runtime) -> EnergyResponse:
    table = {name: TaskEnergy(**row) for name, row in runtime.energy_table().items()}
    return EnergyResponse(
        tasks=table,
        total_inference_j=sum(t.inference_j for t in table.values()),
        total_reprogramming_j=sum(t.reprogramming_j for t in table.values()))


@router.get("/metrics", include_in_schema=False)
def metrics(services: ServicesDep) -> Response:
    if services.metrics is None:
        return Response("# starting\n", media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
