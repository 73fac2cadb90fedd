"""Adapting a task for a noisy chip: training sees the cells that chip holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.chip.config import NOISE_LEVELS
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning import adapt, default_config
from core.learning.common import TrainConfig
from core.nn.chip_instance import programmed_backbone
from tests.core.learning.conftest import state_bytes


def test_a_task_adapted_for_a_noisy_chip_is_trained_on_that_chip(
        quantized_mobilenet, digits32, tiny_train) -> None:
    before = state_bytes(quantized_mobilenet)
    train = dataclasses.replace(tiny_train, chip_noise="high")
    config = dataclasses.replace(default_config("head_bn"), train=train)
    result = adapt("head_bn", quantized_mobilenet, digits32, "noisy", config)
    assert state_bytes(quantized_mobilenet) == before  # the shared backbone is untouched
    assert result.task is not None and result.trained_model is not None
    assert result.config["train"]["chip_noise"] == "high"
    x, _ = digits32.test.batch(slice(0, 16))
    with torch.no_grad():
        trained = result.trained_model(x.clone())
    chip = CrossbarEngine(programmed_backbone(quantized_mobilenet, NOISE_LEVELS["high"]))
    chip.add_task(result.task)
    assert torch.equal(chip.forward(x, "noisy"), trained)  # what it learned on, exactly
    clean = CrossbarEngine(quantized_mobilenet)
    clean.add_task(result.task)
    assert not torch.equal(clean.forward(x, "noisy"), trained)


def test_an_unknown_noise_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="chip_noise: noise level must be one of none, low, high"):
        TrainConfig(chip_noise="medium")
