"""The errors and warnings varlin raises on purpose, in one module below every module raising them.

Training, checkpoints, the command line and the UCI runner all import from here and from nowhere
above them, so no two of them need to import each other for an exception class.
"""

from __future__ import annotations

__all__ = ["VarlinWarning", "NonFiniteLossError", "CheckpointError", "CLIError"]


class VarlinWarning(UserWarning):
    """A training diagnostic: the fit ran, but something in it looks wrong."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the model holds the last good state."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, of another format, or for another model."""


class CLIError(Exception):
    """A user-facing error of the command line: printed as one line, exit status 1."""
