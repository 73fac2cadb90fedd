"""Exceptions raised by the engine; the server maps each to one HTTP status."""

from __future__ import annotations


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
