"""A 224-px colour adaptation from a Flowers-102-layout tree: throughput and peak memory.

Writes a small tree in the published layout with images the size of the real ones
(shorter side 500 px), adapts the shipped backbone to it with XMA2 as an adaptation job
does (224 px, batch 32, lazy decoding with random resized crops), and reports

- training images per second (every step after the first, which also pays for warm-up),
- evaluation images per second (the served task on the test split, as a job scores it),
- the peak resident memory of the process,
- the same rates per CPU second (what dedicated cores would give, whatever else the
  machine runs at the time),
- the time one job on the real Flowers-102 (1,020 train, 1,020 val, 6,149 test images,
  3 epochs) would take on dedicated cores at those rates (the estimate assumes
  ``--threads`` cores scale perfectly: with more than 1 it is a lower bound).

Like the server, it runs with ``MALLOC_MMAP_MAX_=0`` and a large trim threshold:

    python bench/photo_adaptation.py [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from server.cli import MALLOC_ENV

FLOWERS = {"train": 1020, "val": 1020, "test": 6149}
"""The official split sizes of Flowers-102 (setid.mat)."""


def measure(threads: int, per_split: tuple[int, int, int], epochs: int) -> dict[str, Any]:
    from core.backbones.shipped import load_backbone
    from core.data.datasets import DatasetSpec, load_dataset
    from core.data.published_datasets import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_IMAGE_SIZE,
        photo_method_config,
    )
    from core.engine import CrossbarEngine
    from core.learning import RunOptions, adapt, default_config
    from core.learning.common import StepInfo, accuracy
    from tests.layouts import PHOTOS, flowers102_tree

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        root = flowers102_tree(Path(folder) / "flowers", per_split=per_split, photos=PHOTOS,
                               size=(667, 500))
        data = load_dataset(DatasetSpec(f"flowers102:{root}", image_size=DEFAULT_IMAGE_SIZE))
        model = load_backbone(None)
        config = photo_method_config(default_config("xma2", epochs=epochs,
                                                    batch_size=DEFAULT_BATCH_SIZE))
        stamps: list[tuple[float, float]] = []  # (wall, CPU) seconds after each step

        def on_step(info: StepInfo) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

        started = time.perf_counter()
        with torch.enable_grad():
            result = adapt("xma2", model, data, "flowers", config, RunOptions(on_step=on_step))
        adapt_s = time.perf_counter() - started
        assert result.task is not None
        engine = CrossbarEngine(model)
        engine.add_task(result.task)
        started, started_cpu = time.perf_counter(), time.process_time()
        accuracy(lambda x: engine.forward(x, "flowers"), data.test)
        eval_s, eval_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        sizes = data.describe()["sizes"]
    images = DEFAULT_BATCH_SIZE * (len(stamps) - 1)
    train_ips = images / (stamps[-1][0] - stamps[0][0])
    eval_ips = sizes["test"] / eval_s
    # CPU seconds do not depend on what else the machine runs: a dedicated core's rate
    train_cpu = images / (stamps[-1][1] - stamps[0][1]) * threads
    eval_cpu_ips = sizes["test"] / eval_cpu * threads
    # a job: warm start on the train images, 3 epochs, then val and test scored
    real = {"warm_start_s": FLOWERS["train"] / eval_cpu_ips,
            "training_s": 3 * FLOWERS["train"] / train_cpu,
            "val_and_test_s": (FLOWERS["val"] + FLOWERS["test"]) / eval_cpu_ips}
    real["total_s"] = sum(real.values())
    return {
        "threads": threads, "image_size": DEFAULT_IMAGE_SIZE, "batch_size": DEFAULT_BATCH_SIZE,
        "fixture": sizes, "fixture_image": "667x500 JPEG", "steps": result.steps,
        "adapt_s": round(adapt_s, 1),
        "train_images_per_s": round(train_ips, 2), "eval_images_per_s": round(eval_ips, 2),
        "train_images_per_cpu_s": round(train_cpu / threads, 2),
        "eval_images_per_cpu_s": round(eval_cpu_ips / threads, 2),
        "dedicated_threads_rate": {"train": round(train_cpu, 2), "eval": round(eval_cpu_ips, 2)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "flowers102_job_estimate_s": {k: round(v) for k, v in real.items()},
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-split", default="32,8,32",
                        help="fixture images per class: train,val,test (3 classes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep-malloc", action="store_true",
                        help="do not re-execute with the server's malloc settings")
    args = parser.parse_args()
    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    per_split = tuple(int(n) for n in args.per_split.split(","))
    result = measure(args.threads, per_split, args.epochs)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    real = result["flowers102_job_estimate_s"]
    print(f"{result['threads']} thread(s), 224 px, batch 32: training "
          f"{result['train_images_per_s']} images/s, evaluation {result['eval_images_per_s']} "
          f"images/s, peak RSS {result['peak_rss_mb']} MB (load average "
          f"{result['load_average'][0]:.1f})")
    print(f"per CPU second: training {result['train_images_per_cpu_s']}, evaluation "
          f"{result['eval_images_per_cpu_s']} images")
    print(f"Flowers-102 job (3 epochs), dedicated cores: about {real['total_s'] / 60:.0f} min "
          f"(warm start {real['warm_start_s']} s, training {real['training_s']} s, "
          f"val + test {real['val_and_test_s']} s)")


if __name__ == "__main__":
    main()
