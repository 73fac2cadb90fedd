"""The column ADC: its codes, the range rule and the step each layer converts with.

Everything the chip's ADC decides lives here; the operator (:mod:`core.ops.crossbar`)
applies the step it is given, the backbone (:meth:`core.nn.model.CrossbarModel.calibrate_adc`)
collects the partial sums this module's rule is fitted on, and the cell programmer
(:mod:`core.engine.programmer`) asks :func:`adc_step` for each layer's step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from core.chip.config import AdcRange, CrossbarConfig, DacMode
from core.chip.mapping import LayerMapping

DAC_MODES = tuple(DacMode)
"""Row order of every layer's ``adc_range`` buffer (one calibrated range per DAC mode)."""

def adc_code_range(adc_bits: int, signed: bool) -> tuple[int, int]:
    """Lowest and highest ADC code: two's complement when column sums are signed."""
    if signed:
        return -(2 ** (adc_bits - 1)), 2 ** (adc_bits - 1) - 1
    return 0, 2**adc_bits - 1


def largest_read_sum(layer: LayerMapping, dac_bits: int) -> int:
    """The largest magnitude one read's column sum can reach (a full read group, every
    input at the DAC's top code, every cell at the top level)."""
    rows = min(layer.rows_per_conversion, layer.weight_rows)
    return rows * ((1 << dac_bits) - 1) * ((1 << layer.bits_per_cell) - 1)


def chip_is_lossless(layers: Iterable[LayerMapping], chip: CrossbarConfig) -> bool:
    """Whether every read of every crossbar layer fits the ADC at unit step: then crossbar
    fidelity equals ideal fidelity bit for bit, whatever the data (and no task needs the
    chip in its training loop)."""
    qmax = adc_code_range(chip.adc_bits, chip.adc_signed)[1]
    return all(largest_read_sum(m, chip.dac_bits) <= qmax for m in layers)


def full_scale_adc_step(layer: LayerMapping, *, dac_bits: int, adc_bits: int) -> Tensor:
    """Step of a full-scale ADC: the top ``adc_bits`` bits (the top ``adc_bits - 1`` and a
    sign for signed sums) of the largest sum a full read group can produce."""
    largest = (min(layer.crossbar_rows, layer.rows_per_conversion)
               * (2**dac_bits - 1) * (2**layer.bits_per_cell - 1))
    bits = math.ceil(math.log2(largest + 1))
    magnitude_bits = adc_bits - 1 if layer.arrays_per_pe == 2 else adc_bits
    return torch.full((layer.slices,), float(2 ** max(0, bits - magnitude_bits)))


def best_adc_top(values: Tensor, weights: Tensor, qmax: int, grid: int = 80,
                  signed: bool = False) -> float:
    """Top of the ADC range minimising the weighted squared error of integer ``values``
    (MSE over a grid of 80 tops between one level per code and the largest sum seen).

    The step never goes below one partial-sum level: finer codes would only resolve
    values that cannot occur, and would clip sums the calibration images missed. A
    signed range has ``qmax + 1`` codes below zero (two's complement)."""
    qmin = -(qmax + 1) if signed else 0
    top = float(values.abs().max()) if signed else float(values.max())
    if top <= qmax:
        return float(qmax)  # one code per partial-sum level covers everything: lossless
    best, best_err = top, math.inf
    for ratio in torch.linspace(qmax / top, 1.0, grid).tolist():
        step = top * ratio / qmax
        q = torch.round(values / step).clamp_(qmin, qmax) * step
        err = float((weights * (q - values).square()).sum())
        if err < best_err:
            best, best_err = top * ratio, err
    return best


def adc_step(layer: LayerMapping, chip: CrossbarConfig, adc_range: Tensor | None,
             rule: AdcRange) -> Tensor:
    """``[slices]`` partial-sum units per ADC code of one layer: full scale, or the
    calibrated top of its range (``adc_range``: ``[DAC modes, slices]``) over the top code."""
    if rule is AdcRange.FULL_SCALE:
        return full_scale_adc_step(layer, dac_bits=chip.dac_bits, adc_bits=chip.adc_bits)
    assert adc_range is not None
    qmax = adc_code_range(chip.adc_bits, chip.adc_signed)[1]
    return adc_range[DAC_MODES.index(chip.dac_mode)] / qmax
