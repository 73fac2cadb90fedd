"""The batcher driven in-process on the real chip (shipped backbone and tasks), no HTTP:
backpressure, shutdown, how batches form, and a failing task's requests."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image

from core.errors import TaskNotFound
from core.task_state import TaskHead, TaskState
from server.batcher import Batcher, build_batcher
from server.errors import ChipFailure, QueueFull, ShuttingDown, http_answer
from server.runtime import Prediction, TaskRuntime
from server.settings import Settings
from tests.server.live import photo

TASK = "mnist"
TOP_K = 3


@dataclass
class Seen:
    """What the batcher reported: each batch's size and waits, each refusal's reason."""

    batches: list[tuple[int, list[tuple[str, float]]]] = field(default_factory=list)
    rejects: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [size for size, _ in self.batches]

    def batcher(self, chip: TaskRuntime, **settings: Any) -> Batcher:
        """A batcher as ``xma2 serve`` builds it from these settings (FIFO unless told)."""
        settings.setdefault("scheduler", "fifo")
        return build_batcher(Settings(**settings), chip,
                             on_batch=lambda n, waits: self.batches.append((n, waits)),
                             on_reject=self.rejects.append)


@pytest.fixture(scope="module")
def images(chip: TaskRuntime) -> list[torch.Tensor]:
    """Three photos as the task's inputs."""
    return [chip.preprocess(TASK, Image.fromarray(photo(name)))
            for name in ("camera", "coffee", "chelsea")]


def test_a_full_queue_refuses_with_queue_full_then_recovers(
        chip: TaskRuntime, images: list[torch.Tensor]) -> None:
    seen = Seen()

    async def scenario() -> tuple[QueueFull, list[Prediction], Prediction]:
        batcher = seen.batcher(chip, max_queue=2, max_queue_delay_ms=50)
        # Not started yet: nothing drains the queue, so two requests fill it.
        waiting = [asyncio.ensure_future(batcher.submit(TASK, x, None, TOP_K))
                   for x in images[:2]]
        await asyncio.sleep(0)
        assert batcher.depth == 2
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(TASK, images[2], None, TOP_K)
        assert batcher.depth == 2 and batcher.stats.rejected == 1
        batcher.start()
        answered = await asyncio.gather(*waiting)
        again = await batcher.submit(TASK, images[2], None, TOP_K)  # room again
        await batcher.stop()
        return refused.value, answered, again

    refused, answered, again = asyncio.run(scenario())
    assert seen.rejects == ["queue_full"]
    assert refused.waiting == 2 and refused.retry_after_s is not None
    assert refused.retry_after_s >= 1
    answer = http_answer(refused)
    assert answer.status == 429
    assert answer.headers == {"Retry-After": str(refused.retry_after_s)}
    assert answer.message == ("the request queue is full (2 waiting); retry after the "
                              "Retry-After seconds")
    assert all(isinstance(p, Prediction) and p.task == TASK for p in [*answered, again])
    assert sum(seen.sizes) == 3


def test_stopping_fails_every_queued_request_with_shutting_down(
        chip: TaskRuntime, images: list[torch.Tensor]) -> None:
    seen = Seen()

    async def scenario() -> list[BaseException | Prediction]:
        # Requests wait up to a minute for company, so all three are queued at the stop.
        batcher = seen.batcher(chip, max_queue_delay_ms=60_000)
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(TASK, x, None, TOP_K))
                   for x in images]
        await asyncio.sleep(0.05)
        assert batcher.depth == 3
        await batcher.stop()
        assert batcher.depth == 0
        return await asyncio.gather(*waiting, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert seen.batches == []  # none of them reached the chip
    assert isinstance(results[0], ShuttingDown)
    answer = http_answer(results[0])
    assert (answer.status, answer.message, answer.headers) == (
        503, "the server is shutting down", None)


def test_batches_hold_at_most_the_max_batch_size(
        chip: TaskRuntime, images: list[torch.Tensor]) -> None:
    alone = [chip.worker.submit(chip.infer, TASK, x, None, TOP_K).result() for x in images]
    seen = Seen()

    async def scenario() -> list[Prediction]:
        batcher = seen.batcher(chip, max_batch_size=4, max_queue_delay_ms=200)
        batcher.start()
        # All ten are queued before the batcher looks: it takes 4, 4, then the last 2.
        answers = await asyncio.gather(*(batcher.submit(TASK, images[i % 3], None, TOP_K)
                                         for i in range(10)))
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert seen.sizes == [4, 4, 2]
    assert all(wait >= 0 and task == TASK for _, waits in seen.batches for task, wait in waits)
    for i, p in enumerate(answers):  # a request in a batch gets the answer it gets alone
        single = alone[i % 3]
        assert p.task == TASK and [label for label, _ in p.top] == \
            [label for label, _ in single.top]
        assert [prob for _, prob in p.top] == pytest.approx(
            [prob for _, prob in single.top], rel=1e-4, abs=1e-5)


def test_the_first_request_waits_the_queue_delay_for_company(
        chip: TaskRuntime, images: list[torch.Tensor]) -> None:
    delay_s = 0.4
    seen = Seen()

    async def scenario() -> None:
        batcher = seen.batcher(chip, max_batch_size=16, max_queue_delay_ms=delay_s * 1e3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(TASK, images[0], None, TOP_K))
        await asyncio.sleep(0.05)  # well within the delay: the two share a batch
        second = asyncio.ensure_future(batcher.submit(TASK, images[1], None, TOP_K))
        await asyncio.gather(first, second)
        await batcher.submit(TASK, images[2], None, TOP_K)  # alone: it waits it out too
        await batcher.stop()

    asyncio.run(scenario())
    assert seen.sizes == [2, 1]
    (_, pair), (_, lone) = seen.batches
    assert pair[0][1] >= delay_s and 0 <= pair[1][1] < pair[0][1]
    assert lone[0][1] >= delay_s


@pytest.fixture
def poisoned(chip: TaskRuntime) -> Iterator[str]:
    """A task that passed every check but fails on the chip: its head's bias is half
    precision, so any batch holding it raises. Registered on the chip directly."""
    name = "poisoned"

    def register() -> None:
        head = chip.engine.tasks["imagenet"].head
        task = TaskState(name, chip.engine.tasks["imagenet"].shift_levels,
                         TaskHead(head.weight, head.bias.half(), head.labels))
        chip.engine.add_task(task)
        chip.served[name] = dataclasses.replace(chip.served["imagenet"], name=name,
                                                builtin=False)

    chip.worker.submit(register).result()
    try:
        yield name
    finally:
        chip.worker.submit(chip.unregister, name).result()


def test_a_failing_task_fails_only_its_own_requests_in_a_shared_batch(
        chip: TaskRuntime, images: list[torch.Tensor], poisoned: str) -> None:
    tasks = [TASK, poisoned, "fashion-mnist", poisoned, "no-such-task", TASK]
    seen = Seen()

    async def scenario() -> list[BaseException | Prediction]:
        batcher = seen.batcher(chip, max_batch_size=len(tasks), max_queue_delay_ms=200)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(t, images[i % 3], None, TOP_K)
                                         for i, t in enumerate(tasks)),
                                       return_exceptions=True)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert seen.sizes == [len(tasks)]  # one batch, split on the chip by task
    for task, answer in zip(tasks, answers, strict=True):
        if task == poisoned:
            assert isinstance(answer, ChipFailure) and answer.task == poisoned, answer
            assert http_answer(answer).status == 500
            assert str(answer).startswith(f"task {poisoned!r} failed on the chip (")
        elif task == "no-such-task":
            assert isinstance(answer, TaskNotFound), answer
            assert http_answer(answer).status == 404
        else:
            assert isinstance(answer, Prediction) and answer.task == task, answer
