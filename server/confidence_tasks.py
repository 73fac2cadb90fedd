"""Calibrate tasks that exist already, and measure what calibration does for the shipped ones.

``xma2 calibrate-tasks`` fits the temperature and OOD threshold (:mod:`core.confidence`)
of the shipped task archives (rewriting them and ``tasks.json``) or of the tasks in a
store (as a new version each), without retraining. ``xma2 calibration-report`` measures,
per shipped task on its test split, NLL, 15-bin ECE and accuracy before and after the
temperature, and how often the OOD flag fires on the task's own test images, on the
other shipped tasks' test images and on natural photo crops.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic import atomic_write_bytes
from core.confidence import (
    ECE_BINS,
    IN_DISTRIBUTION_FRACTION,
    Confidence,
    OodScore,
    auroc,
    expected_calibration_error,
    fit_confidence,
    nll,
)
from core.data.datasets import DatasetSpec, TaskDataset, load_dataset
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning.task_confidence import (
    STATISTICS_IMAGES,
    calibrate_task,
    engine_logits,
    split_logits,
    unaugmented,
)
from core.nn.calibration import AGREEMENT_PHOTOS, CALIBRATION_PHOTOS, calibration_images
from core.nn.model import CrossbarModel
from core.task_state import TaskState
from server.shipped_tasks import INDEX_FILE, SHIPPED_DIR
from task_store import TaskStore
from task_store.archive import DEFAULT_MAX_ARCHIVE_BYTES, read_archive
from task_store.format import Manifest, decode_task, sha256_hex

logger = logging.getLogger(__name__)

REPORT_TEST_LIMIT = 2000
PHOTO_CROPS = 1000


def dataset_spec(manifest: Manifest, *, test_limit: int | None = None) -> DatasetSpec:
    """The dataset a task was adapted on, from its recorded hyperparameters."""
    hyper = manifest.hyperparameters
    if not isinstance(hyper.get("dataset"), str):
        raise ConfigError(f"task {manifest.task} v{manifest.version} does not record its "
                          "dataset; it cannot be calibrated without retraining")
    return DatasetSpec(hyper["dataset"], image_size=int(hyper.get("image_size", 64)),
                       seed=int(hyper.get("seed", 0)), train_limit=hyper.get("train_limit"),
                       test_limit=test_limit if test_limit is not None
                       else hyper.get("test_limit"))


def confidence_record(model: CrossbarModel, task: TaskState, data: TaskDataset
                      ) -> dict[str, Any]:
    """What ``tasks.json`` records of a task's calibration: its temperature, threshold and
    score, and the validation NLL and ECE before and after the temperature."""
    engine = CrossbarEngine(model, max_prepared_tasks=1)
    engine.add_task(task)
    logits, labels = split_logits(engine, task.task_id, data.val)
    c = task.confidence
    return {
        "temperature": c.temperature, "ood_threshold": c.ood_threshold,
        "ood_score": c.ood_score.value, "val_images": len(labels),
        "val_nll_before": nll(logits, labels), "val_nll_after": nll(logits, labels,
                                                                    c.temperature),
        "val_ece_before": expected_calibration_error(logits.softmax(1), labels),
        "val_ece_after": expected_calibration_error(c.probabilities(logits), labels),
    }


def _archive_bytes(model: CrossbarModel, task: TaskState, manifest: Manifest) -> bytes:
    """The task as a fresh archive with the manifest's method, settings and metrics."""
    with tempfile.TemporaryDirectory() as folder:
        store = TaskStore(folder, backbone_fingerprint=model.fingerprint(),
                          mapping=model.mapping)
        try:
            store.put(task, method=manifest.method, hyperparameters=manifest.hyperparameters,
                      metrics=manifest.metrics)
            return store.export(task.task_id, Path(folder) / "task.tar").read_bytes()
        finally:
            store.close()


def calibrate_shipped(folder: Path, names: Sequence[str] | None, *, model: CrossbarModel,
                      command: str) -> dict[str, Any]:
    """Fit every named shipped task's confidence and rewrite its archive and ``tasks.json``
    (each file atomically). Returns the new index."""
    index_path = folder / INDEX_FILE
    index: dict[str, Any] = json.loads(index_path.read_text())
    known = [e["name"] for e in index["tasks"]]
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown shipped task(s) {unknown}; {folder} has {known}")
    for entry in index["tasks"]:
        if names and entry["name"] not in names:
            continue
        started = time.perf_counter()
        manifest, data = read_archive(folder / entry["archive"],
                                      max_bytes=DEFAULT_MAX_ARCHIVE_BYTES)
        dataset = load_dataset(dataset_spec(manifest))
        task = calibrate_task(model, decode_task(data, manifest), dataset.train, dataset.val)
        archive = _archive_bytes(model, task, manifest)
        atomic_write_bytes(folder / entry["archive"], archive)
        entry.update(bytes=len(archive), sha256=sha256_hex(archive))
        entry["confidence"] = {**confidence_record(model, task, dataset),
                               "command": command,
                               "seconds": round(time.perf_counter() - started, 1)}
        atomic_write_bytes(index_path, (json.dumps(index, indent=1) + "\n").encode())
        logger.info("%s: T %.3f, OOD threshold %.4g (%s)", entry["name"],
                    task.confidence.temperature, task.confidence.ood_threshold,
                    task.confidence.ood_score.value)
    return index


def calibrate_store(store: TaskStore, names: Sequence[str] | None, *, model: CrossbarModel,
                    data_root: Path | None = None) -> list[tuple[str, int, Confidence]]:
    """Give every named stored task (default: all) a calibrated new version, active if the
    calibrated one was. Returns (task, new version, confidence) per task."""
    records = {r.name: r for r in store.list()}
    unknown = sorted(set(names or ()) - set(records))
    if unknown:
        raise ConfigError(f"the store has no task(s) {unknown}; it has {sorted(records)}")
    done = []
    for name in names or sorted(records):
        record = records[name]
        if record.active_version is None:
            continue
        stored = store.get(name)
        dataset = load_dataset(dataset_spec(stored.manifest), data_root=data_root)
        task = calibrate_task(model, stored.task, dataset.train, dataset.val)
        version = store.put(task, method=stored.manifest.method,
                            hyperparameters=stored.manifest.hyperparameters,
                            metrics=stored.manifest.metrics)
        done.append((name, version.version, task.confidence))
    return done


# -- the report ------------------------------------------------------------------------


def _scores(confidence: Confidence, logits: Tensor) -> Tensor:
    return confidence.scores(logits).double()


def _photos(size: int) -> Tensor:
    """The held-out agreement photos (the README's cat among them), as the server fits them."""
    from PIL import Image

    from core.backbones.preprocess import preprocess_fit
    from core.nn.calibration import load_photo

    images = []
    for name in AGREEMENT_PHOTOS:
        array = (load_photo(name).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        images.append(preprocess_fit(Image.fromarray(array), size))
    return torch.stack(images)


def report(out: Path, folder: Path = SHIPPED_DIR, *, model: CrossbarModel,
           test_limit: int = REPORT_TEST_LIMIT, photo_crops: int = PHOTO_CROPS, seed: int = 0,
           command: str, git_revision: str) -> dict[str, Any]:
    """Measure every shipped task's calibration and OOD flag; write ``out`` (JSON) and the
    markdown table beside it."""
    index = json.loads((folder / INDEX_FILE).read_text())
    engine = CrossbarEngine(model)
    tasks: dict[str, tuple[TaskState, TaskDataset]] = {}
    for entry in index["tasks"]:
        manifest, archive = read_archive(folder / entry["archive"],
                                         max_bytes=DEFAULT_MAX_ARCHIVE_BYTES)
        task = decode_task(archive, manifest)
        engine.add_task(task)
        tasks[entry["name"]] = (task, load_dataset(dataset_spec(manifest,
                                                                test_limit=test_limit)))
    sizes = {d.spec.image_size for _, d in tasks.values()}
    crops = {s: calibration_images(photo_crops, s, seed=seed) for s in sizes}
    photos = {s: _photos(s) for s in sizes}
    tests = {name: d.test.batch(slice(0, len(d.test)))[0] for name, (_, d) in tasks.items()}
    rows = []
    for name, (task, data) in tasks.items():
        c = task.confidence
        size = data.spec.image_size
        logits, labels = split_logits(engine, name, data.test)
        val_logits, val_labels = split_logits(engine, name, data.val)
        train_logits, train_labels = split_logits(engine, name, unaugmented(data.train),
                                                  STATISTICS_IMAGES, seed=seed)
        others = torch.cat([engine_logits(engine, name, x) for other, x in tests.items()
                            if other != name and x.shape[-1] == size])
        crop_logits = engine_logits(engine, name, crops[size])
        photo_logits = engine_logits(engine, name, photos[size])
        accuracy = float((logits.argmax(1) == labels).double().mean())
        row: dict[str, Any] = {
            "task": name, "dataset": data.spec.name, "test_images": len(labels),
            "val_images": len(val_labels), "temperature": c.temperature,
            "ood_score": c.ood_score.value, "ood_threshold": c.ood_threshold,
            "accuracy_before": accuracy,
            "accuracy_after": float((c.probabilities(logits).argmax(1) == labels)
                                    .double().mean()),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, c.temperature),
            "ece_before": expected_calibration_error(logits.softmax(1), labels),
            "ece_after": expected_calibration_error(c.probabilities(logits), labels),
            "other_task_images": len(others), "photo_crops": len(crop_logits),
            "own_test_top_logit_median": float(logits.max(1).values.median()),
            "held_out_photos": {
                photo: {"top_label": task.head.labels[int(row_logits.argmax())],
                        "top_logit": float(row_logits.max()),
                        "top_probability_before": float(row_logits.softmax(0).max()),
                        "top_probability_after": float(c.probabilities(row_logits).max())}
                for photo, row_logits in zip(AGREEMENT_PHOTOS, photo_logits, strict=True)},
            "scores": {},
        }
        # every score with a threshold fitted the same way, on validation images only
        for kind in OodScore:
            fitted = c if kind is c.ood_score else fit_confidence(
                val_logits, val_labels, train_logits=train_logits, train_labels=train_labels,
                score=kind)
            own, other, crop, photo = (_scores(fitted, x) for x in
                                       (logits, others, crop_logits, photo_logits))
            flags = [fitted.flags(s) for s in (own, other, crop, photo)]
            row["scores"][kind.value] = {
                "served": kind is c.ood_score, "threshold": fitted.ood_threshold,
                "flag_rate_own_test": float(flags[0].double().mean()),
                "flag_rate_other_tasks": float(flags[1].double().mean()),
                "flag_rate_photo_crops": float(flags[2].double().mean()),
                "auroc_other_tasks": auroc(own, other), "auroc_photo_crops": auroc(own, crop),
                "held_out_photos_flagged": {p: bool(f) for p, f in zip(AGREEMENT_PHOTOS,
                                                                        flags[3],
                                                                        strict=True)},
            }
        rows.append(row)
        logger.info("%s: ECE %.4f -> %.4f, own test flagged %.1f%%", name, row["ece_before"],
                    row["ece_after"], 100 * row["scores"][c.ood_score.value]
                    ["flag_rate_own_test"])
    result = {
        "command": command, "git_revision": git_revision, "seed": seed,
        "test_limit": test_limit, "photo_crops": photo_crops,
        "crop_photos": list(CALIBRATION_PHOTOS), "held_out_photos": list(AGREEMENT_PHOTOS),
        "ece_bins": ECE_BINS, "in_distribution_fraction": IN_DISTRIBUTION_FRACTION,
        "statistics_images": STATISTICS_IMAGES, "fidelity": "ideal",
        "backbone_fingerprint": model.fingerprint(), "torch": torch.__version__,
        "tasks": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), markdown(result).encode())
    return result


def markdown(result: dict[str, Any]) -> str:
    """The report's tables (what docs/results/calibration.md holds)."""
    lines = [
        "# Calibration and OOD flag of the shipped tasks", "",
        f"Command: `{result['command']}` (git {result['git_revision']}, seed "
        f"{result['seed']}, ideal fidelity, which the default chip's crossbar fidelity "
        "equals bit for bit). Test splits: at most "
        f"{result['test_limit']} images per task. ECE: {result['ece_bins']} equal-width "
        "confidence bins. OOD thresholds keep "
        f"{result['in_distribution_fraction']:.0%} of each task's validation images in "
        "distribution.", "",
        "| task | test images | T | accuracy | NLL before | NLL after | ECE before | "
        "ECE after |", "|---|---|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        lines.append(
            f"| {r['task']} | {r['test_images']} | {r['temperature']:.3f} | "
            f"{100 * r['accuracy_after']:.1f}% | {r['nll_before']:.4f} | {r['nll_after']:.4f} | "
            f"{r['ece_before']:.4f} | {r['ece_after']:.4f} |")
    lines += [
        "", "OOD flag rates (share of images whose score is below the task's threshold) "
        f"on the task's own test images, on the other shipped tasks' test images and on "
        f"{result['photo_crops']} random crops of the scikit-image photos "
        f"({', '.join(result['crop_photos'])}); AUROC of the score separating the task's "
        "test images from each OOD set; held-out photos "
        f"({', '.join(result['held_out_photos'])}, whole, fitted as the server does) "
        "flagged. The served score is in bold.", "",
        "| task | score | own test flagged | other tasks flagged | photo crops flagged | "
        "AUROC other tasks | AUROC photo crops | held-out photos flagged |",
        "|---|---|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        for kind, s in r["scores"].items():
            name = f"**{kind}**" if s["served"] else kind
            photos = s["held_out_photos_flagged"]
            lines.append(
                f"| {r['task']} | {name} | {100 * s['flag_rate_own_test']:.1f}% | "
                f"{100 * s['flag_rate_other_tasks']:.1f}% | "
                f"{100 * s['flag_rate_photo_crops']:.1f}% | {s['auroc_other_tasks']:.3f} | "
                f"{s['auroc_photo_crops']:.3f} | {sum(photos.values())}/{len(photos)} |")
    return "\n".join(lines) + "\n"
