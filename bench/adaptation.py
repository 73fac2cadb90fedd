"""One XMA2 adaptation: this tree against another tree (an older revision), alternating.

Each variant runs in its own process (``--child``), in its tree's source, on the same
data, recipe and seed: the default XMA2 recipe on a built-in dataset at 64 px. The
variants alternate (old, new, then new, old, ...) so that the load of a shared machine
hits both alike, and the report gives each one's times and the ratio old / new:

    git worktree add /tmp/xma2-base REV
    python bench/adaptation.py --baseline-tree /tmp/xma2-base [--steps 40] [--repeats 2]

``--compare-compile`` runs this tree against itself instead: ``old`` with the training
pass eager (``train.compile=false``, the default), ``new`` compiled (``true``).

``--steps N`` times the first ``N`` training steps (warm start and PE ranking done, then
the run is cancelled) and reports the median step; ``--steps 0`` runs the whole
adaptation (warm start, ranking, every epoch, validation) and reports its wall time and
validation accuracy. Both also report CPU seconds, which depend less on what else the
machine runs. ``--profile-steps N`` profiles ``N`` training steps (after the first two) of
each tree with torch.profiler instead and reports where their time goes, by kind of work
(self CPU time per step). Like the server, the processes run with ``MALLOC_MMAP_MAX_=0``
and a large trim threshold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent

STEPS_SKIPPED = 2
"""Steps left out of the median (the first ones also pay for allocator warm-up)."""

CONVOLUTION = {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
               "aten::convolution", "aten::conv2d"}
BATCHNORM = {"aten::native_batch_norm", "aten::native_batch_norm_backward",
             "aten::_native_batch_norm_legit_no_training", "aten::batch_norm"}
ACTIVATION = {"aten::hardtanh", "aten::hardtanh_", "aten::hardtanh_backward", "aten::div",
              "aten::div_", "aten::round", "aten::round_", "aten::clamp", "aten::clamp_",
              "aten::mul", "aten::mul_", "aten::ge", "aten::le", "aten::bitwise_and",
              "aten::clone", "aten::copy_"}
"""Forward operators on activations: ReLU6 and the input quantization (with their copies)."""
BACKWARD_KINDS = (("Convolution", "convolution"), ("BatchNorm", "batchnorm"),
                  ("FakeQuant", "activation and quantization"),
                  ("ClampQuant", "activation and quantization"),
                  ("Hardtanh", "activation and quantization"))
"""Autograd nodes by the kind of work they backpropagate; the others in the backward pass
are the fold's and the masks' (and the head's)."""


COMPILED_GRAPH = "## Call CompiledFxGraph"
"""The profiler's name of a call of a graph ``torch.compile`` generated: its self time is
the generated loops' (the convolutions it calls are counted as their own operators)."""


COMPILED_PERIPHERY = {"_NormClampQuantSTE", "_NormClampQuantSTEBackward"}
"""A training pass's periphery in the crossbar operator (its C++ calls are no ATen
operators: the autograd function's own time is theirs)."""


def _kind(event: Any) -> str:
    """The kind of work an operator of the profile does, from it and its callers."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(COMPILED_GRAPH):  # an operator a compiled graph calls
            break
        if parent.name == "fold":
            return "fold and masks (forward)"
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        if parent.name.startswith("autograd::engine::evaluate_function"):
            for key, kind in BACKWARD_KINDS:
                if key in parent.name:
                    return kind
            return "fold, masks and head (backward)"
        parent = parent.cpu_parent
    if event.name in CONVOLUTION:
        return "convolution"
    if event.name in BATCHNORM:
        return "batchnorm"
    if event.name in ACTIVATION:
        return "activation and quantization"
    return "other (loss, head, data, bookkeeping)"


def profile_breakdown(profiler: Any, steps: int) -> dict[str, Any]:
    """Self CPU milliseconds per step by kind of work, and each kind's share."""
    totals: dict[str, float] = {}
    for event in profiler.events():
        if event.name.startswith(COMPILED_GRAPH):
            kind = "compiled loops (quantization, BatchNorm, ReLU6)"
        elif event.name in COMPILED_PERIPHERY:
            kind = "compiled periphery (BatchNorm, ReLU6, quantization)"
        elif event.name.startswith(("aten::", "autograd::", "Optimizer.")) or event.name in (
                "fold",):
            kind = _kind(event)
        else:
            continue
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / steps
    total = sum(totals.values())
    return {"ms_per_step": {k: round(v, 1) for k, v in sorted(totals.items())},
            "share": {k: round(v / total, 3) for k, v in sorted(totals.items())},
            "total_ms_per_step": round(total, 1)}


def _module(*names: str) -> Any:
    """The first of ``names`` that this process's tree has (looked up in its own ``core``
    folder: an installed newer tree would otherwise lend it modules)."""
    import importlib
    from pathlib import Path

    import core

    root = Path(core.__file__).parent.parent
    for name in names:
        path = root.joinpath(*name.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return importlib.import_module(name)
    raise ModuleNotFoundError(f"none of {names} in {root}")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one adaptation in this process's tree and return what it measured."""
    import torch

    # A tree from before core's packages (core.methods, core.datasets) runs as the baseline
    learning = _module("core.learning", "core.methods")
    datasets = _module("core.data.datasets", "core.datasets")
    DatasetSpec, load_dataset = datasets.DatasetSpec, datasets.load_dataset
    RunOptions, TrainingCancelled = learning.RunOptions, learning.TrainingCancelled
    adapt, default_config = learning.adapt, learning.default_config
    StepInfo = _module(learning.__name__ + ".common").StepInfo
    load_backbone = _module("core.backbones.shipped", "core.commands").load_backbone

    torch.set_num_threads(args.threads)
    data = load_dataset(DatasetSpec(args.dataset, image_size=args.size, seed=args.seed,
                                    train_limit=args.train_limit, test_limit=args.test_limit))
    model = load_backbone(None)
    overrides = {} if args.compile is None else {"compile": args.compile == "true"}
    config = default_config("xma2", epochs=args.epochs, seed=args.seed, **overrides)
    cancel = threading.Event()
    stamps: list[tuple[float, float]] = []
    profiler = None
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile, record_function

        TaskModel = _module(learning.__name__ + ".task_model").TaskModel

        load_weights = TaskModel.load_weights

        def labelled(self: Any) -> None:
            with record_function("fold"):
                load_weights(self)

        TaskModel.load_weights = labelled  # type: ignore[method-assign]
        profiler = profile(activities=[ProfilerActivity.CPU])

    def on_step(info: StepInfo) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        if profiler is not None:
            if len(stamps) == STEPS_SKIPPED + 1:
                profiler.start()
            elif len(stamps) == STEPS_SKIPPED + 1 + args.profile_steps:
                profiler.stop()
                cancel.set()
        elif args.steps and len(stamps) >= args.steps + 1:
            cancel.set()

    started, started_cpu = time.perf_counter(), time.process_time()
    stamps.append((started, started_cpu))
    result = None
    with torch.enable_grad():
        try:
            result = adapt("xma2", model, data, "bench", config,
                           RunOptions(cancel=cancel, on_step=on_step))
        except TrainingCancelled:
            pass
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    steps_wall = [b[0] - a[0] for a, b in itertools.pairwise(stamps[1:])]
    steps_cpu = [b[1] - a[1] for a, b in itertools.pairwise(stamps[1:])]
    timed = steps_wall[STEPS_SKIPPED:] or steps_wall
    timed_cpu = steps_cpu[STEPS_SKIPPED:] or steps_cpu
    out: dict[str, Any] = {
        "core": __import__("core").__file__,
        "sizes": data.describe()["sizes"], "steps_run": len(steps_wall) + 1,
        "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
        "first_step_at_s": round(stamps[1][0] - started, 2) if len(stamps) > 1 else None,
        "median_step_s": round(statistics.median(timed), 4) if timed else None,
        "median_step_cpu_s": round(statistics.median(timed_cpu), 4) if timed_cpu else None,
    }
    if profiler is not None:
        out["profile"] = profile_breakdown(profiler, args.profile_steps)
    if result is not None:
        out.update({"val_accuracy": result.val_accuracy, "steps": result.steps,
                    "adapt_seconds": round(result.seconds, 2),
                    "replaced_pes": result.details.get("replaced_pes")})
    return out


def run_variant(tree: Path, args: argparse.Namespace, compile_mode: str | None = None
                ) -> dict[str, Any]:
    """One child process in ``tree`` (its source first on the path); ``compile_mode``: the
    run's ``train.compile`` (None: the tree's default, the only choice of an older tree)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child",
               "--dataset", args.dataset, "--size", str(args.size),
               "--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit),
               "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--threads", str(args.threads), "--steps", str(args.steps),
               "--profile-steps", str(args.profile_steps),
               *([] if compile_mode is None else ["--compile", compile_mode])]
    from server.cli import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(tree), "XMA2_BENCH_TREE": str(tree)}
    if tree != HERE:  # its own operator cache: the trees' operators would rebuild each other
        env["TORCH_EXTENSIONS_DIR"] = str(tree / ".torch_ext")
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not str(result["core"]).startswith(str(tree)):
        raise SystemExit(f"the run meant for {tree} imported {result['core']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path,
                        help="source tree of the old revision (e.g. a git worktree)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40,
                        help="training steps to time (0: the whole adaptation)")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the pair")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many steps of each tree instead of timing")
    parser.add_argument("--compare-compile", action="store_true",
                        help="compare this tree with itself: old = train.compile false, "
                             "new = true (no baseline tree)")
    parser.add_argument("--compile", choices=("true", "false"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("XMA2_BENCH_TREE", str(HERE)))
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(HERE))
    modes: dict[str, str | None] = {"old": None, "new": None}
    if args.compare_compile:
        trees = {"old": HERE, "new": HERE}
        modes = {"old": "false", "new": "true"}
    elif args.baseline_tree is None or not (args.baseline_tree / "core").is_dir():
        parser.error("--baseline-tree must name a source tree of xma2 (with core/)")
    else:
        trees = {"old": args.baseline_tree.resolve(), "new": HERE}
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for repeat in range(args.repeats):
        order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
        for name in order:
            runs[name].append(run_variant(trees[name], args, modes[name]))
            print(f"{name} run {len(runs[name])}: {json.dumps(runs[name][-1])}",
                  file=sys.stderr)
    if args.profile_steps:
        report = {name: [r["profile"] for r in rs] for name, rs in runs.items()}
        text = json.dumps({"command": "python bench/adaptation.py " + " ".join(sys.argv[1:]),
                           "threads": args.threads, "profile": report}, indent=1)
        if args.out is not None:
            args.out.write_text(text + "\n")
        print(text)
        return
    key, cpu_key = (("median_step_s", "median_step_cpu_s") if args.steps
                    else ("seconds", "cpu_seconds"))
    pairs = list(zip(runs["old"], runs["new"], strict=True))
    result: dict[str, Any] = {
        "command": "python bench/adaptation.py " + " ".join(sys.argv[1:]),
        "recipe": {"method": "xma2", "dataset": args.dataset, "image_size": args.size,
                   "train_limit": args.train_limit, "test_limit": args.test_limit,
                   "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                   "steps": args.steps or "all"},
        "trees": {k: str(v) for k, v in trees.items()},
        "compile": modes,
        "measure": key,
        "old": [r[key] for r in runs["old"]], "new": [r[key] for r in runs["new"]],
        "old_cpu": [r[cpu_key] for r in runs["old"]],
        "new_cpu": [r[cpu_key] for r in runs["new"]],
        "ratio_old_over_new": [round(o[key] / n[key], 3) for o, n in pairs],
        "ratio_old_over_new_cpu": [round(o[cpu_key] / n[cpu_key], 3) for o, n in pairs],
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    result["median_ratio"] = statistics.median(result["ratio_old_over_new"])
    result["median_ratio_cpu"] = statistics.median(result["ratio_old_over_new_cpu"])
    if not args.steps:
        result["val_accuracy"] = {k: [r.get("val_accuracy") for r in v] for k, v in runs.items()}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"XMA2 on {args.dataset} ({args.size} px, {args.threads} threads), {key}: "
          f"old {result['old']} new {result['new']}")
    print(f"old / new: {result['ratio_old_over_new']} (median {result['median_ratio']}); "
          f"CPU seconds: {result['ratio_old_over_new_cpu']}")
    if not args.steps:
        print(f"validation accuracy: {result['val_accuracy']}")


if __name__ == "__main__":
    main()
