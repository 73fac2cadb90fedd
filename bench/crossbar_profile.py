"""Where crossbar fidelity's time goes on a lossy periphery, by phase of the operator.

Runs MobileNetV2 in crossbar fidelity on the paper's periphery (:data:`core.config.PAPER_CHIP`,
ADC calibrated as ``bench/engine.py --crossbar`` does), captures every crossbar layer's
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


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--dac-mode", choices=("multi_bit", "bit_serial"), default="multi_bit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import core.layers as layers_module
    import core.ops.crossbar as ops
    from core.backbones.shipped import load_backbone
    from core.calibration import calibration_images
    from core.config import PAPER_CHIP, CrossbarSettings
    from core.engine import CrossbarEngine
    from core.task_state import random_head, random_task_state

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_backbone(None).with_chip(**PAPER_CHIP)
    model.calibrate_adc(calibration_images(args.calibration_images, 64, seed=0))
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(dac_mode=args.dac_mode,
                                                             implementation="compiled"))
    engine.add_task(random_task_state("task-a", engine.mapping, random_head(1000, 1280),
                                      seed=1))
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed))
    forward = lambda: engine.forward(x, "task-a", "crossbar")  # noqa: E731
    forward()
    calls: list[tuple[torch.Tensor, object, object, dict[str, object]]] = []
    original = ops.crossbar_conv2d

    def capture(codes: torch.Tensor, program: object, geometry: object,
                **kw: object) -> torch.Tensor:
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
    for codes, program, geometry, kw in calls:
        call = _best_ms(lambda: original(codes, program, geometry, **kw),  # type: ignore
                        args.repeats)
        phases["operator calls"] += call
        if fused and ops._matmul_applies(program):  # type: ignore[arg-type]
            phases["fused operator calls (matrix-product path)"] += call
            continue
        unfused_calls += call
        stacked, weights = ops._stack_cycles(codes, program, True,  # type: ignore
                                             program.zero_reads_zero)  # type: ignore
        out = torch.zeros(codes.shape[0], program.out_channels,  # type: ignore
                          *geometry.output_size(codes.shape[2], codes.shape[3],  # type: ignore
                                                program.kernel_size))  # type: ignore
        stack = _best_ms(lambda: ops._stack_cycles(codes, program, True,  # type: ignore
                                                   program.zero_reads_zero),  # type: ignore
                         args.repeats)
        conv = _best_ms(lambda: F.conv2d(
            stacked, program.weight, None, geometry.stride, geometry.padding,  # type: ignore
            geometry.dilation, program.row_groups), args.repeats)  # type: ignore
        chunk = _best_ms(lambda: ops._compiled_chunk(stacked, program, geometry,  # type: ignore
                                                     weights, None, out.zero_()),
                         args.repeats)
        phases["stack input cycles"] += stack
        phases["grouped convolution"] += conv
        phases["ADC and shift-add pass"] += max(0.0, chunk - conv)
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
