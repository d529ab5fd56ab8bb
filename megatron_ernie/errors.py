"""Errors a user can cause, under one base class.

Everything a user controls — a recipe or override, a data file, a checkpoint directory, a parallel
layout, a weights file, a prompt sent to a rollout engine — fails with a `UserError` subclass whose
message names the file, line, key or tensor at fault. Entry points catch `UserError` and print
its message (no traceback); anything else is a bug and keeps its traceback.

The subclasses also derive from the builtin the call sites raised before (ValueError, KeyError),
so `except ValueError` in user code keeps working (a missing data file is also a
FileNotFoundError, an existing output a FileExistsError).
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names where (file, line, key or tensor)."""


class ConfigError(UserError, ValueError):
    """A recipe, override or model config that cannot be used (the key named)."""


class DataError(UserError, ValueError):
    """A data file that cannot be used (the file and line named)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist (the path named); also a FileNotFoundError."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model directory that is missing, incomplete or of the wrong kind."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists and may not be replaced (choose another, or allow overwriting)."""


class LayoutError(UserError, ValueError):
    """A parallel layout that does not fit the world size or the model."""


class WeightError(UserError, KeyError):
    """A weight that is missing, unexpected or misshapen (the tensor named)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EngineInputError(UserError, ValueError):
    """A rollout request an engine cannot serve: empty prompt, token id out of range, too long."""
