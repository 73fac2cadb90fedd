"""Durable task state: versioned task files, their SQLite index, archives and a cache.

``task_store`` persists what ``core`` computes; it imports ``core`` data types and
nothing from the server.
"""

from task_store.cache import StoredTask, TaskCache, TaskCacheStats
from task_store.errors import (
    ChecksumMismatch,
    FingerprintMismatch,
    FormatError,
    JobFenced,
    StoreError,
    TaskInUse,
    VersionNotFound,
)
from task_store.format import SCHEMA_VERSION, Manifest, decode_task, encode_task
from task_store.index import JobRecord, JobStatus, TaskRecord, VersionRecord
from task_store.store import TaskStore

__all__ = [
    "SCHEMA_VERSION",
    "ChecksumMismatch",
    "FingerprintMismatch",
    "FormatError",
    "JobFenced",
    "JobRecord",
    "JobStatus",
    "Manifest",
    "StoreError",
    "StoredTask",
    "TaskCache",
    "TaskCacheStats",
    "TaskInUse",
    "TaskRecord",
    "TaskStore",
    "VersionNotFound",
    "VersionRecord",
    "decode_task",
    "encode_task",
]
