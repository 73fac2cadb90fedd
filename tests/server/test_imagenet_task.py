"""The built-in ``imagenet`` task: the distilled archive is served when it fits the backbone,
the bare task (fp32 head and BatchNorms) otherwise; ``xma2 build-imagenet-task`` writes
both files."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import server.imagenet_task as imagenet_module
from core.backbones.shipped import imagenet_task, load_backbone
from core.chip.config import Fidelity
from core.engine import CrossbarEngine
from core.nn.model import CrossbarModel
from core.task_state import TaskHead, TaskState
from server.imagenet_task import (
    IMAGENET_ARCHIVE,
    IMAGENET_RECORD,
    builtin_imagenet_task,
    write_imagenet_archive,
)
from server.runtime import BUILTIN_TASK, build_runtime
from server.settings import Settings
from task_store.archive import read_archive, write_archive


@pytest.fixture(scope="module")
def backbone() -> CrossbarModel:
    return load_backbone(None)


@pytest.fixture(scope="module")
def bare(backbone: CrossbarModel) -> TaskState:
    return imagenet_task(backbone)


def _distilled_like(backbone: CrossbarModel, bare: TaskState) -> TaskState:
    """A stand-in for a distilled task: other BatchNorm terms and head (no training)."""
    g = torch.Generator().manual_seed(0)
    digital = {}
    for name, module in backbone.body.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and name.startswith("features.1"):
            digital[f"{name}.weight"] = module.weight.detach() * 1.2
            digital[f"{name}.bias"] = module.bias.detach() + 0.1
    head = TaskHead(bare.head.weight + 0.01 * torch.randn(bare.head.weight.shape, generator=g),
                    bare.head.bias.clone(), bare.head.labels)
    return TaskState("imagenet", bare.shift_levels, head, {}, digital)


def _same(a: TaskState, b: TaskState) -> bool:
    return (torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
            and a.head.labels == b.head.labels and a.digital.keys() == b.digital.keys()
            and all(torch.equal(v, b.digital[k]) for k, v in a.digital.items()))


def test_the_archive_round_trips_and_build_runtime_serves_it(
        backbone: CrossbarModel, bare: TaskState, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    task = _distilled_like(backbone, bare)
    write_imagenet_archive(task, backbone, tmp_path / "shipped", hyperparameters={},
                           metrics={"agreement_ideal": 0.9})
    loaded = builtin_imagenet_task(backbone, tmp_path / "shipped")
    assert _same(loaded, task) and not _same(loaded, bare)

    monkeypatch.setattr(imagenet_module, "SHIPPED_DIR", tmp_path / "shipped")
    threads = torch.get_num_threads()
    runtime = build_runtime(Settings(store=tmp_path / "store", inference_threads=1))
    torch.set_num_threads(threads)
    try:
        runtime.worker.submit(runtime.load_all).result()
        assert _same(runtime.engine.tasks[BUILTIN_TASK], task)
        x = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(1))
        served = runtime.worker.submit(runtime.infer, BUILTIN_TASK, x, Fidelity.IDEAL,
                                       3).result()
        engine = CrossbarEngine(backbone)
        engine.add_task(task)
        probs = engine.forward(x[None], BUILTIN_TASK).softmax(1)[0]
        top = probs.topk(3)
        assert [label for label, _ in served.top] == [
            task.head.labels[int(i)] for i in top.indices]
        assert [p for _, p in served.top] == pytest.approx(top.values.tolist(), rel=1e-5)
    finally:
        runtime.close()
        runtime.store.close()


def test_an_archive_of_another_backbone_falls_back_to_the_bare_head(
        backbone: CrossbarModel, bare: TaskState, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    write_imagenet_archive(_distilled_like(backbone, bare), backbone, tmp_path,
                           hyperparameters={}, metrics={})
    manifest, data = read_archive(tmp_path / IMAGENET_ARCHIVE)
    other = replace(manifest, backbone_fingerprint="0" * 64)
    write_archive(tmp_path / IMAGENET_ARCHIVE, other.to_json(), data)
    with caplog.at_level(logging.WARNING, logger="server.imagenet_task"):
        served = builtin_imagenet_task(backbone, tmp_path)
    assert _same(served, bare)
    assert "was made on backbone 000000000000" in caplog.text


def test_a_damaged_or_missing_archive_falls_back_to_the_bare_head(
        backbone: CrossbarModel, bare: TaskState, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.imagenet_task"):
        assert _same(builtin_imagenet_task(backbone, tmp_path), bare)
    assert "no distilled ImageNet task" in caplog.text
    data = write_imagenet_archive(_distilled_like(backbone, bare), backbone, tmp_path,
                                  hyperparameters={}, metrics={})
    (tmp_path / IMAGENET_ARCHIVE).write_bytes(data[: len(data) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.imagenet_task"):
        assert _same(builtin_imagenet_task(backbone, tmp_path), bare)
    assert "cannot serve the distilled ImageNet task" in caplog.text


def test_the_command_writes_the_archive_and_its_record(backbone: CrossbarModel,
                                                       tmp_path: Path) -> None:
    from server.cli import main

    threads = torch.get_num_threads()
    try:
        code = main(["build-imagenet-task", "--out", str(tmp_path), "--steps", "2",
                     "--batch-size", "2", "--agreement-crops", "4", "--crossbar-crops", "2",
                     "--photos", "coins", "--keep-worse", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / IMAGENET_RECORD).read_text())
    assert record["command"].startswith("xma2 build-imagenet-task")
    assert record["config"]["steps"] == 2 and record["seed"] == 0
    assert record["backbone_fingerprint"] == backbone.fingerprint()
    agreement = record["agreement"]
    assert agreement["held_out"]["crops"] == 4
    for key in ("bare", "distilled"):
        assert 0.0 <= agreement[key]["ideal"] <= 1.0
    assert ("crossbar" in agreement["distilled"]) == (not record["chip_lossless"])
    assert (tmp_path / IMAGENET_ARCHIVE).stat().st_size == record["bytes"]
    served = builtin_imagenet_task(backbone, tmp_path)
    assert served.digital  # the distilled task, not the bare head


def test_a_task_that_agrees_less_than_the_bare_head_is_not_shipped(
        backbone: CrossbarModel, bare: TaskState, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The build measures before it writes: a worse task leaves the served archive alone."""
    import core.learning.imagenet_task as core_module
    from core.learning.imagenet_task import ImagenetTaskConfig
    from server.imagenet_task import REJECTED_RECORD, build_imagenet_task

    good = _distilled_like(backbone, bare)
    write_imagenet_archive(good, backbone, tmp_path, hyperparameters={}, metrics={})
    shipped = (tmp_path / IMAGENET_ARCHIVE).read_bytes()
    reversed_head = TaskHead(-bare.head.weight, -bare.head.bias, bare.head.labels)
    monkeypatch.setattr(core_module, "distill_imagenet_task",
                        lambda *_a, **_k: TaskState("imagenet", bare.shift_levels,
                                                    reversed_head))
    record = build_imagenet_task(tmp_path, ImagenetTaskConfig(steps=0), backbone_file=None,
                                 command="xma2 build-imagenet-task", agreement_crops=4,
                                 crossbar_crops=0)
    assert record["archive"] is None and "below the bare task's" in record["rejected"]
    assert record["agreement"]["distilled"]["ideal"] < record["agreement"]["bare"]["ideal"]
    assert (tmp_path / IMAGENET_ARCHIVE).read_bytes() == shipped
    assert not (tmp_path / IMAGENET_RECORD).exists() and (tmp_path / REJECTED_RECORD).exists()
