"""Properties of the batch scheduler over random queues, chips and clocks.

Whatever the queue, a batch is a non-empty set of queued requests of one key that the
chip can hold together; FIFO takes a prefix in arrival order; the residency-aware
policies serve an overdue oldest request at once and otherwise stay on resident tasks;
and draining a queue serves every request exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.scheduler import BatchScheduler, ChipView, Pending, SchedulingPolicy

TASKS = ("a", "b", "c", "d", "e")
SETTINGS = settings(max_examples=300, deadline=None)


@dataclass
class Chip:
    """Holds ``capacity`` tasks; running a batch loads its tasks, evicting the LRU ones."""

    capacity: int
    resident: list[str]
    energy: dict[str, float]

    def view(self) -> ChipView:
        return ChipView(resident=lambda: set(self.resident),
                        fits=lambda tasks: len(tasks) <= self.capacity,
                        reload_energy_j=lambda t: self.energy[t])

    def run(self, batch: list[Pending]) -> None:
        for task in dict.fromkeys(p.task for p in batch):
            if task in self.resident:
                self.resident.remove(task)
            self.resident.append(task)
        del self.resident[:-self.capacity]


@st.composite
def chips(draw: st.DrawFn) -> Chip:
    capacity = draw(st.integers(1, 3))
    resident = draw(st.lists(st.sampled_from(TASKS), unique=True, max_size=capacity))
    energy = {t: draw(st.floats(0.0, 10.0)) for t in TASKS}
    return Chip(capacity, resident, energy)


@st.composite
def queues(draw: st.DrawFn) -> list[Pending]:
    """Requests with few distinct arrival times (ties are ordered by ``seq``) and two keys."""
    items = draw(st.lists(st.tuples(st.sampled_from(TASKS), st.sampled_from(("s", "l")),
                                    st.integers(0, 20)), max_size=24))
    queue = [Pending(task, key, arrival / 10, None, seq)
             for seq, (task, key, arrival) in enumerate(items)]
    return draw(st.permutations(queue))  # the queue's own order carries no meaning


POLICIES = st.sampled_from(list(SchedulingPolicy))
SIZES = st.integers(1, 6)
WAITS = st.sampled_from((0.0, 0.3, 1.0, float("inf")))
NOW = st.integers(0, 40).map(lambda t: t / 10)


def order(p: Pending) -> tuple[float, int]:
    return (p.arrival, p.seq)


@SETTINGS
@given(POLICIES, SIZES, WAITS, chips(), queues(), NOW)
def test_a_batch_is_queued_requests_of_one_key_that_fit(
    policy: SchedulingPolicy, size: int, wait: float, chip: Chip, queue: list[Pending],
    now: float,
) -> None:
    batch = BatchScheduler(policy, size, wait, chip.view()).select(queue, now)
    if not queue:
        assert batch == []
        return
    assert 1 <= len(batch) <= size
    assert len({id(p) for p in batch}) == len(batch), "a request is in the batch twice"
    assert {id(p) for p in batch} <= {id(p) for p in queue}, "a request that was not queued"
    oldest = min(queue, key=order)
    assert {p.key for p in batch} == {oldest.key}
    tasks = {p.task for p in batch}
    assert len(tasks) <= chip.capacity, "the batch's tasks do not fit"
    candidates = sorted((p for p in queue if p.key == oldest.key), key=order)
    if policy is SchedulingPolicy.FIFO:
        assert [id(p) for p in batch] == [id(p) for p in candidates[:len(batch)]]
        if len(batch) < min(size, len(candidates)):  # it stopped at a task that does not fit
            assert len(tasks | {candidates[len(batch)].task}) > chip.capacity
        return
    overdue = [p for p in candidates if now - p.arrival >= wait]
    if overdue:
        assert batch[0] is oldest, "the oldest overdue request waits"
        chosen = {id(p) for p in batch}
        for p in overdue:  # an overdue request left out had no room: batch full of older
            if id(p) not in chosen:  # overdue ones, or its task does not fit beside them
                full_of_older = len(batch) == size and all(
                    order(q) < order(p) and q in overdue for q in batch)
                assert full_of_older or len(tasks | {p.task}) > chip.capacity
    elif any(p.task in chip.resident for p in candidates):
        assert tasks <= set(chip.resident), "switched task while a resident one waits"
    else:
        waiting = {t: sum(p.task == t for p in candidates) for t in {p.task for p in candidates}}
        first = batch[0].task
        if policy is SchedulingPolicy.LRU:
            assert first == candidates[0].task
        else:
            rate = {t: n / max(chip.energy[t], 1e-15) for t, n in waiting.items()}
            assert rate[first] == max(rate.values())
        assert sum(p.task == first for p in batch) == min(size, waiting[first])


@SETTINGS
@given(POLICIES, SIZES, WAITS, chips(), queues(), st.integers(1, 5))
def test_draining_serves_every_request_once(
    policy: SchedulingPolicy, size: int, wait: float, chip: Chip, queue: list[Pending],
    step_tenths: int,
) -> None:
    """Batches formed one after another while the clock runs: each request is served in
    exactly one batch, none is lost, and an overdue oldest request goes in the next batch."""
    scheduler = BatchScheduler(policy, size, wait, chip.view())
    waiting = list(queue)
    served: list[int] = []
    now = 2.0
    for _ in range(len(queue)):
        if not waiting:
            break
        batch = scheduler.select(waiting, now)
        assert batch, "a non-empty queue gave an empty batch"
        oldest = min(waiting, key=order)
        if policy is not SchedulingPolicy.FIFO and now - oldest.arrival >= wait:
            assert oldest in batch
        chosen = {id(p) for p in batch}
        served += chosen
        waiting = [p for p in waiting if id(p) not in chosen]
        chip.run(batch)
        now += step_tenths / 10
    assert not waiting
    assert sorted(served) == sorted(id(p) for p in queue)


@pytest.mark.parametrize(("size", "wait"), [(0, 1.0), (4, -1.0), (4, float("nan"))])
def test_settings_that_would_stall_or_starve_are_refused(size: int, wait: float) -> None:
    """Regression: batch size 0 returned an empty batch for a non-empty queue (the batcher
    would spin) and a NaN wait bound never made a request overdue (starvation)."""
    chip = Chip(1, [], dict.fromkeys(TASKS, 1.0))
    with pytest.raises(ValueError, match=r"max_batch_size|max_wait_s"):
        BatchScheduler("lru", size, wait, chip.view())


def test_more_overdue_requests_than_the_chip_holds_go_oldest_first() -> None:
    """The wait bound is an order, not a deadline for every request: three overdue tasks on
    a chip that holds one are served one batch after another, oldest first."""
    chip = Chip(1, ["hot"], {"a": 1.0, "b": 1.0, "c": 1.0, "hot": 1.0})
    scheduler = BatchScheduler("lru", 8, 0.1, chip.view())
    queue = [Pending(t, "s", arrival, None, seq)
             for seq, (t, arrival) in enumerate((("b", 0.1), ("a", 0.0), ("hot", 0.95),
                                                 ("c", 0.2)))]
    served = []
    while queue:
        batch = scheduler.select(queue, now=1.0)
        served.append([p.task for p in batch])
        queue = [p for p in queue if all(p is not q for q in batch)]
        chip.run(batch)
    assert served == [["a"], ["b"], ["c"], ["hot"]]
