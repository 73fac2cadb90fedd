"""The training step's shortcuts change no number: loss and gradients equal the plain
formulation's (fold each layer with :func:`fold_effective_weight` every step, BatchNorm
then ReLU6 in place, then the next layer's input quantization by an STE that saves its
mask). The one exception is the compiled training periphery's BatchNorm terms, whose
sums run in another order."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from core.learning import stacked_fold
from core.learning import task_model as tm_module
from core.learning.column_masks import ColumnMaskConfig, column_masks_for
from core.learning.common import seeded_generator
from core.learning.task_model import CrossbarAdapter, TaskModel
from core.nn.periphery import DigitalNorm
from core.nn.quant import ActivationQuantizer
from core.ops.fold import fold_effective_weight
from tests.conftest import compiled_operator


class _MaskSTE(torch.autograd.Function):
    """The plain straight-through fake quantization: saves ``qmin <= x / step <= qmax``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qmin: int, qmax: int, *_: Any) -> Tensor:
        y = x / step
        ctx.save_for_backward((y >= qmin) & (y <= qmax))
        return y.round_().clamp_(qmin, qmax).mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _plain_fold(self: CrossbarAdapter, scale: Tensor, generator: Any, stochastic: bool) -> Tensor:
    values = None
    if self.column_mask is not None:
        values = self.column_mask(generator=generator, stochastic=stochastic)
    return fold_effective_weight(self.codes, scale, self.mapping, column_values=values,
                                 pe_mask=self.pe_mask, spare_codes=self.spare_codes())


def _plain_norm(self: DigitalNorm, x: Tensor) -> Tensor:
    out = torch.nn.BatchNorm2d.forward(self, x)
    return out if self.clamp_top is None else F.hardtanh(out, 0.0, self.clamp_top, inplace=True)


def _xma2_model(backbone: Any, channels_last: bool) -> TaskModel:
    """A task model with 10% random spare PEs (codes moved) and column masks spread over
    every level, as training leaves them."""
    model = TaskModel(backbone, 10, channels_last=channels_last)
    generator = torch.Generator().manual_seed(0)
    masks = column_masks_for(model, ColumnMaskConfig())
    adapters = {}
    for name in model.crossbar_layer_names():
        m = model.mapping.layer(name)
        pe_mask = torch.rand(m.row_groups, m.col_groups, generator=generator) < 0.1
        mask = masks[name]
        with torch.no_grad():
            mask.logits.copy_(torch.randn(mask.logits.shape, generator=generator) * 2)
        adapter = CrossbarAdapter(model.source_layer(name), pe_mask=pe_mask, column_mask=mask)
        with torch.no_grad():
            adapter.spare_latent.add_(torch.randn(adapter.spare_latent.shape,
                                                  generator=generator))
        adapters[name] = adapter
    model.set_adapters(adapters)  # type: ignore[arg-type]
    with torch.no_grad():
        model.head.weight.normal_(generator=generator)
        for p in model.batchnorm.values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _loss_and_grads(model: TaskModel, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.train()
    model.generator = seeded_generator(0, 1, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in params]


@pytest.mark.parametrize("channels_last", [True, False])
def test_step_equals_the_plain_formulation_bit_for_bit(quantized_mobilenet, digits32,
                                                       monkeypatch, channels_last):
    model = _xma2_model(quantized_mobilenet, channels_last)
    x, y = digits32.train.batch(slice(0, 16))
    compiled = _count_compiled_periphery(monkeypatch)
    loss, grads = _loss_and_grads(model, x, y)
    # channels-last passes run every fused norm in the compiled operator; NCHW ones only
    # those at 1x1 maps (where the layouts are one)
    assert model._fused and len(compiled) == 1
    assert compiled[0] == len(model._fused) if channels_last else compiled[0] < len(model._fused)
    norm_terms = {id(p) for p in model.batchnorm.values()}
    is_norm = [id(p) in norm_terms for p in model.parameters() if p.requires_grad]
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
    spare = [a.spare_latent.grad for a in model.adapters.values()
             if a.spare_latent.numel()]  # type: ignore[union-attr]
    assert spare and any(bool(g.abs().sum() > 0) for g in spare)
    # every adapter was folded in the stacked fold, not by its own fold
    assert sum(len(f.adapters) for f in model._stacked) == len(model.adapters)
    model._stacked = []
    monkeypatch.setattr(CrossbarAdapter, "fold", _plain_fold)
    monkeypatch.setattr(tm_module, "_FakeQuantSTE", _MaskSTE)
    monkeypatch.setattr(DigitalNorm, "forward", _plain_norm)
    for name in model._frozen:  # back to the weight computed in every pass
        model._layers[name].reset_effective_weight()
    model._frozen = {}
    model.fuse_activation = False  # each layer quantizes its own input again
    plain_loss, plain_grads = _loss_and_grads(model, x, y)
    assert torch.equal(loss, plain_loss)
    for g, plain, norm in zip(grads, plain_grads, is_norm, strict=True):
        assert (g is None) == (plain is None)
        if g is None:
            continue
        if norm:  # the compiled periphery sums in another order
            assert float((g - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
        else:
            assert torch.equal(g, plain)


def _count_compiled_periphery(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the training passes' calls of the compiled periphery (one counter per pass)."""
    calls: list[int] = []
    apply = tm_module._apply

    def counting(function: Any, *args: Any) -> Tensor:
        if function is tm_module._NormClampQuantSTE:
            calls[-1] += 1
        return apply(function, *args)

    load_weights = TaskModel.load_weights

    def new_pass(self: TaskModel) -> None:
        calls.append(0)
        load_weights(self)

    monkeypatch.setattr(tm_module, "_apply", counting)
    monkeypatch.setattr(TaskModel, "load_weights", new_pass)
    return calls


def test_the_compiled_training_periphery_equals_torchs(monkeypatch):
    """BatchNorm, ReLU6 and fake quantization in the compiled operator: the values and the
    input gradient of torch's operators bit for bit, the BatchNorm terms' gradients up to
    the order of their sums, at odd channel counts, a single pixel, and values that land
    on the clamp and pass bounds."""
    compiled_operator()
    generator = torch.Generator().manual_seed(0)
    dac = ActivationQuantizer(4)
    with torch.no_grad():
        dac.step.fill_(0.37)
    quant = tm_module.FrozenInputQuant(dac)
    step = quant.step
    for channels, size, top in ((37, 5, 6.0), (96, 8, 2.0), (16, 1, 6.0)):
        norm = DigitalNorm(channels).eval()
        with torch.no_grad():
            norm.running_mean.normal_(generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
            norm.weight.normal_(generator=generator)
            norm.bias.normal_(generator=generator)
        fused = tm_module._ClampQuant(norm, quant, top)
        assert fused.kernel is not None
        x = torch.randn(4, channels, size, size, generator=generator) * 3
        # values whose quotient lands exactly on 0 and on the top of the clamp
        invstd = 1 / torch.sqrt(norm.running_var + norm.eps)
        alpha = invstd * norm.weight.detach()
        for target, where in ((0.0, 0), (fused.clamp[1] * float(step), 1)):
            x[where, :, 0, 0] = (target - (norm.bias.detach() - norm.running_mean * alpha)) / alpha
        x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(x.shape, generator=generator).contiguous(
            memory_format=torch.channels_last)
        results = []
        kernel = fused.kernel
        for fused.kernel in (kernel, None):  # compiled, then torch's operators
            source = x.clone().requires_grad_()
            norm.weight.grad = norm.bias.grad = None
            out = fused(source)
            out.backward(grad)
            assert norm.weight.grad is not None and norm.bias.grad is not None
            results.append((out.detach(), source.grad, norm.weight.grad.clone(),
                            norm.bias.grad.clone()))
        fused.kernel = kernel
        (out, dx, dw, db), (t_out, t_dx, t_dw, t_db) = results
        assert torch.equal(out, t_out) and torch.equal(dx, t_dx)
        assert bool((t_dx == 0).any()) and bool((t_dx != 0).any())
        for mine, theirs in ((dw, t_dw), (db, t_db)):
            assert float((mine - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
    # without the input's gradient: only the terms' gradients
    source = x.clone()
    norm.weight.grad = None
    fused(source).backward(grad)
    assert norm.weight.grad is not None


def test_served_weights_equal_the_engine_fold(quantized_mobilenet):
    model = _xma2_model(quantized_mobilenet, channels_last=False)
    for adapter in model.adapters.values():
        assert isinstance(adapter, CrossbarAdapter)
        for stochastic in (False, True):
            generator = seeded_generator(0, 1, 3)
            fast = adapter.fold(adapter.scale, generator, stochastic)
            generator = seeded_generator(0, 1, 3)
            plain = _plain_fold(adapter, adapter.scale, generator, stochastic)
            assert torch.equal(fast, plain)
        assert torch.equal(adapter.effective_codes(),
                           _plain_fold(adapter, torch.ones_like(adapter.scale), None, False))


def test_a_channels_last_training_pass_convolves_channels_last(quantized_mobilenet, digits32,
                                                               monkeypatch):
    """A training pass keeps the task model's layout: an NCHW copy of each crossbar layer's
    input once made every convolution and BatchNorm of a step convert (40% of its time)."""
    from core.nn import layers

    model = _xma2_model(quantized_mobilenet, channels_last=True)
    x, y = digits32.train.batch(slice(0, 16))
    conv2d = layers.F.conv2d
    layouts: list[bool] = []

    def recording(inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layouts.append(inputs.is_contiguous(memory_format=torch.channels_last))
        return conv2d(inputs, *args, **kwargs)

    monkeypatch.setattr(layers.F, "conv2d", recording)
    _loss_and_grads(model, x, y)
    assert len(layouts) == len(dict(quantized_mobilenet.layers()))  # every CrossbarConv2d
    assert all(layouts)


def _weights_and_grads(model: TaskModel, stacked: bool, generator_seed: int = 0
                       ) -> tuple[list[Tensor], list[Tensor | None]]:
    """Every crossbar layer's training weight, and the adapters' gradients for a fixed
    random upstream gradient, folded together (``stacked``) or layer by layer."""
    kept = model._stacked
    if not stacked:
        model._stacked = []
    model.train()
    model.generator = seeded_generator(generator_seed, 1, 0)
    try:
        with torch.enable_grad():
            model.load_weights()
    finally:
        model._stacked = kept
    names = model.crossbar_layer_names()
    weights = [model._layers[n].effective_weight for n in names]
    upstream = torch.Generator().manual_seed(1)
    params = list(model.adapters.parameters())
    for p in params:
        p.grad = None
    torch.autograd.backward(weights, [torch.randn(w.shape, generator=upstream)
                                      for w in weights])
    return [w.detach() for w in weights], [p.grad for p in params]


@pytest.mark.parametrize("compiled", [True, False])
def test_stacked_fold_equals_each_layers_fold_bit_for_bit(quantized_mobilenet, compiled,
                                                          monkeypatch):
    """Weights and gradients of the stacked fold equal each adapter's own fold bit for
    bit, folded by the compiled operator's two passes or by torch's operators; layers of
    different PE rows or weight ranges (the 8-bit first layer) fold in stacks of their
    own, and an adapter without spare PEs gets no spare gradient, as in its own fold."""
    passes: list[str] = []
    extension = compiled_operator()

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name.startswith("stacked_fold"):
                passes.append(name)
            return getattr(extension, name)

    monkeypatch.setattr(stacked_fold, "crossbar_extension",
                        (lambda: Counting()) if compiled else (lambda: None))
    model = _xma2_model(quantized_mobilenet, channels_last=True)
    assert sum(len(f.adapters) for f in model._stacked) == len(model.adapters)
    assert len(model._stacked) >= 2
    adapters = list(model.adapters.values())
    assert any(not a.spare_latent.numel() for a in adapters)  # type: ignore[union-attr]
    stacked, stacked_grads = _weights_and_grads(model, stacked=True)
    plain, plain_grads = _weights_and_grads(model, stacked=False)
    assert all(torch.equal(a, b) for a, b in zip(stacked, plain, strict=True))
    assert any(g is not None and bool(g.abs().sum() > 0) for g in stacked_grads)
    for a, b in zip(stacked_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        assert a is None or b is None or torch.equal(a, b)
    folds = len(model._stacked)
    assert passes == ((["stacked_fold_forward"] * folds + ["stacked_fold_backward"] * folds)
                      if compiled else [])


def test_stacked_fold_leaves_noisy_or_categorical_masks_to_each_layer(quantized_mobilenet):
    """Gumbel noise is drawn layer by layer (the stacked fold steps aside, and the weights
    are those of a per-layer fold with the same generator); categorical masks are never
    stacked."""
    model = _xma2_model(quantized_mobilenet, channels_last=True)
    for adapter in model.adapters.values():
        adapter.column_mask.set_schedule(1.0, 0.5)  # type: ignore[union-attr,operator]
    assert not any(f.ready() for f in model._stacked)
    noisy, _ = _weights_and_grads(model, stacked=True)
    again, _ = _weights_and_grads(model, stacked=False)
    assert all(torch.equal(a, b) for a, b in zip(noisy, again, strict=True))
    reseeded, _ = _weights_and_grads(model, stacked=False, generator_seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(noisy, reseeded, strict=True))
    categorical = TaskModel(quantized_mobilenet, 10)
    masks = column_masks_for(categorical, ColumnMaskConfig(kind="categorical"))
    categorical.set_adapters({n: CrossbarAdapter(categorical.source_layer(n),
                                                 column_mask=masks[n])
                              for n in categorical.crossbar_layer_names()})
    assert categorical._stacked == []


def test_the_compiled_fold_refuses_inconsistent_layers() -> None:
    """The compiled passes check what they index with: a scale per output channel, a
    spare slot within the spare codes, rows that match each layer's groups."""
    extension = compiled_operator()
    codes = torch.ones(6, 4)
    slot = torch.full((6,), -1, dtype=torch.long)
    good = ([0, 6], [2], [8], [torch.ones(3)])
    weights = extension.stacked_fold_forward(codes, torch.full((6,), 2.0), torch.empty(0, 4),
                                             slot, *good)
    assert torch.equal(weights[0], torch.full((3, 8), 2.0))
    with pytest.raises(RuntimeError, match="scale must be float"):
        extension.stacked_fold_forward(codes, torch.empty(0), torch.empty(0, 4), slot,
                                       [0, 6], [2], [8], [torch.ones(2)])
    with pytest.raises(RuntimeError, match="spare slot out of range"):
        extension.stacked_fold_forward(codes, torch.empty(0), torch.empty(0, 4),
                                       torch.tensor([0, -1, -1, -1, -1, -1]), *good)
    with pytest.raises(RuntimeError, match="layer rows do not match"):
        extension.stacked_fold_backward([torch.zeros(2, 8)], codes, slot, 0, True,
                                        [0, 6], [4], [8], [torch.ones(1)])
