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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.learning.gumbel import ColumnMask, shift_mask_values
from core.nn.quant import round_ste

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
        computes it (call only when :meth:`ready`)."""
        grouped = self.codes
        if self.masks:
            first = self.masks[0]
            logits = torch.cat([m.logits.reshape(-1) for m in self.masks])
            values = shift_mask_values(logits, first.shift_levels,
                                       temperature=first.temperature,
                                       stochastic=stochastic, noise=0.0,
                                       sigmoid=self._sigmoid_per_layer)
            grouped = grouped * values.index_select(0, self.column_order).unsqueeze(1)
        if len(self.spare_rows):
            latent = torch.cat([a.spare_latent.reshape(-1, self.rows) for a in self.spared])
            spare = round_ste(latent.clamp(self.qmin, self.qmax))
            spare = spare.index_select(0, self.spare_kept)
            grouped = (grouped.index_put((self.spare_rows,), spare) if grouped is self.codes
                       else grouped.index_put_((self.spare_rows,), spare))
        weights = []
        for adapter, part in zip(self.adapters, torch.split(grouped, self.sizes),
                                 strict=True):
            # Each weight its own tensor, as the layer's fold makes it (module docstring).
            m = adapter.mapping
            flat = part.view(m.out_channels, -1)[:, : m.weight_rows]
            weights.append((flat * adapter.scale.reshape(-1, 1)).view(
                m.out_channels, m.in_channels, *m.kernel_size))
        return weights


def stacked_folds(adapters: list[CrossbarAdapter]) -> list[StackedFold]:
    """The adapters in stacked folds, one per kind of PE rows, for those that fit."""
    by_rows: dict[tuple[int, int, int], list[CrossbarAdapter]] = {}
    for adapter in adapters:
        key = (adapter.mapping.rows_per_group, adapter.qmin, adapter.qmax)
        by_rows.setdefault(key, []).append(adapter)
    return [StackedFold(group) for group in by_rows.values() if StackedFold.fits(group)]
