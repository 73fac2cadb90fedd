"""``xma2 chip-frontier --noise``: the shipped tasks on a chip with device non-idealities.

Each of the four device effects alone, and all four together, at the named levels of
:data:`core.chip.config.NOISE_LEVELS`, on the backbone's own chip in crossbar fidelity; then
(optionally) each task adapted again for the noisy chip (``train.chip_noise``: the
chip's programming variation and stuck cells in every training step) and served on it.
Rows are written as they finish and a rerun with the same settings resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from core.chip.config import NOISE_LEVELS, CrossbarSettings, NonIdealities, noise_level
from core.engine import CrossbarEngine
from server.chip_adaptation import Readaptation, readapt
from server.frontier import (
    ShippedTask,
    predicted_labels,
    shipped_index,
    shipped_tasks,
)

logger = logging.getLogger(__name__)

NOISE_EFFECTS = {
    "stuck cells": ("stuck_on_rate", "stuck_off_rate"),
    "ADC offset": ("adc_offset_sigma",),
    "programming variation": ("programming_sigma",),
    "read noise": ("read_sigma",),
}
"""The four device effects, each measured alone (fields of :class:`NonIdealities`),
cheapest to emulate first (cells on the level grid take the packed ADC path)."""
ALL_FOUR = "all four"
ADAPTED = "all four, tasks adapted for this chip"


def only(noise: NonIdealities, effect: str) -> NonIdealities:
    """``noise`` with every effect but ``effect`` switched off (``ALL_FOUR``: all kept)."""
    names = NOISE_EFFECTS.get(effect, ())
    kept = {f.name: getattr(noise, f.name) for f in fields(noise)
            if f.name == "seed" or not names or f.name in names}
    return NonIdealities(**kept)


def _top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float((predicted == labels).float().mean())


def noise_study(out: Path, *, test_limit: int, command: str,
                backbone_file: Path | None = None, levels: tuple[str, ...] = ("low", "high"),
                effects: bool = True, names: Sequence[str] | None = None,
                adaptation: Readaptation | None = None) -> dict[str, Any]:
    """Crossbar top-1 of the shipped tasks under device non-idealities (see the module).

    All four effects at every level, then each alone (``effects``), then the tasks
    adapted for each level's chip (``adaptation``). ``minus_ideal`` is against the shipped task in
    ideal fidelity, the accuracy a user of the clean chip gets; ``agreement`` is the share of
    test images whose crossbar answer is the task's ideal answer. Level ``none`` is the chip
    without device effects (its periphery alone: one row, never adapted).
    """
    from core.atomic import atomic_write_bytes
    from core.backbones.shipped import git_revision, load_backbone

    index = shipped_index(names)
    backbone = load_backbone(backbone_file)
    fingerprint = backbone.fingerprint()
    tasks = shipped_tasks(test_limit=test_limit, names=names)
    settings = {"test_limit": test_limit, "backbone_fingerprint": fingerprint,
                "tasks": [t.name for t in tasks]}
    result: dict[str, Any] = {"command": command, "chip": backbone.config.describe(),
                              **settings, "git_revision": git_revision(),
                              "levels": {k: asdict(v) for k, v in NOISE_LEVELS.items()},
                              "rows": []}
    if out.is_file():
        previous = json.loads(out.read_text())
        if all(previous.get(k) == v for k, v in settings.items()):
            result["rows"] = previous.get("rows", [])
    done = {(r["level"], r["effect"]) for r in result["rows"]}
    clean = CrossbarEngine(backbone)
    ideal_answers = {}
    for task in tasks:
        clean.add_task(task.task)
        ideal_answers[task.name] = predicted_labels(clean, task, "ideal")
    ideal = {t.name: _top1(ideal_answers[t.name], t.labels) for t in tasks}
    result["ideal"] = {k: round(v, 2) for k, v in ideal.items()}

    def scored(top1_of: torch.Tensor, task: ShippedTask) -> dict[str, float]:
        top1 = _top1(top1_of, task.labels)
        return {"top1": round(top1, 2), "minus_ideal": round(top1 - ideal[task.name], 2),
                "agreement": round(_top1(top1_of, ideal_answers[task.name]), 2)}

    def record(row: dict[str, Any]) -> None:
        row["worst_minus_ideal"] = min(t["minus_ideal"] for t in row["tasks"].values())
        result["rows"].append(row)
        logger.info("%s %s: worst %+.1f points", row["level"], row["effect"],
                    row["worst_minus_ideal"])
        atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())

    # All four effects at every level first (the headline rows), then each effect alone,
    # cheapest first, so a study cut short still says the most.
    noisy = [level for level in levels if level != "none"]
    plan = [(level, ALL_FOUR) for level in levels]
    plan += [(level, effect) for effect in NOISE_EFFECTS if effects for level in noisy]
    for level, effect in plan:
        if (level, effect) in done:
            continue
        engine = CrossbarEngine(backbone, crossbar=CrossbarSettings(
            non_idealities=only(noise_level(level), effect)))
        row: dict[str, Any] = {"level": level, "effect": effect, "tasks": {}}
        started = time.perf_counter()
        for task in tasks:
            engine.add_task(task.task)
            row["tasks"][task.name] = scored(predicted_labels(engine, task, "crossbar"), task)
        row["seconds"] = round(time.perf_counter() - started, 1)
        record(row)
    for level in noisy:
        noise = noise_level(level)
        if adaptation is None or (level, ADAPTED) in done:
            continue
        engine = CrossbarEngine(backbone, crossbar=CrossbarSettings(non_idealities=noise))
        row = {"level": level, "effect": ADAPTED, "tasks": {}, "adaptation": asdict(adaptation)}
        started = time.perf_counter()
        for task in tasks:
            adapted = readapt(backbone, task, index[task.name], adaptation,
                              {"train.chip_noise": level})
            shipped_like = ShippedTask(task.name, adapted.task, task.images, task.labels)
            engine.add_task(adapted.task)
            clean.add_task(adapted.task)
            own = _top1(predicted_labels(clean, shipped_like, "ideal"), task.labels)
            row["tasks"][task.name] = {
                **scored(predicted_labels(engine, shipped_like, "crossbar"), task),
                "ideal_on_clean_chip": round(own, 2),
                "adapt_seconds": round(adapted.seconds, 1)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        record(row)
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The study as a table: top-1 per task, and the worst loss against ideal."""
    names = list(result["ideal"])
    lines = ["| level | effect | " + " | ".join(names)
             + " | worst vs ideal | lowest agreement with ideal |",
             "|---|---|" + "---|" * len(names) + "---|---|",
             "| | ideal fidelity | " + " | ".join(f"{result['ideal'][n]:.1f}"
                                                for n in names) + " | | |"]
    for row in result["rows"]:
        cells = " | ".join(f"{row['tasks'][n]['top1']:.1f}" for n in names)
        agreement = [row["tasks"][n].get("agreement") for n in names]
        lowest = (f"{min(a for a in agreement if a is not None):.1f}%"
                  if any(a is not None for a in agreement) else "")
        lines.append(f"| {row['level']} | {row['effect']} | {cells} | "
                     f"{row['worst_minus_ideal']:+.1f} | {lowest} |")
    return "\n".join(lines)
