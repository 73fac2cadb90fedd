"""Backbone layers as they sit on the accelerator.

A :class:`CrossbarConv2d` owns the frozen weight codes and scales (what the
cells and the digital periphery hold), its input quantizer (the DAC), and an
``effective_weight`` buffer that the engine points at the active task's
folded weights. ``forward`` is a plain convolution on that buffer, so a task
costs what the quantized backbone costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.mapping import LayerMapping, Placement
from core.quant import (
    ActivationQuantizer,
    fake_quant_weight,
    mse_weight_scale,
    quantize_weight_codes,
)


class CrossbarConv2d(nn.Module):
    """A convolution whose weights are programmed into crossbar PEs (or the digital periphery).

    Args:
        conv: the fp32 convolution to quantize (or a same-shaped placeholder when loading).
        weight_bits: precision of the weight codes.
        input_quant: the quantizer of this layer's inputs.
        quantize: compute codes and MSE scales from ``conv.weight`` (False when the codes
            are about to be loaded from a file).
    """

    def __init__(
        self, conv: nn.Conv2d, weight_bits: int, input_quant: ActivationQuantizer,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.weight_bits = weight_bits
        self.input_quant = input_quant
        self.mapping: LayerMapping | None = None
        weight = conv.weight.detach().float()
        if quantize:
            scale = mse_weight_scale(weight, weight_bits)
        else:
            scale = torch.ones(conv.out_channels)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_codes", quantize_weight_codes(weight, scale, weight_bits))
        self.register_buffer(
            "bias", None if conv.bias is None else conv.bias.detach().float().clone()
        )
        self.register_buffer("effective_weight", self.backbone_weight(), persistent=False)
        self.latent_weight: nn.Parameter | None = None

    @property
    def on_crossbar(self) -> bool:
        return self.mapping is not None and self.mapping.placement is Placement.CROSSBAR

    def backbone_weight(self) -> Tensor:
        """Dequantized frozen weight: what every task sees on its frozen PEs."""
        return self.weight_codes.float() * self.weight_scale.reshape(-1, 1, 1, 1)

    def reset_effective_weight(self) -> None:
        self.effective_weight = self.backbone_weight()

    def start_weight_training(self) -> list[nn.Parameter]:
        """Expose a latent fp32 weight and a learnable scale for quantization-aware training."""
        self.latent_weight = nn.Parameter(self.backbone_weight())
        self.weight_scale = nn.Parameter(self.weight_scale.clone())  # type: ignore[assignment]
        return [self.latent_weight, self.weight_scale]  # type: ignore[list-item]

    def finish_weight_training(self) -> None:
        """Freeze the trained latent weight back into codes and scales."""
        if self.latent_weight is None:
            return
        scale = self.weight_scale.detach().abs().clamp_min(1e-12).clone()
        codes = quantize_weight_codes(self.latent_weight.detach(), scale, self.weight_bits)
        del self.weight_scale
        self.register_buffer("weight_scale", scale)
        self.weight_codes = codes
        self.latent_weight = None
        self.reset_effective_weight()

    def forward(self, x: Tensor) -> Tensor:
        if self.latent_weight is not None:
            weight = fake_quant_weight(self.latent_weight, self.weight_scale, self.weight_bits)
        else:
            weight = self.effective_weight
        return F.conv2d(
            self.input_quant(x), weight, self.bias, self.stride, self.padding,
            self.dilation, self.groups,
        )

    def extra_repr(self) -> str:
        where = self.mapping.placement.value if self.mapping else "unmapped"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, weight_bits={self.weight_bits}, {where}"
        )


def crossbar_layers(model: nn.Module) -> list[tuple[str, CrossbarConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarConv2d)]

