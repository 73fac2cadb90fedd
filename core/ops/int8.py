"""Integer code products in int8 with int32 sums: the same bits as the float products.

A pointwise layer multiplies integer input codes (4-bit unsigned or signed 8-bit) by a
code-unit weight (4-bit codes times the masks' powers of two). Every sum is an exact
integer, so with the weight as int8 codes of a power-of-two unit the product can run
in int8 and equal the float one bit for bit. Two kernels do it:

- torch's ``_int_mm`` (oneDNN), one call per product;
- the compiled operator's ``int8_blocks_product`` (AVX-512 VNNI, or AVX2 on CPUs
  without VNNI), one call for all the blocks of rows of a layer, each block with its
  own weight: a batch mixing tasks multiplies each task's few rows by that task's
  weight in one call, where oneDNN's fixed cost per call would take more than the
  arithmetic.

Each is used only after a check, once per process, that it equals the float product on
this build, and torch's only where the compiled one has no vector loops and torch's is
also no slower than the float product: on CPUs without VNNI it takes 19-45 times as
long (AVX2, one thread, ``bench/code_products.py``), where the compiled AVX2 loops take
about 0.5-1.2 times the float product's time; as all give the same bits the choice is
one of speed alone. The weights' int8 forms are
made once per weight tensor and kept while it lives unchanged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from core.ops.derived import derived
from core.ops.extension import crossbar_extension

log = logging.getLogger(__name__)

VNNI_LANES = 16
"""int32 sums per 512-bit register: packed weights pad their output channels to this."""
VNNI_TILE = 32
"""Output channels per tile of a packed weight (the last tile may have 16)."""


def int8_products() -> bool:
    """Whether code products run in int8 here: the compiled block product, or torch's
    where it is as fast as the float one (each checked once against the float product)."""
    return block_kernel() is not None or (torch_int8_products() and torch_int8_pays())


@functools.cache
def torch_int8_products() -> bool:
    """Whether this torch has the int8 matrix product with int32 sums and it equals the
    float product of the same integers on this build (checked once, odd shapes too)."""
    if not hasattr(torch, "_int_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    for rows, inner, cols in ((1, 16, 8), (12, 960, 37), (37, 24, 160)):
        a = torch.randint(-128, 128, (rows, inner), generator=generator, dtype=torch.int8)
        b = torch.randint(-127, 128, (inner, cols), generator=generator, dtype=torch.int8)
        try:
            sums = torch._int_mm(a, b)
        except RuntimeError:
            return False
        if not torch.equal(sums.float(), a.float() @ b.float()):
            log.warning("torch's int8 matrix product disagrees with the float one here: "
                        "code products stay float")
            return False
    return True


PAYING_SHAPES = ((1024, 384, 64), (4096, 96, 24), (256, 960, 160))
"""Rows, inner and output sizes timed by :func:`torch_int8_pays`: pointwise layers of a
batch of 16 at 64 px (4x4, 16x16 and 2x2 maps)."""


@functools.cache
def torch_int8_pays() -> bool:
    """Whether torch's int8 product takes no longer than the float product of the same
    codes here (timed once per process at :data:`PAYING_SHAPES`)."""
    int8_ms, float_ms = product_times()
    if int8_ms > float_ms:
        log.info("torch's int8 product is slower than the float one on this CPU (%.2f "
                 "against %.2f ms): code products stay float", int8_ms, float_ms)
        return False
    return True


def product_times(repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Milliseconds of torch's int8 product and of the float product over
    :data:`PAYING_SHAPES` (the fastest of ``repeats`` runs of each, after one warm-up)."""
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for rows, inner, cols in PAYING_SHAPES:
        a = torch.randint(0, 16, (rows, inner), generator=generator, dtype=torch.int8)
        b = torch.randint(-8, 8, (inner, cols), generator=generator, dtype=torch.int8)
        pairs.append((a, b, a.float(), b.float()))
    best = [float("inf"), float("inf")]
    for run in range(repeats + 1):
        for kind in (0, 1):  # torch's int8 product, then the float one
            started = clock()
            for a, b, x, y in pairs:
                if kind == 0:
                    torch._int_mm(a, b)
                else:
                    torch.mm(x, y)
            elapsed_ms = (clock() - started) * 1e3
            if run:  # the first run warms up both kernels
                best[kind] = min(best[kind], elapsed_ms)
    return best[0], best[1]


@functools.cache
def block_kernel() -> ModuleType | None:
    """The compiled block product, where it has vector loops (AVX-512 VNNI or AVX2; its
    plain-loop build elsewhere is exact but slower than oneDNN) and equals the float
    product here on blocks of odd sizes, signed and unsigned rows; None otherwise."""
    extension = crossbar_extension()
    if extension is None or not extension.int8_vectorized():
        return None
    generator = torch.Generator().manual_seed(0)
    for inner, cols, signed, extreme in ((16, 8, False, False), (13, 37, True, False),
                                         (960, 160, False, False), (24, 1280, True, False),
                                         (40, 24, False, True), (40, 24, True, True)):
        rows = torch.randint(-128 if signed else 0, 128, (23, inner), generator=generator,
                             dtype=torch.int8)
        weights = [torch.randint(-127, 128, (inner, cols), generator=generator,
                                 dtype=torch.int8) for _ in range(3)]
        if extreme:  # the largest pairs of products (the AVX2 loops sum two in int16)
            rows.fill_(-128 if signed else 127)
            weights = [torch.where(w < 0, -127, 127).to(torch.int8) for w in weights]
        bounds = [(0, 5), (5, 6), (6, 23)]
        out = torch.empty(23, cols, dtype=torch.int32)
        _run_blocks(extension, rows, out, bounds, packed_forms(weights), signed)
        expected = torch.cat([rows[lo:hi].float() @ w.float()
                              for (lo, hi), w in zip(bounds, weights, strict=True)])
        if not torch.equal(out.float(), expected):
            log.warning("the compiled int8 block product disagrees with the float one "
                        "here: code products use torch's")
            return None
    return extension


def int8_matrix(matrix: Tensor, unit: float | None = None) -> tuple[Tensor, float] | None:
    """``matrix`` (code units: integer codes times powers of two) as int8 codes of
    ``unit`` (a power of two; None: the largest that makes them integral), with that
    unit; None where the codes are not integral or do not fit int8. Kept while the
    tensor lives unchanged."""
    return derived(matrix, ("int8", unit), lambda m: _as_int8(m, unit))


def _as_int8(matrix: Tensor, unit: float | None) -> tuple[Tensor, float] | None:
    if unit is None:
        unit = next((1.0 / (1 << k) for k in range(8) if _integral(matrix * float(1 << k))),
                    None)
    if unit is None:
        return None
    codes = matrix / unit  # a power of two: exact
    if _integral(codes) and (codes.numel() == 0 or float(codes.abs().max()) <= 127):
        return codes.to(torch.int8), unit
    return None


def _integral(values: Tensor) -> bool:
    return bool((values == values.round()).all())


def shared_int8(matrices: list[Tensor]) -> tuple[list[Tensor], float] | None:
    """The matrices as int8 codes of one common unit (the finest of theirs), so that
    their products' int32 sums can share one tensor; None where one does not fit."""
    units = [int8_matrix(m) for m in matrices]
    if not matrices or any(u is None for u in units):
        return None
    unit = min(u[1] for u in units if u is not None)
    packed = [u if u is not None and u[1] == unit else int8_matrix(m, unit)
              for m, u in zip(matrices, units, strict=True)]
    if any(p is None for p in packed):
        return None
    return [p[0] for p in packed if p is not None], unit


def vnni_matrix(weight: Tensor) -> tuple[Tensor, Tensor]:
    """An int8 ``[Cin, Cout]`` weight as the block product reads it, and ``128 *`` each
    column's sum (what offsetting signed rows by 128 adds). Packed: Cout rounded up to
    :data:`VNNI_LANES` and cut into tiles of :data:`VNNI_TILE` output channels, one after
    the other, each ``[ceil(Cin / 4), width, 4]`` (four consecutive input channels of one
    output channel side by side, zeros in the padding), so that a tile is read in order.
    Kept while the tensor lives unchanged."""
    return derived(weight, "vnni", _packed)


def _packed(weight: Tensor) -> tuple[Tensor, Tensor]:
    inner, cols = weight.shape
    quads, padded = -(-inner // 4), -(-cols // VNNI_LANES) * VNNI_LANES
    grid = weight.new_zeros(quads * 4, padded)
    grid[:inner, :cols] = weight
    packed = torch.cat([grid[:, start : start + VNNI_TILE].reshape(quads, 4, -1)
                        .permute(0, 2, 1).flatten() for start in range(0, padded, VNNI_TILE)])
    return packed, weight.sum(0, dtype=torch.int32).mul_(128)


def _run_blocks(extension: ModuleType, rows: Tensor, out: Tensor,
                bounds: list[tuple[int, int]], packed: tuple[list[Tensor], list[Tensor]],
                signed: bool) -> None:
    extension.int8_blocks_product(rows, out, [lo for lo, _ in bounds],
                                  [hi for _, hi in bounds], packed[0], packed[1], signed)


def block_products(rows: Tensor, out: Tensor, bounds: list[tuple[int, int]],
                   weights: list[Tensor], *, signed: bool = True,
                   packed: tuple[list[Tensor], list[Tensor]] | None = None) -> None:
    """``out[lo:hi] = rows[lo:hi] @ weight`` for every block ``(lo, hi)`` and its int8
    weight, int32 sums (``signed``: False where every row code is >= 0, which spares the
    offset). One compiled call where :func:`block_kernel` runs, else one ``_int_mm`` per
    block. ``packed``: the weights' :func:`vnni_matrix` forms (tiles, column sums), where
    the caller keeps them (a lookup per weight and call otherwise)."""
    extension = block_kernel()
    if extension is not None:
        _run_blocks(extension, rows, out, bounds,
                    packed if packed is not None else packed_forms(weights), signed)
        return
    for (lo, hi), weight in zip(bounds, weights, strict=True):
        torch._int_mm(rows[lo:hi], weight, out=out[lo:hi])


def packed_forms(weights: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The weights' :func:`vnni_matrix` forms as :func:`block_products` takes them."""
    forms = [vnni_matrix(w) for w in weights]
    return [p for p, _ in forms], [c for _, c in forms]


def code_product(rows: Tensor, matrix: Tensor, int8_rows: Tensor | None, *,
                 sums: bool = False, signed: bool = True) -> Tensor:
    """``rows @ matrix``: integer input codes times a code-unit weight. With the rows also
    as int8 (``int8_rows``) and a weight that fits int8, one int8 product: its int32
    sums are exact, as the float product's are, so both give the same bits, and it
    reads a quarter of the weight's bytes (what costs at small maps). ``sums``: return
    those int32 sums as they are (units of ``int8_matrix(matrix)[1]``; the norm after
    the layer scales them in its own pass) instead of float code units; ``signed`` as
    for :func:`block_products`."""
    packed = None if int8_rows is None else int8_matrix(matrix)
    if packed is None:
        if rows.dtype != matrix.dtype:  # codes the norm wrote as int8
            rows = rows.to(matrix.dtype)
        return torch.mm(rows, matrix)
    assert int8_rows is not None
    product = int8_rows.new_empty(int8_rows.shape[0], matrix.shape[1], dtype=torch.int32)
    block_products(int8_rows, product, [(0, int8_rows.shape[0])], [packed[0]], signed=signed)
    if sums:
        return product
    result = product.to(torch.float32)
    return result.mul_(packed[1]) if packed[1] != 1 else result
