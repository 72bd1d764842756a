r"""The UCI regression protocol: what one split is, how it is trained and how it is scored.

The standard protocol of Hernández-Lobato & Adams (2015) and Gal & Ghahramani (2016): for every
one of the fixed 90 % / 10 % train/test splits of a dataset (20; 5 for protein), train a network
with one hidden layer of 50 ReLU units (100 for protein) on inputs and targets standardised with
statistics of the training rows only, then score the test rows in **original** units:

- RMSE of the predictive mean, :math:`\sqrt{\tfrac1n\sum_i(\sigma_y\bar\mu_i + m_y - y_i)^2}`;
- average log predictive density of the equally weighted mixture over :math:`S` posterior
  samples, computed on standardised targets and shifted by the Jacobian of the standardisation,

  .. math::
      \log p(y_i) = \log\frac1S\sum_{s=1}^S\mathcal N\big(\tilde y_i;\mu_s(x_i),\sigma_s^2(x_i)\big)
      - \log\sigma_y, \qquad \tilde y_i = (y_i - m_y)/\sigma_y .

Each dataset reports the mean and the standard error (``std / sqrt(n)``, ``ddof=0`` as in Gal's
code) over splits.

Hyper-parameters come from :data:`DEFAULT_CONFIGS`; they were chosen by scoring candidates with
``--validation``, which trains on 80 % of the training rows of a split and scores the other
20 % (re-standardised with the 80 %'s statistics): test rows are never read in that mode. The
search and its outcome are documented in ``docs/results/uci.md``.

References:
    J. M. Hernández-Lobato and R. P. Adams. Probabilistic backpropagation for scalable learning of
    Bayesian neural networks. ICML 2015.

    Y. Gal and Z. Ghahramani. Dropout as a Bayesian approximation: representing model uncertainty
    in deep learning. ICML 2016.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torch.distributions import Normal

from . import priors
from .data import Standardizer, UCIDataset
from .ensemble import fit_ensemble
from .errors import VarlinWarning
from .functional import inverse_softplus
from .layers import VariationalLinear
from .likelihoods import Gaussian, HeteroscedasticGaussian, Likelihood
from .predictive import RegressionPrediction, predict
from .training import fit

__all__ = [
    "DEFAULT_CONFIGS",
    "FALLBACK_CONFIG",
    "UCIConfig",
    "SplitArrays",
    "SplitResult",
    "build_model",
    "build_likelihood",
    "config_for",
    "mean_and_stderr",
    "original_units_log_likelihood",
    "prepare_split",
    "run_group",
    "run_split",
    "score",
    "train_stacked",
]

LikelihoodName = Literal["homoscedastic", "heteroscedastic"]
EstimatorName = Literal["reparameterization", "local", "flipout"]
PriorName = Literal["fixed", "empirical"]


@dataclass(frozen=True)
class UCIConfig:
    """Everything that defines one training run on one split (recorded in the JSON ``config``).

    Attributes:
        hidden: Width of the single hidden layer (the dataset's ``n_hidden``: 50, 100 for protein).
        epochs: Passes over the training rows.
        batch_size: Minibatch size.
        lr: Adam's initial learning rate, decayed to 0 by a cosine schedule over the run.
        init_scale: Initial posterior standard deviation of every weight and bias.
        prior_scale: Standard deviation of the N(0, prior_scale^2) prior on every weight and bias
            (with ``prior="empirical"``, where the learned scales start).
        prior: ``"fixed"``: the prior scale is ``prior_scale``; ``"empirical"``: empirical Bayes
            as MCVI (Wu et al. 2019), the scale of each layer's weight prior and of its bias
            prior is a parameter learned by the same ELBO
            (``varlin.priors.normal(prior_scale, learn_scale=True)``).
        noise_init: Initial noise standard deviation in standardised units (the learned
            homoscedastic noise; for the heteroscedastic model, via the bias of its scale output).
        estimator: Gradient estimator of the variational layers.
        posterior: Variational family of both layers (a name of
            :data:`varlin.posteriors.FAMILIES`); mean-field gives the biases their own factor,
            every other family holds each layer's weights and bias jointly.
        rank: Rank of the ``"lowrank"`` family (``None`` for the others).
        likelihood: ``"homoscedastic"`` (one learned noise scale) or ``"heteroscedastic"`` (the
            network outputs a mean and a raw scale per example).
        test_samples: Posterior samples ``S`` of the predictive mixture at evaluation.
        seed: Base seed; split ``i`` uses ``seed * 1000 + i``.
        trainer: ``"stacked"`` trains the splits of one worker together, vectorised as one
            batch of independent models (:func:`train_stacked`, through
            :func:`varlin.ensemble.fit_ensemble`); ``"fit"`` trains each split with
            :func:`varlin.fit`. The same loop, model, objective, optimiser, schedule and
            shuffles; only the weight noise is drawn differently.
        method: ``"mc"``: the Monte Carlo ELBO and a ``test_samples``-sample predictive;
            ``"moments"``: ``fit(method="moments")`` and ``predict(method="moments")`` (moment
            propagation, Wu et al. 2019: no weight is sampled in training or scoring).
        covariance: with ``method="moments"``, ``"diagonal"`` or ``"full"``.
    """

    hidden: int
    epochs: int
    batch_size: int
    lr: float = 1e-2
    init_scale: float = 1e-3
    prior_scale: float = 2.0
    prior: PriorName = "fixed"
    noise_init: float = 0.5
    estimator: EstimatorName = "local"
    posterior: str = "meanfield"
    rank: int | None = None
    likelihood: LikelihoodName = "homoscedastic"
    test_samples: int = 200
    seed: int = 0
    trainer: Literal["stacked", "fit"] = "stacked"
    method: Literal["mc", "moments"] = "mc"
    covariance: Literal["diagonal", "full"] = "diagonal"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Per-dataset settings chosen on validation splits (see ``docs/results/uci.md``). Keys are the
#: dataset folder names; values override :class:`UCIConfig`'s defaults.
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "bostonHousing": {"epochs": 200, "batch_size": 32, "lr": 3e-3, "prior_scale": 1.0},
    "concrete": {"epochs": 150, "batch_size": 32, "lr": 3e-3},
    "energy": {"epochs": 600, "batch_size": 32},
    "kin8nm": {"epochs": 60, "batch_size": 128},
    "naval-propulsion-plant": {"epochs": 60, "batch_size": 128},
    "power-plant": {"epochs": 40, "batch_size": 128},
    "protein-tertiary-structure": {"epochs": 60, "batch_size": 256},
    "wine-quality-red": {"epochs": 60, "batch_size": 32},
    "yacht": {"epochs": 900, "batch_size": 32},
}
#: Settings for a dataset not in :data:`DEFAULT_CONFIGS` (e.g. a custom folder in the layout).
FALLBACK_CONFIG: dict[str, Any] = {"epochs": 100, "batch_size": 32}

_OVERRIDES = (
    "epochs",
    "batch_size",
    "lr",
    "init_scale",
    "prior_scale",
    "prior",
    "noise_init",
    "estimator",
    "posterior",
    "rank",
    "likelihood",
    "test_samples",
    "seed",
    "trainer",
    "method",
    "covariance",
)


def config_for(dataset: UCIDataset, **overrides: Any) -> UCIConfig:
    """The :class:`UCIConfig` of ``dataset``: its defaults, then every override not ``None``.

    Args:
        dataset: The loaded dataset (its ``n_hidden`` gives the width).
        **overrides: Fields of :class:`UCIConfig` (``None`` values are ignored).
    """
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise TypeError(f"config_for got unknown overrides {sorted(unknown)}")
    values: dict[str, Any] = {"hidden": dataset.n_hidden}
    values.update(DEFAULT_CONFIGS.get(dataset.name, FALLBACK_CONFIG))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return UCIConfig(**values)


# -- data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitArrays:
    """One split, ready to train and score (what a worker process receives).

    Attributes:
        index: Split number.
        X_train: Standardised training inputs ``(N, D)``.
        y_train: Standardised training targets ``(N,)``.
        X_eval: Evaluation inputs ``(M, D)``, standardised with the training statistics.
        y_eval: Evaluation targets ``(M,)`` in **original** units.
        y_mean: Mean of the training targets.
        y_std: Standard deviation of the training targets (1 if they are constant).
    """

    index: int
    X_train: NDArray[np.float64]
    y_train: NDArray[np.float64]
    X_eval: NDArray[np.float64]
    y_eval: NDArray[np.float64]
    y_mean: float
    y_std: float


def prepare_split(
    dataset: UCIDataset,
    i: int,
    *,
    validation: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> SplitArrays:
    """Split ``i`` of ``dataset``, standardised per the protocol.

    Args:
        dataset: The dataset.
        i: Split number.
        validation: If true, hold out ``val_fraction`` of the **training** rows of split ``i``
            (a random subset, fixed by ``seed`` and ``i``) as the evaluation set, and standardise
            with the statistics of the remaining training rows only; the test rows of the split
            are not used at all. If false, evaluate on the test rows.
        val_fraction: Fraction of the training rows held out with ``validation=True``.
        seed: Seed of the hold-out draw.
    """
    if not validation:
        s = dataset.standardized_split(i)
        return SplitArrays(
            i,
            s.X_train,
            s.y_train,
            s.X_test,
            s.y_test,
            float(s.y_scaler.mean),
            float(s.y_scaler.std),
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction}")
    train_idx, _ = dataset.split(i)
    rng = np.random.default_rng([seed, i])
    order = rng.permutation(train_idx)
    n_val = max(1, int(round(val_fraction * order.size)))
    if n_val >= order.size:
        raise ValueError(
            f"split {i} of {dataset.name} has {order.size} training rows, too few to hold out "
            f"val_fraction={val_fraction}"
        )
    return _standardized_arrays(dataset, i, order[n_val:], order[:n_val])


def _standardized_arrays(
    dataset: UCIDataset, index: int, fit_rows: NDArray[np.int64], eval_rows: NDArray[np.int64]
) -> SplitArrays:
    """The rows ``fit_rows`` to train on and ``eval_rows`` to score, standardised with the
    statistics of ``fit_rows`` alone (the evaluation targets stay in original units)."""
    x_scaler = Standardizer.fit(dataset.X[fit_rows])
    y_scaler = Standardizer.fit(dataset.y[fit_rows])
    return SplitArrays(
        index,
        x_scaler.transform(dataset.X[fit_rows]),
        y_scaler.transform(dataset.y[fit_rows]),
        x_scaler.transform(dataset.X[eval_rows]),
        dataset.y[eval_rows].copy(),
        float(y_scaler.mean),
        float(y_scaler.std),
    )


# -- model ------------------------------------------------------------------------------------
def build_model(in_features: int, config: UCIConfig) -> nn.Sequential:
    """One hidden layer of ``config.hidden`` ReLU units, both layers variational.

    The output has one column (the mean) for the homoscedastic likelihood and two (mean, raw
    scale) for the heteroscedastic one; the raw scale's bias mean starts at
    ``inverse_softplus(noise_init)`` so that both models start from the same noise level.
    """
    out = 2 if config.likelihood == "heteroscedastic" else 1
    prior = priors.normal(config.prior_scale, learn_scale=config.prior == "empirical")
    options: dict[str, Any] = {
        "estimator": config.estimator,
        "posterior": config.posterior,
        "rank": config.rank,
        "init_scale": config.init_scale,
        "make_weights_prior": prior,
        "make_bias_prior": prior,
    }
    layers = [
        VariationalLinear(in_features, config.hidden, **options),
        VariationalLinear(config.hidden, out, **options),
    ]
    if out == 2:
        # The bias mean as the family exposes it (its own factor, or a row of the family's).
        head = layers[1].w_posterior.bias_loc_of(layers[1].b_posterior)
        assert head is not None
        with torch.no_grad():
            head[1] = inverse_softplus(torch.tensor(config.noise_init))
    return nn.Sequential(layers[0], nn.ReLU(), layers[1])


def build_likelihood(config: UCIConfig) -> Likelihood:
    """A learned-noise :class:`Gaussian` or a :class:`HeteroscedasticGaussian`."""
    if config.likelihood == "heteroscedastic":
        return HeteroscedasticGaussian()
    return Gaussian(config.noise_init, learn_noise=True)


# -- scoring ----------------------------------------------------------------------------------
def original_units_log_likelihood(
    pred: RegressionPrediction | Normal, y: Tensor, y_mean: float, y_std: float
) -> Tensor:
    r"""Per-example log predictive density of targets ``y`` given in **original** units.

    ``pred`` is a prediction of standardised targets (a network's, or the Normal of an exact
    linear model); the density of :math:`y = m + \sigma\tilde
    y` is that of :math:`\tilde y` divided by :math:`\sigma`, so its log is
    ``pred.log_prob((y - y_mean) / y_std) - log(y_std)``.

    Shape:
        ``y``: ``(M,)``. Output: ``(M,)``.
    """
    standardized = (y - y_mean) / y_std
    return pred.log_prob(standardized.to(pred.mean.dtype)) - math.log(y_std)


@dataclass(frozen=True)
class SplitResult:
    """Scores of one split.

    Attributes:
        index: Split number.
        log_likelihood: Average log predictive density of the evaluation rows, original units.
        rmse: RMSE of the predictive mean, original units.
        seconds: Wall time of training and scoring.
        noise: Mean predicted noise standard deviation, original units.
        warnings: Training diagnostics emitted by :func:`varlin.fit`.
        prior_scales: The learned prior scales at the end of training, by prior name
            (:func:`varlin.priors.learned_scales`; empty with a fixed prior).
    """

    index: int
    log_likelihood: float
    rmse: float
    seconds: float
    noise: float
    warnings: tuple[str, ...] = ()
    prior_scales: dict[str, float] = dataclasses.field(default_factory=dict)


def _seed(config: UCIConfig, index: int) -> int:
    return config.seed * 1000 + index


def _init(split: SplitArrays, config: UCIConfig) -> tuple[nn.Sequential, Likelihood]:
    torch.manual_seed(_seed(config, split.index))
    return build_model(split.X_train.shape[1], config), build_likelihood(config)


def score(
    model: nn.Module, likelihood: Likelihood, split: SplitArrays, config: UCIConfig
) -> tuple[float, float, float]:
    """``(log_likelihood, rmse, noise_std)`` of the evaluation rows, in original units.

    The predictive is :func:`varlin.predict` with ``config.test_samples`` posterior samples in
    one batched call (``method="moments"``: the moment-propagation predictive); the log density
    is the mixture's (see :func:`original_units_log_likelihood`), computed in float64.
    """
    x_eval = torch.as_tensor(split.X_eval, dtype=torch.float32)
    y_eval = torch.as_tensor(split.y_eval, dtype=torch.float64)
    pred = predict(
        model, x_eval, num_samples=config.test_samples, likelihood=likelihood, batch_size=1024,
        method="moments" if config.method == "moments" else "auto",
        covariance=config.covariance,
    )  # fmt: skip
    assert isinstance(pred, RegressionPrediction)

    def double(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.double()

    pred = RegressionPrediction(
        mean=pred.mean.double(),
        epistemic=pred.epistemic.double(),
        aleatoric=pred.aleatoric.double(),
        sample_means=double(pred.sample_means),
        sample_vars=double(pred.sample_vars),
        sample_weights=double(pred.sample_weights),
    )
    ll = original_units_log_likelihood(pred, y_eval, split.y_mean, split.y_std).mean()
    mean = pred.mean * split.y_std + split.y_mean
    rmse = (mean - y_eval).square().mean().sqrt()
    noise = pred.aleatoric.sqrt().mean() * split.y_std
    return float(ll), float(rmse), float(noise)


@contextmanager
def _diagnostics() -> Iterator[list[str]]:
    """Collect the training diagnostics (:class:`VarlinWarning`) instead of showing them.

    Any other warning is not ours to swallow: it is shown as usual.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VarlinWarning)
        yield notes
    notes.extend(str(w.message) for w in caught if issubclass(w.category, VarlinWarning))
    for w in caught:
        if not issubclass(w.category, VarlinWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _tensors(split: SplitArrays) -> tuple[Tensor, Tensor]:
    return (
        torch.as_tensor(split.X_train, dtype=torch.float32),
        torch.as_tensor(split.y_train, dtype=torch.float32),
    )


def run_split(split: SplitArrays, config: UCIConfig) -> SplitResult:
    """Train one split with :func:`varlin.fit` and score its evaluation rows."""
    started = time.perf_counter()
    model, likelihood = _init(split, config)
    with _diagnostics() as notes:
        fit(
            model,
            *_tensors(split),
            likelihood=likelihood,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,  # the default optimiser: Adam, fused where torch has it
            seed=_seed(config, split.index),
            progress=False,
            method=config.method,
            covariance=config.covariance,
        )
    ll, rmse, noise = score(model, likelihood, split, config)
    seconds = time.perf_counter() - started
    scales = priors.learned_scales(model)
    return SplitResult(split.index, ll, rmse, seconds, noise, tuple(notes), scales)


_MODEL_NOTE = re.compile(r"model (\d+): (.*)", re.DOTALL)


def _train_together(
    splits: Sequence[SplitArrays], config: UCIConfig
) -> tuple[list[tuple[nn.Sequential, Likelihood]], list[tuple[str, ...]]]:
    """:func:`train_stacked`, and the training diagnostics of each split."""
    sizes = {s.X_train.shape for s in splits}
    if len(sizes) != 1:
        raise ValueError(f"train_stacked needs splits of one training shape, got {sorted(sizes)}")
    built = [_init(s, config) for s in splits]
    data = [_tensors(s) for s in splits]
    with _diagnostics() as notes:
        fit_ensemble(
            [model for model, _ in built],
            [x for x, _ in data],
            [y for _, y in data],
            likelihoods=[likelihood for _, likelihood in built],
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,  # the default optimiser: Adam, fused where torch has it
            seeds=[_seed(config, s.index) for s in splits],
            progress=False,
            method=config.method,
            covariance=config.covariance,
        )
    per_split: list[list[str]] = [[] for _ in splits]
    for note in notes:  # fit_ensemble names the model a diagnostic is about (one: unnamed)
        match = _MODEL_NOTE.match(note)
        k, text = (int(match[1]), match[2]) if match else (0, note)
        per_split[k].append(text)
    return built, [tuple(n) for n in per_split]


def train_stacked(
    splits: Sequence[SplitArrays], config: UCIConfig
) -> list[tuple[nn.Sequential, Likelihood]]:
    r"""Train one model per split, all splits at once, with :func:`varlin.ensemble.fit_ensemble`.

    The models come from :func:`build_model` / :func:`build_likelihood` with each split's seed,
    as in :func:`run_split`, and train through the loop of :func:`varlin.fit` with the same
    options, vectorised over the splits: each split is shuffled from its own seed, its model
    gets exactly its own gradient, and Adam with the cosine schedule moves it as if it were
    alone. Only the weight noise is drawn for all splits together. What the splits share is the
    Python and dispatch overhead of a step, which dominates for networks this small. The
    training diagnostics are dropped here (:func:`run_group` keeps them).

    Args:
        splits: Splits with the same number of training rows (true of the UCI splits).
        config: Training settings.

    Returns:
        ``(model, likelihood)`` per split, in the order of ``splits``, trained.

    Raises:
        NonFiniteLossError: the loss of some split became NaN or infinite.
    """
    return _train_together(splits, config)[0]


def run_group(splits: Sequence[SplitArrays], config: UCIConfig) -> list[SplitResult]:
    """Train and score a group of splits (in one process, one torch thread)."""
    torch.set_num_threads(1)
    if config.trainer == "fit":
        return [run_split(s, config) for s in splits]
    started = time.perf_counter()
    trained, notes = _train_together(splits, config)
    seconds = (time.perf_counter() - started) / len(splits)
    results = []
    for split, (model, lik), note in zip(splits, trained, notes, strict=True):
        t0 = time.perf_counter()
        ll, rmse, noise = score(model, lik, split, config)
        elapsed = seconds + time.perf_counter() - t0
        scales = priors.learned_scales(model)
        results.append(SplitResult(split.index, ll, rmse, elapsed, noise, note, scales))
    return results


def mean_and_stderr(values: Sequence[float]) -> list[float]:
    """``[mean, std / sqrt(n)]`` with the population std (``ddof=0``), as Gal's code reports."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    return [float(a.mean()), float(a.std() / math.sqrt(a.size))]
