"""Tests for varlin.data: synthetic generators, the UCI loader, standardisation and downloads.

No test touches the network or the project's shared data copy: the UCI tests write a tiny
dataset in the benchmark's layout into ``tmp_path`` and serve it through ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from varlin import data
from varlin.data import (
    REGRESSION_1D_DOMAIN,
    REGRESSION_1D_GAP,
    UCI_ALIASES,
    UCI_DATASETS,
    UCI_SHA256,
    Standardizer,
    default_cache_dir,
    download_uci,
    linear_regression_posterior,
    load_uci,
    make_linear_regression,
    make_regression_1d,
    make_two_moons,
    regression_1d_mean,
    regression_1d_noise_std,
    resolve_uci_name,
    standardize,
)

# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 100])
def test_regression_1d_shapes_and_dtypes(n: int, dtype: torch.dtype) -> None:
    x, y, noise_std = make_regression_1d(n, seed=0, dtype=dtype)
    assert x.shape == (n, 1) and y.shape == (n,) and noise_std.shape == (n,)
    assert x.dtype == y.dtype == noise_std.dtype == dtype


def test_regression_1d_is_deterministic_in_seed_and_generator() -> None:
    a = make_regression_1d(50, seed=3)
    b = make_regression_1d(50, seed=3)
    c = make_regression_1d(50, seed=4)
    d = make_regression_1d(50, generator=torch.Generator().manual_seed(3))
    for u, v, w in zip(a, b, d, strict=True):
        assert torch.equal(u, v) and torch.equal(u, w)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.y, c.y)


def test_regression_1d_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_regression_1d(20, seed=0)
    make_two_moons(20, seed=0)
    make_linear_regression(20, 2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_regression_1d_dtype_changes_only_rounding() -> None:
    lo = make_regression_1d(64, seed=1, dtype=torch.float32)
    hi = make_regression_1d(64, seed=1, dtype=torch.float64)
    for a, b in zip(lo, hi, strict=True):
        assert torch.equal(a, b.to(torch.float32))


def test_regression_1d_gap_is_empty() -> None:
    x = make_regression_1d(5000, gap=True, seed=0).x.squeeze(-1)
    lo, hi = REGRESSION_1D_GAP
    assert not ((x >= lo) & (x <= hi)).any()
    assert x.min() >= REGRESSION_1D_DOMAIN[0] and x.max() <= REGRESSION_1D_DOMAIN[1]
    # Both sides are populated roughly in proportion to their length (2.5 vs 2.25).
    left = (x < lo).double().mean().item()
    assert abs(left - 2.5 / 4.75) < 0.05


def test_regression_1d_without_gap_fills_the_gap() -> None:
    x = make_regression_1d(2000, gap=False, seed=0).x.squeeze(-1)
    lo, hi = REGRESSION_1D_GAP
    # Expected count 2000 * 1.25 / 6 ~ 417; P(none) is (1 - 0.21)^2000, i.e. never.
    assert ((x >= lo) & (x <= hi)).sum() > 300


def test_regression_1d_heteroscedastic_noise_varies() -> None:
    x, y, noise_std = make_regression_1d(20000, seed=0, dtype=torch.float64)
    x = x.squeeze(-1)
    assert torch.allclose(noise_std, regression_1d_noise_std(x))
    assert noise_std.max() / noise_std.min() > 4
    resid = y - regression_1d_mean(x)
    # About 4200 points per region: the relative standard error of a std estimate is
    # 1/sqrt(2 * 4200) ~ 1.1 %, so a 6 % tolerance is > 5 standard errors.
    for region in (x < -2, x > 2):
        expected = noise_std[region].pow(2).mean().sqrt()
        assert abs(resid[region].std() / expected - 1) < 0.06
    assert resid[x > 2].std() > 3 * resid[x < -2].std()


def test_regression_1d_homoscedastic_noise_is_constant() -> None:
    x, y, noise_std = make_regression_1d(20000, heteroscedastic=False, seed=0, dtype=torch.float64)
    assert torch.all(noise_std == 0.2)
    resid = y - regression_1d_mean(x.squeeze(-1))
    # n = 20000: relative standard error of the std ~ 0.5 %; tolerance 3 %.
    assert abs(resid.std().item() / 0.2 - 1) < 0.03
    assert abs(resid.mean().item()) < 5 * 0.2 / 20000**0.5


def test_regression_1d_noise_std_is_positive_everywhere() -> None:
    grid = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    assert (regression_1d_noise_std(grid) > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"n": 0}, ValueError, "n >= 1, got n=0"),
        ({"n": 2.0}, TypeError, "n to be an int"),
        ({"dtype": torch.int64}, ValueError, "floating-point.*dtype=torch.int64"),
        ({"seed": "1"}, TypeError, "seed to be an int"),
        ({"generator": 3}, TypeError, "torch.Generator"),
    ],
)
def test_regression_1d_errors(kwargs: dict, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        make_regression_1d(**kwargs)


@pytest.mark.parametrize("n", [2, 9, 100])
def test_two_moons_shapes_labels_and_balance(n: int) -> None:
    x, y = make_two_moons(n, seed=0)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    assert (y == 0).sum() == n // 2 and (y == 1).sum() == n - n // 2


def test_two_moons_is_deterministic() -> None:
    a, b, c = (make_two_moons(40, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_two_moons_without_noise_lies_on_the_half_circles() -> None:
    x, y = make_two_moons(200, noise=0.0, seed=0, dtype=torch.float64)
    upper, lower = x[y == 0], x[y == 1]
    torch.testing.assert_close(upper.pow(2).sum(-1), torch.ones(len(upper), dtype=torch.float64))
    assert (upper[:, 1] >= 0).all()
    shifted = lower - torch.tensor([1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(shifted.pow(2).sum(-1), torch.ones(len(lower), dtype=torch.float64))
    assert (lower[:, 1] <= 0.5).all()


def test_two_moons_errors() -> None:
    with pytest.raises(ValueError, match="noise to be finite and >= 0, got noise=-0.1"):
        make_two_moons(10, noise=-0.1)
    with pytest.raises(ValueError, match="n >= 2, got n=1"):
        make_two_moons(1)


def test_linear_regression_shapes_and_determinism() -> None:
    X, y, w = make_linear_regression(30, 4, seed=0)
    assert X.shape == (30, 4) and y.shape == (30,) and w.shape == (4,)
    assert X.dtype == y.dtype == w.dtype == torch.float32
    X2, y2, w2 = make_linear_regression(30, 4, seed=0)
    assert torch.equal(X, X2) and torch.equal(y, y2) and torch.equal(w, w2)
    assert not torch.equal(w, make_linear_regression(30, 4, seed=1).w_true)


def test_linear_regression_without_noise_is_exact() -> None:
    X, y, w = make_linear_regression(25, 3, noise_scale=0.0, seed=2, dtype=torch.float64)
    torch.testing.assert_close(y, X @ w, rtol=0, atol=0)


def test_linear_regression_posterior_matches_normal_equations() -> None:
    sigma, alpha = 0.3, 2.0
    X, y, _ = make_linear_regression(
        40, 5, noise_scale=sigma, prior_scale=alpha, seed=0, dtype=torch.float64
    )
    post = linear_regression_posterior(X, y, noise_scale=sigma, prior_scale=alpha)
    # Second route: numpy, solving the normal equations directly.
    Xn, yn = X.numpy(), y.numpy()
    precision = Xn.T @ Xn / sigma**2 + np.eye(5) / alpha**2
    np.testing.assert_allclose(
        post.mean.numpy(), np.linalg.solve(precision, Xn.T @ yn / sigma**2), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        post.covariance_matrix.numpy(), np.linalg.inv(precision), rtol=1e-10, atol=1e-14
    )


def test_linear_regression_posterior_concentrates_on_w_true() -> None:
    X, y, w = make_linear_regression(4000, 3, noise_scale=0.5, seed=0, dtype=torch.float64)
    post = linear_regression_posterior(X, y, noise_scale=0.5, prior_scale=1.0)
    z = (post.mean - w) / post.variance.sqrt()
    # w_true is a draw from this exact posterior's prior, so each z is N(0, 1); |z| < 4.5
    # fails with probability ~1e-5 per coordinate.
    assert (z.abs() < 4.5).all()
    assert (post.variance.sqrt() < 0.02).all()


def test_linear_regression_errors() -> None:
    with pytest.raises(ValueError, match="prior_scale to be finite and > 0, got prior_scale=0.0"):
        make_linear_regression(5, 2, prior_scale=0.0)
    with pytest.raises(ValueError, match="d >= 1, got d=0"):
        make_linear_regression(5, 0)
    with pytest.raises(ValueError, match=r"y of shape \(n,\)"):
        linear_regression_posterior(
            torch.zeros(5, 2), torch.zeros(4), noise_scale=1.0, prior_scale=1.0
        )


# ------------------------------------------------------------------------------------------------
# UCI: a tiny dataset in the benchmark layout
# ------------------------------------------------------------------------------------------------

N_ROWS, N_SPLITS, N_TEST = 30, 3, 3


def write_uci(root: Path, name: str, *, seed: int = 0, constant_col: int | None = 1) -> np.ndarray:
    """Write a (30, 4) dataset -- features 0..2, target 3 -- with 3 splits into root/name."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(N_ROWS, 4)) * [1.0, 2.0, 3.0, 4.0] + [0.0, 10.0, -5.0, 1.0]
    if constant_col is not None:
        table[:, constant_col] = 0.1  # 0.1 is inexact in binary: the mean is not exactly 0.1
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", table)
    (folder / "index_features.txt").write_text("0\n1\n2\n")
    (folder / "index_target.txt").write_text("3\n")
    (folder / "n_splits.txt").write_text(f"{N_SPLITS}\n")
    (folder / "n_hidden.txt").write_text("50\n")
    (folder / "n_epochs.txt").write_text("40\n")
    for i in range(N_SPLITS):
        perm = rng.permutation(N_ROWS)
        np.savetxt(folder / f"index_train_{i}.txt", perm[N_TEST:], fmt="%d")
        np.savetxt(folder / f"index_test_{i}.txt", perm[:N_TEST], fmt="%d")
    return table


def sha256_table(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_load_custom_dataset_from_data_dir(tmp_path: Path) -> None:
    table = write_uci(tmp_path, "tiny")
    ds = load_uci("tiny", data_dir=tmp_path)
    assert (ds.name, ds.n_splits, ds.n_hidden, ds.n_epochs) == ("tiny", 3, 50, 40)
    assert ds.X.dtype == ds.y.dtype == np.float64
    assert ds.X.shape == (N_ROWS, 3) and ds.y.shape == (N_ROWS,)
    assert (ds.n_samples, ds.n_features) == (N_ROWS, 3)
    np.testing.assert_array_equal(ds.X, np.loadtxt(tmp_path / "tiny" / "data.txt")[:, :3])
    np.testing.assert_allclose(ds.y, table[:, 3], rtol=1e-15)
    assert "n_samples=30" in repr(ds)


def test_splits_are_disjoint_and_cover_all_rows(tmp_path: Path) -> None:
    write_uci(tmp_path, "tiny")
    ds = load_uci("tiny", data_dir=tmp_path)
    pairs = list(ds.splits())
    assert len(pairs) == N_SPLITS
    for i, (train, test) in enumerate(pairs):
        assert train.dtype == test.dtype == np.int64
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(N_ROWS))
        expected = np.loadtxt(tmp_path / "tiny" / f"index_test_{i}.txt").astype(int)
        np.testing.assert_array_equal(ds.split(i)[1], expected)


@pytest.mark.parametrize("i", [-1, 3, 10])
def test_bad_split_index_names_the_range(tmp_path: Path, i: int) -> None:
    write_uci(tmp_path, "tiny")
    ds = load_uci("tiny", data_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"i in [0, 3) for tiny, got i={i}")):
        ds.split(i)


def test_dataset_arrays_are_read_only(tmp_path: Path) -> None:
    write_uci(tmp_path, "tiny")
    ds = load_uci("tiny", data_dir=tmp_path)
    train, _ = ds.split(0)
    for arr in (ds.X, ds.y, train):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0


def test_standardized_split_uses_training_rows_only(tmp_path: Path) -> None:
    write_uci(tmp_path, "tiny", constant_col=1)
    ds = load_uci("tiny", data_dir=tmp_path)
    train, test = ds.split(1)
    sp = ds.standardized_split(1)
    x_train = ds.X[train]
    np.testing.assert_allclose(sp.x_scaler.mean[[0, 2]], x_train.mean(0)[[0, 2]])
    np.testing.assert_allclose(sp.x_scaler.std[[0, 2]], x_train.std(0)[[0, 2]])
    # Statistics of all rows differ from those of the training rows.
    assert not np.allclose(sp.x_scaler.mean, ds.X.mean(0))
    np.testing.assert_allclose(sp.X_test, (ds.X[test] - sp.x_scaler.mean) / sp.x_scaler.std)
    np.testing.assert_allclose(sp.X_train.mean(0)[[0, 2]], 0, atol=1e-12)
    np.testing.assert_allclose(sp.X_train.std(0)[[0, 2]], 1)
    # Constant column: std 1 and exactly zero after centring, not a rounding residue / 1e-17.
    assert sp.x_scaler.std[1] == 1.0
    assert np.all(sp.X_train[:, 1] == 0) and np.all(sp.X_test[:, 1] == 0)
    np.testing.assert_allclose(sp.y_scaler.mean, ds.y[train].mean())
    np.testing.assert_array_equal(sp.y_test, ds.y[test])  # test targets stay in original units
    np.testing.assert_allclose(sp.y_scaler.inverse_transform(sp.y_train), ds.y[train])


def test_standardize_zero_std_column_becomes_one() -> None:
    train = np.array([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    test = np.array([[3.0, 9.0]])
    tr, te, s = standardize(train, test)
    np.testing.assert_allclose(s.mean, [3.0, 7.0])
    np.testing.assert_allclose(s.std, [np.sqrt(8 / 3), 1.0])  # population std (ddof=0)
    np.testing.assert_allclose(tr[:, 1], 0.0)
    np.testing.assert_allclose(te, [[0.0, 2.0]])
    np.testing.assert_allclose(s.inverse_transform(te), test)


def test_standardizer_validation() -> None:
    with pytest.raises(ValueError, match=r"N >= 1, got shape \(0, 2\)"):
        Standardizer.fit(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="std > 0"):
        Standardizer(np.zeros(2), np.array([1.0, 0.0]))
    s = Standardizer.fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"trailing shape \(3,\).*got shape \(4, 2\)"):
        s.transform(np.ones((4, 2)))


def test_known_name_in_data_dir_is_verified(tmp_path: Path) -> None:
    # A fake "yacht": its bytes cannot match the published checksums.
    write_uci(tmp_path, "yacht")
    path = tmp_path / "yacht" / "data.txt"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = UCI_SHA256["yacht"]["data.txt"]
    with pytest.raises(ValueError, match="Checksum mismatch") as info:
        load_uci("yacht", data_dir=tmp_path)
    assert str(path) in str(info.value)
    assert expected in str(info.value) and actual in str(info.value)
    ds = load_uci("YACHT", data_dir=tmp_path, verify=False)
    assert ds.name == "yacht" and ds.n_splits == 3


def test_alias_resolves_to_folder(tmp_path: Path) -> None:
    write_uci(tmp_path, "bostonHousing")
    assert load_uci("boston", data_dir=tmp_path, verify=False).name == "bostonHousing"


def test_resolve_uci_name() -> None:
    for name in UCI_DATASETS:
        assert resolve_uci_name(name) == name
        assert resolve_uci_name(name.upper()) == name
    for alias, name in UCI_ALIASES.items():
        assert resolve_uci_name(alias) == name
    with pytest.raises(ValueError, match="Unknown UCI dataset name='bostn'.*bostonHousing.*yacht"):
        resolve_uci_name("bostn")


def test_embedded_checksum_table_is_complete() -> None:
    assert tuple(UCI_SHA256) == UCI_DATASETS
    for name, files in UCI_SHA256.items():
        n_splits = 5 if name == "protein-tertiary-structure" else 20
        expected = {"data.txt", "index_features.txt", "index_target.txt", "n_splits.txt"}
        expected |= {"n_hidden.txt", "n_epochs.txt"}
        expected |= {f"index_{kind}_{i}.txt" for kind in ("train", "test") for i in range(n_splits)}
        assert set(files) == expected
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in files.values())
    assert sum(map(len, UCI_SHA256.values())) == 384


def test_loader_errors(tmp_path: Path) -> None:
    write_uci(tmp_path, "tiny")
    with pytest.raises(ValueError, match="Unknown UCI dataset name='nope'.*valid names.*concrete"):
        load_uci("nope", data_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown UCI dataset name='nope'.*valid names"):
        load_uci("nope", cache_dir=tmp_path / "cache")
    missing_root = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing_root))):
        load_uci("tiny", data_dir=missing_root)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "concrete"))):
        load_uci("concrete", data_dir=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_uci("tiny", data_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset or folder name"):
        load_uci("../tiny", data_dir=tmp_path)
    gone = tmp_path / "tiny" / "index_test_2.txt"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(gone))):
        load_uci("tiny", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "pattern"),
    [
        ("index_test_0.txt", "0\n1\n3.5\n", "Expected integers"),
        ("index_test_0.txt", "0\n1\n30\n", r"values in \[0, 30\)"),
        ("index_target.txt", "1\n", "one target column not among the features"),
        ("n_splits.txt", "0\n", "single integer >= 1"),
        ("n_hidden.txt", "50\n60\n", "single integer >= 1"),
        ("data.txt", "", "is empty"),
        ("data.txt", "1 2\n3\n", "Could not parse"),
    ],
)
def test_malformed_files_are_rejected(
    tmp_path: Path, file: str, content: str, pattern: str
) -> None:
    write_uci(tmp_path, "tiny")
    path = tmp_path / "tiny" / file
    path.write_text(content)
    with pytest.raises(ValueError, match=pattern) as info:
        load_uci("tiny", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_overlapping_split_is_rejected(tmp_path: Path) -> None:
    write_uci(tmp_path, "tiny")
    train = np.loadtxt(tmp_path / "tiny" / "index_train_0.txt").astype(int)
    np.savetxt(tmp_path / "tiny" / "index_test_0.txt", train[:2], fmt="%d")
    with pytest.raises(ValueError, match="disjoint train and test rows in split 0"):
        load_uci("tiny", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# UCI: download, verify and cache from a local fake source
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A source tree <src>/tiny/data/<file> registered under the name "tiny"; returns its URL."""
    staging = tmp_path / "staging"
    write_uci(staging, "tiny")
    src = tmp_path / "src" / "tiny" / "data"
    src.parent.mkdir(parents=True)
    (staging / "tiny").rename(src)
    monkeypatch.setattr(data, "UCI_SHA256", {**UCI_SHA256, "tiny": sha256_table(src)})
    return (tmp_path / "src").as_uri(), src


def test_download_caches_verified_files(tmp_path: Path, fake_source: tuple[str, Path]) -> None:
    base_url, src = fake_source
    cache = tmp_path / "cache"
    ds = load_uci("tiny", cache_dir=cache, base_url=base_url)
    assert ds.path == cache / "tiny" and ds.n_splits == 3
    cached = sorted(p.name for p in (cache / "tiny").iterdir())
    assert cached == sorted(p.name for p in src.iterdir())  # no temporary files left behind
    for name in cached:
        assert (cache / "tiny" / name).read_bytes() == (src / name).read_bytes()
    # A second load reads the cache: the source can disappear.
    for p in src.iterdir():
        p.unlink()
    again = load_uci("tiny", cache_dir=cache, base_url=base_url)
    np.testing.assert_array_equal(again.X, ds.X)
    assert load_uci("tiny", cache_dir=cache, download=False).n_splits == 3
    assert download_uci("tiny", cache_dir=cache, base_url=base_url) == cache / "tiny"


def test_download_with_bad_checksum_leaves_nothing(
    tmp_path: Path, fake_source: tuple[str, Path]
) -> None:
    base_url, src = fake_source
    (src / "data.txt").write_text("1 2 3 4\n")  # differs from the registered checksum
    cache = tmp_path / "cache"
    expected = data.UCI_SHA256["tiny"]["data.txt"]
    actual = hashlib.sha256(b"1 2 3 4\n").hexdigest()
    with pytest.raises(ValueError, match="Checksum mismatch for download") as info:
        load_uci("tiny", cache_dir=cache, base_url=base_url)
    assert expected in str(info.value) and actual in str(info.value)
    assert "tiny/data/data.txt" in str(info.value)
    leftovers = [p.name for p in (cache / "tiny").iterdir()]
    assert "data.txt" not in leftovers
    assert not [n for n in leftovers if n.startswith(".") or n.endswith(".part")]


def test_download_failure_leaves_nothing(tmp_path: Path, fake_source: tuple[str, Path]) -> None:
    base_url, src = fake_source
    (src / "n_hidden.txt").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="Could not download.*n_hidden.txt"):
        load_uci("tiny", cache_dir=cache, base_url=base_url)
    leftovers = {p.name for p in (cache / "tiny").iterdir()}
    assert "n_hidden.txt" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_corrupt_cached_file_is_reported(tmp_path: Path, fake_source: tuple[str, Path]) -> None:
    base_url, _ = fake_source
    cache = tmp_path / "cache"
    load_uci("tiny", cache_dir=cache, base_url=base_url)
    bad = cache / "tiny" / "index_train_1.txt"
    bad.write_text("0\n")
    with pytest.raises(ValueError, match=re.escape(f"Checksum mismatch for {str(bad)!r}")):
        load_uci("tiny", cache_dir=cache, base_url=base_url)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download_uci("tiny", cache_dir=cache, base_url=base_url)


def test_missing_cache_without_download(tmp_path: Path, fake_source: tuple[str, Path]) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=re.escape(str(cache / "tiny")) + ".*download=True"):
        load_uci("tiny", cache_dir=cache, download=False)


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARLIN_CACHE", str(tmp_path / "vc"))
    assert default_cache_dir() == tmp_path / "vc" / "uci"
    monkeypatch.delenv("VARLIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "varlin" / "uci"


# ------------------------------------------------------------------------------------------------
# The checksum table is package data
# ------------------------------------------------------------------------------------------------


def test_checksums_are_read_from_the_package_data_file() -> None:
    """(tests/test_packaging.py checks that the wheel ships every data file of the package.)"""
    import importlib.resources
    import json

    from varlin.data import UCI_SOURCE_COMMIT

    table = json.loads(
        importlib.resources.files("varlin").joinpath("uci_sha256.json").read_text("utf-8")
    )
    assert table["commit"] == UCI_SOURCE_COMMIT
    assert list(table["sha256"]) == list(UCI_DATASETS)
    assert {name: dict(files) for name, files in UCI_SHA256.items()} == table["sha256"]
    for files in UCI_SHA256.values():
        assert {"data.txt", "index_train_0.txt", "n_splits.txt"} <= set(files)
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in files.values())
    with pytest.raises(TypeError):
        UCI_SHA256["yacht"]["data.txt"] = "0" * 64  # type: ignore[index]
