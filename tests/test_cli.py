"""The ``varlin`` command line: fit/predict round trips and one clear line for every bad input.

Every bad-input test checks the three promises of :mod:`varlin.cli`: exit status 1, a single
``varlin: error: ...`` line on stderr naming the problem (no traceback), and no output file nor
temporary file left in the output folder.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import varlin
from varlin import cli
from varlin.training import load_checkpoint, save_checkpoint

FAST = ["--epochs", "3", "--hidden", "8", "--batch-size", "16", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models: one thread is fastest on a shared 2-core machine; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers ----------------------------------------------------------------------------------
def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def regression_rows(n: int = 60, seed: int = 0) -> list[list[object]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g)
    return [
        [f"{a:.5f}", f"{b:.5f}", f"{t:.5f}"]
        for (a, b), t in zip(x.tolist(), y.tolist(), strict=True)
    ]


def classification_rows(n: int = 60, seed: int = 0) -> list[list[object]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    label = ["red" if a + b > 0 else "blue" for a, b in x.tolist()]
    return [[f"{a:.5f}", f"{b:.5f}", c] for (a, b), c in zip(x.tolist(), label, strict=True)]


@pytest.fixture
def reg_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reg.csv", ["x1", "x2", "y"], regression_rows())


@pytest.fixture
def model_file(tmp_path: Path, reg_csv: Path) -> Path:
    """A regression model file, fitted once per test that needs it (3 epochs: fast)."""
    out = tmp_path / "models" / "reg.pt"
    out.parent.mkdir()
    assert cli.main(["fit", str(reg_csv), "--target", "y", "--out", str(out), *FAST]) == 0
    return out


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_clean_error(capsys: pytest.CaptureFixture[str], status: int, *fragments: str) -> str:
    """Exit 1, one ``varlin: error:`` line containing every fragment, no traceback."""
    err = capsys.readouterr().err
    assert status == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("varlin: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def fit_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: Path, *extra: str, target: str = "y"
) -> str:
    """Run a failing ``varlin fit`` writing into a fresh folder; check that folder stays empty."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = listing(out_dir)
    status = cli.main(
        ["fit", str(data), "--target", target, "--out", str(out_dir / "m.pt"), *FAST, *extra]
    )
    line = assert_clean_error(capsys, status)
    assert listing(out_dir) == before, "a partial or temporary file was left behind"
    return line


def predict_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, data: Path
) -> str:
    out_dir = tmp_path / "pred"
    out_dir.mkdir(exist_ok=True)
    before = listing(out_dir)
    status = cli.main(["predict", str(model), str(data), "--out", str(out_dir / "p.csv")])
    line = assert_clean_error(capsys, status)
    assert listing(out_dir) == before, "a partial or temporary file was left behind"
    return line


# -- round trips ------------------------------------------------------------------------------
def test_regression_round_trip(tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]):
    model = tmp_path / "reg.pt"
    status = cli.main(
        ["fit", str(reg_csv), "--target", "y", "--out", str(model), "--epochs", "40",
         "--hidden", "16", "--batch-size", "20", "--lr", "0.02", "--no-progress"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert "regression" in capsys.readouterr().out
    assert sorted(listing(tmp_path)) == ["reg.csv", "reg.pt"]  # no temporary file left
    # the model file describes itself
    spec, _, _ = cli.load_model_file(str(model))
    assert spec["task"] == "regression" and spec["features"] == ["x1", "x2"]
    assert spec["version"] and len(spec["x_mean"]) == 2 and spec["y_std"] > 0

    new = write_csv(tmp_path / "new.csv", ["id", "x2", "x1"], [[i, *r[1::-1]] for i, r in
                    enumerate(regression_rows(25, seed=1))])  # fmt: skip
    preds = tmp_path / "preds.csv"
    assert cli.main(["predict", str(model), str(new), "--out", str(preds), "--level", "0.8"]) == 0
    header, rows = read_rows(preds)
    assert header == ["id", "x2", "x1", "mean", "std", "epistemic_std", "aleatoric_std",
                      "lower_80", "upper_80"]  # fmt: skip
    assert len(rows) == 25 and [r["id"] for r in rows] == [str(i) for i in range(25)]
    truth = [math.sin(float(r["x1"])) + 0.5 * float(r["x2"]) for r in rows]
    for row in rows:
        mean, std = float(row["mean"]), float(row["std"])
        epi, ale = float(row["epistemic_std"]), float(row["aleatoric_std"])
        assert float(row["lower_80"]) < mean < float(row["upper_80"])
        assert std > 0 and epi >= 0 and ale > 0
        assert math.isclose(std**2, epi**2 + ale**2, rel_tol=1e-3)  # law of total variance
    # predictions are in the target's units, not standardised: the model learned something
    err = sum((float(r["mean"]) - t) ** 2 for r, t in zip(rows, truth, strict=True)) / len(rows)
    spread = sum((t - sum(truth) / len(truth)) ** 2 for t in truth) / len(truth)
    assert err < spread, (err, spread)


def test_classification_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_csv(tmp_path / "cls.csv", ["a", "b", "colour"], classification_rows(80))
    model = tmp_path / "cls.pt"
    status = cli.main(
        ["fit", str(data), "--target", "colour", "--out", str(model), "--epochs", "30",
         "--hidden", "16", "--batch-size", "20", "--lr", "0.03", "--no-progress"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert "classification" in capsys.readouterr().out  # inferred from text labels
    preds = tmp_path / "preds.csv"
    assert cli.main(["predict", str(model), str(data), "--out", str(preds)]) == 0
    header, rows = read_rows(preds)
    assert header == ["a", "b", "colour", "p_blue", "p_red", "entropy", "mutual_information",
                      "predicted"]  # fmt: skip
    correct = 0
    for row in rows:
        p_blue, p_red = float(row["p_blue"]), float(row["p_red"])
        assert 0 <= p_blue <= 1 and 0 <= p_red <= 1
        assert math.isclose(p_blue + p_red, 1.0, abs_tol=1e-5)
        entropy, mi = float(row["entropy"]), float(row["mutual_information"])
        assert 0 <= mi <= entropy + 1e-6 <= math.log(2) + 1e-5
        assert row["predicted"] == ("blue" if p_blue > p_red else "red")
        correct += row["predicted"] == row["colour"]
    assert correct / len(rows) > 0.8  # a linearly separable problem


def test_numeric_labels_infer_classification_and_collide_as_pred_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    rows = [[a, b, "1.0" if c == "red" else "0"] for a, b, c in classification_rows(40)]
    data = write_csv(tmp_path / "d.csv", ["mean", "b", "label"], rows)
    model = tmp_path / "m.pt"
    assert cli.main(["fit", str(data), "--target", "label", "--out", str(model), *FAST]) == 0
    spec, _, _ = cli.load_model_file(str(model))
    assert spec["task"] == "classification" and spec["classes"] == ["0", "1"]  # "1.0" is "1"
    preds = tmp_path / "p.csv"
    assert cli.main(["predict", str(model), str(data), "--out", str(preds)]) == 0
    header, _ = read_rows(preds)
    assert header[:3] == ["mean", "b", "label"] and "p_0" in header and "p_1" in header
    # --task regression on the same integer target is honoured
    assert cli.main(
        ["fit", str(data), "--target", "label", "--task", "regression", "--out", str(model), *FAST]
    ) == 0  # fmt: skip
    assert cli.load_model_file(str(model))[0]["task"] == "regression"


def test_heteroscedastic_likelihood_round_trip(tmp_path: Path, reg_csv: Path):
    model = tmp_path / "h.pt"
    args = ["fit", str(reg_csv), "--target", "y", "--likelihood", "heteroscedastic"]
    assert cli.main([*args, "--estimator", "flipout", "--out", str(model), *FAST]) == 0
    preds = tmp_path / "p.csv"
    assert cli.main(["predict", str(model), str(reg_csv), "--out", str(preds)]) == 0
    _, rows = read_rows(preds)
    stds = {row["aleatoric_std"] for row in rows}
    assert len(stds) > 1  # the noise scale depends on the input
    assert oct(os.stat(preds).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_console_script_entry_point(tmp_path: Path, model_file: Path, reg_csv: Path):
    """One real subprocess: the installed ``varlin`` script predicts, then reports an error."""
    exe = Path(sys.executable).with_name("varlin")
    if not exe.exists():
        pytest.skip("the varlin console script is not installed next to this Python")
    preds = tmp_path / "p.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(exe), "predict", str(model_file), str(reg_csv), "--out", str(preds),
         "--num-samples", "16"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote 60 predictions" in done.stdout
    header, rows = read_rows(preds)
    assert header[-6:] == ["mean", "std", "epistemic_std", "aleatoric_std", "lower_90", "upper_90"]
    assert len(rows) == 60


# -- bad input: fit ---------------------------------------------------------------------------
def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    line = fit_fails(capsys, tmp_path, tmp_path / "nope.csv")
    assert "nope.csv: no such file" in line


def test_missing_target_column(tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]):
    line = fit_fails(capsys, tmp_path, reg_csv, target="price")
    assert "target column 'price' not found" in line and "x1, x2, y" in line


def test_non_numeric_feature(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = regression_rows(10)
    rows[3][1] = "abc"
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], rows)
    line = fit_fails(capsys, tmp_path, data)
    assert "column 'x2', data row 4: 'abc' is not a number" in line


def test_non_numeric_target_with_task_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    rows = regression_rows(10)
    rows[5][2] = "high"
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], rows)
    line = fit_fails(capsys, tmp_path, data, "--task", "regression")
    assert "column 'y', data row 6: 'high' is not a number" in line


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity"])
@pytest.mark.parametrize("column", ["x1", "y"])
def test_non_finite_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, column: str
):
    rows = regression_rows(10)
    rows[2][["x1", "x2", "y"].index(column)] = bad
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], rows)
    line = fit_fails(capsys, tmp_path, data)
    assert f"column {column!r}, data row 3: {bad!r} is not a finite number" in line


def test_non_finite_class_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = [[a, b, "1" if c == "red" else "0"] for a, b, c in classification_rows(10)]
    rows[4][2] = "nan"
    data = write_csv(tmp_path / "d.csv", ["a", "b", "y"], rows)
    line = fit_fails(capsys, tmp_path, data, "--task", "classification")
    assert "data row 5: 'nan' is not a finite number" in line


def test_value_too_large_to_standardise(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = regression_rows(10)
    rows[0][0] = "1e300"  # finite, but its square (in the standard deviation) is not
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], rows)
    line = fit_fails(capsys, tmp_path, data)
    assert "column 'x1' holds values too large to standardise" in line


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str):
    data = tmp_path / "empty.csv"
    data.write_text(content)
    line = fit_fails(capsys, tmp_path, data)
    assert "the file is empty" in line


def test_header_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_csv(tmp_path / "h.csv", ["x1", "x2", "y"], [])
    line = fit_fails(capsys, tmp_path, data)
    assert "header but no data rows" in line


def test_ragged_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "ragged.csv"
    data.write_text("x1,x2,y\n1,2,3\n4,5\n6,7,8\n")
    line = fit_fails(capsys, tmp_path, data)
    assert "data row 2 has 2 fields, the header has 3" in line


def test_duplicate_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "dup.csv"
    data.write_text("x,x,y\n1,2,3\n4,5,6\n")
    line = fit_fails(capsys, tmp_path, data)
    assert "duplicate column names in the header: ['x']" in line


def test_single_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = [[a, b, "red"] for a, b, _ in classification_rows(10)]
    data = write_csv(tmp_path / "d.csv", ["a", "b", "y"], rows)
    line = fit_fails(capsys, tmp_path, data)
    assert "single class ['red']" in line


def test_data_path_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    line = fit_fails(capsys, tmp_path, folder)
    assert "is a folder" in line


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "bin.csv"
    data.write_bytes(b"x,y\n\xff\xfe\x00\x81,1\n")
    line = fit_fails(capsys, tmp_path, data)
    assert "cannot read it as a UTF-8 CSV file" in line


def test_byte_order_mark_is_ignored(tmp_path: Path):
    data = tmp_path / "bom.csv"
    rows = "\n".join(",".join(map(str, r)) for r in regression_rows(20))
    data.write_text("\ufeffx1,x2,y\n" + rows + "\n", encoding="utf-8")
    out = tmp_path / "m.pt"
    assert cli.main(["fit", str(data), "--target", "y", "--out", str(out), *FAST]) == 0
    assert cli.load_model_file(str(out))[0]["features"] == ["x1", "x2"]


def test_output_folder_missing_fails_before_training(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str], monkeypatch
):
    def no_training(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("fit ran although the output folder does not exist")

    monkeypatch.setattr(cli, "fit", no_training)
    out = tmp_path / "no" / "such" / "m.pt"
    status = cli.main(["fit", str(reg_csv), "--target", "y", "--out", str(out), *FAST])
    assert_clean_error(capsys, status, "does not exist")
    assert not (tmp_path / "no").exists()


def test_output_is_a_folder(tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "taken"
    out.mkdir()
    status = cli.main(["fit", str(reg_csv), "--target", "y", "--out", str(out), *FAST])
    assert_clean_error(capsys, status, "is a folder")
    assert listing(out) == set()


def test_failure_keeps_an_existing_output(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
):
    """A failed run leaves the previous file at --out exactly as it was."""
    before = model_file.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("x1,x2,y\n1,2,nan\n3,4,5\n")
    status = cli.main(["fit", str(bad), "--target", "y", "--out", str(model_file), *FAST])
    assert_clean_error(capsys, status, "not a finite number")
    assert model_file.read_bytes() == before
    assert listing(model_file.parent) == {model_file.name}


def test_interrupted_write_leaves_no_file(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str], monkeypatch
):
    """An error while the model file is being written: no partial file, no temporary file."""

    def broken_save(path, state):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "save_checkpoint", broken_save)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status = cli.main(["fit", str(reg_csv), "--target", "y", "--out", str(out_dir / "m.pt"), *FAST])
    assert_clean_error(capsys, status, "No space left on device")
    assert listing(out_dir) == set()


def test_training_warnings_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Diagnostics of varlin.fit reach the user as ``varlin: warning:`` lines, not tracebacks."""
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], regression_rows(8))
    out = tmp_path / "m.pt"
    args = ["fit", str(data), "--target", "y", "--out", str(out), "--hidden", "4"]
    # a learning rate so small that nothing moves: varlin.fit warns about it
    status = cli.main([*args, "--epochs", "120", "--batch-size", "8", "--lr", "1e-9",
                       "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0 and out.is_file()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err
    assert all(line.startswith("varlin: warning: ") for line in lines), err


# -- bad input: predict -----------------------------------------------------------------------
def test_predict_wrong_column_set(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
):
    data = write_csv(tmp_path / "new.csv", ["x1", "z"], [[1, 2], [3, 4]])
    line = predict_fails(capsys, tmp_path, model_file, data)
    assert "columns ['x2'] are missing" in line and "['x1', 'x2']" in line


def test_predict_non_finite_feature(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
):
    data = write_csv(tmp_path / "new.csv", ["x1", "x2"], [[1, 2], [3, "inf"]])
    line = predict_fails(capsys, tmp_path, model_file, data)
    assert "column 'x2', data row 2: 'inf' is not a finite number" in line


def test_predict_value_overflowing_float32(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
):
    data = write_csv(tmp_path / "new.csv", ["x1", "x2"], [[1, 2], ["1e39", 0]])
    line = predict_fails(capsys, tmp_path, model_file, data)
    assert "too large for float32" in line


def test_predict_missing_model(tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]):
    line = predict_fails(capsys, tmp_path, tmp_path / "absent.pt", reg_csv)
    assert "absent.pt: no such model file" in line


def test_predict_model_path_is_a_folder(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]
):
    folder = tmp_path / "model.pt"
    folder.mkdir()
    line = predict_fails(capsys, tmp_path, folder, reg_csv)
    assert "is a folder, not a model file" in line


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "empty", "text"])
def test_predict_damaged_model_file(
    tmp_path: Path, model_file: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str],
    damage: str,
):  # fmt: skip
    raw = model_file.read_bytes()
    bad = tmp_path / f"{damage}.pt"
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "corrupted":
        middle = len(raw) // 2
        bad.write_bytes(raw[:100] + bytes(b ^ 0xFF for b in raw[100:middle]) + raw[middle:])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("x1,x2,y\n1,2,3\n")
    line = predict_fails(capsys, tmp_path, bad, reg_csv)
    assert f"{damage}.pt: not a readable model file" in line


@pytest.mark.parametrize(
    "state",
    [
        {"weights": torch.zeros(3)},  # a torch file, not a varlin checkpoint
        {"format": 1, "model": {}},  # a varlin checkpoint (varlin.fit's), not a model file
        [1, 2, 3],
    ],
)
def test_predict_not_a_model_file(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str], state: object
):
    other = tmp_path / "other.pt"
    torch.save(state, other)
    line = predict_fails(capsys, tmp_path, other, reg_csv)
    assert "other.pt: not a" in line


def _edit_model_file(path: Path, edit) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    edited = path.with_name("edited.pt")
    torch.save(state, edited)
    return edited


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["spec"].update(hidden=9), "does not match the architecture it declares"),
        (lambda s: s["spec"].update(depth=2), "does not match the architecture it declares"),
        (
            lambda s: s["spec"].update(
                features=["x1", "x2", "x3"], x_mean=[0.0] * 3, x_std=[1.0] * 3
            ),
            "does not match",
        ),  # fmt: skip
        (lambda s: s["spec"].update(likelihood="heteroscedastic", outputs=2), "does not match"),
        (lambda s: s["spec"].update(outputs=3), "'outputs' is 3"),
        (lambda s: s["spec"].update(hidden=-1), "'hidden' must be a positive integer"),
        (lambda s: s["spec"].update(estimator="magic"), "'estimator' must be one of"),
        (lambda s: s["spec"].update(x_std=[1.0]), "'x_mean' and 'x_std' must be lists of 2"),
        (lambda s: s["spec"].pop("features"), "it lacks features"),
        (lambda s: s.pop("likelihood"), "the stored likelihood does not match"),
        (lambda s: s["model"]["0.w_posterior.loc"].fill_(float("nan")), "NaN or infinite"),
    ],
)
def test_predict_model_state_does_not_match_its_spec(
    tmp_path: Path, model_file: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str],
    edit, message: str,
):  # fmt: skip
    edited = _edit_model_file(model_file, edit)
    line = predict_fails(capsys, tmp_path, edited, reg_csv)
    assert message in line


def test_predict_output_folder_missing(
    tmp_path: Path, model_file: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "missing" / "p.csv"
    status = cli.main(["predict", str(model_file), str(reg_csv), "--out", str(out)])
    assert_clean_error(capsys, status, "does not exist")
    assert not out.parent.exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "data.csv", "--target", "y", "--out", "m.pt", "--epochs", "0"])
    assert info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_bench_passes_its_options_through(tmp_path: Path) -> None:
    """``varlin bench --quick ...``: options after ``bench`` go to benchmarks/speed.py."""
    args = ["--quick", "--sizes", "16:4", "--rounds", "2", "--out", str(tmp_path)]
    code = cli.main(["bench", *args])
    assert code == 0
    assert (tmp_path / "speed.json").is_file()
    assert (tmp_path / "speed.md").read_text().startswith("# Speed")


# -- class labels, column names and ambiguous input ------------------------------------------
def _labelled_rows(labels: list[str], n: int = 60) -> list[list[object]]:
    """Rows ``x1, x2, label`` cycling through ``labels``: every label appears several times."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return [[f"{a:.5f}", f"{b:.5f}", labels[i % len(labels)]] for i, (a, b) in
            enumerate(x.tolist())]  # fmt: skip


@pytest.mark.parametrize(
    ("labels", "classes"),
    [
        (["1234567", "1234568", "2000000"], ["1234567", "1234568", "2000000"]),
        (["1000001", "1000002", "1000003"], ["1000001", "1000002", "1000003"]),
        (["9007199254740993", "9007199254740992"], ["9007199254740992", "9007199254740993"]),
        (["1.0", "1", "2"], ["1", "2"]),  # equal numbers are one class, written as an integer
        (["0.5", ".50", "0.25", "3"], ["0.25", "0.5", "3"]),  # its first spelling
        (["0", "-0", "1"], ["0", "1"]),  # -0 == 0: one class, not a KeyError
        (["10", "9", "b"], ["10", "9", "b"]),  # not all numbers: text, sorted as text
    ],
)
def test_every_distinct_class_label_is_its_own_class_and_written_exactly(
    tmp_path: Path, labels: list[str], classes: list[str]
):
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], _labelled_rows(labels))
    model = tmp_path / "m.pt"
    args = ["fit", str(data), "--target", "y", "--task", "classification", "--out", str(model)]
    assert cli.main([*args, *FAST]) == 0
    spec, _, _ = cli.load_model_file(str(model))
    assert spec["classes"] == classes
    preds = tmp_path / "p.csv"
    assert cli.main(["predict", str(model), str(data), "--out", str(preds)]) == 0
    header, rows = read_rows(preds)
    assert header[3:] == [f"p_{c}" for c in classes] + [
        "entropy", "mutual_information", "predicted"
    ]  # fmt: skip
    for row in rows:
        assert math.isclose(sum(float(row[f"p_{c}"]) for c in classes), 1.0, abs_tol=1e-4)
        assert row["predicted"] in classes


def test_integer_labels_beyond_float_precision_infer_classification(tmp_path: Path):
    labels = ["9007199254740993", "9007199254740992", "9007199254740994"]
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], _labelled_rows(labels))
    model = tmp_path / "m.pt"
    assert cli.main(["fit", str(data), "--target", "y", "--out", str(model), *FAST]) == 0
    assert cli.load_model_file(str(model))[0]["classes"] == sorted(labels)


def test_zero_and_negative_zero_alone_are_a_single_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], _labelled_rows(["0", "-0"], 10))
    line = fit_fails(capsys, tmp_path, data, "--task", "classification")
    assert "single class ['0']" in line


def test_model_file_with_duplicate_class_labels_is_refused(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str]
):
    """A model file whose labels were merged (written as "1.23457e+06" twice) is not used."""
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], _labelled_rows(["a", "b", "c"]))
    model = tmp_path / "m.pt"
    assert cli.main(["fit", str(data), "--target", "y", "--out", str(model), *FAST]) == 0
    capsys.readouterr()  # the fit's own output
    edited = _edit_model_file(
        model, lambda s: s["spec"].update(classes=["1.23457e+06", "1.23457e+06", "2e+06"])
    )
    line = predict_fails(capsys, tmp_path, edited, reg_csv)
    assert "'classes' must be distinct labels" in line


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_predict_output_column_names_are_unique(tmp_path: Path, task: str):
    """Inputs already holding ``mean`` and ``pred_mean`` (and ``p_1``, ``pred_p_1``, ...)."""
    taken = ["mean", "pred_mean", "std", "pred_std", "pred_pred_std", "p_1", "pred_p_1",
             "entropy", "pred_entropy", "predicted"]  # fmt: skip
    rows = [[*r, *range(len(taken))] for r in regression_rows(40)]
    if task == "classification":
        for i, r in enumerate(rows):
            r[2] = str(i % 2)
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y", *taken], rows)
    sub = write_csv(tmp_path / "fit.csv", ["x1", "x2", "y"], [r[:3] for r in rows])
    model = tmp_path / "m.pt"
    assert cli.main(["fit", str(sub), "--target", "y", "--out", str(model), *FAST]) == 0
    assert cli.load_model_file(str(model))[0]["task"] == task
    current = data
    for round_ in range(2):  # the output is valid input: predicting on it again works
        preds = tmp_path / f"p{round_}.csv"
        assert cli.main(["predict", str(model), str(current), "--out", str(preds)]) == 0
        header, rows_out = read_rows(preds)
        assert len(set(header)) == len(header), header
        assert len(rows_out) == 40
        current = preds
    header, _ = read_rows(tmp_path / "p0.csv")
    if task == "regression":
        assert "pred_pred_mean" in header and "pred_pred_pred_std" in header
    else:
        assert "pred_pred_p_1" in header and "pred_predicted" in header


@pytest.mark.parametrize(("cell", "what"), [("", "empty value"), ("12O", "'12O' is not a number")])
def test_auto_task_names_a_bad_cell_in_a_numeric_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cell: str, what: str
):
    rows = regression_rows(40)
    rows[7][2] = cell
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], rows)
    line = fit_fails(capsys, tmp_path, data)
    assert f"column 'y', data row 8: {what}, although 39 of its 40 values are numbers" in line
    assert "--task classification" in line


def test_regression_needs_two_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "y"], regression_rows(1))
    line = fit_fails(capsys, tmp_path, data, "--task", "regression")
    assert "a regression fit needs at least 2 data rows" in line and "got 1" in line


def test_semicolon_separated_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "semi.csv"
    data.write_text("x1;x2;y\n1;2;3\n4;5;6\n")
    line = fit_fails(capsys, tmp_path, data)
    assert "looks semicolon-separated" in line and "'x1;x2;y'" in line


def test_model_file_written_before_priors_recorded_their_family_still_predicts(
    tmp_path: Path, model_file: Path, reg_csv: Path
):
    """A model file without the priors' family records (``*_prior._extra_state``) loads."""

    def strip(state: dict) -> None:
        records = [k for k in state["model"] if k.endswith("_extra_state")]
        assert records  # today's files carry them
        for key in records:
            del state["model"][key]

    old = _edit_model_file(model_file, strip)
    new, before = tmp_path / "new.csv", tmp_path / "old.csv"
    args = [str(reg_csv), "--num-samples", "16", "--out"]
    assert cli.main(["predict", str(model_file), *args, str(new)]) == 0
    assert cli.main(["predict", str(old), *args, str(before)]) == 0
    assert new.read_text() == before.read_text()


# -- posterior families -------------------------------------------------------------------------
def test_fit_and_predict_with_a_lowrank_posterior(tmp_path: Path, reg_csv: Path) -> None:
    model = tmp_path / "lr.pt"
    args = ["fit", str(reg_csv), "--target", "y", "--posterior", "lowrank", "--rank", "2"]
    assert cli.main([*args, "--out", str(model), *FAST]) == 0
    spec, net, _ = cli.load_model_file(str(model))
    assert spec["posterior"] == "lowrank" and spec["rank"] == 2
    assert all(layer.posterior_name == "lowrank" for layer in varlin.variational_layers(net))
    preds = tmp_path / "p.csv"
    assert cli.main(["predict", str(model), str(reg_csv), "--out", str(preds)]) == 0
    assert len(read_rows(preds)[1]) == 60


def test_a_model_file_without_a_posterior_entry_is_mean_field(
    tmp_path: Path, model_file: Path
) -> None:
    """Files written before the families have no 'posterior'/'rank' in their spec."""
    state = load_checkpoint(model_file)
    del state["spec"]["posterior"], state["spec"]["rank"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    spec, net, _ = cli.load_model_file(str(old))
    assert all(layer.posterior_name == "meanfield" for layer in varlin.variational_layers(net))


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--posterior", "lowrank"], ["--posterior lowrank", "needs rank=k"]),
        (["--rank", "2"], ["rank=2 was given but posterior='meanfield'"]),
        (["--posterior", "radial"], ["estimator='local' is not valid with posterior='radial'",
                                     "'reparameterization', 'flipout'"]),
        (["--posterior", "lowrank", "--rank", "100000"], ["rank must be in [1, "]),
    ],
)  # fmt: skip
def test_bad_posterior_options_are_one_line_errors(
    tmp_path: Path, reg_csv: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
    fragments: list[str],
) -> None:  # fmt: skip
    line = fit_fails(capsys, tmp_path, reg_csv, *extra)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# -- moment propagation -------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("likelihood", ["homoscedastic", "heteroscedastic"])
def test_fit_and_predict_by_moments(
    tmp_path: Path, reg_csv: Path, likelihood: str, covariance: str
) -> None:
    model = tmp_path / "m.pt"
    args = ["fit", str(reg_csv), "--target", "y", "--likelihood", likelihood, *FAST]
    moments = ["--method", "moments", "--covariance", covariance]
    assert cli.main([*args, *moments, "--out", str(model)]) == 0
    preds = tmp_path / "p.csv"
    assert cli.main(["predict", str(model), str(reg_csv), "--out", str(preds), *moments]) == 0
    _, rows = read_rows(preds)
    assert len(rows) == len(regression_rows())
    for row in rows:
        assert float(row["epistemic_std"]) > 0 and float(row["aleatoric_std"]) > 0
        assert float(row["lower_90"]) < float(row["mean"]) < float(row["upper_90"])


def test_covariance_needs_the_moments_method(
    tmp_path: Path, reg_csv: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fit_fails(capsys, tmp_path, reg_csv, "--covariance", "full")
    assert "--covariance full applies only to --method moments" in line
    status = cli.main(
        ["predict", str(model_file), str(reg_csv), "--out", str(tmp_path / "p.csv"),
         "--covariance", "full"]
    )  # fmt: skip
    assert_clean_error(capsys, status, "--covariance full applies only to --method moments")
