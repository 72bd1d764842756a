"""The gap protocol (``varlin uci --gap``): the splitter, the linear reference, the command line.

Small generated data only; the datasets are written into ``tmp_path`` in the UCI layout.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.linear_model import BayesianRidge

from varlin.cli import main
from varlin.data import load_uci
from varlin.training import VarlinWarning
from varlin.uci import mean_and_stderr
from varlin.uci_gap import gap_split, gap_splits, linear_reference, prepare_gap_split


def write_gap_uci(root: Path, *, rows: int = 45) -> np.ndarray:
    """Four features (the last binary) and a smooth target, in the UCI layout (one split)."""
    rng = np.random.default_rng(3)
    X = np.column_stack([
        rng.uniform(-2.0, 2.0, rows),
        rng.normal(10.0, 4.0, rows),
        rng.integers(0, 5, rows).astype(float),  # 5 distinct values: split, with ties
        rng.integers(0, 2, rows).astype(float),  # binary: skipped
    ])  # fmt: skip
    y = 3.0 * X[:, 0] + 0.2 * X[:, 1] + X[:, 3] + rng.normal(scale=0.5, size=rows)
    folder = root / "gappy"
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([X, y]))
    np.savetxt(folder / "index_features.txt", [0, 1, 2, 3], fmt="%d")
    np.savetxt(folder / "index_target.txt", [4], fmt="%d")
    for file, value in (("n_splits.txt", 1), ("n_hidden.txt", 6), ("n_epochs.txt", 2)):
        (folder / file).write_text(f"{value}\n")
    np.savetxt(folder / "index_train_0.txt", np.arange(rows - 5), fmt="%d")
    np.savetxt(folder / "index_test_0.txt", np.arange(rows - 5, rows), fmt="%d")
    return X


# -- the splitter -------------------------------------------------------------------------------
def test_gap_split_trains_on_the_outer_thirds_and_tests_on_the_middle_one() -> None:
    column = np.array([5.0, 2.0, 9.0, 0.0, 7.0, 1.0, 8.0, 3.0, 6.0, 4.0])
    X = np.column_stack([np.zeros(10), column])
    split = gap_split(X, 1)
    # Sorted by value: rows 3 (0), 5 (1), 1 (2) | 7 (3), 9 (4), 0 (5), 8 (6) | 4 (7), 6 (8), 2 (9).
    assert split.dimension == 1
    assert split.train.tolist() == [3, 5, 1, 4, 6, 2]
    assert split.test.tolist() == [7, 9, 0, 8]
    assert split.train.dtype == np.int64 and split.test.dtype == np.int64


@pytest.mark.parametrize("rows", [6, 7, 8, 9, 31])
def test_gap_split_partitions_the_rows_with_every_test_value_between_the_outer_ones(
    rows: int,
) -> None:
    X = np.random.default_rng(rows).normal(size=(rows, 2))
    split = gap_split(X, 0)
    third = rows // 3
    assert split.train.size == 2 * third and split.test.size == rows - 2 * third
    assert sorted([*split.train, *split.test]) == list(range(rows))
    low, high = X[split.train[:third], 0], X[split.train[third:], 0]
    assert low.max() < X[split.test, 0].min() and X[split.test, 0].max() < high.min()


def test_gap_split_breaks_ties_by_row_order() -> None:
    X = np.array([[1.0], [0.0], [1.0], [0.0], [1.0], [0.0]])
    split = gap_split(X, 0)
    assert split.train.tolist() == [1, 3, 2, 4]  # zeros at rows 1, 3, 5; ones at rows 0, 2, 4
    assert split.test.tolist() == [5, 0]


def test_gap_splits_skip_columns_with_too_few_distinct_values() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=12), np.ones(12), rng.integers(0, 2, 12), np.arange(12)])
    splits, skipped = gap_splits(X)
    assert [s.dimension for s in splits] == [0, 3]
    assert skipped == {1: 1, 2: 2}
    assert gap_split(X, 3).test.tolist() == splits[1].test.tolist() == [4, 5, 6, 7]
    assert [s.dimension for s in gap_splits(X, min_distinct=1)[0]] == [0, 1, 2, 3]
    assert [s.dimension for s in gap_splits(X, min_distinct=13)[0]] == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: gap_split(np.zeros((9, 2)), 2), ValueError, r"dimension must be in \[0, 2\)"),
        (lambda: gap_split(np.zeros((9, 2)), -1), ValueError, r"got -1"),
        (lambda: gap_split(np.zeros((9, 2)), 1.0), TypeError, r"dimension must be an int"),
        (lambda: gap_split(np.zeros((5, 2)), 0), ValueError, r"at least 6 rows .* got 5"),
        (lambda: gap_split(np.zeros(9), 0), ValueError, r"X must have shape \(n, D\)"),
        (lambda: gap_splits(np.zeros((9, 2)), min_distinct=0), ValueError, r"min_distinct"),
    ],
)  # fmt: skip
def test_gap_split_argument_errors_name_the_argument_and_the_rule(
    call: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


def test_prepare_gap_split_standardises_with_the_training_rows(tmp_path: Path) -> None:
    X = write_gap_uci(tmp_path)
    ds = load_uci("gappy", data_dir=tmp_path)
    split = gap_split(ds.X, 1)
    arrays = prepare_gap_split(ds, split)
    assert arrays.index == 1
    np.testing.assert_allclose(arrays.X_train.mean(0)[:3], 0.0, atol=1e-12)
    np.testing.assert_allclose(arrays.X_train.std(0)[:3], 1.0, rtol=1e-12)
    np.testing.assert_allclose(arrays.y_train.mean(), 0.0, atol=1e-12)
    mean, std = X[split.train].mean(0), X[split.train].std(0)
    np.testing.assert_allclose(arrays.X_eval, (X[split.test] - mean) / std, rtol=1e-12)
    np.testing.assert_array_equal(arrays.y_eval, ds.y[split.test])  # original units
    assert arrays.y_mean == pytest.approx(ds.y[split.train].mean())
    assert arrays.y_std == pytest.approx(ds.y[split.train].std())


def test_linear_reference_matches_scikit_learns_bayesian_ridge(tmp_path: Path) -> None:
    """Second route: the same evidence maximisation in scikit-learn (which starts where ours
    does on standardised targets, alpha = 1/var(y) = 1, lambda = 1), scored by scipy."""
    write_gap_uci(tmp_path)
    ds = load_uci("gappy", data_dir=tmp_path)
    arrays = prepare_gap_split(ds, gap_split(ds.X, 0))
    ll, rmse = linear_reference(arrays)
    sk = BayesianRidge(fit_intercept=True).fit(arrays.X_train, arrays.y_train)
    mean, std = sk.predict(arrays.X_eval, return_std=True)
    mean, std = mean * arrays.y_std + arrays.y_mean, std * arrays.y_std
    assert ll == pytest.approx(norm.logpdf(arrays.y_eval, mean, std).mean(), abs=1e-6)
    assert rmse == pytest.approx(np.sqrt(np.mean((mean - arrays.y_eval) ** 2)), rel=1e-6)


# -- the command line ---------------------------------------------------------------------------
def _run(tmp_path: Path, *extra: str) -> int:
    argv = ["uci", "--dataset", "gappy", "--data-dir", str(tmp_path / "data"), "--epochs", "2"]
    argv += ["--test-samples", "10", "--no-progress", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)  # two epochs prove nothing
        return main(argv)


@pytest.mark.parametrize("posterior", ["meanfield", "lowrank"])
def test_cli_gap_runs_every_split_and_scores_the_linear_reference(
    tmp_path: Path, posterior: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_gap_uci(tmp_path / "data")
    out = tmp_path / "gap.json"
    family = ["--posterior", posterior] + (["--rank", "2"] if posterior == "lowrank" else [])
    assert _run(tmp_path, "--gap", "--out", str(out), *family) == 0
    assert "gappy: gap LL" in capsys.readouterr().out

    entry = json.loads(out.read_text())["gappy"]
    assert entry["evaluated_on"].startswith("gap")
    assert entry["config"]["posterior"] == posterior
    gap = entry["gap"]
    assert gap["dimensions"] == [0, 1, 2] and gap["skipped"] == {"3": 2}
    assert gap["min_distinct"] == 3 and (gap["train_rows"], gap["test_rows"]) == (30, 15)
    assert entry["splits"] == 3 and len(entry["per_split"]["test_ll"]) == 3
    assert entry["test_ll"] == pytest.approx(mean_and_stderr(entry["per_split"]["test_ll"]))
    assert all(math.isfinite(v) for v in entry["per_split"]["test_ll"] + gap["linear_test_ll"])
    ds = load_uci("gappy", data_dir=tmp_path / "data")
    for d, ll, rmse in zip(
        gap["dimensions"], gap["linear_test_ll"], gap["linear_rmse"], strict=True
    ):
        want = linear_reference(prepare_gap_split(ds, gap_split(ds.X, d)))
        assert (ll, rmse) == pytest.approx(want, rel=1e-12)


def test_cli_gap_splits_option_takes_the_first_dimensions(tmp_path: Path) -> None:
    write_gap_uci(tmp_path / "data")
    out = tmp_path / "gap.json"
    assert (
        _run(tmp_path, "--gap", "--splits", "2", "--gap-min-distinct", "1", "--out", str(out)) == 0
    )
    entry = json.loads(out.read_text())["gappy"]
    assert entry["gap"]["dimensions"] == [0, 1] and entry["gap"]["skipped"] == {}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--gap", "--validation"], "--gap and --validation cannot be combined"),
        (["--gap", "--gap-min-distinct", "100"], "no input dimension has at least 100 distinct"),
    ],
)
def test_cli_gap_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    write_gap_uci(tmp_path / "data")
    assert _run(tmp_path, *extra) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("varlin: error: ") and expected in err and "\n" not in err


def test_cli_gap_min_distinct_must_be_a_positive_integer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, "--gap", "--gap-min-distinct", "0")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--gap-min-distinct" in err and "must be a positive integer, got 0" in err
