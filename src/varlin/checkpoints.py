"""Checkpoint files: atomic, CRC-checked, ``weights_only``-loadable; and the loop's checkpointer.

:func:`save_checkpoint` and :func:`load_checkpoint` read and write one dict of tensors, numbers,
strings and containers. :class:`Checkpointer` is the part of :func:`varlin.fit`'s loop that
writes the loop's whole state after every epoch and hands it back on a resume.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _validation as V
from ._io import atomic_write
from .errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "CheckpointError",
    "from_checkpoint",
    "load_checkpoint",
    "load_module_state",
    "per_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash during the write leaves the previous checkpoint intact. The file holds only tensors,
    numbers, strings and containers, so it loads with ``torch.load(weights_only=True)``.
    """
    V.weights_only_safe("state", state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", durable=True) as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupted, not a varlin checkpoint, or of a newer
            format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        damaged = _damaged_entry(path)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (truncated or corrupted): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its entry {damaged!r} fails its CRC-32 check"
        )
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{str(path)!r} is not a varlin checkpoint (no 'format' entry)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']}, this varlin reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return state


def _damaged_entry(path: Path) -> str | None:
    """The first entry of a zip checkpoint whose CRC-32 does not match (torch.load never checks)."""
    if not zipfile.is_zipfile(path):
        return None  # not a zip archive: torch.load reports it
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def load_module_state(module: nn.Module, state: dict[str, Tensor], what: str, path: Any) -> None:
    """``module.load_state_dict(state)``, a mismatch reported as a :class:`CheckpointError`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this {what}: {detail}"
        ) from None


def per_model(values: Sequence[Any], stacked: bool) -> Any:
    """A checkpoint entry: the list of per-model values of several models trained together, or
    the single model's value (the format of ``fit``, older than several models)."""
    return list(values) if stacked else values[0]


def from_checkpoint(value: Any, stacked: bool) -> list[Any]:
    """The inverse of :func:`per_model`: one value per model."""
    return list(value) if stacked else [value]


class Checkpointer:
    """The loop's checkpoint part: the state of every part, written after each epoch.

    A checkpoint is written before the first epoch (so that an interruption in it leaves one) and
    after every epoch; :meth:`resume_state` hands a saved one back to the loop, which gives each
    part its entries. A run resumed from it continues exactly as if it had not been interrupted.

    Args:
        path: the checkpoint file, or ``None`` for none (every method is then a no-op).
        resume: whether an existing file is resumed from (``False``: overwritten).
        keys: the entries every checkpoint of this loop holds; a file lacking one was written by
            something else.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, *, resume: bool, keys: tuple[str, ...]
    ) -> None:
        self.path = path
        self.resume = resume
        self.keys = keys

    def resume_state(self) -> dict[str, Any] | None:
        """The saved state to continue from, or ``None`` to start afresh.

        Raises:
            CheckpointError: the file is damaged or was not written by this loop.
        """
        if self.path is None or not self.resume or not Path(self.path).is_file():
            return None
        state = load_checkpoint(self.path)  # on the CPU: RNG states must stay there
        missing = [k for k in self.keys if k not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} was not written by varlin.fit (it lacks "
                f"{', '.join(missing)}); pass resume=False to overwrite it"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (nothing without a path)."""
        if self.path is not None:
            save_checkpoint(self.path, state)

    def error(self, message: str) -> CheckpointError:
        """A :class:`CheckpointError` naming this checkpoint: ``checkpoint '<path>' <message>``."""
        return CheckpointError(f"checkpoint {str(self.path)!r} {message}")
