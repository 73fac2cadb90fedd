"""Crossbar fidelity against ideal fidelity on the shipped chip, as the best CPU time per batch.

On a shared machine wall-clock medians follow the load; the least thread CPU time over
many alternating passes is what the code costs when nothing else interferes, so two trees
compare on it run after run:

    python bench/chip_cpu_time.py [--size 64] [--batch 16] [--passes 25] [--json]

One thread (as the server runs the chip), the shipped backbone and its own chip, a random
task state (10% of PEs replaced, seed 1) on random images (``--seed``), the compiled
operator with the multi-bit DAC and bit-serial. Each pass runs crossbar then ideal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()

    from core.backbones.shipped import load_backbone
    from core.chip.config import CrossbarSettings
    from core.engine import CrossbarEngine
    from core.task_state import random_head, random_task_state

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model = load_backbone(None)
    images = torch.randn(args.batch, 3, args.size, args.size,
                         generator=torch.Generator().manual_seed(args.seed))
    result: dict[str, object] = {
        "command": "python bench/chip_cpu_time.py " + " ".join(sys.argv[1:]),
        "chip": model.config.describe(), "batch": args.batch, "size": args.size,
        "passes": args.passes, "seed": args.seed,
    }
    for dac_mode in ("multi_bit", "bit_serial"):
        engine = CrossbarEngine(model, crossbar=CrossbarSettings(implementation="compiled",
                                                                 dac_mode=dac_mode))
        engine.add_task(random_task_state("task-a", engine.mapping, random_head(1000, 1280),
                                          seed=1))
        engine.forward(images, "task-a", "crossbar")  # programs built, operator loaded
        best = {"crossbar": float("inf"), "ideal": float("inf")}
        for _ in range(args.passes):
            for fidelity in best:
                started = time.thread_time()
                engine.forward(images, "task-a", fidelity)
                best[fidelity] = min(best[fidelity], time.thread_time() - started)
        result[dac_mode] = {"crossbar_ms": round(best["crossbar"] * 1e3, 2),
                            "ideal_ms": round(best["ideal"] * 1e3, 2),
                            "crossbar_over_ideal": round(best["crossbar"] / best["ideal"], 3)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['chip']}, batch {args.batch}, {args.size}x{args.size}, one thread, "
          f"least CPU time of {args.passes} passes")
    for dac_mode in ("multi_bit", "bit_serial"):
        row = result[dac_mode]
        assert isinstance(row, dict)
        print(f"  {dac_mode:<10} crossbar {row['crossbar_ms']:8.2f} ms   ideal "
              f"{row['ideal_ms']:7.2f} ms   crossbar / ideal {row['crossbar_over_ideal']:.2f}x")


if __name__ == "__main__":
    main()
