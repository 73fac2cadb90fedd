"""Energy counts checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from core.chip.config import PAPER_CHIP, CrossbarConfig, DacMode
from core.chip.energy import (
    EnergyConfig,
    EnergyReport,
    OpCounts,
    count_head_ops,
    count_layer_ops,
    energy_of,
    input_cycles,
    sar_adc_energy_j,
    sar_adc_latency_s,
)
from core.chip.mapping import LayerMapping, Placement
from core.errors import ConfigError

# 18-row x 8-col crossbar, 4-bit weights in 2-bit cells: 2 slices, 4 outputs per PE,
# a row group is 2 input channels of a 3x3 kernel = 18 rows.
SMALL = CrossbarConfig(rows=18, cols=8, dac_mode=DacMode.MULTI_BIT)


def conv(cin: int, cout: int, *, k: int = 3, bits: int = 4, signed: bool = False,
         config: CrossbarConfig = SMALL, placement: Placement = Placement.CROSSBAR,
         groups: int = 1) -> LayerMapping:
    return LayerMapping(
        name="conv", index=0, placement=placement, out_channels=cout, in_channels=cin,
        kernel_size=(k, k), groups=groups, weight_bits=4, input_bits=bits,
        input_signed=signed, crossbar_rows=config.rows, crossbar_cols=config.cols,
        bits_per_cell=config.bits_per_cell,
    )


def test_geometry_of_the_hand_examples() -> None:
    layer = conv(16, 40)
    assert (layer.weight_rows, layer.rows_per_group) == (144, 18)
    assert (layer.row_groups, layer.col_groups, layer.slices) == (8, 10, 2)
    ragged = conv(15, 38)
    assert (ragged.weight_rows, ragged.row_groups, ragged.col_groups) == (135, 8, 10)
    assert ragged.rows_in_group(7) == 9


def test_unmasked_conv_counts_by_hand() -> None:
    # 2 images x 5 positions = 10 vectors; 4-bit unsigned inputs, 4-bit DAC: 1 cycle.
    c = count_layer_ops(conv(16, 40), images=2, positions_per_image=5, config=SMALL)
    assert c.cell_reads == 144 * 40 * 2 * 1 * 10  # all rows x bit lines x cycles x vectors
    assert c.cell_reads == 115_200
    assert c.adc_conversions == 8 * 40 * 2 * 10 == 6_400  # row groups x bit lines x vectors
    assert c.shift_adds == 6_400
    assert c.adder_tree_adds == 40 * (8 - 1) * 10 == 2_800
    assert c.offset_correction_adds == (144 * 1 + 8 * 40) * 10 == 4_640
    assert c.input_buffer_bits == 144 * 4 * 10 == 5_760
    assert c.output_buffer_bits == 40 * 4 * 10 == 1_600
    assert c.mask_buffer_reads == 0  # no column mask, nothing to latch
    assert c.digital_macs == 0


def test_masked_conv_counts_by_hand() -> None:
    layer = conv(16, 40)
    codes = torch.full((8, 40), 4, dtype=torch.uint8)  # code N+1 = 4 -> value 1
    codes[0, 0:4] = 0  # 4 logical columns of PE (0, 0) switched off
    codes[1, 5] = 2  # 1/4: costs the same as 1
    codes[7, :] = 0  # a whole row group switched off
    codes[2, 12] = 0  # on PE (2, 3), which is replaced: the mask does not apply
    pe_mask = torch.zeros(8, 10, dtype=torch.bool)
    pe_mask[2, 3] = True
    c = count_layer_ops(layer, images=2, positions_per_image=5, config=SMALL,
                        column_codes=codes, pe_mask=pe_mask)
    active = 8 * 40 - 4 - 40  # = 276 logical columns read
    assert c.cell_reads == active * 18 * 2 * 10 == 99_360
    assert c.adc_conversions == active * 2 * 10 == 5_520
    assert c.shift_adds == 5_520
    assert c.adder_tree_adds == 2_800
    # 7 row groups still active: 126 rows summed per cycle, plus 276 subtracts.
    assert c.offset_correction_adds == (126 + 276) * 10 == 4_020
    assert c.input_buffer_bits == 126 * 4 * 10 == 5_040
    # one entry per logical column of the 79 frozen PEs (320 - 4 columns), per image
    assert c.mask_buffer_reads == (320 - 4) * 2 == 632


def test_ragged_bit_serial_signed_counts_by_hand() -> None:
    config = CrossbarConfig(rows=18, cols=8, dac_mode=DacMode.BIT_SERIAL)
    layer = conv(15, 38, signed=True, config=config)
    # bit-serial: 4 cycles per 4-bit input, two phases for signed inputs: 8 cycles.
    c = count_layer_ops(layer, images=1, positions_per_image=3, config=config)
    assert c.cell_reads == 135 * 38 * 2 * 8 * 3 == 246_240  # 7x18 + 9 = 135 rows
    assert c.adc_conversions == 8 * 38 * 2 * 8 * 3 == 14_592
    assert c.adder_tree_adds == 38 * 7 * 3 == 798
    assert c.offset_correction_adds == (135 * 8 + 8 * 38) * 3 == 4_152
    assert c.input_buffer_bits == 135 * 4 * 3 == 1_620
    assert c.output_buffer_bits == 38 * 4 * 3 == 456


def test_input_cycles() -> None:
    multi = CrossbarConfig(dac_mode=DacMode.MULTI_BIT)
    serial = CrossbarConfig(dac_mode=DacMode.BIT_SERIAL)
    assert input_cycles(4, False, multi) == 1
    assert input_cycles(4, True, multi) == 2
    assert input_cycles(8, False, multi) == 2  # 8-bit edge input through a 4-bit DAC
    assert input_cycles(4, False, serial) == 4
    assert input_cycles(4, True, serial) == 8
    layer = conv(16, 40)
    m = count_layer_ops(layer, images=1, positions_per_image=1, config=SMALL)
    s = count_layer_ops(layer, images=1, positions_per_image=1,
                        config=CrossbarConfig(rows=18, cols=8, dac_mode=DacMode.BIT_SERIAL))
    assert s.adc_conversions == 4 * m.adc_conversions
    assert s.cell_reads == 4 * m.cell_reads
    assert s.adder_tree_adds == m.adder_tree_adds


def test_signed_inputs_double_cycles() -> None:
    u = count_layer_ops(conv(16, 40), images=1, positions_per_image=7, config=SMALL)
    s = count_layer_ops(conv(16, 40, signed=True), images=1, positions_per_image=7,
                        config=SMALL)
    assert s.adc_conversions == 2 * u.adc_conversions
    assert s.cell_reads == 2 * u.cell_reads
    assert s.input_buffer_bits == u.input_buffer_bits


def one_column(code: int, pe_replaced: bool = False) -> OpCounts:
    codes = torch.full((8, 40), 4, dtype=torch.uint8)
    codes[3, 17] = code
    pe_mask = torch.zeros(8, 10, dtype=torch.bool)
    pe_mask[3, 17 // 4] = pe_replaced
    return count_layer_ops(conv(16, 40), images=1, positions_per_image=1, config=SMALL,
                           column_codes=codes, pe_mask=pe_mask)


def test_zero_column_costs_no_adc_and_no_reads() -> None:
    full, half, off = one_column(4), one_column(3), one_column(0)
    assert half == full  # 1/2 costs exactly what 1 costs
    assert full.adc_conversions - off.adc_conversions == 2  # its 2 bit lines
    assert full.cell_reads - off.cell_reads == 2 * 18
    assert full.shift_adds - off.shift_adds == 2
    e = EnergyConfig()
    saved = energy_of(full, e).adc_j - energy_of(off, e).adc_j
    assert saved == pytest.approx(2 * e.adc_conversion_j)


def test_replaced_pe_ignores_column_mask() -> None:
    on_spare_off = one_column(0, pe_replaced=True)
    on_spare_on = one_column(4, pe_replaced=True)
    assert on_spare_off.adc_conversions == on_spare_on.adc_conversions
    assert on_spare_off.cell_reads == on_spare_on.cell_reads
    assert on_spare_off.adc_conversions == one_column(4).adc_conversions
    # the replaced PE's 4 logical columns are not read from the mask buffer
    assert on_spare_off.mask_buffer_reads == 320 - 4


def test_digital_depthwise_counts_by_hand() -> None:
    layer = conv(1, 32, bits=8, placement=Placement.DIGITAL, groups=32)
    c = count_layer_ops(layer, images=2, positions_per_image=49, config=SMALL)
    assert c.digital_macs == 32 * 1 * 9 * 98 == 28_224
    assert c.input_buffer_bits == 32 * 9 * 8 * 98 == 225_792
    assert c.output_buffer_bits == 32 * 4 * 98 == 12_544
    assert c.adc_conversions == c.cell_reads == 0
    with pytest.raises(ConfigError):
        count_layer_ops(layer, images=1, positions_per_image=1, config=SMALL,
                        pe_mask=torch.zeros(0, 0, dtype=torch.bool))


def test_adc_formula_matches_brief() -> None:
    # P = (1.1294*5 + 8.8998) uW + 0.079449 * exp(-2.297 * log10 R); E = P * 6 ns
    # R = 1 MOhm: 14.5468 uW + 0.0819 uW = 14.63 uW -> 0.0878 pJ
    assert sar_adc_energy_j(5, 1e6) == pytest.approx(0.0878e-12, rel=2e-3)
    # R = 100 kOhm / 72 = 1389 Ohm: 14.5468 + 58.2 uW = 72.7 uW -> 0.436 pJ
    assert sar_adc_energy_j(5, 100e3 / 72) == pytest.approx(0.436e-12, rel=3e-3)
    # infinite column resistance leaves the static part: 14.5468 uW * 6 ns
    assert sar_adc_energy_j(5, 1e30) == pytest.approx(14.5468e-6 * 6e-9, rel=1e-6)
    assert sar_adc_latency_s(5) == pytest.approx(6e-9)
    assert EnergyConfig().adc_conversion_j == pytest.approx(0.436e-12, rel=3e-3)
    with pytest.raises(ConfigError):
        sar_adc_energy_j(5, 0.0)


def test_energy_config_defaults_and_crossbar() -> None:
    e = EnergyConfig()
    assert e.cell_read_j == pytest.approx(0.5**2 / 100e3 * 10e-9)  # 0.025 pJ
    assert e.cell_read_j == pytest.approx(0.025e-12)
    binary = EnergyConfig.for_crossbar(CrossbarConfig(shift_levels=0, rows=36))
    assert binary.mask_buffer_read_j == pytest.approx(1 * 0.05e-12)  # codes 0..1: 1 bit
    assert binary.adc_conversion_j == pytest.approx(sar_adc_energy_j(5, 100e3 / 36))
    with pytest.raises(ConfigError):
        EnergyConfig(cell_read_j=-1.0)
    with pytest.raises(ConfigError):
        EnergyConfig.for_crossbar(CrossbarConfig(), no_such_constant=1.0)


def test_energy_of_prices_each_category() -> None:
    e = EnergyConfig()
    counts = OpCounts(cell_reads=1000, adc_conversions=10, mask_buffer_reads=4, head_macs=2)
    r = energy_of(counts, e)
    assert r.cell_read_j == pytest.approx(1000 * 0.025e-12)
    assert r.adc_j == pytest.approx(10 * e.adc_conversion_j)
    assert r.mask_buffer_j == pytest.approx(4 * 0.15e-12)
    assert r.head_mac_j == pytest.approx(2 * 2.8e-12)
    assert r.total_j == pytest.approx(r.cell_read_j + r.adc_j + r.mask_buffer_j + r.head_mac_j)
    assert r.to_dict()["total_j"] == pytest.approx(r.total_j)
    assert (r + r).total_j == pytest.approx(2 * r.total_j)
    assert EnergyReport().total_j == 0


def test_op_counts_arithmetic() -> None:
    a = OpCounts(cell_reads=3, adc_conversions=1)
    b = OpCounts(cell_reads=2, digital_macs=5)
    assert a + b == OpCounts(cell_reads=5, adc_conversions=1, digital_macs=5)
    assert 2 * a == a * 2 == a + a
    assert (a * 0.5).cell_reads == 1.5
    assert set(a.to_dict()) >= {"cell_reads", "adc_conversions", "shift_adds",
                                "adder_tree_adds", "offset_correction_adds",
                                "input_buffer_bits", "output_buffer_bits",
                                "mask_buffer_reads", "digital_macs"}
    assert count_head_ops(1280, 10, images=3).head_macs == 38_400


def test_counts_scale_with_images() -> None:
    layer = conv(16, 40)
    codes = torch.randint(0, 5, (8, 40), dtype=torch.uint8)
    one = count_layer_ops(layer, images=1, positions_per_image=9, config=SMALL,
                          column_codes=codes)
    three = count_layer_ops(layer, images=3, positions_per_image=9, config=SMALL,
                            column_codes=codes)
    assert three == one * 3


def test_bad_masks_rejected() -> None:
    layer = conv(16, 40)
    kw = {"images": 1, "positions_per_image": 1, "config": SMALL}
    with pytest.raises(ConfigError):
        count_layer_ops(layer, column_codes=torch.zeros(8, 39, dtype=torch.uint8), **kw)
    with pytest.raises(ConfigError):
        count_layer_ops(layer, column_codes=torch.full((8, 40), 5, dtype=torch.uint8), **kw)
    with pytest.raises(ConfigError):
        count_layer_ops(layer, column_codes=torch.ones(8, 40), **kw)
    with pytest.raises(ConfigError):
        count_layer_ops(layer, pe_mask=torch.zeros(8, 10, dtype=torch.uint8), **kw)
    with pytest.raises(ConfigError):
        count_layer_ops(layer, images=-1, positions_per_image=1, config=SMALL)
    with pytest.raises(ConfigError):
        count_layer_ops(layer, images=1, positions_per_image=1, config=CrossbarConfig())


def test_default_conv_sanity_number() -> None:
    # 3x3 64->64 at 56x56 on 72x72: 8 row groups of 72 rows, 2 column groups
    # (36 outputs each); 1 cycle; 3136 vectors (the paper's periphery).
    config = CrossbarConfig(**PAPER_CHIP)
    layer = conv(64, 64, config=config)
    c = count_layer_ops(layer, images=1, positions_per_image=56 * 56, config=config)
    assert c.cell_reads == 576 * 128 * 3136
    assert c.adc_conversions == 8 * 128 * 3136
    total = energy_of(c).total_j
    assert 1e-7 < total < 1e-5 and math.isfinite(total)
