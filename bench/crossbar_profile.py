"""Where crossbar fidelity's time goes on a lossy periphery, by phase of the operator.

Runs MobileNetV2 in crossbar fidelity on the paper's periphery (:data:`core.chip.config.PAPER_CHIP`,
ADC calibrated as ``bench/engine.py --crossbar`` does; ``--chip shipped``: the shipped
backbone's own chip and ADC ranges), captures every crossbar layer's
input codes and program, then times each phase of the operator on them alone (best of
``--repeats``, one thread by default), besides the whole forward pass:

    python bench/crossbar_profile.py [--size 64] [--batch 16] [--dac-mode multi_bit]

Phases: stacking the input cycles (``_stack_cycles``), the grouped convolution over cell
levels, the ADC and shift-add pass (the compiled chunk less its convolution), and the
operator's Python glue (the whole call less those); where the tree has the fused
matrix-product path, the call itself. Runs on any tree that has ``_stack_cycles`` and
``_compiled_chunk`` (put the tree first on PYTHONPATH), so two trees compare phase by phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import core.nn.layers as layers_module
import core.ops.crossbar as ops
from core.ops.crossbar import ConvGeometry, CrossbarProgram

Call = tuple[Tensor, CrossbarProgram, ConvGeometry, dict[str, object]]


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def _operator(operator: Callable[..., Tensor], call: Call) -> Callable[[], Tensor]:
    codes, program, geometry, kw = call
    return lambda: operator(codes, program, geometry, **kw)


def _unfused_phases(call: Call, repeats: int) -> tuple[float, float, float]:
    """Stacking, grouped convolution and ADC pass of one layer's compiled operator (ms)."""
    codes, program, geometry, _ = call
    skip = program.zero_reads_zero
    stacked, weights = ops._stack_cycles(codes, program, True, skip)
    out = torch.zeros(codes.shape[0], program.out_channels,
                      *geometry.output_size(codes.shape[2], codes.shape[3],
                                            program.kernel_size))
    stack = _best_ms(lambda: ops._stack_cycles(codes, program, True, skip), repeats)
    conv = _best_ms(lambda: F.conv2d(stacked, program.weight, None, geometry.stride,
                                     geometry.padding, geometry.dilation,
                                     program.row_groups), repeats)
    chunk = _best_ms(lambda: ops._compiled_chunk(stacked, program, geometry, weights, None,
                                                 out.zero_()), repeats)
    return stack, conv, max(0.0, chunk - conv)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--dac-mode", choices=("multi_bit", "bit_serial"), default="multi_bit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chip", choices=("paper", "shipped"), default="paper")
    args = parser.parse_args()

    from core.backbones.shipped import load_backbone
    from core.chip.config import PAPER_CHIP, CrossbarSettings
    from core.engine import CrossbarEngine
    from core.nn.calibration import calibration_images
    from core.task_state import random_head, random_task_state

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_backbone(None)
    if args.chip == "paper":
        model = model.with_chip(**PAPER_CHIP)
        model.calibrate_adc(calibration_images(args.calibration_images, 64, seed=0))
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(dac_mode=args.dac_mode,
                                                             implementation="compiled"))
    engine.add_task(random_task_state("task-a", engine.mapping, random_head(1000, 1280),
                                      seed=1))
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed))

    def forward() -> Tensor:
        return engine.forward(x, "task-a", "crossbar")

    forward()
    calls: list[Call] = []
    original = ops.crossbar_conv2d

    def capture(codes: Tensor, program: CrossbarProgram, geometry: ConvGeometry,
                **kw: object) -> Tensor:
        calls.append((codes.clone(), program, geometry, kw))
        return original(codes, program, geometry, **kw)  # type: ignore[arg-type]

    layers_module.crossbar_conv2d = capture  # type: ignore[assignment]
    try:
        forward()
    finally:
        layers_module.crossbar_conv2d = original
    whole = _best_ms(forward, args.repeats)

    fused = hasattr(ops, "_matmul_applies")
    phases = {"operator calls": 0.0, "fused operator calls (matrix-product path)": 0.0,
              "stack input cycles": 0.0, "grouped convolution": 0.0,
              "ADC and shift-add pass": 0.0}
    unfused_calls = 0.0
    for call in calls:
        program = call[1]
        call_ms = _best_ms(_operator(original, call), args.repeats)
        phases["operator calls"] += call_ms
        if fused and ops._matmul_applies(program):
            phases["fused operator calls (matrix-product path)"] += call_ms
            continue
        unfused_calls += call_ms
        stack, conv, adc = _unfused_phases(call, args.repeats)
        phases["stack input cycles"] += stack
        phases["grouped convolution"] += conv
        phases["ADC and shift-add pass"] += adc
    phases["operator glue (Python, output, chunking)"] = max(
        0.0, unfused_calls - phases["stack input cycles"] - phases["grouped convolution"]
        - phases["ADC and shift-add pass"])
    result = {
        "command": "python bench/crossbar_profile.py " + " ".join(sys.argv[1:]),
        "chip": model.config.describe(), "dac_mode": args.dac_mode, "batch": args.batch,
        "size": args.size, "threads": args.threads, "repeats": args.repeats, "seed": args.seed,
        "crossbar_layers": len(calls), "forward_ms": round(whole, 1),
        "operator_phases_ms": {k: round(v, 1) for k, v in phases.items()},
        "rest_of_forward_ms": round(whole - phases["operator calls"], 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
