"""A trainable view of the frozen backbone: the model every 4-bit method trains.

:class:`TaskModel` runs a private copy of the backbone. Before each forward pass
every :class:`LayerAdapter` folds what it learns (column masks, spare-PE codes,
an element-wise mask) into its layer's effective weight with
:func:`core.ops.fold.fold_effective_weight`, the function the engine uses (the
:class:`CrossbarAdapter` computes the same values with its constant part kept
between steps, equal bit for bit), so the trained task state is served exactly
as it was trained. The caller's
backbone is never touched (its codes, scales and BatchNorm terms are copied).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.chip.config import noise_level
from core.chip.mapping import LayerMapping
from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.chip_loop import ChipInTheLoop
from core.learning.common import (
    AdaptationResult,
    RunOptions,
    TrainConfig,
    accuracy,
    config_dict,
    deterministic,
    fit,
    to_channels_last,
    warm_start_head,
)
from core.learning.stacked_fold import StackedFold, stacked_folds
from core.nn.chip_instance import programmed_backbone
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel
from core.nn.periphery import DigitalNorm, fused_periphery
from core.nn.quant import ActivationQuantizer, round_ste, signed_range
from core.ops.fold import replaced_columns, to_row_groups
from core.task_state import LayerTaskState, TaskHead, TaskState, ones_code, shift_values

if TYPE_CHECKING:
    from core.learning.column_masks import ColumnMaskModule

logger = logging.getLogger(__name__)

__all__ = [
    "CrossbarAdapter",
    "FrozenInputQuant",
    "LayerAdapter",
    "TaskModel",
    "initial_pe_masks",
    "level_label",
    "level_shares",
    "pe_blocks",
]


def _just_outside(low: int, high: int) -> tuple[float, float]:
    """The float32 neighbours just outside ``[low, high]``: ``hardtanh_backward`` passes the
    gradient strictly inside its bounds, so these make it pass ``low <= v <= high``."""
    below = torch.nextafter(torch.tensor(float(low)), torch.tensor(-math.inf))
    above = torch.nextafter(torch.tensor(float(high)), torch.tensor(math.inf))
    return float(below), float(above)


def _apply(function: type[torch.autograd.Function], *args: Any) -> Tensor:
    """``function.apply(*args)``, typed: torch's stubs leave ``Function.apply`` unannotated.
    Callers name the class at each call, so a test can swap the module's STE classes."""
    apply: Callable[..., Tensor] = function.apply
    return apply(*args)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a frozen step: a clipped straight-through gradient.

    The forward pass keeps ``v = x / step`` and the backward pass masks the gradient with
    one ``hardtanh_backward`` over it: the same values and gradients (for finite ``v``) as
    saving ``(v >= qmin) & (v <= qmax)``, in five passes over the activation (forward and
    backward) instead of eight. An input that needs no gradient (the image) saves nothing.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qmin: int, qmax: int,
                bounds: tuple[float, float]) -> Tensor:
        v = x / step
        if not ctx.needs_input_grad[0]:
            return v.round_().clamp_(qmin, qmax).mul_(step)
        ctx.save_for_backward(v)
        ctx.bounds = bounds
        return torch.round(v).clamp_(qmin, qmax).mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (v,) = ctx.saved_tensors
        low, high = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, v, low, high), None, None, None, None


class FrozenInputQuant(nn.Module):
    """A crossbar input quantizer whose step is frozen (the backbone's DAC range)."""

    step: Tensor

    def __init__(self, quant: ActivationQuantizer) -> None:
        super().__init__()
        self.register_buffer("step", quant.step.detach().clone())
        self.qmin, self.qmax = quant.qrange
        self.bounds = _just_outside(self.qmin, self.qmax)
        self.inplace = quant.inplace
        self.enabled = quant.fake_quant_enabled

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if torch.is_grad_enabled():
            return _apply(_FakeQuantSTE, x, self.step, self.qmin, self.qmax, self.bounds)
        # The same operations, in the same order, as ActivationQuantizer at inference.
        y = x.div_(self.step) if self.inplace else x / self.step
        return y.round_().clamp_(self.qmin, self.qmax).mul_(self.step)


class _ClampQuantSTE(torch.autograd.Function):
    """A ReLU6 and the next layer's frozen-step fake quantization in one:
    ``step * round(clamp(x / step, low, high))`` with ``low = max(qmin, 0)`` and
    ``high = min(qmax, top / step)`` equals ``step * clamp(round(clamp(x, 0, top) / step),
    qmin, qmax)`` (division by a positive step keeps the order), in four passes over the
    activation instead of nine; the gradient passes where both passed it:
    ``0 < x / step < top / step`` and ``x / step <= qmax`` (equal to ``0 < x < top`` up to
    the rounding of ``x / step``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, clamp: tuple[float, float],
                bounds: tuple[float, float]) -> Tensor:
        v = x / step
        ctx.save_for_backward(v)
        ctx.bounds = bounds
        return v.clamp(*clamp).round_().mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (v,) = ctx.saved_tensors
        low, high = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, v, low, high), None, None, None


class _NormClampQuantSTE(torch.autograd.Function):
    """A BatchNorm at the backbone's statistics followed by :class:`_ClampQuantSTE`, in the
    compiled operator: one pass over the activation forward and one backward, where
    torch's operators make nine and save a copy of the activation. The same values and
    input gradients bit for bit; the BatchNorm terms' gradients up to the order of their
    sums."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
                eps: float, step: float, clamp: tuple[float, float],
                bounds: tuple[float, float], kernel: ModuleType) -> Tensor:
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.terms = (eps, step, bounds, kernel)
        out: Tensor = kernel.train_periphery_forward(x, mean, var, weight, bias, eps, step,
                                                     *clamp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, var = ctx.saved_tensors
        eps, step, bounds, kernel = ctx.terms
        needs = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = kernel.train_periphery_backward(
            grad.contiguous(memory_format=torch.channels_last), x, mean, var, weight, bias,
            eps, step, *bounds, needs[0])
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, *([None] * 7))


class _ClampQuant:
    """The BatchNorm, ReLU6 and input quantization that a norm applies for the layer after
    it, in one compiled pass where the operator is built (:func:`fused_periphery`: its
    BatchNorm arithmetic is torch's) and the activation is channels-last."""

    def __init__(self, norm: DigitalNorm, quant: FrozenInputQuant, top: float) -> None:
        self.norm = norm
        self.step = quant.step
        over = float(torch.tensor(top, dtype=quant.step.dtype) / quant.step)
        qmin, qmax = quant.qmin, quant.qmax
        self.clamp = (float(max(qmin, 0)), min(float(qmax), over))
        self.bounds = (0.0, over if over <= qmax else _just_outside(qmin, qmax)[1])
        self.kernel = (fused_periphery() if norm.affine and norm.track_running_stats
                       else None)
        """The compiled operator (None: torch's operators, e.g. for ``torch.compile``)."""

    def __call__(self, x: Tensor) -> Tensor:
        norm = self.norm
        if (self.kernel is not None and not norm.training and x.dtype == torch.float32
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            assert norm.running_mean is not None and norm.running_var is not None
            return _apply(_NormClampQuantSTE, x, norm.weight, norm.bias, norm.running_mean,
                          norm.running_var, norm.eps, float(self.step), self.clamp,
                          self.bounds, self.kernel)
        return _apply(_ClampQuantSTE, nn.BatchNorm2d.forward(norm, x), self.step,
                      self.clamp, self.bounds)


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def pe_blocks(grouped: Tensor, layer: LayerMapping) -> Tensor:
    """``[Cout, row_groups, rows]`` -> ``[row_groups, col_groups, outputs_per_pe, rows]``
    (edge PEs zero-padded): indexing with a PE mask gives spare codes in task-state order."""
    padded = layer.col_groups * layer.outputs_per_pe
    grouped = F.pad(grouped, (0, 0, 0, 0, 0, padded - grouped.shape[0]))
    blocks = grouped.reshape(layer.col_groups, layer.outputs_per_pe, layer.row_groups, -1)
    return blocks.permute(2, 0, 1, 3)


class LayerAdapter(nn.Module):
    """Learns one crossbar layer's share of a task.

    Args:
        layer: the backbone layer (its codes and scale are copied, never modified).
    """

    codes: Tensor
    scale: Tensor

    def __init__(self, layer: CrossbarConv2d) -> None:
        super().__init__()
        if layer.mapping is None or not layer.on_crossbar:
            raise ConfigError("only crossbar layers take masks (depthwise layers run digitally)")
        self.mapping: LayerMapping = layer.mapping
        codes = layer.weight_codes.detach().contiguous().float().clone()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", layer.weight_scale.detach().float().clone(),
                             persistent=False)

    @abstractmethod
    def fold(self, scale: Tensor, generator: torch.Generator | None, stochastic: bool) -> Tensor:
        """The layer's weight for this step at per-channel ``scale`` (ones: code units)."""

    def effective_weight(self, generator: torch.Generator | None, stochastic: bool) -> Tensor:
        """The layer's fp32 weight for this step (differentiable)."""
        return self.fold(self.scale, generator, stochastic)

    def effective_codes(self) -> Tensor:
        """The served weight in code units, computed as the engine computes it."""
        return self.fold(torch.ones_like(self.scale), None, False)

    @abstractmethod
    def export(self, chip_shift_levels: int) -> LayerTaskState:
        """The learned state as the engine serves it."""

    def chip_state(self, chip_shift_levels: int) -> LayerTaskState | None:
        """What the chip holds for this layer now (None: the backbone's cells)."""
        return self.export(chip_shift_levels)

    def start_from(self, state: LayerTaskState, chip_shift_levels: int) -> None:
        """Start training from a served layer state (a warm start)."""
        raise ConfigError(f"{type(self).__name__} cannot start from a task state")


class CrossbarAdapter(LayerAdapter):
    """Spare PEs (4-bit QAT codes) and/or a learned column shift mask on the other PEs.

    Args:
        layer: the backbone layer.
        pe_mask: bool ``[row_groups, col_groups]`` of PEs replaced by trainable spare PEs
            (None: none). Spare codes start from the backbone's codes.
        column_mask: the learnable tier-2 mask (None: every column at 1).
    """

    pe_mask: Tensor
    spare_valid: Tensor
    grouped_codes: Tensor
    spare_kept: Tensor
    spare_outputs: Tensor
    spare_groups: Tensor

    def __init__(self, layer: CrossbarConv2d, pe_mask: Tensor | None = None,
                 column_mask: ColumnMaskModule | None = None) -> None:
        super().__init__(layer)
        mapping = self.mapping
        mask = (pe_mask if pe_mask is not None
                else torch.zeros(mapping.row_groups, mapping.col_groups, dtype=torch.bool))
        if mask.dtype != torch.bool or tuple(mask.shape) != (mapping.row_groups,
                                                             mapping.col_groups):
            raise ConfigError(f"layer {mapping.name}: pe_mask must be bool "
                              f"{[mapping.row_groups, mapping.col_groups]}")
        self.register_buffer("pe_mask", mask.clone())
        grouped = to_row_groups(self.codes, mapping)
        self.spare_latent = nn.Parameter(pe_blocks(grouped, mapping)[mask].clone())
        valid = pe_blocks(to_row_groups(torch.ones_like(self.codes), mapping), mapping)[mask]
        self.register_buffer("spare_valid", valid, persistent=False)
        # What the fold needs every step and that never changes, computed once: the padded
        # codes in row-group layout and where each spare PE's rows land in it.
        self.register_buffer("grouped_codes", grouped, persistent=False)
        rows, cols = mask.nonzero(as_tuple=True)
        outputs = (cols[:, None] * mapping.outputs_per_pe
                   + torch.arange(mapping.outputs_per_pe)).reshape(-1)
        groups = rows.repeat_interleave(mapping.outputs_per_pe)
        kept = (outputs < mapping.out_channels).nonzero().squeeze(1)
        self.register_buffer("spare_kept", kept, persistent=False)
        self.register_buffer("spare_outputs", outputs[kept], persistent=False)
        self.register_buffer("spare_groups", groups[kept], persistent=False)
        self.column_mask = column_mask
        self.qmin, self.qmax = signed_range(mapping.weight_bits)

    def spare_codes(self) -> Tensor:
        """4-bit codes of the spare PEs: clamp to the signed range, round straight-through."""
        return round_ste(self.spare_latent.clamp(self.qmin, self.qmax)) * self.spare_valid

    def fold(self, scale: Tensor, generator: torch.Generator | None, stochastic: bool) -> Tensor:
        """:func:`fold_effective_weight`'s values, with its constant work done once.

        Per step: one multiply of the padded codes by the column values, the spare PEs'
        codes written over their rows, one multiply by the scale (the same products in the
        same order, so the weight is equal bit for bit, and so are the gradients).
        """
        m = self.mapping
        grouped = self.grouped_codes
        if self.column_mask is not None:
            values = self.column_mask(generator=generator, stochastic=stochastic)
            grouped = grouped * values.t().unsqueeze(-1).to(scale.dtype)
        if len(self.spare_outputs):
            spare = round_ste(self.spare_latent.clamp(self.qmin, self.qmax))
            spare = spare.reshape(-1, m.rows_per_group).index_select(0, self.spare_kept)
            index = (self.spare_outputs, self.spare_groups)
            grouped = (grouped.index_put(index, spare) if grouped is self.grouped_codes
                       else grouped.index_put_(index, spare))
        flat = grouped.reshape(m.out_channels, -1)[:, : m.weight_rows]
        return (flat * scale.reshape(-1, 1)).view(m.out_channels, m.in_channels,
                                                  *m.kernel_size)

    def export(self, chip_shift_levels: int) -> LayerTaskState:
        with torch.no_grad():
            spare = self.spare_codes().round().to(torch.int8)
        if self.column_mask is not None:
            codes = self.column_mask.codes(chip_shift_levels)
        else:
            codes = torch.full((self.mapping.row_groups, self.mapping.out_channels),
                               ones_code(chip_shift_levels), dtype=torch.uint8)
        return LayerTaskState(self.pe_mask.clone(), spare.contiguous(), codes)

    @torch.no_grad()
    def start_from(self, state: LayerTaskState, chip_shift_levels: int) -> None:
        """Spare codes and column mask from ``state``, whose replaced PEs must be this
        adapter's (exported again untouched, it gives ``state`` back)."""
        where = f"layer {self.mapping.name}"
        if not torch.equal(state.pe_mask, self.pe_mask):
            raise ConfigError(f"{where}: the initial task replaces other PEs "
                              f"({state.replaced_pes}) than this adaptation "
                              f"({int(self.pe_mask.sum())})")
        self.spare_latent.copy_(state.spare_codes.to(self.spare_latent.dtype))
        frozen = ~replaced_columns(self.pe_mask, self.mapping)
        if self.column_mask is not None:
            self.column_mask.start_from(state.column_codes, chip_shift_levels)
        elif bool((state.column_codes[frozen] != ones_code(chip_shift_levels)).any()):
            raise ConfigError(f"{where}: the initial task masks columns and this "
                              f"adaptation learns no column mask")


def _key(name: str) -> str:
    return name.replace(".", "__")


class TaskModel(nn.Module):
    """Backbone copy + per-layer adapters + digital head (+ per-task BatchNorm affine terms).

    Args:
        model: the frozen, calibrated backbone (copied; never modified).
        num_classes: outputs of the new head.
        train_batchnorm: learn the BatchNorm affine terms as per-task digital state.
        channels_last: run the copy in channels_last memory format (faster on CPU).
        fuse_activation: in passes with autograd, apply each ReLU6 and the input
            quantization after it as one clamp, round and multiply (the same values, and
            the same gradients but where ``x / step`` rounds onto a bound).
    """

    def __init__(self, model: CrossbarModel, num_classes: int, *, train_batchnorm: bool = True,
                 channels_last: bool = True, fuse_activation: bool = True) -> None:
        super().__init__()
        if model.mapping is None:
            raise ConfigError("the backbone has no crossbar mapping: calibrate or load it first")
        self.mapping = model.mapping
        self.shift_levels = model.config.shift_levels
        backbone = copy.deepcopy(model).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self._quantizers: dict[str, tuple[nn.Module, nn.Module]] = {}
        for name, layer in backbone.layers():
            self._quantizers[name] = (layer.input_quant, FrozenInputQuant(layer.input_quant))
            layer.reset_effective_weight()
        self.channels_last = channels_last
        if channels_last:
            backbone = to_channels_last(backbone)
        object.__setattr__(self, "backbone", backbone)  # not a submodule: never saved or moved
        self._source_layers = dict(model.layers())
        self._layers = dict(backbone.layers())
        self.batchnorm = nn.ParameterDict()
        self._bn_names: dict[str, str] = {}
        if train_batchnorm:
            for name, module in backbone.body.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                    for attr in ("weight", "bias"):
                        param = getattr(module, attr)
                        param.requires_grad_(True)
                        self.batchnorm[_key(f"{name}.{attr}")] = param
                        self._bn_names[_key(f"{name}.{attr}")] = f"{name}.{attr}"
        self.fuse_activation = fuse_activation
        self._fused: list[tuple[DigitalNorm, _ClampQuant]] = []
        """Each norm with a ReLU6 whose output only the next layer reads, and the fused
        ReLU6 and input quantization that it applies for that layer."""
        self._fused_inputs: set[str] = set()
        names = {id(layer): name for name, layer in backbone.layers()}
        for module in backbone.body.modules():
            if not isinstance(module, DigitalNorm) or module.clamp_top is None:
                continue
            consumer = module._links()[1]
            frozen = None if consumer is None else self._quantizers[names[id(consumer)]][1]
            if isinstance(frozen, FrozenInputQuant) and frozen.enabled:
                self._fused.append((module, _ClampQuant(module, frozen, module.clamp_top)))
                self._fused_inputs.add(names[id(consumer)])
        self._identity = _Identity()
        features = int(backbone(torch.zeros(1, 3, 32, 32)).shape[1])
        self.head = nn.Linear(features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.adapters = nn.ModuleDict()
        self._adapter_names: dict[str, str] = {}
        self._frozen: dict[str, tuple[Tensor, Tensor]] = {}
        self._stacked: list[StackedFold] = []
        """The crossbar adapters' folds run together in passes with gradients."""
        self.set_adapters({})
        self.generator: torch.Generator | None = None
        self.chip: ChipInTheLoop | None = None
        """The chip the task is adapted for, read in every pass (None: float training)."""
        self.chip_agreement = 0.0
        """Weight of the ideal view's agreement with the chip in training passes."""
        self._agreement: Tensor | None = None
        self._compiled: Callable[[Tensor], Tensor] | None = None
        """The backbone's forward compiled for training passes (None: eager)."""
        self._compile_checked = False

    backbone: CrossbarModel

    def compile_training_pass(self) -> None:
        """Run training passes (autograd on, ``train()`` mode) through ``torch.compile``.

        Only the backbone's forward is compiled: folding the adapters stays eager, so the
        weights it hands the layers are inputs of one graph that every step reuses. Passes
        without autograd (evaluation, export checks) stay eager and exact. If compiling
        fails (no C++ compiler, say), training goes on eagerly with a warning."""
        self._compiled = torch.compile(self.backbone.forward, dynamic=False)
        self._compile_checked = False
        for _, quant in self._fused:  # the compiler fuses torch's operators itself
            quant.kernel = None

    @property
    def compiled(self) -> bool:
        """Whether training passes run compiled (False after a failed compile)."""
        return self._compiled is not None

    def source_layer(self, name: str) -> CrossbarConv2d:
        """A layer of the caller's backbone (read-only use: codes and scales)."""
        return self._source_layers[name]

    def crossbar_layer_names(self) -> list[str]:
        return [m.name for m in self.mapping.crossbar_layers]

    def current_adapters(self) -> dict[str, LayerAdapter]:
        """Layer name -> adapter."""
        return {self._adapter_names[k]: a for k, a in self._adapter_items()}

    def _adapter_items(self) -> list[tuple[str, LayerAdapter]]:
        """``self.adapters.items()``, typed (:meth:`set_adapters` stores LayerAdapters only)."""
        return [(k, cast(LayerAdapter, a)) for k, a in self.adapters.items()]

    def set_adapters(self, adapters: dict[str, LayerAdapter]) -> None:
        """Replace the adapters; layers without one run the backbone's weights."""
        unknown = sorted(set(adapters) - set(self.crossbar_layer_names()))
        if unknown:
            raise ConfigError(f"adapters for layers that are not on crossbars: {unknown[:3]}")
        self.adapters = nn.ModuleDict({_key(n): a for n, a in adapters.items()})
        self._adapter_names = {_key(n): n for n in adapters}
        self._stacked = stacked_folds([a for a in adapters.values()
                                       if isinstance(a, CrossbarAdapter)])
        self._frozen = {}
        for name, layer in self._layers.items():
            if name not in adapters:
                layer.reset_effective_weight()
                codes = layer.effective_codes
                assert codes is not None
                # The layer's fp32 weight in training, computed once instead of per pass.
                self._frozen[name] = (codes, layer.effective_weight)

    def attach_chip(self, chip: ChipInTheLoop) -> None:
        """Run every pass through ``chip``'s crossbar reads (see :mod:`core.learning.chip_loop`)."""
        self.chip = chip
        for name, layer in self._layers.items():
            if layer.on_crossbar:
                layer.register_forward_hook(self._chip_hook(name))

    def _chip_hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor],
                                                Tensor | None]:
        quant = self._quantizers[name][0]
        assert isinstance(quant, ActivationQuantizer)

        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if self.chip is None:
                return None
            assert isinstance(layer, CrossbarConv2d)
            return self.chip.read(layer, quant, name, inputs[0], out)
        return hook

    def load_weights(self) -> None:
        """Fold every adapter into its layer of the copy (training: fresh Gumbel noise).

        With gradients: differentiable fp32 weights and a frozen-step STE input quantizer.
        Without: exactly what the engine serves (weights in code units where the layer
        takes them, the backbone's own input quantizers), so outputs match bit for bit.
        With a chip attached, every pass takes the float path and each crossbar layer is
        programmed with the task's current state, to be read by the chip.
        """
        grad = torch.is_grad_enabled() or self.chip is not None
        exact = not grad and hasattr(CrossbarConv2d, "effective_codes")
        fuse = torch.is_grad_enabled() and self.fuse_activation
        if self.chip is not None:
            self._program_chip(self.chip)
        for name, layer in self._layers.items():
            original, frozen = self._quantizers[name]
            if fuse and name in self._fused_inputs:
                frozen = self._identity  # the norm before it quantizes
            layer.input_quant = frozen if grad else original  # type: ignore[assignment]
        for norm, quant in self._fused:
            norm.train_periphery = quant if fuse else None
        for name, (codes, weight) in self._frozen.items():
            if grad:
                self._layers[name].effective_weight = weight
            else:
                self._layers[name].effective_codes = codes
        stacked: dict[int, Tensor] = {}
        if not exact:
            for fold in self._stacked:
                if fold.ready():
                    weights = fold.weights(stochastic=self.training)
                    stacked.update(zip(map(id, fold.adapters), weights, strict=True))
        for key, adapter in self._adapter_items():
            name = self._adapter_names[key]
            layer = self._layers[name]
            if id(adapter) in stacked:
                weight = stacked[id(adapter)]
                if self.channels_last:
                    weight = weight.contiguous(memory_format=torch.channels_last)
                layer.effective_weight = weight
                continue
            if exact:
                codes = adapter.effective_codes()
                if self.channels_last:
                    codes = codes.contiguous(memory_format=torch.channels_last)
                layer.effective_codes = codes
                continue
            weight = adapter.effective_weight(self.generator, stochastic=self.training)
            if self.channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            layer.effective_weight = weight

    def _program_chip(self, chip: ChipInTheLoop) -> None:
        adapters = dict(self._adapter_items())
        with torch.no_grad():
            for name in self.crossbar_layer_names():
                adapter = adapters.get(_key(name))
                chip.program(name, None if adapter is None
                             else adapter.chip_state(self.shift_levels))

    @torch.no_grad()
    def start_from(self, initial: TaskState, labels: tuple[str, ...]) -> None:
        """Head, BatchNorm terms and every adapter's state from ``initial`` (a warm start:
        the task as served, trained further). The adapters must already be set; a layer
        the initial task changes needs one."""
        if initial.shift_levels != self.shift_levels:
            raise ConfigError(f"the initial task is for a chip with {initial.shift_levels} "
                              f"shift levels, this backbone has {self.shift_levels}")
        try:
            initial.validate(self.mapping)
        except ValueError as e:
            raise ConfigError(f"the initial task does not fit this backbone: {e}") from None
        if tuple(initial.head.labels) != tuple(labels):
            raise ConfigError(f"the initial task's labels {list(initial.head.labels)[:5]} are "
                              f"not the dataset's {list(labels)[:5]}")
        if tuple(initial.head.weight.shape) != tuple(self.head.weight.shape):
            raise ConfigError(f"the initial task's head is {list(initial.head.weight.shape)}, "
                              f"this backbone's features need {list(self.head.weight.shape)}")
        self.head.weight.copy_(initial.head.weight)
        self.head.bias.copy_(initial.head.bias)
        by_name = {full: key for key, full in self._bn_names.items()}
        unknown = sorted(set(initial.digital) - set(by_name))
        if unknown:
            raise ConfigError(f"the initial task has digital terms this adaptation does not "
                              f"learn: {unknown[:3]}")
        for name, value in initial.digital.items():
            self.batchnorm[by_name[name]].copy_(value)
        adapters = self.current_adapters()
        ones = ones_code(self.shift_levels)
        missing = sorted(n for n, st in initial.layers.items() if n not in adapters
                         and (st.replaced_pes or bool((st.column_codes != ones).any())))
        if missing:
            raise ConfigError(f"the initial task changes {len(missing)} crossbar layers that "
                              f"this method does not learn (e.g. {missing[0]})")
        for name, adapter in adapters.items():
            adapter.start_from(initial.layer_state(self.mapping.layer(name)), self.shift_levels)

    def regularization(self) -> Tensor | None:
        """The column masks' penalties and the last training pass's agreement term (None
        when there is neither)."""
        masks: list[Any] = [getattr(a, "column_mask", None) for a in self.adapters.values()]
        terms: list[Tensor | None] = [m.penalty() for m in masks if hasattr(m, "penalty")]
        terms.append(self._agreement)
        self._agreement = None
        present = [t for t in terms if t is not None]
        return torch.stack(present).sum() if present else None

    def column_code_counts(self) -> Tensor | None:
        """Frozen-PE columns of the served mask at each code of the chip's shift table
        (columns of replaced PEs take no mask); None when no adapter has a column mask."""
        codes = []
        for key, adapter in self.adapters.items():
            if isinstance(adapter, CrossbarAdapter) and adapter.column_mask is not None:
                mask = adapter.column_mask.codes(self.shift_levels)
                layer = self.mapping.layer(self._adapter_names[key])
                codes.append(mask[~replaced_columns(adapter.pe_mask, layer)])
        if not codes:
            return None
        return torch.bincount(torch.cat(codes).long(), minlength=self.shift_levels + 2)

    def epoch_metrics(self) -> dict[str, float]:
        """Share of frozen-PE columns at each shift level (``columns_at_1/8``: 0.02, ...)."""
        counts = self.column_code_counts()
        return {} if counts is None else level_shares(counts, self.shift_levels)

    def features(self, x: Tensor) -> Tensor:
        self.load_weights()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._compiled is not None and self.training and torch.is_grad_enabled():
            return self._compiled_features(x)
        features: Tensor = self.backbone(x)
        return features

    def _compiled_features(self, x: Tensor) -> Tensor:
        assert self._compiled is not None
        if self._compile_checked:
            return self._compiled(x)
        started = time.perf_counter()
        try:
            features = self._compiled(x)
        except Exception as e:  # the compiler's own errors have no common base class
            logger.warning("compiling the training pass failed (%s: %s); training eagerly",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._compiled = None
            features = self.backbone(x)
        else:
            logger.info("compiled the training pass in %.0f s",
                        time.perf_counter() - started)
        self._compile_checked = True
        return features

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(self.features(x), self.head.weight, self.head.bias)
        if self.training and self.chip is not None and self.chip_agreement > 0:
            chip, self.chip = self.chip, None  # the same weights, read without the chip
            try:
                ideal = F.linear(self.features(x), self.head.weight, self.head.bias)
            finally:
                self.chip = chip
            target = F.softmax(logits.detach(), dim=1)
            self._agreement = self.chip_agreement * F.kl_div(
                F.log_softmax(ideal, dim=1), target, reduction="batchmean")
        return logits

    def export(self, task_id: str, labels: tuple[str, ...]) -> TaskState:
        """The learned task as the engine serves it (bit-exact in ideal fidelity)."""
        layers = {self._adapter_names[k]: a.export(self.shift_levels)
                  for k, a in self._adapter_items()}
        digital = {self._bn_names[k]: p.detach().clone() for k, p in self.batchnorm.items()}
        head = TaskHead(self.head.weight.detach().clone(), self.head.bias.detach().clone(),
                        tuple(labels))
        return TaskState(task_id, self.shift_levels, head, layers, digital)


def level_label(value: float) -> str:
    """``0``, ``1/8``, ..., ``1``: how a shift-mask value is named in reports."""
    return "0" if value == 0 else "1" if value == 1 else f"1/{round(1 / value)}"


def level_shares(counts: Tensor, shift_levels: int) -> dict[str, float]:
    """``{"columns_at_0": share, ..., "columns_at_1": share}`` from per-code counts."""
    total = max(1, int(counts.sum()))
    return {f"columns_at_{level_label(float(v))}": int(c) / total
            for v, c in zip(shift_values(shift_levels).tolist(), counts.tolist(), strict=True)}


def new_task_model(model: CrossbarModel, data: TaskDataset, train: TrainConfig,
                   task_id: str = "", initial: TaskState | None = None) -> TaskModel:
    """A task model whose head is warm-started on the frozen backbone's features (as the
    chip of ``train.chip_noise`` holds them, read through its periphery with
    ``train.chip_periphery``). ``task_id``: the name the task will be served under.
    With an ``initial`` task the head is left for :func:`train_task_model` to load."""
    noise = noise_level(train.chip_noise)
    source = programmed_backbone(model, noise) if noise.alters_cells else model
    task_model = TaskModel(source, len(data.classes), train_batchnorm=train.train_batchnorm,
                           channels_last=train.channels_last)
    if train.chip_periphery:
        task_model.attach_chip(ChipInTheLoop(model, noise, task_id, seed=train.seed))
        task_model.chip_agreement = train.chip_agreement
    task_model.eval()
    if initial is None:
        warm_start_head(task_model.features, task_model.head, data.train, train)
    return task_model


def initial_pe_masks(task_model: TaskModel, initial: TaskState) -> dict[str, Tensor]:
    """The PEs an initial task replaces, per crossbar layer (all False where it has none)."""
    return {n: initial.layer_state(task_model.mapping.layer(n)).pe_mask.clone()
            for n in task_model.crossbar_layer_names()}


def train_task_model(
    method: str, task_model: TaskModel, extra_groups: list[dict[str, Any]],
    data: TaskDataset, task_id: str, config: Any, train: TrainConfig, options: RunOptions,
    started: float, details: dict[str, Any] | None = None,
    before_step: Callable[[float], None] | None = None, initial: TaskState | None = None,
) -> AdaptationResult:
    """Train the adapters, head and BatchNorm terms; export and validate the task.

    ``config`` is the method's config dataclass (recorded, and checked on resume);
    ``before_step`` gets the share of training done (mask annealing); ``initial``: a task
    to start from (its head, BatchNorm terms, spare codes and masks), as served.
    """
    meta = {"method": method, "config": config_dict(config),
            "dataset": data.describe()["name"]}
    if initial is not None:
        task_model.start_from(initial, tuple(data.classes))
        meta["initial_task"] = initial.task_id
    groups = [{"params": list(task_model.head.parameters()), "lr": train.lr_head},
              {"params": list(task_model.batchnorm.values()), "lr": train.lr_batchnorm},
              *extra_groups]
    cfg = meta["config"]
    details = dict(details or {})
    if train.compile and task_model.chip is not None:
        logger.warning("train.compile is ignored with the chip in the loop (its reads "
                       "cannot be traced); training eagerly")
    elif train.compile:
        task_model.compile_training_pass()
    with deterministic():
        steps, history = fit(
            task_model, groups, data.train, train, options,
            description=f"{method} on {data.spec.name}", checkpoint_meta=meta,
            before_step=before_step,
        )
        task = task_model.export(task_id, tuple(data.classes))
        val = accuracy(task_model, data.val, channels_last=False)
    details["compiled_training_pass"] = task_model.compiled
    frozen_codes = [
        s.column_codes[~replaced_columns(s.pe_mask, task_model.mapping.layer(n))]
        for n, s in task.layers.items()
    ]
    if frozen_codes:
        counts = torch.bincount(torch.cat(frozen_codes).long(),
                                minlength=task.shift_levels + 2)
        details["column_code_counts"] = counts.tolist()
        details["column_level_shares"] = level_shares(counts, task.shift_levels)
    return AdaptationResult(method, task, val, steps, time.perf_counter() - started, cfg,
                            history, details, trained_model=task_model)

