r"""The gap protocol of Foong et al. (2019): "in-between" uncertainty on the UCI datasets.

For each input dimension ``d`` of a dataset, sort the rows by their value in that dimension
(ties in row order), train on the outer two thirds and test on the middle third: the test inputs
lie *between* the training inputs along ``d``, where a model has seen no data. A model whose
uncertainty grows there scores a reasonable test log-likelihood; an over-confident one is
punished without bound.

Exactly: with ``n`` rows and ``t = n // 3``, the training rows are the first ``t`` and the last
``t`` of the sorted order and the test rows the ``n - 2t`` between them (the middle third, which
takes the remainder). A dimension with fewer than ``min_distinct`` distinct values (default 3:
binary and constant columns) is skipped: its "middle third" would hold values that the outer
thirds hold too, so there is no gap.

Standardisation and scoring follow the standard protocol (:mod:`varlin.uci_protocol`): inputs
and target standardised with the statistics of the training rows, test log-likelihood in
original units. :func:`linear_reference` scores the reference model of the protocol, exact
Bayesian linear regression with an intercept and the prior and noise scales chosen by the
evidence (:class:`varlin.conjugate.BayesianLinearRegression`), on the same arrays.

References:
    A. Y. K. Foong, Y. Li, J. M. Hernández-Lobato and R. E. Turner. "In-between" uncertainty in
    Bayesian neural networks. ICML 2019 Workshop on Uncertainty and Robustness in Deep Learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from . import _validation as V
from .conjugate import BayesianLinearRegression
from .data import UCIDataset
from .uci_protocol import SplitArrays, _standardized_arrays, original_units_log_likelihood

__all__ = [
    "GAP_MIN_DISTINCT",
    "GapSplit",
    "gap_split",
    "gap_splits",
    "linear_reference",
    "prepare_gap_split",
]

#: Default least number of distinct values a dimension needs to be split (binary columns: no).
GAP_MIN_DISTINCT = 3


@dataclass(frozen=True)
class GapSplit:
    """The rows of one gap split.

    Attributes:
        dimension: The input column the rows were sorted by.
        train: Row indices of the outer two thirds, in sorted order (low end, then high end).
        test: Row indices of the middle third, in sorted order.
    """

    dimension: int
    train: NDArray[np.int64]
    test: NDArray[np.int64]


def _inputs(X: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(X, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"X must have shape (n, D), got shape {a.shape}")
    return a


def gap_split(X: ArrayLike, dimension: int) -> GapSplit:
    """The gap split of the rows of ``X`` along column ``dimension``.

    Args:
        X: Inputs ``(n, D)``, ``n >= 6`` (each outer third needs two rows).
        dimension: Column index, ``0 <= dimension < D``.

    Returns:
        The sorted order's first and last ``n // 3`` rows as ``train``, the rest as ``test``.
    """
    a = _inputs(X)
    n, width = a.shape
    dimension = V.integer("dimension", dimension)
    if not 0 <= dimension < width:
        raise ValueError(
            f"dimension must be in [0, {width}) for X with {width} columns, got {dimension}"
        )
    third = n // 3
    if third < 2:
        raise ValueError(
            f"X must have at least 6 rows for a gap split (two per outer third), got {n}"
        )
    order = np.argsort(a[:, dimension], kind="stable").astype(np.int64)
    train = np.concatenate([order[:third], order[n - third :]])
    return GapSplit(int(dimension), train, order[third : n - third])


def gap_splits(
    X: ArrayLike, *, min_distinct: int = GAP_MIN_DISTINCT
) -> tuple[list[GapSplit], dict[int, int]]:
    """One gap split per column of ``X`` with at least ``min_distinct`` distinct values.

    Returns:
        ``(splits, skipped)``: the splits in column order, and ``{column: number of distinct
        values}`` of the columns skipped.
    """
    a = _inputs(X)
    min_distinct = V.positive_int("min_distinct", min_distinct)
    splits, skipped = [], {}
    for d in range(a.shape[1]):
        distinct = int(np.unique(a[:, d]).size)
        if distinct < min_distinct:
            skipped[d] = distinct
        else:
            splits.append(gap_split(a, d))
    return splits, skipped


def prepare_gap_split(dataset: UCIDataset, split: GapSplit) -> SplitArrays:
    """``split``'s arrays, standardised with its training rows' statistics (``index``: its
    dimension, which also seeds the model as a split number does)."""
    return _standardized_arrays(dataset, split.dimension, split.train, split.test)


def linear_reference(split: SplitArrays) -> tuple[float, float]:
    """``(log_likelihood, rmse)`` of exact Bayesian linear regression on ``split``'s rows.

    The model: an intercept, an isotropic Normal prior on the weights, Gaussian noise, the prior
    and noise scales chosen by maximising the evidence, fitted on the standardised training rows
    in float64; scored as the networks are (average log density of the exact predictive and
    RMSE of its mean, original units).
    """
    x = torch.as_tensor(split.X_train, dtype=torch.float64)
    y = torch.as_tensor(split.y_train, dtype=torch.float64)
    model = BayesianLinearRegression(fit_intercept=True, optimize=True).fit(x, y)
    pred = model.predict(torch.as_tensor(split.X_eval, dtype=torch.float64))
    y_eval = torch.as_tensor(split.y_eval, dtype=torch.float64)
    ll = original_units_log_likelihood(pred, y_eval, split.y_mean, split.y_std).mean()
    rmse = (pred.mean * split.y_std + split.y_mean - y_eval).square().mean().sqrt()
    return float(ll), float(rmse)
