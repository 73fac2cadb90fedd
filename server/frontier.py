"""``xma2 chip-frontier``: accuracy against energy over the chip's periphery design space.

Every point is one periphery for the same programmed backbone: weight encoding
(offset or differential), rows read per ADC conversion, ADC bits and DAC mode. The
backbone's ADC ranges are calibrated again for each point (the chip's rule,
:meth:`core.nn.model.CrossbarModel.calibrate_adc`, on ``calibration`` photo crops), and the
shipped tasks classify their own test images in crossbar fidelity. Energy per image
comes from the energy model of that point; its ratio to the paper's periphery
(:data:`core.chip.config.PAPER_CHIP`) is the cost of making the chip accurate.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.chip.adc import chip_is_lossless
from core.chip.config import PAPER_CHIP, CrossbarSettings, DacMode, WeightEncoding
from core.data.datasets import DatasetSpec, load_dataset
from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from core.task_state import TaskState
from server.shipped_tasks import INDEX_FILE, SHIPPED_DIR
from task_store.archive import read_archive
from task_store.format import decode_task

logger = logging.getLogger(__name__)

ACCURACY_TOLERANCE = 1.0
"""Points of top-1 a chip may lose against ideal fidelity on every shipped task."""
PROBE_IMAGES = 250
"""Test images per task after which a point far from ideal stops early."""
PROBE_MARGIN = 10.0
"""A point whose top-1 is this many points below ideal on some task after
:data:`PROBE_IMAGES` images is recorded as it stands: it cannot be the default."""


@dataclass(frozen=True)
class ChipPoint:
    weight_encoding: str
    rows_per_read: int
    adc_bits: int
    dac_mode: str

    @property
    def label(self) -> str:
        return (f"{self.weight_encoding}/{self.rows_per_read} rows/{self.dac_mode}/"
                f"{self.adc_bits}-bit ADC")

    def changes(self) -> dict[str, Any]:
        return {"weight_encoding": WeightEncoding(self.weight_encoding),
                "rows_per_read": self.rows_per_read, "adc_bits": self.adc_bits,
                "dac_mode": DacMode(self.dac_mode)}


def grid(encodings: Sequence[str], rows: Sequence[int], adc_bits: Sequence[int],
         dac_modes: Sequence[str]) -> list[ChipPoint]:
    return [ChipPoint(e, r, b, d) for e, r, b, d in itertools.product(encodings, rows,
                                                                      adc_bits, dac_modes)]


@dataclass
class ShippedTask:
    name: str
    task: TaskState
    images: torch.Tensor
    labels: torch.Tensor


def shipped_tasks(folder: Path = SHIPPED_DIR, test_limit: int = 1000,
                  names: Sequence[str] | None = None) -> list[ShippedTask]:
    """The shipped task archives with the first ``test_limit`` test images of each."""
    index = json.loads((folder / INDEX_FILE).read_text())
    out = []
    for entry in index["tasks"]:
        if names and entry["name"] not in names:
            continue
        manifest, data = read_archive(folder / entry["archive"])
        build = entry["build"]
        spec = DatasetSpec(entry["dataset"], image_size=build["image_size"], seed=build["seed"],
                           train_limit=build["train_limit"], test_limit=test_limit)
        test = load_dataset(spec).test
        x, y = test.batch(slice(0, len(test)))
        out.append(ShippedTask(entry["name"], decode_task(data, manifest), x, y))
    return out


def shipped_index(names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The shipped tasks' index entries (recipe, dataset) by name; unknown ``names`` are
    refused before any work."""
    from core.errors import ConfigError

    index = {e["name"]: e for e in json.loads((SHIPPED_DIR / INDEX_FILE).read_text())["tasks"]}
    unknown = sorted(set(names or ()) - set(index))
    if unknown:
        raise ConfigError(f"unknown shipped task(s) {unknown}; choose from {sorted(index)}")
    return index


def ideal_top1(backbone: CrossbarModel, tasks: Sequence[ShippedTask]) -> dict[str, float]:
    """Each task's top-1 % on its test images in ideal fidelity."""
    engine = CrossbarEngine(backbone)
    top1 = {}
    for task in tasks:
        engine.add_task(task.task)
        predicted = predicted_labels(engine, task, "ideal")
        top1[task.name] = 100 * float((predicted == task.labels).float().mean())
    return top1


def predicted_labels(engine: CrossbarEngine, task: ShippedTask, fidelity: str,
                 batch: int = 64, first: int = 0, stop: int | None = None) -> torch.Tensor:
    out = []
    stop = len(task.images) if stop is None else min(stop, len(task.images))
    for start in range(first, stop, batch):
        logits = engine.forward(task.images[start : min(start + batch, stop)], task.name,
                                fidelity)
        out.append(logits.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate_point(model: CrossbarModel, point: ChipPoint, tasks: Sequence[ShippedTask],
                   ideal: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One calibrated periphery: crossbar top-1 of every task, its energy and its cost."""
    engine = CrossbarEngine(model, crossbar=CrossbarSettings(adc_bits=point.adc_bits,
                                                             dac_mode=DacMode(point.dac_mode)))
    row: dict[str, Any] = {**point.__dict__, "label": point.label, "tasks": {}}
    energies, conversions, seconds, images = [], [], 0.0, 0
    lossless = True
    predictions: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for task in tasks:  # a probe first: a point far from ideal stops there
        engine.add_task(task.task)
        predictions[task.name] = predicted_labels(engine, task, "crossbar", stop=PROBE_IMAGES)
    row["early_stop"] = any(
        100 * float((predictions[t.name] == t.labels[:PROBE_IMAGES]).float().mean()
                     - (ideal[t.name][:PROBE_IMAGES] == t.labels[:PROBE_IMAGES]).float().mean())
        < -PROBE_MARGIN for t in tasks)
    if not row["early_stop"]:
        for task in tasks:
            rest = predicted_labels(engine, task, "crossbar", first=PROBE_IMAGES)
            predictions[task.name] = torch.cat([predictions[task.name], rest])
    seconds = time.perf_counter() - started
    for task in tasks:
        predicted = predictions[task.name]
        count = len(predicted)
        images += count
        labels, reference = task.labels[:count], ideal[task.name][:count]
        size = tuple(task.images.shape[-2:])
        report = engine.energy_per_image(task.name, size)  # type: ignore[arg-type]
        ops = engine.ops_per_image(task.name, size)  # type: ignore[arg-type]
        programs = engine.prepare(task.name).programs or {}
        lossless = lossless and all(p.lossless for p in programs.values())
        top1 = 100 * float((predicted == labels).float().mean())
        top1_ideal = 100 * float((reference == labels).float().mean())
        row["tasks"][task.name] = {
            "top1": round(top1, 2), "ideal_top1": round(top1_ideal, 2),
            "minus_ideal": round(top1 - top1_ideal, 2),
            "agreement": round(100 * float((predicted == reference).float().mean()), 2),
            "energy_j": report.total_j, "adc_j": report.adc_j,
            "cell_read_j": report.cell_read_j, "adc_conversions": ops.adc_conversions,
            "cell_reads": ops.cell_reads, "test_images": count}
        energies.append(report.total_j)
        conversions.append(ops.adc_conversions)
    row["energy_j"] = sum(energies) / len(energies)
    row["adc_conversions"] = sum(conversions) / len(conversions)
    row["worst_minus_ideal"] = min(t["minus_ideal"] for t in row["tasks"].values())
    row["lossless"] = lossless
    row["emulation_ms_per_image"] = round(1000 * seconds / max(1, images), 3)
    return row


def provably_lossless(model: CrossbarModel, point: ChipPoint) -> bool:
    """Whether every read of every crossbar layer fits the ADC at unit step (then crossbar
    fidelity equals ideal fidelity bit for bit, whatever the data)."""
    chip = replace(model.config, **point.changes())
    return chip_is_lossless((replace(m, rows_per_read=point.rows_per_read,
                                     weight_encoding=chip.weight_encoding)
                             for m in model.mapping.crossbar_layers), chip
                            ) if model.mapping else False


def point_costs(model: CrossbarModel, point: ChipPoint, tasks: Sequence[ShippedTask]
                ) -> dict[str, Any]:
    """Energy and operation counts of a point, from the energy model alone (no emulation)."""
    chip = model.with_chip(**point.changes())
    engine = CrossbarEngine(chip)
    energies, conversions, cell_reads = [], [], []
    for task in tasks:
        engine.add_task(task.task)
        size = tuple(task.images.shape[-2:])
        energies.append(engine.energy_per_image(task.name, size).total_j)  # type: ignore[arg-type]
        ops = engine.ops_per_image(task.name, size)  # type: ignore[arg-type]
        conversions.append(ops.adc_conversions)
        cell_reads.append(ops.cell_reads)
    return {"energy_j": sum(energies) / len(energies),
            "adc_conversions": sum(conversions) / len(conversions),
            "cell_reads": sum(cell_reads) / len(cell_reads),
            "lossless": provably_lossless(model, point)}


def chip_frontier(backbone: CrossbarModel, points: Sequence[ChipPoint],
                  tasks: Sequence[ShippedTask], calibration: torch.Tensor, *,
                  done: dict[str, dict[str, Any]] | None = None,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every point's row (points in ``done`` are reused, so a sweep resumes).

    Every point is priced. A point that costs more than some provably lossless point is
    dominated (that point answers exactly as ideal fidelity for less energy) and is not
    emulated; every other point is calibrated and emulated, cheapest first.
    """
    costs = {p.label: point_costs(backbone, p, tasks) for p in points}
    lossless_energy = min((c["energy_j"] for c in costs.values() if c["lossless"]),
                          default=float("inf"))
    ideal_engine = CrossbarEngine(backbone)
    ideal = {}
    for task in tasks:
        ideal_engine.add_task(task.task)
        ideal[task.name] = predicted_labels(ideal_engine, task, "ideal")
    rows = []
    chips: dict[tuple[str, int, int], CrossbarModel] = {}
    # the chip's own ADC resolution first, cheapest first: the default is found early
    order = sorted(points, key=lambda p: (p.adc_bits != backbone.config.adc_bits,
                                          costs[p.label]["energy_j"]))
    for point in order:
        if done and point.label in done:
            rows.append(done[point.label])
            continue
        cost = costs[point.label]
        if not cost["lossless"] and cost["energy_j"] > lossless_energy:
            row = {**point.__dict__, "label": point.label, **cost, "emulated": False,
                   "tasks": {}, "worst_minus_ideal": None, "emulation_ms_per_image": None}
            rows.append(row)
            if on_row is not None:
                on_row(row)
            continue
        key = (point.weight_encoding, point.rows_per_read, point.adc_bits)
        if key not in chips:  # both DAC modes are calibrated at once
            started = time.perf_counter()
            chips[key] = backbone.with_chip(weight_encoding=WeightEncoding(key[0]),
                                            rows_per_read=key[1])
            chips[key].calibrate_adc(calibration, adc_bits=point.adc_bits)
            logger.info("calibrated %s for %d-bit ADCs in %.0f s", key[:2], point.adc_bits,
                        time.perf_counter() - started)
        model = chips[key]
        row = {**evaluate_point(model, point, tasks, ideal), "emulated": True}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    paper = next((r for r in rows if all(r[k] == v for k, v in PAPER_CHIP.items())), None)
    if paper is None:
        paper_point = ChipPoint(**{k: PAPER_CHIP[k] for k in ChipPoint.__dataclass_fields__})
        paper = point_costs(backbone, paper_point, tasks)
    for row in rows:
        row["energy_vs_paper"] = (round(row["energy_j"] / paper["energy_j"], 3)
                                  if paper else None)
    return rows


def pareto(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Emulated points no other emulated point beats on both energy and worst accuracy."""
    rows = [r for r in rows if r.get("emulated", True)]
    return [r for r in rows if not any(
        o["energy_j"] <= r["energy_j"] and o["worst_minus_ideal"] >= r["worst_minus_ideal"]
        and (o["energy_j"] < r["energy_j"] or o["worst_minus_ideal"] > r["worst_minus_ideal"])
        for o in rows)]


def default_chip(rows: Sequence[dict[str, Any]], adc_bits: int = 5,
                 tolerance: float = ACCURACY_TOLERANCE) -> dict[str, Any] | None:
    """The lowest-energy point of ``adc_bits`` within ``tolerance`` of ideal on every task."""
    fit = [r for r in rows if r["adc_bits"] == adc_bits and r.get("emulated", True)
           and r["worst_minus_ideal"] >= -tolerance]
    return min(fit, key=lambda r: r["energy_j"]) if fit else None


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    names = next((list(r["tasks"]) for r in rows if r.get("tasks")), [])
    front = {r["label"] for r in pareto(rows)}
    chosen = result.get("default_chip")
    lines = ["| encoding | rows/read | DAC | ADC | " + " | ".join(names)
             + " | worst vs ideal | test images/task | energy/image (nJ) | vs paper "
             "| conversions/image | lossless | emulation ms/image | Pareto |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["adc_bits"], r["energy_j"])):
        mark = "**default**" if chosen and r["label"] == chosen else (
            "yes" if r["label"] in front else "")
        if r.get("emulated", True):
            accs = " | ".join(f"{r['tasks'][n]['top1']:.1f}" for n in names)
            worst = f"{r['worst_minus_ideal']:+.1f}"
            cost = f"{r['emulation_ms_per_image']:.1f}"
            count = str(min(t["test_images"] for t in r["tasks"].values()))
        else:
            accs = " | ".join("—" for _ in names)
            worst, cost, mark, count = "dominated", "—", "", "—"
        lines.append(
            f"| {r['weight_encoding']} | {r['rows_per_read']} | {r['dac_mode']} | "
            f"{r['adc_bits']} | {accs} | {worst} | {count} | "
            f"{1e9 * r['energy_j']:.1f} | {r['energy_vs_paper']} | "
            f"{r['adc_conversions']:,.0f} | {'yes' if r['lossless'] else 'no'} | "
            f"{cost} | {mark} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("emulated", True)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"offset": "o", "differential": "s"}
    for bits in sorted({r["adc_bits"] for r in rows}):
        for encoding, marker in markers.items():
            sel = [r for r in rows if r["adc_bits"] == bits and r["weight_encoding"] == encoding]
            if sel:
                ax.scatter([1e9 * r["energy_j"] for r in sel],
                           [r["worst_minus_ideal"] for r in sel], marker=marker,
                           label=f"{encoding}, {bits}-bit ADC", alpha=0.8)
    front = sorted(pareto(rows), key=lambda r: r["energy_j"])
    ax.plot([1e9 * r["energy_j"] for r in front], [r["worst_minus_ideal"] for r in front],
            "k--", linewidth=0.8, label="Pareto front")
    ax.axhline(-ACCURACY_TOLERANCE, color="grey", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("energy per image (nJ, log)")
    ax.set_ylabel("worst top-1 minus ideal over the shipped tasks (points)")
    ax.set_ylim(bottom=max(-100.0, min(r["worst_minus_ideal"] for r in rows) - 2), top=2)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(out: Path, points: Sequence[ChipPoint], *, test_limit: int, calibration_images: int,
        seed: int, command: str, backbone_file: Path | None = None) -> dict[str, Any]:
    """The sweep as ``xma2 chip-frontier`` runs it: JSON rewritten after every point (a
    rerun with the same settings resumes), then the table and the plot beside it."""
    from core.atomic import atomic_write_bytes
    from core.backbones.shipped import git_revision, load_backbone
    from core.nn.calibration import calibration_images as crops

    backbone = load_backbone(backbone_file)
    settings = {"test_limit": test_limit, "calibration_images": calibration_images,
                "seed": seed, "backbone_weights": backbone.weights_fingerprint()}
    previous = json.loads(out.read_text()) if out.exists() else {}
    done = ({r["label"]: r for r in previous.get("rows", [])}
            if previous.get("settings") == settings else {})
    tasks = shipped_tasks(test_limit=test_limit)
    calibration = crops(calibration_images, int(tasks[0].images.shape[-1]), seed=seed)
    result: dict[str, Any] = {"command": command, "settings": settings,
                              "git_revision": git_revision(), "torch": torch.__version__,
                              "rows": list(done.values())}

    def save(row: dict[str, Any]) -> None:
        result["rows"] = [r for r in result["rows"] if r["label"] != row["label"]] + [row]
        atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
        logger.info("%s: %s", row["label"], "dominated" if not row.get("emulated", True) else
                    f"worst {row['worst_minus_ideal']:+.1f} points, "
                    f"{1e9 * row['energy_j']:.0f} nJ/image")

    result["rows"] = chip_frontier(backbone, points, tasks, calibration, done=done, on_row=save)
    chosen = default_chip(result["rows"])
    result["default_chip"] = chosen["label"] if chosen else None
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


def price(out: Path, points: Sequence[ChipPoint], *, command: str,
          backbone_file: Path | None = None) -> dict[str, Any]:
    """Every point priced by the energy model alone, with whether it is provably lossless
    (then its accuracy is ideal fidelity's, exactly): the cheap half of the frontier."""
    from core.atomic import atomic_write_bytes
    from core.backbones.shipped import git_revision, load_backbone

    backbone = load_backbone(backbone_file)
    tasks = shipped_tasks(test_limit=1)
    paper_point = ChipPoint(**{k: PAPER_CHIP[k] for k in ChipPoint.__dataclass_fields__})
    paper = point_costs(backbone, paper_point, tasks)["energy_j"]
    rows = []
    for point in points:
        cost = point_costs(backbone, point, tasks)
        rows.append({**point.__dict__, "label": point.label, **cost,
                     "energy_vs_paper": round(cost["energy_j"] / paper, 3)})
    result = {"command": command, "git_revision": git_revision(),
              "backbone_weights": backbone.weights_fingerprint(), "rows": rows}
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    lines = ["| encoding | rows/read | DAC | ADC | energy/image (nJ) | vs paper "
             "| conversions/image | cell reads/image | provably lossless |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["adc_bits"], r["energy_j"])):
        lines.append(f"| {r['weight_encoding']} | {r['rows_per_read']} | {r['dac_mode']} | "
                     f"{r['adc_bits']} | {1e9 * r['energy_j']:,.0f} | {r['energy_vs_paper']} | "
                     f"{r['adc_conversions']:,.0f} | {r['cell_reads']:,.0f} | "
                     f"{'yes' if r['lossless'] else 'no'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result
