"""Durable, versioned task state bound to one backbone.

Layout under the store root::

    index.sqlite3               tasks, versions, active version, jobs (WAL mode)
    write.lock                  flock()ed by the one process writing at a time
    tasks/<name>/v<version>/    manifest.json + task.safetensors (immutable once there)

A version becomes visible in two atomic steps: its files are written and fsynced in a
staging directory that is then renamed to ``v<version>``, and only afterwards is its
index row committed. A crash before the commit leaves an orphan directory that the
next writer removes; readers only ever follow committed rows.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import fsync_dir
from core.chip.mapping import ModelMapping
from core.task_state import TaskState, validate_task_name
from task_store.archive import DEFAULT_MAX_ARCHIVE_BYTES, read_archive, write_archive
from task_store.cache import StoredTask, TaskCache, TaskCacheStats
from task_store.errors import (
    ChecksumMismatch,
    FingerprintMismatch,
    FormatError,
    StoreError,
    TaskInUse,
    VersionNotFound,
)
from task_store.format import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    TENSORS_FILE,
    Manifest,
    build_manifest,
    decode_task,
    encode_task,
    sha256_hex,
)
from task_store.index import TaskIndex, TaskRecord, VersionRecord

if TYPE_CHECKING:
    from core.nn.model import CrossbarModel

INDEX_FILE = "index.sqlite3"
LOCK_FILE = "write.lock"
TASKS_DIR = "tasks"
_STAGING_PREFIX = ".staging-"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path.parent.name}/{path.name} is larger than the {limit}-byte "
                          "limit")
    return data


class TaskStore:
    """Task versions on disk, an index of them, and a cache of decoded ones.

    Args:
        root: directory of the store (created when missing).
        backbone_fingerprint: ``CrossbarModel.fingerprint()`` of the backbone served;
            versions made on another backbone are refused.
        mapping: the backbone's PE mapping; when given, every stored and loaded task is
            validated against it and spare codes are packed at each layer's precision.
        cache_size: decoded versions kept in memory.
        in_use: tells whether a task is in use outside the store (e.g. resident on the
            chip); such tasks are not deleted unless forced.
        lock_timeout_s: how long a writer waits for another process's write lock.
        max_archive_bytes: largest archive accepted by :meth:`import_archive`.
        check: further checks of a task against the backbone served (its head's input
            width, its digital tensors' names and shapes); raises to refuse the task. Run
            on every put, import and load, before anything is written or served.
    """

    def __init__(
        self, root: str | Path, *, backbone_fingerprint: str,
        mapping: ModelMapping | None = None, cache_size: int = 16,
        in_use: Callable[[str], bool] | None = None, lock_timeout_s: float = 60.0,
        max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
        check: Callable[[TaskState], None] | None = None,
    ) -> None:
        if not backbone_fingerprint:
            raise StoreError("a task store needs the backbone fingerprint it serves")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TASKS_DIR).mkdir(exist_ok=True)
        self.backbone_fingerprint = backbone_fingerprint
        self.mapping = mapping
        self.in_use = in_use
        self.lock_timeout_s = lock_timeout_s
        self.max_archive_bytes = max_archive_bytes
        self.check = check
        self.index = TaskIndex(self.root / INDEX_FILE, timeout_s=lock_timeout_s)
        self.cache = TaskCache(cache_size)
        self._thread_lock = threading.RLock()
        self._layer_bits = (
            {m.name: m.weight_bits for m in mapping.crossbar_layers} if mapping else None
        )

    @classmethod
    def for_model(cls, root: str | Path, model: CrossbarModel, **kwargs: Any) -> TaskStore:
        """A store bound to a calibrated backbone (its fingerprint and mapping)."""
        if model.mapping is None:
            raise StoreError("the backbone has no crossbar mapping: calibrate or load it first")
        return cls(root, backbone_fingerprint=model.fingerprint(), mapping=model.mapping,
                   **kwargs)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    def list(self) -> list[TaskRecord]:
        return self.index.tasks()

    def versions(self, name: str) -> builtins.list[VersionRecord]:  # list: the method above
        return self.index.versions(validate_task_name(name))

    def get(self, name: str, version: int | None = None) -> StoredTask:
        """A decoded, verified task version (``None``: the active one), cached."""
        record = self.index.version(validate_task_name(name), version)
        key = (name, record.version)
        cached = self.cache.get(key, record.manifest_sha256)
        if cached is not None:
            return cached
        started = time.perf_counter()
        stored = self._load(record)
        self.cache.put(key, stored, time.perf_counter() - started)
        return stored

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        """A version's verified manifest, without decoding its tensors."""
        record = self.index.version(validate_task_name(name), version)
        return self._read_manifest(record)[0]

    def cache_stats(self) -> TaskCacheStats:
        return self.cache.stats()

    def pin(self, name: str, version: int | None = None) -> StoredTask:
        """Load a version and keep it cached (and undeletable) until :meth:`unpin`."""
        with self._thread_lock:
            stored = self.get(name, version)
            self.cache.pin((name, stored.version))
            return stored

    def unpin(self, name: str, version: int | None = None) -> None:
        with self._thread_lock:
            versions = self.cache.pinned(name) if version is None else [version]
            for v in versions:
                self.cache.unpin((name, v))

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / TASKS_DIR / name / f"v{version}"

    def _shown(self, path: Path) -> str:
        """A path as error messages show it: relative to the store, whose location is the
        operator's business, not an API client's."""
        try:
            return f"store:{path.relative_to(self.root)}"
        except ValueError:
            return path.name

    def _read_manifest(self, record: VersionRecord) -> tuple[Manifest, Path]:
        directory = self._version_dir(record.task, record.version)
        try:
            raw = _read_limited(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES)
        except FileNotFoundError as e:
            if not self.index.has_version(record.task, record.version):
                raise VersionNotFound(f"task {record.task!r} version {record.version} was "
                                      "deleted while it was being read") from e
            raise StoreError(f"{self._shown(directory / MANIFEST_FILE)} is missing although "
                             "the index "
                             "lists it; restore the task from an archive or delete the "
                             "version") from e
        if sha256_hex(raw) != record.manifest_sha256:
            raise ChecksumMismatch(f"{self._shown(directory / MANIFEST_FILE)} does not match "
                                   "the SHA-256 "
                                   "recorded in the index; restore the task from an archive "
                                   "or delete the version")
        manifest = Manifest.from_json(raw)
        if (manifest.task, manifest.version) != (record.task, record.version):
            raise FormatError(f"{self._shown(directory)} holds {manifest.task} "
                              f"v{manifest.version}")
        return manifest, directory

    def _check_fingerprint(self, manifest: Manifest) -> None:
        if manifest.backbone_fingerprint != self.backbone_fingerprint:
            raise FingerprintMismatch(
                f"task {manifest.task} v{manifest.version} was adapted on backbone "
                f"{manifest.backbone_fingerprint[:12]}, this server runs "
                f"{self.backbone_fingerprint[:12]}; serve it with its own backbone or adapt "
                "the task again on this one"
            )

    def _load(self, record: VersionRecord) -> StoredTask:
        manifest, directory = self._read_manifest(record)
        self._check_fingerprint(manifest)
        expected = manifest.files[TENSORS_FILE]
        try:
            data = _read_limited(directory / TENSORS_FILE, expected.bytes)
        except FileNotFoundError as e:
            raise StoreError(f"{self._shown(directory / TENSORS_FILE)} is missing; restore "
                             "the task from "
                             "an archive or delete the version") from e
        except FormatError as e:
            raise ChecksumMismatch(f"{self._shown(directory / TENSORS_FILE)} is larger than "
                                   "its manifest "
                                   "records; the file is corrupt") from e
        if len(data) != expected.bytes or sha256_hex(data) != expected.sha256:
            raise ChecksumMismatch(f"{self._shown(directory / TENSORS_FILE)} does not match "
                                   "the SHA-256 "
                                   "in its manifest; the file is corrupt: restore the task "
                                   "from an archive or delete the version")
        task = decode_task(data, manifest)
        self._validate(task)
        return StoredTask(task, manifest, record.manifest_sha256)

    def _validate(self, task: TaskState) -> None:
        if self.mapping is not None:
            task.validate(self.mapping)
        if self.check is not None:
            self.check(task)

    # -- writing ---------------------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive across threads and processes; cleans up after crashed writers."""
        with self._thread_lock:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + self.lock_timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError as e:
                        if time.monotonic() > deadline:
                            raise StoreError(
                                f"another process has held the store's write lock for "
                                f"{self.lock_timeout_s:.0f} s; retry when it finishes"
                            ) from e
                        time.sleep(0.01)
                self._recover()
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the flock

    def _recover(self) -> None:
        """Remove staging and uncommitted version directories left by a crashed writer."""
        committed = self.index.committed_versions()
        known = {name for name, _ in committed}
        tasks_dir = self.root / TASKS_DIR
        for task_dir in tasks_dir.iterdir():
            if not task_dir.is_dir():
                continue
            for child in task_dir.iterdir():
                stale = child.name.startswith(_STAGING_PREFIX) or (
                    child.name.startswith("v") and child.name[1:].isdigit()
                    and (task_dir.name, int(child.name[1:])) not in committed
                )
                if stale:
                    shutil.rmtree(child, ignore_errors=True)
            if task_dir.name not in known and not any(task_dir.iterdir()):
                task_dir.rmdir()

    def put(
        self, task: TaskState, *, method: str, hyperparameters: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None, activate: bool = True,
        fence: Callable[[sqlite3.Connection, VersionRecord], None] | None = None,
    ) -> VersionRecord:
        """Store a task as its next version (active unless ``activate=False`` and another is).

        Args:
            task: the task state.
            method: how it was made (``xma2``, ``xma``, ``xbm``, ``piggyback``, ...).
            hyperparameters: the method's settings, recorded in the manifest.
            metrics: e.g. ``accuracy`` and ``energy_j``.
            activate: serve this version from now on.
            fence: called inside the index transaction that commits the version, after
                its row is added; raising there rolls the version back (a job worker
                uses it to commit only while its job still runs, and to end the job in
                the same transaction).
        """
        self._validate(task)
        encoded = encode_task(task, self._layer_bits)

        def manifest_for(version: int) -> Manifest:
            return build_manifest(encoded, task, version=version, method=method,
                                  backbone_fingerprint=self.backbone_fingerprint,
                                  hyperparameters=hyperparameters, metrics=metrics)

        return self._commit(task.task_id, manifest_for, encoded.data, activate=activate,
                            fence=fence)

    def _commit(self, name: str, manifest_for: Callable[[int], Manifest], data: bytes, *,
                activate: bool,
                fence: Callable[[sqlite3.Connection, VersionRecord], None] | None = None,
                ) -> VersionRecord:
        with self._writer():
            version = self.index.next_version(name)
            manifest = manifest_for(version)
            manifest_bytes = manifest.to_json()
            task_dir = self.root / TASKS_DIR / name
            if not task_dir.exists():
                task_dir.mkdir()
                fsync_dir(task_dir.parent)
            staging = task_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
            final = self._version_dir(name, version)
            staging.mkdir()
            try:
                _write_synced(staging / TENSORS_FILE, data)
                _write_synced(staging / MANIFEST_FILE, manifest_bytes)
                fsync_dir(staging)
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            fsync_dir(task_dir)
            record = VersionRecord(name, version, manifest.method, manifest.backbone_fingerprint,
                                   sha256_hex(manifest_bytes), len(data) + len(manifest_bytes),
                                   manifest.created, activate)
            try:
                with self.index.transaction() as db:
                    self.index.add_version(db, record, activate=activate)
                    if fence is not None:
                        fence(db, record)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                with contextlib.suppress(OSError):  # only when no other version is there
                    task_dir.rmdir()
                raise
        return self.index.version(name, version)

    def activate(self, name: str, version: int) -> VersionRecord:
        """Serve ``version`` from now on; it is loaded and verified first."""
        self.get(name, version)
        with self._writer():
            if not self.index.has_version(name, version):
                raise VersionNotFound(f"task {name!r} has no version {version}")
            with self.index.transaction() as db:
                self.index.set_active(db, name, version)
        return self.index.version(name, version)

    def delete(self, name: str, version: int | None = None, *, force: bool = False) -> None:
        """Delete one version or (``version=None``) the whole task.

        Refused with :class:`TaskInUse` when the task is pinned or reported in use, or
        when the version is the active one and others remain, unless ``force``; a forced
        delete of the active version activates the newest remaining one.
        """
        validate_task_name(name)
        with self._writer():
            task = self.index.task(name)
            if version is not None and version not in task.versions:
                raise VersionNotFound(f"task {name!r} has no version {version}; it has "
                                      f"{list(task.versions)}")
            targets = list(task.versions) if version is None else [version]
            whole = set(targets) == set(task.versions)
            if not force:
                pinned = [v for v in self.cache.pinned(name) if v in targets]
                if pinned:
                    raise TaskInUse(f"task {name!r} version(s) {pinned} are pinned by a "
                                    "running request; unpin them or delete with force")
                if whole and self.in_use is not None and self.in_use(name):
                    raise TaskInUse(f"task {name!r} is in use (resident or serving); stop "
                                    "serving it first or delete with force")
                if not whole and version == task.active_version:
                    raise TaskInUse(f"version {version} is the active version of {name!r}; "
                                    "activate another version first or delete with force")
            with self.index.transaction() as db:
                if whole:
                    self.index.delete_task(db, name)
                else:
                    assert version is not None
                    self.index.delete_version(db, name, version)
                    if version == task.active_version:
                        remaining = [v for v in task.versions if v != version]
                        self.index.set_active(db, name, max(remaining))
            for v in targets:
                self.cache.invalidate(name, v)
            doomed = [self.root / TASKS_DIR / name] if whole else [
                self._version_dir(name, v) for v in targets]
            for path in doomed:
                shutil.rmtree(path, ignore_errors=True)

    # -- archives --------------------------------------------------------------------

    def export(self, name: str, dest: str | Path, version: int | None = None) -> Path:
        """Write a version (default: active) as one verified tar archive at ``dest``."""
        record = self.index.version(validate_task_name(name), version)
        stored = self._load(record)  # verifies checksums and fingerprint before shipping
        directory = self._version_dir(name, record.version)
        manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
        data = (directory / TENSORS_FILE).read_bytes()
        if (sha256_hex(manifest_bytes) != record.manifest_sha256
                or sha256_hex(data) != stored.manifest.files[TENSORS_FILE].sha256):
            raise ChecksumMismatch(f"{self._shown(directory)} changed while it was exported; "
                                   "retry")
        return write_archive(dest, manifest_bytes, data)

    def import_archive(self, path: str | Path, *, name: str | None = None,
                       activate: bool = True, max_bytes: int | None = None) -> VersionRecord:
        """Add an exported version as the next version of ``name`` (default: its own name).

        Every member is checked (names, types, sizes, SHA-256), the backbone fingerprint
        must match, and the tensors are decoded and validated before anything is written.
        ``max_bytes`` overrides the store's archive size limit (trusted, shipped archives).
        """
        manifest, data = read_archive(path, max_bytes=max_bytes or self.max_archive_bytes)
        self._check_fingerprint(manifest)
        target = validate_task_name(name or manifest.task)
        task = decode_task(data, manifest.renamed(target, manifest.version, origin=None))
        self._validate(task)
        origin = {"task": manifest.task, "version": manifest.version,
                  "created": manifest.created, "archive": Path(path).name}
        return self._commit(target, lambda v: manifest.renamed(target, v, origin=origin),
                            data, activate=activate)
