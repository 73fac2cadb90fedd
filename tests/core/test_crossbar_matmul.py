"""The compiled operator's matrix-product path equals its grouped convolution bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.chip.adc import full_scale_adc_step
from core.chip.config import PAPER_CHIP, CrossbarConfig, CrossbarSettings
from core.chip.mapping import LayerMapping, map_layer
from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from core.ops import crossbar as crossbar_ops
from core.ops.crossbar import (
    ConvGeometry,
    CrossbarProgram,
    build_program,
    crossbar_conv2d,
    layer_cell_levels,
)
from core.task_state import random_head, random_task_state, shift_values
from tests.conftest import compiled_operator
from tests.core.helpers import chip_configs

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _compiled() -> None:
    compiled_operator()  # every test here checks the compiled path


def _layer(cin: int, cout: int, kernel: int, config: CrossbarConfig, *, input_bits: int,
           signed: bool) -> LayerMapping:
    conv = torch.nn.Conv2d(cin, cout, kernel, bias=False, device="meta")
    return map_layer("layer", 0, conv, config, weight_bits=config.weight_bits,
                     input_bits=input_bits, input_signed=signed)


def _both_paths(run: Callable[[], T]) -> tuple[T, T]:
    """``run()`` on the matrix-product path, then on the grouped convolution."""
    fast = run()
    applies = crossbar_ops._matmul_applies
    crossbar_ops._matmul_applies = lambda program: False
    try:
        slow = run()
    finally:
        crossbar_ops._matmul_applies = applies
    return fast, slow


@st.composite
def exact_cases(draw: st.DrawFn) -> dict:
    kernel = draw(st.sampled_from([1, 3]))
    config = draw(chip_configs(kernel))
    return {
        "config": config,
        "cin": draw(st.integers(1, 40)),
        "cout": draw(st.integers(1, 40)),
        "kernel": kernel,
        "stride": draw(st.sampled_from([1, 2])),
        "padding": draw(st.sampled_from([0, 1])) if kernel == 3 else 0,
        "dilation": draw(st.sampled_from([1, 2])) if kernel == 3 else 1,
        "size": (draw(st.integers(3, 9)), draw(st.integers(3, 9))),
        "batch": draw(st.integers(1, 4)),
        "signed": draw(st.booleans()),
        "input_bits": draw(st.sampled_from([4, 8])),
        "dac_bits": draw(st.sampled_from([1, 2, 4])),
        "adc_bits": draw(st.integers(2, 12)),
        "offset": draw(st.sampled_from([0.0, 0.4, -1.3, 0.7])),
        "zeros": draw(st.sampled_from([0.0, 0.5, 0.95])),
        "chunk": draw(st.sampled_from([1, 1 << 23])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exact_cases())
def test_matmul_path_equals_the_grouped_convolution(case):
    g = torch.Generator().manual_seed(case["seed"])
    config, cin, cout, k = case["config"], case["cin"], case["cout"], case["kernel"]
    layer = _layer(cin, cout, k, config, input_bits=case["input_bits"], signed=case["signed"])
    wb = config.weight_bits
    codes = torch.randint(-(2 ** (wb - 1)), 2 ** (wb - 1), (cout, cin, k, k), generator=g,
                          dtype=torch.int8)
    values = shift_values(3)[torch.randint(0, 5, (layer.row_groups, cout), generator=g)]
    full = full_scale_adc_step(layer, dac_bits=case["dac_bits"], adc_bits=case["adc_bits"])
    step = full * (0.1 + torch.rand(layer.slices, generator=g))
    program = build_program(layer_cell_levels(codes, layer), values, layer,
                            dac_bits=case["dac_bits"], adc_step=step,
                            adc_bits=case["adc_bits"], adc_offset_lsb=case["offset"])
    assert program.exact_sums
    low, high = ((-(2 ** (case["input_bits"] - 1)), 2 ** (case["input_bits"] - 1))
                 if case["signed"] else (0, 2 ** case["input_bits"]))
    x = torch.randint(low, high, (case["batch"], cin, *case["size"]), generator=g).float()
    x = x * (torch.rand(x.shape, generator=g) >= case["zeros"])  # sparse inputs, zero rows
    geometry = ConvGeometry((case["stride"],) * 2, (case["padding"],) * 2,
                            (case["dilation"],) * 2)
    h, w = case["size"]
    if geometry.output_size(h, w, (k, k))[0] < 1 or geometry.output_size(h, w, (k, k))[1] < 1:
        return

    def run() -> torch.Tensor:
        return crossbar_conv2d(x, program, geometry, implementation="compiled",
                               max_chunk_elements=case["chunk"])

    fast, slow = _both_paths(run)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize(("kernel", "adc_bits", "step_scale"),
                         [(1, 5, 0.3), (3, 5, 0.3), (1, 14, 0.0), (3, 14, 0.0)])
def test_differential_reads_pack_two_slices_and_segment_large_sums(kernel, adc_bits,
                                                                    step_scale):
    """Differential pairs read 72 rows at once: a whole read may not fit a packed float
    column, so the matrix path packs at a lower base and sums a read with large inputs in
    segments: the same bits as the grouped convolution, also where every input is at its
    largest."""
    g = torch.Generator().manual_seed(kernel)
    config = CrossbarConfig(rows_per_read=72)
    cin = 72 // kernel**2 * 2  # two PE row groups of 72 rows
    layer = _layer(cin, 24, kernel, config, input_bits=8, signed=True)
    codes = torch.randint(-8, 8, (24, cin, kernel, kernel), generator=g, dtype=torch.int8)
    codes[:12] = 7  # cell digits (differential levels + 3) of 4 and 6: sums past 2**12
    # a 5-bit ADC, and one wide enough at unit step to pass every digit's error through
    step = (full_scale_adc_step(layer, dac_bits=4, adc_bits=adc_bits) * step_scale
            if step_scale else torch.ones(layer.slices))
    values = shift_values(3)[torch.randint(0, 5, (layer.row_groups, 24), generator=g)]
    program = build_program(layer_cell_levels(codes, layer), values, layer, dac_bits=4,
                            adc_step=step, adc_bits=adc_bits, adc_offset_lsb=0.3)
    _, pack, _, limit = program.matmul_layout
    assert program.pack == 1 and pack == 2 and 15 <= limit < 72 * 15, limit
    x = torch.randint(-128, 128, (3, cin, 5, 5), generator=g).float()
    x[0] = -128  # every read's cycles at their largest: segmented
    x[1] = 127
    x[2] *= torch.rand(x[2].shape, generator=g) < 0.3  # sparse: one segment
    geometry = ConvGeometry((1, 1), (kernel // 2,) * 2, (1, 1))
    fast, slow = _both_paths(lambda: crossbar_conv2d(x, program, geometry,
                                                     implementation="compiled"))
    assert torch.equal(fast, slow)


def _program(levels: torch.Tensor, layer: LayerMapping, **kw: float) -> CrossbarProgram:
    step = full_scale_adc_step(layer, dac_bits=4, adc_bits=5)
    return build_program(levels, torch.ones(layer.row_groups, layer.out_channels), layer,
                         dac_bits=4, adc_step=step, adc_bits=5, **kw)


def test_only_exact_partial_sums_take_the_matmul_path():
    layer = _layer(20, 6, 1, CrossbarConfig(), input_bits=4, signed=False)
    levels = layer_cell_levels(torch.randint(-8, 8, (6, 20, 1, 1), dtype=torch.int8), layer)
    assert _program(levels, layer).exact_sums
    # programmed with variation: float sums depend on their order
    assert not _program(levels + 0.1, layer, cells_as_encoded=False).exact_sums
    assert not _program(levels, layer, read_sigma=0.2).exact_sums  # noise per read


@pytest.fixture(scope="module")
def paper_chip(quantized_mobilenet: CrossbarModel) -> CrossbarModel:
    return quantized_mobilenet.with_chip(**PAPER_CHIP)


@pytest.mark.parametrize("dac_mode", ["multi_bit", "bit_serial"])
def test_paper_chip_network_is_unchanged_by_the_matmul_path(paper_chip, images32, dac_mode):
    engine = CrossbarEngine(paper_chip, crossbar=CrossbarSettings(
        adc_range="full_scale", dac_mode=dac_mode, implementation="compiled"))
    for task, seed in (("t", 3), ("u", 4)):
        engine.add_task(random_task_state(task, engine.mapping, random_head(5, 1280),
                                          pe_fraction=0.2, seed=seed))
    programs = engine.activate("t", "crossbar").programs or {}
    assert all(p.exact_sums and not p.lossless for p in programs.values())
    fast, slow = _both_paths(lambda: engine.forward(images32, "t", "crossbar"))
    assert torch.equal(fast, slow)
    mixed = ["t", "u", "u", "t"][: len(images32)]  # shared reads, then each task's spare PEs
    fast, slow = _both_paths(lambda: engine.forward_mixed(images32, mixed, "crossbar"))
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_operator_refuses_a_layout_it_was_not_built_for():
    layer = _layer(20, 6, 1, CrossbarConfig(), input_bits=4, signed=False)
    levels = layer_cell_levels(torch.randint(-8, 8, (6, 20, 1, 1), dtype=torch.int8), layer)
    program = _program(levels, layer)
    x = torch.randint(0, 16, (2, 20, 3, 3)).float()
    geometry = ConvGeometry((1, 1), (0, 0), (1, 1))
    wrong = torch.ones(program.row_groups + 1, program.out_channels)  # one group too many
    out = torch.zeros(2, program.out_channels, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="column values do not match"):
        crossbar_ops._compiled_matmul(x, program, geometry, wrong, True, out)
    with pytest.raises(RuntimeError, match="output does not match"):
        crossbar_ops._compiled_matmul(x, program, geometry, program.column_values, True,
                                      torch.zeros(2, program.out_channels, 2, 2))
