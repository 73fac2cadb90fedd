"""Small backbones' mappings and task states shaped like each learning method's output."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from core.chip.config import CrossbarConfig
from core.chip.mapping import ModelMapping, map_layer
from core.task_state import (
    LayerTaskState,
    TaskHead,
    TaskState,
    ones_code,
    random_head,
    random_task_state,
)

FINGERPRINT = "f" * 64
OTHER_FINGERPRINT = "0" * 64

# pe_fraction of each method's task state (piggyback folds into spare PEs of all PEs).
METHOD_SHAPES = {"xma": 0.0, "xbm": 0.0, "xma2": 0.1, "fine_tuning": 1.0, "piggyback": 1.0}


def tiny_mapping(shift_levels: int = 3) -> ModelMapping:
    """Two layers on 18x8 crossbars: an 8-bit 3x3 edge layer and a 4-bit 1x1 layer."""
    config = CrossbarConfig(rows=18, cols=8, shift_levels=shift_levels)
    layers = (
        map_layer("stem", 0, nn.Conv2d(4, 6, 3, bias=False, device="meta"), config,
                  weight_bits=8, input_bits=8, input_signed=True),
        map_layer("block.conv", 1, nn.Conv2d(20, 9, 1, bias=False, device="meta"), config,
                  weight_bits=4, input_bits=4, input_signed=False),
    )
    return ModelMapping(config, layers)


def with_shift_levels(mapping: ModelMapping, shift_levels: int) -> ModelMapping:
    return ModelMapping(replace(mapping.config, shift_levels=shift_levels), mapping.layers)


def method_task(task_id: str, mapping: ModelMapping, method: str, *, seed: int = 0,
                features: int = 16, classes: int = 3,
                digital: dict[str, torch.Tensor] | None = None) -> TaskState:
    """A task state shaped like ``method``'s output (see METHOD_SHAPES)."""
    head = random_head(classes, features, seed)
    task = random_task_state(task_id, mapping, head, pe_fraction=METHOD_SHAPES[method],
                             seed=seed)
    if method == "xbm":  # binary column mask: codes 0 and "1" only
        levels = mapping.config.shift_levels
        task = replace(task, layers={
            n: LayerTaskState(s.pe_mask, s.spare_codes,
                              torch.where(s.column_codes % 2 == 0, 0, ones_code(levels))
                              .to(torch.uint8))
            for n, s in task.layers.items()})
    if method in ("fine_tuning", "piggyback"):  # every PE replaced
        task = _all_replaced(task, mapping, seed)
    return replace(task, digital=dict(digital or {}))


def _all_replaced(task: TaskState, mapping: ModelMapping, seed: int) -> TaskState:
    g = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for layer in mapping.crossbar_layers:
        state = task.layers[layer.name]
        hi = 2 ** (layer.weight_bits - 1)
        spare = torch.randint(-hi, hi, (layer.num_pes, layer.outputs_per_pe,
                                        layer.rows_per_group), generator=g, dtype=torch.int8)
        layers[layer.name] = LayerTaskState(torch.ones_like(state.pe_mask), spare,
                                            state.column_codes)
    return replace(task, layers=layers)


def assert_same_task(a: TaskState, b: TaskState) -> None:
    """Bit-identical task states: every tensor equal in dtype, shape and value."""
    assert a.task_id == b.task_id and a.shift_levels == b.shift_levels
    assert a.head.labels == b.head.labels
    for x, y in ((a.head.weight, b.head.weight), (a.head.bias, b.head.bias)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert sorted(a.layers) == sorted(b.layers)
    for name, s in a.layers.items():
        t = b.layers[name]
        for x, y in ((s.pe_mask, t.pe_mask), (s.spare_codes, t.spare_codes),
                     (s.column_codes, t.column_codes)):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    assert sorted(a.digital) == sorted(b.digital)
    for name, x in a.digital.items():
        assert x.dtype == b.digital[name].dtype and torch.equal(x, b.digital[name]), name


__all__ = ["FINGERPRINT", "METHOD_SHAPES", "OTHER_FINGERPRINT", "TaskHead", "assert_same_task",
           "method_task", "tiny_mapping", "with_shift_levels"]
