"""The chip's periphery design space: differential pairs, rows per read, signed ADCs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from core.backbones.shipped import default_backbone_path
from core.chip.adc import adc_code_range, largest_read_sum
from core.chip.config import PAPER_CHIP, CrossbarConfig, DacMode, WeightEncoding
from core.chip.energy import EnergyConfig, count_layer_ops, sar_adc_energy_j
from core.chip.mapping import LayerMapping, Placement, map_layer
from core.chip.programming import cell_levels_to_weight_codes, weight_codes_to_cell_levels
from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from core.ops.crossbar import (
    ConvGeometry,
    build_program,
    crossbar_conv2d,
    layer_cell_levels,
)
from core.ops.fold import fold_effective_weight
from core.task_state import shift_values

HAND_CODES = torch.tensor([1, -2, 3, 0], dtype=torch.int8).reshape(1, 4, 1, 1)
GEOMETRY = ConvGeometry((1, 1), (0, 0), (1, 1))


def _hand(encoding: str, x: list[float], *, step: float, adc_bits: int,
          rows_per_read: int = 4) -> float:
    """One 4-row PE and one output channel holding weights [1, -2, 3, 0]."""
    config = CrossbarConfig(rows=4, cols=2, weight_encoding=encoding,
                            rows_per_read=rows_per_read)
    conv = torch.nn.Conv2d(4, 1, 1, bias=False, device="meta")
    layer = map_layer("hand", 0, conv, config, weight_bits=4, input_bits=4, input_signed=False)
    program = build_program(layer_cell_levels(HAND_CODES, layer), torch.ones(1, 1), layer,
                            dac_bits=4, adc_step=torch.tensor([step, step]), adc_bits=adc_bits)
    out = []
    for implementation in ("reference", "compiled"):
        out.append(crossbar_conv2d(torch.tensor(x, dtype=torch.float32).reshape(1, 4, 1, 1),
                                   program, GEOMETRY,
                                   implementation=implementation).item())
    assert out[0] == out[1]
    return out[0]


def test_differential_cells_hold_magnitudes_on_two_arrays():
    levels = weight_codes_to_cell_levels(HAND_CODES.flatten(), weight_bits=4, bits_per_cell=2,
                                         encoding="differential")
    # positive array (high, low) then negative array (high, low)
    assert levels.tolist() == [[0, 1, 0, 0], [0, 0, 0, 2], [0, 3, 0, 0], [0, 0, 0, 0]]
    every = torch.arange(-8, 8)
    back = cell_levels_to_weight_codes(
        weight_codes_to_cell_levels(every, weight_bits=4, bits_per_cell=2,
                                    encoding="differential"),
        weight_bits=4, bits_per_cell=2, encoding="differential")
    assert torch.equal(back, every)


def test_hand_differential_pe_subtracts_before_a_signed_adc():
    # low slice: 3*1 + 2*3 on the positive array minus 1*2 on the negative one = 7
    assert _hand("differential", [3, 1, 2, 0], step=1, adc_bits=8) == 7
    # 7 / 2 = 3.5 rounds half to even: code 4, i.e. 8
    assert _hand("differential", [3, 1, 2, 0], step=2, adc_bits=8) == 8
    # a 3-bit signed ADC spans codes -4..3: 7 clips to 3, -6 clips to -4
    assert _hand("differential", [3, 1, 2, 0], step=1, adc_bits=3) == 3
    assert _hand("differential", [0, 3, 0, 0], step=1, adc_bits=8) == -6
    assert _hand("differential", [0, 3, 0, 0], step=1, adc_bits=3) == -4


def test_reading_fewer_rows_per_conversion_avoids_clipping():
    # differential, two reads of two rows: 3*1 - 1*2 = 1 and 2*3 = 6 -> 1 + min(6, 3)
    assert _hand("differential", [3, 1, 2, 0], step=1, adc_bits=3, rows_per_read=2) == 4
    # offset: one read of all rows clips both slices (11 -> 7): 4*7 + 7 - 8*6 = -13;
    # two reads fit a 3-bit ADC (sums 7, 5 then 4, 6): exact
    assert _hand("offset", [3, 1, 2, 0], step=1, adc_bits=3) == -13
    assert _hand("offset", [3, 1, 2, 0], step=1, adc_bits=3, rows_per_read=2) == 7


def test_rows_per_read_takes_whole_channels_that_tile_the_row_group():
    def mapped(kernel: int, rows_per_read: int) -> LayerMapping:
        conv = torch.nn.Conv2d(144, 8, kernel, bias=False, device="meta")
        return map_layer("l", 0, conv, CrossbarConfig(rows_per_read=rows_per_read),
                         weight_bits=4, input_bits=4, input_signed=False)

    assert (mapped(1, 9).channels_per_read, mapped(1, 9).reads_per_group) == (9, 8)
    assert mapped(1, 10).channels_per_read == 9  # 10 does not divide 72
    assert (mapped(3, 9).channels_per_read, mapped(3, 9).reads_per_group) == (1, 8)
    assert mapped(3, 4).rows_per_conversion == 9  # at least one whole 3x3 channel
    assert mapped(3, 36).rows_per_conversion == 36
    assert mapped(1, 72).reads_per_group == 1
    assert CrossbarConfig(rows=4, cols=2).rows_per_read == 4  # "at most 72" of 4 rows


@st.composite
def lossless_cases(draw: st.DrawFn) -> dict:
    encoding = draw(st.sampled_from(["offset", "differential"]))
    adc_bits = draw(st.integers(4, 10))
    dac_bits = draw(st.sampled_from([1, 2, 4]))
    kernel = draw(st.sampled_from([1, 3]))
    qmax = adc_code_range(adc_bits, encoding == "differential")[1]
    fit = qmax // ((2**dac_bits - 1) * 3)  # rows whose largest sum fits the ADC
    if fit < kernel * kernel:
        adc_bits, fit = 10, 511 // ((2**dac_bits - 1) * 3)
    rows_per_read = draw(st.integers(kernel * kernel, min(72, fit)))
    return {"encoding": encoding, "adc_bits": adc_bits, "dac_bits": dac_bits,
            "kernel": kernel, "rows_per_read": rows_per_read,
            "cin": draw(st.integers(1, 20)), "cout": draw(st.integers(1, 10)),
            "signed": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lossless_cases())
def test_a_read_that_fits_the_adc_equals_ideal_bit_for_bit(case):
    """rows per read x top cell level x top DAC code <= top ADC code: crossbar == ideal."""
    g = torch.Generator().manual_seed(case["seed"])
    config = CrossbarConfig(weight_encoding=case["encoding"], rows_per_read=case["rows_per_read"],
                            adc_bits=case["adc_bits"])
    k, cin, cout = case["kernel"], case["cin"], case["cout"]
    conv = torch.nn.Conv2d(cin, cout, k, bias=False, device="meta")
    input_bits = 8 if case["signed"] else 4
    layer = map_layer("l", 0, conv, config, weight_bits=4, input_bits=input_bits,
                      input_signed=case["signed"])
    assert largest_read_sum(layer, case["dac_bits"]) <= adc_code_range(
        case["adc_bits"], config.adc_signed)[1]
    codes = torch.randint(-8, 8, (cout, cin, k, k), generator=g, dtype=torch.int8)
    values = shift_values(3)[torch.randint(0, 5, (layer.row_groups, cout), generator=g)]
    program = build_program(layer_cell_levels(codes, layer), values, layer,
                            dac_bits=case["dac_bits"], adc_step=torch.ones(layer.slices),
                            adc_bits=case["adc_bits"])
    assert program.lossless
    half = 2 ** (input_bits - 1)
    low, high = (-half, half) if case["signed"] else (0, 2**input_bits)
    x = torch.randint(low, high, (2, cin, 5, 5), generator=g).float()
    ideal = F.conv2d(x, fold_effective_weight(codes, torch.ones(cout), layer, values),
                     padding=k // 2)
    for implementation in ("reference", "compiled"):
        out = crossbar_conv2d(x, program, ConvGeometry((1, 1), (k // 2,) * 2, (1, 1)),
                              implementation=implementation)
        assert torch.equal(out, ideal)


def test_a_read_that_can_overflow_is_not_lossless():
    config = CrossbarConfig(rows_per_read=18)  # 18 rows x 3 levels x 1 bit = 54 > 31
    conv = torch.nn.Conv2d(36, 4, 1, bias=False, device="meta")
    layer = map_layer("l", 0, conv, config, weight_bits=4, input_bits=4, input_signed=False)
    codes = torch.zeros(4, 36, 1, 1, dtype=torch.int8)
    program = build_program(layer_cell_levels(codes, layer), torch.ones(1, 4), layer,
                            dac_bits=1, adc_step=torch.ones(2), adc_bits=5)
    assert not program.lossless


# -- energy and conversion counts ---------------------------------------------------------

SMALL = CrossbarConfig(rows=18, cols=8)


def _conv(config: CrossbarConfig) -> LayerMapping:
    return LayerMapping(
        name="conv", index=0, placement=Placement.CROSSBAR, out_channels=40, in_channels=16,
        kernel_size=(3, 3), groups=1, weight_bits=4, input_bits=4, input_signed=False,
        crossbar_rows=config.rows, crossbar_cols=config.cols, bits_per_cell=2,
        weight_encoding=config.weight_encoding, rows_per_read=config.rows_per_read)


@pytest.mark.parametrize("encoding", ["offset", "differential"])
@pytest.mark.parametrize("rows_per_read", [18, 9])
@pytest.mark.parametrize("dac_mode", ["multi_bit", "bit_serial"])
def test_counts_follow_the_documented_formula(encoding, rows_per_read, dac_mode):
    config = CrossbarConfig(rows=18, cols=8, weight_encoding=encoding,
                            rows_per_read=rows_per_read, dac_mode=dac_mode)
    layer = _conv(config)
    c = count_layer_ops(layer, images=2, positions_per_image=5, config=config)
    vectors, cycles = 10, 1 if dac_mode == "multi_bit" else 4
    reads = 18 // rows_per_read  # per row group (2 channels of 9 rows)
    arrays = 2 if encoding == "differential" else 1
    # 8 row groups x reads x 40 outputs x 2 slices per conversion
    assert c.adc_conversions == 8 * reads * 40 * 2 * cycles * vectors
    assert c.shift_adds == c.adc_conversions
    assert c.cell_reads == 144 * 40 * 2 * arrays * cycles * vectors
    assert c.adder_tree_adds == 40 * (8 * reads - 1) * vectors
    offset_adds = (144 * cycles + 8 * 40) * vectors if encoding == "offset" else 0
    assert c.offset_correction_adds == offset_adds
    pe_cells = 8 * 10 * 18 * 8 * arrays
    assert layer.cells_total == pe_cells
    assert layer.num_pes == 80  # a differential PE is one pair of arrays


def test_adc_energy_follows_the_rows_read_together():
    paper = EnergyConfig.for_crossbar(CrossbarConfig(**PAPER_CHIP))
    nine = EnergyConfig.for_crossbar(CrossbarConfig(rows_per_read=9))
    assert paper.adc_conversion_j == sar_adc_energy_j(5, 100e3 / 72)
    assert nine.adc_conversion_j == sar_adc_energy_j(5, 100e3 / 9)
    assert nine.adc_conversion_j < paper.adc_conversion_j


# -- configuration and saved backbones ----------------------------------------------------

def test_a_config_saved_before_the_periphery_fields_means_the_paper_chip():
    old = {k: v for k, v in CrossbarConfig().to_dict().items()
           if k not in ("rows_per_read", "dac_mode", "weight_encoding")}
    config = CrossbarConfig.from_dict(old)
    assert (config.rows_per_read, config.dac_mode, config.weight_encoding) == (
        72, DacMode.MULTI_BIT, WeightEncoding.OFFSET)
    assert "72 rows per read" in config.describe()


def test_the_shipped_backbone_says_which_chip_it_was_made_for(tmp_path):
    model = CrossbarModel.load(default_backbone_path())
    with safe_open(str(default_backbone_path()), framework="pt") as f:
        saved = json.loads((f.metadata() or {})["crossbar_config"])
    assert model.config == CrossbarConfig.from_dict(saved)
    assert model.config.describe().startswith(model.config.weight_encoding.value)
    # a backbone written for the paper's chip (no periphery fields) loads as that chip
    paper = model.with_chip(**PAPER_CHIP)
    legacy = {k: v for k, v in paper.config.to_dict().items() if k != "rows_per_read"}
    assert CrossbarConfig.from_dict(legacy) == paper.config


def test_differential_chip_runs_a_network_and_costs_twice_the_cells(quantized_mobilenet):
    offset = quantized_mobilenet.with_chip(weight_encoding="offset")
    differential = quantized_mobilenet.with_chip(weight_encoding="differential",
                                                 rows_per_read=9, dac_mode="bit_serial")
    assert differential.mapping.num_pes == offset.mapping.num_pes
    assert differential.mapping.cells_used == 2 * offset.mapping.cells_used
    images = torch.rand(4, 3, 32, 32)
    differential.calibrate_adc(images)
    engine = CrossbarEngine(differential)
    from core.backbones.shipped import imagenet_task

    engine.add_task(imagenet_task(differential))
    crossbar = engine.forward(images, "imagenet", "crossbar")
    ideal = engine.forward(images, "imagenet", "ideal")
    assert crossbar.shape == ideal.shape and bool(torch.isfinite(crossbar).all())
    assert float((crossbar.argmax(1) == ideal.argmax(1)).float().mean()) >= 0.5


def test_only_the_lossless_chip_fits_every_read_into_its_adc(quantized_mobilenet):
    from core.chip.adc import chip_is_lossless
    from core.chip.config import LOSSLESS_CHIP

    assert quantized_mobilenet.config == CrossbarConfig(**LOSSLESS_CHIP)
    for chip, lossless in ((LOSSLESS_CHIP, True), (PAPER_CHIP, False),
                           ({**PAPER_CHIP, "weight_encoding": "differential"}, False),
                           ({**LOSSLESS_CHIP, "adc_bits": 4}, False)):
        model = quantized_mobilenet.with_chip(**chip)
        assert model.mapping is not None
        assert chip_is_lossless(model.mapping.crossbar_layers, model.config) is lossless
