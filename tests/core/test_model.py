from __future__ import annotations

import torch

from core.errors import ResourceUnavailable
from core.nn.model import CrossbarModel
from core.nn.quant import ActivationQuantizer, fake_quant_weight, quantize_weight_codes


def test_save_load_round_trip_is_bit_identical(quantized_mobilenet, images32, tmp_path):
    path = tmp_path / "backbone.safetensors"
    quantized_mobilenet.save(path)
    loaded = CrossbarModel.load(path)
    for _, layer in quantized_mobilenet.layers():
        layer.reset_effective_weight()
    with torch.no_grad():
        assert torch.equal(loaded(images32), quantized_mobilenet(images32))
    assert loaded.fingerprint() == quantized_mobilenet.fingerprint()
    assert [(m.input_signed, m.input_bits) for m in loaded.mapping.layers] == [
        (m.input_signed, m.input_bits) for m in quantized_mobilenet.mapping.layers
    ]


def test_load_missing_file_names_the_fix(tmp_path):
    try:
        CrossbarModel.load(tmp_path / "none.safetensors")
    except ResourceUnavailable as e:
        assert "xma2 quantize" in str(e)
    else:
        raise AssertionError("expected ResourceUnavailable")


def test_weights_are_4_bit_codes_and_signed_inputs_detected(quantized_mobilenet):
    layers = dict(quantized_mobilenet.layers())
    expand = layers["features.2.conv.0.0"]  # fed by a linear bottleneck: signed inputs
    project = layers["features.2.conv.2"]  # fed by ReLU6: unsigned
    assert expand.input_quant.signed and not project.input_quant.signed
    assert (expand.input_quant.bits, project.input_quant.bits) == (8, 4)
    assert (expand.mapping.input_bits, project.mapping.input_bits) == (8, 4)
    for layer in (expand, project):
        assert int(layer.weight_codes.min()) >= -8 and int(layer.weight_codes.max()) <= 7
    assert layers["features.0.0"].weight_bits == 8


def test_fake_quant_matches_codes_and_passes_gradients():
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    scale = weight.detach().abs().amax((1, 2, 3)) / 6.5  # every weight strictly inside the range
    q = fake_quant_weight(weight, scale, 4)
    codes = quantize_weight_codes(weight.detach(), scale, 4)
    torch.testing.assert_close(q, codes.float() * scale.reshape(-1, 1, 1, 1))
    q.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones_like(weight))  # straight-through


def test_activation_quantizer_levels_and_learnable_step():
    quant = ActivationQuantizer(4, signed=True)
    with torch.no_grad():
        quant.step.fill_(0.5)
    x = torch.linspace(-6, 6, 101)
    with torch.no_grad():
        y = quant(x)
    assert set((y / 0.5).round().int().tolist()) <= set(range(-8, 8))
    assert float(y.min()) == -4.0 and float(y.max()) == 3.5
    x.requires_grad_(True)
    quant(x).sum().backward()
    assert quant.step.grad is not None and float(quant.step.grad) != 0.0


def test_in_place_input_quantization_changes_no_result_and_no_caller_tensor(
    quantized_mobilenet, images32,
):
    layers = quantized_mobilenet.layers()
    flags = {n: layer.input_quant.inplace for n, layer in layers}
    assert not flags["features.0.0"]  # the caller's images
    assert not flags["features.3.conv.0.0"]  # the block input also feeds the residual add
    assert flags["features.2.conv.0.0"]  # a residual-free block hands its input on alone
    assert flags["features.2.conv.1.0"] and flags["features.2.conv.2"]
    for _, layer in layers:
        layer.reset_effective_weight()
    original = images32.clone()
    try:
        with torch.no_grad():
            fast = quantized_mobilenet(images32)
            for _, layer in layers:
                layer.input_quant.inplace = False
            reference = quantized_mobilenet(images32)
    finally:
        for name, layer in layers:
            layer.input_quant.inplace = flags[name]
    assert torch.equal(fast, reference)
    assert torch.equal(images32, original)
