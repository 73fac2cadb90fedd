"""Task store: size on disk per method shape, and load latency cold and warm.

Stores one MobileNetV2 task of each learning method's shape (XMA and XBM: column
masks only; XMA2: 10% of PEs replaced; fine-tuning and piggyback: every PE
replaced), then loads it

- cold: a freshly opened store (empty cache) after the version's files were dropped
  from the OS page cache (``posix_fadvise(DONTNEED)``): index lookup, file read,
  SHA-256 checks, fingerprint check, unpacking and validation;
- warm: a hit in the store's cache of decoded tasks (index lookup included).

It also reports the energy to make each shape resident in fresh spare PEs:

    python bench/store.py [--repeats 7] [--classes 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch


def _drop_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--classes", type=int, default=10, help="classes of each task head")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    from core.backbones.shipped import load_backbone
    from core.chip.pool import PoolConfig, SparePEPool
    from core.task_state import LayerTaskState, ones_code, random_head, random_task_state
    from task_store import TaskStore
    from task_store.format import code_bits, packed_bytes

    model = load_backbone(None)
    mapping = model.mapping
    assert mapping is not None
    head = random_head(args.classes, 1280, seed=0)
    norms = {n: m for n, m in model.body.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    batchnorm = {f"{n}.{attr}": getattr(m, attr).detach().clone()
                 for n, m in norms.items() for attr in ("weight", "bias")}

    def shaped(method: str) -> Any:
        fraction = {"xma": 0.0, "xbm": 0.0, "xma2": 0.1, "xma2+bn": 0.1,
                    "fine_tuning": 1.0}[method]
        task = random_task_state(method.replace("+", "-"), mapping, head,
                                 pe_fraction=fraction, seed=1)
        if method == "xbm":
            top = ones_code(mapping.config.shift_levels)
            task = replace(task, layers={
                n: LayerTaskState(s.pe_mask, s.spare_codes,
                                  torch.where(s.column_codes % 2 == 0, 0, top).to(torch.uint8))
                for n, s in task.layers.items()})
        if method == "xma2+bn":
            task = replace(task, digital=batchnorm)
        return task

    methods = ["xma", "xbm", "xma2", "xma2+bn", "fine_tuning"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        store = TaskStore.for_model(root, model)
        for method in methods:
            task = shaped(method)
            started = time.perf_counter()
            record = store.put(task, method=method)
            put_s = time.perf_counter() - started
            directory = Path(root) / "tasks" / task.task_id / f"v{record.version}"
            cold, warm = [], []
            for _ in range(args.repeats):
                fresh = TaskStore(root, backbone_fingerprint=store.backbone_fingerprint,
                                  mapping=mapping)
                _drop_page_cache(directory)
                started = time.perf_counter()
                fresh.get(task.task_id)
                cold.append(time.perf_counter() - started)
                started = time.perf_counter()
                fresh.get(task.task_id)
                warm.append(time.perf_counter() - started)
                fresh.close()
            sizes = store.manifest(task.task_id).sizes
            pool = SparePEPool(mapping, PoolConfig(spare_pes=mapping.num_pes))
            event = pool.ensure_resident(task).event
            assert event is not None
            rows.append({
                "method": method,
                "replaced_pes": task.replaced_pes,
                "bytes_on_disk": record.bytes,
                "sizes": sizes,
                "put_ms": round(put_s * 1e3, 3),
                "cold_load_ms": _median_ms(cold),
                "warm_load_ms": _median_ms(warm),
                "residency_energy_uj": round(event.energy_j * 1e6, 3),
                "cells_written": event.report.cells_written,
            })
    columns = sum(m.row_groups * m.out_channels for m in mapping.crossbar_layers)
    mask_bytes = {n: sum(packed_bytes(m.row_groups * m.out_channels, code_bits(n))
                         for m in mapping.crossbar_layers) for n in range(4)}
    result = {
        "backbone": "mobilenet_v2 (shipped w4a4 artifact)",
        "crossbar_pes": mapping.num_pes,
        "logical_columns": columns,
        "head_classes": args.classes,
        "repeats": args.repeats,
        "column_mask_bytes_by_shift_levels": mask_bytes,
        "methods": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"MobileNetV2: {mapping.num_pes} crossbar PEs, {columns} logical columns; "
          f"{args.classes}-class heads; medians of {args.repeats}")
    print("column mask bytes by shift levels N: "
          + ", ".join(f"N={n}: {b}" for n, b in mask_bytes.items()))
    print(f"{'method':<12} {'PEs':>5} {'on disk':>10} {'spare':>9} {'columns':>8} "
          f"{'head':>7} {'digital':>8} {'put ms':>7} {'cold ms':>8} {'warm ms':>8} "
          f"{'resident uJ':>11}")
    for r in rows:
        s = r["sizes"]
        print(f"{r['method']:<12} {r['replaced_pes']:>5} {r['bytes_on_disk']:>10} "
              f"{s['spare_codes']:>9} {s['column_codes']:>8} {s['head']:>7} "
              f"{s['digital']:>8} {r['put_ms']:>7.1f} {r['cold_load_ms']:>8.2f} "
              f"{r['warm_load_ms']:>8.3f} {r['residency_energy_uj']:>11.2f}")


if __name__ == "__main__":
    main()
