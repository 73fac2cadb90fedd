"""Stored tasks of every method's shape serve exactly what they served before storing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from task_store import TaskStore
from task_store.format import code_bits, packed_bytes
from tests.task_store.helpers import (
    FINGERPRINT,
    METHOD_SHAPES,
    assert_same_task,
    method_task,
    with_shift_levels,
)


def batchnorm_overrides(model: CrossbarModel, count: int = 3) -> dict[str, torch.Tensor]:
    """Task-specific BatchNorm terms of the first ``count`` BatchNorm layers."""
    g = torch.Generator().manual_seed(7)
    out = {}
    norms = [(n, m) for n, m in model.body.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)][:count]
    for name, bn in norms:
        out[f"{name}.weight"] = bn.weight.detach() * (1 + 0.1 * torch.randn(
            bn.num_features, generator=g))
        out[f"{name}.bias"] = bn.bias.detach() + 0.1 * torch.randn(bn.num_features, generator=g)
        out[f"{name}.running_var"] = bn.running_var * 1.5
    return out


@pytest.fixture()
def store(tmp_path: Path, quantized_mobilenet: CrossbarModel) -> TaskStore:
    return TaskStore.for_model(tmp_path, quantized_mobilenet)


@pytest.mark.parametrize("method", sorted(METHOD_SHAPES))
def test_stored_task_serves_identical_outputs(method: str, store: TaskStore, tmp_path: Path,
                                              quantized_mobilenet: CrossbarModel,
                                              images32: torch.Tensor) -> None:
    model = quantized_mobilenet
    assert model.mapping is not None
    task = method_task("task", model.mapping, method, seed=3, features=1280, classes=5,
                       digital=batchnorm_overrides(model))
    store.put(task, method=method)
    loaded = TaskStore.for_model(tmp_path, model).get("task").task
    assert_same_task(task, loaded)
    for _, layer in model.layers():
        layer.reset_effective_weight()
    engine = CrossbarEngine(model, max_prepared_tasks=1)
    engine.add_task(task)
    before = engine.forward(images32, "task")
    engine.add_task(loaded)
    after = engine.forward(images32, "task")
    assert torch.equal(before, after)
    if method != "xma":  # the task changes what the backbone computes
        engine.remove_task("task")
        engine.add_task(method_task("task", model.mapping, "xma", seed=4, features=1280,
                                    classes=5))
        assert not torch.equal(engine.forward(images32, "task"), before)


def test_mobilenet_sizes_on_disk(store: TaskStore, quantized_mobilenet: CrossbarModel) -> None:
    mapping = quantized_mobilenet.mapping
    assert mapping is not None
    layers = mapping.crossbar_layers
    sizes = {}
    for method in ("xma", "xma2", "fine_tuning"):
        task = method_task(method, mapping, method, features=1280, classes=5)
        store.put(task, method=method)
        sizes[method] = store.get(method).manifest.sizes
    columns = sum(packed_bytes(m.row_groups * m.out_channels, 3) for m in layers)
    assert sizes["xma"]["column_codes"] == columns == 13_158  # 35,088 columns x 3 bits
    assert sizes["xma"]["spare_codes"] == 0
    assert sizes["xma"]["pe_mask"] == sum(packed_bytes(m.num_pes, 1) for m in layers)
    # a 3-level shift-mask task is a few tens of KB, head included
    assert sizes["xma"]["tensors_file"] < 50_000
    full = sum(packed_bytes(m.num_pes * m.outputs_per_pe * m.rows_per_group, m.weight_bits)
               for m in layers)
    assert sizes["fine_tuning"]["spare_codes"] == full
    xma2 = store.get("xma2").task
    assert sizes["xma2"]["spare_codes"] == sum(
        packed_bytes(s.spare_codes.numel(), mapping.layer(n).weight_bits)
        for n, s in xma2.layers.items())


@pytest.mark.parametrize("shift_levels", [0, 1, 2])
def test_other_shift_levels_round_trip(tmp_path: Path, shift_levels: int,
                                       quantized_mobilenet: CrossbarModel) -> None:
    assert quantized_mobilenet.mapping is not None
    mapping = with_shift_levels(quantized_mobilenet.mapping, shift_levels)
    store = TaskStore(tmp_path, backbone_fingerprint=FINGERPRINT, mapping=mapping)
    task = method_task("t", mapping, "xma2", seed=shift_levels, features=1280)
    store.put(task, method="xma2")
    stored = TaskStore(tmp_path, backbone_fingerprint=FINGERPRINT, mapping=mapping).get("t")
    assert_same_task(task, stored.task)
    columns = sum(m.row_groups * m.out_channels for m in mapping.crossbar_layers)
    assert stored.manifest.sizes["column_codes"] <= packed_bytes(columns, code_bits(
        shift_levels)) + len(mapping.crossbar_layers)
