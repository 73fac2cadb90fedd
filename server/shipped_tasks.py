"""The adapted tasks shipped with the server, and the command that makes them.

``xma2 build-default-tasks`` adapts the shipped backbone to a few built-in datasets with
XMA2 and writes one task archive each, plus ``tasks.json`` recording the command,
configuration, seed and accuracy. The server imports each archive into its store once.
"""

from __future__ import annotations

import fcntl
import functools
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

    def epochs_for(self, name: str) -> int:
        return self.epochs if self.epochs is not None else SHIPPED_EPOCHS[name]


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


def build_default_tasks(out: Path, names: list[str], config: BuildConfig, *,
                        backbone_file: Path | None, command: str) -> dict[str, Any]:
    """Adapt, test and export each named task to ``out``; returns the index written."""
    from core.backbones.shipped import git_revision, load_backbone
    from core.data.datasets import DatasetSpec, load_dataset
    from core.engine import CrossbarEngine
    from core.errors import ConfigError
    from core.learning import RunOptions, adapt, default_config
    from core.learning.common import accuracy
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
        result = adapt(config.method, model, data, name, method_config,
                       RunOptions(progress=True))
        assert result.task is not None
        engine = CrossbarEngine(model)
        engine.add_task(result.task)
        test = accuracy(functools.partial(engine.forward, task_id=name), data.test)
        metrics = {"val_accuracy": result.val_accuracy, "test_accuracy": test}
        hyper = {"dataset": spec.name, "image_size": spec.image_size, "preprocess": "fit",
                 "seed": spec.seed, "train_limit": spec.train_limit,
                 "test_limit": spec.test_limit, "config": result.config}
        with tempfile.TemporaryDirectory() as folder:
            store = TaskStore(folder, backbone_fingerprint=fingerprint, mapping=model.mapping)
            store.put(result.task, method=config.method, hyperparameters=hyper, metrics=metrics)
            archive = store.export(name, Path(folder) / f"{name}.tar")
            data_bytes = archive.read_bytes()
            store.close()
        atomic_write_bytes(out / f"{name}.tar", data_bytes)
        entries[name] = {
            "name": name, "archive": f"{name}.tar", "dataset": spec.name,
            "method": config.method, "metrics": metrics, "bytes": len(data_bytes),
            "sha256": sha256_hex(data_bytes), "replaced_pes": result.task.replaced_pes,
            "adapt_seconds": round(result.seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "build": {**config.__dict__, "epochs": epochs, "command": command,
                      "git_revision": git_revision()},
            "confidence": confidence_record(model, result.task, data),  # fitted by adapt
        }
        logger.info("%s: test accuracy %.1f%% (%d bytes)", name, 100 * test, len(data_bytes))
        index = {"tasks": [entries[n] for n in SHIPPED if n in entries]}
        atomic_write_bytes(index_path, (json.dumps(index, indent=1) + "\n").encode())
    return index
