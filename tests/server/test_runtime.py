"""The chip runtime in-process, no HTTP: built from settings the way ``xma2 serve`` and
every Ray chip replica build it, and what a batch answers when one of its tasks is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from core.chip.config import Fidelity
from core.chip.pool import EnergyAwareEviction, LRUEviction
from core.errors import TaskNotFound, TaskStateError
from server.errors import http_answer
from server.runtime import (
    BUILTIN_TASK,
    IMAGENET_INPUT_SIZE,
    BatchItem,
    Prediction,
    TaskRuntime,
    build_runtime,
)
from server.settings import Settings
from tests.server.live import photo

SHIPPED = ("fashion-mnist", "mnist", "animal-mnist")


def test_build_runtime_follows_the_settings(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    settings = Settings(store=tmp_path / "store", fidelity=Fidelity.CROSSBAR, spare_pes=300,
                        mask_entries=2, eviction="energy", max_prepared_tasks=3,
                        max_body_bytes=123_456, inference_threads=1)
    runtime = build_runtime(settings)
    try:
        assert torch.get_num_threads() == 1
        assert runtime.fidelity is Fidelity.CROSSBAR
        assert runtime.engine.fidelity is Fidelity.CROSSBAR
        assert runtime.pool.num_slots == 300 and runtime.pool.config.mask_entries == 2
        assert isinstance(runtime.pool.policy, EnergyAwareEviction)
        assert runtime.engine.prepared.capacity == 3
        assert runtime.store.root == settings.store_root
        assert runtime.store.max_archive_bytes == 123_456
        assert runtime.served == {}  # nothing registered until the caller loads
        runtime.worker.submit(runtime.load_all).result()
        assert set(runtime.served) == {BUILTIN_TASK}  # an empty store: the built-in only
        served = runtime.served[BUILTIN_TASK]
        assert served.builtin and served.image_size == IMAGENET_INPUT_SIZE
        assert len(served.labels) == 1000
    finally:
        runtime.close()
        runtime.store.close()
        torch.set_num_threads(threads)


def test_the_shared_runtime_serves_the_shipped_tasks_as_configured(chip: TaskRuntime) -> None:
    """The defaults: ideal fidelity, LRU eviction, every shipped task plus the built-in."""
    assert chip.fidelity is Fidelity.IDEAL and isinstance(chip.pool.policy, LRUEviction)
    assert set(chip.served) == {BUILTIN_TASK, *SHIPPED} and not chip.load_errors
    assert all(chip.served[t].replaced_pes > 0 for t in SHIPPED)


def test_a_request_for_a_task_gone_fails_alone(chip: TaskRuntime) -> None:
    x = chip.preprocess("mnist", Image.fromarray(photo("camera")))
    items = [BatchItem(t, x, Fidelity.IDEAL, 2) for t in ("mnist", "deleted", "fashion-mnist")]
    results = chip.worker.submit(chip.infer_batch, items).result()
    first, gone, last = results
    assert isinstance(first, Prediction) and first.task == "mnist"
    assert isinstance(last, Prediction) and last.task == "fashion-mnist"
    assert isinstance(gone, TaskNotFound)
    answer = http_answer(gone)
    assert answer.status == 404 and answer.message.startswith("unknown task 'deleted'; "
                                                              "served tasks: ")
    assert all(t in answer.message for t in (BUILTIN_TASK, *SHIPPED))


def test_an_unknown_task_is_refused_before_the_chip(chip: TaskRuntime) -> None:
    with pytest.raises(TaskNotFound):
        chip.task("nope")
    with pytest.raises(TaskNotFound):
        chip.preprocess("nope", Image.fromarray(photo("camera")))


def test_the_builtin_task_cannot_be_replaced_or_removed(chip: TaskRuntime) -> None:
    for change in (chip.sync, chip.unregister):
        with pytest.raises(TaskStateError) as refused:
            chip.worker.submit(change, BUILTIN_TASK).result()
        assert http_answer(refused.value).status == 422
    assert BUILTIN_TASK in chip.served
