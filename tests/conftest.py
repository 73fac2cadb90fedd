"""Shared fixtures: one small calibrated MobileNetV2 per test session."""

from __future__ import annotations

import pytest
import torch

from core.backbones import build_backbone
from core.calibration import calibration_images
from core.config import CrossbarConfig
from core.model import CrossbarModel


@pytest.fixture(scope="session")
def fp32_mobilenet() -> torch.nn.Module:
    return build_backbone("mobilenet_v2")


@pytest.fixture(scope="session")
def quantized_mobilenet(fp32_mobilenet: torch.nn.Module) -> CrossbarModel:
    """Naively post-training-quantized MobileNetV2 (fast; quality is not under test here)."""
    torch.manual_seed(0)
    model = CrossbarModel(fp32_mobilenet, "mobilenet_v2", CrossbarConfig())
    model.calibrate(calibration_images(16, 32, seed=0))
    return model


@pytest.fixture(scope="session")
def images32() -> torch.Tensor:
    return calibration_images(4, 32, seed=1)
