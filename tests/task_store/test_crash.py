"""A writer killed with SIGKILL at any point leaves the old version served.

The writer is a forked child (torch is already imported, so it starts at once) that
freezes at a chosen point of the write path until the parent kills it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import task_store.store as store_module
from task_store import TaskStore
from tests.task_store.helpers import FINGERPRINT, assert_same_task, method_task, tiny_mapping

MAPPING = tiny_mapping()


def open_store(root: Path) -> TaskStore:
    return TaskStore(root, backbone_fingerprint=FINGERPRINT, mapping=MAPPING)


def fork(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the test runner
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def freeze_at(point: str, store: TaskStore, marker: Path) -> None:
    """Patch the child's write path so that it stops at ``point``."""

    def freeze() -> None:
        marker.write_text("frozen")
        time.sleep(120)

    if point == "tensor-write":
        def half_written(path: Path, data: bytes) -> None:
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            freeze()
        store_module._write_synced = half_written  # type: ignore[assignment]
    elif point == "before-commit":
        rename = os.rename

        def rename_then_freeze(src: Path, dst: Path) -> None:
            rename(src, dst)
            freeze()
        store_module.os.rename = rename_then_freeze  # type: ignore[assignment]
    else:
        add_version = store.index.add_version

        def add_then_freeze(db, record, *, activate):  # type: ignore[no-untyped-def]
            add_version(db, record, activate=activate)
            freeze()  # inside the open SQLite write transaction
        store.index.add_version = add_then_freeze  # type: ignore[method-assign]


def wait_for(marker: Path, pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AssertionError(f"writer exited early with status {status}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("writer never reached the kill point")
        time.sleep(0.01)


@pytest.mark.parametrize("point", ["tensor-write", "before-commit", "in-transaction"])
def test_sigkill_mid_write_keeps_the_old_version(tmp_path: Path, point: str) -> None:
    old = method_task("t", MAPPING, "xma2", seed=1)
    new = method_task("t", MAPPING, "fine_tuning", seed=2)
    open_store(tmp_path).put(old, method="xma2")
    marker = tmp_path.parent / f"{tmp_path.name}.marker"

    def write() -> None:
        store = open_store(tmp_path)
        freeze_at(point, store, marker)
        store.put(new, method="fine_tuning")

    pid = fork(write)
    try:
        wait_for(marker, pid)
        # another process reads while the writer is frozen mid-write
        assert_same_task(open_store(tmp_path).get("t").task, old)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after = open_store(tmp_path)
    assert_same_task(after.get("t").task, old)
    assert after.index.task("t").versions == (1,)
    assert after.put(new, method="fine_tuning").version == 2
    assert_same_task(after.get("t").task, new)
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["v1", "v2"]


def test_readers_in_another_process_see_only_whole_versions(tmp_path: Path) -> None:
    expected = {seed: method_task("t", MAPPING, "xma2", seed=seed) for seed in range(1, 9)}
    open_store(tmp_path).put(expected[1], method="xma2")

    def write_versions() -> None:
        store = open_store(tmp_path)
        for seed in range(2, 9):
            store.put(expected[seed], method="xma2")
            time.sleep(0.01)

    pid = fork(write_versions)
    reader = open_store(tmp_path)
    seen: set[int] = set()
    finished, status = False, 0
    while not finished:
        done, status = os.waitpid(pid, os.WNOHANG)
        finished = done != 0
        stored = reader.get("t")
        assert_same_task(stored.task, expected[stored.version])  # version v holds seed v
        seen.add(stored.version)
        time.sleep(0.002)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert reader.get("t").version == 8
    assert len(seen) >= 2  # the reader ran while versions were being added
