"""The digital periphery folded into one BatchNorm pass (core.nn.periphery.DigitalNorm)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.nn.model import CrossbarModel
from core.nn.periphery import DigitalNorm


def _unfolded(model: CrossbarModel) -> CrossbarModel:
    """A copy that runs the periphery as separate steps: scale, BatchNorm, ReLU6, DAC."""
    plain = copy.deepcopy(model)
    for _, layer in plain.layers():
        layer.scale_in_norm = layer.codes_from_norm = False
    return plain


def test_every_norm_is_linked_to_the_layers_the_module_tree_proves_it_can_fold(
        quantized_mobilenet):
    model = quantized_mobilenet
    layers = dict(model.layers())
    assert all(layer.scale_in_norm for layer in layers.values())
    takes_codes = {name for name, layer in layers.items() if layer.codes_from_norm}
    assert "features.0.0" not in takes_codes  # the image
    assert {"features.1.conv.0.0", "features.1.conv.1", "features.2.conv.0.0",
            "features.2.conv.1.0", "features.2.conv.2"} <= takes_codes
    # A residual block's input is also read by its skip connection: never handed codes.
    residual = [name for name, m in model.body.named_modules()
                if getattr(m, "use_residual", False)]
    assert residual and all(f"{name}.conv.0.0" not in takes_codes for name in residual)
    assert not any(isinstance(m, nn.ReLU6) for m in model.body.modules())
    norms = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, DigitalNorm) for m in norms)
    assert sum(m.clamp_top == 6.0 for m in norms) == 35  # every ReLU6 of MobileNetV2


@torch.no_grad()
def test_folded_periphery_matches_the_step_by_step_periphery(quantized_mobilenet, images32):
    folded = quantized_mobilenet(images32)
    plain = _unfolded(quantized_mobilenet)(images32)
    # Only float rounding differs, which can move an activation across a DAC code
    # boundary now and then: the features agree closely, not bit for bit.
    assert torch.allclose(folded, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))


def test_training_runs_the_plain_periphery(quantized_mobilenet, images32):
    model, plain = copy.deepcopy(quantized_mobilenet), _unfolded(quantized_mobilenet)
    with torch.enable_grad():
        assert torch.equal(model(images32), plain(images32))


@torch.no_grad()
def test_the_norm_hands_the_next_layer_its_dac_codes(quantized_mobilenet, images32):
    model = quantized_mobilenet
    dw = model.body.get_submodule("features.1.conv.0.0")
    seen: list[torch.Tensor] = []
    handle = dw.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        model(images32)
    finally:
        handle.remove()
    codes = seen[0]
    low, high = dw.input_quant.qrange
    assert torch.equal(codes, codes.round()) and codes.min() >= low and codes.max() <= high
    assert codes.max() <= round(6.0 / float(dw.input_quant.step))  # the ReLU6 is in there


@pytest.mark.parametrize("kind", ["training", "observer"])
def test_calibration_and_training_modes_do_not_fold(quantized_mobilenet, images32, kind):
    model = copy.deepcopy(quantized_mobilenet)
    layer = model.body.get_submodule("features.1.conv.0.0")
    if kind == "training":
        model.train()
    else:
        layer.input_quant.enable_observer()
    with torch.no_grad():
        assert not layer.takes_codes()
        model(images32)
