"""Builders of task states for tests."""

from __future__ import annotations

from core.mapping import ModelMapping
from core.task_state import TaskHead, TaskState, random_task_state
from core.task_state import random_head as _random_head


def random_head(classes: int = 5, features: int = 1280, seed: int = 0) -> TaskHead:
    return _random_head(classes, features, seed)


def random_task(
    task_id: str, mapping: ModelMapping, *, pe_fraction: float = 0.1, seed: int = 0,
    head: TaskHead | None = None,
) -> TaskState:
    return random_task_state(task_id, mapping, head or random_head(seed=seed),
                             pe_fraction=pe_fraction, seed=seed)
