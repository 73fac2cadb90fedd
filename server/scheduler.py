"""Which waiting requests form the next batch: FIFO, or residency-aware with a wait bound.

The chip holds only as many tasks as its spare PEs and mask buffers allow. Serving
requests in arrival order then reprograms spare PEs whenever the stream alternates
between more tasks than fit. The residency-aware policies (``lru`` and ``energy``)
reorder within a bound instead: a batch takes the requests of tasks already resident
first, and switches to another task only when no resident task is waiting or when a
request has waited ``max_wait_s``: overdue requests go first, oldest first, so no task
starves. ``energy`` picks the next task to load by waiting requests per joule of
reprogramming; ``lru`` by its oldest request.

Pure logic over a list and a clock, so the starvation bound can be tested exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SchedulingPolicy(StrEnum):
    FIFO = "fifo"
    """Arrival order; a batch ends at the first request whose task does not fit with it."""
    LRU = "lru"
    """Resident tasks first; load the task with the oldest waiting request."""
    ENERGY = "energy"
    """Resident tasks first; load the task with the most waiting requests per joule."""


@dataclass(eq=False)
class Pending:
    """One queued request."""

    task: str
    key: Hashable
    """Requests batch together only with the same key (input size and fidelity)."""
    arrival: float
    payload: Any = None
    seq: int = field(default=0)


@dataclass(frozen=True)
class ChipView:
    """What the scheduler may ask about the chip."""

    resident: Callable[[], set[str]]
    fits: Callable[[set[str]], bool]
    """Whether these tasks can be resident at once."""
    reload_energy_j: Callable[[str], float]


class BatchScheduler:
    """Chooses the next batch from the queue.

    Args:
        policy: FIFO, or one of the residency-aware policies.
        max_batch_size: requests per batch.
        max_wait_s: the bound on reordering: once a request has waited this long the
            residency-aware policies take it before any request that has not, oldest first.
            The oldest waiting request, once overdue, is in the next batch; more overdue
            requests than one batch (or the chip) holds go in the batches after it.
        chip: residency and capacity of the chip.
    """

    def __init__(self, policy: SchedulingPolicy | str, max_batch_size: int, max_wait_s: float,
                 chip: ChipView) -> None:
        if max_batch_size < 1:  # an empty batch for a non-empty queue: the batcher would spin
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_wait_s >= 0:  # NaN included: no request would ever be overdue
            raise ValueError(f"max_wait_s must be >= 0 (inf: no bound), got {max_wait_s}")
        self.policy = SchedulingPolicy(policy)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.chip = chip

    def select(self, queue: Sequence[Pending], now: float) -> list[Pending]:
        """The next batch (at least one request when the queue is not empty)."""
        if not queue:
            return []
        oldest = min(queue, key=lambda p: (p.arrival, p.seq))
        candidates = sorted((p for p in queue if p.key == oldest.key),
                            key=lambda p: (p.arrival, p.seq))
        if self.policy is SchedulingPolicy.FIFO:
            return self._fifo(candidates)
        return self._residency_aware(candidates, now)

    def _fifo(self, candidates: list[Pending]) -> list[Pending]:
        batch: list[Pending] = []
        tasks: set[str] = set()
        for p in candidates:
            if len(batch) == self.max_batch_size:
                break
            if p.task not in tasks and batch and not self.chip.fits(tasks | {p.task}):
                break
            batch.append(p)
            tasks.add(p.task)
        return batch

    def _residency_aware(self, candidates: list[Pending], now: float) -> list[Pending]:
        batch: list[Pending] = []
        tasks: set[str] = set()

        def take(p: Pending) -> bool:
            if len(batch) == self.max_batch_size:
                return False
            if p.task not in tasks and batch and not self.chip.fits(tasks | {p.task}):
                return False
            batch.append(p)
            tasks.add(p.task)
            return True

        overdue = [p for p in candidates if now - p.arrival >= self.max_wait_s]
        for p in overdue:
            take(p)
        resident = self.chip.resident()
        for p in candidates:
            if all(p is not q for q in batch) and (p.task in tasks or p.task in resident):
                take(p)
        if not batch:  # nothing resident is waiting: load the task the policy prefers
            first = self._next_to_load(candidates)
            for p in candidates:
                if p.task == first:
                    take(p)
            chosen = {id(q) for q in batch}
            for p in candidates:  # then fill with whatever else fits beside it
                if id(p) not in chosen:
                    take(p)
        return batch

    def _next_to_load(self, candidates: list[Pending]) -> str:
        if self.policy is SchedulingPolicy.LRU:
            return candidates[0].task
        waiting: dict[str, int] = {}
        for p in candidates:
            waiting[p.task] = waiting.get(p.task, 0) + 1
        order: dict[str, int] = {}
        for i, p in enumerate(candidates):
            order.setdefault(p.task, i)
        return max(waiting, key=lambda t: (waiting[t] / max(self.chip.reload_energy_j(t), 1e-15),
                                           -order[t]))
