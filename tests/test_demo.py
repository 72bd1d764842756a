"""``varlin demo`` on a short training budget: the table and the four figures."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from varlin import cli  # noqa: E402
from varlin.demo import FIGURES, run_demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG file (checks the signature too)."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path.name} is not a PNG file"
    assert raw[12:16] == b"IHDR"
    assert raw[-8:-4] == b"IEND", f"{path.name} is truncated"  # the last chunk, then its CRC
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_run_demo_smoke(tmp_path: Path):
    stream = io.StringIO()
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    result = run_demo(tmp_path / "figs", scale=0.05, progress=False, stream=stream)
    text = stream.getvalue()

    # the caller's thread count and random state are left alone
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)

    # the table: a header, one row per metric, every value printed and finite
    lines = text.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["task", "metric", "value"]
    )
    expected = {
        "regression (gap, heteroscedastic)": ["test NLL", "test RMSE", "90% coverage"],
        "classification (two moons)": ["accuracy", "ECE", "test NLL"],
        "conjugate (3 weights, exact posterior)": [
            "log evidence", "ELBO gap, mean-field", "ELBO gap, low-rank (rank 1)",
            "ELBO gap, full", "ELBO gap, best mean-field",
        ],
    }  # fmt: skip
    rows = lines[header + 2 : header + 2 + sum(len(v) for v in expected.values())]
    printed = [float(row.split()[-1]) for row in rows]
    assert all(math.isfinite(v) for v in printed)
    flat = [(task, name) for task, names in expected.items() for name in names]
    for row, (task, name), value in zip(rows, flat, printed, strict=True):
        assert name in row
        assert value == pytest.approx(result.metrics[task][name], abs=1e-4)
    for task in expected:
        assert sum(task in row for row in rows) == 1  # the task is named once, on its first row
    assert list(result.metrics) == list(expected)

    # values in sane ranges even after a short run
    reg = result.metrics["regression (gap, heteroscedastic)"]
    cls = result.metrics["classification (two moons)"]
    conj = result.metrics["conjugate (3 weights, exact posterior)"]
    assert 0.0 <= reg["90% coverage"] <= 1.0 and reg["test RMSE"] > 0
    assert 0.5 <= cls["accuracy"] <= 1.0 and 0.0 <= cls["ECE"] <= 1.0
    # the ELBO is a lower bound on the evidence: every gap is KL(q || posterior) >= 0, and no
    # mean-field q beats the best one
    gaps = {name: value for name, value in conj.items() if name.startswith("ELBO gap")}
    assert all(value >= -1e-9 for value in gaps.values())
    assert conj["ELBO gap, mean-field"] >= conj["ELBO gap, best mean-field"] - 1e-6

    # the four figures: valid, non-trivial PNGs, and nothing else (no temporary file)
    folder = tmp_path / "figs"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FIGURES)
    assert [p.name for p in result.figures] == list(FIGURES)
    for name in FIGURES:
        path = folder / name
        width, height = png_size(path)
        assert width >= 300 and height >= 300, (name, width, height)
        assert path.stat().st_size > 10_000, name
        assert name in text  # listed in the summary


def test_demo_command_reports_an_unusable_folder(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = cli.main(["demo", "--out", str(blocker / "sub"), "--scale", "0.01", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("varlin: error: ") and len(captured.err.splitlines()) == 1
    assert "cannot create the folder" in captured.err
    assert "[1/3]" not in captured.out  # it fails before training anything
