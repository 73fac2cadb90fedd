"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.chip.config import Fidelity
from core.data.published_datasets import LAYOUTS
from core.task_state import TASK_NAME_PATTERN

MAX_INDEX_INT = 2**63 - 1
"""Largest version number or event sequence the store's index (SQLite) can hold."""
MAX_SEED = 2**32 - 1
"""Largest seed the data loaders and torch generators accept."""
MAX_PATH_CHARS = 1024


class ErrorDetail(BaseModel):
    status: int
    message: str = Field(description="what went wrong and how to fix it")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (400, "an unparsable JSON or multipart body"), (401, "no API key"),
        (403, "wrong API key, or a path outside the data root"),
        (404, "unknown task, version or job"), (409, "conflicts with the current state"),
        (413, "body or image too large"), (415, "not an image"),
        (422, "invalid parameters or a truncated/corrupt upload"),
        (500, "an unexpected server error"),
        (503, "starting (retry after Retry-After seconds) or the store is busy"))
}


def upload_body(description: str, raw_type: str, *, base64_json: bool = False
                ) -> dict[str, Any]:
    """OpenAPI request body of an uploaded file: raw bytes or a multipart field ``file``
    (and a JSON ``{"image_base64": ...}`` form where ``base64_json``)."""
    binary = {"type": "string", "format": "binary"}
    content: dict[str, Any] = {
        raw_type: {"schema": binary},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": binary}}},
    }
    if base64_json:
        content["application/json"] = {"schema": {
            "type": "object", "required": ["image_base64"],
            "properties": {"image_base64": {"type": "string"}}}}
    return {"requestBody": {"required": True, "description": description,
                            "content": content}}


class ImagePayload(BaseModel):
    """An image in a JSON body."""

    image_base64: str = Field(description="the image file, base64-encoded (a data URL works)")


class LabelScore(BaseModel):
    label: str
    probability: float = Field(description="the class's probability after the task's "
                               "temperature scaling (calibrated on its validation images)")


class RequestEnergy(BaseModel):
    """Emulated chip energy of one request, in joules."""

    crossbar_read_j: float
    adc_j: float
    total_j: float
    reprogramming_j: float = Field(
        description="spare-PE writes and mask loads this request caused (0 when resident)")
    breakdown: dict[str, float]


class PredictResponse(BaseModel):
    task: str
    version: int | None = Field(description="store version that answered; null: built-in")
    fidelity: Fidelity
    predictions: list[LabelScore]
    energy: RequestEnergy
    programmed: bool = Field(description="this request made the task resident on the chip")
    evicted: list[str] = Field(description="tasks that lost residency to make room")
    load_ms: float
    compute_ms: float
    ood_score: float = Field(
        description="how much the image looks like the task's own images (the task's "
        "ood_score_kind of its logits; higher: more alike)")
    ood: bool = Field(
        description="true: the image is out of distribution for this task (its ood_score "
        "is below the task's ood_threshold, which 95% of the task's validation images "
        "reach), so the classes above are not to be trusted; always false for a task "
        "without a threshold")


class TaskEnergy(BaseModel):
    requests: int
    images: int
    inference_j: float
    crossbar_read_j: float
    adc_j: float
    reprogramming_j: float
    cell_writes: int
    residency_loads: int
    residency_evictions: int
    resident: bool


class VersionInfo(BaseModel):
    version: int
    method: str
    created: str
    bytes: int
    active: bool


class TaskSummary(BaseModel):
    name: str
    version: int | None
    method: str
    builtin: bool
    image_size: int
    classes: int
    accuracy: float | None = Field(description="test accuracy recorded when it was made")
    bytes: int
    resident: bool
    serving: bool = Field(description="false when the stored task could not be loaded")
    error: str | None = None


class TaskDetail(TaskSummary):
    labels: list[str]
    versions: list[VersionInfo]
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    replaced_pes: int
    energy: TaskEnergy
    temperature: float = Field(
        description="divides the logits before the softmax of every answer (1: the head "
        "as trained; fitted on the validation split by NLL)")
    ood_threshold: float | None = Field(
        description="answers whose ood_score is below it are flagged ood; null: none are")
    ood_score_kind: str = Field(
        description="the score ood_threshold applies to: max_probability (largest "
        "calibrated probability) or energy (T * logsumexp(logits / T))")


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class EnergyResponse(BaseModel):
    tasks: dict[str, TaskEnergy]
    total_inference_j: float
    total_reprogramming_j: float


class AdaptationRequest(BaseModel):
    """An XMA2 (or baseline) adaptation of the frozen backbone to a dataset."""

    # strict: "3" or true is not an epoch count; a typo must not be coerced into a job.
    # The schema states what the validator below checks: a built-in dataset alone, an
    # ImageFolder path alone, or a published layout's name together with its path.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"oneOf": [
        {"required": ["dataset"],
         "properties": {"dataset": {"type": "string", "not": {"enum": list(LAYOUTS)}},
                        "dataset_path": {"type": "null"}}},
        {"required": ["dataset_path"], "properties": {"dataset_path": {"type": "string"},
                                                      "dataset": {"type": "null"}}},
        {"required": ["dataset", "dataset_path"],
         "properties": {"dataset": {"enum": list(LAYOUTS)},
                        "dataset_path": {"type": "string"}}}]})

    task: str = Field(pattern=TASK_NAME_PATTERN.pattern,
                      description="name of the task to create or give a new version")
    dataset: str | None = Field(None, description="a built-in dataset (fashion_mnist, "
                                "mnist5k, animal_mnist, digits), or the published layout "
                                f"found at dataset_path ({', '.join(LAYOUTS)})")
    dataset_path: str | None = Field(
        None, min_length=1, max_length=MAX_PATH_CHARS,
        description="below the server's data root (relative paths are taken from it): "
        "the folder a published layout was unpacked to, or alone an ImageFolder (one "
        "sub-folder per class)")
    method: str = "xma2"
    pe_fraction: float | None = Field(None, gt=0, le=1,
                                      description="P: share of PEs replaced (xma2 only)")
    shift_levels: int | None = Field(None, ge=0, le=8, description="N of the shift mask; "
                                     "must be the chip's (its mask buffers' width)")
    epochs: int | None = Field(None, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    image_size: int | None = Field(None, ge=16, le=512, description="input side in pixels "
                                   "(default: 224 for a published layout, else 64)")
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    chip_in_loop: bool | None = Field(
        None, description="train with the chip's periphery in every forward pass "
        "(train.chip_periphery), so that the task classifies on the lossy chip as in ideal "
        "fidelity; about twice the time (default: when this server's chip is lossy)")
    activate: bool = Field(True, description="serve the new version when the job "
                           "succeeds; a task's first version is served whatever this says")

    @model_validator(mode="after")
    def _one_dataset(self) -> AdaptationRequest:
        if self.dataset in LAYOUTS:
            if self.dataset_path is None:
                raise ValueError(f"dataset {self.dataset} is a published layout: give "
                                 "dataset_path, the folder it was unpacked to below the data "
                                 "root")
        elif (self.dataset is None) == (self.dataset_path is None):
            raise ValueError("give exactly one of dataset (a built-in name) and "
                             "dataset_path (an image folder below the data root), or a "
                             f"published layout ({', '.join(LAYOUTS)}) with its dataset_path")
        return self


class AdaptationJob(BaseModel):
    id: str
    task: str | None
    status: str
    created: str
    updated: str
    params: dict[str, Any]
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None


class AdaptationList(BaseModel):
    data: list[AdaptationJob]
    has_more: bool


class JobEventOut(BaseModel):
    seq: int
    created: str
    level: str
    message: str


class JobEventList(BaseModel):
    data: list[JobEventOut]
    has_more: bool


class Health(BaseModel):
    status: str
    tasks: int = 0
    detail: str | None = None
