"""Exceptions raised by the engine; the server maps each to one HTTP status."""

from __future__ import annotations

from pathlib import Path


class Xma2Error(Exception):
    """Base class of every error the xma2 packages raise on purpose."""


class ConfigError(Xma2Error, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class ResourceUnavailable(Xma2Error, FileNotFoundError):
    """Weights or data that must be installed locally are missing; the message names the fix."""


class TaskStateError(Xma2Error, ValueError):
    """A task state does not fit the backbone or crossbar mapping it is applied to."""


class TaskNotFound(TaskStateError, KeyError):
    """No task with this name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingCancelled(Xma2Error):
    """A run stopped between steps because its cancel event was set (checkpoint kept)."""

    def __init__(self, step: int, checkpoint_dir: Path | None) -> None:
        where = f"; resume from {checkpoint_dir}" if checkpoint_dir else ""
        super().__init__(f"training cancelled after step {step}{where}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir
