"""The one atomic-write helper behind checkpoints, model files, outputs, figures, downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from varlin._io import atomic_path, atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("durable", [False, True])
def test_success_replaces_the_target_with_ordinary_permissions(tmp_path: Path, durable: bool):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target, "wb", durable=durable) as fh:
        fh.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_error_leaves_the_target_and_no_temporary_file(tmp_path: Path, error: BaseException):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(type(error)), atomic_write(target, "w", newline="") as fh:
        fh.write("half")
        raise error
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_path_creates_a_new_file(tmp_path: Path):
    target = tmp_path / "new.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
