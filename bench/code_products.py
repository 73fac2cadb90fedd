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
  sums, as the engine's default path does).

    python bench/code_products.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def _ways(codes: torch.Tensor, weight: torch.Tensor, codes8: torch.Tensor,
          weight8: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {
        "float": lambda: codes @ weight,
        "int8, converting": lambda: torch._int_mm(codes.to(torch.int8), weight8).to(
            torch.float32).mul_(0.125),
        "int8": lambda: torch._int_mm(codes8, weight8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
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
        ways = _ways(codes, weight, codes8, weight8)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for fn in ways.values():
            _microseconds(fn, 3)  # warm
        for _ in range(args.repeats):
            for name, fn in ways.items():
                times[name].append(_microseconds(fn, args.calls))
        medians = {name: statistics.median(t) for name, t in times.items()}
        row = {"pixels": pixels, "cin": cin, "cout": cout,
               **{f"{name}_us": round(us, 1) for name, us in medians.items()},
               "float_over_int8_converting": round(medians["float"]
                                                   / medians["int8, converting"], 2),
               "float_over_int8": round(medians["float"] / medians["int8"], 2)}
        rows_out.append(row)
        print(f"{pixels:6d} x {cin:4d} -> {cout:5d}: float {row['float_us']:8.1f} us, "
              f"int8 converting {row['int8, converting_us']:8.1f} us "
              f"({row['float_over_int8_converting']}x), int8 {row['int8_us']:8.1f} us "
              f"({row['float_over_int8']}x)")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python bench/code_products.py", "threads": 1,
            "torch": torch.__version__, "calls": args.calls, "repeats": args.repeats,
            "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
