"""Quality of the shipped 4-bit backbone on a real task (slow: run with -m slow)."""

from __future__ import annotations

import pytest
import torch

from core.backbones import build_backbone
from core.backbones.shipped import load_backbone
from core.data.datasets import DatasetSpec, load_dataset
from core.learning.probe import extract_features, linear_probe
from core.nn.calibration import calibration_images
from core.nn.model import CrossbarModel


@pytest.mark.slow
def test_distilled_backbone_probes_better_than_naive_ptq_on_animal_mnist():
    torch.set_grad_enabled(False)
    try:
        data = load_dataset(DatasetSpec("animal_mnist", image_size=64, seed=0,
                                        train_limit=4000, test_limit=1000))
        fp32 = build_backbone("mobilenet_v2")
        shipped = load_backbone(None)
        naive = CrossbarModel(fp32, "mobilenet_v2", shipped.config)
        naive.calibrate(calibration_images(256, 64, seed=0))
        accuracy = {}
        for name, features in (("fp32", fp32.forward_features), ("naive", naive),
                               ("shipped", shipped)):
            train = extract_features(features, data.train)
            test = extract_features(features, data.test)
            with torch.enable_grad():
                accuracy[name], _, _ = linear_probe(train, test, num_classes=10)
    finally:
        torch.set_grad_enabled(True)
    assert accuracy["shipped"] > accuracy["naive"] + 0.01, accuracy
    assert accuracy["shipped"] > accuracy["fp32"] - 0.06, accuracy
