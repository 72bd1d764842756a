r"""Posterior predictive distributions, with uncertainty split into epistemic and aleatoric parts.

The predictive :math:`p(y_*\mid x_*) = \int p(y_*\mid x_*,\theta)\,q(\theta)\,d\theta` is
estimated with :math:`S` posterior samples, or computed exactly when the only variational layer is
the last one (a Bayesian last layer with a Gaussian likelihood).

The :math:`S` samples go through any ``nn.Module`` holding variational layers, in the fastest
way known to be exact for it, decided by the types of its leaf modules (a variational layer
counts as a leaf):

- **one batched pass**, inputs ``(S, N, ...)``: when every module is an ``nn.Sequential`` or a
  leaf that maps every leading dimension alike (``nn.Linear``, elementwise activations,
  ``nn.Dropout``, ``nn.LayerNorm``, ...): a plain MLP. Each slice gets its own weight sample
  (:func:`varlin.layers.weight_samples`);
- **samples folded into the batch**, inputs ``(S * N, ...)``: when every leaf treats the rows of
  dimension 0 independently (also convolutions, pooling, ``nn.Flatten``, ``nn.BatchNorm*`` in
  eval mode, recurrent layers with ``batch_first=True``, ...). Each variational layer splits its
  input back into ``(S, N, ...)``, applies one weight sample per slice and folds the output
  again. In an ``nn.Sequential`` the modules before the first variational one (a deterministic
  feature extractor) run once, on the ``N`` rows. A module's own ``forward`` code must keep the
  examples along dimension 0, as ``predict``'s input does;
- **a loop of S calls** otherwise (an unknown leaf, ``nn.BatchNorm*`` in training mode, which
  normalises with the statistics of the batch, a recurrent layer with ``batch_first=False``):
  exact for any module, ``S`` times the work of one call.

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

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, MultivariateNormal, Normal

from . import _validation as V
from .conjugate import ExactLinear
from .conv import BayesianConvBase
from .layers import BayesianLinearBase, variational_layers, weight_samples
from .likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, Likelihood
from .moments import COVARIANCES, noise_generator, propagate

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
            ``D`` outputs (``"lowrank"``, ``"full"``, ``"matrix_normal"``), or for
            ``method="moments"`` with ``covariance="full"``, the epistemic covariance across
            them, ``(N, D, D)``; else ``None``.
        sample_weights: the mixture's weights ``(S,)`` (summing to 1) where they are not equal:
            the Gauss–Hermite nodes of a heteroscedastic model's noise scale under
            ``method="moments"``; ``None`` for equal weights.
    """

    mean: Tensor
    epistemic: Tensor
    aleatoric: Tensor
    sample_means: Tensor | None = None
    sample_vars: Tensor | None = None
    epistemic_covariance: Tensor | None = None
    sample_weights: Tensor | None = None

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
        :math:`\frac1S\sum_s\mathcal N(y;\mu_s,\sigma_s^2)` (weighted by
        ``sample_weights`` where given); in closed form, the Gaussian.
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
        if self.sample_weights is None:
            return torch.logsumexp(comp.log_prob(target), dim=0) - math.log(s)
        log_w = torch.log(self.sample_weights).reshape(-1, *([1] * target.dim()))
        return torch.logsumexp(comp.log_prob(target) + log_w, dim=0)

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


# -- how S samples go through a model (see the module docstring) -------------------------------

#: Leaves that map ``(*, ...)`` to ``(*, ...)`` for any leading dimensions, each alike.
_LEADING_DIMS_LEAVES: tuple[type[nn.Module], ...] = (
    BayesianLinearBase, nn.Linear, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.LayerNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)  # fmt: skip

#: Further leaves that treat the rows of dimension 0 independently (whatever their input's
#: number of dimensions): a folded batch of S * N rows gives each row what N rows would.
_ROW_WISE_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Bilinear, nn.Embedding, nn.Flatten, nn.Unflatten,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout,
    nn.GroupNorm, nn.LocalResponseNorm, nn.PReLU, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.RNNCell, nn.LSTMCell, nn.GRUCell,
)  # fmt: skip


#: Modules judged as a whole, not by their children: a variational layer (its priors are data)
#: and attention, whose own forward mixes the sequence dimension.
_WHOLE = (BayesianLinearBase, nn.MultiheadAttention)


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    """The leaf modules of ``module`` (a module of :data:`_WHOLE` counts as one)."""
    children = list(module.children())
    if isinstance(module, _WHOLE) or not children:
        yield module
        return
    for child in children:
        yield from _leaves(child)


def _is_leading_dims(leaf: nn.Module) -> bool:
    if isinstance(leaf, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return leaf.dim is not None and leaf.dim < 0
    if isinstance(leaf, nn.Flatten):
        return leaf.start_dim < 0 and leaf.end_dim < 0
    return isinstance(leaf, _LEADING_DIMS_LEAVES)


def _is_row_wise(leaf: nn.Module) -> bool:
    if isinstance(leaf, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return leaf.dim is not None and leaf.dim != 0
    if isinstance(leaf, nn.modules.batchnorm._BatchNorm):
        # In eval mode with running statistics each row is normalised on its own; otherwise
        # with the batch's statistics, which S * N rows would change.
        return not leaf.training and leaf.running_mean is not None
    if isinstance(leaf, nn.modules.instancenorm._InstanceNorm):
        return True  # statistics per example and channel
    if isinstance(leaf, (nn.RNNBase, nn.MultiheadAttention)):
        return bool(leaf.batch_first)
    return _is_leading_dims(leaf) or isinstance(leaf, _ROW_WISE_LEAVES)


def _containers(module: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``module`` that are not leaves (see :func:`_leaves`)."""
    if isinstance(module, _WHOLE) or next(module.children(), None) is None:
        return
    yield module
    for child in module.children():
        yield from _containers(child)


def _sampling_mode(model: nn.Module) -> Literal["leading", "fold", "loop"]:
    """How ``S`` posterior samples go through ``model`` exactly (module docstring)."""
    leaves = list(_leaves(model))
    # A container's own forward code is known only for nn.Sequential: one of another class may
    # index or reshape dimension 0 and 1, which an extra leading dimension would shift.
    sequential = all(isinstance(m, nn.Sequential) for m in _containers(model))
    if sequential and all(_is_leading_dims(leaf) for leaf in leaves):
        return "leading"
    if all(_is_row_wise(leaf) for leaf in leaves):
        return "fold"
    return "loop"


def _split_prefix(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """An ``nn.Sequential``'s deterministic modules before its first variational one, the rest."""
    if not isinstance(model, nn.Sequential):
        return None, model
    for i, module in enumerate(model):
        if next(variational_layers(module), None) is not None:
            return (model[:i] if i > 0 else None), model[i:]
    return None, model


@contextlib.contextmanager
def _folded_layers(model: nn.Module, num_samples: int) -> Iterator[None]:
    """Inside, each variational layer takes ``(S * N, ...)`` rows and returns them folded.

    Hooks split the input into ``(S, N, ...)`` for :func:`~varlin.layers.weight_samples` (one
    weight sample per slice) and fold the output back; removed on exit, whatever happens.
    """

    def split(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["x"]
        if x.dim() < 2 or x.shape[0] % num_samples:
            raise ValueError(
                f"predict folds {num_samples} samples into dimension 0, but a variational layer "
                f"got an input of shape {tuple(x.shape)}; keep the examples along dimension 0"
            )
        x = x.reshape(num_samples, x.shape[0] // num_samples, *x.shape[1:])
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})

    def fold(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0].flatten(0, 1), *out[1:])
        return out.flatten(0, 1)

    handles = []
    try:
        for layer in variational_layers(model):
            handles.append(layer.register_forward_pre_hook(split, with_kwargs=True))
            handles.append(layer.register_forward_hook(fold))
        with weight_samples(model, num_samples):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _sample_outputs(model: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    """The model's outputs under ``S`` independent posterior samples, ``(S, N, ...)``."""
    mode = _sampling_mode(model)
    if mode == "leading":
        expanded = x.unsqueeze(0).expand(num_samples, *x.shape)  # stride 0: shared rows
        with weight_samples(model, num_samples):
            return _call(model, expanded)
    if mode == "loop":
        return torch.stack([_call(model, x) for _ in range(num_samples)])
    prefix, rest = _split_prefix(model)
    h = x if prefix is None else _call(prefix, x)  # a deterministic prefix runs once
    folded = h.unsqueeze(0).expand(num_samples, *h.shape).flatten(0, 1)
    with _folded_layers(model, num_samples):
        out = _call(rest, folded)
    return out.reshape(num_samples, out.shape[0] // num_samples, *out.shape[1:])


_Head = BayesianLinearBase | ExactLinear


def _head(module: nn.Module) -> bool:
    # A convolution is a variational linear map too, but its output is not (N, out): Monte Carlo.
    return isinstance(module, (BayesianLinearBase, ExactLinear)) and not isinstance(
        module, BayesianConvBase
    )


def _last_layer_split(model: nn.Module) -> tuple[nn.Module, _Head] | None:
    """``(features, head)`` if the model's only Bayesian layer is its last module (a
    variational linear layer, or an exact head fitted in closed form)."""
    if _head(model):
        assert isinstance(model, (BayesianLinearBase, ExactLinear))
        return nn.Identity(), model
    if isinstance(model, nn.Sequential) and len(model) > 0:
        head = model[-1]
        # (features, head), as bayesian_last_layer builds it: its first module, not a new slice.
        features = model[0] if len(model) == 2 else model[:-1]
        if _head(head) and not _has_bayesian(features):
            assert isinstance(head, (BayesianLinearBase, ExactLinear))
            return features, head
    return None


def _gaussian_head(head: nn.Module) -> bool:
    """Whether a head's output for fixed features is Gaussian (every exact head; a variational
    one whose posterior family is Gaussian)."""
    return not isinstance(head, BayesianLinearBase) or head.w_posterior.gaussian


def _has_bayesian(model: nn.Module) -> bool:
    return any(isinstance(m, (BayesianLinearBase, ExactLinear)) for m in model.modules())


def _closed_form(
    model: nn.Module, x: Tensor, likelihood: Likelihood | None
) -> RegressionPrediction:
    split = _last_layer_split(model)
    if split is None or not (likelihood is None or isinstance(likelihood, Gaussian)):
        raise ValueError(
            "method='closed_form' needs a model whose only variational layer is its last module "
            "(a VariationalLinear or ExactLinear at the end of an nn.Sequential, or the layer "
            "itself) and a Gaussian likelihood (or none); use method='mc'"
        )
    features, head = split
    if not _gaussian_head(head):
        raise ValueError(
            f"method='closed_form' needs a Gaussian posterior on the head, got "
            f"posterior={getattr(head, 'posterior_name', None)!r}; use method='mc'"
        )
    h = _call(features, x)
    name = "x" if isinstance(features, nn.Identity) else "the feature extractor's output"
    V.last_dim(name, h, head.in_features, "in_features")
    V.same_dtype(name, h, head.w_loc)
    # The head's output for fixed features h is exactly Gaussian (mean-field:
    # N(h mu_W + mu_b, h^2 sigma_W^2 + sigma_b^2); correlated across outputs for joint families).
    moments = head.output_moments(h)
    mean, var = moments.mean, moments.variance
    covariance = getattr(moments, "covariance_matrix", None)  # outputs correlated by the head
    if getattr(head, "_use_mean", False):  # inside varlin.deterministic(model): no spread
        var = torch.zeros_like(var)
        covariance = None if covariance is None else torch.zeros_like(covariance)
    noise = torch.zeros_like(mean)
    if likelihood is not None:
        noise = noise + likelihood.noise_scale.to(mean.dtype) ** 2
    elif isinstance(head, ExactLinear):  # an exact head carries its fitted noise
        noise = noise + head.noise_variance
    if mean.shape[-1] == 1:
        mean, var, noise = mean.squeeze(-1), var.squeeze(-1), noise.squeeze(-1)
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


def _unbatched(
    pred: RegressionPrediction | ClassificationPrediction,
) -> RegressionPrediction | ClassificationPrediction:
    """The prediction for a batch of one example with the example dimension dropped."""
    if isinstance(pred, RegressionPrediction):
        return RegressionPrediction(
            mean=pred.mean[0],
            epistemic=pred.epistemic[0],
            aleatoric=pred.aleatoric[0],
            sample_means=None if pred.sample_means is None else pred.sample_means[:, 0],
            sample_vars=None if pred.sample_vars is None else pred.sample_vars[:, 0],
            sample_weights=pred.sample_weights,
        )
    return ClassificationPrediction(
        probs=pred.probs[0],
        entropy=pred.entropy[0],
        aleatoric=pred.aleatoric[0],
        mutual_information=pred.mutual_information[0],
        prob_samples=pred.prob_samples[:, 0],
    )


def _propagated(model: nn.Module, x: Tensor, covariance: str, size: int) -> Distribution:
    """:func:`varlin.moments.propagate` over chunks of ``size`` rows, as one distribution."""
    parts = [propagate(model, chunk, covariance=covariance) for chunk in x.split(max(size, 1))]
    if len(parts) == 1:
        return parts[0]
    loc = torch.cat([p.mean for p in parts])
    if isinstance(parts[0], Normal):
        return Normal(loc, torch.cat([p.stddev for p in parts]), validate_args=False)
    tril = torch.cat([p.scale_tril for p in parts if isinstance(p, MultivariateNormal)])
    return MultivariateNormal(loc, scale_tril=tril, validate_args=False)


def _moments(
    model: nn.Module,
    x: Tensor,
    likelihood: Likelihood | None,
    covariance: str,
    num_samples: int,
    size: int,
) -> RegressionPrediction | ClassificationPrediction:
    """``method="moments"``: the predictive from the propagated Gaussian over the outputs."""
    if any(isinstance(m, ExactLinear) for m in model.modules()):
        raise ValueError(
            "method='moments' propagates through variational layers; the model holds an "
            "ExactLinear head: use method='closed_form'"
        )
    out = _propagated(model, x, covariance, size)
    if isinstance(likelihood, (Bernoulli, Categorical)):
        # The stated approximation: the predictive's probabilities, entropy and mutual
        # information from samples of the logits only (no weight sample, no network pass),
        # drawn from the model's generator as its weight samples are under method="mc".
        generator = noise_generator(model)
        logits = likelihood.sample_logits(out, num_samples, generator=generator)
        return _summarise(logits, likelihood)
    if isinstance(likelihood, HeteroscedasticGaussian):
        means, residual, scales, weights = likelihood.noise_quadrature(out)
        noise = scales * scales
        return RegressionPrediction(
            mean=out.mean[..., 0],
            epistemic=out.variance[..., 0],
            aleatoric=torch.tensordot(weights, noise, dims=1),
            sample_means=means,
            sample_vars=residual + noise,
            sample_weights=weights,
        )
    if likelihood is not None and not isinstance(likelihood, Gaussian):
        raise TypeError(f"unsupported likelihood {type(likelihood).__name__}")
    mean, var = out.mean, out.variance
    covariance_matrix = out.covariance_matrix if isinstance(out, MultivariateNormal) else None
    noise = torch.zeros_like(mean)
    if likelihood is not None:
        noise = noise + likelihood.noise_scale.to(mean.dtype) ** 2
    if mean.shape[-1] == 1:
        mean, var, noise, covariance_matrix = (
            mean.squeeze(-1),
            var.squeeze(-1),
            noise.squeeze(-1),
            None,
        )
    return RegressionPrediction(
        mean=mean, epistemic=var, aleatoric=noise, epistemic_covariance=covariance_matrix
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    *,
    num_samples: int = 64,
    likelihood: Likelihood | None = None,
    method: Literal["auto", "mc", "closed_form", "moments"] = "auto",
    batch_size: int | None = None,
    covariance: Literal["diagonal", "full"] = "diagonal",
) -> RegressionPrediction | ClassificationPrediction:
    r"""Posterior predictive of ``model`` at inputs ``x``.

    Args:
        model: a module with variational layers; its output is the likelihood's input. A model
            returning ``(y, kl)`` (the seed's layer) is accepted.
        x: inputs ``(N, ...)``, ``N`` examples along dimension 0 (``(N, in_features)`` for an
            MLP). A 1-D ``x`` of shape ``(in_features,)`` is one example, as for ``nn.Linear``:
            the prediction is then unbatched, for every method (``mean`` 0-dim for one output,
            ``probs`` ``(C,)``, ``sample_means`` ``(S,)``).
        num_samples: Monte Carlo posterior samples ``S`` (>= 1), independent along ``S`` for
            every estimator; through any module, batched where that is exact (see the module
            docstring for the rule), else in a loop of ``S`` calls.
        likelihood: maps outputs to a distribution over targets; ``None`` for a plain regression
            mean (aleatoric part 0; for an exact head, its fitted noise).
            :class:`~varlin.likelihoods.Bernoulli` or :class:`~varlin.likelihoods.Categorical`
            give a classification summary.
        method: ``"mc"``; ``"closed_form"`` (exact, for a Bayesian last layer with a Gaussian
            posterior family and a Gaussian likelihood; with a ``"full"``, ``"lowrank"`` or
            ``"matrix_normal"`` head it includes the covariance across outputs,
            :attr:`RegressionPrediction.covariance`); ``"auto"`` picks the closed form when it
            applies; ``"moments"``: no weight sampling, the Gaussian over the outputs that
            :func:`varlin.moments.propagate` pushes through the network (see below).
        batch_size: evaluate ``x`` in chunks of this many rows (memory ``S x batch_size``).
        covariance: for ``method="moments"``: ``"diagonal"`` or ``"full"`` (the covariance of
            every layer's units, and across the outputs: :attr:`RegressionPrediction.covariance`).

    With ``method="moments"`` (Wu et al. 2019), for regression the predictive is
    :math:`\mathcal N(m, v + \sigma^2)` for a :class:`~varlin.likelihoods.Gaussian`
    (``epistemic`` = :math:`v`, the propagated variance); for a
    :class:`~varlin.likelihoods.HeteroscedasticGaussian`, the Gaussian over (mean, raw scale)
    integrated exactly over the mean and by Gauss–Hermite quadrature over the raw scale, a
    mixture (``sample_weights``) whose ``epistemic`` part is the mean's variance and
    ``aleatoric`` part :math:`E[\sigma^2]`. For classification, ``num_samples`` draws of the
    *logits* from the propagated Gaussian give the probabilities, the entropy and the mutual
    information (the stated approximation: no weight is sampled and the network runs once),
    drawn from the generator of the model's variational layers
    (:func:`varlin.moments.noise_generator`; torch's default one when they hold none), the
    source of their weight samples under ``"mc"``.

    Returns:
        :class:`RegressionPrediction` or :class:`ClassificationPrediction`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    num_samples = V.positive_int("num_samples", num_samples)
    V.one_of("method", method, ("auto", "mc", "closed_form", "moments"))
    V.one_of("covariance", covariance, COVARIANCES)
    if covariance != "diagonal" and method != "moments":
        raise ValueError(
            f"covariance={covariance!r} applies only to method='moments', got method={method!r}"
        )
    V.floating_tensor("x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape (N, ...) with N >= 1 examples, got shape {tuple(x.shape)}"
        )
    if x.dim() == 1:  # one example, as nn.Linear reads a 1-D input: the prediction is unbatched
        return _unbatched(
            predict(
                model, x.unsqueeze(0), num_samples=num_samples, likelihood=likelihood,
                method=method, batch_size=batch_size, covariance=covariance,
            )
        )  # fmt: skip
    if likelihood is not None and not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a varlin Likelihood or None, got {V.describe(likelihood)}"
        )
    if V.is_validating():
        V.check_finite("x", x)
    size = x.shape[0] if batch_size is None else V.positive_int("batch_size", batch_size)
    if method == "moments":
        return _moments(model, x, likelihood, covariance, num_samples, size)
    split = _last_layer_split(model)
    closed_ok = (
        split is not None
        and _gaussian_head(split[1])
        and (likelihood is None or isinstance(likelihood, Gaussian))
    )
    if method == "closed_form" or (method == "auto" and closed_ok):
        return _closed_form(model, x, likelihood)
    if any(isinstance(m, ExactLinear) for m in model.modules()):
        # Its forward is the posterior mean: sampling the rest would drop its uncertainty.
        raise ValueError(
            "the model holds an ExactLinear head, whose predictive is computed in closed form "
            "only: use method='auto' or 'closed_form' with a Gaussian likelihood (or none)"
        )
    outs = [_sample_outputs(model, chunk, num_samples) for chunk in x.split(max(size, 1))]
    return _summarise(torch.cat(outs, dim=1), likelihood)
