"""The backbone as one chip instance holds it, for training tasks on that chip.

Programming variation and stuck cells are drawn once per chip from a seed and the
shape of each layer's tiles, never from the weights (:func:`core.chip.programming.program_cells`).
A trainer that knows the chip's :class:`~core.chip.config.NonIdealities` can therefore
compute the exact cell levels the engine serves on, and learn the task's BatchNorm
terms, head, masks and spare PEs around them: noise-aware adaptation of a task for
one chip, on one frozen backbone.
"""

from __future__ import annotations

import copy

from core.chip.config import NonIdealities
from core.chip.programming import part_seed, program_cells
from core.errors import ConfigError
from core.nn.model import CrossbarModel
from core.ops.crossbar import layer_cell_levels, programmed_codes


def programmed_backbone(model: CrossbarModel, noise: NonIdealities) -> CrossbarModel:
    """A copy of ``model`` whose crossbar layers hold the weights the chip's cells hold.

    The copy's ``weight_codes`` are float (levels off the integer grid): it is for
    training and ideal-fidelity evaluation only, never for an engine to program. Read
    noise and ADC offsets are not in the weights (they are drawn per read, or sit in the
    periphery) and leave the copy unchanged.
    """
    if model.mapping is None:
        raise ConfigError("the backbone has no crossbar mapping: calibrate or load it first")
    programmed = copy.deepcopy(model)
    if not noise.alters_cells:
        return programmed
    for name, layer in programmed.layers():
        if not layer.on_crossbar or layer.mapping is None:
            continue
        levels = layer_cell_levels(layer.weight_codes, layer.mapping)
        held = program_cells(levels, noise, bits_per_cell=layer.mapping.bits_per_cell,
                             seed=part_seed(noise.seed, f"backbone/{name}"))
        layer.weight_codes = programmed_codes(held, layer.mapping)
        layer.reset_effective_weight()
    return programmed
