"""A batch that mixes tasks gives each sample its own task's output."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.chip.config import PAPER_CHIP, CrossbarSettings, Fidelity
from core.chip.pool import PoolConfig, SparePEPool
from core.engine import CrossbarEngine
from core.lru import CapacityError
from core.nn import layers
from core.nn.model import CrossbarModel
from core.task_state import TaskState, random_head, random_task_state


def _tasks(engine: CrossbarEngine, count: int, *, pe_fraction: float) -> list[str]:
    """Random tasks; odd ones also carry their own BatchNorm terms."""
    mapping = engine.mapping
    names = sorted(engine._digital_names)
    ids = []
    for i in range(count):
        task = random_task_state(f"t{i}", mapping, random_head(3 + i, 1280, seed=i),
                                 pe_fraction=pe_fraction, seed=i)
        digital = {}
        if i % 2:
            g = torch.Generator().manual_seed(100 + i)
            for name in names[i::5]:
                value = engine.backbone_digital(name).detach().clone()
                if name.endswith(("weight", "bias")):
                    value = value + 0.05 * torch.randn(value.shape, generator=g)
                elif name.endswith("running_var"):
                    value = value * (1 + 0.1 * torch.rand(value.shape, generator=g))
                digital[name] = value
        engine.add_task(TaskState(task.task_id, task.shift_levels, task.head, task.layers,
                                  digital))
        ids.append(task.task_id)
    engine.add_task(TaskState("plain", mapping.config.shift_levels,
                              random_head(4, 1280, seed=9)))
    return [*ids, "plain"]


def _alone(engine: CrossbarEngine, x: torch.Tensor, ids: list[str],
           fidelity: Fidelity) -> list[torch.Tensor]:
    """Each task's samples run as one batch of that task only."""
    out: list[torch.Tensor | None] = [None] * len(ids)
    for task in dict.fromkeys(ids):
        rows = [i for i, t in enumerate(ids) if t == task]
        logits = engine.forward(x[rows], task, fidelity)
        for row, value in zip(rows, logits, strict=True):
            out[row] = value
    return [v for v in out if v is not None]


@pytest.mark.parametrize("pe_fraction", [0.02, 0.3])
def test_mixed_batch_equals_each_task_alone_ideal(quantized_mobilenet: CrossbarModel,
                                                  pe_fraction: float) -> None:
    engine = CrossbarEngine(quantized_mobilenet)
    ids = _tasks(engine, 4, pe_fraction=pe_fraction)
    order = [ids[i] for i in (0, 1, 0, 2, 3, 4, 1, 0, 2, 4, 3, 0)]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mixed = engine.forward_mixed(x, order)
    alone = _alone(engine, x, order, Fidelity.IDEAL)
    for i, (m, a) in enumerate(zip(mixed, alone, strict=True)):
        assert m.shape == a.shape
        assert torch.equal(m, a), (i, order[i], float((m - a).abs().max()))
    # the backbone itself is untouched afterwards: a single-task pass agrees too
    rows = [i for i, t in enumerate(order) if t == order[0]]
    assert torch.equal(engine.forward(x[rows], order[0])[0], alone[0])
    # and per-sample runs agree up to the float summation order of the head
    for i in (1, 5):
        single = engine.forward(x[i:i + 1], order[i])[0]
        torch.testing.assert_close(mixed[i], single, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_takes_one_pass_whatever_the_callers_grad_mode(
        quantized_mobilenet: CrossbarModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's chip thread calls ``run_batch`` with autograd on (a new thread's
    default): the batch still runs as one pass of the backbone, not one per task."""
    engine = CrossbarEngine(quantized_mobilenet)
    ids = _tasks(engine, 2, pe_fraction=0.1)
    order = [ids[i] for i in (0, 1, 2, 0, 1)]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    passes: list[int] = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward",
                        lambda inputs: passes.append(inputs.shape[0]) or forward(inputs))
    with torch.enable_grad():
        logits = engine.run_batch(x, order).logits
    assert passes == [len(order)]
    assert not any(row.requires_grad for row in logits)
    alone = _alone(engine, x, order, Fidelity.IDEAL)
    assert all(torch.equal(m, a) for m, a in zip(logits, alone, strict=True))


@pytest.fixture(scope="module")
def mix_engine(quantized_mobilenet: CrossbarModel) -> tuple[CrossbarEngine, list[str]]:
    """One engine (it owns the model's layers) with tasks that change every crossbar
    layer, the 3x3 stem included, and some of the BatchNorms."""
    engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=8)
    return engine, _tasks(engine, 4, pe_fraction=0.1)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, 4), min_size=1, max_size=9),
       implementation=st.sampled_from(["compiled", "reference"]),
       shared_below=st.sampled_from([0, 16, 1 << 20]),
       seed=st.integers(0, 2**16))
def test_any_task_mix_equals_each_task_alone_bit_for_bit(
        mix_engine: tuple[CrossbarEngine, list[str]], picks: list[int], implementation: str,
        shared_below: int, seed: int) -> None:
    """Through the compiled calls or the per-task products, with 1x1 layers sharing one
    product with the backbone (then recomputing changed channels) or multiplying each
    task's block by its own codes, by map size."""
    engine, ids = mix_engine
    engine.crossbar = replace(engine.crossbar, implementation=implementation)
    order = [ids[i] for i in picks]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    default = layers.SHARED_PASS_PIXELS
    layers.SHARED_PASS_PIXELS = shared_below
    try:
        mixed = engine.forward_mixed(x, order)
    finally:
        layers.SHARED_PASS_PIXELS = default
    alone = _alone(engine, x, order, Fidelity.IDEAL)
    for i, (m, a) in enumerate(zip(mixed, alone, strict=True)):
        assert torch.equal(m, a), (i, order[i], float((m - a).abs().max()))


def test_a_set_of_tasks_keeps_its_calls_for_batches_of_other_rows_and_orders(
        quantized_mobilenet: CrossbarModel) -> None:
    """The calls of a mixed batch are made once per set of tasks (the rows of each task
    come with the batch): a later batch of the same tasks, in another order and other
    numbers, reuses them and still equals each task alone bit for bit."""
    engine = CrossbarEngine(quantized_mobilenet)
    ids = _tasks(engine, 2, pe_fraction=0.3)
    generator = torch.Generator().manual_seed(1)
    batches = [[ids[0], ids[1], ids[1], ids[0], ids[1]],
               [ids[1], ids[0], ids[0], ids[0], ids[1], ids[1], ids[0]],
               [ids[1], ids[2], ids[0]]]
    for order in batches:
        x = torch.randn(len(order), 3, 32, 32, generator=generator)
        mixed = engine.forward_mixed(x, order)
        for i, (m, a) in enumerate(zip(mixed, _alone(engine, x, order, Fidelity.IDEAL),
                                       strict=True)):
            assert torch.equal(m, a), (order, i)
    assert (engine.mixed.stats.misses, engine.mixed.stats.hits) == (2, 1)
    assert sorted(engine.mixed.kept_sets()) == [tuple(sorted(ids)), tuple(sorted(ids[:2]))]


def test_a_task_registered_again_or_dropped_takes_its_kept_calls_along(
        quantized_mobilenet: CrossbarModel) -> None:
    """Kept calls hold a task's prepared weights: a task registered anew is served with
    its new state, and a task whose prepared state leaves the engine (evicted, removed)
    leaves no kept calls behind to hold it in memory."""
    engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=3)
    ids = _tasks(engine, 3, pe_fraction=0.3)  # t0, t1, t2, plain
    generator = torch.Generator().manual_seed(2)
    order = [ids[0], ids[1], ids[0]]
    x = torch.randn(len(order), 3, 32, 32, generator=generator)
    before = engine.forward_mixed(x, order)
    old = engine.tasks[ids[0]]
    new = random_task_state(ids[0], engine.mapping, old.head, pe_fraction=0.3, seed=77)
    engine.add_task(TaskState(ids[0], new.shift_levels, new.head, new.layers, old.digital))
    after = engine.forward_mixed(x, order)
    assert not torch.equal(after[0], before[0])  # the new state, not the kept calls
    for m, a in zip(after, _alone(engine, x, order, Fidelity.IDEAL), strict=True):
        assert torch.equal(m, a)
    assert (ids[0], ids[1]) in engine.mixed.kept_sets()
    for task in (ids[2], ids[3], ids[2]):  # two other tasks push t0 and t1 out
        engine.forward(x[:1], task)
    assert engine.prepared.peek(ids[0]) is None and engine.mixed.kept_sets() == []
    engine.forward_mixed(x[:2], [ids[2], ids[3]])
    engine.remove_task(ids[3])
    assert engine.mixed.kept_sets() == []


def test_a_batch_of_more_tasks_than_the_engine_keeps_prepared_is_planned_anew(
        quantized_mobilenet: CrossbarModel) -> None:
    """Planning a batch of more tasks than the prepared cache holds evicts some of them
    on the way; they come back as new prepared objects next time, so the set's kept
    calls (which hold the old ones) are made again rather than reused."""
    engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=2)
    ids = _tasks(engine, 2, pe_fraction=0.3)  # t0, t1, plain
    order = [ids[0], ids[1], ids[2], ids[0]]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        mixed = engine.forward_mixed(x, order)
        for m, a in zip(mixed, _alone(engine, x, order, Fidelity.IDEAL), strict=True):
            assert torch.equal(m, a)
    assert (engine.mixed.stats.misses, engine.mixed.stats.hits) == (2, 0)
    # a set can hold a task whose prepared state already left: removing (or registering
    # again) that task drops the set all the same
    for drop in (lambda task: engine.add_task(engine.tasks[task]), engine.remove_task):
        engine.mixed.task_set({t: engine.prepare(t) for t in sorted(set(order))})
        gone = next(t for t in order if engine.prepared.peek(t) is None)
        assert engine.mixed.kept_sets()
        drop(gone)
        assert engine.mixed.kept_sets() == []


@pytest.mark.parametrize("implementation", ["reference", "compiled"])
def test_mixed_batch_crossbar_fidelity(quantized_mobilenet: CrossbarModel,
                                       implementation: str) -> None:
    settings = CrossbarSettings(adc_range="full_scale", implementation=implementation)
    engine = CrossbarEngine(quantized_mobilenet, crossbar=settings)
    ids = _tasks(engine, 3, pe_fraction=0.05)
    order = [ids[0], ids[1], ids[3], ids[0], ids[2], ids[1]]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mixed = engine.forward_mixed(x, order, Fidelity.CROSSBAR)
    alone = _alone(engine, x, order, Fidelity.CROSSBAR)
    for m, a in zip(mixed, alone, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
    # the batch exercised spare PEs: without their reads, replaced columns would be 0
    # in the mixed pass and the outputs above could not match
    assert all(engine.tasks[t].replaced_pes > 0 for t in ids[:3])


@pytest.mark.parametrize("implementation", ["reference", "compiled"])
@pytest.mark.parametrize("chip", ["paper", "default"])
def test_a_lossy_chip_reads_each_tasks_block_with_its_own_cells(
        quantized_mobilenet: CrossbarModel, implementation: str, chip: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a lossy chip (the paper's periphery, or the default one, whose reads are
    summed in segments) each task's block of samples is read with its own programmed
    cells: compiled, one call per layer for every block; either way the bits the task
    alone gets on those samples."""
    from core.ops import crossbar as crossbar_ops

    changes = PAPER_CHIP if chip == "paper" else {}
    model = quantized_mobilenet.with_chip(**changes)
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(
        adc_range="full_scale", adc_bits=5, dac_mode="multi_bit",
        implementation=implementation))
    ids = _tasks(engine, 3, pe_fraction=0.05)
    order = [ids[1], ids[0], ids[2], ids[3], ids[0], ids[1], ids[1]]
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layer_blocks: list[list[int]] = []
    compiled_calls: list[int] = []
    blocks_of, one_call = layers.crossbar_conv2d_blocks, crossbar_ops._compiled_matmul_blocks

    def each_layer(codes: torch.Tensor, blocks: list[tuple[int, int, object]],
                   *args: object, **kwargs: object) -> torch.Tensor:
        layer_blocks.append([stop - start for start, stop, _ in blocks])
        return blocks_of(codes, blocks, *args, **kwargs)  # type: ignore[arg-type]

    def each_call(codes: torch.Tensor, blocks: list[object], *args: object) -> None:
        compiled_calls.append(len(blocks))
        one_call(codes, blocks, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(layers, "crossbar_conv2d_blocks", each_layer)
    monkeypatch.setattr(crossbar_ops, "_compiled_matmul_blocks", each_call)
    mixed = engine.forward_mixed(x, order, Fidelity.CROSSBAR)
    assert not any(p.lossless for p in engine.programmer.backbone_programs.values())
    on_crossbar = sum(1 for _, layer in layers.crossbar_layers(model) if layer.on_crossbar)
    assert len(layer_blocks) == on_crossbar
    assert all(sum(sizes) == len(order) for sizes in layer_blocks)
    assert max(len(sizes) for sizes in layer_blocks) == 4  # four tasks, one block each
    if implementation == "compiled":
        assert compiled_calls.count(4) >= on_crossbar // 2  # the blocks of a layer at once
    else:
        assert not compiled_calls
    monkeypatch.undo()
    alone = _alone(engine, x, order, Fidelity.CROSSBAR)
    for i, (m, a) in enumerate(zip(mixed, alone, strict=True)):
        assert torch.equal(m, a), (i, order[i], float((m - a).abs().max()))


def test_mixed_batch_pins_its_tasks_and_refuses_what_cannot_fit(
        quantized_mobilenet: CrossbarModel) -> None:
    probe = CrossbarEngine(quantized_mobilenet)
    ids = _tasks(probe, 3, pe_fraction=0.05)
    need = max(probe.tasks[t].replaced_pes for t in ids[:3])
    pool = SparePEPool(quantized_mobilenet.mapping, PoolConfig(spare_pes=2 * need + 1))
    engine = CrossbarEngine(quantized_mobilenet, pool=pool)
    for t in ids:
        engine.add_task(probe.tasks[t])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = engine.run_batch(x, [ids[0], ids[1], ids[0]])
    assert set(pool.resident_tasks()) == {ids[0], ids[1]}
    assert set(result.residencies) == {ids[0], ids[1]}
    assert all(r.programmed for r in result.residencies.values())
    assert result.prepared_now == {ids[0], ids[1]} and result.load_seconds > 0
    again = engine.run_batch(x, [ids[0], ids[1], ids[0]])
    assert not again.prepared_now  # folded once, kept in the prepared cache
    assert not any(r.programmed for r in again.residencies.values())  # still resident
    with pytest.raises(CapacityError):
        engine.forward_mixed(x, ids[:3])
    assert not pool._pinned  # nothing stays pinned after a refused batch
    engine.forward_mixed(x[:2], [ids[2], "plain"])  # the pool recovers
    assert ids[2] in pool.resident_tasks()
