from __future__ import annotations

import pytest
import torch
from torch import nn

from core.chip.config import LOSSLESS_CHIP, CrossbarConfig
from core.chip.mapping import ModelMapping, PEId, map_layer
from core.chip.pool import (
    EnergyAwareEviction,
    EventKind,
    LRUEviction,
    PoolConfig,
    SparePEPool,
    default_spare_pes,
    task_pe_levels,
)
from core.chip.programming import ProgrammingConfig, programming_cost
from core.errors import ConfigError, TaskNotFound
from core.lru import CapacityError
from core.task_state import LayerTaskState, TaskState, ones_code, random_head, random_task_state

PJ = 1e-12
MASK_PJ = 9 * 0.05  # 3 logical columns x 3 bits at 0.05 pJ/bit


def hand_mapping() -> ModelMapping:
    """One 1x1 layer, 3 -> 3 channels, on 4x4 crossbars (2 outputs of 2 slices per PE).

    Two PEs: (0, 0) holds outputs 0-1, (0, 1) outputs 2 only; both use 3 of 4 rows.
    """
    config = CrossbarConfig(rows=4, cols=4, **LOSSLESS_CHIP)  # offset cells, as written
    layer = map_layer("conv", 0, nn.Conv2d(3, 3, 1, bias=False, device="meta"), config,
                      weight_bits=4, input_bits=4, input_signed=False)
    return ModelMapping(config, (layer,))


def hand_task(task_id: str, first_weights: list[int] | None, *,
              pe: tuple[int, int] = (0, 1)) -> TaskState:
    """A task replacing PE ``pe`` whose output 0 has weights ``first_weights`` on rows 0-2."""
    mapping = hand_mapping()
    layer = mapping.layer("conv")
    pe_mask = torch.zeros(1, 2, dtype=torch.bool)
    spare = torch.zeros(0, 2, 4, dtype=torch.int8)
    if first_weights is not None:
        pe_mask[pe] = True
        spare = torch.zeros(1, 2, 4, dtype=torch.int8)
        spare[0, 0, :3] = torch.tensor(first_weights, dtype=torch.int8)
    codes = torch.full((1, 3), ones_code(3), dtype=torch.uint8)
    state = LayerTaskState(pe_mask, spare, codes)
    state.validate(layer, 3, 4)
    return TaskState(task_id, 3, random_head(2, 3), {"conv": state})


def test_cell_levels_of_a_spare_pe() -> None:
    pes, levels, valid = task_pe_levels(hand_task("x", [7, -8, 0]), hand_mapping(), 2)
    assert pes == [PEId("conv", 0, 1)]
    # code 7 -> u 15 -> cells (3, 3); -8 -> (0, 0); 0 -> u 8 -> (2, 0); column = o*2 + slice
    assert levels[0].tolist() == [[3, 3, 2, 0], [0, 0, 2, 0], [2, 0, 2, 0], [2, 0, 2, 0]]
    # edge PE: one output (2 columns) and 3 of 4 rows are in use; the zero padding is not
    assert valid[0].tolist() == [[True, True, False, False]] * 3 + [[False] * 4]


def test_making_a_task_resident_costs_its_level_changes_by_hand() -> None:
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=1, mask_entries=2))
    x = pool.ensure_resident(hand_task("x", [7, -8, 0]))
    # from level 0: two cells 0->3 (132 pJ each: 16 V^2 x 5.5 uS x 50 ns x 30 pulses)
    # and one 0->2 (16 x 4 uS x 50 ns x 20 = 64 pJ); unused cells are not written
    assert x.programmed and x.slots == (0,)
    assert x.event is not None and x.event.kind is EventKind.PROGRAM
    assert x.event.report.energy_j == pytest.approx(328 * PJ)
    assert (x.event.report.cells_written, x.event.report.pulses) == (3, 80)
    assert x.event.mask_bits_written == 9
    assert x.event.energy_j == pytest.approx((328 + MASK_PJ) * PJ)
    # y differs in one cell: 7 -> 5 is (3, 3) -> (3, 1): 16 x 7 uS x 50 ns x 20 = 112 pJ
    y = pool.ensure_resident(hand_task("y", [5, -8, 0]))
    assert y.evicted == ("x",) and y.slots == (0,)
    assert y.event is not None and y.event.report.energy_j == pytest.approx(112 * PJ)
    back = pool.ensure_resident(hand_task("x", [7, -8, 0]))
    assert back.event is not None and back.event.report.energy_j == pytest.approx(112 * PJ)
    assert pool.energy_by_task() == pytest.approx(
        {"x": (328 + 112 + 2 * MASK_PJ) * PJ, "y": (112 + MASK_PJ) * PJ})
    assert pool.write_counter is not None
    counts = pool.write_counter.counts[0]
    assert counts[0].tolist() == [1, 3, 0, 0] and counts[2].tolist() == [1, 0, 0, 0]
    assert pool.write_counter.total_writes == 5
    assert [(e.kind.value, e.task_id) for e in pool.events] == [
        ("program", "x"), ("evict", "x"), ("program", "y"), ("evict", "y"), ("program", "x")]
    assert pool.cell_levels(0)[0].tolist() == [3, 3, 0, 0]


def test_switching_between_resident_tasks_costs_nothing() -> None:
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=2))
    x, y = hand_task("x", [7, -8, 0]), hand_task("y", [1, 2, 3], pe=(0, 0))
    pool.ensure_resident(x)
    pool.ensure_resident(y)
    events, energy = len(pool.events), pool.total_energy_j
    writes = pool.write_counter.total_writes  # type: ignore[union-attr]
    for task in (x, y, x, y, hand_task("x", [7, -8, 0])):  # an equal copy is resident too
        result = pool.ensure_resident(task)
        assert not result.programmed and result.event is None
    assert len(pool.events) == events and pool.total_energy_j == energy
    assert pool.write_counter.total_writes == writes  # type: ignore[union-attr]
    assert pool.task_stats["x"].hits == 3 and pool.task_stats["y"].hits == 2
    assert [(s.owner, s.holds) for s in pool.slot_table()] == [
        ("x", PEId("conv", 0, 1)), ("y", PEId("conv", 0, 0))]
    assert pool.mask_table() == ["x", "y"]


def test_request_stream_with_a_pool_smaller_than_the_task_set() -> None:
    a, b, c = (hand_task(n, w) for n, w in (("a", [7, 7, 7]), ("b", [-8, 0, 3]),
                                             ("c", [1, -1, 6])))
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=4))
    for task in (a, b, a, c, b, a):
        pool.ensure_resident(task)
    program = [e for e in pool.events if e.kind is EventKind.PROGRAM]
    # LRU: c evicts b (a was used after b), b evicts a, a evicts c
    assert [(e.task_id, e.slots, e.evicted) for e in program] == [
        ("a", (0,), ()), ("b", (1,), ()), ("c", (1,), ("b",)), ("b", (0,), ("a",)),
        ("a", (1,), ("c",))]
    prog = ProgrammingConfig()
    mapping = hand_mapping()

    def levels(task: TaskState) -> torch.Tensor:
        _, lv, valid = task_pe_levels(task, mapping, 2)
        return torch.where(valid, lv, torch.zeros_like(lv))

    def cost(old: TaskState | None, new: TaskState) -> float:
        start = torch.zeros(1, 4, 4, dtype=torch.uint8) if old is None else levels(old)
        return programming_cost(start, levels(new), prog).energy_j

    expected = {"a": cost(None, a) + cost(c, a), "b": cost(None, b) + cost(a, b),
                "c": cost(b, c)}
    assert {t: s.programming.energy_j for t, s in pool.task_stats.items()} == pytest.approx(
        expected)
    assert pool.energy_by_task()["a"] == pytest.approx(expected["a"] + 2 * MASK_PJ * PJ)
    assert pool.task_stats["a"].hits == 1
    assert {t: (s.loads, s.evictions) for t, s in pool.task_stats.items()} == {
        "a": (2, 1), "b": (2, 1), "c": (1, 1)}


def test_reloading_an_evicted_task_reuses_cells_it_still_holds() -> None:
    mapping = hand_mapping()
    pool = SparePEPool(mapping, PoolConfig(spare_pes=2, mask_entries=1))
    x = hand_task("x", [7, -8, 0])
    pool.ensure_resident(x)
    pool.ensure_resident(hand_task("m", None))  # masks only: evicts x for its mask entry
    assert pool.resident_tasks() == ["m"] and pool.slot_table()[0].holds_task == "x"
    again = pool.ensure_resident(x)
    assert again.slots == (0,) and again.event is not None
    assert again.event.report.energy_j == 0.0 and again.event.mask_bits_written == 9


def test_energy_aware_policy_evicts_the_cheap_reload() -> None:
    stream = [hand_task("expensive", [7, 7, 7]), hand_task("masks", None),
              hand_task("other", None)]
    victims = {}
    for policy in (LRUEviction(), EnergyAwareEviction()):
        pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=2),
                           policy=policy)
        for task in stream:
            result = pool.ensure_resident(task)
        victims[policy.name] = result.evicted
    assert victims == {"lru": ("expensive",), "energy": ("masks",)}


def test_greedy_dual_ages_out_expensive_tasks() -> None:
    policy = EnergyAwareEviction()
    policy.on_load("big", 10.0)
    policy.on_load("small", 1.0)
    assert policy.choose_victim(["big", "small"]) == "small"  # inflation rises to 1
    policy.on_evict("small")
    for _ in range(8):  # each eviction raises the inflation by one
        policy.on_load("s", 1.0)
        assert policy.choose_victim(["big", "s"]) == "s"
        policy.on_evict("s")
    policy.on_load("s", 1.0)  # credit 9 + 1 ties big's 10: the older one, big, goes
    assert policy.choose_victim(["big", "s"]) == "big"


def test_capacity_errors_and_pinning() -> None:
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=1, mask_entries=2))
    two_pes = hand_task("two", [1, 1, 1])
    state = two_pes.layers["conv"]
    full = LayerTaskState(torch.ones(1, 2, dtype=torch.bool),
                          torch.zeros(2, 2, 4, dtype=torch.int8), state.column_codes)
    with pytest.raises(CapacityError, match="1 spare PEs"):
        pool.ensure_resident(TaskState("big", 3, two_pes.head, {"conv": full}))
    assert pool.events == type(pool.events)(maxlen=pool.events.maxlen)
    pool.ensure_resident(hand_task("x", [7, -8, 0]))
    pool.pin("x")
    with pytest.raises(CapacityError, match="pinned"):
        pool.ensure_resident(hand_task("y", [5, -8, 0]))
    assert pool.resident_tasks() == ["x"]
    pool.unpin("x")
    assert pool.ensure_resident(hand_task("y", [5, -8, 0])).evicted == ("x",)
    with pytest.raises(TaskNotFound):
        pool.pin("x")
    with pytest.raises(TaskNotFound):
        pool.evict("x")
    pool.forget("y")
    assert pool.resident_tasks() == [] and pool.free_slots == 1


def test_new_version_of_a_resident_task_rewrites_only_changed_cells() -> None:
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=1))
    pool.ensure_resident(hand_task("x", [7, -8, 0]))
    pool.pin("x")
    update = pool.ensure_resident(hand_task("x", [7, -8, 1]))  # 0 -> 1 is (2,0) -> (2,1)
    assert update.programmed and update.slots == (0,) and update.event is not None
    assert update.event.report.cells_written == 1 and update.event.evicted == ()
    assert pool.resident_tasks() == ["x"]
    with pytest.raises(CapacityError, match="pinned"):  # the new version stays pinned
        pool.ensure_resident(hand_task("y", [5, -8, 0]))


def test_a_new_version_loads_before_the_old_one_leaves() -> None:
    # beside the old version when PEs are free: the old one keeps its PEs until then
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=2))
    first = pool.ensure_resident(hand_task("x", [7, -8, 0]))
    update = pool.ensure_resident(hand_task("x", [7, -8, 1]))
    assert update.programmed and set(update.slots).isdisjoint(first.slots)
    assert update.mask_entry != first.mask_entry and update.evicted == ()
    assert pool.resident_tasks() == ["x"] and pool.free_slots == 1
    assert pool.mask_table().count("x") == 1


def test_a_refused_new_version_leaves_the_old_one_resident() -> None:
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=2))
    pool.ensure_resident(hand_task("x", [7, -8, 0], pe=(0, 0)))
    pool.ensure_resident(hand_task("y", [5, -8, 0]))
    pool.pin("y")  # as during a batch that mixes x and y
    two_pes = LayerTaskState(torch.ones(1, 2, dtype=torch.bool),
                             torch.zeros(2, 2, 4, dtype=torch.int8),
                             hand_task("x", None).layers["conv"].column_codes)
    before = (pool.slot_table(), pool.mask_table(), list(pool.events))
    with pytest.raises(CapacityError, match="old version stays resident"):
        pool.ensure_resident(TaskState("x", 3, random_head(2, 3), {"conv": two_pes}))
    assert (pool.slot_table(), pool.mask_table(), list(pool.events)) == before
    assert set(pool.resident_tasks()) == {"x", "y"} and pool.slots_of("x") == (0,)
    # once y is unpinned, the new version takes both PEs (y is evicted, then x's old one)
    pool.unpin("y")
    update = pool.ensure_resident(TaskState("x", 3, random_head(2, 3), {"conv": two_pes}))
    assert update.evicted == ("y",) and sorted(update.slots) == [0, 1]
    assert pool.resident_tasks() == ["x"]


def test_config_validation() -> None:
    mapping = hand_mapping()
    with pytest.raises(ConfigError):
        PoolConfig(mask_entries=0)
    with pytest.raises(ConfigError):
        PoolConfig(spare_pes=-1)
    with pytest.raises(ConfigError, match="cells"):
        SparePEPool(mapping, programming=ProgrammingConfig(bits_per_cell=1))


def test_default_pool_holds_about_two_mobilenet_tasks(quantized_mobilenet) -> None:
    mapping = quantized_mobilenet.mapping
    assert default_spare_pes(mapping) == 2 * 103  # 10% of 1,021 PEs, rounded up, twice
    pool = SparePEPool(mapping)
    assert pool.num_slots == 206
    head = random_head(2, 1280)
    tasks = [random_task_state(f"t{i}", mapping, head, pe_fraction=0.09, seed=i)
             for i in range(3)]
    first = pool.ensure_resident(tasks[0])
    pool.ensure_resident(tasks[1])
    assert pool.resident_tasks() == ["t0", "t1"]
    assert first.event is not None and first.event.report.energy_j > 0
    assert first.event.mask_bits_written == 35_088 * 3
    assert pool.ensure_resident(tasks[2]).evicted == ("t0",)
    assert pool.write_counter is not None and pool.write_counter.max_writes >= 1


def test_a_refused_load_evicts_nothing() -> None:
    """Regression: room was made one eviction at a time, so a load that could not fit
    (the PEs it needs held by a pinned task) still evicted the unpinned ones first."""
    pool = SparePEPool(hand_mapping(), PoolConfig(spare_pes=2, mask_entries=3))
    pool.ensure_resident(hand_task("x", [7, -8, 0]))
    pool.pin("x")
    pool.ensure_resident(hand_task("m", None))  # masks only: holds an entry, no PEs
    two_pes = LayerTaskState(torch.ones(1, 2, dtype=torch.bool),
                             torch.zeros(2, 2, 4, dtype=torch.int8),
                             hand_task("x", None).layers["conv"].column_codes)
    before = (pool.slot_table(), pool.mask_table(), list(pool.events))
    with pytest.raises(CapacityError, match=r"frees only 1 PEs .*nothing was evicted"):
        pool.ensure_resident(TaskState("big", 3, random_head(2, 3), {"conv": two_pes}))
    assert (pool.slot_table(), pool.mask_table(), list(pool.events)) == before
    assert pool.resident_tasks() == ["x", "m"]
