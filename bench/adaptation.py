"""One XMA2 adaptation: this tree against another tree (an older revision), alternating.

Each variant runs in its own process (``--child``), in its tree's source, on the same
data, recipe and seed: the default XMA2 recipe on a built-in dataset at 64 px. The
variants alternate (old, new, then new, old, ...) so that the load of a shared machine
hits both alike, and the report gives each one's times and the ratio old / new:

    git worktree add /tmp/xma2-base REV
    python bench/adaptation.py --baseline-tree /tmp/xma2-base [--steps 40] [--repeats 2]

``--steps N`` times the first ``N`` training steps (warm start and PE ranking done, then
the run is cancelled) and reports the median step; ``--steps 0`` runs the whole
adaptation (warm start, ranking, every epoch, validation) and reports its wall time and
validation accuracy. Both also report CPU seconds, which depend less on what else the
machine runs. Like the server, the processes run with ``MALLOC_MMAP_MAX_=0`` and a large
trim threshold.
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


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one adaptation in this process's tree and return what it measured."""
    import torch

    from core.commands import load_backbone
    from core.datasets import DatasetSpec, load_dataset
    from core.methods import RunOptions, TrainingCancelled, adapt, default_config
    from core.methods.common import StepInfo

    torch.set_num_threads(args.threads)
    data = load_dataset(DatasetSpec(args.dataset, image_size=args.size, seed=args.seed,
                                    train_limit=args.train_limit, test_limit=args.test_limit))
    model = load_backbone(None)
    config = default_config("xma2", epochs=args.epochs, seed=args.seed)
    cancel = threading.Event()
    stamps: list[tuple[float, float]] = []

    def on_step(info: StepInfo) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        if args.steps and len(stamps) >= args.steps + 1:
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
    if result is not None:
        out.update({"val_accuracy": result.val_accuracy, "steps": result.steps,
                    "adapt_seconds": round(result.seconds, 2),
                    "replaced_pes": result.details.get("replaced_pes")})
    return out


def run_variant(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One child process in ``tree`` (its source first on the path)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child",
               "--dataset", args.dataset, "--size", str(args.size),
               "--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit),
               "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--threads", str(args.threads), "--steps", str(args.steps)]
    from server.cli import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(tree), "XMA2_BENCH_TREE": str(tree)}
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("XMA2_BENCH_TREE", str(HERE)))
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(HERE))
    if args.baseline_tree is None or not (args.baseline_tree / "core").is_dir():
        parser.error("--baseline-tree must name a source tree of xma2 (with core/)")
    trees = {"old": args.baseline_tree.resolve(), "new": HERE}
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for repeat in range(args.repeats):
        order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
        for name in order:
            runs[name].append(run_variant(trees[name], args))
            print(f"{name} run {len(runs[name])}: {json.dumps(runs[name][-1])}",
                  file=sys.stderr)
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
