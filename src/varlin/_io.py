"""Private: write a file atomically. One implementation for checkpoints, model files, CSV and JSON
outputs, figures and downloads.

The bytes go to a temporary file beside the target, which is renamed over the target only when
the block finishes without error; on any error (Ctrl-C included) the temporary file is removed
and the target is left as it was. No reader ever sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed over ``path`` when the block succeeds.

    Args:
        path: the target; its folder must exist.
        durable: fsync the file and its folder, so the new content survives a power cut
            (checkpoints, downloads).

    The file gets ordinary permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        with contextlib.suppress(OSError):
            _fsync(target.parent, os.O_RDONLY | os.O_DIRECTORY)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    durable: bool = False,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """:func:`atomic_path`, with the temporary file opened in ``mode`` (``"wb"`` or ``"w"``).

    ``newline`` is passed to :func:`open` in text mode (``""`` for the csv module).
    """
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode, newline=newline) as fh:
        yield fh
