"""``xma2 chip-frontier --adapt-on-chip``: can a lossy periphery serve tasks adapted on it?

A cheaper periphery than the default (fewer ADC conversions, a multi-bit DAC) clips
and rounds column sums, and the shipped tasks, adapted on the float view of the
backbone, lose accuracy there. For each point and shipped task this study serves
three tasks on that chip, in crossbar fidelity, on the same test images:

- the shipped task as it is;
- the shipped recipe (method, seed, image size) adapted again (from the backbone, or
  with ``from_shipped`` from the shipped task itself) with the chip in the
  training loop (``train.chip_periphery``: every crossbar layer's forward value is the
  chip's, its gradient the float layer's);
- the same recipe and budget adapted without the loop (the control: what the loop adds
  over a fresh adaptation of the same length).

The backbone stays the one frozen backbone (its ADC ranges calibrated for the point).
Rows are written as they finish and a rerun with the same settings resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from server.frontier import (
    ChipPoint,
    ShippedTask,
    ideal_top1,
    predicted_labels,
    shipped_index,
    shipped_tasks,
)

logger = logging.getLogger(__name__)

LOOPED = "adapted with the chip in the loop"
CONTROL = "adapted without the loop (same budget)"
SHIPPED = "shipped task"


@dataclass(frozen=True)
class Readaptation:
    """The shipped recipe of a task (method, seed, image size), with its training images
    and epochs bounded to fit a study's time."""

    train_limit: int = 10000
    epochs: int | None = None
    """None: the task's shipped epochs."""
    warm_start_images: int | None = None
    """Training images whose (chip) features fit the initial head; None: the method's."""
    seed: int | None = None
    """Seed of the training run (initialisation, batches, ranking); None: the shipped
    recipe's. The dataset split, and so the test images, stay the shipped task's."""
    control: bool = True
    """Also adapt without the loop (the on-chip study's control)."""
    from_shipped: bool = False
    """Start from the shipped task (its PEs, codes, masks, BatchNorm terms and head)
    instead of the backbone: the shipped task trained further for the chip."""
    settings: tuple[tuple[str, str], ...] = ()
    """Config overrides of the recipe (``("mask.lr", "0.05")``, ...)."""


def readapt(model: CrossbarModel, task: ShippedTask, entry: dict[str, Any],
            budget: Readaptation, overrides: dict[str, Any]) -> Any:
    """The shipped task's recipe run again on ``model`` with config ``overrides``."""
    from core.data.datasets import DatasetSpec, load_dataset
    from core.learning import adapt, default_config
    from core.learning.common import RunOptions
    from core.learning.registry import override_config

    build = entry["build"]
    spec = DatasetSpec(entry["dataset"], image_size=build["image_size"], seed=build["seed"],
                       train_limit=min(budget.train_limit, build["train_limit"]), test_limit=1)
    config = default_config(entry["method"], epochs=budget.epochs or build["epochs"],
                            seed=build["seed"] if budget.seed is None else budget.seed)
    settings = {**dict(budget.settings), **overrides}
    if budget.warm_start_images is not None:
        settings["train.warm_start_images"] = budget.warm_start_images
    config = override_config(config, {k: str(v).lower() if isinstance(v, bool) else str(v)
                                      for k, v in settings.items()})
    with torch.set_grad_enabled(True):
        return adapt(entry["method"], model, load_dataset(spec), task.name, config,
                     RunOptions(progress=logger.isEnabledFor(logging.INFO)),
                     initial=task.task if budget.from_shipped else None)


def _top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100 * float((predicted == labels).float().mean()), 2)


def adapt_on_chip(out: Path, points: Sequence[ChipPoint], *, test_limit: int,
                  calibration_images: int, seed: int, command: str, budget: Readaptation,
                  names: Sequence[str] | None = None,
                  backbone_file: Path | None = None) -> dict[str, Any]:
    """Crossbar top-1 of the shipped, looped and control tasks on each point (see the module)."""
    from core.atomic import atomic_write_bytes
    from core.backbones.shipped import git_revision, load_backbone
    from core.nn.calibration import calibration_images as crops

    index = shipped_index(names)
    backbone = load_backbone(backbone_file)
    tasks = shipped_tasks(test_limit=test_limit, names=names)
    settings = json.loads(json.dumps({  # as the JSON holds them (tuples are lists)
        "test_limit": test_limit, "calibration_images": calibration_images, "seed": seed,
        "backbone_weights": backbone.weights_fingerprint(), "budget": asdict(budget)}))
    result: dict[str, Any] = {"command": command, "settings": settings,
                              "git_revision": git_revision(), "torch": torch.__version__,
                              "rows": []}
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("settings") == settings:
            result["rows"] = previous.get("rows", [])
    done = {(r["label"], r["task"]) for r in result["rows"]}
    ideal = {k: round(v, 2) for k, v in ideal_top1(backbone, tasks).items()}
    calibration = crops(calibration_images, int(tasks[0].images.shape[-1]), seed=seed)
    for point in points:
        if all((point.label, t.name) in done for t in tasks):
            continue
        started = time.perf_counter()
        chip = backbone.with_chip(**point.changes())
        chip.calibrate_adc(calibration)
        logger.info("%s: calibrated in %.0f s", point.label, time.perf_counter() - started)
        for task in tasks:
            if (point.label, task.name) in done:
                continue
            row = {**point.__dict__, "label": point.label, "task": task.name,
                   "ideal_shipped": ideal[task.name], "variants": {}}
            row["variants"][SHIPPED] = _serve(chip, task, task)
            variants: list[tuple[str, dict[str, Any]]] = [
                (LOOPED, {"train.chip_periphery": True})]
            if budget.control:
                variants.append((CONTROL, {}))
            for variant, overrides in variants:
                adapted = readapt(chip, task, index[task.name], budget, overrides)
                served = _serve(chip, task, ShippedTask(task.name, adapted.task, task.images,
                                                        task.labels))
                served["adapt_seconds"] = round(adapted.seconds, 1)
                served["val_accuracy"] = round(100 * adapted.val_accuracy, 2)
                row["variants"][variant] = served
                logger.info("%s, %s, %s: crossbar %.1f%% (ideal %.1f%%)", point.label,
                            task.name, variant, served["crossbar_top1"], served["ideal_top1"])
            result["rows"].append(row)
            atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    return result


def _serve(chip: CrossbarModel, test: ShippedTask, task: ShippedTask) -> dict[str, Any]:
    engine = CrossbarEngine(chip)
    engine.add_task(task.task)
    started = time.perf_counter()
    on_chip = predicted_labels(engine, task, "crossbar")
    seconds = time.perf_counter() - started
    ideal = predicted_labels(engine, task, "ideal")
    return {"crossbar_top1": _top1(on_chip, test.labels),
            "ideal_top1": _top1(ideal, test.labels), "agreement": _top1(on_chip, ideal),
            "test_images": len(test.labels), "serve_seconds": round(seconds, 1)}


def _cell(variants: dict[str, Any], name: str) -> str:
    if name not in variants:
        return ""
    v = variants[name]
    return f"{v['crossbar_top1']:.1f} ({v['ideal_top1']:.1f})"


def markdown(result: dict[str, Any]) -> str:
    """One line per point and task: crossbar (ideal) top-1 of each variant."""
    lines = ["| chip | task | ideal (shipped) | shipped on chip | adapted in the loop "
             "| adapted without (same budget) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [_cell(row["variants"], name) for name in (SHIPPED, LOOPED, CONTROL)]
        lines.append(f"| {row['label']} | {row['task']} | {row['ideal_shipped']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
