from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.chip.config import CrossbarConfig
from core.chip.mapping import map_layer
from core.ops.fold import fold_effective_weight
from core.task_state import shift_values


def reference_fold(codes, scale, layer, values, pe_mask, spare):
    """Weight by weight, PE by PE: the definition the vectorised fold must match."""
    out = torch.zeros(layer.out_channels, layer.weight_rows)
    flat = codes.reshape(layer.out_channels, -1).float()
    replaced = {tuple(rc): i for i, rc in enumerate(pe_mask.nonzero().tolist())}
    for o in range(layer.out_channels):
        for r in range(layer.weight_rows):
            g, c = r // layer.rows_per_group, o // layer.outputs_per_pe
            if (g, c) in replaced:
                w = spare[replaced[g, c], o % layer.outputs_per_pe, r % layer.rows_per_group]
                out[o, r] = float(w) * scale[o]
            else:
                out[o, r] = flat[o, r] * values[g, o] * scale[o]
    return out.reshape(codes.shape)


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 12), cout=st.integers(1, 12), k=st.sampled_from([1, 3]),
    rows=st.sampled_from([9, 18, 27]), cols=st.sampled_from([2, 4, 6]),
    levels=st.integers(0, 3), seed=st.integers(0, 10_000),
)
def test_fold_matches_per_weight_reference(cin, cout, k, rows, cols, levels, seed):
    g = torch.Generator().manual_seed(seed)
    config = CrossbarConfig(rows=rows, cols=cols, shift_levels=levels)
    layer = map_layer("l", 0, nn.Conv2d(cin, cout, k), config, weight_bits=4, input_bits=4,
                      input_signed=False)
    codes = torch.randint(-8, 8, (cout, cin, k, k), generator=g, dtype=torch.int8)
    scale = torch.rand(cout, generator=g) + 0.1
    column_codes = torch.randint(0, levels + 2, (layer.row_groups, cout), generator=g)
    values = shift_values(levels)[column_codes]
    pe_mask = torch.rand(layer.row_groups, layer.col_groups, generator=g) < 0.4
    spare = torch.randint(-8, 8, (int(pe_mask.sum()), layer.outputs_per_pe,
                                  layer.rows_per_group), generator=g, dtype=torch.int8)
    got = fold_effective_weight(codes, scale, layer, values, pe_mask, spare)
    want = reference_fold(codes, scale, layer, values, pe_mask, spare)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_shift_values_and_binary_mask():
    assert shift_values(3).tolist() == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert shift_values(0).tolist() == [0.0, 1.0]


def test_fold_is_differentiable_in_masks_and_spare_weights():
    layer = map_layer("l", 0, nn.Conv2d(16, 8, 3), CrossbarConfig(rows=72, cols=8),
                      weight_bits=4, input_bits=4, input_signed=False)
    codes = torch.randint(-8, 8, (8, 16, 3, 3), dtype=torch.int8)
    values = torch.full((layer.row_groups, 8), 0.5, requires_grad=True)
    pe_mask = torch.zeros(layer.row_groups, layer.col_groups, dtype=torch.bool)
    pe_mask[0, 0] = True
    spare = torch.randn(1, layer.outputs_per_pe, layer.rows_per_group, requires_grad=True)
    fold_effective_weight(codes, torch.ones(8), layer, values, pe_mask, spare).sum().backward()
    assert values.grad is not None and spare.grad is not None
    assert float(values.grad[0, :4].abs().sum()) == 0.0  # under the replaced PE: no effect
    assert float(values.grad[1].abs().sum()) > 0
    assert float(spare.grad.abs().sum()) > 0
