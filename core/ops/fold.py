"""Pure-torch folding of a task's masks and spare PEs into effective weights.

Ideal fidelity computes ``conv(x, W_eff)`` with::

    W_eff[o, rows of group g] = scale[o] * m[g, o] * codes[o, rows of g]   (frozen PE)
    W_eff[o, rows of group g] = scale[o] * spare[o, rows of g]            (replaced PE)

which equals the crossbar's shift-add of column partial sums when the ADC is
lossless. The same function is differentiable in ``column_values`` and
``spare_codes``, so the learning methods train through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.chip.mapping import LayerMapping

__all__ = ["fold_effective_weight", "from_row_groups", "replaced_columns", "to_row_groups"]


def to_row_groups(weight: Tensor, layer: LayerMapping) -> Tensor:
    """``[Cout, Cin, kh, kw]`` -> ``[Cout, row_groups, rows_per_group]``, zero-padded."""
    flat = weight.reshape(weight.shape[0], -1)
    padded_rows = layer.row_groups * layer.rows_per_group
    flat = F.pad(flat, (0, padded_rows - flat.shape[1]))
    return flat.reshape(weight.shape[0], layer.row_groups, layer.rows_per_group)


def from_row_groups(grouped: Tensor, layer: LayerMapping) -> Tensor:
    """Inverse of :func:`to_row_groups` (drops the padding)."""
    flat = grouped.reshape(grouped.shape[0], -1)[:, : layer.weight_rows]
    return flat.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)


def replaced_columns(pe_mask: Tensor, layer: LayerMapping) -> Tensor:
    """bool ``[row_groups, out_channels]``: logical columns that sit in replaced PEs."""
    cols = pe_mask.repeat_interleave(layer.outputs_per_pe, dim=1)
    return cols[:, : layer.out_channels]


def spare_rows(spare_codes: Tensor, pe_mask: Tensor, layer: LayerMapping) -> Tensor:
    """Scatter spare-PE codes into ``[Cout, row_groups, rows_per_group]`` (zeros elsewhere)."""
    full = spare_codes.new_zeros(
        layer.row_groups, layer.col_groups, layer.outputs_per_pe, layer.rows_per_group
    )
    rows, cols = pe_mask.nonzero(as_tuple=True)
    full = full.index_put((rows, cols), spare_codes)
    full = full.reshape(layer.row_groups, -1, layer.rows_per_group)[:, : layer.out_channels]
    return full.permute(1, 0, 2)


def fold_effective_weight(
    codes: Tensor,
    scale: Tensor,
    layer: LayerMapping,
    column_values: Tensor | None = None,
    pe_mask: Tensor | None = None,
    spare_codes: Tensor | None = None,
) -> Tensor:
    """Effective fp32 weight ``[Cout, Cin, kh, kw]`` of one crossbar layer for one task.

    Args:
        codes: backbone weight codes ``[Cout, Cin, kh, kw]`` (int or float).
        scale: per-output-channel scale ``[Cout]``.
        layer: the layer's mapping.
        column_values: mask multipliers ``[row_groups, Cout]`` (None = all ones).
        pe_mask: bool ``[row_groups, col_groups]`` of replaced PEs (None = none).
        spare_codes: ``[n_replaced, outputs_per_pe, rows_per_group]`` codes (int or float).
    """
    grouped = to_row_groups(codes.to(scale.dtype), layer)
    if column_values is not None:
        grouped = grouped * column_values.t().unsqueeze(-1).to(scale.dtype)
    if pe_mask is not None and bool(pe_mask.any()):
        if spare_codes is None:
            raise ValueError("pe_mask replaces PEs but no spare_codes were given")
        replaced = replaced_columns(pe_mask, layer).t().unsqueeze(-1)
        spare = spare_rows(spare_codes.to(scale.dtype), pe_mask, layer)
        grouped = torch.where(replaced, spare, grouped)
    return from_row_groups(grouped, layer) * scale.reshape(-1, 1, 1, 1)
