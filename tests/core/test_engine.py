from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.engine import CrossbarEngine
from core.errors import TaskStateError
from core.nn.model import CrossbarModel
from core.ops.fold import fold_effective_weight
from core.task_state import LayerTaskState, TaskState, ones_code
from tests.core.helpers import random_head, random_task


@pytest.fixture()
def engine(quantized_mobilenet: CrossbarModel) -> CrossbarEngine:
    for _, layer in quantized_mobilenet.layers():
        layer.reset_effective_weight()
    return CrossbarEngine(quantized_mobilenet, max_prepared_tasks=3)


def plain_logits(model: CrossbarModel, x: torch.Tensor, task: TaskState) -> torch.Tensor:
    for _, layer in model.layers():
        layer.reset_effective_weight()
    with torch.no_grad():
        return F.linear(model(x), task.head.weight, task.head.bias)


def test_empty_task_equals_plain_quantized_backbone(engine, images32):
    head = random_head()
    empty = TaskState("empty", 3, head)
    explicit = TaskState(
        "explicit", 3, head,
        {m.name: LayerTaskState.identity(m, 3) for m in engine.mapping.crossbar_layers},
    )
    engine.add_task(random_task("other", engine.mapping, seed=3))
    engine.add_task(empty)
    engine.add_task(explicit)
    engine.forward(images32, "other")  # leave another task's weights in place first
    out_empty = engine.forward(images32, "empty")
    out_explicit = engine.forward(images32, "explicit")
    reference = plain_logits(engine.model, images32, empty)
    assert torch.equal(out_empty, reference)
    torch.testing.assert_close(out_explicit, reference, rtol=0, atol=1e-5)


def test_switching_tasks_restores_each_tasks_outputs(engine, images32):
    a = random_task("a", engine.mapping, seed=1)
    b = random_task("b", engine.mapping, seed=2)
    engine.add_task(a)
    engine.add_task(b)
    first_a = engine.forward(images32, "a")
    first_b = engine.forward(images32, "b")
    assert not torch.allclose(first_a, first_b)
    assert torch.equal(engine.forward(images32, "a"), first_a)
    assert torch.equal(engine.forward(images32, "b"), first_b)
    assert engine.stats.switches == 4


def _small_layer(quantized_mobilenet: CrossbarModel):
    name, layer = next(
        (n, m) for n, m in quantized_mobilenet.layers()
        if m.on_crossbar and m.mapping.row_groups >= 2 and m.mapping.col_groups >= 2
    )
    return name, layer, layer.mapping


def test_column_at_half_contributes_exactly_half_of_its_partial_sum(quantized_mobilenet):
    _, layer, mapping = _small_layer(quantized_mobilenet)
    codes = torch.full((mapping.row_groups, mapping.out_channels), ones_code(3), dtype=torch.uint8)
    codes[1, 5] = 3  # value 1/2
    values = torch.tensor([0.0, 0.125, 0.25, 0.5, 1.0])[codes.long()]
    weight = fold_effective_weight(layer.weight_codes, layer.weight_scale, mapping, values)
    x = torch.zeros(1, layer.in_channels, 3, 3)
    first = mapping.channels_per_row_group
    x[:, first : 2 * first] = torch.randn(1, first, 3, 3)  # only row group 1 is driven
    base = F.conv2d(x, layer.backbone_weight())
    masked = F.conv2d(x, weight)
    assert torch.equal(masked[:, 5], base[:, 5] * 0.5)
    others = [c for c in range(mapping.out_channels) if c != 5]
    assert torch.equal(masked[:, others], base[:, others])


def test_replaced_pe_uses_spare_weights_and_ignores_backbone_cells(quantized_mobilenet, images32):
    name, layer, mapping = _small_layer(quantized_mobilenet)
    pe_mask = torch.zeros(mapping.row_groups, mapping.col_groups, dtype=torch.bool)
    pe_mask[0, 1] = True
    spare = torch.randint(-8, 8, (1, mapping.outputs_per_pe, mapping.rows_per_group),
                          dtype=torch.int8)
    state = LayerTaskState(pe_mask, spare, torch.zeros(mapping.row_groups, mapping.out_channels,
                                                      dtype=torch.uint8) + ones_code(3))
    task = TaskState("spare", 3, random_head(), {name: state})
    plain = TaskState("plain", 3, random_head())
    engine = CrossbarEngine(quantized_mobilenet)
    engine.add_task(task)
    engine.add_task(plain)
    folded = engine.prepare("spare").weights[name]
    rows = slice(0, mapping.rows_per_group)
    outs = slice(mapping.outputs_per_pe, 2 * mapping.outputs_per_pe)
    n_out = mapping.outputs_in_col_group(1)
    n_rows = mapping.rows_in_group(0)
    expected = spare[0, :n_out, :n_rows].float()  # prepared weights are in code units
    assert torch.equal(folded.reshape(mapping.out_channels, -1)[outs, rows], expected)

    before_task = engine.forward(images32, "spare")
    before_plain = engine.forward(images32, "plain")
    layer = dict(engine.model.layers())[name]  # the chip's copy of the backbone
    original = layer.weight_codes.clone()
    try:
        codes = layer.weight_codes.reshape(mapping.out_channels, -1)
        codes[outs, rows] = -codes[outs, rows]  # rewrite the backbone cells under the spare PE
        layer.reset_effective_weight()
        engine.prepared.pop("spare")
        engine.prepared.pop("plain")
        engine.active = None
        assert torch.equal(engine.forward(images32, "spare"), before_task)
        assert not torch.equal(engine.forward(images32, "plain"), before_plain)
    finally:
        layer.weight_codes.copy_(original)
        layer.reset_effective_weight()


def test_masked_zero_column_costs_no_adc_energy(engine):
    mapping = engine.mapping.crossbar_layers[3]
    codes = torch.full((mapping.row_groups, mapping.out_channels), ones_code(3), dtype=torch.uint8)
    state = LayerTaskState(torch.zeros(mapping.row_groups, mapping.col_groups, dtype=torch.bool),
                           torch.zeros(0, mapping.outputs_per_pe, mapping.rows_per_group,
                                       dtype=torch.int8), codes)
    half = codes.clone()
    half[:, :10] = 3
    off = codes.clone()
    off[:, :10] = 0
    for task_id, column_codes in (("ones", codes), ("half", half), ("off", off)):
        engine.add_task(TaskState(task_id, 3, random_head(),
                                  {mapping.name: LayerTaskState(state.pe_mask, state.spare_codes,
                                                                column_codes)}))
    ones = engine.ops_per_image("ones", (32, 32))
    halved = engine.ops_per_image("half", (32, 32))
    zeroed = engine.ops_per_image("off", (32, 32))
    assert halved.adc_conversions == ones.adc_conversions
    positions = 16 * 16 if mapping.name == "features.1.conv.1" else None
    removed = ones.adc_conversions - zeroed.adc_conversions
    assert removed > 0
    if positions:
        assert removed == 10 * mapping.row_groups * mapping.slices * positions
    assert engine.energy_per_image("off", (32, 32)).adc_j < engine.energy_per_image(
        "ones", (32, 32)).adc_j


def test_task_validation_errors_are_clear(engine):
    mapping = engine.mapping.crossbar_layers[0]
    bad = LayerTaskState(torch.zeros(1, 1, dtype=torch.bool),
                         torch.zeros(0, 1, 1, dtype=torch.int8),
                         torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(TaskStateError, match="pe_mask must be bool"):
        engine.add_task(TaskState("bad", 3, random_head(), {mapping.name: bad}))
    with pytest.raises(TaskStateError, match="unknown task"):
        engine.forward(torch.zeros(1, 3, 32, 32), "missing")
    with pytest.raises(TaskStateError, match="invalid task name"):
        TaskState("../etc", 3, random_head())
    with pytest.raises(TaskStateError, match="no mapped layer named"):
        engine.add_task(TaskState("x", 3, random_head(), {"features.99": bad}))
    with pytest.raises(TaskStateError, match="must have shape"):
        engine.add_task(TaskState("y", 3, random_head(),
                                  digital={"features.1.conv.2.bias": torch.zeros(3)}))
    with pytest.raises(TaskStateError, match="not digital backbone tensors"):
        engine.add_task(TaskState("d", 3, random_head(), digital={"features.0.0.weight_codes":
                                                                  torch.zeros(1)}))


def test_digital_overrides_are_per_task(engine, images32):
    name = "features.1.conv.2"  # a BatchNorm after the first projection
    bn = engine.model.body.get_submodule(name)
    head = random_head()
    task = TaskState("bn", 3, head, digital={f"{name}.bias": bn.bias.detach() + 1.0})
    plain = TaskState("plain", 3, head)
    engine.add_task(task)
    engine.add_task(plain)
    own_bias = bn.bias.detach().clone()
    reference = engine.forward(images32, "plain")
    changed = engine.forward(images32, "bn")
    assert not torch.allclose(changed, reference)
    assert torch.equal(bn.bias, own_bias)  # the task's terms came with the call
    assert torch.equal(engine.forward(images32, "plain"), reference)
    mixed = engine.forward_mixed(images32[:2], ["bn", "plain"])  # one block each
    assert torch.equal(mixed[0], engine.forward(images32[:1], "bn")[0])
    assert torch.equal(mixed[1], engine.forward(images32[1:2], "plain")[0])


def test_no_model_holds_a_task(quantized_mobilenet, images32):
    before = quantized_mobilenet.fingerprint()
    engine = CrossbarEngine(quantized_mobilenet)
    name = "features.1.conv.2"
    bn = engine.model.body.get_submodule(name)
    engine.add_task(TaskState("bn", 3, random_head(),
                              digital={f"{name}.bias": bn.bias.detach() + 1.0}))
    engine.add_task(random_task("spare", engine.mapping, seed=4))
    engine.forward(images32, "spare")
    engine.forward(images32, "bn")
    assert quantized_mobilenet.fingerprint() == before  # what task states bind to
    assert engine.model.fingerprint() == before  # nor does the engine's own copy
