r"""Posterior predictive distributions, with uncertainty split into epistemic and aleatoric parts.

The predictive :math:`p(y_*\mid x_*) = \int p(y_*\mid x_*,\theta)\,q(\theta)\,d\theta` is
estimated with :math:`S` posterior samples drawn in **one** batched pass (see
:func:`varlin.layers.weight_samples`), or computed exactly when the only variational layer is the
last one (a Bayesian last layer with a Gaussian likelihood).

Regression, by the law of total variance over :math:`\theta`:

.. math::
    \operatorname{Var}[y_*] =
    \underbrace{\operatorname{Var}_q\big[\mu_\theta(x_*)\big]}_{\text{epistemic}}
    + \underbrace{\mathbb E_q\big[\sigma^2_\theta(x_*)\big]}_{\text{aleatoric}} .

Classification, by the decomposition of the predictive entropy:

.. math::
    \underbrace{H\big[\bar p\big]}_{\text{total}} =
    \underbrace{I[y_*;\theta]}_{\text{epistemic (mutual information)}}
    + \underbrace{\mathbb E_q H\big[p_\theta\big]}_{\text{aleatoric}} .
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from . import _validation as V
from .conv import BayesianConvBase
from .layers import BayesianLinearBase, variational_layers, weight_samples
from .likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, Likelihood

__all__ = ["predict", "RegressionPrediction", "ClassificationPrediction"]


@dataclass
class RegressionPrediction:
    r"""Predictive summary for regression.

    With Monte Carlo samples, the predictive is the equally weighted mixture of the ``S``
    Gaussians :math:`\mathcal N(\mu_s, \sigma_s^2)`, and ``mean``/``variance`` are that
    mixture's exact moments: ``epistemic`` is the population variance of the ``S`` means (its
    expectation is :math:`(S-1)/S` times the posterior's; use ``S`` in the tens or more).

    Attributes:
        mean: predictive mean, ``(N,)`` (or ``(N, D)``).
        epistemic: variance of the mean over the posterior (model uncertainty).
        aleatoric: expected noise variance (data uncertainty); zeros without a likelihood.
        sample_means: per-sample means ``(S, N)``, or ``None`` for the closed form.
        sample_vars: per-sample noise variances ``(S, N)``, or ``None``.
        epistemic_covariance: for the closed form of a head whose posterior correlates its
            ``D`` outputs (``"lowrank"``, ``"full"``, ``"matrix_normal"``), the epistemic
            covariance across them, ``(N, D, D)``; else ``None``.
    """

    mean: Tensor
    epistemic: Tensor
    aleatoric: Tensor
    sample_means: Tensor | None = None
    sample_vars: Tensor | None = None
    epistemic_covariance: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        """Total predictive variance, epistemic + aleatoric."""
        return self.epistemic + self.aleatoric

    @property
    def covariance(self) -> Tensor | None:
        """Total predictive covariance across the outputs, ``(N, D, D)``: the epistemic
        covariance plus the (independent) noise on the diagonal; ``None`` where the outputs'
        epistemic covariance is not known (Monte Carlo, mean-field heads)."""
        if self.epistemic_covariance is None:
            return None
        return self.epistemic_covariance + torch.diag_embed(self.aleatoric)

    @property
    def std(self) -> Tensor:
        return self.variance.sqrt()

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        r"""Central ``level`` prediction interval, ``(lower, upper)``.

        :math:`\text{mean} \pm z\,\text{std}` with :math:`z = \Phi^{-1}((1 + \text{level})/2)`:
        exact for the closed form (a Gaussian predictive), the moment-matched Gaussian of the
        Monte Carlo mixture otherwise. A calibrated model covers a fraction ``level`` of new
        targets (:func:`varlin.metrics.interval_coverage`).
        """
        level = V.real("level", level)
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in the open interval (0, 1), got {level}")
        z = NormalDist().inv_cdf(0.5 + level / 2)
        half = z * self.std
        return self.mean - half, self.mean + half

    def log_prob(self, target: Tensor) -> Tensor:
        r"""Per-example log predictive density of ``target``.

        With samples, the density of the equally weighted Gaussian mixture
        :math:`\frac1S\sum_s\mathcal N(y;\mu_s,\sigma_s^2)`; in closed form, the Gaussian.
        """
        V.floating_tensor("target", target)
        if target.shape != self.mean.shape:
            raise ValueError(
                f"target must have the prediction's shape {tuple(self.mean.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if self.sample_means is None or self.sample_vars is None:
            if not bool((self.variance > 0).all()):
                raise ValueError(
                    "log_prob needs a predictive variance > 0; call predict(..., likelihood=...)"
                )
            return Normal(self.mean, self.std, validate_args=False).log_prob(target)
        if not bool((self.sample_vars > 0).all()):
            raise ValueError(
                "log_prob needs a likelihood with noise (aleatoric variance > 0); "
                "call predict(..., likelihood=...)"
            )
        comp = Normal(self.sample_means, self.sample_vars.sqrt(), validate_args=False)
        s = self.sample_means.shape[0]
        return torch.logsumexp(comp.log_prob(target), dim=0) - math.log(s)

    def nll(self, target: Tensor) -> Tensor:
        """Mean negative log predictive density (0-dim)."""
        return -self.log_prob(target).mean()


@dataclass
class ClassificationPrediction:
    """Predictive summary for classification.

    Attributes:
        probs: predictive class probabilities ``(N, C)`` (the posterior average).
        entropy: entropy of ``probs`` (total uncertainty), nats.
        aleatoric: expected entropy of the per-sample probabilities.
        mutual_information: ``entropy - aleatoric``, the epistemic part.
        prob_samples: ``(S, N, C)``.
    """

    probs: Tensor
    entropy: Tensor
    aleatoric: Tensor
    mutual_information: Tensor
    prob_samples: Tensor

    @property
    def classes(self) -> Tensor:
        return self.probs.argmax(-1)

    def log_prob(self, target: Tensor) -> Tensor:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {V.describe(target)}")
        if target.shape != self.probs.shape[:-1]:
            raise ValueError(
                f"target must have shape {tuple(self.probs.shape[:-1])}, got {tuple(target.shape)}"
            )
        if V.is_validating():
            classes, index = self.probs.shape[-1], target.long()
            if not bool(((index == target) & (index >= 0) & (index < classes)).all()):
                raise ValueError(
                    f"target must hold class indices in [0, {classes}), got {V.describe(target)}"
                )
        picked = self.probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
        return torch.log(picked.clamp_min(torch.finfo(picked.dtype).tiny))

    def nll(self, target: Tensor) -> Tensor:
        return -self.log_prob(target).mean()


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)


def _call(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def _linear_head(module: nn.Module) -> bool:
    # A convolution is a variational linear map too, but its output is not (N, out): Monte Carlo.
    return isinstance(module, BayesianLinearBase) and not isinstance(module, BayesianConvBase)


def _last_layer_split(model: nn.Module) -> tuple[nn.Module, BayesianLinearBase] | None:
    """``(features, head)`` if the model's only variational layer is its last module, a linear
    one."""
    if _linear_head(model):
        assert isinstance(model, BayesianLinearBase)
        return nn.Identity(), model
    if isinstance(model, nn.Sequential) and len(model) > 0:
        head = model[-1]
        if _linear_head(head) and len(list(variational_layers(model))) == 1:
            assert isinstance(head, BayesianLinearBase)
            return model[:-1], head
    return None


def _closed_form(
    model: nn.Module, x: Tensor, likelihood: Likelihood | None
) -> RegressionPrediction:
    split = _last_layer_split(model)
    if split is None or not (likelihood is None or isinstance(likelihood, Gaussian)):
        raise ValueError(
            "method='closed_form' needs a model whose only variational layer is its last module "
            "(a VariationalLinear at the end of an nn.Sequential, or the layer itself) and a "
            "Gaussian likelihood (or none); use method='mc'"
        )
    features, head = split
    if not head.w_posterior.gaussian:
        raise ValueError(
            f"method='closed_form' needs a Gaussian posterior on the head, got "
            f"posterior={head.posterior_name!r}; use method='mc'"
        )
    h = _call(features, x)
    name = "x" if isinstance(features, nn.Identity) else "the feature extractor's output"
    V.last_dim(name, h, head.in_features, "in_features")
    V.same_dtype(name, h, head.w_loc)
    # The head's output for fixed features h is exactly Gaussian (mean-field:
    # N(h mu_W + mu_b, h^2 sigma_W^2 + sigma_b^2); correlated across outputs for joint families).
    moments = head.output_moments(h)
    mean, var = moments.mean, moments.variance
    covariance = getattr(moments, "covariance_matrix", None)
    if head._use_mean:  # inside varlin.deterministic(model): the posterior mean, no spread
        var = torch.zeros_like(var)
        covariance = None if covariance is None else torch.zeros_like(covariance)
    if mean.shape[-1] == 1:
        mean, var = mean.squeeze(-1), var.squeeze(-1)
    noise = torch.zeros_like(mean)
    if likelihood is not None:
        noise = noise + likelihood.noise_scale.to(mean.dtype) ** 2
    return RegressionPrediction(
        mean=mean, epistemic=var, aleatoric=noise, epistemic_covariance=covariance
    )


def _summarise(
    out: Tensor, likelihood: Likelihood | None
) -> RegressionPrediction | ClassificationPrediction:
    # ``out`` is (S, N, ...): a trailing size-1 dimension holds one scalar per example; an
    # output (S, N) is already one scalar per example (N may be 1, so never squeeze it).
    scalar = out.squeeze(-1) if out.dim() >= 3 and out.shape[-1] == 1 else out
    if isinstance(likelihood, (Bernoulli, Categorical)):
        if isinstance(likelihood, Bernoulli):
            prob_samples = likelihood.probs(scalar.unsqueeze(-1))
        else:
            prob_samples = likelihood.probs(out)
        probs = prob_samples.mean(0)
        entropy = _entropy(probs)
        aleatoric = _entropy(prob_samples).mean(0)
        return ClassificationPrediction(
            probs=probs,
            entropy=entropy,
            aleatoric=aleatoric,
            mutual_information=(entropy - aleatoric).clamp_min(0),
            prob_samples=prob_samples,
        )
    if isinstance(likelihood, HeteroscedasticGaussian):
        means, scales = likelihood.split(out)
        noise_vars = scales**2
    else:
        means = scalar
        if isinstance(likelihood, Gaussian):
            noise_vars = (likelihood.noise_scale.to(means.dtype) ** 2).expand(means.shape)
        elif likelihood is None:
            noise_vars = torch.zeros_like(means)
        else:
            raise TypeError(f"unsupported likelihood {type(likelihood).__name__}")
    s = means.shape[0]
    epistemic = means.var(0, unbiased=False) if s > 1 else torch.zeros_like(means[0])
    return RegressionPrediction(
        mean=means.mean(0),
        epistemic=epistemic,
        aleatoric=noise_vars.mean(0),
        sample_means=means,
        sample_vars=noise_vars,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    *,
    num_samples: int = 64,
    likelihood: Likelihood | None = None,
    method: Literal["auto", "mc", "closed_form"] = "auto",
    batch_size: int | None = None,
) -> RegressionPrediction | ClassificationPrediction:
    """Posterior predictive of ``model`` at inputs ``x``.

    Args:
        model: a module with variational layers; its output is the likelihood's input. A model
            returning ``(y, kl)`` (the seed's layer) is accepted.
        x: inputs ``(N, in_features)``.
        num_samples: Monte Carlo posterior samples ``S`` (>= 1), drawn in one batched pass,
            independent along ``S`` for every estimator.
        likelihood: maps outputs to a distribution over targets; ``None`` for a plain regression
            mean (aleatoric part 0). :class:`~varlin.likelihoods.Bernoulli` or
            :class:`~varlin.likelihoods.Categorical` give a classification summary.
        method: ``"mc"``; ``"closed_form"`` (exact, for a Bayesian last layer with a Gaussian
            posterior family and a Gaussian likelihood; with a ``"full"``, ``"lowrank"`` or
            ``"matrix_normal"`` head it includes the covariance across outputs,
            :attr:`RegressionPrediction.covariance`); ``"auto"`` picks the closed form when it
            applies.
        batch_size: evaluate ``x`` in chunks of this many rows (memory ``S x batch_size``).

    Returns:
        :class:`RegressionPrediction` or :class:`ClassificationPrediction`.
    """
    num_samples = V.positive_int("num_samples", num_samples)
    V.one_of("method", method, ("auto", "mc", "closed_form"))
    V.floating_tensor("x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape (N, ...) with N >= 1 examples, got shape {tuple(x.shape)}"
        )
    if likelihood is not None and not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a varlin Likelihood or None, got {V.describe(likelihood)}"
        )
    if V.is_validating():
        V.check_finite("x", x)
    split = _last_layer_split(model)
    closed_ok = (
        split is not None
        and split[1].w_posterior.gaussian
        and (likelihood is None or isinstance(likelihood, Gaussian))
    )
    if method == "closed_form" or (method == "auto" and closed_ok):
        return _closed_form(model, x, likelihood)
    size = x.shape[0] if batch_size is None else V.positive_int("batch_size", batch_size)
    outs = []
    for chunk in x.split(max(size, 1)):
        expanded = chunk.unsqueeze(0).expand(num_samples, *chunk.shape)
        with weight_samples(model, num_samples):
            outs.append(_call(model, expanded))
    return _summarise(torch.cat(outs, dim=1), likelihood)
