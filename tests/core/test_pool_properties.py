"""Properties of the spare-PE pool over random streams of loads, pins and evictions.

Next to the pool runs a small model of what must hold: the resident tasks, their PE
counts, pins and (for the LRU policy) recency. Whatever the stream, no two resident
tasks share a spare PE, a resident task's cells hold its weights, capacity is never
exceeded, a load is refused only when it cannot fit and a refused load changes nothing.
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from core.chip.config import CrossbarConfig
from core.chip.mapping import ModelMapping, map_layer
from core.chip.pool import (
    EnergyAwareEviction,
    EventKind,
    LRUEviction,
    PoolConfig,
    SparePEPool,
    task_pe_levels,
)
from core.lru import CapacityError
from core.task_state import LayerTaskState, TaskState, ones_code, random_head

TASKS = ("a", "b", "c", "d")
VERSIONS = 2


def small_mapping() -> ModelMapping:
    """Two 1x1 layers on 4x4 crossbars with 2-bit cells: 6 + 4 PEs, edge PEs included."""
    config = CrossbarConfig(rows=4, cols=4)
    layers = tuple(
        map_layer(f"conv{i}", i, nn.Conv2d(c_in, c_out, 1, bias=False, device="meta"), config,
                  weight_bits=4, input_bits=4, input_signed=False)
        for i, (c_in, c_out) in enumerate(((6, 5), (5, 4))))
    return ModelMapping(config, layers)


MAPPING = small_mapping()


def make_task(task_id: str, masks: list[list[bool]], seed: int) -> TaskState:
    g = torch.Generator().manual_seed(seed)
    shift_levels = MAPPING.config.shift_levels
    layers = {}
    for layer, flat in zip(MAPPING.crossbar_layers, masks, strict=True):
        pe_mask = torch.tensor(flat, dtype=torch.bool).view(layer.row_groups, layer.col_groups)
        n = int(pe_mask.sum())
        spare = torch.randint(-8, 8, (n, layer.outputs_per_pe, layer.rows_per_group),
                              generator=g, dtype=torch.int8)
        codes = torch.randint(0, ones_code(shift_levels) + 1,
                              (layer.row_groups, layer.out_channels), generator=g).to(torch.uint8)
        layers[layer.name] = LayerTaskState(pe_mask, spare, codes)
    return TaskState(task_id, shift_levels, random_head(2, 3), layers)


def same_content(x: TaskState, y: TaskState) -> bool:
    """What residency loads is equal (two drawn versions of a task may coincide)."""
    return x.layers.keys() == y.layers.keys() and all(
        torch.equal(getattr(x.layers[n], f), getattr(y.layers[n], f))
        for n in x.layers for f in ("pe_mask", "spare_codes", "column_codes"))


def task_strategy(task_id: str) -> st.SearchStrategy[TaskState]:
    masks = st.tuples(*(st.lists(st.booleans(), min_size=layer.row_groups * layer.col_groups,
                                 max_size=layer.row_groups * layer.col_groups)
                        for layer in MAPPING.crossbar_layers))
    return st.builds(lambda m, seed: make_task(task_id, list(m), seed), masks,
                     st.integers(0, 3))


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = SparePEPool(MAPPING, PoolConfig(spare_pes=0))
        self.catalogue: dict[str, list[TaskState]] = {}
        self.loaded: dict[str, TaskState] = {}  # the version resident, per task
        self.pinned: set[str] = set()
        self.recency: list[str] = []  # least recently used first (LRU policy)

    @initialize(spare_pes=st.integers(0, 8), mask_entries=st.integers(1, 3),
                lru=st.booleans(), data=st.data())
    def make(self, spare_pes: int, mask_entries: int, lru: bool, data: st.DataObject) -> None:
        policy = LRUEviction() if lru else EnergyAwareEviction()
        self.pool = SparePEPool(MAPPING, PoolConfig(spare_pes=spare_pes,
                                                    mask_entries=mask_entries), policy=policy)
        self.catalogue = {t: [data.draw(task_strategy(t)) for _ in range(VERSIONS)]
                          for t in TASKS}

    def snapshot(self) -> tuple[object, ...]:
        pool = self.pool
        return (pool.slot_table(), pool.mask_table(), pool.resident_tasks(), list(pool.events),
                [pool.cell_levels(i).tolist() for i in range(pool.num_slots)],
                pool.energy_by_task())

    @staticmethod
    def pes(task: TaskState) -> int:
        return sum(int(s.pe_mask.sum()) for s in task.layers.values())

    @rule(task_id=st.sampled_from(TASKS), version=st.integers(0, VERSIONS - 1))
    def load(self, task_id: str, version: int) -> None:
        pool, task = self.pool, self.catalogue[task_id][version]
        need = self.pes(task)
        current = self.loaded.get(task_id)
        hit = current is not None and same_content(current, task)
        pinned_others = self.pinned - {task_id}
        pinned_pes = sum(len(pool.slots_of(t)) for t in pinned_others)
        fits = hit or (need + pinned_pes <= pool.num_slots
                       and len(pinned_others) < pool.config.mask_entries)
        before = self.snapshot()
        sizes = {t: len(pool.slots_of(t)) for t in pool.resident_tasks()}
        others_before = {t: pool.slots_of(t) for t in pool.resident_tasks() if t != task_id}
        try:
            result = pool.ensure_resident(task)
        except CapacityError:
            assert not fits, "a load that fits was refused"
            assert self.snapshot() == before, "a refused load changed the pool"
            return
        assert fits, "a load that cannot fit succeeded"
        assert result.programmed is not hit
        assert pool.is_resident(task_id) and len(result.slots) == need
        evicted = result.evicted
        assert not set(evicted) & (self.pinned | {task_id}), "evicted a pinned task"
        # every displaced task was needed to make room: one fewer would not have done
        free = pool.num_slots - sum(sizes.values())
        entries = pool.config.mask_entries - len(sizes)
        if current is not None and not hit:
            if free >= need and entries >= 1:
                assert evicted == (), "a new version that fits beside the old one evicts"
            else:
                free, entries = free + sizes[task_id], entries + 1
        for i, victim in enumerate(evicted):
            assert free < need or entries < 1, f"evicted {evicted[i:]} without need"
            free, entries = free + sizes[victim], entries + 1
        if isinstance(pool.policy, LRUEviction):
            order = [t for t in self.recency if t not in self.pinned and t != task_id]
            assert list(evicted) == order[:len(evicted)], "not least recently used first"
        for t, slots in others_before.items():  # residents that stay keep their PEs
            assert t in evicted or pool.slots_of(t) == slots
        for t in evicted:
            del self.loaded[t]
            self.recency.remove(t)
        self.loaded[task_id] = task
        if task_id in self.recency:
            self.recency.remove(task_id)
        self.recency.append(task_id)

    @precondition(lambda self: bool(self.loaded))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.loaded)))
        self.pool.pin(task_id)
        self.pinned.add(task_id)

    @rule(task_id=st.sampled_from(TASKS))
    def unpin(self, task_id: str) -> None:
        self.pool.unpin(task_id)
        self.pinned.discard(task_id)

    @precondition(lambda self: bool(self.loaded))
    @rule(data=st.data(), forget=st.booleans())
    def evict(self, data: st.DataObject, forget: bool) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.loaded)))
        if forget:
            self.pool.forget(task_id)
        else:
            event = self.pool.evict(task_id)
            assert event.kind is EventKind.EVICT and event.energy_j == 0.0
        del self.loaded[task_id]
        self.pinned.discard(task_id)
        self.recency.remove(task_id)

    @invariant()
    def residency_is_consistent(self) -> None:
        pool = self.pool
        assert set(pool.resident_tasks()) == set(self.loaded)
        owned: dict[int, str] = {}
        for t in pool.resident_tasks():
            for slot in pool.slots_of(t):
                assert slot not in owned, f"spare PE {slot} held by {owned[slot]} and {t}"
                owned[slot] = t
        table = pool.slot_table()
        assert {s.slot: s.owner for s in table if s.owner is not None} == owned
        assert pool.free_slots == pool.num_slots - len(owned)
        masks = pool.mask_table()
        assert len(masks) == pool.config.mask_entries
        assert sorted(m for m in masks if m is not None) == sorted(self.loaded)

    @invariant()
    def resident_cells_hold_their_tasks(self) -> None:
        pool = self.pool
        for t, task in self.loaded.items():
            pe_ids, levels, valid = task_pe_levels(task, MAPPING, pool.programming.bits_per_cell)
            slots = pool.slots_of(t)
            assert [pool.slot_table()[s].holds for s in slots] == pe_ids
            for i, slot in enumerate(slots):
                cells = pool.cell_levels(slot)
                assert torch.equal(cells[valid[i]], levels[i][valid[i]])

    @invariant()
    def energy_is_the_sum_of_events(self) -> None:
        total = sum(e.energy_j for e in self.pool.events)
        assert abs(self.pool.total_energy_j - total) <= 1e-9 * max(1.0, abs(total)) + 1e-24


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30,
                                         deadline=None)
TestPool = PoolMachine.TestCase
