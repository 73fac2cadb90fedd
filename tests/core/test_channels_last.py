"""The chip's channels-last forward pass and one-pass periphery equal the NCHW pass of
torch's own kernels bit for bit, for single-task and mixed batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.engine import CrossbarEngine
from core.nn import layers, periphery
from core.nn.model import CrossbarModel
from core.task_state import TaskState, random_head, random_task_state
from tests.conftest import compiled_operator


def _engine(model: CrossbarModel) -> tuple[CrossbarEngine, list[str]]:
    engine = CrossbarEngine(model, max_prepared_tasks=4)
    names = sorted(engine._digital_names)
    ids = []
    for i in range(3):
        task = random_task_state(f"t{i}", engine.mapping, random_head(3, 1280, seed=i),
                                 pe_fraction=0.1, seed=i)
        g = torch.Generator().manual_seed(i)
        digital = {n: engine.backbone_digital(n).detach() + 0.05 * torch.randn(
            engine.backbone_digital(n).shape, generator=g)
                   for n in names[i::4] if n.endswith(("weight", "bias"))}
        engine.add_task(TaskState(task.task_id, task.shift_levels, task.head, task.layers,
                                  digital))
        ids.append(task.task_id)
    return engine, ids


@pytest.mark.parametrize("size", [32, 40])
def test_channels_last_and_fused_periphery_equal_the_nchw_torch_pass(
        quantized_mobilenet: CrossbarModel, monkeypatch: pytest.MonkeyPatch,
        size: int) -> None:
    engine, ids = _engine(quantized_mobilenet)
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2
    order = [ids[i] for i in (2, 0, 1, 0, 2, 2)]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        return engine.forward(x, ids[1]), engine.forward_mixed(x, order)

    fast_single, fast_mixed = run()
    outputs = []
    for channels_last, fused in ((False, True), (True, False), (False, False)):
        engine.model.channels_last = channels_last
        if not fused:
            monkeypatch.setattr(periphery, "fused_periphery", lambda: None)
        outputs.append(run())
    nchw_single, nchw_mixed = outputs[-1]  # the NCHW pass through torch's own kernels
    # the fast path really is another formulation, not the same calls
    assert layers.SHARED_PASS_PIXELS > 1 and compiled_operator() is not None
    for single, mixed in [(fast_single, fast_mixed), *outputs[:-1]]:
        assert torch.equal(single, nchw_single)
        assert all(torch.equal(a, b) for a, b in zip(mixed, nchw_mixed, strict=True))


@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("channels,size", [(3, 5), (16, 4), (37, 1), (96, 3)])
def test_periphery_kernel_equals_batch_norm_clamp_round_per_block(
        memory: torch.memory_format, channels: int, size: int) -> None:
    extension = compiled_operator()
    g = torch.Generator().manual_seed(channels)
    x = (torch.randn(5, channels, size, size, generator=g) * 40).contiguous(
        memory_format=memory)
    blocks = [(0, 2), (2, 3), (3, 5)]
    terms = [torch.randn(3, channels, generator=g) * 4,
             torch.rand(3, channels, generator=g) + 0.05,
             torch.randn(3, channels, generator=g),
             torch.randn(3, channels, generator=g)]
    expected = torch.cat([F.batch_norm(x[a:b], *(t[i] for t in terms), False, 0.0, 1e-5)
                          for i, (a, b) in enumerate(blocks)])
    per_block = [torch.stack([t[i] for t in terms]) for i in range(len(blocks))]  # [4, C]
    for clamp, round_ in ((False, False), (True, False), (True, True)):
        out = torch.empty_like(x)
        extension.periphery_norm(x, out, [a for a, _ in blocks], [b for _, b in blocks],
                                 per_block, 1e-5, clamp, -7.0, 6.5, round_, 1.0)
        want = expected.clone()
        if clamp:
            want.clamp_(-7.0, 6.5)
        if round_:
            want.round_()
        assert torch.equal(out, want)
        assert out.stride() == x.stride()
    # halves round to even, as torch.round does
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]).reshape(1, 6, 1, 1)
    ones = torch.ones(1, 6)
    out = torch.empty_like(halves)
    extension.periphery_norm(halves, out, [0], [1],
                             [torch.cat([0 * ones, ones - 1e-5, ones, 0 * ones])],
                             1e-5, True, -8.0, 8.0, True, 1.0)
    assert out.flatten().tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]
    with pytest.raises(RuntimeError, match="rounding needs a clamp"):
        extension.periphery_norm(halves, out, [0], [1], [ones.expand(4, -1)], 1e-5, False,
                                 0.0, 0.0, True, 1.0)
    # int32 sums of an int8 product in units of 1/8, and int8 codes out: the same values
    sums = (torch.randn(5, channels, size, size, generator=g) * 4000).to(torch.int32)
    sums = sums.contiguous(memory_format=memory)
    as_float = sums.to(torch.float32) * 0.125
    want = torch.empty_like(as_float)
    extension.periphery_norm(as_float, want, [a for a, _ in blocks], [b for _, b in blocks],
                             per_block, 1e-5, True, -128.0, 127.0, True, 1.0)
    for out in (torch.empty_like(as_float), torch.empty_like(as_float, dtype=torch.int8)):
        extension.periphery_norm(sums, out, [a for a, _ in blocks], [b for _, b in blocks],
                                 per_block, 1e-5, True, -128.0, 127.0, True, 0.125)
        assert torch.equal(out.to(torch.float32), want)
    with pytest.raises(RuntimeError, match="int8 output needs codes"):
        extension.periphery_norm(x, torch.empty_like(x, dtype=torch.int8), [0], [5],
                                 per_block[:1], 1e-5, True, -7.0, 300.0, True, 1.0)


def test_pointwise_matrix_follows_its_weight() -> None:
    weight = torch.arange(12.0).reshape(4, 3, 1, 1)
    matrix = layers.pointwise_matrix(weight)
    assert torch.equal(matrix, weight.reshape(4, 3).t())
    assert matrix.is_contiguous()
    assert layers.pointwise_matrix(weight) is matrix  # kept while unchanged
    weight.mul_(2)  # an in-place change is seen
    assert torch.equal(layers.pointwise_matrix(weight), weight.reshape(4, 3).t())
    other = weight.clone()
    assert layers.pointwise_matrix(other) is not layers.pointwise_matrix(weight)


def test_folded_norm_terms_follow_in_place_changes(quantized_mobilenet: CrossbarModel,
                                                  images32: torch.Tensor) -> None:
    engine = CrossbarEngine(quantized_mobilenet)
    engine.add_task(TaskState("plain", engine.mapping.config.shift_levels,
                              random_head(3, 1280, seed=0)))
    before = engine.forward(images32, "plain")
    norm = engine.model.body.get_submodule("features.5.conv.1.1")
    assert isinstance(norm, periphery.DigitalNorm) and "_folded_cache" in norm.__dict__
    assert norm.running_var is not None
    with torch.no_grad():
        norm.running_var.mul_(4)
    after = engine.forward(images32, "plain")
    assert not torch.equal(after, before)
    for module in engine.model.modules():  # recomputed from scratch: the same
        module.__dict__.pop("_folded_cache", None)
    assert torch.equal(engine.forward(images32, "plain"), after)
