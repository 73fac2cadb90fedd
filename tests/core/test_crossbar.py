"""Crossbar fidelity: the operator's ADC semantics, compiled vs reference, and whole networks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.backbones import build_backbone
from core.chip.adc import full_scale_adc_step
from core.chip.config import LOSSLESS_CHIP, CrossbarConfig, CrossbarSettings, NonIdealities
from core.chip.mapping import LayerMapping, map_layer
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.nn.calibration import calibration_images
from core.nn.model import CrossbarModel
from core.ops.crossbar import (
    ConvGeometry,
    CrossbarProgram,
    build_program,
    conversions,
    crossbar_conv2d,
    input_cycles,
    layer_cell_levels,
)
from core.ops.fold import fold_effective_weight
from core.task_state import TaskState, random_head, random_task_state, shift_values
from tests.core.helpers import chip_configs

LOSSLESS = CrossbarSettings(adc_bits=16, adc_range="full_scale")


def _layer(cin: int, cout: int, kernel: int, config: CrossbarConfig, *, weight_bits: int = 4,
           input_bits: int = 4, signed: bool = False) -> LayerMapping:
    conv = torch.nn.Conv2d(cin, cout, kernel, bias=False, device="meta")
    return map_layer("layer", 0, conv, config, weight_bits=weight_bits, input_bits=input_bits,
                     input_signed=signed)


# -- ADC semantics on a hand-sized PE ----------------------------------------------------

# One 4-row PE column pair: weights [1, -2, 3, 0] are levels [9, 6, 11, 8] under the
# offset encoding, i.e. high cells [2, 1, 2, 2] and low cells [1, 2, 3, 0]. The input
# [3, 1, 2, 0] makes both partial sums 11, the input sum 6 and the exact result 7.
HAND_CONFIG = CrossbarConfig(rows=4, cols=2, **LOSSLESS_CHIP)  # offset cells, as written
HAND_CODES = torch.tensor([1, -2, 3, 0], dtype=torch.int8).reshape(1, 4, 1, 1)
HAND_INPUT = torch.tensor([3.0, 1.0, 2.0, 0.0]).reshape(1, 4, 1, 1)
HAND_GEOMETRY = ConvGeometry((1, 1), (0, 0), (1, 1))


def _hand_program(step: float, adc_bits: int, mask: float = 1.0, dac_bits: int = 4,
                  offset: float = 0.0) -> CrossbarProgram:
    layer = _layer(4, 1, 1, HAND_CONFIG)
    return build_program(
        layer_cell_levels(HAND_CODES, layer), torch.tensor([[mask]]), layer, dac_bits=dac_bits,
        adc_step=torch.tensor([step, step]), adc_bits=adc_bits, adc_offset_lsb=offset)


def _hand(step: float, adc_bits: int, mask: float = 1.0, dac_bits: int = 4,
          offset: float = 0.0) -> float:
    program = _hand_program(step, adc_bits, mask, dac_bits, offset)
    return crossbar_conv2d(HAND_INPUT, program, HAND_GEOMETRY, implementation="reference").item()


def test_hand_pe_lossless_adc_gives_the_exact_dot_product():
    assert _hand(step=1.0, adc_bits=8) == 7.0  # 4*11 + 11 - 8*6


def test_hand_pe_adc_offset_below_half_an_lsb_changes_no_integer_sum():
    # Both partial sums are 11: an offset of 0.49 LSB reads 11.49 -> 11, of 0.51 -> 12.
    for offset in (0.49, -0.49):
        assert _hand(step=1.0, adc_bits=8, offset=offset) == 7.0
        assert _hand_program(step=1.0, adc_bits=8, offset=offset).lossless
    assert _hand(step=1.0, adc_bits=8, offset=0.51) == 12.0  # 4*12 + 12 - 48
    assert not _hand_program(step=1.0, adc_bits=8, offset=0.51).lossless


def test_trimmed_adc_offsets_leave_the_default_chip_exact(quantized_mobilenet, images32):
    # The default chip's sums are integers read at unit step: trimming each ADC's offset
    # to its fraction (below half an LSB) makes even the high level's offsets harmless.
    head = random_head(5, 1280)
    answers = {}
    for trimmed in (False, True):
        noise = NonIdealities(adc_offset_sigma=0.5, adc_offset_trimmed=trimmed, seed=3)
        engine = CrossbarEngine(quantized_mobilenet,
                                crossbar=CrossbarSettings(non_idealities=noise))
        engine.add_task(TaskState("t", quantized_mobilenet.config.shift_levels, head))
        answers[trimmed] = engine.features(images32, "t", "crossbar")
    ideal = CrossbarEngine(quantized_mobilenet)
    ideal.add_task(TaskState("t", quantized_mobilenet.config.shift_levels, head))
    assert torch.equal(answers[True], ideal.features(images32, "t", "ideal"))
    assert not torch.equal(answers[False], answers[True])  # some offsets exceed 0.5 LSB


def test_hand_pe_adc_rounds_half_to_even():
    # 11 / 2 = 5.5 reads as code 6 on both slices: 4*12 + 12 - 48
    assert _hand(step=2.0, adc_bits=8) == 12.0
    # 11 / 4 = 2.75 reads as code 3: 4*12 + 12 - 48
    assert _hand(step=4.0, adc_bits=8) == 12.0


def test_hand_pe_adc_clips_at_its_range():
    # a 3-bit ADC tops out at code 7: 4*7 + 7 - 48
    assert _hand(step=1.0, adc_bits=3) == -13.0


def test_hand_pe_column_at_half_yields_exactly_half_of_its_adc_output():
    for step, bits in ((1.0, 8), (2.0, 8), (1.0, 3)):
        assert _hand(step, bits, mask=0.5) == 0.5 * _hand(step, bits)
    assert _hand(2.0, 8, mask=0.0) == 0.0


def test_bit_serial_and_multi_bit_agree_when_the_adc_is_lossless():
    torch.manual_seed(0)
    layer = _layer(30, 7, 3, CrossbarConfig(), input_bits=8, signed=True)
    codes = torch.randint(-8, 8, (7, 30, 3, 3), dtype=torch.int8)
    levels = layer_cell_levels(codes, layer)
    values = shift_values(3)[torch.randint(0, 5, (layer.row_groups, 7))]
    x = torch.randint(-128, 128, (2, 30, 6, 6)).float()
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1))
    outs = []
    for dac_bits in (4, 1):
        step = full_scale_adc_step(layer, dac_bits=dac_bits, adc_bits=16)
        program = build_program(levels, values, layer, dac_bits=dac_bits, adc_step=step,
                                adc_bits=16)
        outs.append(crossbar_conv2d(x, program, geometry, implementation="reference"))
    weight = fold_effective_weight(codes, torch.ones(7), layer, values)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], F.conv2d(x, weight, padding=1))


def test_input_cycles_rebuild_signed_codes():
    codes = torch.arange(-128, 128).float()
    for dac_bits in (1, 2, 4, 8):
        chunks, weights = input_cycles(codes, 8, True, dac_bits)
        assert len(chunks) == 2 * math.ceil(8 / dac_bits)
        assert all(int(c.max()) < 2**dac_bits and int(c.min()) >= 0 for c in chunks)
        rebuilt = sum(w * c for c, w in zip(chunks, weights, strict=True))
        assert torch.equal(rebuilt, codes)


# -- compiled operator vs pure-torch reference --------------------------------------------

@st.composite
def operator_cases(draw: st.DrawFn) -> dict:
    kernel = draw(st.sampled_from([1, 3]))
    config = draw(chip_configs(kernel))
    signed = draw(st.booleans())
    input_bits = draw(st.sampled_from([4, 8]))
    return {
        "config": config,
        "cin": draw(st.integers(1, 24)),
        "cout": draw(st.integers(1, 12)),
        "kernel": kernel,
        "stride": draw(st.sampled_from([1, 2])),
        "signed": signed,
        "input_bits": input_bits,
        "dac_bits": draw(st.sampled_from([1, 2, 4])),
        "adc_bits": draw(st.integers(2, 12)),
        "float_levels": draw(st.booleans()),
        "read_sigma": draw(st.sampled_from([0.0, 0.3])),
        "offset": draw(st.sampled_from([0.0, 0.4, -1.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operator_cases())
def test_compiled_operator_equals_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    config, cin, cout, k = case["config"], case["cin"], case["cout"], case["kernel"]
    wb = config.weight_bits
    layer = _layer(cin, cout, k, config, weight_bits=wb, input_bits=case["input_bits"],
                   signed=case["signed"])
    codes = torch.randint(-(2 ** (wb - 1)), 2 ** (wb - 1), (cout, cin, k, k), generator=g,
                          dtype=torch.int8)
    levels = layer_cell_levels(codes, layer)
    if case["float_levels"]:  # programmed with variation: non-integer conductances
        levels = (levels + 0.2 * torch.randn(levels.shape, generator=g)).clamp(min=0)
    values = shift_values(3)[torch.randint(0, 5, (layer.row_groups, cout), generator=g)]
    full = full_scale_adc_step(layer, dac_bits=case["dac_bits"], adc_bits=case["adc_bits"])
    step = full * (0.1 + torch.rand(layer.slices, generator=g))
    program = build_program(levels, values, layer, dac_bits=case["dac_bits"], adc_step=step,
                            adc_bits=case["adc_bits"], adc_offset_lsb=case["offset"],
                            read_sigma=case["read_sigma"])
    low, high = ((-(2 ** (case["input_bits"] - 1)), 2 ** (case["input_bits"] - 1))
                 if case["signed"] else (0, 2 ** case["input_bits"]))
    x = torch.randint(low, high, (3, cin, 7, 6), generator=g).float()
    geometry = ConvGeometry((case["stride"],) * 2, (k // 2,) * 2, (1, 1))
    outs = []
    for implementation, chunk in (("reference", 1 << 23), ("compiled", 1 << 23),
                                  ("compiled", 1)):
        noise = torch.Generator().manual_seed(case["seed"])
        outs.append(crossbar_conv2d(x, program, geometry, implementation=implementation,
                                    generator=noise, max_chunk_elements=chunk))
    # float summation order differs between the two: bound its error by the terms summed
    # (cycles x read groups x slices); differential sums cancel, so the bound is on the
    # largest output rather than on each element
    terms = program.cycles * program.row_groups * program.slices
    largest_term = (float(x.abs().max()) * layer.rows_per_group
                    * (2**config.bits_per_cell - 1) * float(program.slice_weight[0]))
    scale = max(1.0, float(outs[0].abs().max()), largest_term) * terms * 1.2e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * scale)
    if not case["read_sigma"]:  # chunking draws noise in another order; otherwise identical
        torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-5 * scale)


# -- whole networks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18() -> CrossbarModel:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained=False)
    model = CrossbarModel(backbone, "resnet18", CrossbarConfig())
    model.calibrate(calibration_images(8, 32, seed=0))
    return model


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("dac_mode", ["multi_bit", "bit_serial"])
def test_lossless_crossbar_equals_ideal_bit_for_bit(backbone, dac_mode, request, images32):
    model = request.getfixturevalue("quantized_mobilenet" if backbone == "mobilenet_v2"
                                    else "resnet18")
    settings_ = CrossbarSettings(adc_bits=16, adc_range="full_scale", dac_mode=dac_mode)
    engine = CrossbarEngine(model, crossbar=settings_)
    head = random_head(5, 1280 if backbone == "mobilenet_v2" else 512)
    engine.add_task(random_task_state("masked", engine.mapping, head, pe_fraction=0.3, seed=4))
    engine.add_task(TaskState("plain", 3, head))
    for task in ("masked", "plain"):
        ideal = engine.forward(images32, task, "ideal")
        crossbar = engine.forward(images32, task, "crossbar")
        assert torch.equal(crossbar, ideal), task
    assert not torch.equal(engine.forward(images32, "masked"), engine.forward(images32, "plain"))


def _float_path_features(model: CrossbarModel, images: torch.Tensor,
                         task_codes: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    for name, layer in model.layers():
        if task_codes and name in task_codes:
            layer.effective_codes = task_codes[name]
        layer.effective_weight = layer.effective_weight  # force the float path
    try:
        with torch.no_grad():
            return model(images)
    finally:
        for _, layer in model.layers():
            layer.reset_effective_weight()


def test_ideal_code_path_matches_fake_quantized_float_path(quantized_mobilenet, images32):
    engine = CrossbarEngine(quantized_mobilenet)
    engine.add_task(TaskState("plain", 3, random_head(5, 1280)))
    engine.add_task(random_task_state("t", engine.mapping, random_head(5, 1280), seed=2))
    plain = engine.features(images32, "plain")
    torch.testing.assert_close(_float_path_features(engine.model, images32), plain,
                               rtol=1e-5, atol=1e-5)
    exact = engine.features(images32, "t")
    assert not engine.tasks["t"].digital
    floating = _float_path_features(engine.model, images32, engine.prepare("t").weights)
    # float products of mask fractions and scales differ from the code path's by an ulp,
    # which moves values that sit on an activation code boundary to the next code (and
    # on through the network): the features agree to well under a percent, while the
    # task itself moves them by far more
    assert float((floating - exact).norm() / exact.norm()) < 0.02
    assert float((plain - exact).norm() / exact.norm()) > 0.1


def test_calibrated_adc_with_enough_bits_is_lossless(quantized_mobilenet, images32):
    # bit-serial partial sums of a 72-row column of 2-bit cells stay below 2**8
    model = quantized_mobilenet
    saved = {n: (m.adc_range.clone(), model.adc_calibrated_bits) for n, m in model.layers()
             if m.on_crossbar}
    try:
        model.calibrate_adc(images32, adc_bits=8)
        engine = CrossbarEngine(model, crossbar=CrossbarSettings(adc_bits=8,
                                                                 dac_mode="bit_serial"))
        engine.add_task(TaskState("plain", 3, random_head(5, 1280)))
        assert torch.equal(engine.forward(images32, "plain", "crossbar"),
                           engine.forward(images32, "plain", "ideal"))
        lossy = CrossbarEngine(model, crossbar=CrossbarSettings(adc_bits=8,
                                                                dac_mode="multi_bit"))
        lossy.add_task(TaskState("plain", 3, random_head(5, 1280)))
        assert not torch.equal(lossy.forward(images32, "plain", "crossbar"),
                               lossy.forward(images32, "plain", "ideal"))
    finally:
        for name, layer in model.layers():
            if name in saved:
                layer.adc_range.copy_(saved[name][0])
                model.adc_calibrated_bits = saved[name][1]


def test_adc_ranges_must_match_the_emulated_adc(quantized_mobilenet):
    assert quantized_mobilenet.adc_calibrated
    with pytest.raises(ConfigError, match="calibrated for 5-bit"):
        CrossbarEngine(quantized_mobilenet, fidelity="crossbar",
                       crossbar=CrossbarSettings(adc_bits=7))
    with pytest.raises(ConfigError, match="fidelity must be one of"):
        CrossbarEngine(quantized_mobilenet, fidelity="exact")
    CrossbarEngine(quantized_mobilenet, fidelity="crossbar",
                   crossbar=CrossbarSettings(adc_bits=7, adc_range="full_scale"))


def test_operator_conversions_are_what_the_energy_model_counts(quantized_mobilenet):
    engine = CrossbarEngine(quantized_mobilenet)
    head = random_head(5, 1280)
    engine.add_task(random_task_state("t", engine.mapping, head, pe_fraction=0.2, seed=9))
    size = (32, 32)
    prepared = engine.activate("t", "crossbar")
    positions = engine.costs.output_positions(size)
    performed = sum(conversions(program, 1, positions[name])
                    for name, program in (prepared.programs or {}).items())
    counted = engine.ops_per_image("t", size).adc_conversions
    assert performed == counted
    masked = sum(int((p.column_values == 0).sum()) for p in (prepared.programs or {}).values())
    assert masked > 0  # the task switches columns off, and neither side converts them


# -- non-idealities ------------------------------------------------------------------------

def _noisy(model: CrossbarModel, **noise: float) -> CrossbarEngine:
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(
        non_idealities=NonIdealities(**noise)))
    head = random_head(5, 1280)
    engine.add_task(random_task_state("t", engine.mapping, head, pe_fraction=0.2, seed=1))
    return engine


def test_programming_noise_is_a_property_of_the_chip(quantized_mobilenet, images32):
    clean = _noisy(quantized_mobilenet).forward(images32, "t", "crossbar")
    chip = _noisy(quantized_mobilenet, programming_sigma=0.3, stuck_off_rate=0.01, seed=3)
    first = chip.forward(images32, "t", "crossbar")
    assert torch.equal(chip.forward(images32, "t", "crossbar"), first)  # same chip, same answer
    same_seed = _noisy(quantized_mobilenet, programming_sigma=0.3, stuck_off_rate=0.01, seed=3)
    assert torch.equal(same_seed.forward(images32, "t", "crossbar"), first)
    other = _noisy(quantized_mobilenet, programming_sigma=0.3, stuck_off_rate=0.01, seed=4)
    assert not torch.equal(other.forward(images32, "t", "crossbar"), first)
    assert not torch.equal(first, clean)
    assert torch.equal(chip.forward(images32, "t", "ideal"),
                       _noisy(quantized_mobilenet).forward(images32, "t", "ideal"))


def test_read_noise_is_drawn_per_read(quantized_mobilenet, images32):
    chip = _noisy(quantized_mobilenet, read_sigma=0.2, seed=1)
    assert not torch.equal(chip.forward(images32, "t", "crossbar"),
                           chip.forward(images32, "t", "crossbar"))


def test_stuck_cells_and_adc_offset(quantized_mobilenet):
    on = _noisy(quantized_mobilenet, stuck_on_rate=1.0)
    prepared = on.activate("t", "crossbar")
    name = next(iter(prepared.programs or {}))
    cells = on.programmer.backbone_cells(name)
    assert bool((cells == 3).all())
    offset = _noisy(quantized_mobilenet, adc_offset_sigma=0.5, seed=2)
    offsets = {p.adc_offset_lsb for p in (offset.activate("t", "crossbar").programs or {}).values()}
    assert len(offsets) > 10 and all(abs(o) < 5 for o in offsets)
    with pytest.raises(ConfigError, match="stuck_on_rate"):
        NonIdealities(stuck_on_rate=1.5)


def test_without_a_compiler_auto_falls_back_to_the_reference():
    from core.ops import crossbar as crossbar_ops
    from core.ops import extension

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extension, "compiler_available", lambda: False)
        extension.crossbar_extension.cache_clear()
        try:
            assert extension.crossbar_extension() is None
            assert crossbar_ops._select("auto") is crossbar_ops._reference_chunk
            with pytest.raises(ConfigError, match="install g\\+\\+ and ninja"):
                crossbar_ops._select("compiled")
        finally:
            extension.crossbar_extension.cache_clear()
    assert crossbar_ops._select("auto") is crossbar_ops._compiled_chunk


def test_each_operator_source_builds_under_its_own_name(tmp_path, monkeypatch):
    # Two checkouts of different operator versions share the extensions cache: a process
    # must never load the other version's library (it lacks or changes functions).
    from core.ops import extension

    name = extension.extension_name()
    assert name.startswith("xma2_crossbar_") and name == extension.extension_name()
    other = tmp_path / "crossbar_kernel.cpp"
    other.write_bytes(extension.KERNEL_SOURCE.read_bytes() + b"\n// another version\n")
    monkeypatch.setattr(extension, "KERNEL_SOURCE", other)
    assert extension.extension_name() != name


def test_two_checkouts_of_one_operator_source_build_apart(tmp_path, monkeypatch):
    # Sharing a build folder, each checkout's load would rewrite the build file with its own
    # source path and rebuild the other's library (a minute of every job's time).
    from core.ops import extension

    name = extension.extension_name()
    copy = tmp_path / "checkout" / "crossbar_kernel.cpp"
    copy.parent.mkdir()
    copy.write_bytes(extension.KERNEL_SOURCE.read_bytes())
    monkeypatch.setattr(extension, "KERNEL_SOURCE", copy)
    assert extension.extension_name() != name


def test_the_compiled_operator_is_built_with_openmp_so_its_loops_use_torchs_threads():
    # at::parallel_for is inline OpenMP: a build without it runs every loop on one thread
    # (the crossbar pass then gained nothing from a second core).
    from core.ops import extension
    from tests.conftest import compiled_operator

    module = compiled_operator()
    assert module.__name__ == extension.extension_name(parallel=True)
    assert extension.extension_name(parallel=False) != module.__name__


def test_the_operator_tests_fail_without_a_compiler_unless_told_to_skip(monkeypatch):
    from core.ops import extension
    from tests.conftest import ALLOW_NO_COMPILER, compiled_operator

    monkeypatch.setattr(extension, "compiler_available", lambda: False)
    extension.crossbar_extension.cache_clear()
    try:
        monkeypatch.delenv(ALLOW_NO_COMPILER, raising=False)
        with pytest.raises(pytest.fail.Exception, match="make setup"):
            compiled_operator()
        monkeypatch.setenv(ALLOW_NO_COMPILER, "1")
        with pytest.raises(pytest.skip.Exception, match="g\\+\\+ and ninja"):
            compiled_operator()
    finally:
        extension.crossbar_extension.cache_clear()
