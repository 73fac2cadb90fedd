"""What a multi-task chip pays to switch from one adapted task to another.

Pricing a task against the untouched backbone says little about a chip that serves
several tasks: a fine-tuned task rewrites every PE it changed *and* every PE the previous
task changed, while XMA2 rewrites only the spare PEs. The chip's state for a task:

- methods that rewrite the backbone's PEs in place (fine-tuning, piggyback): every PE
  holds the task's codes where the task replaced it, the backbone's elsewhere;
- spare-PE methods (XMA2, XMA, XBM, head + BatchNorm): the backbone's PEs never change;
  the task's replaced PEs sit in spare PEs. Switching keeps the spare PE of a PE both
  tasks replaced (rewriting only the cells whose level differs), writes B's other spare
  PEs over A's remaining ones in row-major PE order, and over erased cells (level 0)
  where A had too few.

Only cells whose level changes are written (:func:`core.chip.programming.programming_cost`).
Masks and the digital head and BatchNorm live in registers and SRAM, whose writes are not
priced here; the number of column codes that change is reported beside the energy.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic import atomic_write_bytes
from core.chip.programming import ProgrammingConfig, programming_cost, weight_codes_to_cell_levels
from core.learning.task_model import pe_blocks
from core.nn.model import CrossbarModel
from core.ops.fold import to_row_groups
from core.task_state import LayerTaskState, TaskHead, TaskState

__all__ = ["load_task_tensors", "price_grid_switches", "round_trip_cost", "save_task_tensors",
           "switching_cost", "switching_markdown", "task_file"]

logger = logging.getLogger(__name__)


def switching_cost(model: CrossbarModel, old: TaskState, new: TaskState, *, in_place: bool,
                   config: ProgrammingConfig | None = None) -> dict[str, float]:
    """Cells written (and their energy) to move the chip from ``old``'s state to ``new``'s.

    ``in_place``: the tasks' replaced PEs are the backbone's own PEs (fine-tuning,
    piggyback), not spare PEs.
    """
    cfg = config or ProgrammingConfig(bits_per_cell=model.config.bits_per_cell)
    encoding = model.config.weight_encoding
    energy, cells, pes, columns = 0.0, 0, 0, 0
    for name, layer in model.layers():
        mapping = layer.mapping
        assert mapping is not None
        if name not in old.layers and name not in new.layers:
            continue
        a, b = old.layer_state(mapping), new.layer_state(mapping)
        columns += int((a.column_codes != b.column_codes).sum())
        ones = torch.ones_like(layer.weight_codes, dtype=torch.int16)
        valid = pe_blocks(to_row_groups(ones, mapping), mapping).bool()
        if in_place:
            backbone = pe_blocks(to_row_groups(layer.weight_codes.to(torch.int16), mapping),
                                 mapping)
            before, after = backbone.clone(), backbone.clone()
            before[a.pe_mask] = a.spare_codes.to(torch.int16)
            after[b.pe_mask] = b.spare_codes.to(torch.int16)
            changed = (a.pe_mask | b.pe_mask)
            old_codes, new_codes = before[changed], after[changed]
            keep = valid[changed]
            old_levels = _levels(old_codes[keep], layer.weight_bits, cfg, encoding)
        else:
            if b.replaced_pes == 0:
                continue
            new_codes = b.spare_codes.to(torch.int16)
            keep = valid[b.pe_mask]
            slots = _slots(a.pe_mask, b.pe_mask)
            old_codes = torch.zeros_like(new_codes)
            used = slots >= 0
            old_codes[used] = a.spare_codes[slots[used]].to(torch.int16)
            old_levels = _levels(old_codes[keep], layer.weight_bits, cfg, encoding)
            # Slots A never used hold erased cells, not the level of a zero weight code.
            old_levels[(~used).view(-1, 1, 1).expand_as(keep)[keep]] = 0
        new_levels = _levels(new_codes[keep], layer.weight_bits, cfg, encoding)
        report = programming_cost(old_levels, new_levels, cfg)
        energy += report.energy_j
        cells += report.cells_written
        pes += int(new_codes.shape[0])
    return {"energy_j": energy, "cells_written": cells, "pes_written": pes,
            "column_codes_changed": columns}


def _slots(old_mask: Tensor, new_mask: Tensor) -> Tensor:
    """For each of the new task's spare PEs, the old task's spare PE it is written over
    (-1: an erased one). A PE both tasks replaced keeps its spare PE (its codes started
    from the same backbone PE); the others take the old task's remaining spare PEs in
    order, then erased ones."""
    old_index = torch.full(old_mask.shape, -1, dtype=torch.long)
    old_index[old_mask] = torch.arange(int(old_mask.sum()))
    slots = old_index[new_mask]
    taken = torch.zeros(int(old_mask.sum()), dtype=torch.bool)
    taken[slots[slots >= 0]] = True
    free = (~taken).nonzero().flatten()
    unmatched = (slots < 0).nonzero().flatten()
    count = min(len(free), len(unmatched))
    slots[unmatched[:count]] = free[:count]
    return slots


def _levels(codes: Tensor, weight_bits: int, cfg: ProgrammingConfig, encoding: Any) -> Tensor:
    return weight_codes_to_cell_levels(codes, weight_bits=weight_bits,
                                       bits_per_cell=cfg.bits_per_cell, encoding=encoding)


def round_trip_cost(model: CrossbarModel, a: TaskState, b: TaskState, *,
                    in_place: bool) -> dict[str, float]:
    """A -> B -> A: what serving two tasks alternately costs per round trip."""
    there = switching_cost(model, a, b, in_place=in_place)
    back = switching_cost(model, b, a, in_place=in_place)
    return {key: there[key] + back[key] for key in there}


# -- a task's tensors on disk, for grids that price pairs of tasks after a restart ---------


def save_task_tensors(path: Path, task: TaskState) -> None:
    """Atomic safetensors file of a task state (no code runs on load)."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {"head.weight": task.head.weight.contiguous(),
                                  "head.bias": task.head.bias.contiguous()}
    for name, state in task.layers.items():
        tensors[f"layer.{name}.pe_mask"] = state.pe_mask.to(torch.uint8).contiguous()
        tensors[f"layer.{name}.spare_codes"] = state.spare_codes.contiguous()
        tensors[f"layer.{name}.column_codes"] = state.column_codes.contiguous()
    for name, value in task.digital.items():
        tensors[f"digital.{name}"] = value.contiguous()
    meta = {"task_id": task.task_id, "shift_levels": str(task.shift_levels),
            "labels": json.dumps(list(task.head.labels))}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_task_tensors(path: Path) -> TaskState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    layers: dict[str, dict[str, Tensor]] = {}
    digital: dict[str, Tensor] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "layer":
            name, _, field = rest.rpartition(".")
            layers.setdefault(name, {})[field] = value
        elif kind == "digital":
            digital[rest] = value
    head = TaskHead(tensors["head.weight"], tensors["head.bias"],
                    tuple(json.loads(meta["labels"])))
    return TaskState(meta["task_id"], int(meta["shift_levels"]), head,
                     {name: LayerTaskState(v["pe_mask"].bool(), v["spare_codes"],
                                           v["column_codes"]) for name, v in layers.items()},
                     digital)


# -- the grid's switching table ------------------------------------------------------------


def price_grid_switches(result: dict[str, Any], tasks_dir: Path, model: CrossbarModel,
                        in_place_methods: frozenset[str]) -> None:
    """Fill ``result["switching"]``: A -> B -> A for every pair of datasets a method
    adapted, from the task files the grid saved (so a resumed grid prices old cells too)."""
    switching = result.setdefault("switching", {})
    by_method: dict[str, dict[str, Path]] = {}
    for key, cell in result["cells"].items():
        path = task_file(tasks_dir, key)
        if path.is_file():
            method_key = key.partition("/")[2]
            by_method.setdefault(method_key, {})[cell["dataset"]] = path
    for method_key, files in by_method.items():
        method = method_key.partition("@")[0]
        entry = switching.setdefault(method_key, {})
        for a, b in itertools.combinations(sorted(files), 2):
            pair = f"{a}<->{b}"
            if pair in entry:
                continue
            cost = round_trip_cost(model, load_task_tensors(files[a]),
                                   load_task_tensors(files[b]),
                                   in_place=method in in_place_methods)
            entry[pair] = cost
            logger.info("switching %s %s: %.3g uJ, %d cells", method_key, pair,
                        1e6 * cost["energy_j"], cost["cells_written"])


def _file_name(cell_key: str) -> str:
    return cell_key.replace("/", "__").replace("@", "_p")


def task_file(tasks_dir: Path, cell_key: str) -> Path:
    return tasks_dir / f"{_file_name(cell_key)}.safetensors"


def switching_markdown(result: dict[str, Any], method_titles: dict[str, str],
                       reference: str = "xma2@0.1") -> list[str]:
    """Table of mean A -> B -> A cost per method over dataset pairs, against XMA2."""
    switching = result.get("switching") or {}
    if not switching:
        return []

    def mean(entry: dict[str, dict[str, float]], key: str) -> float:
        return sum(v[key] for v in entry.values()) / len(entry)

    ref = switching.get(reference)
    ref_j = mean(ref, "energy_j") if ref else None
    lines = ["## Switching between two adapted tasks (A -> B -> A)", "",
             "What a chip serving two tasks in turn pays per round trip: cells whose level "
             "changes when the chip moves from one task's state to the other's and back "
             "(`core.cli.switching`), mean over the pairs of datasets. Fine-tuning and "
             "piggyback rewrite every PE either task changed; spare-PE methods rewrite only "
             "their spare PEs. The paper reports 13.72x (fine-tuning) and 4.38x (piggyback) "
             "against XMA2.", "",
             "| method | pairs | cells written | PEs written | energy (uJ) | / XMA2 (P = 10%) |",
             "|---|---|---|---|---|---|"]
    for method_key, entry in sorted(switching.items()):
        if not entry:
            continue
        method, _, p = method_key.partition("@")
        label = method_titles.get(method, method) + (f" (P = {float(p):.0%})" if p else "")
        energy = mean(entry, "energy_j")
        ratio = f"{energy / ref_j:.2f}x" if ref_j else "—"
        lines.append(f"| {label} | {len(entry)} | {mean(entry, 'cells_written'):,.0f} | "
                     f"{mean(entry, 'pes_written'):,.0f} | {1e6 * energy:.2f} | {ratio} |")
    return [*lines, ""]
