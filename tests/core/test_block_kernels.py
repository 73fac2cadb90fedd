"""The compiled kernels that serve a mixed batch's blocks in one call equal torch's
products and convolutions, block by block, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.chip.config import Fidelity
from core.engine import CrossbarEngine
from core.nn import layers
from core.nn.model import CrossbarModel
from core.ops import int8
from core.ops.extension import KERNEL_SOURCE
from tests.conftest import compiled_operator
from tests.core.helpers import add_random_tasks


def _blocks(rows: int, sizes: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    assert start == rows
    return bounds


def _check_int8_blocks(extension: object, inner: int, cols: int, sizes: list[int],
                       signed: bool, seed: int, *, extreme: bool = False) -> None:
    """``extreme``: every code at the end of its range (-128 signed, 127 unsigned) and
    weights of +-127, where a pair of products is largest (what an int16 sum of two must
    hold in the AVX2 kernel)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(-128 if signed else 0, 128, (sum(sizes), inner), generator=generator,
                         dtype=torch.int8)
    weights = [torch.randint(-127, 128, (inner, cols), generator=generator, dtype=torch.int8)
               for _ in sizes]
    if extreme:
        rows.fill_(-128 if signed else 127)
        weights = [torch.where(w < 0, -127, 127).to(torch.int8) for w in weights]
    bounds = _blocks(rows.shape[0], sizes)
    out = torch.full((rows.shape[0], cols), -7, dtype=torch.int32)
    packed = [int8.vnni_matrix(w) for w in weights]
    extension.int8_blocks_product(rows, out, [lo for lo, _ in bounds],  # type: ignore[attr-defined]
                                  [hi for _, hi in bounds], [p for p, _ in packed],
                                  [c for _, c in packed], signed)
    expected = torch.cat([rows[lo:hi].double() @ w.double()
                          for (lo, hi), w in zip(bounds, weights, strict=True)])
    assert torch.equal(out.double(), expected)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("inner,cols", [(16, 96), (13, 37), (960, 160), (24, 16), (3, 1280),
                                        (96, 24), (320, 48)])
def test_int8_block_product_equals_the_product_of_each_block(
        inner: int, cols: int, signed: bool) -> None:
    """Odd input depths (a partial last group of four), output widths off the 16- and
    32-channel tiles, blocks of 0 to 70 rows (across a 64-row work item), signed rows with
    the offset taken back and unsigned rows as they are."""
    extension = compiled_operator()
    _check_int8_blocks(extension, inner, cols, [5, 0, 1, 70, 4, 3, 2], signed, inner + cols)
    _check_int8_blocks(extension, inner, cols, [3, 9], signed, inner, extreme=True)


def test_int8_block_product_refuses_a_weight_packed_for_another_shape() -> None:
    extension = compiled_operator()
    rows = torch.zeros(4, 16, dtype=torch.int8)
    packed, correction = int8.vnni_matrix(torch.zeros(16, 32, dtype=torch.int8))
    out = torch.empty(4, 48, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="packed weight"):
        extension.int8_blocks_product(rows, out, [0], [4], [packed], [correction], False)
    with pytest.raises(RuntimeError, match="block out of range"):
        extension.int8_blocks_product(rows, torch.empty(4, 32, dtype=torch.int32), [0], [5],
                                      [packed], [correction], False)


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(next(line for line in text.splitlines() if line.startswith("flags"))
               .split(":", 1)[1].split())


def test_the_block_kernel_is_used_where_it_has_vector_loops() -> None:
    """The operator is built for this CPU (``-march=native``): VNNI where it has AVX-512
    VNNI, the AVX2 loops where it has AVX2, and code products take the kernel there."""
    extension = compiled_operator()
    flags = _cpu_flags()
    vnni = {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    assert extension.int8_vnni() == vnni
    assert extension.int8_vectorized() == (vnni or "avx2" in flags)
    assert (int8.block_kernel() is not None) == extension.int8_vectorized()
    if extension.int8_vectorized():
        assert int8.int8_products()


def test_block_products_without_the_kernel_use_torch() -> None:
    """The fallback where the compiled kernel is not used: one ``_int_mm`` per block."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 16, (40, 32), generator=generator, dtype=torch.int8)
    weights = [torch.randint(-8, 8, (32, 24), generator=generator, dtype=torch.int8)
               for _ in range(3)]
    bounds = _blocks(40, [17, 3, 20])
    outputs = []
    for kernel in (int8.block_kernel, lambda: None):
        out = torch.empty(40, 24, dtype=torch.int32)
        original = int8.block_kernel
        int8.block_kernel = kernel  # type: ignore[assignment]
        try:
            int8.block_products(rows, out, bounds, weights, signed=False)
        finally:
            int8.block_kernel = original  # type: ignore[assignment]
        outputs.append(out)
    expected = torch.cat([rows[lo:hi].float() @ w.float()
                          for (lo, hi), w in zip(bounds, weights, strict=True)])
    for out in outputs:
        assert torch.equal(out.float(), expected)


@pytest.mark.parametrize("cout", [8, 16, 32, 24, 48, 64, 80])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 1), (1, 1, 0), (3, 2, 0)])
def test_blocks_conv2d_equals_the_convolution_of_each_block(
        cout: int, kernel: int, stride: int, padding: int) -> None:
    """Every vector width (AVX-512: 16 to 64 in 16s; AVX2: 8 to 32 in 8s, 48 and 64)
    and the plain loops (the others; 80 everywhere), edge pixels with taps outside the
    image, code-unit weights (codes times powers of two)."""
    extension = compiled_operator()
    generator = torch.Generator().manual_seed(cout + kernel + stride)
    x = torch.randint(-128, 128, (9, 3, 13, 17), generator=generator).float()
    x = x.contiguous(memory_format=torch.channels_last)
    sizes = [2, 0, 4, 1, 2]
    weights = [torch.randint(-8, 8, (cout, 3, kernel, kernel), generator=generator).float()
               / (1 << i) for i in range(len(sizes))]
    bounds = _blocks(9, sizes)
    expected = torch.cat([F.conv2d(x[lo:hi], w, None, stride, padding)
                          for (lo, hi), w in zip(bounds, weights, strict=True)])
    out = torch.empty(expected.shape).contiguous(memory_format=torch.channels_last)
    extension.blocks_conv2d(x, out, [lo for lo, _ in bounds], [hi for _, hi in bounds],
                            [w.permute(2, 3, 1, 0).contiguous() for w in weights], stride,
                            padding)
    assert torch.equal(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("march,vectorized", [("x86-64-v2", False), ("x86-64-v3", True)])
def test_the_kernels_other_builds_equal_the_native_one(tmp_path: Path, march: str,
                                                       vectorized: bool) -> None:
    """The builds for machines without AVX-512 (the same source for an older CPU level):
    plain loops without AVX2 (x86-64-v2), the AVX2 loops with it (x86-64-v3, which a
    machine with AVX-512 would not run otherwise) give the same int8 products and
    convolutions (about a minute each to compile)."""
    from torch.utils.cpp_extension import load

    assert "avx2" in _cpu_flags(), "the x86-64-v3 build runs only on a CPU with AVX2"
    compiled_operator()
    build = load(name=f"xma2_crossbar_{march.replace('-', '_')}", sources=[str(KERNEL_SOURCE)],
                 extra_cflags=["-O2", f"-march={march}", "-ffp-contract=off"],
                 build_directory=str(tmp_path), verbose=False)
    assert not build.int8_vnni()
    assert build.int8_vectorized() == build.blocks_conv2d_vectorized() == vectorized
    for signed in (False, True):
        _check_int8_blocks(build, 13, 37, [5, 0, 70, 3], signed, 0)
        _check_int8_blocks(build, 96, 48, [4, 8], signed, 1)
        _check_int8_blocks(build, 24, 1280, [2, 66], signed, 2, extreme=True)
    x = torch.randint(-128, 128, (3, 3, 19, 21)).float().contiguous(
        memory_format=torch.channels_last)
    for cout in (32, 24, 64, 40):  # 40: no vector width, plain loops in every build
        weight = torch.randint(-8, 8, (cout, 3, 3, 3)).float() / 4
        out = torch.empty(3, cout, 10, 11).contiguous(memory_format=torch.channels_last)
        build.blocks_conv2d(x, out, [0, 1], [1, 3], [weight.permute(2, 3, 1, 0).contiguous()] * 2,
                            2, 1)
        assert torch.equal(out, F.conv2d(x, weight, None, 2, 1))


def test_the_stem_takes_the_compiled_blocks_only_where_they_are_vectorized(
        quantized_mobilenet: CrossbarModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built without AVX-512 or AVX2, ``blocks_conv2d`` runs plain loops (5.0 against
    oneDNN's 1.1 ms for a batch's stem): the stem then takes oneDNN, per block, with the
    same bits, in single-task and mixed batches."""
    extension = compiled_operator()
    assert extension.blocks_conv2d_vectorized() == bool({"avx512f", "avx2"} & _cpu_flags())
    calls: list[int] = []

    class Reporting:
        def __init__(self, vectorized: bool) -> None:
            self.vectorized = vectorized

        def __getattr__(self, name: str) -> object:
            return getattr(extension, name)

        def blocks_conv2d_vectorized(self) -> bool:
            return self.vectorized

        def blocks_conv2d(self, *args: object) -> None:
            calls.append(1)
            extension.blocks_conv2d(*args)

    engine = CrossbarEngine(quantized_mobilenet, max_prepared_tasks=4)
    ids = add_random_tasks(engine, 3)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = []
    for vectorized in (True, False):
        monkeypatch.setattr(layers, "crossbar_extension",
                            lambda v=vectorized: Reporting(v))
        calls.clear()
        answers.append((engine.forward(x, ids[0], Fidelity.IDEAL),
                        engine.forward_mixed(x, [ids[i] for i in (0, 1, 1, 2, 0, 2)])))
        assert bool(calls) == vectorized
    (single, mixed), (single_onednn, mixed_onednn) = answers
    assert torch.equal(single, single_onednn)
    for mine, theirs in zip(mixed, mixed_onednn, strict=True):
        assert torch.equal(mine, theirs)
