"""The adaptation grid: methods x datasets x P, with accuracy, storage and energy tables.

Every cell adapts the frozen backbone to one dataset with one method, serves the
resulting task state through :class:`core.engine.CrossbarEngine` (ideal
fidelity) for its test accuracy, and prices it:

- reprogramming energy (:func:`core.chip.programming.programming_cost`, level
  changes): ``reprogram_j`` prices the task's spare-PE codes written over the
  backbone's codes of the same PEs, ``reprogram_erased_j`` the same codes
  written into erased (level 0) cells. Fine-tuning and piggyback rewrite the
  backbone's own PEs in place, so they are charged ``reprogram_j``; XMA2's spare
  PEs are other crossbars, which held another task or nothing, so it is charged
  ``reprogram_erased_j`` (:func:`charged_reprogram_j`).
- inference energy: the engine's per-image energy times the test images.
- storage: task-state bytes against the backbone's weight bytes (paper 5.1.1).

Results are written after every cell, so an interrupted grid resumes where it
stopped (``resume``).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.chip.programming import ProgrammingConfig, programming_cost, weight_codes_to_cell_levels
from core.cli.switching import price_grid_switches, save_task_tensors, switching_markdown, task_file
from core.data.datasets import DatasetSpec, TaskDataset, load_dataset
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning.column_masks import ColumnMaskConfig
from core.learning.common import RunOptions, accuracy
from core.learning.registry import (
    METHODS,
    adapt,
    default_config,
    override_config,
    setting_names,
)
from core.learning.task_model import pe_blocks
from core.nn.model import CrossbarModel
from core.ops.fold import to_row_groups
from core.task_state import TaskState

logger = logging.getLogger(__name__)

__all__ = ["GridConfig", "cell_energy", "render_markdown", "reprogramming_cost", "run_grid",
           "task_storage"]

DATASET_TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist5k": "MNIST-5k",
                  "animal_mnist": "Animal-MNIST", "digits": "digits"}
METHOD_TITLES = {"finetune_fp32": "fine-tuning, fp32 (upper bound)",
                 "finetune_qat": "fine-tuning, 4-bit QAT", "piggyback": "piggyback",
                 "xbm": "XBM (binary column mask)", "xma": "XMA (shift mask, N=3)",
                 "xma2": "XMA2", "head_bn": "head + BatchNorm only"}


@dataclass(frozen=True)
class GridConfig:
    """What the grid runs; everything that decides a number is recorded with it."""

    datasets: tuple[str, ...] = ("fashion_mnist", "mnist5k", "animal_mnist")
    methods: tuple[str, ...] = ("finetune_fp32", "finetune_qat", "piggyback", "xbm", "xma",
                                "xma2", "head_bn")
    pe_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    """XMA2's P values."""
    image_size: int = 64
    train_limit: int = 3000
    """Training images per dataset (a fixed, stratified subset): 30 cells x 3 epochs fit
    about 80-90 minutes of one thread on a shared 2-core machine."""
    test_limit: int = 2000
    epochs: int = 3
    seed: int = 0
    settings: tuple[tuple[str, str], ...] = ()
    """Dotted overrides of the methods' defaults (``("mask.init_logit", "6")``), applied to
    every method whose config has that setting."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        for key, _ in self.settings:
            if not any(key in setting_names(default_config(m)) for m in self.methods):
                raise ConfigError(f"no method in the grid has the setting {key!r}")
        if not self.pe_fractions or any(not 0 <= p <= 1 for p in self.pe_fractions):
            raise ConfigError("pe_fractions must be fractions in [0, 1], e.g. 0.05,0.1")

    def cells(self) -> list[tuple[str, str, float | None]]:
        """Method-major, XMA2 at its first P first and its other P values last, so that a
        grid cut short still has the main comparison on every dataset."""
        entries: list[tuple[str, float | None]] = []
        for method in self.methods:
            if METHODS[method].takes_pe_fraction:
                entries.append((method, self.pe_fractions[0]))
            else:
                entries.append((method, None))
        entries += [(method, p) for method in self.methods
                    if METHODS[method].takes_pe_fraction for p in self.pe_fractions[1:]]
        return [(dataset, method, p) for method, p in entries for dataset in self.datasets]


def cell_key(dataset: str, method: str, pe_fraction: float | None) -> str:
    return f"{dataset}/{method}" + ("" if pe_fraction is None else f"@{pe_fraction:g}")


# -- pricing -------------------------------------------------------------------------------


def _spare_writes(model: CrossbarModel, task: TaskState) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """(backbone codes, task codes, valid) of every spare-PE weight, flattened, per layer."""
    layers = dict(model.layers())
    old, new, valid = [], [], []
    for name, state in task.layers.items():
        if not state.replaced_pes:
            continue
        layer = layers[name]
        mapping = layer.mapping
        assert mapping is not None
        grouped = to_row_groups(layer.weight_codes.to(torch.int16), mapping)
        ones = to_row_groups(torch.ones_like(layer.weight_codes, dtype=torch.int16), mapping)
        old.append(pe_blocks(grouped, mapping)[state.pe_mask].reshape(-1))
        valid.append(pe_blocks(ones, mapping)[state.pe_mask].reshape(-1).bool())
        new.append(state.spare_codes.to(torch.int16).reshape(-1))
    if not old:
        empty = torch.zeros(0, dtype=torch.int16)
        return empty, empty, empty.bool()
    return torch.cat(old), torch.cat(new), torch.cat(valid)


def reprogramming_cost(model: CrossbarModel, task: TaskState,
                       config: ProgrammingConfig | None = None) -> dict[str, float]:
    """Writing the task's spare PEs: from the backbone's levels, and from erased cells."""
    cfg = config or ProgrammingConfig(bits_per_cell=model.config.bits_per_cell)
    result = {"reprogram_j": 0.0, "reprogram_erased_j": 0.0, "cells_written": 0,
              "spare_weights": 0}
    layers = dict(model.layers())
    for name, state in task.layers.items():
        if not state.replaced_pes:
            continue
        single = TaskState(task.task_id, task.shift_levels, task.head, {name: state})
        old, new, valid = _spare_writes(model, single)
        bits = layers[name].weight_bits
        encoding = model.config.weight_encoding
        old_levels = weight_codes_to_cell_levels(old[valid], weight_bits=bits,
                                                 bits_per_cell=cfg.bits_per_cell,
                                                 encoding=encoding)
        new_levels = weight_codes_to_cell_levels(new[valid], weight_bits=bits,
                                                 bits_per_cell=cfg.bits_per_cell,
                                                 encoding=encoding)
        report = programming_cost(old_levels, new_levels, cfg)
        erased = programming_cost(torch.zeros_like(new_levels), new_levels, cfg)
        result["reprogram_j"] += report.energy_j
        result["reprogram_erased_j"] += erased.energy_j
        result["cells_written"] += report.cells_written
        result["spare_weights"] += int(valid.sum())
    return result


IN_PLACE_METHODS = frozenset(spec.name for spec in METHODS.values() if spec.in_place)
"""Methods that rewrite the backbone's own PEs (their old levels are the backbone's)."""


def charged_reprogram_j(method: str, energy: dict[str, Any]) -> float:
    """The reprogramming energy a method pays: in place from the backbone's levels, spare
    PEs from erased cells (a spare PE held another task's weights or nothing)."""
    return float(energy["reprogram_j"] if method in IN_PLACE_METHODS
                 else energy["reprogram_erased_j"])


def cell_energy(engine: CrossbarEngine, model: CrossbarModel, task: TaskState,
                image_size: int, test_images: int, method: str) -> dict[str, float]:
    """Reprogramming + inference energy (J) of one task over its test set."""
    per_image = engine.energy_per_image(task.task_id, (image_size, image_size))
    energy = reprogramming_cost(model, task)
    energy["inference_per_image_j"] = per_image.total_j
    energy["inference_j"] = per_image.total_j * test_images
    energy["total_j"] = charged_reprogram_j(method, energy) + energy["inference_j"]
    return energy


def _total_j(cell: dict[str, Any]) -> float:
    return charged_reprogram_j(cell["method"], cell) + float(cell["inference_j"])


def backbone_weight_bytes(model: CrossbarModel) -> float:
    return sum(layer.weight_codes.numel() * layer.weight_bits for _, layer in model.layers()) / 8


def task_storage(model: CrossbarModel, task: TaskState, method: str,
                 mask_levels: int | None) -> dict[str, float]:
    """Bytes of a task's masks, spare-PE weights and digital state (paper 5.1.1)."""
    mapping = model.mapping
    assert mapping is not None
    columns = sum(m.row_groups * m.out_channels for m in mapping.crossbar_layers)
    weights = sum(m.weight_rows * m.out_channels for m in mapping.crossbar_layers)
    mask_bits = 0
    if method == "piggyback":
        mask_bits = weights  # one bit per crossbar weight (its element-wise mask)
    elif mask_levels is not None:
        mask_bits = columns * max(1, math.ceil(math.log2(mask_levels + 2)))
        if METHODS[method].takes_pe_fraction:
            mask_bits += mapping.num_pes  # the tier-1 PE mask
    bits = {name: layer.weight_bits for name, layer in model.layers()}
    spare_bits = sum(s.spare_codes.numel() * bits[n] for n, s in task.layers.items())
    digital = (task.head.weight.numel() + task.head.bias.numel()
               + sum(t.numel() for t in task.digital.values())) * 4
    backbone = backbone_weight_bytes(model)
    return {"mask_bytes": mask_bits / 8, "mask_vs_backbone": mask_bits / 8 / backbone,
            "spare_bytes": spare_bits / 8, "digital_bytes": float(digital),
            "backbone_weight_bytes": backbone}


def _mask_levels(config: Any) -> int | None:
    """Shift levels N of a method's column mask (None: it learns none)."""
    if isinstance(getattr(config, "mask", None), ColumnMaskConfig):
        levels = config.mask.shift_levels
        return 3 if levels is None else int(levels)
    return None


# -- the grid ------------------------------------------------------------------------------


def _write_outputs(prefix: Path, result: dict[str, Any]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(prefix.with_suffix(".json"))
    rows = list(result["cells"].values())
    if rows:
        fields = sorted({k for r in rows for k, v in r.items() if not isinstance(v, dict | list)})
        with prefix.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)


def _same_run(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether cells of a previous grid answer this one (it may add datasets, methods, P)."""
    def decisive(grid: dict[str, Any]) -> dict[str, Any]:
        grid = json.loads(json.dumps(grid))  # tuples as lists, as the file holds them
        kept = {k: v for k, v in grid.items() if k not in ("datasets", "methods", "pe_fractions")}
        return kept | {"settings": grid.get("settings", [])}  # files from before settings

    return decisive(previous) == decisive(current)


def resume_from(previous: dict[str, Any], result: dict[str, Any]) -> None:
    """Reuse a previous run's cells and its priced switches when it is the same run: a
    grid resumed with fewer datasets (or without the task files it priced from) keeps
    every pair priced before."""
    if _same_run(previous.get("grid", {}), result["grid"]) and previous.get(
            "backbone_fingerprint") == result["backbone_fingerprint"]:
        result["cells"] = previous.get("cells", {})
        result["switching"] = previous.get("switching", {})


def run_grid(config: GridConfig, model: CrossbarModel, serve_model: CrossbarModel,
             out_prefix: Path, *, command: str, git_revision: str, resume: bool = True,
             threads: int = 1, progress: bool = False) -> dict[str, Any]:
    """Run every cell not already in ``out_prefix.json`` and write JSON/CSV after each.

    ``model`` is trained from (and must stay untouched); ``serve_model`` is a second copy of
    the same backbone that the engine drives.
    """
    path = out_prefix.with_suffix(".json")
    result: dict[str, Any] = {
        "command": command, "git_revision": git_revision, "grid": asdict(config),
        "seed": config.seed, "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "backbone": model.backbone_name,
        "backbone_fingerprint": model.fingerprint(), "crossbar_config": model.config.to_dict(),
        "cells": {},
    }
    if resume and path.is_file():
        resume_from(json.loads(path.read_text()), result)
    engine = CrossbarEngine(serve_model, max_prepared_tasks=2)
    tasks_dir = tasks_folder(out_prefix)
    data_cache: dict[str, TaskDataset] = {}
    for dataset, method, p in config.cells():
        key = cell_key(dataset, method, p)
        if key in result["cells"]:
            continue
        if dataset not in data_cache:
            data_cache.clear()
            data_cache[dataset] = load_dataset(DatasetSpec(
                dataset, image_size=config.image_size, seed=config.seed,
                train_limit=config.train_limit, test_limit=config.test_limit))
        data = data_cache[dataset]
        method_config = default_config(method, pe_fraction=p, epochs=config.epochs,
                                       seed=config.seed)
        accepted = setting_names(method_config)
        method_config = override_config(
            method_config, {k: v for k, v in config.settings if k in accepted})
        short = dataset.partition(":")[0]  # LAYOUT:PATH and imagefolder:PATH: no path
        task_id = f"{short}-{method}" + ("" if p is None else f"-p{round(100 * p)}")
        task_id = task_id.replace("_", "-")
        started = time.perf_counter()
        adapted = adapt(method, model, data, task_id, method_config,
                        RunOptions(progress=progress))
        row: dict[str, Any] = {
            "dataset": dataset, "method": method, "pe_fraction": p,
            "train_images": len(data.train), "val_images": len(data.val),
            "test_images": len(data.test), "steps": adapted.steps,
            "val_accuracy": adapted.val_accuracy, "config": adapted.config,
            "history": adapted.history, "details": adapted.details,
        }
        if adapted.task is not None:
            engine.add_task(adapted.task)
            predict = functools.partial(engine.forward, task_id=adapted.task.task_id)
            row["test_accuracy"] = accuracy(predict, data.test)
            row.update(cell_energy(engine, model, adapted.task, config.image_size,
                                   len(data.test), method))
            row.update(task_storage(model, adapted.task, method,
                                    _mask_levels(method_config)))
            row["replaced_pes"] = adapted.task.replaced_pes
            engine.remove_task(adapted.task.task_id)
            tasks_dir.mkdir(parents=True, exist_ok=True)
            save_task_tensors(task_file(tasks_dir, key), adapted.task)
        else:
            assert adapted.trained_model is not None
            row["test_accuracy"] = accuracy(adapted.trained_model, data.test)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["git_revision"] = git_revision  # a resumed grid mixes cells of several revisions
        result["cells"][key] = row
        logger.info("%s: test %.2f%% val %.2f%% (%.0f s)", key, 100 * row["test_accuracy"],
                    100 * row["val_accuracy"], row["seconds"])
        price_grid_switches(result, tasks_dir, model, IN_PLACE_METHODS)
        _write_outputs(out_prefix, result)
    price_grid_switches(result, tasks_dir, model, IN_PLACE_METHODS)
    _write_outputs(out_prefix, result)
    return result


def tasks_folder(out_prefix: Path) -> Path:
    """Where a grid keeps its cells' task states (for pricing task switches on resume)."""
    return out_prefix.with_name(out_prefix.name + ".tasks")


_ROW_ORDER = ("finetune_fp32", "finetune_qat", "piggyback", "xbm", "xma", "xma2", "head_bn")


def _rows(result: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(label, method, P) of every table row, in the paper's order."""
    grid = result["grid"]
    rows: list[tuple[str, str, float | None]] = []
    for method in _ROW_ORDER:
        if method not in grid["methods"]:
            continue
        if method == "xma2":
            rows += [(f"XMA2, P = {100 * p:g}%", method, p)
                     for p in sorted(grid["pe_fractions"])]
        else:
            rows.append((METHOD_TITLES[method], method, None))
    return rows


def _cell(result: dict[str, Any], dataset: str, method: str,
          p: float | None) -> dict[str, Any] | None:
    cell: dict[str, Any] | None = result["cells"].get(cell_key(dataset, method, p))
    return cell


def _table(result: dict[str, Any], value: Any, header: str) -> list[str]:
    datasets = result["grid"]["datasets"]
    lines = [f"| {header} | " + " | ".join(DATASET_TITLES.get(d, d) for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for label, method, p in _rows(result):
        cells = [_cell(result, d, method, p) for d in datasets]
        lines.append(f"| {label} | " + " | ".join("—" if c is None else value(c)
                                                 for c in cells) + " |")
    return lines


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None,
           images: int | None = None) -> float | None:
    """Total energy of ``a`` over ``b``: over their test sets, or over ``images`` images."""
    if a is None or b is None or "inference_j" not in a or "inference_j" not in b:
        return None
    if images is None:
        return _total_j(a) / _total_j(b)

    def total(c: dict[str, Any]) -> float:
        return charged_reprogram_j(c["method"], c) + images * float(c["inference_per_image_j"])

    return total(a) / total(b) if total(b) else None


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _plots(result: dict[str, Any], out_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["grid"]
    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, dataset in enumerate(grid["datasets"]):
        color = f"C{i}"
        xs, ys = [], []
        xma = _cell(result, dataset, "xma", None)
        if xma is not None:
            xs.append(0.0)
            ys.append(100 * xma["test_accuracy"])
        for p in sorted(grid["pe_fractions"]):
            c = _cell(result, dataset, "xma2", p)
            if c is not None:
                xs.append(100 * p)
                ys.append(100 * c["test_accuracy"])
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=f"{DATASET_TITLES.get(dataset, dataset)}: "
                                                     "XMA (P=0) and XMA2")
        for method, style in (("piggyback", "--"), ("finetune_qat", ":")):
            c = _cell(result, dataset, method, None)
            if c is not None:
                ax.axhline(100 * c["test_accuracy"], color=color, linestyle=style, linewidth=1)
    ax.set_xlabel("P: PEs replaced by spare PEs (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy vs P (dashed: piggyback, dotted: 4-bit fine-tuning)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_prefix.parent / f"{out_prefix.name}_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    names.append(path.name)

    rows = [(label, m, p) for label, m, p in _rows(result) if m != "finetune_fp32"]
    reprogram, inference, labels = [], [], []
    for label, method, p in rows:
        cells = [c for d in grid["datasets"] if (c := _cell(result, d, method, p)) is not None]
        if cells:
            labels.append(label.replace(" (binary column mask)", "").replace(", 4-bit QAT", "")
                          .replace(" (shift mask, N=3)", "").replace("head + BatchNorm only",
                                                                     "head+BN"))
            reprogram.append(1e6 * sum(charged_reprogram_j(method, c) for c in cells)
                             / len(cells))
            inference.append(1e6 * sum(c["inference_j"] for c in cells) / len(cells))
    if labels:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = list(range(len(labels)))
        floor = 0.01  # uJ: log axis; zero energy is drawn at the floor and labelled
        ax.bar([x - 0.2 for x in xs], [max(v, floor) for v in reprogram], width=0.4,
               label="reprogramming (as charged)")
        ax.bar([x + 0.2 for x in xs], inference, width=0.4,
               label="inference over the test set")
        for x, v in zip(xs, reprogram, strict=True):
            if v == 0:
                ax.annotate("0", (x - 0.2, floor), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, labels, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_ylabel("energy per task (uJ, mean over datasets)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_prefix.parent / f"{out_prefix.name}_energy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        names.append(path.name)
    return names


def render_markdown(result: dict[str, Any], out_prefix: Path) -> str:
    """The results page: accuracy, run time, storage and energy tables and two plots;
    written to ``out_prefix.md`` and returned."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    grid = result["grid"]
    datasets = grid["datasets"]
    cells = result["cells"]
    expected = [cell_key(*c) for c in GridConfig(
        datasets=tuple(datasets), methods=tuple(grid["methods"]),
        pe_fractions=tuple(grid["pe_fractions"])).cells()]
    missing = [k for k in expected if k not in cells]
    any_cell: dict[str, Any] = next(iter(cells.values()), {})
    settings = ", ".join(f"`{k}={v}`" for k, v in grid.get("settings", []))
    name = out_prefix.name
    lines = [
        "# Adaptation results: XMA2 and its baselines",
        "",
        "Made by",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"git {result['git_revision']}, seed {grid['seed']}, {result['threads']} torch "
        f"thread(s), torch {result['torch']}; backbone {result['backbone']} (fingerprint "
        f"{result['backbone_fingerprint'][:16]}). {grid['image_size']}x{grid['image_size']} "
        f"inputs, {grid['epochs']} epochs over at most {grid['train_limit']} training images "
        f"(a fixed stratified subset), test on at most {grid['test_limit']} images. "
        + (f"Settings changed from the defaults: {settings}. " if settings else "")
        + "Every 4-bit method's test accuracy is measured on the task state served by the "
        "engine (ideal fidelity). Methods and defaults: [docs/adaptation.md]"
        f"(../adaptation.md). Raw numbers: [{name}.json]({name}.json), "
        f"[{name}.csv]({name}.csv).",
        "",
    ]
    if missing:
        lines += [f"**Not run (grid cut short):** {', '.join(missing)}.", ""]
    revisions: dict[str, list[str]] = {}
    for key, cell in cells.items():
        revisions.setdefault(cell.get("git_revision", "unknown"), []).append(key)
    if len(revisions) > 1:
        lines += ["Cells were computed by several revisions (the grid resumed): " + "; ".join(
            f"{rev}: {', '.join(sorted({cells[k]['method'] for k in keys}))} "
            f"({len(keys)} cells)" for rev, keys in revisions.items()) + ".", ""]
    lines += ["## Accuracy (test top-1 %)", ""]
    lines += _table(result, lambda c: f"{100 * c['test_accuracy']:.2f}", "method")
    lines += ["", "Validation top-1 % (the split any choice was made on):", ""]
    lines += _table(result, lambda c: f"{100 * c['val_accuracy']:.2f}", "method")
    lines += ["", "Images: " + ", ".join(
        f"{DATASET_TITLES.get(d, d)} {c['train_images']}/{c['val_images']}/{c['test_images']}"
        for d in datasets if (c := next((v for v in cells.values() if v["dataset"] == d),
                                        None)) is not None) + " (train/val/test).", ""]
    verdicts = []
    for d in datasets:
        x2, xma, pb = (_cell(result, d, "xma2", 0.1), _cell(result, d, "xma", None),
                       _cell(result, d, "piggyback", None))
        if x2 and xma and pb:
            holds = x2["test_accuracy"] > xma["test_accuracy"] > pb["test_accuracy"]
            verdicts.append(f"{DATASET_TITLES.get(d, d)}: {'holds' if holds else 'does not hold'}"
                            f" ({100 * x2['test_accuracy']:.2f} / {100 * xma['test_accuracy']:.2f}"
                            f" / {100 * pb['test_accuracy']:.2f})")
    if verdicts:
        lines += ["Paper's ordering XMA2 (P = 10%) > XMA > piggyback: " + "; ".join(verdicts)
                  + ".", ""]
    def learned(c: dict[str, Any]) -> str:
        counts = c.get("details", {}).get("column_code_counts")
        parts = []
        if counts and sum(counts):
            total = sum(counts)
            parts.append(f"{100 * (total - counts[-1]) / total:.1f}% / "
                         f"{100 * counts[0] / total:.1f}%")
        if c.get("cells_written") is not None and c["method"] != "xma":
            parts.append(f"{c['cells_written']:,} cells")
        return "; ".join(parts) or "—"

    lines += ["What each task changed: share of frozen-PE columns whose mask is not 1 / is 0 "
              "(switched off), and cells whose level differs from the backbone's:", ""]
    lines += _table(result, learned, "method")
    lines += ["", "## Run time per cell (s, whole adaptation + test)", ""]
    lines += _table(result, lambda c: f"{c['seconds']:.0f}", "method")
    lines += ["", "## Storage per task (paper 5.1.1)", ""]
    if any_cell.get("backbone_weight_bytes"):
        lines += [f"Backbone weights: {any_cell['backbone_weight_bytes'] / 1e6:.2f} MB "
                  "(every layer's codes at its precision). Mask = tier-2 column mask "
                  "(3 bits per logical column for N = 3, 1 bit for XBM) + tier-1 PE mask "
                  "(1 bit per PE, XMA2); piggyback's is its element-wise mask (1 bit per "
                  "crossbar weight), for comparison. As served, piggyback and 4-bit "
                  "fine-tuning carry every PE as a spare PE.", ""]
    lines += ["| method | mask (KB) | mask / backbone weights | spare-PE weights (KB) | "
              "head + BatchNorm (KB) |", "|---|---|---|---|---|"]
    for label, method, p in _rows(result):
        c = next((_cell(result, d, method, p) for d in datasets
                  if _cell(result, d, method, p) is not None), None)
        if c is None or "mask_bytes" not in c:
            continue
        lines.append(f"| {label} | {c['mask_bytes'] / 1e3:.1f} | {100 * c['mask_vs_backbone']:.2f}%"
                     f" | {c['spare_bytes'] / 1e3:.1f} | {c['digital_bytes'] / 1e3:.1f} |")
    lines += ["", "## Energy per task", "",
              "Reprogramming is priced by `core.chip.programming` (level changes; 4 V, 50 ns "
              "pulses, 2-bit cells). Fine-tuning and piggyback rewrite the backbone's own "
              "PEs in place and pay the cells whose level changes; XMA2 writes its spare "
              "PEs, separate crossbars that held another task or nothing, and pays writing "
              "them from erased cells (its cost over the backbone's levels is shown for "
              "comparison). Inference: the engine's energy per image (columns masked to 0 are "
              "switched off) times the test images.", ""]
    for d in datasets:
        ref = _cell(result, d, "xma2", 0.1)
        rows_d = [(label, c) for label, m, p in _rows(result)
                  if (c := _cell(result, d, m, p)) is not None and "inference_j" in c]
        if not rows_d:
            continue
        n_test = rows_d[0][1]["test_images"]
        lines += [f"**{DATASET_TITLES.get(d, d)}** ({n_test} test images), uJ; the charged "
                  "reprogramming column is in bold:", "",
                  "| method | cells written (over the backbone) | reprogramming over the "
                  "backbone | reprogramming from erased | inference | total | total / XMA2 "
                  "(P = 10%) |", "|---|---|---|---|---|---|---|"]
        for label, c in rows_d:
            over, erased = 1e6 * c["reprogram_j"], 1e6 * c["reprogram_erased_j"]
            in_place = c["method"] in IN_PLACE_METHODS
            over_s = f"**{over:.1f}**" if in_place else f"{over:.1f}"
            erased_s = f"{erased:.1f}" if in_place else f"**{erased:.1f}**"
            lines.append(f"| {label} | {c['cells_written']:,} | {over_s} | {erased_s} | "
                         f"{1e6 * c['inference_j']:.1f} | {1e6 * _total_j(c):.1f} | "
                         f"{_fmt_ratio(_ratio(c, ref))} |")
        lines.append("")
    ratio_rows = []
    for d in datasets:
        ref = _cell(result, d, "xma2", 0.1)
        row = f"| {DATASET_TITLES.get(d, d)} |"
        for method in ("finetune_qat", "piggyback"):
            other = _cell(result, d, method, None)
            row += (f" {_fmt_ratio(_ratio(other, ref))} |"
                    f" {_fmt_ratio(_ratio(other, ref, images=1))} |"
                    f" {_fmt_ratio(_ratio(other, ref, images=0))} |")
        ratio_rows.append(row)
    lines += ["Energy ratios against XMA2 (P = 10%); the paper reports 13.72x (fine-tuning) "
              "and 4.38x (piggyback) for total energy. How large the ratio is depends on "
              "how many inferences share one reprogramming: with the whole test set, "
              "with one image per task switch, and for reprogramming alone:", "",
              "| dataset | fine-tuning / XMA2: test set | one image | reprogramming only | "
              "piggyback / XMA2: test set | one image | reprogramming only |",
              "|---|---|---|---|---|---|---|", *ratio_rows, ""]
    lines += switching_markdown(result, METHOD_TITLES)
    plots = _plots(result, out_prefix) if cells else []
    if plots:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    text = "\n".join(lines)
    out_prefix.with_suffix(".md").write_text(text)
    return text
