"""SQLite index of tasks, their versions, the active version of each, and job records.

The index is the single source of truth for what exists: a version's files count only
once its row is committed, so a crash between writing files and committing leaves the
previous state. WAL mode lets readers in other processes proceed while one writer
commits; writers are serialised by the store's lock file and SQLite's own lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from core.errors import TaskNotFound
from task_store.errors import JobFenced, StoreError, VersionNotFound
from task_store.format import utc_now

INDEX_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    active_version INTEGER,
    last_version INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    task TEXT NOT NULL REFERENCES tasks(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    method TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (task, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    task TEXT,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    created TEXT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass(frozen=True)
class VersionRecord:
    """One committed task version as the index knows it."""

    task: str
    version: int
    method: str
    fingerprint: str
    manifest_sha256: str
    bytes: int
    created: str
    active: bool


@dataclass(frozen=True)
class TaskRecord:
    name: str
    active_version: int | None
    versions: tuple[int, ...]
    created: str
    updated: str


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    task: str | None
    status: JobStatus
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created: str
    updated: str


@dataclass(frozen=True)
class JobEvent:
    seq: int
    created: str
    level: str
    message: str


class TaskIndex:
    """The store's SQLite database; safe for threads of one process and for many processes.

    Args:
        path: database file (created with its schema when missing).
        timeout_s: how long to wait for another process's write transaction.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        schema = self._schema_version()
        if schema is None:  # a new index: the only time opening it writes
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                           (str(INDEX_SCHEMA_VERSION),))
            schema = self._schema_version()
        if schema != str(INDEX_SCHEMA_VERSION):
            raise StoreError(f"{self.path}: index schema {schema}, this xma2 reads "
                             f"{INDEX_SCHEMA_VERSION}; upgrade xma2")

    def _schema_version(self) -> str | None:
        """Read without a write lock, so readers open while a writer commits."""
        try:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return None
        return None if row is None else row["value"]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it commits or none."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- tasks and versions ----------------------------------------------------------

    def task(self, name: str) -> TaskRecord:
        rows = self._query("SELECT * FROM tasks WHERE name = ?", (name,))
        if not rows:
            raise TaskNotFound(f"no task named {name!r} in the store; list tasks to see "
                               "what is registered")
        versions = self._query("SELECT version FROM versions WHERE task = ? ORDER BY version",
                               (name,))
        row = rows[0]
        return TaskRecord(row["name"], row["active_version"],
                          tuple(v["version"] for v in versions), row["created"], row["updated"])

    def tasks(self) -> list[TaskRecord]:
        names = [r["name"] for r in self._query("SELECT name FROM tasks ORDER BY name")]
        return [self.task(n) for n in names]

    def version(self, name: str, version: int | None = None) -> VersionRecord:
        """A version's record; ``None`` means the task's active version."""
        rows = self._query(
            "SELECT v.*, t.active_version FROM tasks t JOIN versions v ON v.task = t.name "
            "WHERE t.name = ? AND v.version = COALESCE(?, t.active_version)", (name, version))
        if rows:
            return self._version_record(rows[0])
        task = self.task(name)
        if version is None:
            raise VersionNotFound(f"task {name!r} has no active version; activate one of "
                                  f"{list(task.versions)}")
        raise VersionNotFound(f"task {name!r} has no version {version}; it has "
                              f"{list(task.versions)}")

    def versions(self, name: str) -> list[VersionRecord]:
        self.task(name)
        rows = self._query(
            "SELECT v.*, t.active_version FROM versions v JOIN tasks t ON t.name = v.task "
            "WHERE v.task = ? ORDER BY v.version", (name,))
        return [self._version_record(r) for r in rows]

    @staticmethod
    def _version_record(row: sqlite3.Row) -> VersionRecord:
        return VersionRecord(row["task"], row["version"], row["method"], row["fingerprint"],
                             row["manifest_sha256"], row["bytes"], row["created"],
                             row["active_version"] == row["version"])

    def has_version(self, name: str, version: int) -> bool:
        return bool(self._query("SELECT 1 FROM versions WHERE task = ? AND version = ?",
                                (name, version)))

    def next_version(self, name: str) -> int:
        """The number the next version of ``name`` gets; a task's numbers are never reused
        while the task exists (call under the store's write lock)."""
        rows = self._query("SELECT last_version FROM tasks WHERE name = ?", (name,))
        return 1 if not rows else rows[0]["last_version"] + 1

    def add_version(self, db: sqlite3.Connection, record: VersionRecord, *,
                    activate: bool) -> None:
        now = utc_now()
        db.execute("INSERT INTO tasks (name, active_version, last_version, created, updated) "
                   "VALUES (?, NULL, 0, ?, ?) ON CONFLICT(name) DO NOTHING",
                   (record.task, now, now))
        db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (record.task, record.version, record.method, record.fingerprint,
                    record.manifest_sha256, record.bytes, record.created))
        db.execute("UPDATE tasks SET last_version = MAX(last_version, ?), updated = ?, "
                   "active_version = CASE WHEN ? OR active_version IS NULL THEN ? "
                   "ELSE active_version END WHERE name = ?",
                   (record.version, now, activate, record.version, record.task))

    def set_active(self, db: sqlite3.Connection, name: str, version: int | None) -> None:
        db.execute("UPDATE tasks SET active_version = ?, updated = ? WHERE name = ?",
                   (version, utc_now(), name))

    def delete_version(self, db: sqlite3.Connection, name: str, version: int) -> None:
        db.execute("DELETE FROM versions WHERE task = ? AND version = ?", (name, version))

    def delete_task(self, db: sqlite3.Connection, name: str) -> None:
        db.execute("DELETE FROM tasks WHERE name = ?", (name,))

    def committed_versions(self) -> set[tuple[str, int]]:
        return {(r["task"], r["version"])
                for r in self._query("SELECT task, version FROM versions")}

    # -- jobs ------------------------------------------------------------------------

    def create_job(self, kind: str, *, task: str | None = None,
                   params: dict[str, Any] | None = None) -> JobRecord:
        job_id = f"job-{uuid.uuid4().hex[:20]}"
        now = utc_now()
        with self.transaction() as db:
            db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
                       (job_id, kind, task, JobStatus.QUEUED.value,
                        json.dumps(params or {}, sort_keys=True), now, now))
        return self.job(job_id)

    def job(self, job_id: str) -> JobRecord:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise StoreError(f"no job {job_id!r}; list jobs to see the known ids")
        r = rows[0]
        return JobRecord(r["id"], r["kind"], r["task"], JobStatus(r["status"]),
                         json.loads(r["params"]),
                         None if r["result"] is None else json.loads(r["result"]),
                         r["error"], r["created"], r["updated"])

    def jobs(self, *, status: JobStatus | None = None, limit: int = 20,
             after: str | None = None) -> list[JobRecord]:
        """Jobs newest first; ``after`` is the last id of the previous page."""
        sql = "SELECT id FROM jobs WHERE 1 = 1"
        args: list[str | int] = []
        if status is not None:
            sql += " AND status = ?"
            args.append(JobStatus(status).value)
        if after is not None:
            sql += " AND rowid < (SELECT rowid FROM jobs WHERE id = ?)"
            args.append(after)
        sql += " ORDER BY rowid DESC LIMIT ?"
        args.append(max(1, limit))
        return [self.job(r["id"]) for r in self._query(sql, tuple(args))]

    def job_counts(self) -> dict[str, int]:
        """Jobs per status."""
        rows = self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def update_job(self, job_id: str, status: JobStatus, *,
                   result: dict[str, Any] | None = None, error: str | None = None) -> JobRecord:
        status = JobStatus(status)
        with self.transaction() as db:
            current = self.job(job_id)
            if current.status.terminal:
                raise StoreError(f"job {job_id} is already {current.status.value}")
            db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, updated = ? "
                       "WHERE id = ?",
                       (status.value, None if result is None else json.dumps(result),
                        error, utc_now(), job_id))
        return self.job(job_id)

    def finish_job_in(self, db: sqlite3.Connection, job_id: str, status: JobStatus, *,
                      result: dict[str, Any] | None = None, error: str | None = None) -> None:
        """End a job inside the caller's transaction, only if it is still running: a
        worker whose job was ended meanwhile (the server restarted, a cancel overstayed)
        must not have its result committed with it."""
        row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobFenced(f"job {job_id} no longer exists; its result is discarded")
        if row["status"] != JobStatus.RUNNING.value:
            raise JobFenced(f"job {job_id} is {row['status']}, no longer running; its result "
                            "is discarded")
        db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, updated = ? "
                   "WHERE id = ?", (JobStatus(status).value,
                                    None if result is None else json.dumps(result), error,
                                    utc_now(), job_id))

    def add_job_event(self, job_id: str, message: str, *, level: str = "info") -> JobEvent:
        with self.transaction() as db:
            self.job(job_id)
            row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM job_events "
                             "WHERE job_id = ?", (job_id,)).fetchone()
            event = JobEvent(row["seq"], utc_now(), level, message)
            db.execute("INSERT INTO job_events VALUES (?, ?, ?, ?, ?)",
                       (job_id, event.seq, event.created, event.level, event.message))
        return event

    def job_events(self, job_id: str, *, after: int = 0, limit: int = 50) -> list[JobEvent]:
        rows = self._query("SELECT * FROM job_events WHERE job_id = ? AND seq > ? "
                           "ORDER BY seq LIMIT ?", (job_id, after, max(1, limit)))
        return [JobEvent(r["seq"], r["created"], r["level"], r["message"]) for r in rows]
