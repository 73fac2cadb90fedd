"""Where the chip's forward pass spends its time: torch.profiler on one thread.

Batch of 64x64 images of one shipped task, and the same batch mixing tasks (the
Zipf draw of ``bench/engine.py --mixed``), in ideal (or crossbar) fidelity; prints the
share of self CPU time per operator, per batch:

    python bench/profile_chip.py [--batch 16] [--repeats 5] [--seed 0] [--fidelity crossbar]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch
from engine import add_shipped_tasks, task_mix  # bench/engine.py, beside this script
from torch.profiler import ProfilerActivity, profile

from server.cli import MALLOC_ENV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--fidelity", choices=("ideal", "crossbar"), default="ideal")
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    from core.backbones.shipped import load_backbone
    from core.engine import CrossbarEngine

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    names, mixed, single, x = task_mix(args.seed, args.batch)
    engine = CrossbarEngine(load_backbone(None), max_prepared_tasks=len(names))
    add_shipped_tasks(engine, names)
    _label_compiled_calls()
    for ids in (mixed, single, mixed, single):
        engine.forward_mixed(x, ids, args.fidelity)
    for label, ids in (("single", single), ("mixed", mixed)):
        started = time.perf_counter()
        for _ in range(args.repeats):
            engine.forward_mixed(x, ids, args.fidelity)
        wall = (time.perf_counter() - started) * 1e3 / args.repeats
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.repeats):
                engine.forward_mixed(x, ids, args.fidelity)
        totals: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for event in prof.key_averages(group_by_input_shape=True):
            key = _kind(event.key, event.input_shapes)
            totals[key] += event.self_cpu_time_total / 1e3 / args.repeats
            counts[key] += event.count // args.repeats
        whole = sum(totals.values())
        print(f"{label}: {wall:.1f} ms wall, {whole:.1f} ms of operator self time per batch "
              f"of {args.batch} ({len(set(ids))} tasks)")
        for key, ms in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {key:40s} {ms:7.2f} ms  {100 * ms / whole:5.1f}%  x{counts[key]}")


def _label_compiled_calls() -> None:
    """The compiled operator's calls are no torch operators: wrap each in a profiler
    range so that their own time is listed (as ``xma2::name``) and not lost."""
    from torch.profiler import record_function

    from core.ops.extension import crossbar_extension

    extension = crossbar_extension()
    for name in dir(extension):
        function = getattr(extension, name)
        if name.startswith("_") or not callable(function):
            continue

        def labelled(*args: object, _function: Any = function, _name: str = name) -> object:
            with record_function(f"xma2::{_name}"):
                return _function(*args)

        setattr(extension, name, labelled)


def _kind(name: str, shapes: list[list[int]]) -> str:
    """Convolutions by kind (pointwise, depthwise, stem) from their weight's shape."""
    if name not in ("aten::mkldnn_convolution", "aten::mm") or len(shapes) < 2:
        return name
    if name == "aten::mm":
        return name
    weight = shapes[1]
    if len(weight) != 4:
        return name
    kind = ("1x1" if weight[2:] == [1, 1] else "depthwise 3x3" if weight[1] == 1
            else "stem 3x3")
    return f"{name} {kind}"


if __name__ == "__main__":
    main()
