"""Tiling of every backbone layer onto crossbar PEs.

A convolution weight ``[Cout, Cin, kh, kw]`` unrolls to ``Cin*kh*kw`` rows (in
torch's flatten order, channel-major) and ``Cout * slices`` columns. Rows are
tiled into row groups of whole input channels (8 channels of a 3x3 kernel = 72
rows), columns into groups of ``cols // slices`` output channels. Each
(row group, column group) tile is one PE, named by a stable :class:`PEId`.

The unit of the tier-2 mask is a *logical column*: one output channel inside one
row group, i.e. the ``slices`` bit lines that hold that channel's weights in one
PE. The shift-adder applies the mask after combining the slices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from torch import nn

from core.chip.config import CrossbarConfig, WeightEncoding
from core.errors import ConfigError


class Placement(StrEnum):
    CROSSBAR = "crossbar"
    DIGITAL = "digital"


@dataclass(frozen=True, order=True)
class PEId:
    """Stable identity of one crossbar tile: the layer, its row group and column group."""

    layer: str
    row_group: int
    col_group: int

    def __str__(self) -> str:
        return f"{self.layer}/r{self.row_group}/c{self.col_group}"


@dataclass(frozen=True)
class LayerMapping:
    """Where one layer's weights sit on the accelerator."""

    name: str
    index: int
    placement: Placement
    out_channels: int
    in_channels: int
    """Input channels seen by one output (``Cin // groups``)."""
    kernel_size: tuple[int, int]
    groups: int
    weight_bits: int
    input_bits: int
    input_signed: bool
    """Signed inputs are applied in two phases (positive part, then negative part)."""
    crossbar_rows: int
    crossbar_cols: int
    bits_per_cell: int
    weight_encoding: WeightEncoding = WeightEncoding.OFFSET
    rows_per_read: int | None = None
    """The chip's word lines per conversion (None: the whole row group)."""

    @property
    def slices(self) -> int:
        return math.ceil(self.weight_bits / self.bits_per_cell)

    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_rows(self) -> int:
        """Rows of the unrolled weight matrix (inputs summed into one output)."""
        return self.in_channels * self.kernel_area

    @property
    def channels_per_row_group(self) -> int:
        return self.crossbar_rows // self.kernel_area

    @property
    def rows_per_group(self) -> int:
        return self.channels_per_row_group * self.kernel_area

    @property
    def arrays_per_pe(self) -> int:
        """Crossbar arrays of one PE: a differential PE is a positive and a negative array."""
        return 2 if self.weight_encoding is WeightEncoding.DIFFERENTIAL else 1

    @property
    def channels_per_read(self) -> int:
        """Input channels driven together for one conversion: the largest divisor of the
        row group's channels whose rows fit ``rows_per_read`` (at least one channel)."""
        per_group = self.channels_per_row_group
        if self.rows_per_read is None:
            return per_group
        fit = max(1, self.rows_per_read // self.kernel_area)
        return max(d for d in range(1, min(fit, per_group) + 1) if per_group % d == 0)

    @property
    def reads_per_group(self) -> int:
        """Conversions per bit line and input cycle: the row group's reads."""
        return self.channels_per_row_group // self.channels_per_read

    @property
    def rows_per_conversion(self) -> int:
        return self.channels_per_read * self.kernel_area

    @property
    def outputs_per_pe(self) -> int:
        return self.crossbar_cols // self.slices

    @property
    def row_groups(self) -> int:
        if self.placement is not Placement.CROSSBAR:
            return 0
        return math.ceil(self.in_channels / self.channels_per_row_group)

    @property
    def col_groups(self) -> int:
        if self.placement is not Placement.CROSSBAR:
            return 0
        return math.ceil(self.out_channels / self.outputs_per_pe)

    @property
    def num_pes(self) -> int:
        return self.row_groups * self.col_groups

    def rows_in_group(self, row_group: int) -> int:
        first = row_group * self.rows_per_group
        return min(self.rows_per_group, self.weight_rows - first)

    def outputs_in_col_group(self, col_group: int) -> int:
        first = col_group * self.outputs_per_pe
        return min(self.outputs_per_pe, self.out_channels - first)

    def pe_ids(self) -> Iterator[PEId]:
        for r in range(self.row_groups):
            for c in range(self.col_groups):
                yield PEId(self.name, r, c)

    def pe_of(self, weight_row: int, out_channel: int) -> PEId:
        """The PE that holds the weight at (unrolled row, output channel)."""
        if self.placement is not Placement.CROSSBAR:
            raise ConfigError(f"layer {self.name} runs in the digital periphery, not on PEs")
        if not (0 <= weight_row < self.weight_rows and 0 <= out_channel < self.out_channels):
            raise ConfigError(f"weight ({weight_row}, {out_channel}) is outside layer {self.name}")
        row_group = weight_row // self.rows_per_group
        return PEId(self.name, row_group, out_channel // self.outputs_per_pe)

    def column_of(self, out_channel: int, cell_slice: int) -> int:
        """Bit-line index inside its PE of an output channel's cell slice (0 = high bits)."""
        return (out_channel % self.outputs_per_pe) * self.slices + cell_slice

    @property
    def cells_used(self) -> int:
        if not self.num_pes:
            return 0
        return self.weight_rows * self.out_channels * self.slices * self.arrays_per_pe

    @property
    def cells_total(self) -> int:
        return self.num_pes * self.crossbar_rows * self.crossbar_cols * self.arrays_per_pe

    @property
    def utilisation(self) -> float:
        return self.cells_used / self.cells_total if self.cells_total else 0.0

    def block_diagonal_pes(self) -> int:
        """PEs a depthwise layer would need as block-diagonal crossbars (for the report)."""
        if self.groups == 1:
            return self.num_pes
        per_pe = min(self.channels_per_row_group, self.outputs_per_pe)
        return math.ceil(self.out_channels / per_pe)


@dataclass(frozen=True)
class ModelMapping:
    """Every mapped layer of a backbone, in forward order."""

    config: CrossbarConfig
    layers: tuple[LayerMapping, ...]
    _by_name: dict[str, LayerMapping] = field(init=False, repr=False, compare=False)
    _pe_offsets: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError("layer names in a mapping must be unique")
        object.__setattr__(self, "_by_name", {m.name: m for m in self.layers})
        offsets: dict[str, int] = {}
        total = 0
        for m in self.layers:
            offsets[m.name] = total
            total += m.num_pes
        object.__setattr__(self, "_pe_offsets", offsets)

    def layer(self, name: str) -> LayerMapping:
        try:
            return self._by_name[name]
        except KeyError as e:
            raise ConfigError(f"no mapped layer named {name!r}") from e

    @property
    def crossbar_layers(self) -> tuple[LayerMapping, ...]:
        return tuple(m for m in self.layers if m.placement is Placement.CROSSBAR)

    @property
    def num_pes(self) -> int:
        return sum(m.num_pes for m in self.layers)

    def pe_ids(self) -> Iterator[PEId]:
        for m in self.layers:
            yield from m.pe_ids()

    def pe_index(self, pe: PEId) -> int:
        """Position of a PE in the model-wide order (layer order, then row, then column)."""
        m = self.layer(pe.layer)
        if not (0 <= pe.row_group < m.row_groups and 0 <= pe.col_group < m.col_groups):
            raise ConfigError(f"{pe} is not a PE of layer {m.name}")
        return self._pe_offsets[m.name] + pe.row_group * m.col_groups + pe.col_group

    @property
    def cells_used(self) -> int:
        return sum(m.cells_used for m in self.layers)

    @property
    def cells_total(self) -> int:
        return sum(m.cells_total for m in self.layers)

    def report(self) -> list[dict[str, object]]:
        """One row per layer: the numbers an operator needs to size a chip."""
        return [
            {
                "layer": m.name,
                "placement": m.placement.value,
                "shape": f"{m.out_channels}x{m.in_channels}x{m.kernel_size[0]}x{m.kernel_size[1]}",
                "weight_bits": m.weight_bits,
                "row_groups": m.row_groups,
                "col_groups": m.col_groups,
                "pes": m.num_pes,
                "cells_used": m.cells_used,
                "utilisation": round(m.utilisation, 4),
            }
            for m in self.layers
        ]


def map_layer(
    name: str, index: int, conv: nn.Conv2d, config: CrossbarConfig, *,
    weight_bits: int, input_bits: int, input_signed: bool,
) -> LayerMapping:
    """Map one convolution; depthwise convolutions go to the digital periphery."""
    kh, kw = conv.kernel_size
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        raise ConfigError(f"layer {name}: only depthwise grouped convolutions are supported")
    if not depthwise and kh * kw > config.rows:
        raise ConfigError(
            f"layer {name}: a {kh}x{kw} kernel needs {kh * kw} rows, more than a "
            f"{config.rows}-row crossbar; increase CrossbarConfig.rows"
        )
    if config.cols // math.ceil(weight_bits / config.bits_per_cell) < 1:
        raise ConfigError(f"layer {name}: {weight_bits}-bit weights do not fit {config.cols} cols")
    return LayerMapping(
        name=name,
        index=index,
        placement=Placement.DIGITAL if depthwise else Placement.CROSSBAR,
        out_channels=conv.out_channels,
        in_channels=conv.in_channels // conv.groups,
        kernel_size=(kh, kw),
        groups=conv.groups,
        weight_bits=weight_bits,
        input_bits=input_bits,
        input_signed=input_signed,
        crossbar_rows=config.rows,
        crossbar_cols=config.cols,
        bits_per_cell=config.bits_per_cell,
        weight_encoding=config.weight_encoding,
        rows_per_read=config.rows_per_read,
    )
