"""Fake quantization of crossbar weights and inputs.

Weights: symmetric, per output channel, ``w ~= scale[o] * code`` with integer
codes in ``[-2**(b-1), 2**(b-1) - 1]``. The scale is digital (applied after the
adder tree) so every row group of a channel shares it.

Activations: uniform with a learnable step size (LSQ, Esser et al. 2020). LSQ
learns the clipping range jointly with the weights, which is what distillation
needs; PACT only learns the upper bound of unsigned inputs, and our backbone
also feeds signed inputs (MobileNetV2's linear bottlenecks) to crossbars. The
initial step comes from an MSE search over observed inputs
(:class:`ActivationObserver`), kept separate from the quantizer as in torch.ao.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.errors import ConfigError


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: Tensor, factor: float) -> Tensor:
    """Forward ``x``, backward gradient multiplied by ``factor`` (LSQ step-size scaling)."""
    return x * factor + (x - x * factor).detach()


def quantize_weight_codes(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer codes of ``weight`` for per-output-channel ``scale`` (no gradient)."""
    qmin, qmax = signed_range(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.clamp(torch.round(weight / scale.reshape(shape)), qmin, qmax).to(torch.int8)


def fake_quant_weight(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """``scale * clamp(round(w / scale))`` with straight-through rounding (LSQ gradients)."""
    qmin, qmax = signed_range(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    g = 1.0 / math.sqrt(weight[0].numel() * qmax)
    s = _grad_scale(scale, g).reshape(shape)
    return round_ste(torch.clamp(weight / s, qmin, qmax)) * s


def mse_weight_scale(weight: Tensor, bits: int, grid: int = 40) -> Tensor:
    """Per-output-channel scale minimising the weight quantization MSE.

    Searches clipping ratios in ``[0.5, 1]`` of each channel's max-abs value.
    """
    qmin, qmax = signed_range(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    max_abs = flat.abs().amax(dim=1).clamp_min(1e-12)
    best_err = torch.full_like(max_abs, float("inf"))
    best_scale = max_abs / qmax
    for ratio in torch.linspace(0.5, 1.0, grid):
        scale = max_abs * ratio / qmax
        q = torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax) * scale[:, None]
        err = (q - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


class ActivationObserver:
    """Collects a bounded sample of a layer's inputs for choosing the clipping range."""

    def __init__(self, max_samples: int = 200_000, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[Tensor] = []
        self.count = 0
        self.min_val = math.inf

    def observe(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self.min_val = min(self.min_val, float(flat.min()))
        per_batch = max(1, self.max_samples // 16)
        if flat.numel() > per_batch:
            idx = torch.randint(flat.numel(), (per_batch,), generator=self.generator)
            flat = flat[idx]
        self.samples.append(flat)
        self.count += 1

    @property
    def signed(self) -> bool:
        return self.min_val < 0

    def mse_step(self, bits: int, grid: int = 100) -> float:
        """Step size minimising the quantization MSE of the observed inputs."""
        if not self.samples:
            raise ConfigError("no inputs observed: run calibration images through the model")
        data = torch.cat(self.samples)
        if data.numel() > self.max_samples:
            data = data[torch.randperm(data.numel(), generator=self.generator)[: self.max_samples]]
        qmin, qmax = signed_range(bits) if self.signed else (0, 2**bits - 1)
        top = float(data.abs().max().clamp_min(1e-8))
        best_step, best_err = top / qmax, math.inf
        for ratio in torch.linspace(0.05, 1.0, grid).tolist():
            step = top * ratio / qmax
            q = torch.clamp(torch.round(data / step), qmin, qmax) * step
            err = float((q - data).pow(2).mean())
            if err < best_err:
                best_step, best_err = step, err
        return best_step


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a crossbar input to ``bits`` with a learnable step (LSQ).

    ``x_q = step * clamp(round(x / step), qmin, qmax)`` with ``[qmin, qmax]`` =
    ``[0, 2**b - 1]`` for unsigned inputs and ``[-2**(b-1), 2**(b-1) - 1]`` for signed.

    Args:
        bits: input precision (DAC resolution).
        signed: whether inputs can be negative.
    """

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ConfigError(f"activation bits must be in 1..16, got {bits}")
        self.bits = bits
        self.signed = signed
        self.step = nn.Parameter(torch.tensor(1.0))
        self.observer: ActivationObserver | None = None
        self.fake_quant_enabled = True
        self.inplace = False
        """Quantize the input tensor itself at inference: only where nothing else reads it."""

    @property
    def qrange(self) -> tuple[int, int]:
        return signed_range(self.bits) if self.signed else (0, 2**self.bits - 1)

    def enable_observer(self, max_samples: int = 200_000) -> None:
        self.observer = ActivationObserver(max_samples)

    def apply_observer(self) -> None:
        """Sets signedness and step from the observed inputs and drops the observer."""
        if self.observer is None:
            raise ConfigError("enable_observer() was not called")
        self.signed = self.observer.signed
        with torch.no_grad():
            self.step.fill_(self.observer.mse_step(self.bits))
        self.observer = None

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.fake_quant_enabled:
            return x
        qmin, qmax = self.qrange
        if not torch.is_grad_enabled():
            # In place (at most one allocation): 5x faster on CPU than torch's fused
            # fake_quantize_per_tensor_affine (docs/performance.md).
            y = x.div_(self.step) if self.inplace else x / self.step
            return y.round_().clamp_(qmin, qmax).mul_(self.step)
        step = _grad_scale(self.step, 1.0 / math.sqrt(x[0].numel() * max(qmax, 1)))
        return round_ste(torch.clamp(x / step, qmin, qmax)) * step

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer input codes (as floats) that the DAC applies; ``forward`` is ``step * codes``."""
        qmin, qmax = self.qrange
        y = x.div_(self.step) if self.inplace else x / self.step
        return y.round_().clamp_(qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"
