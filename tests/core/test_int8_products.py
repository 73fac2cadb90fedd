"""Pointwise code products in int8 give the float products' bits."""

from __future__ import annotations

import pytest
import torch

from core.chip.config import CrossbarSettings, Fidelity, OperatorImplementation
from core.engine import CrossbarEngine
from core.nn import layers, periphery
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel
from core.nn.periphery import DigitalNorm
from core.ops import int8
from core.task_state import TaskState, random_head
from tests.conftest import compiled_operator
from tests.core.helpers import add_random_tasks


def test_int8_products_are_available_and_checked() -> None:
    assert int8.torch_int8_products()  # the torch this project pins has them, exact
    int8_ms, float_ms = int8.product_times(repeats=1)
    assert 0 < int8_ms < float("inf") and 0 < float_ms < float("inf")


def test_torch_int8_products_are_used_only_where_they_are_as_fast(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both products give the same bits, so the choice is speed alone: torch's int8 one
    only where it takes no longer than the float one (AVX2 CPUs: 19-45x longer)."""
    monkeypatch.setattr(int8, "block_kernel", lambda: None)
    for times, pays in (((48.3, 1.9), False), ((1.0, 1.9), True), ((1.9, 1.9), True)):
        monkeypatch.setattr(int8, "product_times", lambda t=times: t)
        int8.torch_int8_pays.cache_clear()
        try:
            assert int8.torch_int8_pays() is pays
            assert int8.int8_products() is pays
        finally:
            int8.torch_int8_pays.cache_clear()


def test_product_times_keep_the_fastest_run_after_a_warm_up() -> None:
    ticks = iter([0.0, 9.0,  9.0, 9.5,  10.0, 10.003, 11.0, 11.001,  12.0, 12.002, 13.0,
                  13.004])  # warm-up pair, then (int8, float) per run, in seconds
    int8_ms, float_ms = int8.product_times(repeats=2, clock=lambda: next(ticks))
    assert int8_ms == pytest.approx(2.0) and float_ms == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_a_code_product_in_int8_equals_the_float_one(shift: int) -> None:
    generator = torch.Generator().manual_seed(shift)
    rows = torch.randint(-128, 128, (37, 96), generator=generator).float()
    codes = torch.randint(-8, 8, (96, 45), generator=generator).float()
    matrix = codes / float(1 << shift)  # masks scale codes by powers of two
    packed = int8.int8_matrix(matrix)
    assert packed is not None and packed[1] == 1 / (1 << shift)
    product = int8.code_product(rows, matrix, rows.to(torch.int8))
    assert torch.equal(product, rows @ matrix)
    sums = int8.code_product(rows, matrix, rows.to(torch.int8), sums=True)
    assert sums.dtype == torch.int32
    assert torch.equal(sums.float() * packed[1], rows @ matrix)


def test_weights_beyond_int8_keep_the_float_product() -> None:
    rows = torch.randint(0, 16, (5, 8)).float()
    assert int8.int8_matrix(torch.full((8, 3), 200.0)) is None
    assert int8.int8_matrix(torch.full((8, 3), 1 / 512)) is None  # no k below 8 fits
    matrix = torch.full((8, 3), 200.0)
    assert torch.equal(int8.code_product(rows, matrix, rows.to(torch.int8)), rows @ matrix)
    codes = rows.to(torch.int8)  # as the norm writes them for an int8 layer
    assert torch.equal(int8.code_product(codes, matrix, codes), rows @ matrix)


def test_the_int8_weight_is_made_again_after_an_in_place_change() -> None:
    matrix = torch.ones(4, 4)
    first = int8.int8_matrix(matrix)
    matrix.mul_(0.5)
    second = int8.int8_matrix(matrix)
    assert first is not None and second is not None
    assert first[1] == 1 and second[1] == 0.5


@pytest.mark.parametrize("compiled_periphery,compiled_blocks,torch_int8",
                         [(True, True, True), (True, False, True), (False, True, True),
                          (True, False, False)])
def test_engine_answers_equal_the_reference_float_products(
        quantized_mobilenet: CrossbarModel, monkeypatch: pytest.MonkeyPatch,
        compiled_periphery: bool, compiled_blocks: bool, torch_int8: bool) -> None:
    """Single-task and mixed batches, with the int8 products (the default) and with the
    reference implementation's float products: the same logits, bit for bit; with the
    compiled periphery or torch's kernels between the layers, and with the compiled
    block product or torch's int8 product per block (and a shared pass at small maps),
    torch's taken here even on a CPU where it is slower than the float one; and without
    either (no VNNI, torch's slower), the float products of the code path."""
    monkeypatch.setattr(int8, "torch_int8_pays", lambda: torch_int8)
    if not compiled_blocks:
        monkeypatch.setattr(int8, "block_kernel", lambda: None)
        monkeypatch.setattr(layers, "block_kernel", lambda: None)
    if not compiled_periphery:
        monkeypatch.setattr(periphery, "fused_periphery", lambda: None)
    else:
        compiled_operator()  # fails without it (skips where a machine has no compiler)
        assert periphery.fused_periphery() is not None
    products: list[torch.Size] = []  # int8 products, by torch's kernel or the compiled one
    int_mm, run_blocks = torch._int_mm, int8._run_blocks

    def counted(a: torch.Tensor, b: torch.Tensor, **out: torch.Tensor) -> torch.Tensor:
        products.append(a.shape)
        return int_mm(a, b, **out)

    def counted_blocks(extension: object, rows: torch.Tensor, out: torch.Tensor,
                       bounds: list[tuple[int, int]], *args: object) -> None:
        products.extend(rows[lo:hi].shape for lo, hi in bounds)
        run_blocks(extension, rows, out, bounds, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "_int_mm", counted)
    monkeypatch.setattr(int8, "_run_blocks", counted_blocks)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = {}
    for implementation in (OperatorImplementation.AUTO, OperatorImplementation.REFERENCE):
        engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=4,
                                crossbar=CrossbarSettings(implementation=implementation))
        ids = add_random_tasks(engine, 3)
        engine.add_task(TaskState("plain", engine.mapping.config.shift_levels,
                                  random_head(5, 1280)))
        order = [[*ids, "plain"][i] for i in (0, 1, 0, 2, 3, 1, 2, 0)]
        inputs: set[torch.dtype] = set()
        hooks = [m.register_forward_pre_hook(
            lambda _m, args, seen=inputs: seen.add(args[0].dtype))
            for m in engine.model.modules() if isinstance(m, CrossbarConv2d | DigitalNorm)]
        try:
            answers[implementation] = (engine.forward(x, "t1", Fidelity.IDEAL),
                                       engine.forward_mixed(x, order))
        finally:
            for hook in hooks:
                hook.remove()
        # the norms take the int8 layers' int32 sums as they are and, compiled, hand
        # those layers int8 codes
        int8_path = implementation is OperatorImplementation.AUTO and (
            torch_int8 or int8.block_kernel() is not None)
        assert (torch.int8 in inputs) == (int8_path and compiled_periphery)
        assert (torch.int32 in inputs) == int8_path
        if int8_path:
            assert len(products) > 50  # every pointwise layer, per task in the mixed batch
            products.clear()
    assert not products  # the reference implementation multiplies floats
    single, mixed = answers[OperatorImplementation.AUTO]
    assert torch.equal(single, answers[OperatorImplementation.REFERENCE][0])
    for mine, reference in zip(mixed, answers[OperatorImplementation.REFERENCE][1], strict=True):
        assert torch.equal(mine, reference), float((mine - reference).abs().max())


def test_the_engine_settles_the_products_before_its_first_request(
        quantized_mobilenet: CrossbarModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing where torch's int8 product may be slow runs when the engine is built,
    once per process, not in the first request's time."""
    timings: list[int] = []

    def timed() -> tuple[float, float]:
        timings.append(1)
        return 2.0, 1.0

    monkeypatch.setattr(int8, "block_kernel", lambda: None)
    monkeypatch.setattr(int8, "product_times", timed)
    int8.torch_int8_pays.cache_clear()
    try:
        engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=2)
        assert timings == [1]
        engine.add_task(TaskState("plain", engine.mapping.config.shift_levels,
                                  random_head(5, 1280)))
        engine.forward(torch.zeros(2, 3, 32, 32), "plain", Fidelity.IDEAL)
        CrossbarEngine(quantized_mobilenet, max_prepared_tasks=2)
        assert timings == [1]
    finally:
        int8.torch_int8_pays.cache_clear()
