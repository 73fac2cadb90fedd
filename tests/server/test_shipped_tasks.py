"""The shipped tasks: imported once per store, even by servers starting together."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from core.backbones.shipped import load_backbone
from core.nn.model import CrossbarModel
from server.shipped_tasks import SHIPPED, SHIPPED_DIR, import_default_tasks
from task_store import TaskStore


@pytest.fixture(scope="module")
def backbone() -> CrossbarModel:
    return load_backbone(None)


def test_index_records_how_each_task_was_made() -> None:
    index = json.loads((SHIPPED_DIR / "tasks.json").read_text())
    assert [e["name"] for e in index["tasks"]] == list(SHIPPED)
    for entry in index["tasks"]:
        assert (SHIPPED_DIR / entry["archive"]).stat().st_size == entry["bytes"]
        words = entry["build"]["command"].split()
        assert words[0] == "xma2" and "build-default-tasks" in words
        assert entry["build"]["seed"] == 0 and entry["metrics"]["test_accuracy"] > 0.7


def test_concurrent_imports_make_one_version_each(backbone: CrossbarModel,
                                                  tmp_path: Path) -> None:
    results: list[list[str]] = []

    def start() -> None:
        with TaskStore.for_model(tmp_path, backbone) as store:
            results.append(import_default_tasks(store))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(name for r in results for name in r) == sorted(SHIPPED)
    with TaskStore.for_model(tmp_path, backbone) as store:
        assert {r.name: r.versions for r in store.list()} == {n: (1,) for n in SHIPPED}
        store.delete("mnist")
        assert import_default_tasks(store) == []  # a deleted shipped task stays deleted
        assert "mnist" not in {r.name for r in store.list()}


def test_another_backbone_skips_the_shipped_tasks(tmp_path: Path) -> None:
    with TaskStore(tmp_path, backbone_fingerprint="0" * 64) as store:
        assert import_default_tasks(store) == []
        assert store.list() == []


def test_the_upload_limit_does_not_apply_to_the_shipped_tasks(tmp_path: Path,
                                                              backbone: CrossbarModel) -> None:
    """A server whose clients may upload only small archives still imports its own."""
    smallest = min((SHIPPED_DIR / f"{n}.tar").stat().st_size for n in SHIPPED)
    store = TaskStore.for_model(tmp_path / "store", backbone, max_archive_bytes=smallest // 2)
    try:
        assert sorted(import_default_tasks(store)) == sorted(SHIPPED)
        assert sorted(r.name for r in store.list()) == sorted(SHIPPED)
    finally:
        store.close()


def test_a_build_trains_on_the_chip_from_an_earlier_builds_tasks(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from server.shipped_tasks import BuildConfig, build_default_tasks

    tiny = BuildConfig(train_limit=64, test_limit=32, epochs=1, chip_epochs=0)
    first = build_default_tasks(tmp_path / "first", ["mnist"], tiny, backbone_file=None,
                                command="xma2 build-default-tasks --chip-epochs 0")
    entry = first["tasks"][0]
    assert [s["config"]["train"]["chip_periphery"] for s in entry["stages"]] == [False]
    assert 0 <= entry["metrics"]["crossbar_test_accuracy"] <= 1

    looped = BuildConfig(train_limit=64, test_limit=32, epochs=1, chip_epochs=1)
    second = build_default_tasks(tmp_path / "second", ["mnist"], looped, backbone_file=None,
                                 command="xma2 build-default-tasks --start-from first",
                                 start_from=tmp_path / "first")
    stages = second["tasks"][0]["stages"]
    assert [s["config"]["train"]["chip_periphery"] for s in stages] == [False, True]
    assert stages[0]["archive_sha256"] == entry["sha256"]
    assert stages[1]["config"]["train"]["chip_agreement"] == looped.chip_agreement
    assert second["tasks"][0]["sha256"] != entry["sha256"]  # trained further on the chip

    metrics = second["tasks"][0]["metrics"]
    assert 0 <= metrics["crossbar_agreement"] <= 1

    # A chip-trained build continues with one more chip stage; earlier stages keep the
    # archive and command that made them.
    harder = BuildConfig(train_limit=64, test_limit=32, epochs=1, chip_epochs=1,
                         chip_agreement=3.0)
    third = build_default_tasks(tmp_path / "third", ["mnist"], harder, backbone_file=None,
                                command="xma2 build-default-tasks --start-from second",
                                start_from=tmp_path / "second")
    stages = third["tasks"][0]["stages"]
    assert [s["config"]["train"]["chip_agreement"] for s in stages[1:]] == [
        looped.chip_agreement, 3.0]
    assert [s["archive_sha256"] for s in stages[:2]] == [entry["sha256"],
                                                          second["tasks"][0]["sha256"]]
    assert "archive_sha256" not in stages[2]
    with pytest.raises(ConfigError, match="not this build's"):
        build_default_tasks(tmp_path / "fourth", ["mnist"], BuildConfig(
            train_limit=64, test_limit=32, epochs=1, seed=1), backbone_file=None, command="",
            start_from=tmp_path / "first")
