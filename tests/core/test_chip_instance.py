"""Noise-aware adaptation's view of the chip: the backbone as one chip instance holds it."""

from __future__ import annotations

from dataclasses import replace

import torch

from core.chip.config import CrossbarSettings, NonIdealities, WeightEncoding
from core.engine import CrossbarEngine
from core.nn.chip_instance import programmed_backbone
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


def _served_and_trained(model, images, noise: NonIdealities):
    head = random_head(5, 1280)
    task = TaskState("t", model.config.shift_levels, head)
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(non_idealities=noise))
    engine.add_task(task)
    chip = programmed_backbone(model, noise).eval()
    with torch.no_grad():
        trained_on = chip(images)
    return engine.features(images, "t", "crossbar"), trained_on, engine.features(
        images, "t", "ideal")


def test_stuck_cells_are_served_as_training_sees_them(quantized_mobilenet, images32) -> None:
    # Stuck cells keep levels on the grid, and 9 rows of bit-serial inputs fit the 5-bit
    # ADC at unit step: the chip computes exactly the convolution with the cells' weights.
    noise = NonIdealities(stuck_on_rate=0.002, stuck_off_rate=0.002, seed=5)
    served, trained_on, ideal = _served_and_trained(quantized_mobilenet, images32, noise)
    torch.testing.assert_close(served, trained_on, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(served, ideal, rtol=1e-2, atol=1e-2)  # the chip is not ideal


def test_programming_variation_is_modelled_up_to_the_adc_rounding(quantized_mobilenet,
                                                                  images32) -> None:
    # Off-grid levels give off-grid sums, which the ADC rounds per read: the training
    # view is nearer the chip than the noise-free backbone is, not equal to it.
    noise = NonIdealities(programming_sigma=0.2, stuck_on_rate=0.002, stuck_off_rate=0.002,
                          seed=5)
    served, trained_on, ideal = _served_and_trained(quantized_mobilenet, images32, noise)
    assert (served - trained_on).norm() < 0.8 * (served - ideal).norm()


def test_a_noise_free_chip_is_the_backbone(quantized_mobilenet, images32) -> None:
    chip = programmed_backbone(quantized_mobilenet, NonIdealities(read_sigma=0.3)).eval()
    with torch.no_grad():
        assert torch.equal(chip(images32), quantized_mobilenet.eval()(images32))
    assert chip.fingerprint() == quantized_mobilenet.fingerprint()
