"""Per-operation energy accounting of the emulated crossbar accelerator.

Energy is counted, not simulated: :func:`count_layer_ops` returns how many of
each hardware operation one forward pass performs (exactly, from the mapping,
the task's masks and the input dataflow), and :func:`energy_of` prices those
counts with the constants of an :class:`EnergyConfig`. Keeping the two apart
lets reports show *why* a task costs what it does (columns switched off, PEs
replaced) and lets an operator re-price the same counts for another technology.

Analog numbers come from NeuroSim (DNN_NeuroSim V1.3/V2.1, Peng et al. 2019)
and the paper's device (Wu et al., VLSI 2018, HfOx: 100 kOhm on-state, 10x
window). Gate-level numbers (adders, buffers, MACs) are order-of-magnitude
32 nm CMOS estimates in the spirit of NeuroSim's gate-level models, derived
from Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V: 8-bit
add 0.03 pJ, 32-bit add 0.1 pJ, 8-bit multiply 0.2 pJ, fp32 multiply 3.7 pJ and
add 0.9 pJ, 8 KB SRAM 64-bit read 10 pJ) scaled by about 0.6 to 32 nm
(capacitance ~ feature size, slightly lower supply).

Counts are data-independent upper bounds: every row of an active column is
driven at the full read voltage in every input cycle (zero input bits and
lower multi-bit DAC levels would draw less), and every cell is priced at the
on-state conductance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from core.chip.config import CrossbarConfig, WeightEncoding
from core.chip.mapping import LayerMapping, Placement
from core.errors import ConfigError

R_ON_OHM = 100e3
"""On-state resistance (Wu et al. VLSI 2018 HfOx; NeuroSim V2.1 ``resistanceOn``)."""
R_OFF_OHM = 1e6
"""Off-state resistance: a 10x on/off window (NeuroSim V2.1 ``resistanceOff``)."""
READ_VOLTAGE_V = 0.5
"""Read voltage on a source line (NeuroSim V2.1 ``readVoltage``)."""
READ_PULSE_S = 10e-9
"""Read pulse width (NeuroSim V2.1 ``readPulseWidth``)."""
DEFAULT_ROWS = 72
"""Rows of a full row group in the paper's 72x72 crossbar."""
_BUFFER_J_PER_BIT = 0.05e-12


def sar_adc_energy_j(bits: int, r_col_ohm: float) -> float:
    """Energy of one SAR conversion, NeuroSim's 32 nm LSTP model.

    ``E = P * (bits + 1) ns`` with ``P = (1.1294*bits + 8.8998) uW +
    0.079449 * exp(-2.297 * log10(R_col)) W``: the second term is the current the
    comparator chain burns against the column's resistance, so a column of many
    on-state cells in parallel (low ``R_col``) costs more per conversion.
    """
    if bits < 1:
        raise ConfigError(f"ADC bits must be >= 1, got {bits}")
    if not r_col_ohm > 0:
        raise ConfigError(f"column resistance must be > 0 ohm, got {r_col_ohm}")
    power_w = (1.1294 * bits + 8.8998) * 1e-6 + 0.079449 * math.exp(
        -2.297 * math.log10(r_col_ohm)
    )
    return power_w * sar_adc_latency_s(bits)


def sar_adc_latency_s(bits: int) -> float:
    """One SAR conversion resolves a bit per 1 ns cycle plus one sampling cycle (NeuroSim)."""
    if bits < 1:
        raise ConfigError(f"ADC bits must be >= 1, got {bits}")
    return (bits + 1) * 1e-9


def _cell_read_j(voltage_v: float, r_ohm: float, pulse_s: float) -> float:
    return voltage_v**2 / r_ohm * pulse_s


@dataclass(frozen=True)
class EnergyConfig:
    """Joules per hardware operation; every default names its source."""

    cell_read_j: float = _cell_read_j(READ_VOLTAGE_V, R_ON_OHM, READ_PULSE_S)
    """One cell read in one input cycle: ``V^2 * G * t`` = 0.5^2 V^2 / 100 kOhm * 10 ns
    = 0.025 pJ (NeuroSim V2.1 read voltage/pulse; on-state conductance, an upper bound)."""
    adc_conversion_j: float = sar_adc_energy_j(5, R_ON_OHM / DEFAULT_ROWS)
    """One 5-bit SAR conversion, :func:`sar_adc_energy_j` with ``R_col = R_on / rows``:
    all cells of a full 72-row group conducting in parallel (the worst case, ~1.39 kOhm)
    gives ~0.44 pJ; NeuroSim's 1 MOhm column would give ~0.09 pJ."""
    shift_add_j: float = 0.05e-12
    """One shift-and-accumulate of an ADC output (~12-bit add + register write):
    Horowitz 45 nm ~0.05 pJ for a 16-bit add, x0.6 to 32 nm, plus the register."""
    adder_tree_add_j: float = 0.03e-12
    """One 16-bit add summing row-group partial sums (Horowitz, scaled to 32 nm)."""
    offset_correction_add_j: float = 0.02e-12
    """One ~10-bit accumulate of the offset-encoding input sum or its per-column
    subtraction (an 8-bit add is 0.03 pJ at 45 nm; x0.6 to 32 nm)."""
    input_buffer_bit_j: float = _BUFFER_J_PER_BIT
    """One bit read from the input buffer: 8 KB SRAM at 45 nm is ~0.16 pJ/bit
    (Horowitz); a small 32 nm register-file buffer (NeuroSim's default PE/tile buffer)
    ~0.05 pJ/bit."""
    output_buffer_bit_j: float = _BUFFER_J_PER_BIT
    """One bit written to the output buffer (same estimate as the input buffer)."""
    mask_buffer_read_j: float = 3 * _BUFFER_J_PER_BIT
    """One tier-2 mask entry: ``ceil(log2(N + 2))`` = 3 bits for N = 3 shift levels,
    at the buffer's 0.05 pJ/bit."""
    digital_mac_j: float = 0.15e-12
    """One 8-bit MAC in the digital periphery (depthwise layers): 8-bit multiply 0.2 pJ
    + accumulate 0.05 pJ at 45 nm (Horowitz), x0.6 to 32 nm."""
    head_mac_j: float = 2.8e-12
    """One fp32 MAC of a task head, which the emulator runs in float: fp32 multiply 3.7 pJ
    + add 0.9 pJ at 45 nm (Horowitz), x0.6 to 32 nm."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{f.name} must be a finite energy >= 0 J, got {value!r}")

    @classmethod
    def for_crossbar(cls, config: CrossbarConfig, **overrides: float) -> EnergyConfig:
        """Defaults re-derived for another geometry: ADC bits and rows, mask entry width."""
        mask_bits = math.ceil(math.log2(config.shift_levels + 2))
        derived = {
            "adc_conversion_j": sar_adc_energy_j(config.adc_bits,
                                                 R_ON_OHM / min(config.rows, config.rows_per_read)),
            "mask_buffer_read_j": mask_bits * _BUFFER_J_PER_BIT,
        }
        derived.update(overrides)
        try:
            return cls(**derived)
        except TypeError as e:
            raise ConfigError(f"unknown energy constant in {sorted(overrides)}") from e


@dataclass(frozen=True)
class OpCounts:
    """How many of each priced operation some work performed."""

    cell_reads: float = 0
    adc_conversions: float = 0
    shift_adds: float = 0
    adder_tree_adds: float = 0
    offset_correction_adds: float = 0
    input_buffer_bits: float = 0
    output_buffer_bits: float = 0
    mask_buffer_reads: float = 0
    digital_macs: float = 0
    head_macs: float = 0

    def __add__(self, other: OpCounts) -> OpCounts:
        if not isinstance(other, OpCounts):
            return NotImplemented
        return OpCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                           for f in fields(self)})

    def __mul__(self, factor: float) -> OpCounts:
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            return NotImplemented
        return OpCounts(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class EnergyReport:
    """Joules per category; the categories mirror :class:`OpCounts`."""

    cell_read_j: float = 0.0
    adc_j: float = 0.0
    shift_add_j: float = 0.0
    adder_tree_j: float = 0.0
    offset_correction_j: float = 0.0
    input_buffer_j: float = 0.0
    output_buffer_j: float = 0.0
    mask_buffer_j: float = 0.0
    digital_mac_j: float = 0.0
    head_mac_j: float = 0.0

    @property
    def total_j(self) -> float:
        return sum(float(getattr(self, f.name)) for f in fields(self))

    def __add__(self, other: EnergyReport) -> EnergyReport:
        if not isinstance(other, EnergyReport):
            return NotImplemented
        return EnergyReport(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                               for f in fields(self)})

    def scaled(self, factor: float) -> EnergyReport:
        return EnergyReport(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_j": self.total_j}


def energy_of(counts: OpCounts, energy_config: EnergyConfig | None = None) -> EnergyReport:
    """Price operation counts."""
    e = energy_config if energy_config is not None else EnergyConfig()
    return EnergyReport(
        cell_read_j=counts.cell_reads * e.cell_read_j,
        adc_j=counts.adc_conversions * e.adc_conversion_j,
        shift_add_j=counts.shift_adds * e.shift_add_j,
        adder_tree_j=counts.adder_tree_adds * e.adder_tree_add_j,
        offset_correction_j=counts.offset_correction_adds * e.offset_correction_add_j,
        input_buffer_j=counts.input_buffer_bits * e.input_buffer_bit_j,
        output_buffer_j=counts.output_buffer_bits * e.output_buffer_bit_j,
        mask_buffer_j=counts.mask_buffer_reads * e.mask_buffer_read_j,
        digital_mac_j=counts.digital_macs * e.digital_mac_j,
        head_mac_j=counts.head_macs * e.head_mac_j,
    )


def input_cycles(input_bits: int, input_signed: bool, config: CrossbarConfig) -> int:
    """Read cycles per input vector: DAC steps, doubled for the two phases of signed inputs."""
    if input_bits < 1:
        raise ConfigError(f"input_bits must be >= 1, got {input_bits}")
    return math.ceil(input_bits / config.dac_bits) * (2 if input_signed else 1)


def _check_masks(
    layer: LayerMapping, config: CrossbarConfig,
    column_codes: Tensor | None, pe_mask: Tensor | None,
) -> None:
    if column_codes is not None:
        want = (layer.row_groups, layer.out_channels)
        if tuple(column_codes.shape) != want:
            raise ConfigError(f"layer {layer.name}: column_codes shape "
                              f"{tuple(column_codes.shape)}, expected {want}")
        if column_codes.dtype.is_floating_point or column_codes.dtype == torch.bool:
            raise ConfigError(f"layer {layer.name}: column_codes must be integer codes, "
                              f"got {column_codes.dtype}")
        top = config.shift_levels + 1
        if column_codes.numel() and (int(column_codes.min()) < 0 or int(column_codes.max()) > top):
            raise ConfigError(f"layer {layer.name}: column codes must be in 0..{top}")
    if pe_mask is not None:
        want = (layer.row_groups, layer.col_groups)
        if tuple(pe_mask.shape) != want:
            raise ConfigError(f"layer {layer.name}: pe_mask shape {tuple(pe_mask.shape)}, "
                              f"expected {want}")
        if pe_mask.dtype != torch.bool:
            raise ConfigError(f"layer {layer.name}: pe_mask must be bool, got {pe_mask.dtype}")


def count_layer_ops(
    layer: LayerMapping,
    *,
    images: int,
    positions_per_image: int,
    config: CrossbarConfig,
    column_codes: Tensor | None = None,
    pe_mask: Tensor | None = None,
    output_bits: int | None = None,
) -> OpCounts:
    """Operations of one layer for a forward pass of ``images`` images.

    Each image presents ``positions_per_image`` input vectors (one per output
    position). Per PE and vector: every active bit line reads all
    ``rows_in_group`` cells and is converted once per input cycle; each
    conversion feeds one shift-add (slice significance, bit-serial shift and the
    column's shift mask in one op). A logical column masked to 0 on a frozen PE
    is switched off: no cell reads, conversions or shift-adds; 1/8..1 all cost
    the same (a shift is free in the shift-adder). Replaced (spare) PEs ignore
    the column mask.

    Rows per read: a row group's rows are driven in ``ceil(rows_in_group /
    rows_per_conversion)`` read groups, each converted on its own, so conversions and
    shift-adds scale with the reads, and the adder tree sums every read's partial sum.

    Offset encoding: per vector, each row group with an active column sums its
    ``rows_in_group`` inputs once per cycle (shared by every column of every PE
    of that row group), and each active logical column subtracts
    ``offset * sum`` once. Differential encoding reads both arrays of a PE (twice the
    cell reads), subtracts each pair's currents before the ADC (one conversion per pair)
    and needs no offset correction. Inputs are read from the input buffer once per row
    group (broadcast along the row of PEs); ``output_bits`` (default
    ``activation_bits``: BN/ReLU/requant happen before the write) per output.

    The tier-2 mask is latched per logical column of every frozen PE once per
    layer invocation, i.e. once per image (mixed-task batches can change it
    between images); without ``column_codes`` there is no mask to read.
    """
    if images < 0 or positions_per_image < 0:
        raise ConfigError(f"layer {layer.name}: images ({images}) and positions_per_image "
                          f"({positions_per_image}) must be >= 0")
    out_bits = config.activation_bits if output_bits is None else output_bits
    if out_bits < 1:
        raise ConfigError(f"output_bits must be >= 1, got {out_bits}")
    vectors = images * positions_per_image
    output_buffer_bits = layer.out_channels * out_bits * vectors

    if layer.placement is Placement.DIGITAL:
        if column_codes is not None or pe_mask is not None:
            raise ConfigError(f"layer {layer.name} runs in the digital periphery and has no "
                              "PEs or columns to mask")
        inputs = layer.in_channels * layer.groups * layer.kernel_area
        return OpCounts(
            digital_macs=layer.out_channels * layer.in_channels * layer.kernel_area * vectors,
            input_buffer_bits=inputs * layer.input_bits * vectors,
            output_buffer_bits=output_buffer_bits,
        )

    if (layer.crossbar_rows, layer.crossbar_cols, layer.bits_per_cell) != (
        config.rows, config.cols, config.bits_per_cell
    ):
        raise ConfigError(f"layer {layer.name} was mapped for another crossbar geometry")
    _check_masks(layer, config, column_codes, pe_mask)
    cycles = input_cycles(layer.input_bits, layer.input_signed, config)
    n_rg, n_out = layer.row_groups, layer.out_channels

    starts = torch.arange(n_rg, dtype=torch.int64) * layer.rows_per_group
    rows = (layer.weight_rows - starts).clamp(max=layer.rows_per_group)  # [R]
    reads = -(-rows // layer.rows_per_conversion)  # [R] read groups holding weights
    col_group = torch.arange(n_out) // layer.outputs_per_pe  # [O]
    if pe_mask is not None:
        replaced = pe_mask[:, col_group]  # [R, O]
    else:
        replaced = torch.zeros(n_rg, n_out, dtype=torch.bool)
    if column_codes is not None:
        on = column_codes != 0
    else:
        on = torch.ones(n_rg, n_out, dtype=torch.bool)
    active = on | replaced  # [R, O] logical columns that are read
    active_per_rg = active.sum(dim=1)
    rg_active = active_per_rg > 0

    logical_active = int(active_per_rg.sum())
    active_rows = int((rows * rg_active).sum())
    conversions = int((reads * active_per_rg).sum()) * layer.slices * cycles * vectors
    offset = layer.weight_encoding is not WeightEncoding.DIFFERENTIAL
    return OpCounts(
        cell_reads=(int((rows * active_per_rg).sum()) * layer.slices * layer.arrays_per_pe
                    * cycles * vectors),
        adc_conversions=conversions,
        shift_adds=conversions,
        adder_tree_adds=n_out * (int(reads.sum()) - 1) * vectors,
        offset_correction_adds=(active_rows * cycles + logical_active) * vectors if offset else 0,
        input_buffer_bits=active_rows * layer.input_bits * vectors,
        output_buffer_bits=output_buffer_bits,
        mask_buffer_reads=int((~replaced).sum()) * images if column_codes is not None else 0,
    )


def count_head_ops(in_features: int, out_features: int, *, images: int) -> OpCounts:
    """A task head's dense layer, run digitally once per image."""
    if min(in_features, out_features, images) < 0:
        raise ConfigError("head sizes and images must be >= 0")
    return OpCounts(head_macs=in_features * out_features * images)
