from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import TaskNotFound, TaskStateError
from task_store import (
    ChecksumMismatch,
    FingerprintMismatch,
    JobStatus,
    StoreError,
    TaskInUse,
    TaskStore,
    VersionNotFound,
)
from task_store.format import MANIFEST_FILE, TENSORS_FILE
from tests.task_store.helpers import (
    FINGERPRINT,
    OTHER_FINGERPRINT,
    assert_same_task,
    method_task,
    tiny_mapping,
)

MAPPING = tiny_mapping()


def open_store(root: Path, **kwargs: object) -> TaskStore:
    kwargs.setdefault("backbone_fingerprint", FINGERPRINT)
    kwargs.setdefault("mapping", MAPPING)
    return TaskStore(root, **kwargs)  # type: ignore[arg-type]


def leftovers(root: Path) -> list[str]:
    """Files and directories under tasks/ that no committed version explains."""
    return sorted(p.name for p in (root / "tasks").rglob("*")
                  if p.name.startswith(".") or p.suffix == ".tmp")


def test_put_get_list_and_versions(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    v1 = method_task("flowers", MAPPING, "xma2", seed=1)
    v2 = method_task("flowers", MAPPING, "xma", seed=2)
    r1 = store.put(v1, method="xma2", metrics={"accuracy": 0.9})
    r2 = store.put(v2, method="xma", activate=False)
    assert (r1.version, r1.active, r2.version, r2.active) == (1, True, 2, False)
    assert_same_task(store.get("flowers").task, v1)
    assert_same_task(store.get("flowers", 2).task, v2)
    assert store.get("flowers").manifest.metrics == {"accuracy": 0.9}
    assert store.activate("flowers", 2).active
    assert_same_task(store.get("flowers").task, v2)
    assert [(t.name, t.active_version, t.versions) for t in store.list()] == [
        ("flowers", 2, (1, 2))]
    assert [v.method for v in store.versions("flowers")] == ["xma2", "xma"]
    # a reopened store (a restart) serves the same tasks
    store.close()
    reopened = open_store(tmp_path)
    assert_same_task(reopened.get("flowers").task, v2)
    assert reopened.manifest("flowers", 1).method == "xma2"


def test_unknown_and_invalid_names(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(TaskNotFound, match="no task named 'cars'"):
        store.get("cars")
    store.put(method_task("cars", MAPPING, "xma"), method="xma")
    with pytest.raises(VersionNotFound, match="no version 7"):
        store.get("cars", 7)
    for bad in ("../etc", "a/b", "Cars", "", ".hidden", "x" * 65):
        with pytest.raises(TaskStateError):
            store.get(bad)
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["cars"]


def test_version_numbers_are_not_reused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for seed in range(3):
        store.put(method_task("t", MAPPING, "xma", seed=seed), method="xma")
    store.delete("t", 3, force=True)
    assert store.index.task("t").active_version == 2
    assert store.put(method_task("t", MAPPING, "xma"), method="xma").version == 4
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["v1", "v2", "v4"]


def test_cache_statistics_and_pinning(tmp_path: Path) -> None:
    store = open_store(tmp_path, cache_size=2)
    for name in ("a", "b", "c"):
        store.put(method_task(name, MAPPING, "xma2"), method="xma2")
    first = store.get("a")
    assert store.get("a") is first
    store.get("b")
    store.pin("a")
    store.get("c")  # evicts b, the unpinned least recently used
    stats = store.cache_stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.loads) == (2, 3, 1, 3)
    assert stats.load_seconds["a"] > 0 and stats.loads_by_task == {"a": 1, "b": 1, "c": 1}
    assert store.cache.keys() == [("a", 1), ("c", 1)]
    with pytest.raises(TaskInUse, match="pinned"):
        store.delete("a")
    store.unpin("a")
    store.delete("a")
    with pytest.raises(TaskNotFound):
        store.get("a")
    assert ("a", 1) not in store.cache


def test_delete_refuses_what_is_in_use_unless_forced(tmp_path: Path) -> None:
    in_use = {"busy"}
    store = open_store(tmp_path, in_use=lambda name: name in in_use)
    store.put(method_task("busy", MAPPING, "xma"), method="xma")
    store.put(method_task("busy", MAPPING, "xma", seed=1), method="xma")
    with pytest.raises(TaskInUse, match="in use"):
        store.delete("busy")
    with pytest.raises(TaskInUse, match="active version"):
        store.delete("busy", 2)
    store.delete("busy", 1)  # an inactive version of a busy task may go
    store.pin("busy")
    store.delete("busy", force=True)
    assert store.list() == [] and not (tmp_path / "tasks" / "busy").exists()


def test_corrupted_files_are_detected(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(method_task("t", MAPPING, "xma2"), method="xma2")
    tensors = tmp_path / "tasks" / "t" / "v1" / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="corrupt"):
        open_store(tmp_path).get("t")
    tensors.write_bytes(bytes(data) + b"x")
    with pytest.raises(ChecksumMismatch):
        open_store(tmp_path).get("t")
    manifest = tmp_path / "tasks" / "t" / "v1" / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"xma2"', b'"xma3"'))
    with pytest.raises(ChecksumMismatch, match="index"):
        open_store(tmp_path).get("t")
    manifest.unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(tmp_path).get("t")


def test_task_from_another_backbone_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).put(method_task("t", MAPPING, "xma2"), method="xma2")
    other = open_store(tmp_path, backbone_fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(FingerprintMismatch, match="backbone ffffffffffff, this server runs 0000"):
        other.get("t")
    with pytest.raises(FingerprintMismatch):
        other.activate("t", 1)


def test_task_that_does_not_fit_the_mapping_is_refused(tmp_path: Path) -> None:
    from tests.task_store.helpers import with_shift_levels

    store = open_store(tmp_path)
    with pytest.raises(TaskStateError, match="shift levels"):
        store.put(method_task("t", with_shift_levels(MAPPING, 1), "xma"), method="xma")
    assert store.list() == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["tensor write", "rename", "index commit"])
def test_write_failing_midway_keeps_the_old_version(tmp_path: Path, monkeypatch,
                                                     fail_at: str) -> None:
    import task_store.store as store_module

    store = open_store(tmp_path)
    old = method_task("t", MAPPING, "xma2", seed=1)
    store.put(old, method="xma2")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(f"injected failure at {fail_at}")

    if fail_at == "tensor write":
        real = store_module._write_synced

        def half_then_fail(path: Path, data: bytes) -> None:
            real(path, data[: len(data) // 2])
            boom()
        monkeypatch.setattr(store_module, "_write_synced", half_then_fail)
    elif fail_at == "rename":
        monkeypatch.setattr(store_module.os, "rename", boom)
    else:
        monkeypatch.setattr(store.index, "add_version", boom)
    with pytest.raises(OSError, match="injected"):
        store.put(method_task("t", MAPPING, "fine_tuning", seed=2), method="fine_tuning")
    monkeypatch.undo()
    for reader in (store, open_store(tmp_path)):
        assert_same_task(reader.get("t").task, old)
        assert reader.index.task("t").versions == (1,)
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["v1"]
    assert store.put(old, method="xma2").version == 2


def test_crashed_writer_leftovers_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(method_task("t", MAPPING, "xma"), method="xma")
    task_dir = tmp_path / "tasks" / "t"
    (task_dir / ".staging-dead").mkdir()
    (task_dir / ".staging-dead" / TENSORS_FILE).write_bytes(b"partial")
    (task_dir / "v2").mkdir()  # renamed but never committed
    (tmp_path / "tasks" / "ghost" / "v1").mkdir(parents=True)
    assert open_store(tmp_path).get("t").version == 1  # readers ignore uncommitted files
    assert store.put(method_task("t", MAPPING, "xma"), method="xma").version == 2
    assert sorted(p.name for p in task_dir.iterdir()) == ["v1", "v2"]
    assert not (tmp_path / "tasks" / "ghost").exists()


def test_write_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    import fcntl

    store = open_store(tmp_path, lock_timeout_s=0.05)
    fd = os.open(tmp_path / "write.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="retry"):
            store.put(method_task("t", MAPPING, "xma"), method="xma")
    finally:
        os.close(fd)
    assert store.put(method_task("t", MAPPING, "xma"), method="xma").version == 1


def test_job_records(tmp_path: Path) -> None:
    index = open_store(tmp_path).index
    first = index.create_job("xma2", task="flowers", params={"pe_fraction": 0.1})
    second = index.create_job("xma", task="cars")
    assert first.status is JobStatus.QUEUED and first.params == {"pe_fraction": 0.1}
    assert [j.id for j in index.jobs()] == [second.id, first.id]
    assert [j.id for j in index.jobs(after=second.id)] == [first.id]
    index.update_job(first.id, JobStatus.RUNNING)
    index.add_job_event(first.id, "epoch 1: loss 0.7")
    index.add_job_event(first.id, "epoch 2: loss 0.5")
    done = index.update_job(first.id, JobStatus.SUCCEEDED, result={"version": 1})
    assert done.result == {"version": 1}
    assert [e.seq for e in index.job_events(first.id, after=1)] == [2]
    assert [j.id for j in index.jobs(status=JobStatus.SUCCEEDED)] == [first.id]
    with pytest.raises(StoreError, match="already succeeded"):
        index.update_job(first.id, JobStatus.CANCELLED)
    with pytest.raises(StoreError, match="no job"):
        index.job("job-missing")


def test_a_cache_full_of_pinned_tasks_still_serves(tmp_path: Path) -> None:
    store = open_store(tmp_path, cache_size=1)
    store.put(method_task("a", MAPPING, "xma"), method="xma")
    store.put(method_task("b", MAPPING, "xma", seed=1), method="xma")
    store.pin("a")
    assert store.get("b").task.task_id == "b"
    assert store.cache.keys() == [("a", 1)] and store.cache_stats().loads == 2
