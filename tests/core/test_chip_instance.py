"""Noise-aware adaptation's view of the chip: the backbone as one chip instance holds it."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from core.chip_instance import programmed_backbone
from core.config import AdcRange, CrossbarSettings, NonIdealities, WeightEncoding
from core.engine import CrossbarEngine
from core.ops.crossbar import layer_cell_levels, programmed_codes
from core.task_state import TaskState
from tests.core.helpers import random_head


def test_programmed_codes_invert_the_cell_levels(quantized_mobilenet) -> None:
    for _, layer in quantized_mobilenet.layers():
        if not layer.on_crossbar or layer.mapping is None:
            continue
        levels = layer_cell_levels(layer.weight_codes, layer.mapping)
        assert torch.equal(programmed_codes(levels, layer.mapping), layer.weight_codes.float())


def test_programmed_codes_of_a_differential_pair_by_hand(quantized_mobilenet) -> None:
    layer = next(m for m in quantized_mobilenet.mapping.crossbar_layers)
    pair = replace(layer, weight_encoding=WeightEncoding.DIFFERENTIAL)
    levels = torch.zeros(2 * pair.slices, pair.out_channels, pair.row_groups,
                         pair.rows_per_group)
    levels[0, 0, 0, 0] = 1.5  # positive array, most significant slice
    levels[pair.slices + 1, 0, 0, 0] = 2.0  # negative array, the next slice
    codes = programmed_codes(levels, pair)
    top = 2 ** (pair.bits_per_cell * (pair.slices - 1))
    assert codes.flatten()[0].item() == 1.5 * top - 2.0 * top / 2**pair.bits_per_cell
    assert int((codes != 0).sum()) == 1


def test_training_sees_the_chip_the_engine_serves(quantized_mobilenet, images32) -> None:
    noise = NonIdealities(programming_sigma=0.2, stuck_on_rate=0.002, stuck_off_rate=0.002,
                          seed=5)
    head = random_head(5, 1280)
    task = TaskState("t", quantized_mobilenet.config.shift_levels, head)
    # A 16-bit full-scale ADC rounds each read's sum on a fine grid: the chip's weights
    # alone decide its answer, up to that rounding.
    engine = CrossbarEngine(quantized_mobilenet, crossbar=CrossbarSettings(
        adc_bits=16, adc_range=AdcRange.FULL_SCALE, non_idealities=noise))
    engine.add_task(task)
    served = engine.forward(images32, "t", "crossbar")
    chip = programmed_backbone(quantized_mobilenet, noise).eval()
    with torch.no_grad():
        trained_on = F.linear(chip(images32), head.weight, head.bias)
    clean = CrossbarEngine(quantized_mobilenet)
    clean.add_task(task)
    ideal = clean.forward(images32, "t", "ideal")
    gap = (served - trained_on).abs().max().item()
    assert gap < 0.05 * (served - ideal).abs().max().item()  # the noise is there, and modelled
    assert (served - ideal).abs().max().item() > 0.1


def test_a_noise_free_chip_is_the_backbone(quantized_mobilenet, images32) -> None:
    chip = programmed_backbone(quantized_mobilenet, NonIdealities(read_sigma=0.3)).eval()
    with torch.no_grad():
        assert torch.equal(chip(images32), quantized_mobilenet.eval()(images32))
    assert chip.fingerprint() == quantized_mobilenet.fingerprint()
