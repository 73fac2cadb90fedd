from __future__ import annotations

import torch

from core.chip.config import CrossbarConfig
from core.learning.distill import DistillConfig, distill_backbone
from core.nn.calibration import calibration_images
from core.nn.model import CrossbarModel


def test_distillation_lowers_the_loss_and_keeps_4_bit_codes(fp32_mobilenet):
    torch.manual_seed(0)
    images = calibration_images(16, 32, seed=0)
    student = CrossbarModel(fp32_mobilenet, "mobilenet_v2", CrossbarConfig())
    student.calibrate(images)
    losses = distill_backbone(student, fp32_mobilenet, fp32_mobilenet.classifier, images,
                              DistillConfig(steps=12, batch_size=8, lr=1e-3))
    assert sum(losses[-3:]) / 3 < losses[0]
    for _, layer in student.layers():
        assert layer.latent_weight is None
        assert "weight_scale" in dict(layer.named_buffers())
        lo, hi = -(2 ** (layer.weight_bits - 1)), 2 ** (layer.weight_bits - 1) - 1
        assert lo <= int(layer.weight_codes.min()) and int(layer.weight_codes.max()) <= hi
        torch.testing.assert_close(layer.effective_weight, layer.backbone_weight())
