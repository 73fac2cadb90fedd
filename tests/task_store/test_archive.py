from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from task_store import ChecksumMismatch, FingerprintMismatch, FormatError, TaskStore
from task_store.format import MANIFEST_FILE, TENSORS_FILE
from tests.task_store.helpers import (
    FINGERPRINT,
    OTHER_FINGERPRINT,
    assert_same_task,
    method_task,
    tiny_mapping,
)

MAPPING = tiny_mapping()


def open_store(root: Path, fingerprint: str = FINGERPRINT) -> TaskStore:
    return TaskStore(root, backbone_fingerprint=fingerprint, mapping=MAPPING)


@pytest.fixture()
def exported(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An archive of task ``t`` and its two members' bytes."""
    store = open_store(tmp_path / "a")
    store.put(method_task("t", MAPPING, "xma2", seed=1), method="xma2",
              hyperparameters={"pe_fraction": 0.1}, metrics={"accuracy": 0.8})
    path = store.export("t", tmp_path / "t.tar")
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    return path, members


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_export_import_round_trip(tmp_path: Path, exported) -> None:
    path, members = exported
    assert sorted(members) == [MANIFEST_FILE, TENSORS_FILE]
    source = open_store(tmp_path / "a")
    assert source.export("t", tmp_path / "again.tar").read_bytes() == path.read_bytes()
    target = open_store(tmp_path / "b")
    target.put(method_task("flowers", MAPPING, "xma"), method="xma")
    record = target.import_archive(path, name="flowers")
    assert (record.version, record.active, record.method) == (2, True, "xma2")
    imported = target.get("flowers")
    original = source.get("t").task
    assert imported.task.task_id == "flowers"
    assert_same_task(imported.task, method_task("flowers", MAPPING, "xma2", seed=1))
    assert imported.manifest.origin is not None and imported.manifest.origin["task"] == "t"
    assert imported.manifest.metrics == {"accuracy": 0.8}
    assert imported.manifest.hyperparameters == {"pe_fraction": 0.1}
    assert original.task_id == "t"
    # the tensor file travels unchanged
    assert (tmp_path / "b" / "tasks" / "flowers" / "v2" / TENSORS_FILE).read_bytes() == \
        members[TENSORS_FILE]
    # a compressed archive is accepted too
    gz = tmp_path / "t.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        for name, data in members.items():
            info = regular(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert target.import_archive(gz).task == "t"


def test_import_refuses_another_backbone(tmp_path: Path, exported) -> None:
    other = open_store(tmp_path / "other", OTHER_FINGERPRINT)
    with pytest.raises(FingerprintMismatch):
        other.import_archive(exported[0])
    assert other.list() == []


def test_import_refuses_damaged_archives(tmp_path: Path, exported) -> None:
    _, members = exported
    manifest, tensors = members[MANIFEST_FILE], members[TENSORS_FILE]
    flipped = bytearray(tensors)
    flipped[-1] ^= 0xFF
    link = tarfile.TarInfo(TENSORS_FILE)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("tasks")
    folder.type = tarfile.DIRTYPE
    bad_manifest = json.loads(manifest)
    bad_manifest["files"]["task.safetensors"]["bytes"] += 1
    cases = {
        "traversal": ([(regular("../manifest.json"), manifest)], "not one of"),
        "absolute": ([(regular("/tmp/task.safetensors"), tensors)], "not one of"),
        "symlink": ([(regular(MANIFEST_FILE), manifest), (link, b"")], "regular file"),
        "directory": ([(folder, b"")], "not one of"),
        "duplicate": ([(regular(MANIFEST_FILE), manifest), (regular(MANIFEST_FILE), manifest),
                       (regular(TENSORS_FILE), tensors)], "twice"),
        "missing": ([(regular(MANIFEST_FILE), manifest)], "lacks"),
        "checksum": ([(regular(MANIFEST_FILE), manifest),
                      (regular(TENSORS_FILE), bytes(flipped))], "SHA-256"),
        "size": ([(regular(MANIFEST_FILE), json.dumps(bad_manifest).encode()),
                  (regular(TENSORS_FILE), tensors)], "SHA-256"),
        "pickle": ([(regular(MANIFEST_FILE), manifest), (regular("data.pkl"), b"\x80\x04")],
                   "not one of"),
    }
    store = open_store(tmp_path / "b")
    for case, (entries, message) in cases.items():
        path = write_tar(tmp_path / f"{case}.tar", entries)
        error = ChecksumMismatch if case in ("checksum", "size") else FormatError
        with pytest.raises(error, match=message):
            store.import_archive(path)
    huge = TaskStore(tmp_path / "c", backbone_fingerprint=FINGERPRINT, mapping=MAPPING,
                     max_archive_bytes=len(tensors) - 1)
    with pytest.raises(FormatError, match="limit"):
        huge.import_archive(exported[0])
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(FormatError, match="not a readable task archive"):
        store.import_archive(tmp_path / "junk.tar")
    assert store.list() == []
    assert not any((tmp_path / "b" / "tasks").iterdir())
