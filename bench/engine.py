"""Ideal and crossbar fidelity against plain torch, and the cost of a task switch.

Runs side by side in one process on the same inputs, alternating the variants
so machine noise hits them alike, and reports medians and ratios:

    python bench/engine.py [--batch 16] [--size 224] [--repeats 7] [--crossbar]
    python bench/engine.py --mixed [--batch 16] [--repeats 15]

With ``--crossbar`` it adds crossbar fidelity on a lossy periphery, where every layer
runs the crossbar operator: by default the paper's (:data:`core.chip.config.PAPER_CHIP`: 72
rows read at once, offset cells, 5-bit ADC calibrated for it on ``--calibration-images``
photo crops) with its 4-bit multi-bit DAC (compiled operator and eager pure-torch
reference) and bit-serial (compiled). ``--chip shipped`` times the shipped backbone's
periphery instead (9 rows per read: bit-serial is lossless there and takes the ideal
path). Each crossbar variant's logits are hashed (``output_sha256``), so runs of two
trees can be checked for equal results. Unless ``--skip-memory``, it measures each
variant's peak memory (RSS) in a fresh process (``--memory VARIANT`` runs one variant
alone and prints its peak RSS).

``--mixed`` times the chip alone (one thread, as the server runs it) on a batch of 64x64
images mixing tasks against the same images all of one task, alternating: the three
shipped tasks plus five copies under other names, drawn with Zipf popularity (the
stream of ``bench/serve.py``), in ideal fidelity, crossbar fidelity on the shipped chip
(provably lossless: the ideal code path) and on the paper's lossy periphery
(:data:`core.chip.config.PAPER_CHIP`, full-scale ADC), where the spare PEs are read.
It also times a stream of such batches, each a fresh draw (``stream``): the set of
tasks in a batch then changes from batch to batch, as it does in a server.

glibc returns large freed blocks to the OS, so every forward pass would pay
fresh page faults; the script re-executes itself with MALLOC_MMAP_MAX_=0 and
a large MALLOC_TRIM_THRESHOLD_ (the server sets the same) unless told not to.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from server.cli import MALLOC_ENV

if TYPE_CHECKING:
    from core.engine import CrossbarEngine


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
    parser.add_argument("--crossbar", action="store_true",
                        help="add crossbar fidelity (compiled, reference, bit-serial)")
    parser.add_argument("--memory", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true",
                        help="only the chip on a batch mixing tasks vs one task")
    parser.add_argument("--seed", type=int, default=0, help="images (and --mixed: task mix)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--chip", choices=("paper", "shipped"), default="paper",
                        help="--crossbar: the periphery of the crossbar variants")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="--chip paper: photo crops its ADC ranges are calibrated on")
    parser.add_argument("--skip-memory", action="store_true",
                        help="--crossbar: do not measure peak RSS in fresh processes")
    args = parser.parse_args()
    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    if args.mixed:
        mixed_batches(args)
        return

    from core.backbones import build_backbone
    from core.backbones.shipped import imagenet_task, load_backbone
    from core.chip.config import PAPER_CHIP, CrossbarSettings
    from core.engine import CrossbarEngine
    from core.nn.calibration import calibration_images
    from core.task_state import TaskState, random_task_state

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    fp32 = build_backbone("mobilenet_v2")
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    engine.add_task(imagenet_task(model))
    head = engine.tasks["imagenet"].head
    engine.add_task(random_task_state("task-a", engine.mapping, head, seed=1))
    engine.add_task(random_task_state("task-b", engine.mapping, head, seed=2))
    engine.add_task(TaskState("plain", model.config.shift_levels, head))
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    chip_model = model
    if (args.crossbar or args.memory) and args.chip == "paper":
        chip_model = model.with_chip(**PAPER_CHIP)
        chip_model.calibrate_adc(calibration_images(args.calibration_images, 64, seed=0))
    outputs: dict[str, Tensor] = {}

    def crossbar(dac_mode: str, implementation: str) -> Callable[[], object]:
        other = CrossbarEngine(chip_model, crossbar=CrossbarSettings(
            dac_mode=dac_mode, implementation=implementation))  # type: ignore[arg-type]
        other.add_task(engine.tasks["task-a"])
        name = (f"crossbar {'bit-serial ' if dac_mode == 'bit_serial' else ''}"
                f"{implementation}")

        def run() -> Tensor:
            outputs[name] = other.forward(x, "task-a", "crossbar")
            return outputs[name]
        return run

    variants: dict[str, Callable[[], object]] = {
        "fp32 torch": lambda: fp32(x),
        "fp32 torch, channels_last": lambda: fp32(x_cl),
        "ideal (task-a)": lambda: engine.forward(x, "task-a"),
        "ideal (task-a), channels_last": lambda: engine.forward(x_cl, "task-a"),
    }
    if args.crossbar or args.memory:
        variants.update({
            "crossbar compiled": crossbar("multi_bit", "compiled"),
            "crossbar reference": crossbar("multi_bit", "reference"),
            "crossbar bit-serial compiled": crossbar("bit_serial", "compiled"),
        })
    if args.memory:
        fn = variants[args.memory]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fn()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"variant": args.memory, "peak_rss_mb": peak,
                          "loaded_rss_mb": before}))
        return
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

    result: dict[str, object] = {
        "command": "python bench/engine.py " + " ".join(sys.argv[1:]),
        "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "seed": args.seed,
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "ideal_over_fp32": round(medians["ideal (task-a)"] / medians["fp32 torch"], 3),
        "ideal_over_fp32_channels_last": round(
            medians["ideal (task-a), channels_last"] / medians["fp32 torch, channels_last"], 3),
        "switch_ms": round(switch_ms, 4),
        "switch_over_batch": round(switch_ms / medians["ideal (task-a)"], 6),
        "prepare_uncached_ms": round(prepare_ms, 1),
    }
    if args.crossbar:
        ideal, fp32_ms = medians["ideal (task-a)"], medians["fp32 torch"]
        result["chip"] = (chip_model.config.describe()
                          + (f", ADC calibrated on {args.calibration_images} photo crops"
                             if args.chip == "paper" else ""))
        result["crossbar_over_ideal"] = round(medians["crossbar compiled"] / ideal, 3)
        result["crossbar_over_fp32"] = round(medians["crossbar compiled"] / fp32_ms, 3)
        result["reference_over_compiled"] = round(
            medians["crossbar reference"] / medians["crossbar compiled"], 3)
        result["bit_serial_over_ideal"] = round(
            medians["crossbar bit-serial compiled"] / ideal, 3)
        result["bit_serial_over_fp32"] = round(
            medians["crossbar bit-serial compiled"] / fp32_ms, 3)
        result["output_sha256"] = {
            name: hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()
            for name, out in outputs.items()}
        if not args.skip_memory:
            result["peak_rss_mb"] = {name: _peak_rss(name, args) for name in variants}
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
    if args.crossbar:
        print(f"  crossbar chip:                   {result['chip']}")
        print(f"  crossbar (compiled) / ideal:     {result['crossbar_over_ideal']:.3f}x")
        print(f"  crossbar (compiled) / fp32:      {result['crossbar_over_fp32']:.3f}x")
        print(f"  reference / compiled crossbar:   {result['reference_over_compiled']:.3f}x")
        print(f"  bit-serial (compiled) / ideal:   {result['bit_serial_over_ideal']:.3f}x")
        print(f"  bit-serial (compiled) / fp32:    {result['bit_serial_over_fp32']:.3f}x")
        peaks: dict[str, dict[str, float]] = result.get("peak_rss_mb", {})  # type: ignore[assignment]
        for name, mb in peaks.items():
            print(f"  peak RSS, {name:29s} {mb['peak']:7.0f} MB "
                  f"(+{mb['above_loaded']:.0f} MB while running)")


SHIPPED = ("mnist", "fashion-mnist", "animal-mnist")
COPIES = ("mnist-b", "fashion-mnist-b", "animal-mnist-b", "mnist-c", "fashion-mnist-c")
STREAM_WARM = 64
"""Batches of the stream (``--mixed``) run before timing."""


def task_mix(seed: int, batch: int) -> tuple[tuple[str, ...], list[str], list[str],
                                            torch.Tensor]:
    """The 8 task names, a batch drawing them with Zipf popularity (the stream of
    bench/serve.py), the same batch all of one task, and its 64x64 images."""
    names = (*SHIPPED, *COPIES)
    rng = random.Random(seed)
    mixed = rng.choices(list(names), [1.0 / (k + 1) for k in range(len(names))], k=batch)
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return names, mixed, [SHIPPED[0]] * batch, x


def add_shipped_tasks(engine: CrossbarEngine, names: tuple[str, ...]) -> None:
    """Register the shipped tasks, and copies of them under other names, on ``engine``."""
    from core.task_state import TaskState
    from server.shipped_tasks import SHIPPED_DIR
    from task_store.archive import read_archive
    from task_store.format import decode_task

    for name in names:
        manifest, data = read_archive(SHIPPED_DIR / f"{_source(name)}.tar")
        task = decode_task(data, manifest)
        engine.add_task(TaskState(name, task.shift_levels, task.head, task.layers,
                                  task.digital))


def mixed_batches(args: argparse.Namespace) -> None:
    """Single-task vs mixed-task batches on the chip alone, per fidelity and periphery."""
    from core.backbones.shipped import load_backbone
    from core.chip.config import PAPER_CHIP, CrossbarSettings
    from core.engine import CrossbarEngine

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    names, mixed, single, x = task_mix(args.seed, args.batch)
    backbone = load_backbone(None)
    paper = CrossbarSettings(adc_range="full_scale", adc_bits=PAPER_CHIP["adc_bits"],
                             dac_mode=PAPER_CHIP["dac_mode"])
    chips = {"ideal": (CrossbarEngine(backbone, max_prepared_tasks=len(names)), "ideal"),
             "crossbar, shipped chip": (CrossbarEngine(copy.deepcopy(backbone),  # own layers
                                                       max_prepared_tasks=len(names)),
                                        "crossbar"),
             "crossbar, paper chip": (CrossbarEngine(backbone.with_chip(**PAPER_CHIP),
                                                     max_prepared_tasks=len(names),
                                                     crossbar=paper), "crossbar")}
    result: dict[str, object] = {
        "command": "python bench/engine.py --mixed " + " ".join(sys.argv[1:]).replace(
            "--mixed", "").strip(), "batch": args.batch, "size": 64, "threads": 1,
        "distinct_tasks": len(set(mixed)), "seed": args.seed, "mixed": mixed}
    for label, (engine, fidelity) in chips.items():
        add_shipped_tasks(engine, names)
        repeats = args.repeats if fidelity == "ideal" else max(3, args.repeats // 3)
        # A stream of batches, each a fresh draw of the same popularity (as a server sees
        # them: the set of tasks changes from batch to batch); the first STREAM_WARM of it
        # only warm what a long-running server would have warmed.
        draws = [task_mix(args.seed + 1 + i, args.batch)[1]
                 for i in range(STREAM_WARM + repeats)]
        for ids in (mixed, single, mixed, single):  # warm: fold, program, plan every task
            engine.forward_mixed(x, ids, fidelity)
        for ids in draws[:STREAM_WARM]:
            engine.forward_mixed(x, ids, fidelity)
        kinds = ("single", "mixed", "stream")
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        planner = getattr(engine.mixed, "stats", None)  # trees before kept sets: none
        misses_before = None if planner is None else planner.misses
        for stream_ids in draws[STREAM_WARM:]:
            for kind, ids in (("single", single), ("mixed", mixed), ("stream", stream_ids)):
                started = time.perf_counter()
                engine.forward_mixed(x, ids, fidelity)
                times[kind].append((time.perf_counter() - started) * 1e3)
        medians = {kind: statistics.median(times[kind]) for kind in kinds}
        # the lower quartile too: on a shared machine the slow tail is the neighbours'
        q1 = {kind: statistics.quantiles(times[kind], n=4)[0] if repeats > 1
              else times[kind][0] for kind in kinds}
        result[label] = {"single_ms": round(medians["single"], 1),
                         "mixed_ms": round(medians["mixed"], 1),
                         "single_over_mixed": round(medians["single"] / medians["mixed"], 3),
                         "single_q1_ms": round(q1["single"], 1),
                         "mixed_q1_ms": round(q1["mixed"], 1),
                         "single_over_mixed_q1": round(q1["single"] / q1["mixed"], 3),
                         "stream_ms": round(medians["stream"], 1),
                         "single_over_stream": round(medians["single"] / medians["stream"], 3),
                         "single_over_stream_q1": round(q1["single"] / q1["stream"], 3),
                         "stream_distinct_tasks": round(statistics.mean(
                             len(set(ids)) for ids in draws[STREAM_WARM:]), 2),
                         # timed stream batches whose set of tasks was new to the
                         # engine (its calls made, not kept; the fixed mix is kept)
                         "stream_new_sets": None if planner is None or misses_before is None
                         else round((planner.misses - misses_before) / repeats, 3),
                         "repeats": repeats}
        print(f"{label:24s} single {medians['single']:7.1f} ms  mixed {medians['mixed']:7.1f} "
              f"ms  single/mixed {medians['single'] / medians['mixed']:.3f}  stream "
              f"{medians['stream']:7.1f} ms  single/stream "
              f"{medians['single'] / medians['stream']:.3f}", file=sys.stderr)
    print(json.dumps(result, indent=1))


def _source(name: str) -> str:
    """The shipped task a copy was made from (``mnist-b`` -> ``mnist``)."""
    return name.rsplit("-", 1)[0] if name in COPIES else name


def _peak_rss(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of a fresh process that loads everything and runs one variant twice, and
    how far running it rose above the process's peak once everything was loaded."""
    out = subprocess.run(
        [sys.executable, __file__, "--batch", str(args.batch), "--size", str(args.size),
         "--chip", args.chip, "--calibration-images", str(args.calibration_images),
         *(["--threads", str(args.threads)] if args.threads is not None else []),
         "--memory", variant], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak": round(result["peak_rss_mb"], 1),
            "above_loaded": round(result["peak_rss_mb"] - result["loaded_rss_mb"], 1)}


if __name__ == "__main__":
    main()
