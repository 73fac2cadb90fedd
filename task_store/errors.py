"""Errors of the task store; each names the stored object and the way out."""

from __future__ import annotations

from core.errors import TaskNotFound, Xma2Error


class StoreError(Xma2Error, RuntimeError):
    """The store cannot complete an operation (bad layout, lock held, unreadable files)."""


class FormatError(StoreError, ValueError):
    """A manifest, tensor file or archive does not follow the documented task format."""


class ChecksumMismatch(StoreError):
    """A stored file's SHA-256 differs from the one its manifest or the index recorded."""


class FingerprintMismatch(StoreError):
    """A task was adapted on another backbone or crossbar configuration than this one."""


class TaskInUse(StoreError):
    """A task or version is pinned or active; unpin or activate another, or force it."""


class VersionNotFound(TaskNotFound):
    """The task exists but not in the requested version."""


class JobFenced(StoreError):
    """A job's worker tried to commit after its job was ended by someone else."""
