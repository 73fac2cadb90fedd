"""Builders of task states for tests."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from core.chip.config import CrossbarConfig
from core.chip.mapping import ModelMapping
from core.engine import CrossbarEngine
from core.learning.task_model import pe_blocks
from core.nn.model import CrossbarModel
from core.ops.fold import to_row_groups
from core.task_state import LayerTaskState, TaskHead, TaskState, ones_code, random_task_state
from core.task_state import random_head as _random_head


def random_head(classes: int = 5, features: int = 1280, seed: int = 0) -> TaskHead:
    return _random_head(classes, features, seed)


def random_task(
    task_id: str, mapping: ModelMapping, *, pe_fraction: float = 0.1, seed: int = 0,
    head: TaskHead | None = None,
) -> TaskState:
    return random_task_state(task_id, mapping, head or random_head(seed=seed),
                             pe_fraction=pe_fraction, seed=seed)


def add_random_tasks(engine: CrossbarEngine, count: int, *, classes: int = 5,
                     pe_fraction: float = 0.1) -> list[str]:
    """``count`` random tasks ``t0``, ``t1``, ... (seeds 0, 1, ...) added to ``engine``."""
    ids = []
    for i in range(count):
        task = random_task_state(f"t{i}", engine.mapping, random_head(classes, 1280, seed=i),
                                 pe_fraction=pe_fraction, seed=i)
        engine.add_task(task)
        ids.append(task.task_id)
    return ids


def backbone_copy_task(model: CrossbarModel, replace: set[str], change: int = 0,
                       task_id: str = "spare") -> TaskState:
    """Every PE of the named layers replaced by the backbone's own codes (+ change)."""
    layers = {}
    for name, layer in model.layers():
        if name not in replace:
            continue
        m = layer.mapping
        assert m is not None
        pe_mask = torch.ones(m.row_groups, m.col_groups, dtype=torch.bool)
        blocks = pe_blocks(to_row_groups(layer.weight_codes, m), m)[pe_mask].clone()
        valid = pe_blocks(to_row_groups(torch.ones_like(layer.weight_codes), m), m)[pe_mask]
        lo, hi = -(2 ** (layer.weight_bits - 1)), 2 ** (layer.weight_bits - 1) - 1
        spare = torch.where(valid.bool(), (blocks.int() + change).clamp(lo, hi), 0).to(torch.int8)
        codes = torch.full((m.row_groups, m.out_channels), ones_code(3), dtype=torch.uint8)
        layers[name] = LayerTaskState(pe_mask, spare, codes)
    return TaskState(task_id, 3, random_head(10), layers)


@st.composite
def chip_configs(draw: st.DrawFn, kernel: int) -> CrossbarConfig:
    """Crossbar shapes, cell precisions, encodings and rows per read for property tests
    of a layer with a ``kernel`` x ``kernel`` convolution."""
    bits_per_cell = draw(st.sampled_from([1, 2, 3]))
    weight_bits = draw(st.sampled_from([4, 8]))
    slices = math.ceil(weight_bits / bits_per_cell)
    rows = draw(st.sampled_from([9, 18, 72])) if kernel == 3 else draw(st.sampled_from([4, 72]))
    return CrossbarConfig(rows=rows, cols=slices * draw(st.integers(1, 4)),
                          bits_per_cell=bits_per_cell, weight_bits=weight_bits,
                          weight_encoding=draw(st.sampled_from(["offset", "differential"])),
                          rows_per_read=draw(st.sampled_from([1, 9, 18, 72])))
