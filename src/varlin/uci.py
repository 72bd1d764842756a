r"""The UCI regression benchmark runner: ``varlin uci`` and ``benchmarks/uci.py``.

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

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _validation as V
from . import functional, priors
from ._io import atomic_write
from .data import UCI_DATASETS, Standardizer, UCIDataset, load_uci
from .functional import inverse_softplus
from .kl import normal_kl
from .layers import BayesianLinearBase, VariationalLinear, variational_layers
from .likelihoods import Gaussian, HeteroscedasticGaussian, Likelihood
from .posteriors import MeanFieldNormal
from .predictive import RegressionPrediction, predict
from .training import NonFiniteLossError, VarlinWarning, fit

__all__ = [
    "DEFAULT_CONFIGS",
    "UCIConfig",
    "SplitArrays",
    "SplitResult",
    "add_arguments",
    "build_model",
    "build_likelihood",
    "config_for",
    "main_from_args",
    "mean_and_stderr",
    "original_units_log_likelihood",
    "prepare_split",
    "run_dataset",
    "run_group",
    "run_split",
    "score",
    "train_stacked",
    "write_json_atomic",
]

LikelihoodName = Literal["homoscedastic", "heteroscedastic"]
EstimatorName = Literal["reparameterization", "local", "flipout"]


@dataclass(frozen=True)
class UCIConfig:
    """Everything that defines one training run on one split (recorded in the JSON ``config``).

    Attributes:
        hidden: Width of the single hidden layer (the dataset's ``n_hidden``: 50, 100 for protein).
        epochs: Passes over the training rows.
        batch_size: Minibatch size.
        lr: Adam's initial learning rate, decayed to 0 by a cosine schedule over the run.
        init_scale: Initial posterior standard deviation of every weight and bias.
        prior_scale: Standard deviation of the N(0, prior_scale^2) prior on every weight and bias.
        noise_init: Initial noise standard deviation in standardised units (the learned
            homoscedastic noise; for the heteroscedastic model, via the bias of its scale output).
        estimator: Gradient estimator of the variational layers.
        likelihood: ``"homoscedastic"`` (one learned noise scale) or ``"heteroscedastic"`` (the
            network outputs a mean and a raw scale per example).
        test_samples: Posterior samples ``S`` of the predictive mixture at evaluation.
        seed: Base seed; split ``i`` uses ``seed * 1000 + i``.
        trainer: ``"stacked"`` trains the splits of one worker together, as one batch of
            independent models (:func:`train_stacked`); ``"fit"`` trains each split with
            :func:`varlin.fit`. Same model, objective, optimiser and schedule.
        method: ``"mc"``: the Monte Carlo ELBO and a ``test_samples``-sample predictive;
            ``"moments"``: ``fit(method="moments")`` and ``predict(method="moments")`` (moment
            propagation, no weight sampled; trained with :func:`varlin.fit` per split).
        covariance: with ``method="moments"``, ``"diagonal"`` or ``"full"``.
    """

    hidden: int
    epochs: int
    batch_size: int
    lr: float = 1e-2
    init_scale: float = 1e-3
    prior_scale: float = 2.0
    noise_init: float = 0.5
    estimator: EstimatorName = "local"
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
    "noise_init",
    "estimator",
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
    fit_idx, val_idx = order[n_val:], order[:n_val]
    x_scaler = Standardizer.fit(dataset.X[fit_idx])
    y_scaler = Standardizer.fit(dataset.y[fit_idx])
    return SplitArrays(
        i,
        x_scaler.transform(dataset.X[fit_idx]),
        y_scaler.transform(dataset.y[fit_idx]),
        x_scaler.transform(dataset.X[val_idx]),
        dataset.y[val_idx].copy(),
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
    prior = priors.normal(config.prior_scale)
    layers = [
        VariationalLinear(
            in_features,
            config.hidden,
            estimator=config.estimator,
            init_scale=config.init_scale,
            make_weights_prior=prior,
            make_bias_prior=prior,
        ),
        VariationalLinear(
            config.hidden,
            out,
            estimator=config.estimator,
            init_scale=config.init_scale,
            make_weights_prior=prior,
            make_bias_prior=prior,
        ),
    ]
    if out == 2:
        head = layers[1].b_posterior
        assert head is not None
        with torch.no_grad():
            head.loc[1] = inverse_softplus(torch.tensor(config.noise_init))
    return nn.Sequential(layers[0], nn.ReLU(), layers[1])


def build_likelihood(config: UCIConfig) -> Likelihood:
    """A learned-noise :class:`Gaussian` or a :class:`HeteroscedasticGaussian`."""
    if config.likelihood == "heteroscedastic":
        return HeteroscedasticGaussian()
    return Gaussian(config.noise_init, learn_noise=True)


# -- scoring ----------------------------------------------------------------------------------
def original_units_log_likelihood(
    pred: RegressionPrediction, y: Tensor, y_mean: float, y_std: float
) -> Tensor:
    r"""Per-example log predictive density of targets ``y`` given in **original** units.

    ``pred`` is a prediction of standardised targets; the density of :math:`y = m + \sigma\tilde
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
    """

    index: int
    log_likelihood: float
    rmse: float
    seconds: float
    noise: float
    warnings: tuple[str, ...] = ()


def _seed(config: UCIConfig, index: int) -> int:
    return config.seed * 1000 + index


def _init(split: SplitArrays, config: UCIConfig) -> tuple[nn.Sequential, Likelihood]:
    torch.manual_seed(_seed(config, split.index))
    return build_model(split.X_train.shape[1], config), build_likelihood(config)


def _adam(lr: float) -> Any:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        # fused: one kernel for all parameters; the per-step cost of tiny models is overhead.
        return torch.optim.Adam(params, lr=lr, fused=True)

    return make


def score(
    model: nn.Module, likelihood: Likelihood, split: SplitArrays, config: UCIConfig
) -> tuple[float, float, float]:
    """``(log_likelihood, rmse, noise_std)`` of the evaluation rows, in original units.

    The predictive is :func:`varlin.predict` with ``config.test_samples`` posterior samples in
    one batched call; the log density is the mixture's (see
    :func:`original_units_log_likelihood`), computed in float64.
    """
    x_eval = torch.as_tensor(split.X_eval, dtype=torch.float32)
    y_eval = torch.as_tensor(split.y_eval, dtype=torch.float64)
    pred = predict(
        model, x_eval, num_samples=config.test_samples, likelihood=likelihood, batch_size=1024,
        method=config.method if config.method == "moments" else "auto",
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


def run_split(split: SplitArrays, config: UCIConfig) -> SplitResult:
    """Train one split with :func:`varlin.fit` and score its evaluation rows."""
    started = time.perf_counter()
    model, likelihood = _init(split, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VarlinWarning)
        fit(
            model,
            torch.as_tensor(split.X_train, dtype=torch.float32),
            torch.as_tensor(split.y_train, dtype=torch.float32),
            likelihood=likelihood,
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer=_adam(config.lr),
            seed=_seed(config, split.index),
            progress=False,
            method=config.method,
            covariance=config.covariance,
        )
    notes = tuple(str(w.message) for w in caught if issubclass(w.category, VarlinWarning))
    for w in caught:  # anything else is not ours to swallow
        if not issubclass(w.category, VarlinWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ll, rmse, noise = score(model, likelihood, split, config)
    return SplitResult(split.index, ll, rmse, time.perf_counter() - started, noise, notes)


def _mean_field(layer: BayesianLinearBase) -> MeanFieldNormal:
    """The weight posterior of a mean-field layer (the stacked trainer's only family)."""
    if not isinstance(layer.w_posterior, MeanFieldNormal):
        raise TypeError(
            f"the stacked trainer trains mean-field layers only, got posterior="
            f"{layer.posterior_name!r}"
        )
    return layer.w_posterior


def train_stacked(
    splits: Sequence[SplitArrays], config: UCIConfig
) -> list[tuple[nn.Sequential, Likelihood]]:
    r"""Train one model per split, all splits at once, as independent slices of stacked tensors.

    Equivalent to :func:`varlin.fit` on each split (minus its diagnostics): the models come from
    :func:`build_model` / :func:`build_likelihood` with the split's seed; their posterior
    parameters (``loc``, ``raw_scale`` of each layer, and the likelihood's ``raw_noise_scale``)
    are stacked along a leading split dimension ``K``; every step draws a minibatch per split (its
    own shuffle), applies the layers' estimator from :data:`varlin.functional.ESTIMATORS` with
    weights ``(K, in, out)``, and minimises :math:`\sum_k \mathcal L_k` where :math:`\mathcal L_k`
    is split :math:`k`'s per-datum negative ELBO (:class:`varlin.ELBO`'s loss: mean NLL of the
    batch plus ``KL / N``, the KL from :func:`varlin.kl.normal_kl`, summed). The slices share no
    parameter, so each gets exactly its own gradient, and Adam (elementwise) with the cosine
    schedule of :func:`varlin.fit` updates each as if it were alone. What is shared is the Python
    and dispatch overhead of a step, which dominates for networks this small: about ``K`` times
    fewer steps to pay for. The trained parameters are copied back into the ``varlin`` models,
    which are returned for scoring with :func:`varlin.predict`.

    Args:
        splits: Splits with the same number of training rows (true of the UCI splits).
        config: Training settings.

    Returns:
        ``(model, likelihood)`` per split, in the order of ``splits``.

    Raises:
        NonFiniteLossError: the loss of some split became NaN or infinite.
    """
    sizes = {s.X_train.shape for s in splits}
    if len(sizes) != 1:
        raise ValueError(f"train_stacked needs splits of one training shape, got {sorted(sizes)}")
    built = [_init(s, config) for s in splits]
    k = len(splits)
    n = splits[0].X_train.shape[0]
    X = torch.as_tensor(np.stack([s.X_train for s in splits]), dtype=torch.float32)
    Y = torch.as_tensor(np.stack([s.y_train for s in splits]), dtype=torch.float32)

    layer_lists = [list(variational_layers(model)) for model, _ in built]
    stacked: list[dict[str, Tensor]] = []
    for j in range(len(layer_lists[0])):
        layers = [ll[j] for ll in layer_lists]
        weights = [_mean_field(la) for la in layers]
        entry = {
            "w_loc": torch.stack([w.loc.detach() for w in weights]),
            "w_raw": torch.stack([w.raw_scale.detach() for w in weights]),
        }
        if layers[0].b_posterior is not None:
            b = [la.b_posterior for la in layers]
            entry["b_loc"] = torch.stack([p.loc.detach() for p in b if p is not None]).unsqueeze(1)
            entry["b_raw"] = torch.stack([p.raw_scale.detach() for p in b if p is not None])
            entry["b_raw"] = entry["b_raw"].unsqueeze(1)
        stacked.append({key: t.clone().requires_grad_() for key, t in entry.items()})
    params = [t for entry in stacked for t in entry.values()]
    heteroscedastic = config.likelihood == "heteroscedastic"
    noise_raw: Tensor | None = None
    if not heteroscedastic:
        raws = [_raw_noise(lik).detach() for _, lik in built]
        noise_raw = torch.stack(raws).reshape(k, 1).clone().requires_grad_()
        params.append(noise_raw)
    het = HeteroscedasticGaussian()
    estimate = functional.ESTIMATORS[config.estimator]
    prior_loc = torch.zeros(())
    prior_scale = torch.tensor(config.prior_scale)

    opt = _adam(config.lr)(params)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = max(config.epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    gen = torch.Generator().manual_seed(_seed(config, splits[0].index))
    rows = torch.arange(k).unsqueeze(1)

    def kl_per_split() -> Tensor:
        kl = torch.zeros(k)
        for entry in stacked:
            for loc, raw in (("w_loc", "w_raw"), ("b_loc", "b_raw")):
                if loc in entry:
                    q = normal_kl(entry[loc], F.softplus(entry[raw]), prior_loc, prior_scale)
                    kl = kl + q.reshape(k, -1).sum(1)
        return kl

    for epoch in range(config.epochs):
        order = torch.argsort(torch.rand(k, n, generator=gen), dim=1)
        for start in range(0, n, config.batch_size):
            idx = order[:, start : start + config.batch_size]
            h, yb = X[rows, idx], Y[rows, idx]
            for j, entry in enumerate(stacked):
                if j > 0:
                    h = torch.relu(h)
                h = estimate(
                    h,
                    entry["w_loc"],
                    F.softplus(entry["w_raw"]),
                    entry.get("b_loc"),
                    F.softplus(entry["b_raw"]) if "b_raw" in entry else None,
                    generator=gen,
                )
            if heteroscedastic:
                mean, scale = het.split(h)
            else:
                assert noise_raw is not None
                mean, scale = h.squeeze(-1), F.softplus(noise_raw).expand(h.shape[:2])
            nll = -torch.distributions.Normal(mean, scale, validate_args=False).log_prob(yb)
            losses = nll.mean(1) + kl_per_split() / n
            loss = losses.sum()
            if not bool(torch.isfinite(loss)):
                bad = [splits[i].index for i in range(k) if not math.isfinite(float(losses[i]))]
                raise NonFiniteLossError(
                    f"the loss of splits {bad} became non-finite at epoch {epoch}; lower the "
                    f"learning rate (lr={config.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        for i, (layers, (_, lik)) in enumerate(zip(layer_lists, built, strict=True)):
            for la, entry in zip(layers, stacked, strict=True):
                _mean_field(la).loc.copy_(entry["w_loc"][i])
                _mean_field(la).raw_scale.copy_(entry["w_raw"][i])
                if la.b_posterior is not None:
                    la.b_posterior.loc.copy_(entry["b_loc"][i, 0])
                    la.b_posterior.raw_scale.copy_(entry["b_raw"][i, 0])
            if noise_raw is not None:
                _raw_noise(lik).copy_(noise_raw[i, 0])
    return [(model, lik) for model, lik in built]


def _raw_noise(likelihood: Likelihood) -> Tensor:
    if not isinstance(likelihood, Gaussian) or not isinstance(likelihood.raw_noise_scale, Tensor):
        raise TypeError(f"expected a learned-noise Gaussian likelihood, got {likelihood!r}")
    return likelihood.raw_noise_scale


def run_group(splits: Sequence[SplitArrays], config: UCIConfig) -> list[SplitResult]:
    """Train and score a group of splits (in one process, one torch thread)."""
    torch.set_num_threads(1)
    if config.trainer == "fit" or config.method == "moments":  # the stacked trainer samples
        return [run_split(s, config) for s in splits]
    started = time.perf_counter()
    trained = train_stacked(splits, config)
    seconds = (time.perf_counter() - started) / len(splits)
    results = []
    for split, (model, lik) in zip(splits, trained, strict=True):
        t0 = time.perf_counter()
        ll, rmse, noise = score(model, lik, split, config)
        results.append(
            SplitResult(split.index, ll, rmse, seconds + time.perf_counter() - t0, noise)
        )
    return results


def mean_and_stderr(values: Sequence[float]) -> list[float]:
    """``[mean, std / sqrt(n)]`` with the population std (``ddof=0``), as Gal's code reports."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    return [float(a.mean()), float(a.std() / math.sqrt(a.size))]


def _worker_init() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[cf.Executor | None]:
    if workers <= 1:
        yield None
        return
    # spawn: a fresh interpreter per worker, no inherited torch thread pools or locks.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        yield pool


def run_dataset(
    dataset: UCIDataset,
    config: UCIConfig,
    *,
    splits: int | None = None,
    validation: bool = False,
    executor: cf.Executor | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol on the first ``splits`` splits of ``dataset``; return its JSON entry.

    Args:
        dataset: The dataset.
        config: Training settings.
        splits: Number of splits (from split 0); default all of them.
        validation: Score a held-out 20 % of each training split instead of the test rows.
        executor: Runs the splits in parallel if given (each worker with one torch thread).
        workers: Number of groups the splits are divided into for ``executor``.
        progress: Show a progress bar over the splits.

    Returns:
        ``{"test_ll": [mean, stderr], "rmse": [mean, stderr], "splits": k, "epochs": e,
        "seconds": t, "config": {...}, ...}``, in original units.
    """
    k = dataset.n_splits if splits is None else min(splits, dataset.n_splits)
    started = time.perf_counter()
    arrays = [prepare_split(dataset, i, validation=validation, seed=config.seed) for i in range(k)]
    results: list[SplitResult] = []
    bar = tqdm(total=k, desc=dataset.name, disable=not progress, unit="split", leave=True)
    try:
        if executor is None:
            for group in _groups(arrays, config, 1):
                results.extend(run_group(group, config))
                _update(bar, results, len(group))
        else:
            futures = [
                executor.submit(run_group, group, config)
                for group in _groups(arrays, config, workers)
            ]
            for future in cf.as_completed(futures):
                done = future.result()
                results.extend(done)
                _update(bar, results, len(done))
    finally:
        bar.close()
    results.sort(key=lambda r: r.index)
    lls = [r.log_likelihood for r in results]
    rmses = [r.rmse for r in results]
    notes = sorted({f"split {r.index}: {w}" for r in results for w in r.warnings})
    return {
        "test_ll": mean_and_stderr(lls),
        "rmse": mean_and_stderr(rmses),
        "splits": k,
        "epochs": config.epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "config": config.to_dict(),
        "evaluated_on": (
            "validation: 20% of each training split (test rows unused)" if validation else "test"
        ),
        "per_split": {
            "test_ll": lls,
            "rmse": rmses,
            "seconds": [round(r.seconds, 2) for r in results],
            "noise_std": [r.noise for r in results],
        },
        "diagnostics": notes,
    }


def _groups(arrays: list[SplitArrays], config: UCIConfig, workers: int) -> list[list[SplitArrays]]:
    """Splits per task: one each for ``fit``; for ``stacked``, as many groups as workers."""
    if config.trainer == "fit":
        return [[a] for a in arrays]
    by_shape: dict[tuple[int, ...], list[SplitArrays]] = {}
    for a in arrays:
        by_shape.setdefault(a.X_train.shape, []).append(a)
    groups: list[list[SplitArrays]] = []
    for same in by_shape.values():
        n = min(workers, len(same))
        groups.extend(same[i::n] for i in range(n))
    return groups


def _update(bar: Any, results: list[SplitResult], n: int) -> None:
    bar.update(n)
    bar.set_postfix(
        ll=f"{np.mean([r.log_likelihood for r in results]):.3f}",
        rmse=f"{np.mean([r.rmse for r in results]):.3f}",
    )


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``varlin uci`` (and ``benchmarks/uci.py``) to ``parser``."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name or alias (boston, concrete, energy, kin8nm, naval, power, protein, "
        "wine, yacht), a folder in --data-dir, or 'all' for the nine",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="root of a local copy in the UCI layout (default: download into the cache)",
    )
    parser.add_argument(
        "--splits",
        type=V.arg_positive_int,
        default=None,
        help="use the first K splits (default all)",
    )
    parser.add_argument(
        "--estimator", choices=["reparameterization", "local", "flipout"], default="local"
    )
    parser.add_argument(
        "--likelihood", choices=["homoscedastic", "heteroscedastic"], default="homoscedastic"
    )
    parser.add_argument(
        "--epochs", type=V.arg_positive_int, default=None, help="override the per-dataset epochs"
    )
    parser.add_argument("--batch-size", type=V.arg_positive_int, default=None)
    parser.add_argument("--lr", type=V.arg_positive_float, default=None)
    parser.add_argument("--init-scale", type=V.arg_positive_float, default=None)
    parser.add_argument("--prior-scale", type=V.arg_positive_float, default=None)
    parser.add_argument(
        "--noise-init", type=V.arg_positive_float, default=None, help="standardised units"
    )
    parser.add_argument(
        "--test-samples", type=V.arg_positive_int, default=None, help="posterior samples S"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--trainer",
        choices=["stacked", "fit"],
        default=None,
        help="stacked (default): the splits of a worker train together as one batch of "
        "independent models; fit: varlin.fit per split (the reference route, slower)",
    )
    parser.add_argument(
        "--method",
        choices=["mc", "moments"],
        default=None,
        help="mc (default): Monte Carlo ELBO and predictive; moments: moment propagation for "
        "both (fit and predict with method='moments')",
    )
    parser.add_argument(
        "--covariance",
        choices=["diagonal", "full"],
        default=None,
        help="with --method moments: the activations' covariance (default diagonal)",
    )
    parser.add_argument(
        "--workers", type=V.arg_positive_int, default=1, help="parallel processes, one thread each"
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="hyper-parameter search mode: hold out 20%% of each training split and score it; "
        "the test rows are not used",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file of results, written atomically after every dataset; entries of other "
        "datasets already in it are kept",
    )
    parser.add_argument("--no-progress", action="store_true")


def _dataset_names(spec: str) -> list[str]:
    return list(UCI_DATASETS) if spec.lower() == "all" else [spec]


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``varlin uci`` with parsed ``args``; print a summary line per dataset; return 0."""
    torch.set_num_threads(1)
    overrides = {name: getattr(args, name, None) for name in _OVERRIDES}
    if overrides["covariance"] not in (None, "diagonal") and overrides["method"] != "moments":
        from .cli import CLIError

        raise CLIError(f"--covariance {overrides['covariance']} applies only to --method moments")
    results: dict[str, Any] = {}
    if args.out is not None and Path(args.out).is_file():
        with contextlib.suppress(ValueError, OSError):
            existing = json.loads(Path(args.out).read_text())
            if isinstance(existing, dict):
                results.update(existing)
    from .cli import CLIError

    try:
        datasets = [
            load_uci(name, data_dir=args.data_dir) for name in _dataset_names(str(args.dataset))
        ]
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    with _executor(args.workers) as pool:
        for dataset in datasets:
            config = config_for(dataset, **overrides)
            entry = run_dataset(
                dataset,
                config,
                splits=args.splits,
                validation=args.validation,
                executor=pool,
                workers=args.workers,
                progress=not args.no_progress,
            )
            results[dataset.name] = entry
            if args.out is not None:
                write_json_atomic(args.out, results)
            ll, rmse = entry["test_ll"], entry["rmse"]
            what = "val" if args.validation else "test"
            print(
                f"{dataset.name}: {what} LL {ll[0]:.3f} ± {ll[1]:.3f}, RMSE {rmse[0]:.3f} ± "
                f"{rmse[1]:.3f} ({entry['splits']} splits, {config.epochs} epochs, "
                f"{config.likelihood}, {entry['seconds']:.0f} s)",
                flush=True,
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/uci.py``: the options of ``varlin uci``."""
    parser = argparse.ArgumentParser(prog="uci", description="The UCI regression benchmark.")
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
