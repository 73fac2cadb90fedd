"""Gumbel-sigmoid binary masks and power-of-two rounding of the tier-2 column mask.

The column mask of a frozen PE's logical column is learned as a real logit
``m``. Its binary part is a Gumbel-sigmoid sample hardened at 0.5 (forward
pass) with the soft sample's gradient (straight-through); where the binary
part is 0 the column keeps ``sigmoid(m)`` rounded to the nearest of
``{0, 2**-N, ..., 1/4, 1/2}`` (paper 3.3.1), so the value is always one the
shift-adder can apply. N = 0 leaves ``{0}``: a binary mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.errors import ConfigError
from core.task_state import shift_values

__all__ = [
    "gumbel_sigmoid",
    "round_to_shift",
    "shift_mask_codes",
    "shift_mask_values",
    "shift_value_codes",
]

_EPS = 1e-10


def _logistic_noise(shape: torch.Size, generator: torch.Generator | None) -> Tensor:
    """``g0 - g1`` of two Gumbel samples, i.e. one standard logistic sample."""
    u = torch.rand(shape, generator=generator).clamp_(_EPS, 1 - _EPS)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(
    logits: Tensor, temperature: float, generator: torch.Generator | None = None,
    hard: bool = True,
) -> Tensor:
    """``sigmoid((m + g0 - g1) / T)``; with ``hard`` the forward value is 0/1 (threshold 0.5)
    and the gradient is the soft sample's (straight-through)."""
    if not temperature > 0:
        raise ConfigError(f"Gumbel-sigmoid temperature must be > 0, got {temperature}")
    noise = _logistic_noise(logits.shape, generator).to(logits.dtype)
    soft = torch.sigmoid((logits + noise) / temperature)
    if not hard:
        return soft
    binary = (soft > 0.5).to(soft.dtype)
    return binary + (soft - soft.detach())


def round_to_shift(values: Tensor, shift_levels: int) -> Tensor:
    """Nearest of ``{0, 2**-N, ..., 1/2}`` (no gradient); inputs are in ``[0, 1]``."""
    if shift_levels < 0:
        raise ConfigError(f"shift_levels must be >= 0, got {shift_levels}")
    allowed = shift_values(shift_levels)[:-1].to(values.dtype)  # the 1 is the binary part
    nearest = (values.detach().unsqueeze(-1) - allowed).abs().argmin(dim=-1)
    return allowed[nearest]


def shift_mask_values(
    logits: Tensor, shift_levels: int, *, temperature: float = 1.0,
    generator: torch.Generator | None = None, stochastic: bool = True,
) -> Tensor:
    """Column multipliers in ``shift_values(N)``: 1 where the binary part is 1, else the
    power-of-two-rounded normalised real mask; differentiable in ``logits``.

    ``stochastic=False`` is the deterministic mask that is exported and served:
    binary part ``sigmoid(m) > 0.5`` (the noise-free Gumbel-sigmoid).
    """
    normalised = torch.sigmoid(logits)
    if stochastic:
        binary = gumbel_sigmoid(logits, temperature, generator)
    else:
        binary = (logits > 0).to(logits.dtype)
    rounded = normalised + (round_to_shift(normalised, shift_levels) - normalised).detach()
    return binary + (1 - binary) * rounded


def shift_value_codes(values: Tensor, chip_shift_levels: int) -> Tensor:
    """uint8 codes of mask values in the chip's ``shift_values`` table; values must be exact."""
    table = shift_values(chip_shift_levels).to(values.dtype)
    match = values.detach().unsqueeze(-1) == table
    if not bool(match.any(dim=-1).all()):
        raise ConfigError(
            f"mask values outside the chip's {chip_shift_levels}-level shift set {table.tolist()}"
        )
    return match.to(torch.uint8).argmax(dim=-1).to(torch.uint8)


def shift_mask_codes(logits: Tensor, shift_levels: int, chip_shift_levels: int) -> Tensor:
    """Deterministic codes of a learned mask, for the task state."""
    if shift_levels > chip_shift_levels:
        raise ConfigError(
            f"a {shift_levels}-level mask does not fit a chip with {chip_shift_levels} levels"
        )
    with torch.no_grad():
        values = shift_mask_values(logits, shift_levels, stochastic=False)
    return shift_value_codes(values, chip_shift_levels)


class ColumnMask(torch.nn.Module):
    """Learnable tier-2 mask of one layer: a real logit per logical column.

    Args:
        row_groups: row groups of the layer.
        out_channels: logical columns per row group.
        shift_levels: N of this mask (0: binary, as XBM); at most the chip's.
        temperature: Gumbel-sigmoid temperature T.
        init_logit: starting logit; large positive starts every column at 1 (the backbone).
    """

    def __init__(self, row_groups: int, out_channels: int, *, shift_levels: int,
                 temperature: float, init_logit: float) -> None:
        super().__init__()
        if shift_levels < 0:
            raise ConfigError(f"shift_levels must be >= 0, got {shift_levels}")
        self.shift_levels = shift_levels
        self.temperature = temperature
        self.logits = torch.nn.Parameter(torch.full((row_groups, out_channels), init_logit))

    def forward(self, generator: torch.Generator | None = None, stochastic: bool = True) -> Tensor:
        return shift_mask_values(self.logits, self.shift_levels, temperature=self.temperature,
                                 generator=generator, stochastic=stochastic)

    def codes(self, chip_shift_levels: int) -> Tensor:
        return shift_mask_codes(self.logits, self.shift_levels, chip_shift_levels)

    def extra_repr(self) -> str:
        return f"shift_levels={self.shift_levels}, temperature={self.temperature}"
