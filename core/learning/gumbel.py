"""Gumbel-sigmoid binary masks and power-of-two rounding of the tier-2 column mask.

The column mask of a frozen PE's logical column is learned as a real logit
``m``. Its binary part is a Gumbel-sigmoid sample hardened at 0.5 (forward
pass) with the soft sample's gradient (straight-through); where the binary
part is 0 the column keeps ``sigmoid(m)`` rounded to the nearest of
``{0, 2**-N, ..., 1/4, 1/2}`` (paper 3.3.1), so the value is always one the
shift-adder can apply. N = 0 leaves ``{0}``: a binary mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from core.errors import ConfigError
from core.task_state import shift_values

__all__ = [
    "gumbel_sigmoid",
    "mask_values_of",
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
    hard: bool = True, noise: float = 1.0, sigmoid: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> Tensor:
    """``sigmoid((m + s * (g0 - g1)) / T)``; with ``hard`` the forward value is 0/1
    (threshold 0.5) and the gradient is the soft sample's (straight-through). At noise
    scale ``s = 0`` the forward value is the noise-free ``m > 0``. ``sigmoid``: see
    :func:`shift_mask_values`."""
    if not temperature > 0:
        raise ConfigError(f"Gumbel-sigmoid temperature must be > 0, got {temperature}")
    if noise < 0:
        raise ConfigError(f"Gumbel-sigmoid noise scale must be >= 0, got {noise}")
    scores = logits
    if noise > 0:
        scores = logits + noise * _logistic_noise(logits.shape, generator).to(logits.dtype)
    soft = sigmoid(scores / temperature)
    if not hard:
        return soft
    binary = (scores > 0).to(soft.dtype)  # soft > 0.5, without sigmoid's rounding at 0
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
    generator: torch.Generator | None = None, stochastic: bool = True, noise: float = 1.0,
    sigmoid: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> Tensor:
    """Column multipliers in ``shift_values(N)``: 1 where the binary part is 1, else the
    power-of-two-rounded normalised real mask; differentiable in ``logits``.

    ``sigmoid``: the function that computes it. torch's computes a tensor's last few
    elements with the scalar ``exp`` and the rest vectorised (they may differ by an ulp),
    so several layers' masks concatenated take each layer's sigmoid on its own part to
    give each layer's bits.

    ``stochastic=False`` is the deterministic mask that is exported and served:
    binary part ``sigmoid(m) > 0.5`` (the noise-free Gumbel-sigmoid). Training at noise
    scale 0 has exactly these forward values (with straight-through gradients).
    """
    normalised = sigmoid(logits)
    if stochastic:
        binary = gumbel_sigmoid(logits, temperature, generator, noise=noise, sigmoid=sigmoid)
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


def mask_values_of(codes: Tensor, chip_shift_levels: int, shift_levels: int,
                   shape: tuple[int, ...]) -> Tensor:
    """The values of a task state's column ``codes``, checked to be levels of an
    ``shift_levels``-level mask of ``shape``."""
    if tuple(codes.shape) != shape:
        raise ConfigError(f"column codes of shape {list(codes.shape)} for a mask of "
                          f"{list(shape)}")
    table = shift_values(chip_shift_levels)
    if codes.numel() and int(codes.max()) >= len(table):
        raise ConfigError(f"column codes above the chip's {chip_shift_levels}-level table")
    values = table[codes.long()]
    if not bool(torch.isin(values, shift_values(shift_levels)).all()):
        raise ConfigError(f"the column mask uses levels outside the {shift_levels}-level "
                          f"mask being learned")
    return values


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
        init_logit: starting logit; positive starts every column at 1 (the backbone).
        noise: scale of the logistic noise (1: the plain Gumbel-sigmoid; 0: none).
        l1: weight of the penalty on the mean ``sigmoid(m)`` (pressure toward cheaper
            levels; a column at 0 needs no ADC conversion).
    """

    def __init__(self, row_groups: int, out_channels: int, *, shift_levels: int,
                 temperature: float, init_logit: float, noise: float = 1.0,
                 l1: float = 0.0) -> None:
        super().__init__()
        if shift_levels < 0:
            raise ConfigError(f"shift_levels must be >= 0, got {shift_levels}")
        if noise < 0 or l1 < 0:
            raise ConfigError("noise and l1 must be >= 0")
        self.shift_levels = shift_levels
        self.temperature = temperature
        self.noise = noise
        self.l1 = l1
        self.init_logit = init_logit
        self.logits = torch.nn.Parameter(torch.full((row_groups, out_channels), init_logit))

    def set_schedule(self, temperature: float, noise: float) -> None:
        """Temperature and noise scale of the next training steps (the annealing)."""
        if not temperature > 0 or noise < 0:
            raise ConfigError("temperature must be > 0 and noise >= 0")
        self.temperature, self.noise = temperature, noise

    def forward(self, generator: torch.Generator | None = None, stochastic: bool = True) -> Tensor:
        return shift_mask_values(self.logits, self.shift_levels, temperature=self.temperature,
                                 generator=generator, stochastic=stochastic, noise=self.noise)

    def penalty(self) -> Tensor | None:
        """``l1`` times the mean ``sigmoid(m)`` (None when ``l1`` is 0)."""
        if self.l1 == 0:
            return None
        return self.l1 * torch.sigmoid(self.logits).mean()

    def codes(self, chip_shift_levels: int) -> Tensor:
        return shift_mask_codes(self.logits, self.shift_levels, chip_shift_levels)

    @torch.no_grad()
    def start_from(self, codes: Tensor, chip_shift_levels: int) -> None:
        """Logits whose served mask is ``codes`` (a warm start from a task state): columns
        at 1 take the starting logit (1 if that is not positive), a level ``v < 1`` the
        logit of ``sigmoid(m) = v`` (which rounds back to ``v``), 0 the logit of 1/32
        (nearer 0 than any level)."""
        values = mask_values_of(codes, chip_shift_levels, self.shift_levels,
                                tuple(self.logits.shape))
        inner = values.clamp(1 / 32, 0.5)
        at_one = self.init_logit if self.init_logit > 0 else 1.0
        logits = torch.where(values == 1, torch.tensor(at_one),
                             torch.log(inner) - torch.log1p(-inner))
        self.logits.copy_(logits)

    def extra_repr(self) -> str:
        return (f"shift_levels={self.shift_levels}, temperature={self.temperature:g}, "
                f"noise={self.noise:g}, l1={self.l1:g}")
