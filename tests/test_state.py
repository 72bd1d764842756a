"""State that must survive crashes: checkpoints and model files.

The reliability angle of :mod:`varlin.training` and the command line: a write interrupted at any
point leaves the previous checkpoint intact and no temporary file; every file loads with
``torch.load(weights_only=True)`` and carries a format version; a damaged file is a clear
:class:`~varlin.training.CheckpointError` naming it, never a silent load; ``fit`` stopped by
Ctrl-C or SIGTERM leaves a checkpoint from which it resumes to the very state of an
uninterrupted run; a model file refuses to load into another architecture and says what differs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import varlin
from varlin.cli import main as cli_main
from varlin.likelihoods import Gaussian
from varlin.training import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    History,
    load_checkpoint,
    save_checkpoint,
)

EPOCHS = 4
_g = torch.Generator().manual_seed(3)
X = torch.rand(48, 1, generator=_g) * 6 - 3
Y = torch.sin(X).squeeze(-1) + 0.1 * torch.randn(48, generator=_g)  # 3 batches of 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> tuple[nn.Module, Gaussian]:
    torch.manual_seed(0)
    model = nn.Sequential(
        varlin.VariationalLinear(1, 8, estimator="local"),
        nn.Tanh(),
        varlin.VariationalLinear(8, 1, estimator="flipout"),
    )
    return model, Gaussian(0.5, learn_noise=True)


def _fit(model: nn.Module, likelihood: Gaussian, **kwargs: Any) -> History:
    options: dict[str, Any] = {
        "epochs": EPOCHS,
        "batch_size": 16,
        "lr": 0.02,
        "seed": 7,
        "progress": False,
        "num_data": 4096,
    }
    options.update(kwargs)
    return varlin.fit(model, X, Y, likelihood=likelihood, **options)


def _state(model: nn.Module, likelihood: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        **{f"likelihood.{k}": v.clone() for k, v in likelihood.state_dict().items()},
    }


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, torch.Tensor]:
    """The state after an uninterrupted run: what every resumed run must reach exactly."""
    model, likelihood = _model()
    _fit(model, likelihood)
    return _state(model, likelihood)


def _only_file(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


class _OnCall:
    """A forward hook that runs ``action`` on forward call number ``calls``."""

    def __init__(self, calls: int, action: Callable[[], None]) -> None:
        self.calls, self.seen, self.action = calls, 0, action

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        self.seen += 1
        if self.seen == self.calls:
            self.action()


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


# -- atomic writes ---------------------------------------------------------------------------


class _CrashingSave:
    """``torch.save`` that writes part of the bytes, then dies with ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.real = torch.save

    def __call__(self, obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        self.real(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise self.error


CRASHES = {
    "disk-full": OSError(28, "No space left on device"),
    "ctrl-c": KeyboardInterrupt(),
    "killed-by-error": RuntimeError("writer crashed"),
}


@pytest.mark.parametrize("crash", CRASHES)
def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"weights": torch.arange(1000.0), "epoch": 1})
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", _CrashingSave(CRASHES[crash]))
    with pytest.raises(type(CRASHES[crash])):
        save_checkpoint(path, {"weights": torch.zeros(1000), "epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert _only_file(tmp_path) == ["run.pt"]  # the temporary file is gone
    assert load_checkpoint(path)["epoch"] == 1


def _interrupted_run(path: Path, *, after_epoch: int) -> None:
    """A full-length run stopped by Ctrl-C once epoch ``after_epoch`` is on disk."""
    model, likelihood = _model()
    model.register_forward_hook(_OnCall(3 * (after_epoch + 1) + 1, _raise_interrupt))
    with pytest.raises(KeyboardInterrupt):
        _fit(model, likelihood, checkpoint=path)
    assert load_checkpoint(path)["epoch"] == after_epoch


def test_a_crash_while_fit_saves_an_epoch_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "run.pt"
    _interrupted_run(path, after_epoch=1)
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", _CrashingSave(KeyboardInterrupt()))
    model, likelihood = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(model, likelihood, checkpoint=path)  # resumes at epoch 2, dies saving it
    monkeypatch.undo()
    assert path.read_bytes() == good and _only_file(tmp_path) == ["run.pt"]
    model, likelihood = _model()
    assert len(_fit(model, likelihood, checkpoint=path)) == EPOCHS
    _assert_same_state(_state(model, likelihood), uninterrupted)


def test_a_state_that_weights_only_cannot_load_is_refused_before_writing(tmp_path: Path) -> None:
    """A numpy scalar pickles fine but ``weights_only=True`` refuses it: refuse it up front.

    Today the write succeeds, replacing the good checkpoint by one that no loader reads, and
    the loader then calls it "truncated or corrupted".
    """
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"epoch": 1})
    good = path.read_bytes()
    with pytest.raises(TypeError, match=r"state\['history'\]\[0\] is a numpy.float64, which "):
        save_checkpoint(path, {"epoch": 2, "history": [np.float64(0.5)]})
    assert path.read_bytes() == good and _only_file(tmp_path) == ["run.pt"]


# -- format ----------------------------------------------------------------------------------


def test_fit_checkpoints_load_with_weights_only_and_carry_a_format_version(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    model, likelihood = _model()
    _fit(model, likelihood, epochs=2, checkpoint=path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT == 1
    assert raw["epoch"] == 1 and len(raw["history"]["records"]) == 2
    assert load_checkpoint(path)["format"] == CHECKPOINT_FORMAT
    torch.save({**raw, "format": CHECKPOINT_FORMAT + 1}, path)  # from a newer varlin
    with pytest.raises(CheckpointError, match=r"run\.pt' has format 2, this varlin reads format 1"):
        load_checkpoint(path)


# -- damaged files ---------------------------------------------------------------------------


def _entry_offset(raw: bytes, suffix: str) -> int:
    """Offset of the first data byte of the zip entry whose name ends with ``suffix``."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len


def _flip(raw: bytes, offset: int) -> bytes:
    out = bytearray(raw)
    out[offset] ^= 0xFF
    return bytes(out)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "truncated-to-half": lambda raw: raw[: len(raw) // 2],
    "truncated-by-one-byte": lambda raw: raw[:-1],
    "garbage": lambda raw: bytes(range(256)) * 4,
    "central-directory-flipped": lambda raw: _flip(raw, len(raw) - 30),
    "pickle-flipped": lambda raw: _flip(raw, _entry_offset(raw, "data.pkl") + 2),
    # A flipped bit inside a tensor's bytes: torch.load does not check the zip's CRC-32 and
    # returns the wrong number.
    "tensor-bytes-flipped": lambda raw: _flip(raw, _entry_offset(raw, "data/0") + 1),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_a_clear_error_and_is_left_alone(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "run.pt"
    model, likelihood = _model()
    _fit(model, likelihood, epochs=1, checkpoint=path)
    damaged = DAMAGE[damage](path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"run\.pt'") as info:
        load_checkpoint(path)
    assert len(str(info.value).splitlines()) == 1
    model, likelihood = _model()
    with pytest.raises(CheckpointError, match=r"run\.pt'"):
        _fit(model, likelihood, checkpoint=path)
    assert path.read_bytes() == damaged  # fit does not overwrite what it could not read
    assert _only_file(tmp_path) == ["run.pt"]


# -- interrupted fits ------------------------------------------------------------------------


def _send_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class _SigtermEscaped(Exception):
    """Raised by the test's own SIGTERM handler: fit did not install its handler."""


@contextlib.contextmanager
def _guarded_sigterm() -> Iterator[Callable[..., Any]]:
    """A SIGTERM handler for the test itself, so that a missing fit handler cannot kill pytest."""

    def handler(signum: int, frame: object) -> None:
        raise _SigtermEscaped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# Three batches per epoch, so forward call 3k + 1 is the first step of epoch k: call 2 is in
# epoch 0 (the checkpoint written before any step is the one on disk), call 8 in epoch 2.
@pytest.mark.parametrize(("calls", "epoch_on_disk"), [(2, -1), (8, 1), (12, 2)])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_fit_resumes_to_the_uninterrupted_state(
    tmp_path: Path,
    uninterrupted: dict[str, torch.Tensor],
    how: str,
    calls: int,
    epoch_on_disk: int,
) -> None:
    path = tmp_path / "run.pt"
    model, likelihood = _model()
    action = _raise_interrupt if how == "ctrl-c" else _send_sigterm
    handle = model.register_forward_hook(_OnCall(calls, action))
    with _guarded_sigterm() as ours:
        with pytest.raises(KeyboardInterrupt):
            _fit(model, likelihood, checkpoint=path)
        assert signal.getsignal(signal.SIGTERM) is ours  # fit restored the previous handler
    handle.remove()
    assert _only_file(tmp_path) == ["run.pt"]
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == epoch_on_disk and state["format"] == CHECKPOINT_FORMAT

    model, likelihood = _model()  # a new process: a fresh model, the same arguments
    history = _fit(model, likelihood, checkpoint=path)
    assert len(history) == EPOCHS
    assert [r["epoch"] for r in history.records] == [float(e) for e in range(EPOCHS)]
    _assert_same_state(_state(model, likelihood), uninterrupted)
    assert load_checkpoint(path)["epoch"] == EPOCHS - 1


def test_sigterm_while_a_checkpoint_is_written_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """The signal lands between the partial write and the rename."""
    path = tmp_path / "run.pt"
    _interrupted_run(path, after_epoch=0)
    good = path.read_bytes()
    real = torch.save

    def save_then_signal(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        real(obj, f)
        _send_sigterm()

    monkeypatch.setattr(torch, "save", save_then_signal)
    model, likelihood = _model()
    with _guarded_sigterm(), pytest.raises(KeyboardInterrupt):
        _fit(model, likelihood, checkpoint=path)
    monkeypatch.undo()
    assert path.read_bytes() == good and _only_file(tmp_path) == ["run.pt"]
    model, likelihood = _model()
    _fit(model, likelihood, checkpoint=path)
    _assert_same_state(_state(model, likelihood), uninterrupted)


def test_a_finished_run_is_not_trained_again_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    model, likelihood = _model()
    _fit(model, likelihood, checkpoint=path)
    done = _state(model, likelihood)
    model, likelihood = _model()
    history = _fit(model, likelihood, checkpoint=path)
    assert len(history) == EPOCHS
    _assert_same_state(_state(model, likelihood), done)


# -- CLI model files -------------------------------------------------------------------------


def _write_csv(path: Path) -> None:
    rows = ["a,b,y"] + [f"{i / 10:.1f},{i % 3},{0.2 * i + 1:.2f}" for i in range(24)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    _write_csv(folder / "data.csv")
    args = ["fit", str(folder / "data.csv"), "--target", "y", "--out", str(folder / "m.pt"),
            "--hidden", "4", "--epochs", "2", "--no-progress"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(args) == 0
    return folder / "m.pt"


def test_a_model_file_loads_with_weights_only_and_carries_a_format_version(
    model_file: Path,
) -> None:
    state = torch.load(model_file, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["kind"] == "varlin-mlp"
    assert state["spec"]["hidden"] == 4 and state["spec"]["version"] == varlin.__version__


def _edit(spec: dict[str, Any], change: str) -> None:
    if change == "hidden":
        spec["hidden"] = 5
    elif change == "depth":
        spec["depth"] = 2
    elif change == "features":  # one input column fewer, consistently described
        spec.update(features=["a"], x_mean=spec["x_mean"][:1], x_std=spec["x_std"][:1])


EXPECTED = {
    "hidden": r"\(2 inputs, depth 1, hidden 5, 1 outputs\): .*size mismatch for "
    r"0\.w_posterior\.loc: copying a param with shape torch\.Size\(\[2, 4\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[2, 5\]\)",
    "depth": r"\(2 inputs, depth 2, hidden 4, 1 outputs\): .*Missing key\(s\) in state_dict: "
    r"\"4\.w_posterior\.loc\"",
    "features": r"\(1 inputs, depth 1, hidden 4, 1 outputs\): .*size mismatch for "
    r"0\.w_posterior\.loc: .*torch\.Size\(\[2, 4\]\) from checkpoint, the shape in current "
    r"model is torch\.Size\(\[1, 4\]\)",
}


@pytest.mark.parametrize("change", EXPECTED)
def test_a_model_file_refuses_another_architecture_and_says_what_differs(
    tmp_path: Path, model_file: Path, change: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(model_file, weights_only=True)
    _edit(state["spec"], change)
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    _write_csv(tmp_path / "data.csv")
    out = tmp_path / "predictions.csv"
    code = cli_main(["predict", str(edited), str(tmp_path / "data.csv"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"varlin: error: {edited}: the stored model does not match the ")
    assert re.search(EXPECTED[change], lines[0]), lines[0]
    assert not out.exists()
    assert _only_file(tmp_path) == ["data.csv", "edited.pt"]  # no temporary output left


def test_a_damaged_model_file_is_one_line_and_no_output(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "m.pt"
    damaged.write_bytes(model_file.read_bytes()[:-100])
    _write_csv(tmp_path / "data.csv")
    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", str(damaged), str(tmp_path / "data.csv"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "not a readable model file" in err and "truncated or corrupted" in err
    assert not out.exists() and _only_file(tmp_path) == ["data.csv", "m.pt"]
