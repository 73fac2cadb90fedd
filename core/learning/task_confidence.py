"""Fit a task's temperature and OOD threshold on the logits the engine serves it with.

The fit must see the served model's logits (the engine's ideal-fidelity forward of the
4-bit backbone with the task's masks and spare PEs), not the training model's, since
those are the logits the server divides by the temperature. On the default chip the
crossbar fidelity answers bit for bit as ideal does, so one fit holds for both.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from core.chip.config import Fidelity
from core.confidence import (
    DEFAULT_OOD_SCORE,
    IN_DISTRIBUTION_FRACTION,
    OodScore,
    fit_confidence,
)
from core.data.datasets import ImageSplit
from core.data.photo_split import PhotoSplit
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.nn.model import CrossbarModel
from core.task_state import TaskState

EVAL_BATCH = 128
STATISTICS_IMAGES = 2000
"""Training images (a seeded sample) whose logits give the class statistics of the
logit-distance OOD score."""


@torch.no_grad()
def engine_logits(engine: CrossbarEngine, task_id: str, images: Tensor,
                  batch_size: int = EVAL_BATCH) -> Tensor:
    """Ideal-fidelity logits ``[N, classes]`` of a registered task for images ``[N, 3, H, W]``."""
    out = [engine.forward(images[i : i + batch_size], task_id, Fidelity.IDEAL)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def split_logits(engine: CrossbarEngine, task_id: str, split: ImageSplit,
                 limit: int | None = None, *, seed: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Logits and labels of ``limit`` images of a split (all by default): the first ones,
    or with ``seed`` a seeded random sample (a split may be ordered by class)."""
    n = len(split) if limit is None else min(limit, len(split))
    rows = (torch.arange(n) if seed is None else
            torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
            .sort().values)
    chunks, labels = [], []
    for start in range(0, n, EVAL_BATCH):
        x, y = split.batch(rows[start : start + EVAL_BATCH])
        chunks.append(engine_logits(engine, task_id, x))
        labels.append(y)
    if not chunks:
        raise ConfigError(f"task {task_id}: the split holds no images to calibrate on")
    return torch.cat(chunks), torch.cat(labels)


def unaugmented(split: ImageSplit) -> ImageSplit:
    """The split as served images look (a photo training split augments its crops)."""
    if not isinstance(split, PhotoSplit) or split.augment is None:
        return split
    plain = copy.copy(split)
    plain.augment = None
    return plain


def calibrate_task(model: CrossbarModel, task: TaskState, train: ImageSplit,
                   val: ImageSplit, *, score: OodScore | str = DEFAULT_OOD_SCORE,
                   in_fraction: float = IN_DISTRIBUTION_FRACTION,
                   statistics_images: int = STATISTICS_IMAGES, seed: int = 0) -> TaskState:
    """``task`` with its temperature and OOD threshold fitted on its validation split
    (and the logit-distance class statistics on a sample of its training split).
    """
    engine = CrossbarEngine(model, max_prepared_tasks=1)
    engine.add_task(task)
    logits, labels = split_logits(engine, task.task_id, val)
    train_logits = train_labels = None
    if OodScore(score) is OodScore.LOGIT_DISTANCE:
        train_logits, train_labels = split_logits(engine, task.task_id, unaugmented(train),
                                                  statistics_images, seed=seed)
    confidence = fit_confidence(logits, labels, train_logits=train_logits,
                                train_labels=train_labels, score=score,
                                in_fraction=in_fraction)
    return dataclasses.replace(task, confidence=confidence)
