"""Every crossbar adapter of a task model folded in one pass over a stacked layout.

Folding layer by layer runs some 25 small operators per layer forward and as many
backward (the column mask's sigmoid, threshold and rounding to a shift level, the
multiply by the codes, the spare PEs' clamp, rounding and scatter, the multiply by the
scale) for 35 layers of a few thousand columns each: a training step spent more time
dispatching them than computing. :class:`StackedFold` keeps the padded codes of all
layers whose PEs have the same rows as one ``[columns, rows]`` matrix (a logical column
of one row group per row) and runs the mask, the multiply and the spare PEs' scatter
once for all of them; each layer then multiplies its own rows by its scale. The
products are :meth:`CrossbarAdapter.fold`'s, in the same order, so the weights and all
their gradients are equal bit for bit (``tests/core/learning/test_training_step.py``).
Two places keep each layer apart for that: the sigmoid (torch computes a tensor's last
few elements with the scalar ``exp``, the rest vectorised, and these may differ by an
ulp) and the scale's multiply (a convolution of a view into the stack reads it at
another alignment and may sum in another order).

Where the compiled operator is built, the multiplies, the scatter and their backward
are its two passes (:class:`_CompiledFold`): some 40 operators over the 2.1 million
weights forward and back became two passes and torch's sum, 32 -> 19 ms of a step on
a 2-core AVX2 machine, with the same bits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from core.learning.gumbel import ColumnMask, shift_mask_values
from core.nn.quant import round_ste
from core.ops.extension import crossbar_extension

if TYPE_CHECKING:
    from core.learning.task_model import CrossbarAdapter

__all__ = ["StackedFold", "stacked_folds"]


class StackedFold:
    """The fold of adapters whose PEs have the same rows and whose column masks (all or
    none) are :class:`ColumnMask` s of one shift-level count.

    Made once: the codes of every (layer, output channel, row group) as one row of
    ``codes``, where each row's column value sits in the concatenated mask logits (stored
    ``[row_groups, out_channels]`` per layer) and which rows the spare PEs' codes replace.
    """

    def __init__(self, adapters: list[CrossbarAdapter]) -> None:
        self.adapters = adapters
        first = adapters[0]
        self.rows = first.mapping.rows_per_group
        self.qmin, self.qmax = first.qmin, first.qmax
        masks = [a.column_mask for a in adapters]
        self.masks: list[ColumnMask] = [m for m in masks if isinstance(m, ColumnMask)]
        self.mask_sizes = [m.logits.numel() for m in self.masks]
        codes, order, spare_rows, spare_kept, self.sizes = [], [], [], [], []
        self.spared: list[CrossbarAdapter] = []
        """The adapters with spare PEs (the others' empty codes take no part)."""
        row = logit = spare = 0
        for adapter in adapters:
            m = adapter.mapping
            columns = m.out_channels * m.row_groups
            codes.append(adapter.grouped_codes.reshape(columns, self.rows))
            # Row (o, g) of this layer holds the logit at [g, o] of its mask.
            groups = torch.arange(m.row_groups).repeat(m.out_channels)
            outputs = torch.arange(m.out_channels).repeat_interleave(m.row_groups)
            order.append(logit + groups * m.out_channels + outputs)
            if adapter.spare_latent.numel():
                self.spared.append(adapter)
                spare_rows.append(row + adapter.spare_outputs * m.row_groups
                                  + adapter.spare_groups)
                spare_kept.append(spare + adapter.spare_kept)
                spare += adapter.spare_latent.numel() // self.rows
            self.sizes.append(columns)
            row += columns
            logit += columns
        self.codes = torch.cat(codes)
        self.column_order = torch.cat(order)
        none = torch.zeros(0, dtype=torch.long)
        self.spare_rows = torch.cat([none, *spare_rows])
        self.spare_kept = torch.cat([none, *spare_kept])
        # What the compiled fold reads: each row's spare PE (-1: none), each layer's rows.
        self.spare_slot = torch.full((row,), -1, dtype=torch.long)
        self.spare_slot[self.spare_rows] = torch.arange(len(self.spare_rows))
        self.layer_starts = [0, *itertools.accumulate(self.sizes)]
        self.layer_groups = [a.mapping.row_groups for a in adapters]
        self.weight_rows = [a.mapping.weight_rows for a in adapters]

    @staticmethod
    def fits(adapters: list[CrossbarAdapter]) -> bool:
        """Whether the masks of adapters with the same PE rows and weight range allow one
        stacked fold: none, or threshold masks of one shift-level count."""
        masks = [a.column_mask for a in adapters]
        if all(m is None for m in masks):
            return True
        return (all(isinstance(m, ColumnMask) for m in masks)
                and len({m.shift_levels for m in masks if isinstance(m, ColumnMask)}) == 1)

    def ready(self) -> bool:
        """Whether this step's masks can be computed together: one temperature and no
        Gumbel noise (noise is drawn per layer, in the order a per-layer fold draws it)."""
        if not self.masks:
            return True
        temperature = self.masks[0].temperature
        return all(m.noise == 0 and m.temperature == temperature for m in self.masks)

    def _sigmoid_per_layer(self, stacked: Tensor) -> Tensor:
        """torch's sigmoid of each layer's logits on their own (see
        :func:`shift_mask_values`), so every layer gets its own fold's bits."""
        return torch.cat([torch.sigmoid(part)
                          for part in torch.split(stacked, self.mask_sizes)])

    def weights(self, stochastic: bool) -> list[Tensor]:
        """Each adapter's fp32 weight, as ``adapter.fold(adapter.scale, None, stochastic)``
        computes it (call only when :meth:`ready`): the multiplies, the scatter and their
        backward in the compiled operator's two passes where it is built (the same
        products), torch's operators otherwise."""
        row_values = spare = None
        if self.masks:
            first = self.masks[0]
            logits = torch.cat([m.logits.reshape(-1) for m in self.masks])
            values = shift_mask_values(logits, first.shift_levels,
                                       temperature=first.temperature,
                                       stochastic=stochastic, noise=0.0,
                                       sigmoid=self._sigmoid_per_layer)
            row_values = values.index_select(0, self.column_order)
        if len(self.spare_rows):
            latent = torch.cat([a.spare_latent.reshape(-1, self.rows) for a in self.spared])
            spare = round_ste(latent.clamp(self.qmin, self.qmax))
            spare = spare.index_select(0, self.spare_kept)
        extension = crossbar_extension()
        if extension is not None:
            apply: Callable[..., tuple[Tensor, ...]] = _CompiledFold.apply  # untyped stub
            flats = list(apply(self, extension, row_values, spare))
        else:
            flats = self._torch_fold(row_values, spare)
        return [flat.view(a.mapping.out_channels, a.mapping.in_channels,
                          *a.mapping.kernel_size)
                for a, flat in zip(self.adapters, flats, strict=True)]

    def _torch_fold(self, row_values: Tensor | None, spare: Tensor | None) -> list[Tensor]:
        grouped = self.codes
        if row_values is not None:
            grouped = grouped * row_values.unsqueeze(1)
        if spare is not None:
            grouped = (grouped.index_put((self.spare_rows,), spare) if grouped is self.codes
                       else grouped.index_put_((self.spare_rows,), spare))
        flats = []
        for adapter, part in zip(self.adapters, torch.split(grouped, self.sizes),
                                 strict=True):
            # Each weight its own tensor, as the layer's fold makes it (module docstring).
            m = adapter.mapping
            flat = part.view(m.out_channels, -1)[:, : m.weight_rows]
            flats.append(flat * adapter.scale.reshape(-1, 1))
        return flats

    def layer_arguments(self) -> tuple[list[int], list[int], list[int], list[Tensor]]:
        """Each layer's first row (and the end), row groups, weight width and scale, as
        the compiled fold takes them."""
        return (self.layer_starts, self.layer_groups, self.weight_rows,
                [a.scale for a in self.adapters])


class _CompiledFold(torch.autograd.Function):
    """The stacked fold's multiplies and scatter in one compiled pass, and its backward
    in another: the same products as :meth:`StackedFold._torch_fold`, and torch's own
    sum over each row for the column values' gradients, so every bit is the same."""

    @staticmethod
    def forward(ctx: Any, fold: StackedFold, extension: ModuleType, row_values: Tensor | None,
                spare: Tensor | None) -> tuple[Tensor, ...]:
        ctx.fold, ctx.extension = fold, extension
        ctx.masked, ctx.spared = row_values is not None, spare is not None
        empty = fold.codes.new_empty(0)
        spare_codes = (spare.detach().contiguous() if spare is not None
                       else fold.codes.new_empty(0, fold.rows))
        weights = extension.stacked_fold_forward(
            fold.codes, empty if row_values is None else row_values.detach().contiguous(),
            spare_codes, fold.spare_slot, *fold.layer_arguments())
        return tuple(weights)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        fold: StackedFold = ctx.fold
        shapes = [(size // groups, width) for size, groups, width
                  in zip(fold.sizes, fold.layer_groups, fold.weight_rows, strict=True)]
        full = [torch.zeros(shape) if g is None else g.contiguous()
                for g, shape in zip(grads, shapes, strict=True)]
        want_values = ctx.masked and ctx.needs_input_grad[2]
        products, spare_grad = ctx.extension.stacked_fold_backward(
            full, fold.codes, fold.spare_slot, len(fold.spare_rows), want_values,
            *fold.layer_arguments())
        # torch's sum, as the backward of the product by the column values sums
        row_grad = products.sum(1, keepdim=True).view(-1) if want_values else None
        return None, None, row_grad, spare_grad if ctx.spared else None


def stacked_folds(adapters: list[CrossbarAdapter]) -> list[StackedFold]:
    """The adapters in stacked folds, one per kind of PE rows, for those that fit."""
    by_rows: dict[tuple[int, int, int], list[CrossbarAdapter]] = {}
    for adapter in adapters:
        key = (adapter.mapping.rows_per_group, adapter.qmin, adapter.qmax)
        by_rows.setdefault(key, []).append(adapter)
    return [StackedFold(group) for group in by_rows.values() if StackedFold.fits(group)]
