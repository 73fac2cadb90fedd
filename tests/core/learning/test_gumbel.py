from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.learning.gumbel import (
    ColumnMask,
    gumbel_sigmoid,
    round_to_shift,
    shift_mask_codes,
    shift_mask_values,
    shift_value_codes,
)
from core.task_state import shift_values


def test_gumbel_sigmoid_is_hard_forward_and_soft_backward():
    logits = torch.linspace(-3, 3, 200, requires_grad=True)
    out = gumbel_sigmoid(logits, 0.7, torch.Generator().manual_seed(0))
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}
    (out * torch.arange(200.0)).sum().backward()
    assert logits.grad is not None
    assert bool((logits.grad >= 0).all())  # the soft sample's gradient, never the hard one's
    assert float((logits.grad > 0).float().mean()) > 0.9


def test_gumbel_sigmoid_samples_ones_with_probability_sigmoid_of_logit():
    logits = torch.full((20000,), 1.0)
    out = gumbel_sigmoid(logits, 1.0, torch.Generator().manual_seed(1))
    assert abs(float(out.mean()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.02
    with pytest.raises(ConfigError):
        gumbel_sigmoid(logits, 0.0)


@pytest.mark.parametrize("levels", [0, 1, 2, 3])
def test_shift_mask_values_lie_in_the_allowed_set(levels):
    logits = torch.linspace(-8, 8, 401, requires_grad=True)
    allowed = set(shift_values(levels).tolist())
    for stochastic in (True, False):
        values = shift_mask_values(logits, levels, generator=torch.Generator().manual_seed(2),
                                   stochastic=stochastic)
        assert set(values.detach().unique().tolist()) <= allowed
    values = shift_mask_values(logits, levels, stochastic=False)
    values.sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_zero_shift_levels_is_a_binary_mask():
    logits = torch.randn(1000) * 4
    values = shift_mask_values(logits, 0, generator=torch.Generator().manual_seed(3))
    assert set(values.unique().tolist()) == {0.0, 1.0}
    deterministic = shift_mask_values(logits, 0, stochastic=False)
    assert torch.equal(deterministic, (logits > 0).float())


def test_power_of_two_rounding_picks_the_nearest_level():
    x = torch.tensor([0.0, 0.05, 0.07, 0.2, 0.3, 0.4, 0.49])
    assert round_to_shift(x, 3).tolist() == [0.0, 0.0, 0.125, 0.25, 0.25, 0.5, 0.5]
    assert round_to_shift(x, 1).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5]


def test_codes_index_the_chip_table_even_for_a_binary_mask():
    logits = torch.tensor([[5.0, -5.0, -0.7, -1.5]])
    # sigmoid: 0.99 -> 1 (binary part), 0.007 -> 0, 0.33 -> 1/4, 0.18 -> 1/8
    assert shift_mask_codes(logits, 3, 3).tolist() == [[4, 0, 2, 1]]
    assert shift_mask_codes(logits, 0, 3).tolist() == [[4, 0, 0, 0]]
    values = shift_values(3)[shift_mask_codes(logits, 3, 3).long()]
    assert torch.equal(values, shift_mask_values(logits, 3, stochastic=False))
    with pytest.raises(ConfigError):
        shift_mask_codes(logits, 4, 3)
    with pytest.raises(ConfigError):
        shift_value_codes(torch.tensor([0.3]), 3)


def test_column_mask_starts_at_one():
    mask = ColumnMask(2, 5, shift_levels=3, temperature=1.0, init_logit=3.0)
    assert bool((mask(stochastic=False) == 1).all())
    assert bool((mask.codes(3) == 4).all())
