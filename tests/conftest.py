"""Shared fixtures: one small calibrated MobileNetV2 per test session."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from core.backbones import build_backbone
from core.chip.config import LOSSLESS_CHIP, CrossbarConfig
from core.nn.calibration import calibration_images
from core.nn.model import CrossbarModel
from core.ops.extension import crossbar_extension

ALLOW_NO_COMPILER = "XMA2_TESTS_WITHOUT_COMPILER"
"""Set to 1 to skip (not fail) the compiled operator's own tests on a machine without
g++ and ninja; ``make setup`` installs both, so CI always runs them."""


def compiled_operator() -> ModuleType:
    """The compiled crossbar operator; a test of it fails without one (naming the fix)
    unless :data:`ALLOW_NO_COMPILER` is set, then it is skipped, naming what is missing."""
    extension = crossbar_extension()
    if extension is not None:
        return extension
    missing = "the compiled crossbar operator (g++ and ninja; `make setup` installs them)"
    if os.environ.get(ALLOW_NO_COMPILER) == "1":
        pytest.skip(f"{missing} is unavailable and {ALLOW_NO_COMPILER}=1")
    pytest.fail(f"{missing} did not build; set {ALLOW_NO_COMPILER}=1 to skip its tests")


@pytest.fixture(scope="session")
def fp32_mobilenet() -> torch.nn.Module:
    return build_backbone("mobilenet_v2")


@pytest.fixture(scope="session")
def quantized_mobilenet(fp32_mobilenet: torch.nn.Module) -> CrossbarModel:
    """Naively post-training-quantized MobileNetV2 (fast; quality is not under test here),
    on the lossless chip, where crossbar fidelity is ideal's bit for bit unless a test
    picks another periphery (the shipped backbone is on the default chip)."""
    torch.manual_seed(0)
    model = CrossbarModel(fp32_mobilenet, "mobilenet_v2", CrossbarConfig(**LOSSLESS_CHIP))
    model.calibrate(calibration_images(16, 32, seed=0))
    return model


@pytest.fixture(scope="session")
def images32() -> torch.Tensor:
    return calibration_images(4, 32, seed=1)
