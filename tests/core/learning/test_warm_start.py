"""Adaptation that starts from a served task: same state in, trained further, clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning import adapt, default_config
from core.learning.column_masks import ColumnMaskConfig, column_masks_for
from core.learning.task_model import (
    CrossbarAdapter,
    LayerAdapter,
    initial_pe_masks,
    new_task_model,
)
from core.ops.fold import replaced_columns
from core.task_state import LayerTaskState, TaskHead, TaskState, ones_code


def _config(method: str, train, **changes):
    config = dataclasses.replace(default_config(method), train=train)
    return dataclasses.replace(config, **changes) if changes else config


@pytest.fixture(scope="module")
def xma2_task(quantized_mobilenet, digits32) -> TaskState:
    """A short XMA2 run whose frozen columns are then spread over every mask level, so
    that a warm start has each level to reproduce."""
    from core.learning.common import TrainConfig

    train = TrainConfig(epochs=1, batch_size=16, warm_start_images=64, channels_last=False,
                        checkpoint_every=0)
    task = adapt("xma2", quantized_mobilenet, digits32, "warm",
                 _config("xma2", train)).task
    assert task is not None
    generator = torch.Generator().manual_seed(0)
    top = ones_code(task.shift_levels)
    layers = {}
    for name, state in task.layers.items():
        codes = torch.randint(0, top + 1, state.column_codes.shape, generator=generator,
                              dtype=torch.uint8)
        layers[name] = LayerTaskState(state.pe_mask, state.spare_codes, codes)
    return dataclasses.replace(task, layers=layers)


def _fresh_start(model, data, config, initial: TaskState):
    """The XMA2 task model as a warm start builds it, before any step."""
    task_model = new_task_model(model, data, config.train, "warm", initial)
    masks = column_masks_for(task_model, config.mask)
    pe_masks = initial_pe_masks(task_model, initial)
    adapters = {n: CrossbarAdapter(task_model.source_layer(n), pe_mask=pe_masks[n],
                                   column_mask=masks.get(n))
                for n in task_model.crossbar_layer_names()}
    task_model.set_adapters(dict[str, LayerAdapter](adapters))
    task_model.start_from(initial, tuple(data.classes))
    return task_model


@pytest.mark.parametrize("kind", ["threshold", "categorical"])
def test_a_warm_start_begins_at_the_served_task(kind, quantized_mobilenet, digits32,
                                                 tiny_train, xma2_task):
    config = _config("xma2", tiny_train, mask=ColumnMaskConfig(kind=kind))
    task_model = _fresh_start(quantized_mobilenet, digits32, config, xma2_task)
    again = task_model.export("warm", tuple(digits32.classes))
    mapping = quantized_mobilenet.mapping
    levels_seen = set()
    for name, state in xma2_task.layers.items():
        mine = again.layers[name]
        assert torch.equal(mine.pe_mask, state.pe_mask)
        assert torch.equal(mine.spare_codes, state.spare_codes)
        frozen = ~replaced_columns(state.pe_mask, mapping.layer(name))
        assert torch.equal(mine.column_codes[frozen], state.column_codes[frozen])
        levels_seen |= set(state.column_codes[frozen].unique().tolist())
    assert levels_seen == set(range(ones_code(xma2_task.shift_levels) + 1))
    for name, value in xma2_task.digital.items():
        assert torch.equal(again.digital[name], value)
    assert torch.equal(again.head.weight, xma2_task.head.weight)
    # so the network trained from the first step is the task as served
    engine = CrossbarEngine(quantized_mobilenet)
    engine.add_task(xma2_task)
    x, _ = digits32.test.batch(slice(0, 16))
    task_model.eval()
    with torch.no_grad():
        assert torch.equal(task_model(x.clone()), engine.forward(x, xma2_task.task_id))


def test_a_warm_started_adaptation_keeps_its_pes_and_trains_on(quantized_mobilenet, digits32,
                                                                tiny_train, xma2_task):
    result = adapt("xma2", quantized_mobilenet, digits32, "warm2",
                   _config("xma2", tiny_train, pe_fraction=0.3, lr_spare=0.5),
                   initial=xma2_task)
    task = result.task
    assert task is not None
    for name, state in xma2_task.layers.items():  # no ranking: the initial PEs stay
        assert torch.equal(task.layers[name].pe_mask, state.pe_mask)
    assert task.replaced_pes == xma2_task.replaced_pes
    moved = sum(int((task.layers[n].spare_codes != s.spare_codes).sum())
                for n, s in xma2_task.layers.items())
    assert moved > 0
    assert not torch.equal(task.head.weight, xma2_task.head.weight)
    assert result.steps == len(digits32.train) // tiny_train.batch_size
    assert "warm_start_and_ranking_seconds" in result.details


def test_warm_starts_refuse_what_they_cannot_continue(quantized_mobilenet, digits32,
                                                      tiny_train, xma2_task):
    with pytest.raises(ConfigError, match="piggyback cannot start from a task state"):
        adapt("piggyback", quantized_mobilenet, digits32, "w",
              _config("piggyback", tiny_train), initial=xma2_task)
    with pytest.raises(ConfigError, match="replaces other PEs"):
        adapt("xma", quantized_mobilenet, digits32, "w", _config("xma", tiny_train),
              initial=xma2_task)
    with pytest.raises(ConfigError, match="does not learn"):
        adapt("head_bn", quantized_mobilenet, digits32, "w", _config("head_bn", tiny_train),
              initial=xma2_task)
    relabelled = dataclasses.replace(xma2_task, head=TaskHead(
        xma2_task.head.weight, xma2_task.head.bias,
        tuple(f"other{i}" for i in range(len(xma2_task.head.labels)))))
    with pytest.raises(ConfigError, match="labels"):
        adapt("xma2", quantized_mobilenet, digits32, "w", _config("xma2", tiny_train),
              initial=relabelled)
    binary = _config("xma2", tiny_train, mask=ColumnMaskConfig(shift_levels=0))
    with pytest.raises(ConfigError, match="levels outside"):
        adapt("xma2", quantized_mobilenet, digits32, "w", binary, initial=xma2_task)
