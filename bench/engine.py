"""Ideal-fidelity cost against plain torch, and the cost of a task switch.

Runs side by side in one process on the same inputs, alternating the variants
so machine noise hits them alike, and reports medians and ratios:

    python bench/engine.py [--batch 16] [--size 224] [--repeats 7]

glibc returns large freed blocks to the OS, so every forward pass would pay
fresh page faults; the script re-executes itself with MALLOC_MMAP_MAX_=0 and
a large MALLOC_TRIM_THRESHOLD_ (the server sets the same) unless told not to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def _median_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep-malloc", action="store_true",
                        help="do not re-execute with the malloc settings")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

    from core.backbones import build_backbone
    from core.commands import imagenet_task, load_backbone
    from core.engine import CrossbarEngine
    from core.task_state import TaskState, random_task_state

    torch.set_grad_enabled(False)
    fp32 = build_backbone("mobilenet_v2")
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    engine.add_task(imagenet_task(model))
    head = engine.tasks["imagenet"].head
    engine.add_task(random_task_state("task-a", engine.mapping, head, seed=1))
    engine.add_task(random_task_state("task-b", engine.mapping, head, seed=2))
    engine.add_task(TaskState("plain", model.config.shift_levels, head))
    x = torch.randn(args.batch, 3, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    variants: dict[str, Callable[[], object]] = {
        "fp32 torch": lambda: fp32(x),
        "fp32 torch, channels_last": lambda: fp32(x_cl),
        "ideal (task-a)": lambda: engine.forward(x, "task-a"),
        "ideal (task-a), channels_last": lambda: engine.forward(x_cl, "task-a"),
    }
    for fn in variants.values():  # warm-up: allocator, folded weights, oneDNN primitives
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            samples[name] += _median_ms(fn, 1)
    medians = {name: statistics.median(v) for name, v in samples.items()}

    engine.activate("task-a")
    switches = 200
    started = time.perf_counter()
    for i in range(switches):
        engine.activate("task-b" if i % 2 == 0 else "task-a")
    switch_ms = (time.perf_counter() - started) * 1e3 / switches
    engine.prepared.pop("task-b")
    started = time.perf_counter()
    engine.prepare("task-b")
    prepare_ms = (time.perf_counter() - started) * 1e3

    result = {
        "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "ideal_over_fp32": round(medians["ideal (task-a)"] / medians["fp32 torch"], 3),
        "ideal_over_fp32_channels_last": round(
            medians["ideal (task-a), channels_last"] / medians["fp32 torch, channels_last"], 3),
        "switch_ms": round(switch_ms, 4),
        "switch_over_batch": round(switch_ms / medians["ideal (task-a)"], 6),
        "prepare_uncached_ms": round(prepare_ms, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"MobileNetV2, batch {args.batch}, {args.size}x{args.size}, "
          f"{result['threads']} threads, median of {args.repeats}")
    for name, ms in medians.items():
        print(f"  {name:32s} {ms:9.2f} ms")
    print(f"  ideal / fp32:                    {result['ideal_over_fp32']:.3f}x")
    print(f"  ideal / fp32 (channels_last):    {result['ideal_over_fp32_channels_last']:.3f}x")
    print(f"  switch between cached tasks:     {switch_ms:.4f} ms "
          f"({100 * result['switch_over_batch']:.4f}% of one batch)")
    print(f"  fold an uncached task:           {prepare_ms:.1f} ms")


if __name__ == "__main__":
    main()
