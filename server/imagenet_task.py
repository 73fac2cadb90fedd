"""The built-in ``imagenet`` task: distilled when its archive fits the backbone, else bare.

``xma2 build-imagenet-task`` distills the task (:mod:`core.learning.imagenet_task`),
measures its top-1 agreement with the fp32 model on the held-out crops ``xma2 fidelity``
uses, beside the bare task's (the fp32 classifier and BatchNorms on the 4-bit
crossbars, nothing trained), and writes it
as a task archive (``imagenet.tar``, through the task store like the shipped tasks) with a
JSON record (``imagenet.json``). The archive is not imported into the store (the name
``imagenet`` is the built-in's): the runtime reads it at start-up
(:func:`builtin_imagenet_task`) and serves it as the built-in task when it was made on the
loaded backbone; otherwise it serves the bare task and says why in the log.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_bytes
from core.backbones.shipped import IMAGENET_TASK, imagenet_task
from core.errors import Xma2Error
from core.nn.model import CrossbarModel
from core.task_state import TaskState
from server.shipped_tasks import SHIPPED_DIR
from task_store import TaskStore, decode_task
from task_store.archive import read_archive
from task_store.format import sha256_hex

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_ARCHIVE", "IMAGENET_RECORD", "REJECTED_RECORD", "build_imagenet_task",
           "builtin_imagenet_task", "write_imagenet_archive"]

IMAGENET_ARCHIVE = "imagenet.tar"
IMAGENET_RECORD = "imagenet.json"
REJECTED_RECORD = "imagenet.rejected.json"
METHOD = "imagenet-distillation"
"""The method a distilled built-in task's manifest records."""


def builtin_imagenet_task(model: CrossbarModel, folder: Path | None = None) -> TaskState:
    """The ``imagenet`` task to serve on ``model``: the distilled one in ``folder``
    (default: the server's shipped folder) when it was made on this backbone (same
    fingerprint) and is valid, else the bare one. Reads one archive of about 5 MB and
    builds the fp32 classifier and BatchNorm terms only when it falls back."""
    path = (folder or SHIPPED_DIR) / IMAGENET_ARCHIVE
    if not path.is_file():
        logger.info("no distilled ImageNet task (%s): serving the fp32 classifier and "
                    "BatchNorms on the 4-bit crossbars (make one with "
                    "`xma2 build-imagenet-task`)", path)
        return imagenet_task(model)
    try:
        manifest, data = read_archive(path)
        fingerprint = model.fingerprint()
        if manifest.backbone_fingerprint != fingerprint:
            logger.warning("the distilled ImageNet task %s was made on backbone %s, this server "
                           "runs %s: serving the fp32 classifier and BatchNorms on "
                           "the 4-bit crossbars instead (rebuild it with "
                           "`xma2 build-imagenet-task`)", path,
                           manifest.backbone_fingerprint[:12], fingerprint[:12])
            return imagenet_task(model)
        task = decode_task(data, manifest)
        assert model.mapping is not None
        task.validate(model.mapping)
    except (Xma2Error, ValueError) as e:
        logger.warning("cannot serve the distilled ImageNet task %s (%s): serving the fp32 "
                       "classifier and BatchNorms on the 4-bit crossbars instead", path, e)
        return imagenet_task(model)
    if task.task_id != IMAGENET_TASK or len(task.head.labels) != 1000:
        logger.warning("%s holds task %r with %d classes, not the 1000-class %r: serving the "
                       "fp32 classifier and BatchNorms on the 4-bit crossbars instead", path,
                       task.task_id, len(task.head.labels), IMAGENET_TASK)
        return imagenet_task(model)
    logger.info("serving the distilled ImageNet task: archive=%s agreement=%s replaced_pes=%d",
                path, manifest.metrics.get("agreement_ideal", "unknown"), task.replaced_pes)
    return task


def write_imagenet_archive(task: TaskState, model: CrossbarModel, out: Path, *,
                           hyperparameters: dict[str, Any], metrics: dict[str, float]) -> bytes:
    """Write ``task`` as ``out/imagenet.tar`` (through a scratch store, as the shipped tasks
    are written); returns the archive's bytes."""
    assert model.mapping is not None
    with tempfile.TemporaryDirectory() as scratch:
        store = TaskStore(scratch, backbone_fingerprint=model.fingerprint(),
                          mapping=model.mapping)
        try:
            store.put(task, method=METHOD, hyperparameters=hyperparameters, metrics=metrics)
            archive = store.export(task.task_id, Path(scratch) / IMAGENET_ARCHIVE)
            data = archive.read_bytes()
        finally:
            store.close()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / IMAGENET_ARCHIVE, data)
    return data


def build_imagenet_task(out: Path, config: Any, *, backbone_file: Path | None, command: str,
                        agreement_crops: int = 200, crossbar_crops: int = 200,
                        keep_worse: bool = False) -> dict[str, Any]:
    """Distill, measure and write the built-in task to ``out``; returns the record written.

    A task that agrees with fp32 less often than the bare one (ideal fidelity) is not
    written unless ``keep_worse``: its record goes to ``imagenet.rejected.json`` and an
    earlier archive stays served.

    ``config``: a :class:`core.learning.imagenet_task.ImagenetTaskConfig`.
    ``agreement_crops``: held-out crops agreement is measured on in ideal fidelity (200:
    those of ``xma2 fidelity``); ``crossbar_crops``: the first so many of them are also run
    in crossbar fidelity when the backbone's chip is lossy (0: never).
    """
    from core.backbones import build_backbone
    from core.backbones.shipped import git_revision, load_backbone
    from core.chip.adc import chip_is_lossless
    from core.chip.config import Fidelity
    from core.engine import CrossbarEngine
    from core.learning.imagenet_task import distill_imagenet_task, fp32_top1, top1_agreement
    from core.nn.calibration import AGREEMENT_PHOTOS
    from core.nn.calibration import agreement_crops as held_out_crops

    started = time.perf_counter()
    model = load_backbone(backbone_file)
    assert model.mapping is not None
    fp32 = build_backbone(model.backbone_name)
    crops = held_out_crops(agreement_crops, seed=0)
    reference = fp32_top1(fp32, crops)
    lossless = chip_is_lossless(model.mapping.crossbar_layers, model.config)
    on_chip = 0 if lossless else min(crossbar_crops, agreement_crops)

    def measure(task: TaskState) -> dict[str, float]:
        engine = CrossbarEngine(model)
        engine.add_task(task)
        began = time.perf_counter()
        result = {"ideal": top1_agreement(lambda x: engine.forward(x, task.task_id), crops,
                                          reference)}
        result["ideal_seconds"] = round(time.perf_counter() - began, 1)
        if on_chip:
            began = time.perf_counter()
            result["crossbar"] = top1_agreement(
                lambda x: engine.forward(x, task.task_id, Fidelity.CROSSBAR), crops[:on_chip],
                reference[:on_chip], batch_size=8)
            result["crossbar_seconds"] = round(time.perf_counter() - began, 1)
        return result

    before = measure(imagenet_task(model, fp32))
    logger.info("bare ImageNet task: agreement with fp32 %s", before)
    began = time.perf_counter()
    losses: list[float] = []
    task = distill_imagenet_task(model, config, fp32=fp32,
                                 on_step=lambda _s, loss, _a: losses.append(loss))
    train_seconds = time.perf_counter() - began
    after = measure(task)
    logger.info("distilled ImageNet task: agreement with fp32 %s (%.0f s of training)", after,
                train_seconds)
    metrics = {"agreement_ideal": after["ideal"], "agreement_ideal_bare": before["ideal"]}
    if on_chip:
        metrics |= {"agreement_crossbar": after["crossbar"],
                    "agreement_crossbar_bare": before["crossbar"]}
    config_record = json.loads(json.dumps(asdict(config)))
    tail = losses[-20:]
    record: dict[str, Any] = {
        "name": IMAGENET_TASK, "archive": IMAGENET_ARCHIVE, "method": METHOD,
        "command": command, "config": config_record, "seed": config.seed,
        "git_revision": git_revision(), "torch": torch.__version__,
        "backbone": model.backbone_name, "backbone_fingerprint": model.fingerprint(),
        "crossbar_config": model.config.to_dict(), "chip_lossless": lossless,
        "agreement": {
            "held_out": {"photos": list(AGREEMENT_PHOTOS), "crops": len(crops),
                         "image_size": 224, "seed": 0, "crossbar_crops": on_chip},
            "bare": before, "distilled": after,
        },
        "loss": {"first": losses[0] if losses else None,
                 "last_20_mean": sum(tail) / len(tail) if tail else None},
        "steps": config.steps, "replaced_pes": task.replaced_pes,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, config.steps), 2),
    }
    if after["ideal"] < before["ideal"] and not keep_worse:
        record["archive"] = None
        record["rejected"] = (f"agreement {after['ideal']:.3f} is below the bare task's "
                              f"{before['ideal']:.3f}; {IMAGENET_ARCHIVE} and "
                              f"{IMAGENET_RECORD} were left as they were")
        record["seconds"] = round(time.perf_counter() - started, 1)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / REJECTED_RECORD, (json.dumps(record, indent=1) + "\n").encode())
        logger.warning("not writing %s: %s (record in %s)", out / IMAGENET_ARCHIVE,
                       record["rejected"], out / REJECTED_RECORD)
        return record
    hyperparameters = {"image_size": config.image_size, "preprocess": "imagenet",
                       "config": config_record}
    data = write_imagenet_archive(task, model, out, hyperparameters=hyperparameters,
                                  metrics=metrics)
    record |= {"seconds": round(time.perf_counter() - started, 1), "bytes": len(data),
               "sha256": sha256_hex(data)}
    atomic_write_bytes(out / IMAGENET_RECORD, (json.dumps(record, indent=1) + "\n").encode())
    logger.info("wrote %s and %s", out / IMAGENET_ARCHIVE, out / IMAGENET_RECORD)
    return record
