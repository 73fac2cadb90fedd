"""A task's temperature and OOD threshold travel through the store, archives and manifests;
versions written without them load with T = 1 and no threshold."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from core.confidence import UNCALIBRATED, Confidence, fit_confidence
from core.errors import TaskStateError
from task_store import FormatError, TaskStore
from task_store.archive import write_archive
from task_store.format import MANIFEST_FILE, TENSORS_FILE, Manifest
from tests.task_store.helpers import FINGERPRINT, assert_same_task, method_task, tiny_mapping

MAPPING = tiny_mapping()


def open_store(root: Path) -> TaskStore:
    return TaskStore(root, backbone_fingerprint=FINGERPRINT, mapping=MAPPING)


def fitted(classes: int = 3) -> Confidence:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, classes, generator=g) * 3
    labels = torch.randint(classes, (200,), generator=g)
    return fit_confidence(logits, labels, train_logits=logits, train_labels=labels)


def test_confidence_round_trips_through_the_store_and_an_archive(tmp_path: Path) -> None:
    confidence = fitted()
    assert confidence.temperature != 1.0 and confidence.ood_threshold is not None
    task = dataclasses.replace(method_task("t", MAPPING, "xma2", seed=1), confidence=confidence)
    store = open_store(tmp_path / "a")
    store.put(task, method="xma2")
    loaded = store.get("t")
    assert loaded.task.confidence == confidence
    assert loaded.manifest.confidence == confidence
    assert_same_task(loaded.task, task)
    raw = json.loads((tmp_path / "a" / "tasks" / "t" / "v1" / MANIFEST_FILE).read_text())
    assert raw["confidence"]["temperature"] == confidence.temperature
    archive = store.export("t", tmp_path / "t.tar")
    other = open_store(tmp_path / "b")
    other.import_archive(archive, name="u")
    assert other.get("u").task.confidence == confidence


def test_a_version_without_confidence_loads_uncalibrated(tmp_path: Path) -> None:
    store = open_store(tmp_path / "a")
    store.put(method_task("t", MAPPING, "xma2"), method="xma2")
    manifest_bytes = (tmp_path / "a" / "tasks" / "t" / "v1" / MANIFEST_FILE).read_bytes()
    assert b"confidence" not in manifest_bytes  # the format as before, byte for byte
    assert store.get("t").task.confidence == UNCALIBRATED
    # an archive written before confidence existed (no key at all) imports the same way
    tensors = (tmp_path / "a" / "tasks" / "t" / "v1" / TENSORS_FILE).read_bytes()
    old = write_archive(tmp_path / "old.tar", manifest_bytes, tensors)
    other = open_store(tmp_path / "b")
    other.import_archive(old)
    task = other.get("t").task
    assert task.confidence.temperature == 1.0 and task.confidence.ood_threshold is None
    assert not bool(task.confidence.flags(task.confidence.scores(torch.randn(5, 3))).any())


def _manifest_with(tmp_path: Path, confidence: object) -> bytes:
    store = open_store(tmp_path / "src")
    store.put(method_task("t", MAPPING, "xma2"), method="xma2")
    data = json.loads((tmp_path / "src" / "tasks" / "t" / "v1" / MANIFEST_FILE).read_text())
    data["confidence"] = confidence
    return json.dumps(data).encode()


@pytest.mark.parametrize("confidence", [
    "hot", [1.0], {"temperature": -2.0}, {"temperature": 1.0, "ood_score": "nope"},
    {"temperature": 1.5, "ood_score": "logit_distance"},
])
def test_a_bad_confidence_record_is_a_format_error(tmp_path: Path, confidence: object) -> None:
    with pytest.raises(FormatError, match="confidence"):
        Manifest.from_json(_manifest_with(tmp_path, confidence))


def test_statistics_of_another_class_count_are_refused(tmp_path: Path) -> None:
    four = fitted(classes=4).to_dict()
    raw = _manifest_with(tmp_path, four)
    tensors = (tmp_path / "src" / "tasks" / "t" / "v1" / TENSORS_FILE).read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in ((MANIFEST_FILE, raw), (TENSORS_FILE, tensors)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bad.tar").write_bytes(buffer.getvalue())
    with pytest.raises(FormatError, match="4 classes"):
        open_store(tmp_path / "b").import_archive(tmp_path / "bad.tar")
    with pytest.raises(TaskStateError):
        dataclasses.replace(method_task("t", MAPPING, "xma2"), confidence=fitted(classes=4))
