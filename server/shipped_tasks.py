"""The adapted tasks shipped with the server, and the command that makes them.

``xma2 build-default-tasks`` adapts the shipped backbone to a few built-in datasets with
XMA2 and writes one task archive each, plus ``tasks.json`` recording the command,
configuration, seed and accuracy (ideal and on the chip). On a lossy chip a second stage
trains each task further with the chip in the loop. The server imports each archive
into its store once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes
from core.learning.chip_loop import SERVED_CHIP_AGREEMENT
from task_store import FingerprintMismatch, TaskStore
from task_store.archive import DEFAULT_MAX_ARCHIVE_BYTES
from task_store.format import sha256_hex

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "default_tasks"
INDEX_FILE = "tasks.json"
IMPORTED_MARKER = "default_tasks.json"
IMPORT_LOCK = ".default_tasks.lock"
SHIPPED = {"fashion-mnist": "fashion_mnist", "mnist": "mnist5k", "animal-mnist": "animal_mnist"}
"""Task name -> built-in dataset."""
SHIPPED_EPOCHS = {"fashion-mnist": 5, "mnist": 12, "animal-mnist": 5}
"""Epochs per task: MNIST-5k has 3,600 training images, so 12 passes give it about as many
steps (672) as 5 give Animal-MNIST (7,200 images, 560) and Fashion-MNIST (10,000, 780)."""


@dataclass(frozen=True)
class BuildConfig:
    method: str = "xma2"
    image_size: int = 64
    train_limit: int = 10000
    test_limit: int = 2000
    epochs: int | None = None
    """Passes over the training images; None: each task's ``SHIPPED_EPOCHS``."""
    seed: int = 0
    chip_epochs: int | None = None
    """Passes of a second stage that trains the task further with the chip in the loop
    (``train.chip_periphery``, warm-started from the first stage's task), so that it
    classifies on the lossy chip as in ideal fidelity. None: each task's ``CHIP_EPOCHS``
    where the backbone's chip is lossy, 0 where it is provably lossless (crossbar = ideal)."""

    def epochs_for(self, name: str) -> int:
        return self.epochs if self.epochs is not None else SHIPPED_EPOCHS[name]

    chip_agreement: float = SERVED_CHIP_AGREEMENT
    """``train.chip_agreement`` of the chip stage: keeps each task's ideal fidelity
    answering as the chip does."""

    def chip_epochs_for(self, name: str, lossless: bool) -> int:
        if self.chip_epochs is not None:
            return self.chip_epochs
        return 0 if lossless else CHIP_EPOCHS[name]


CHIP_EPOCHS = {"fashion-mnist": 4, "mnist": 6, "animal-mnist": 3}
"""Epochs of the chip-in-the-loop stage on a lossy chip, about 340-620 steps each
(docs/results.md, "Starting from the shipped tasks": on the differential 5-bit chip, two
epochs left Fashion-MNIST 1.0 below its shipped accuracy, four reached it)."""


def import_default_tasks(store: TaskStore, folder: Path = SHIPPED_DIR) -> list[str]:
    """Import each shipped archive whose name the store lacks, once per store.

    A task the operator deleted stays deleted. Archives made on another backbone are
    skipped with a warning (a server on a custom backbone serves only its own tasks).
    """
    index_file = folder / INDEX_FILE
    if not index_file.exists():
        return []
    shipped = json.loads(index_file.read_text())["tasks"]
    # Servers (or Ray replicas) sharing a store start together: one imports, the others
    # then find the marker. A lock of its own, since the store's writer lock is taken
    # inside import_archive.
    with _locked(store.root / IMPORT_LOCK):
        return _import_once(store, folder, shipped)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _import_once(store: TaskStore, folder: Path, shipped: list[dict[str, Any]]) -> list[str]:
    marker = store.root / IMPORTED_MARKER
    done: set[str] = set(json.loads(marker.read_text())) if marker.exists() else set()
    existing = {r.name for r in store.list()}
    imported = []
    for entry in shipped:
        name = entry["name"]
        if name in done:
            continue
        if name not in existing:
            try:
                # Shipped with the server: the upload limit (XMA2_MAX_BODY_BYTES) is for
                # clients' archives, not for these.
                store.import_archive(folder / entry["archive"], name=name,
                                     max_bytes=DEFAULT_MAX_ARCHIVE_BYTES)
            except FingerprintMismatch as e:
                logger.warning("not importing the shipped task %s: %s", name, e)
                continue
            imported.append(name)
        done.add(name)
        atomic_write_bytes(marker, json.dumps(sorted(done)).encode())
    return imported


def _stage(result: Any) -> dict[str, Any]:
    """What ``tasks.json`` records of one training stage of a shipped task."""
    return {"config": result.config, "steps": result.steps,
            "seconds": round(result.seconds, 1), "val_accuracy": result.val_accuracy}


def _earlier_stages(folder: Path, name: str, dataset: str, config: BuildConfig
                    ) -> tuple[Any, list[dict[str, Any]]]:
    """The task ``name`` of an earlier build in ``folder`` (the same first-stage recipe) and
    what ``tasks.json`` records of its stages: the recipe in ideal fidelity, which no
    periphery changes, and any chip stages it has had; this build's chip stage continues
    from it."""
    from core.errors import ConfigError
    from task_store.archive import read_archive
    from task_store.format import decode_task

    previous = {e["name"]: e for e in json.loads((folder / INDEX_FILE).read_text())["tasks"]}
    if name not in previous:
        raise ConfigError(f"{folder} holds no shipped task {name!r} to start from")
    entry = previous[name]
    build = entry["build"]
    recipe = {"method": config.method, "image_size": config.image_size,
              "train_limit": config.train_limit, "seed": config.seed,
              "epochs": config.epochs_for(name)}
    theirs = {"method": entry["method"], **{k: build[k] for k in recipe if k != "method"}}
    if theirs != recipe or entry["dataset"] != dataset:
        raise ConfigError(f"{name} in {folder} was made with {theirs}, not this build's "
                          f"{recipe}; build it afresh (without --start-from)")
    manifest, data = read_archive(folder / entry["archive"])
    stages = [dict(st) for st in entry.get("stages") or [
        {"config": manifest.hyperparameters.get("config"),
         "seconds": entry.get("adapt_seconds"),
         "val_accuracy": entry["metrics"]["val_accuracy"]}]]
    # The stages that build ran itself are named by its archive and command.
    for stage in stages:
        if "archive_sha256" not in stage:
            stage.update(archive_sha256=entry["sha256"], command=build["command"],
                         git_revision=build["git_revision"])
    return decode_task(data, manifest), stages


def _test_metrics(engine: Any, name: str, split: Any) -> dict[str, float]:
    """Top-1 in ideal and crossbar fidelity, and the share of images on which they agree."""
    from server.frontier import ShippedTask, predicted_labels

    images, labels = split.batch(slice(0, len(split)))
    test = ShippedTask(name, engine.tasks[name], images, labels)
    ideal, chip = (predicted_labels(engine, test, f) for f in ("ideal", "crossbar"))
    return {"test_accuracy": float((ideal == labels).float().mean()),
            "crossbar_test_accuracy": float((chip == labels).float().mean()),
            "crossbar_agreement": float((chip == ideal).float().mean())}


def build_default_tasks(out: Path, names: list[str], config: BuildConfig, *,
                        backbone_file: Path | None, command: str,
                        start_from: Path | None = None) -> dict[str, Any]:
    """Adapt, test and export each named task to ``out``; returns the index written.

    ``start_from``: a folder of an earlier build whose tasks this build continues (the
    recipe in ideal fidelity, and any chip stages they had), so that only a
    chip-in-the-loop stage runs."""
    from core.backbones.shipped import git_revision, load_backbone
    from core.chip.adc import chip_is_lossless
    from core.data.datasets import DatasetSpec, load_dataset
    from core.engine import CrossbarEngine
    from core.errors import ConfigError
    from core.learning import RunOptions, adapt, default_config
    from core.learning.registry import override_config
    from server.confidence_tasks import confidence_record

    unknown = sorted(set(names) - set(SHIPPED))
    if unknown:
        raise ConfigError(f"unknown shipped task(s) {unknown}; choose from {sorted(SHIPPED)}")
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_FILE
    index = (json.loads(index_path.read_text()) if index_path.exists()
             else {"tasks": []})
    entries = {e["name"]: e for e in index["tasks"]}
    for name in names:
        started = time.perf_counter()
        spec = DatasetSpec(SHIPPED[name], image_size=config.image_size, seed=config.seed,
                           train_limit=config.train_limit, test_limit=config.test_limit)
        data = load_dataset(spec)
        epochs = config.epochs_for(name)
        method_config = default_config(config.method, epochs=epochs, seed=config.seed)
        model = load_backbone(backbone_file)
        fingerprint = model.fingerprint()
        assert model.mapping is not None
        if start_from is None:
            result = adapt(config.method, model, data, name, method_config,
                           RunOptions(progress=True))
            task, stages = result.task, [_stage(result)]
            val_accuracy = result.val_accuracy
        else:
            task, stages = _earlier_stages(start_from, name, spec.name, config)
            val_accuracy = stages[-1]["val_accuracy"]
        lossless = chip_is_lossless(model.mapping.crossbar_layers, model.config)
        chip_epochs = config.chip_epochs_for(name, lossless)
        if chip_epochs:
            loop_config = override_config(
                default_config(config.method, epochs=chip_epochs, seed=config.seed),
                {"train.chip_periphery": "true",
                 "train.chip_agreement": str(config.chip_agreement)})
            result = adapt(config.method, model, data, name, loop_config,
                           RunOptions(progress=True), initial=task)
            task, val_accuracy = result.task, result.val_accuracy
            stages.append({**_stage(result), "chip": model.config.describe()})
        assert task is not None
        engine = CrossbarEngine(model)
        engine.add_task(task)
        metrics = {"val_accuracy": val_accuracy, **_test_metrics(engine, name, data.test)}
        test, crossbar = metrics["test_accuracy"], metrics["crossbar_test_accuracy"]
        hyper = {"dataset": spec.name, "image_size": spec.image_size, "preprocess": "fit",
                 "seed": spec.seed, "train_limit": spec.train_limit,
                 "test_limit": spec.test_limit, "config": stages[0]["config"],
                 "stages": [st["config"] for st in stages]}
        with tempfile.TemporaryDirectory() as folder:
            store = TaskStore(folder, backbone_fingerprint=fingerprint, mapping=model.mapping)
            store.put(task, method=config.method, hyperparameters=hyper, metrics=metrics)
            archive = store.export(name, Path(folder) / f"{name}.tar")
            data_bytes = archive.read_bytes()
            store.close()
        atomic_write_bytes(out / f"{name}.tar", data_bytes)
        entries[name] = {
            "name": name, "archive": f"{name}.tar", "dataset": spec.name,
            "method": config.method, "metrics": metrics, "bytes": len(data_bytes),
            "sha256": sha256_hex(data_bytes), "replaced_pes": task.replaced_pes,
            "adapt_seconds": round(sum(float(st["seconds"]) for st in stages), 1),
            "stages": stages,
            "seconds": round(time.perf_counter() - started, 1),
            "build": {**config.__dict__, "epochs": epochs, "command": command,
                      "git_revision": git_revision()},
            "confidence": confidence_record(model, task, data),  # fitted by adapt
        }
        logger.info("%s: test accuracy %.1f%% ideal, %.1f%% on the chip (%d bytes)", name,
                    100 * test, 100 * crossbar, len(data_bytes))
        index = {"tasks": [entries[n] for n in SHIPPED if n in entries]}
        atomic_write_bytes(index_path, (json.dumps(index, indent=1) + "\n").encode())
    return index
