"""Crossbar-exact convolution: what the PEs, ADCs and shift-adders of one layer compute.

For each input cycle (the DAC applies a ``dac_bits`` chunk of every input code,
positive part first and then the negative part of signed inputs), every PE
column sums ``input * cell level`` over its row group. Each column's ADC turns
that sum into a code::

    adc(p) = step * clamp(round(p / step + offset_lsb), 0, 2**adc_bits - 1)

with a per-slice ``step`` (the range divided by the top code). The shift-adder
weights the cell slices of a logical column by their significance
(``4**(slices-1-s)`` for 2-bit cells) and multiplies by the column's shift-mask
value (a column masked to 0 is never converted); the periphery subtracts the
offset encoding's ``offset * sum(inputs of the row group)``; the adder tree sums
the row groups; cycles are weighted by their significance and sign. The result
is ``sum(input_code * weight_code * mask)`` exactly when the ADC is lossless,
which is what ideal fidelity computes in floating point.

A row group is whole input channels, so all PEs of a layer form one grouped
convolution (``groups = row_groups``) over the cells' levels. With integer
levels every partial sum is an integer below ``2**k``; ``pack`` slices share one
fp32 output column as ``sum(level_t * 2**(k*t))`` (exact below ``2**24``),
which halves the convolution work for 2-slice weights. The compiled operator
(``crossbar_kernel.cpp``) and :func:`_adc_shift_add_reference` implement the
same semantics; :func:`crossbar_conv2d` cuts the batch so that the partial
sums in memory stay under a bound. Where every partial sum is an exact integer
(:attr:`CrossbarProgram.exact_sums`: integer cell levels, no read noise), the
compiled operator skips the convolution: per output position, cycle and read
group it multiplies the read's non-zero inputs into its levels and converts the
sums at once, equal bit for bit to the convolution path on small maps, where
that one's fixed costs dominate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.chip.adc import adc_code_range, largest_read_sum
from core.chip.config import OperatorImplementation
from core.chip.mapping import LayerMapping
from core.chip.programming import weight_codes_to_cell_levels
from core.errors import ConfigError
from core.ops.extension import crossbar_extension
from core.ops.fold import from_row_groups, replaced_columns, spare_rows, to_row_groups

__all__ = [
    "ConvGeometry",
    "CrossbarProgram",
    "build_program",
    "crossbar_conv2d",
    "input_cycles",
    "layer_cell_levels",
    "task_cell_levels",
]

_EXACT_FLOAT_BITS = 24


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def output_size(self, height: int, width: int, kernel: tuple[int, int]) -> tuple[int, int]:
        sizes = []
        for size, k, s, p, d in zip((height, width), kernel, self.stride, self.padding,
                                    self.dilation, strict=True):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]


@dataclass(frozen=True, eq=False)
class CrossbarProgram:
    """One crossbar layer as programmed for one task, laid out for the operator."""

    weight: Tensor
    """``[row_groups * columns, channels_per_group, kh, kw]``: per read group, the packed
    cell levels of every output channel followed by a column of ones (the input sum)."""
    column_values: Tensor
    """``[row_groups, out_channels]`` shift-mask value of every logical column (1 on
    replaced PEs), per read group (a PE row group's value repeated ``reads`` times)."""
    slice_weight: Tensor
    """``[slices]`` significance of each cell slice (slice 0 = most significant)."""
    adc_step: Tensor
    """``[slices]`` ADC step per cell slice, in partial-sum units."""
    adc_inv_step: Tensor
    """``1 / adc_step`` in float32: both implementations scale by it, so they round alike."""
    adc_qmax: float
    adc_offset_lsb: float
    weight_offset: float
    row_groups: int
    """Read groups: the operator's unit of one conversion per bit line and cycle."""
    channels_per_group: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    slices: int
    pack: int
    pack_base: float
    input_bits: int
    input_signed: bool
    dac_bits: int
    read_sigma: float = 0.0
    adc_qmin: float = 0.0
    """Lowest ADC code: 0 for unsigned column sums, ``-2**(adc_bits-1)`` for signed."""
    digit_bias: float = 0.0
    """Level added to every (signed) cell level so that packed digits are non-negative;
    ``digit_bias * input_sum`` is removed from each digit before its ADC."""
    reads: int = 1
    """Read groups per PE row group (``row_groups`` counts read groups)."""
    integer_levels: bool = False
    """Every cell level is an integer (none moved off the grid by programming variation)."""
    lossless: bool = False
    """Every sum a read can produce is converted exactly (unit step, no clipping, no
    noise, an ADC offset below half an LSB): the layer's result is
    ``sum(input_code * weight_code * mask)``, which ideal fidelity computes bit for bit,
    so the forward pass may take that path."""

    @property
    def packed_columns(self) -> int:
        return math.ceil(self.slices / self.pack)

    @property
    def columns(self) -> int:
        return self.out_channels * self.packed_columns + 1

    @property
    def cycles(self) -> int:
        return math.ceil(self.input_bits / self.dac_bits) * (2 if self.input_signed else 1)

    def adc(self, analog: Tensor) -> Tensor:
        """The ADC's output for analog partial sums ``[..., slices, positions]``."""
        step = self.adc_step.reshape(-1, 1)
        inverse = self.adc_inv_step.reshape(-1, 1)
        levels = torch.round(analog * inverse + self.adc_offset_lsb).clamp_(self.adc_qmin,
                                                                           self.adc_qmax)
        return levels * step

    @property
    def exact_sums(self) -> bool:
        """Whether every partial sum is an integer held exactly in float32, in any order of
        its terms: then the operator may compute them as matrix products."""
        return (self.integer_levels and not self.read_sigma
                and self.pack_base**self.pack <= 2**_EXACT_FLOAT_BITS)

    @functools.cached_property
    def read_major_weight(self) -> Tensor:
        """:attr:`weight` as ``[row_groups, channels_per_group * kh * kw, columns]``: per
        read group, each input row's levels of every column, contiguous (the compiled
        operator's row-vector products read it so)."""
        return self._read_major().contiguous()

    def _read_major(self) -> Tensor:
        rows = self.channels_per_group * self.kernel_size[0] * self.kernel_size[1]
        return self.weight.reshape(self.row_groups, self.columns, rows).transpose(1, 2)

    @functools.cached_property
    def matmul_layout(self) -> tuple[Tensor, int, float, int]:
        """The matrix-product path's weight, ``pack``, ``pack_base`` and segment limit.

        Where the worst-case read does not let two cell slices share a float column
        (differential pairs reading 72 rows at once: digits up to ``6 * 72 * 15``), this
        path still packs them, at base ``2**12``: a read whose DAC inputs sum to at most
        the limit fits, and the operator sums a larger one in segments that each fit.
        The two slices' digits are then exact whatever the read, as in :attr:`weight`'s
        own layout, so the results are the same bits; the work per read halves."""
        if not (self.exact_sums and self.pack == 1 and self.slices == 2):
            return self.read_major_weight, self.pack, self.pack_base, 0
        read_major = self._read_major()  # not kept: this layout replaces it here
        digits = read_major[..., :-1]
        base = 2 ** (_EXACT_FLOAT_BITS // 2)
        limit = (base - 1) // max(1, int(digits.max()))
        if limit < 2**self.dac_bits - 1:
            return self.read_major_weight, self.pack, self.pack_base, 0
        low, high = digits.reshape(*digits.shape[:2], self.out_channels, 2).unbind(-1)
        packed = torch.cat([low + base * high, read_major[..., -1:]], dim=-1)
        return packed.contiguous(), 2, float(base), limit

    @functools.cached_property
    def zero_reads_zero(self) -> bool:
        """Whether a cycle whose inputs are all zero adds nothing (then it can be skipped)."""
        return self.read_sigma == 0 and bool(
            (self.adc(torch.zeros(self.slices, 1)) == 0).all()
        )


def layer_cell_levels(codes: Tensor, layer: LayerMapping) -> Tensor:
    """Cell levels ``[columns, Cout, row_groups, rows_per_group]`` of weight codes
    ``[Cout, Cin, kh, kw]`` in the layer's encoding (``columns`` = slices, or the positive
    then the negative array's slices); rows past the layer are empty (0)."""
    grouped = to_row_groups(codes.to(torch.int64), layer)
    levels = weight_codes_to_cell_levels(grouped, weight_bits=layer.weight_bits,
                                         bits_per_cell=layer.bits_per_cell,
                                         encoding=layer.weight_encoding)
    levels = levels.permute(3, 0, 1, 2).float()
    rows = torch.arange(layer.row_groups * layer.rows_per_group).reshape(
        layer.row_groups, layer.rows_per_group)
    return levels * (rows < layer.weight_rows)


def slice_weights(layer: LayerMapping) -> Tensor:
    """What one level of each cell slice is worth in weight codes (slice 0 the most
    significant): ``2 ** (bits_per_cell * (slices - 1 - s))``."""
    return 2.0 ** (layer.bits_per_cell * torch.arange(layer.slices - 1, -1, -1).float())


def programmed_codes(levels: Tensor, layer: LayerMapping) -> Tensor:
    """The weights ``[Cout, Cin, kh, kw]``, in code units, that cell levels ``[columns,
    Cout, row_groups, rows_per_group]`` hold: the inverse of :func:`layer_cell_levels`,
    also for levels off the integer grid (programmed with variation, stuck cells). The
    periphery subtracts the nominal offset, so a drifted offset cell shifts its weight."""
    slices = layer.slices
    signed = levels[:slices] - levels[slices:] if layer.arrays_per_pe == 2 else levels
    codes = (signed.double() * slice_weights(layer).double().reshape(-1, 1, 1, 1)).sum(0)
    if layer.arrays_per_pe == 1:
        codes = codes - 2 ** (layer.weight_bits - 1)
    return from_row_groups(codes.float(), layer)


def task_cell_levels(
    backbone_levels: Tensor, spare_levels: Tensor | None, pe_mask: Tensor | None,
    layer: LayerMapping,
) -> Tensor:
    """The layer's cells as a task reads them: spare PEs' cells where ``pe_mask`` replaces."""
    if pe_mask is None or spare_levels is None or not bool(pe_mask.any()):
        return backbone_levels
    replaced = replaced_columns(pe_mask, layer).t()  # [Cout, R]
    return torch.where(replaced[None, :, :, None], spare_levels, backbone_levels)


def spare_cell_levels(spare_codes: Tensor, pe_mask: Tensor, layer: LayerMapping) -> Tensor:
    """Levels ``[columns, Cout, R, rows_per_group]`` of the spare PEs (other cells zero)."""
    codes = spare_rows(spare_codes.to(torch.int64), pe_mask, layer)  # [Cout, R, rows]
    levels = weight_codes_to_cell_levels(codes, weight_bits=layer.weight_bits,
                                         bits_per_cell=layer.bits_per_cell,
                                         encoding=layer.weight_encoding)
    replaced = replaced_columns(pe_mask, layer).t()
    rows = torch.arange(layer.row_groups * layer.rows_per_group).reshape(
        layer.row_groups, layer.rows_per_group)
    keep = replaced[:, :, None] & (rows < layer.weight_rows)
    return levels.permute(3, 0, 1, 2).float() * keep


def _pack_factor(rows: int, layer: LayerMapping, dac_bits: int, digit_top: int,
                 integer_levels: bool) -> tuple[int, float]:
    if not integer_levels:
        return 1, 1.0
    largest = min(rows, layer.weight_rows) * (2**dac_bits - 1) * digit_top
    bits = max(1, math.ceil(math.log2(largest + 1)))
    pack = max(1, min(layer.slices, _EXACT_FLOAT_BITS // bits))
    return pack, float(2**bits)


def read_levels(levels: Tensor, layer: LayerMapping) -> Tensor:
    """Cell levels ``[columns, Cout, R, rows_per_group]`` -> the signed levels each read
    sums, ``[slices, Cout, R * reads, rows_per_conversion]`` (a differential pair reads
    as the positive level minus the negative one)."""
    if layer.arrays_per_pe == 2:
        levels = levels[: layer.slices] - levels[layer.slices :]
    slices, cout, groups, _ = levels.shape
    return levels.reshape(slices, cout, groups * layer.reads_per_group,
                          layer.rows_per_conversion)


def build_program(
    levels: Tensor, column_values: Tensor, layer: LayerMapping, *, dac_bits: int,
    adc_step: Tensor, adc_bits: int, adc_offset_lsb: float = 0.0, read_sigma: float = 0.0,
    cells_as_encoded: bool = True,
) -> CrossbarProgram:
    """Lay out programmed cell levels ``[columns, Cout, R, rows_per_group]`` (columns =
    slices times arrays per PE) for the operator, one operator row group per read.

    ``cells_as_encoded``: the cells hold the encoding of the layer's weight codes. False
    when device variation or stuck cells moved them: even an exact ADC then does not give
    the ideal result, so the program is never marked lossless."""
    columns, cout, groups, rows = levels.shape
    if (columns, cout, groups, rows) != (layer.slices * layer.arrays_per_pe, layer.out_channels,
                                         layer.row_groups, layer.rows_per_group):
        raise ConfigError(f"layer {layer.name}: cell levels of shape {list(levels.shape)} do "
                          "not match its mapping")
    signed = layer.arrays_per_pe == 2
    top = 2**layer.bits_per_cell - 1
    reads = layer.reads_per_group
    read_rows = layer.rows_per_conversion
    levels = read_levels(levels, layer)
    slices = layer.slices
    integer = bool(torch.equal(levels, levels.round()))
    bias = float(top) if signed and integer else 0.0
    pack, base = _pack_factor(read_rows, layer, dac_bits, top + int(bias), integer)
    packed = math.ceil(slices / pack)
    padded = F.pad(levels + bias, (0, 0, 0, 0, 0, 0, 0, packed * pack - slices))
    digits = padded.reshape(packed, pack, cout, groups * reads, read_rows)
    scale = base ** torch.arange(pack, dtype=torch.float64)
    combined = (digits.double() * scale.reshape(1, -1, 1, 1, 1)).sum(1).float()
    packed_columns = combined.permute(2, 1, 0, 3).reshape(groups * reads, cout * packed,
                                                          read_rows)
    ones = torch.ones(groups * reads, 1, read_rows)
    weight = torch.cat([packed_columns, ones], dim=1).reshape(
        groups * reads * (cout * packed + 1), layer.channels_per_read, *layer.kernel_size)
    slice_weight = slice_weights(layer)
    adc_step = adc_step.float().reshape(slices).contiguous()
    if not bool((adc_step > 0).all()):
        raise ConfigError(f"layer {layer.name}: ADC steps must be > 0, got {adc_step.tolist()}")
    qmin, qmax = adc_code_range(adc_bits, signed)
    # An offset below half an LSB moves no integer sum read at unit step off its code.
    lossless = (cells_as_encoded and read_sigma == 0 and abs(adc_offset_lsb) < 0.5 and integer
                and bool((adc_step == 1).all())
                and largest_read_sum(layer, dac_bits) <= min(qmax, -qmin if signed else qmax))
    return CrossbarProgram(
        weight=weight.contiguous(),
        column_values=column_values.float().repeat_interleave(reads, dim=0).contiguous(),
        slice_weight=slice_weight,
        adc_step=adc_step,
        adc_inv_step=(1.0 / adc_step).contiguous(),
        adc_qmax=float(qmax),
        adc_offset_lsb=float(adc_offset_lsb),
        weight_offset=0.0 if signed else float(2 ** (layer.weight_bits - 1)),
        row_groups=groups * reads,
        channels_per_group=layer.channels_per_read,
        in_channels=layer.in_channels,
        out_channels=cout,
        kernel_size=layer.kernel_size,
        slices=slices,
        pack=pack,
        pack_base=base,
        input_bits=layer.input_bits,
        input_signed=layer.input_signed,
        dac_bits=dac_bits,
        read_sigma=read_sigma,
        adc_qmin=float(qmin),
        digit_bias=bias,
        reads=reads,
        integer_levels=integer,
        lossless=lossless,
    )


def input_cycles(codes: Tensor, input_bits: int, signed: bool, dac_bits: int
                 ) -> tuple[list[Tensor], list[float]]:
    """Split integer input codes into the chunks the DAC applies, with each cycle's weight.

    Unsigned codes take ``ceil(bits / dac_bits)`` cycles, least significant chunk first;
    signed codes apply the positive part, then the magnitude of the negative part.
    """
    chunks_per_phase = math.ceil(input_bits / dac_bits)
    base = float(2**dac_bits)
    phases = [(codes.clamp(min=0), 1.0), ((-codes).clamp_(min=0), -1.0)] if signed else [
        (codes, 1.0)]
    chunks: list[Tensor] = []
    weights: list[float] = []
    for magnitude, sign in phases:
        rest = magnitude
        for k in range(chunks_per_phase):
            if k == chunks_per_phase - 1:
                chunk = rest
            else:
                chunk = torch.remainder(rest, base)
                rest = (rest - chunk).div_(base)
            chunks.append(chunk)
            weights.append(sign * base**k)
    return chunks, weights


def _adc_shift_add_reference(
    psum: Tensor, program: CrossbarProgram, cycle_weight: Tensor,
    read_noise: Tensor | None, out: Tensor,
) -> None:
    """Pure-torch semantics of the compiled operator's loop (accumulates into ``out``)."""
    rows, _, height, width = psum.shape
    images = rows // cycle_weight.numel()
    groups, cout, packed = program.row_groups, program.out_channels, program.packed_columns
    grouped = psum.reshape(rows, groups, program.columns, height * width)
    input_sum = grouped[:, :, -1]
    packed_sums = grouped[:, :, :-1].reshape(rows, groups, cout, packed, height * width)
    digits: dict[int, Tensor] = {}  # slice index -> its digit (every index gets one)
    for j in range(packed):
        rest = packed_sums[:, :, :, j]
        for t in range(program.pack - 1, -1, -1):
            scale = program.pack_base**t
            digit = torch.floor(rest / scale) if t > 0 else rest
            rest = rest - digit * scale
            digits[j * program.pack + t] = digit
    analog = torch.stack([digits[i] for i in range(program.slices)], dim=3)
    if program.digit_bias:
        analog = analog - program.digit_bias * input_sum[:, :, None, None]
    if read_noise is not None:
        analog = analog + read_noise
    value = (program.adc(analog) * program.slice_weight.reshape(-1, 1)).sum(3)
    value = value - program.weight_offset * input_sum[:, :, None]
    value = (value * program.column_values[None, :, :, None]).sum(1)
    value = value.reshape(-1, images, cout, height * width)
    out += (value * cycle_weight.reshape(-1, 1, 1, 1)).sum(0).reshape(out.shape)


def _reference_chunk(
    stacked: Tensor, program: CrossbarProgram, geometry: ConvGeometry, cycle_weight: Tensor,
    read_noise: Tensor | None, out: Tensor,
) -> None:
    psum = F.conv2d(stacked, program.weight, None, geometry.stride, geometry.padding,
                    geometry.dilation, program.row_groups)
    _adc_shift_add_reference(psum, program, cycle_weight, read_noise, out)


def _read_noise(stacked: Tensor, program: CrossbarProgram, geometry: ConvGeometry,
                generator: torch.Generator | None) -> Tensor:
    """Per column and read, ``N(0, sigma**2 * sum(inputs**2))`` over the row group."""
    ones = torch.ones(program.row_groups, program.channels_per_group, *program.kernel_size)
    energy = F.conv2d(stacked * stacked, ones, None, geometry.stride, geometry.padding,
                      geometry.dilation, program.row_groups)
    rows, groups, height, width = energy.shape
    std = program.read_sigma * energy.reshape(rows, groups, 1, 1, height * width).sqrt()
    noise = torch.randn(rows, groups, program.out_channels, program.slices, height * width,
                        generator=generator)
    return noise * std


def crossbar_conv2d(
    codes: Tensor, program: CrossbarProgram, geometry: ConvGeometry, *,
    implementation: OperatorImplementation = OperatorImplementation.AUTO,
    generator: torch.Generator | None = None, max_chunk_elements: int = 1 << 23,
) -> Tensor:
    """``sum(input_code * weight_code * mask)`` per output, as the crossbars compute it.

    Args:
        codes: integer input codes ``[B, Cin, H, W]`` (float dtype).
        program: the layer's programmed cells, masks and ADC.
        geometry: stride, padding and dilation of the convolution.
        implementation: compiled C++ operator, pure-torch reference, or auto.
        generator: source of read noise (when the program has any).
        max_chunk_elements: bound on the partial sums computed at once.

    Returns:
        ``[B, Cout, Ho, Wo]``: channels-last where the compiled matrix-product path ran
        (it reads and writes each position's channels contiguously), else contiguous.
    """
    batch, channels, height, width = codes.shape
    if channels != program.in_channels:
        raise ConfigError(f"crossbar layer expects {program.in_channels} input channels, "
                          f"got {channels}")
    out_h, out_w = geometry.output_size(height, width, program.kernel_size)
    kernel = _select(implementation)
    matmul = kernel is _compiled_chunk and _matmul_applies(program)
    out = _zeros_out(codes, batch, program.out_channels, out_h, out_w, matmul)
    if not matmul:
        codes = codes.contiguous()
    per_cycle_image = program.row_groups * out_h * out_w * (
        program.columns + (program.out_channels * program.slices if program.read_sigma else 0))
    chunk = max(1, max_chunk_elements // max(1, per_cycle_image * program.cycles))
    skip_zero_cycles = program.zero_reads_zero
    for start in range(0, batch, chunk):
        part = codes[start : start + chunk]
        if matmul:
            _compiled_matmul(part, program, geometry, program.column_values,
                             skip_zero_cycles, out[start : start + len(part)])
            continue
        stacked, cycle_weight = _stack_cycles(part, program, kernel is _compiled_chunk,
                                              skip_zero_cycles)
        if cycle_weight.numel() == 0:
            continue
        noise = _read_noise(stacked, program, geometry, generator) if program.read_sigma else None
        kernel(stacked, program, geometry, cycle_weight, noise, out[start : start + len(part)])
    return out


def _zeros_out(codes: Tensor, batch: int, channels: int, height: int, width: int,
               channels_last: bool) -> Tensor:
    shape = (batch, channels, height, width)
    if channels_last:
        return torch.empty(shape, dtype=codes.dtype,
                           memory_format=torch.channels_last).zero_()
    return codes.new_zeros(shape)


def _stack_cycles(part: Tensor, program: CrossbarProgram, compiled: bool, skip_zero: bool
                  ) -> tuple[Tensor, Tensor]:
    """The operator's input: every cycle's chunk of ``part`` stacked along the batch,
    channels zero-padded to whole row groups, and each cycle's weight. All-zero
    cycles are dropped when a zero input reads as zero."""
    n, channels, height, width = part.shape
    padded = program.row_groups * program.channels_per_group
    if compiled:
        extension = crossbar_extension()
        assert extension is not None
        stacked, nonzero = extension.stack_input_cycles(
            part, program.input_bits, program.input_signed, program.dac_bits, padded)
        _, weights = input_cycles(part[:0], program.input_bits, program.input_signed,
                                  program.dac_bits)
        keep = nonzero.tolist() if skip_zero else [True] * len(weights)
        if not all(keep):
            rows = stacked.reshape(len(weights), n, padded, height, width)[torch.tensor(keep)]
            stacked = rows.reshape(-1, padded, height, width)
        return stacked, torch.tensor([w for w, k in zip(weights, keep, strict=True) if k])
    chunks, weights = input_cycles(part, program.input_bits, program.input_signed,
                                   program.dac_bits)
    kept = [i for i, c in enumerate(chunks) if not skip_zero or bool(c.any())]
    stacked = part.new_zeros(len(kept) * n, padded, height, width)
    for slot, i in enumerate(kept):
        stacked[slot * n : (slot + 1) * n, :channels] = chunks[i]
    return stacked, torch.tensor([weights[i] for i in kept])


def _compiled_chunk(
    stacked: Tensor, program: CrossbarProgram, geometry: ConvGeometry, cycle_weight: Tensor,
    read_noise: Tensor | None, out: Tensor,
) -> None:
    extension = crossbar_extension()
    assert extension is not None
    extension.crossbar_conv2d(
        stacked, program.weight, list(geometry.stride), list(geometry.padding),
        list(geometry.dilation), program.row_groups, program.out_channels, program.slices,
        program.pack, program.pack_base, program.slice_weight, program.adc_step,
        program.adc_inv_step, program.adc_qmin, program.adc_qmax, program.adc_offset_lsb,
        program.weight_offset, program.digit_bias, program.column_values, cycle_weight,
        read_noise, out,
    )


def _matmul_applies(program: CrossbarProgram) -> bool:
    """Whether the compiled operator takes the matrix-product path (bit-equal to the
    grouped convolution whenever partial sums are exact)."""
    return program.exact_sums


def _compiled_matmul(part: Tensor, program: CrossbarProgram, geometry: ConvGeometry,
                     column_values: Tensor, skip_zero: bool, out: Tensor) -> None:
    _compiled_matmul_blocks(part, [(len(part), program, column_values)], geometry, skip_zero,
                            out)


def _compiled_matmul_blocks(codes: Tensor, blocks: list[tuple[int, CrossbarProgram, Tensor]],
                            geometry: ConvGeometry, skip_zero: bool, out: Tensor) -> None:
    """One compiled call; ``blocks``: per block of images, its stop, program and column
    values (the programs share every setting but their cells and columns' values)."""
    extension = crossbar_extension()
    assert extension is not None
    program = blocks[0][1]
    _, pack, pack_base, _ = program.matmul_layout
    extension.crossbar_matmul(
        codes, [p.matmul_layout[0] for _, p, _ in blocks], [stop for stop, _, _ in blocks],
        list(program.kernel_size), list(geometry.stride),
        list(geometry.padding), list(geometry.dilation), program.out_channels,
        program.slices, pack, pack_base, program.slice_weight,
        program.adc_step, program.adc_inv_step, program.adc_qmin, program.adc_qmax,
        program.adc_offset_lsb, program.weight_offset, program.digit_bias,
        [values for _, _, values in blocks],
        program.input_bits, program.input_signed, program.dac_bits, skip_zero,
        [p.matmul_layout[3] for _, p, _ in blocks], out,
    )


def crossbar_conv2d_blocks(
    codes: Tensor, blocks: list[tuple[int, int, CrossbarProgram]], geometry: ConvGeometry, *,
    implementation: OperatorImplementation = OperatorImplementation.AUTO,
    generator: torch.Generator | None = None, max_chunk_elements: int = 1 << 23,
) -> Tensor:
    """:func:`crossbar_conv2d` of each block of images ``(start, stop, program)`` with its
    own program (a batch mixing tasks, sorted by task; the blocks cover it in order).

    Where every program takes the compiled matrix-product path with one periphery and
    one layout, the blocks run in one call (its fixed costs paid once per layer, not per
    task); otherwise one call per block. Either way each image's result is the bits its
    program gives it alone."""
    program = blocks[0][2]
    programs = [p for _, _, p in blocks]
    if (len(blocks) > 1 and _select(implementation) is _compiled_chunk
            and codes.shape[1] == program.in_channels and _one_matmul_call(programs)):
        out_h, out_w = geometry.output_size(codes.shape[2], codes.shape[3],
                                            program.kernel_size)
        out = _zeros_out(codes, len(codes), program.out_channels, out_h, out_w, True)
        _compiled_matmul_blocks(codes, [(stop, p, p.column_values) for _, stop, p in blocks],
                                geometry, program.zero_reads_zero, out)
        return out
    parts = [crossbar_conv2d(codes[start:stop], block_program, geometry,
                             implementation=implementation, generator=generator,
                             max_chunk_elements=max_chunk_elements)
             for start, stop, block_program in blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _one_matmul_call(programs: list[CrossbarProgram]) -> bool:
    """Whether these programs can share one compiled matrix-product call: each takes that
    path, and they differ only in their cells, columns' values and segment limits."""
    first = programs[0]

    def key(p: CrossbarProgram) -> tuple[object, ...]:
        _, pack, pack_base, _ = p.matmul_layout
        return (pack, pack_base, tuple(p.matmul_layout[0].shape), p.slices, p.out_channels,
                p.in_channels, p.kernel_size, p.adc_qmin, p.adc_qmax, p.adc_offset_lsb,
                p.weight_offset, p.digit_bias, p.input_bits, p.input_signed, p.dac_bits,
                p.zero_reads_zero)

    return all(_matmul_applies(p) for p in programs) and all(
        key(p) == key(first)
        and (p.slice_weight is first.slice_weight or torch.equal(p.slice_weight,
                                                                  first.slice_weight))
        and (p.adc_step is first.adc_step or torch.equal(p.adc_step, first.adc_step))
        and (p.adc_inv_step is first.adc_inv_step
             or torch.equal(p.adc_inv_step, first.adc_inv_step))
        for p in programs[1:])


ChunkKernel = Callable[
    [Tensor, CrossbarProgram, ConvGeometry, Tensor, Tensor | None, Tensor], None]


def _select(implementation: OperatorImplementation) -> ChunkKernel:
    implementation = OperatorImplementation(implementation)
    if implementation is OperatorImplementation.REFERENCE:
        return _reference_chunk
    if crossbar_extension() is not None:
        return _compiled_chunk
    if implementation is OperatorImplementation.COMPILED:
        raise ConfigError("the compiled crossbar operator is unavailable (no C++ compiler or "
                          "ninja, or the build failed; see the log): install g++ and ninja, "
                          "or use implementation='reference'")
    return _reference_chunk


def conversions(program: CrossbarProgram, images: int, positions: int) -> int:
    """ADC conversions the chip performs: every unmasked column, slice and cycle of every
    read group that holds weights (the operator also reads the zero-padded groups past
    the layer's inputs, whose sums are 0 and whose conversions the chip does not make)."""
    holds = (torch.arange(program.row_groups) * program.channels_per_group
             < program.in_channels)
    active = int(((program.column_values != 0) & holds.reshape(-1, 1)).sum())
    return active * program.slices * program.cycles * images * positions
