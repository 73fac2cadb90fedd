"""The pointwise layers' code products: float32 against int8 with int32 sums, one thread.

A pointwise layer of the chip multiplies integer input codes ``[pixels, Cin]`` by its
code-unit weight ``[Cin, Cout]`` (codes times powers of two). Both products below give the
same bits (every sum is an exact integer); the int8 one reads a quarter of the weight's
bytes. Shapes are MobileNetV2's 1x1 layers for a batch of 16 64x64 images (pixels =
16 x the layer's map), plus one task's block of a mixed batch at 2x2 maps. Three ways,
alternating, median of ``--repeats`` rounds of ``--calls`` calls each:

- ``float``: ``torch.mm`` of float codes (the reference implementation);
- ``int8, converting``: codes converted to int8, the product, its sums converted back
  and scaled (a layer whose neighbours hand it floats);
- ``int8``: the product alone (a layer whose norm writes int8 codes and takes the int32
  sums), torch's ``_int_mm``;
- ``compiled``: the same with the compiled block product (AVX-512 VNNI or AVX2), the engine's
  default where it runs.

``--blocks`` instead splits each batch of 16 images into the blocks of a mixed batch
(the Zipf draw of ``bench/engine.py --mixed``: 5, 4, 2, 2, 1, 1, 1 images of 7 tasks),
each block with its own weight, and times ``_int_mm`` per block against the compiled
product's one call, and both on the whole batch with one weight (a single-task batch).

    python bench/code_products.py [--blocks] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.ops.int8 import block_kernel, vnni_matrix

SHAPES = ((16384, 32, 16), (16384, 16, 96), (4096, 24, 144), (4096, 144, 24),
          (1024, 32, 192), (1024, 192, 32), (256, 64, 384), (256, 384, 64),
          (256, 96, 576), (64, 576, 160), (64, 160, 960), (64, 960, 160),
          (64, 320, 1280), (12, 960, 300))
"""(pixels, Cin, Cout): the network's 1x1 layers at 32x32 down to 2x2 maps, and one task's
three images at 2x2 against the channels it changed in a mixed batch."""


def _microseconds(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - started) / calls


MIXED_BLOCKS = (5, 4, 2, 2, 1, 1, 1)
"""Images per task of the mixed bench's batch of 16 (bench/engine.py --mixed, seed 0)."""


def _ways(codes: torch.Tensor, weight: torch.Tensor, codes8: torch.Tensor,
          weight8: torch.Tensor) -> dict[str, Callable[[], object]]:
    ways: dict[str, Callable[[], object]] = {
        "float": lambda: codes @ weight,
        "int8, converting": lambda: torch._int_mm(codes.to(torch.int8), weight8).to(
            torch.float32).mul_(0.125),
        "int8": lambda: torch._int_mm(codes8, weight8),
    }
    kernel = block_kernel()
    if kernel is not None:
        packed, correction = vnni_matrix(weight8)
        out = codes8.new_empty(codes8.shape[0], weight8.shape[1], dtype=torch.int32)
        ways["compiled"] = lambda: kernel.int8_blocks_product(
            codes8, out, [0], [codes8.shape[0]], [packed], [correction], False)
    return ways


def _block_ways(codes8: torch.Tensor, weights8: list[torch.Tensor]
                ) -> dict[str, Callable[[], object]]:
    """One batch as the mixed bench's blocks (each its own weight), and as one block."""
    per_image = codes8.shape[0] // sum(MIXED_BLOCKS)
    bounds, start = [], 0
    for images in MIXED_BLOCKS:
        bounds.append((start * per_image, (start + images) * per_image))
        start += images
    out = codes8.new_empty(codes8.shape[0], weights8[0].shape[1], dtype=torch.int32)

    def per_block() -> None:
        for (lo, hi), w in zip(bounds, weights8, strict=True):
            torch._int_mm(codes8[lo:hi], w, out=out[lo:hi])

    ways: dict[str, Callable[[], object]] = {
        "int8, one batch": lambda: torch._int_mm(codes8, weights8[0], out=out),
        "int8, per block": per_block}
    kernel = block_kernel()
    if kernel is not None:
        packed = [vnni_matrix(w) for w in weights8]
        starts, stops = [lo for lo, _ in bounds], [hi for _, hi in bounds]
        ways["compiled, one batch"] = lambda: kernel.int8_blocks_product(
            codes8, out, [0], [codes8.shape[0]], [packed[0][0]], [packed[0][1]], False)
        ways["compiled, blocks"] = lambda: kernel.int8_blocks_product(
            codes8, out, starts, stops, [p for p, _ in packed], [c for _, c in packed],
            False)
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", action="store_true",
                        help="a mixed batch's blocks: per-block products against one call")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for pixels, cin, cout in SHAPES:
        codes = torch.randint(0, 16, (pixels, cin), generator=generator).float()
        weight = torch.randint(-8, 8, (cin, cout), generator=generator).float() / 8
        codes8, weight8 = codes.to(torch.int8), (weight * 8).to(torch.int8)
        assert torch.equal(torch._int_mm(codes8, weight8).float() / 8, codes @ weight)
        if args.blocks:
            if pixels % sum(MIXED_BLOCKS):
                continue  # not a batch of 16 images
            weights8 = [weight8, *(torch.randint(-64, 64, (cin, cout), generator=generator,
                                                 dtype=torch.int8)
                                   for _ in MIXED_BLOCKS[1:])]
            ways = _block_ways(codes8, weights8)
        else:
            ways = _ways(codes, weight, codes8, weight8)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for fn in ways.values():
            _microseconds(fn, 3)  # warm
        for _ in range(args.repeats):
            for name, fn in ways.items():
                times[name].append(_microseconds(fn, args.calls))
        medians = {name: statistics.median(t) for name, t in times.items()}
        row = {"pixels": pixels, "cin": cin, "cout": cout,
               **{f"{name}_us": round(us, 1) for name, us in medians.items()}}
        rows_out.append(row)
        print(f"{pixels:6d} x {cin:4d} -> {cout:5d}: " + ", ".join(
            f"{name} {us:8.1f} us" for name, us in medians.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python bench/code_products.py" + (" --blocks" if args.blocks else ""),
            "threads": 1, "torch": torch.__version__, "calls": args.calls,
            "repeats": args.repeats, "blocks": list(MIXED_BLOCKS) if args.blocks else None,
            "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
