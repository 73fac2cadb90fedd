"""A categorical tier-2 column mask: one logit per shift level, annealed to the served mask.

Each logical column holds ``N + 2`` logits, one per value of ``shift_values(N)``
(``{0, 1/8, 1/4, 1/2, 1}`` for N = 3). Training samples a level by the
straight-through Gumbel-softmax: the forward pass uses the one-hot argmax of
``(logits + s * g) / T`` (``g`` Gumbel noise, ``s`` its scale), the backward pass the
softmax's gradient. The served mask is the noise-free argmax of the logits.

The alternative to the threshold mask of :mod:`core.learning.gumbel` (one logit
that walks down the levels in order). Each level has its own logit, so a column
can jump straight to any level; but it needs the noise (without it Adam raises
every lower level's logit at the same rate), and in a short run that noise cost
more accuracy than the noise-free last epoch recovered (docs/adaptation.md), so
it is an option (``mask.kind=categorical``), not the default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ConfigError
from core.learning.gumbel import mask_values_of, shift_value_codes
from core.task_state import shift_values

__all__ = ["CategoricalColumnMask", "anneal"]

_EPS = 1e-10


def anneal(start: float, end: float, progress: float, until: float) -> float:
    """``start`` at progress 0 to ``end`` at ``until`` (geometric when both are > 0, else
    linear), constant afterwards."""
    t = 1.0 if until <= 0 else min(1.0, max(0.0, progress / until))
    if start > 0 and end > 0:
        return start * math.pow(end / start, t)
    return start + (end - start) * t


class CategoricalColumnMask(torch.nn.Module):
    """Learnable tier-2 mask of one layer: a categorical choice of shift level per column.

    Args:
        row_groups: row groups of the layer.
        out_channels: logical columns per row group.
        shift_levels: N of this mask (0: binary, as XBM); at most the chip's.
        prior: starting logit of the level 1 above every other level's 0: the served mask
            starts at all 1 (the backbone) and a column leaves 1 once another level's
            logit overtakes it.
        temperature: softmax temperature T at the start of training.
        noise: scale of the Gumbel noise at the start of training (0: none).
        l1: weight of the penalty on the mean expected mask value (pressure toward
            cheaper levels; a column at 0 needs no ADC conversion).
    """

    levels: Tensor  # buffer: the value of each shift level

    def __init__(self, row_groups: int, out_channels: int, *, shift_levels: int,
                 prior: float, temperature: float = 1.0, noise: float = 1.0,
                 l1: float = 0.0) -> None:
        super().__init__()
        if shift_levels < 0:
            raise ConfigError(f"shift_levels must be >= 0, got {shift_levels}")
        if not temperature > 0 or noise < 0 or l1 < 0:
            raise ConfigError("temperature must be > 0, noise and l1 >= 0")
        self.shift_levels = shift_levels
        self.temperature = temperature
        self.noise = noise
        self.l1 = l1
        self.register_buffer("levels", shift_values(shift_levels), persistent=False)
        self.prior = prior
        start = torch.zeros(row_groups, out_channels, shift_levels + 2)
        start[..., -1] = prior
        self.logits = torch.nn.Parameter(start)

    def set_schedule(self, temperature: float, noise: float) -> None:
        """Temperature and noise scale of the next training steps (the annealing)."""
        if not temperature > 0 or noise < 0:
            raise ConfigError("temperature must be > 0 and noise >= 0")
        self.temperature, self.noise = temperature, noise

    def probabilities(self) -> Tensor:
        """Noise-free level probabilities ``softmax(logits / T)``, ``[..., N + 2]``."""
        return torch.softmax(self.logits / self.temperature, dim=-1)

    def forward(self, generator: torch.Generator | None = None, stochastic: bool = True) -> Tensor:
        """Column multipliers in ``shift_values(N)``; differentiable in the logits when
        ``stochastic`` (training), else the served mask."""
        if not stochastic:
            return self.levels[self.logits.detach().argmax(dim=-1)]
        scores: Tensor = self.logits
        if self.noise > 0:
            u = torch.rand(scores.shape, generator=generator).clamp_(_EPS, 1 - _EPS)
            scores = scores + self.noise * -torch.log(-torch.log(u))
        soft = torch.softmax(scores / self.temperature, dim=-1)
        hard = F.one_hot(scores.detach().argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
        choice = hard + (soft - soft.detach())  # exactly one-hot forward, softmax backward
        return (choice * self.levels).sum(dim=-1)

    def penalty(self) -> Tensor | None:
        """``l1`` times the mean expected mask value (None when ``l1`` is 0)."""
        if self.l1 == 0:
            return None
        return self.l1 * (self.probabilities() * self.levels).sum(dim=-1).mean()

    def codes(self, chip_shift_levels: int) -> Tensor:
        """Codes of the served mask in the chip's shift table."""
        if self.shift_levels > chip_shift_levels:
            raise ConfigError(f"a {self.shift_levels}-level mask does not fit a chip with "
                              f"{chip_shift_levels} levels")
        with torch.no_grad():
            return shift_value_codes(self.forward(stochastic=False), chip_shift_levels)

    @torch.no_grad()
    def start_from(self, codes: Tensor, chip_shift_levels: int) -> None:
        """Logits whose served mask is ``codes`` (a warm start from a task state): the
        column's level takes the prior's lead, as level 1 does at a fresh start."""
        values = mask_values_of(codes, chip_shift_levels, self.shift_levels,
                                tuple(self.logits.shape[:-1]))
        level = (values.unsqueeze(-1) == self.levels).to(self.logits.dtype)
        self.logits.copy_(level * self.prior)

    def extra_repr(self) -> str:
        return (f"shift_levels={self.shift_levels}, temperature={self.temperature:g}, "
                f"noise={self.noise:g}, l1={self.l1:g}")
