r"""Sampling-free inference: push a Gaussian through a network, layer by layer.

:func:`propagate` follows Wu et al. (2019), "Deterministic Variational Inference for Robust
Bayesian Neural Networks": every activation vector is summarised by its mean and its variances
(``covariance="diagonal"``) or its covariance matrix (``covariance="full"``), and each module maps
those moments to the moments of its output, in closed form or by a cited approximation. The
result is a Gaussian over the network's outputs, which the ELBO (closed-form expected
log-likelihood) and :func:`varlin.predict` (``method="moments"``) use without drawing a weight.

The rules, one per module type (:data:`SUPPORTED`):

- **variational linear layers** (every posterior family): exact first two moments of
  :math:`y = xW + b` for an input independent of the weights,
  :meth:`varlin.posteriors.Family.output_moments_random`. Diagonal:
  :math:`\operatorname{Var}y_j = \sum_i \mu_i^2 s_{ij}^2 + v_i(M_{ij}^2 + s_{ij}^2) + s_{b_j}^2`
  for mean-field (the joint families add their correlations); full: the input covariance
  carried through, :math:`\operatorname{Cov}_W(y\mid x=\mu) + T(C) + M^\top CM`;
- ``nn.Linear``: :math:`\mu W^\top + b`, :math:`W C W^\top` (diagonal: :math:`v W^{2\top}`);
  ``nn.Identity``, ``nn.Flatten``, ``nn.Dropout`` in eval mode: unchanged (in training mode,
  dropout's exact moments: the mean is kept, a variance becomes
  :math:`(v + p\mu^2)/(1-p)`, covariances between units are kept);
- ``nn.ReLU``: the exact mean and variance of a rectified Gaussian; for ``"full"`` the
  covariance approximation of Wu et al. (2019, Sec. 3.2) for pairs of units;
- ``nn.LeakyReLU``: :math:`ax + (1-a)\operatorname{relu}(x)`, exact through the ReLU's moments
  and Stein's lemma :math:`\operatorname{Cov}(x, \operatorname{relu}(x)) = v\Phi(\mu/\sqrt v)`;
- ``nn.Sigmoid`` and ``nn.Tanh``: the probit approximation :math:`\sigma(x)\approx\Phi(\lambda
  x)`, :math:`\lambda^2 = \pi/8` (MacKay 1992; Spiegelhalter & Lauritzen 1990), whose moments
  are exact: mean :math:`\Phi(\lambda\mu/\sqrt{1 + \lambda^2 v})`, variance by Sheppard's
  integral of the bivariate normal distribution; :math:`\tanh(x) = 2\sigma(2x) - 1`. The
  probit differs from the logistic by at most 0.018;
- ``nn.GELU`` (``approximate="none"``, :math:`x\Phi(x)`): exact mean and variance (Gaussian
  integrals of :math:`\Phi` and :math:`\phi`, the bivariate term by Sheppard's integral);
- ``nn.Sequential``: the rules of its children, in order.

With ``covariance="full"``, smooth activations keep the covariance between two units to first
order in their correlation, :math:`\operatorname{Cov}(f(x_i), f(x_j)) \approx C_{ij}\,
E[f'(x_i)]\,E[f'(x_j)]` (the first term of Mehler's expansion; it keeps the matrix positive
semi-definite, because :math:`\operatorname{Var} f(x) \ge v\,E[f'(x)]^2`), with the exact
variances on the diagonal.

Anything else raises a one-line error naming the module type.

Randomness: propagation draws nothing. What the moment path samples downstream (the logits of a
classification likelihood, in ``fit(method="moments")`` and ``predict(method="moments")``) comes
from :func:`noise_generator`: the model's own generator, as its weight noise would.

References:
    A. Wu, S. Nowozin, E. Meeds, R. E. Turner, J. M. Hernández-Lobato, A. L. Gaunt.
    Deterministic variational inference for robust Bayesian neural networks. ICLR 2019.

    D. J. C. MacKay. The evidence framework applied to classification networks. Neural
    Computation, 1992.

    W. F. Sheppard. On the application of the theory of error to cases of normal distribution
    and normal correlation. Phil. Trans. R. Soc. A, 1899.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.special import ndtr

from . import _validation as V
from ._quadrature import bivariate_excess
from .conv import BayesianConvBase
from .layers import BayesianLinearBase, variational_layers

__all__ = [
    "COVARIANCES",
    "SUPPORTED",
    "check_model",
    "noise_generator",
    "propagate",
    "relu_moments",
    "relu_covariance",
    "leaky_relu_moments",
    "sigmoid_moments",
    "tanh_moments",
    "gelu_moments",
]

#: The values of ``covariance=``.
COVARIANCES = ("diagonal", "full")

#: :math:`\lambda` of the probit approximation :math:`\sigma(x)\approx\Phi(\lambda x)`.
PROBIT_SCALE = math.sqrt(math.pi / 8.0)
#: Standardised means beyond this are clamped: :math:`\Phi` is 0 or 1 and :math:`\phi` is 0 in
#: every dtype there, and the clamp keeps a unit without variance (``mean / 0``) finite.
_ALPHA_LIMIT = 40.0
#: Correlations are kept inside ±(1 - this) in the ReLU covariance (its derivative is infinite
#: at ±1).
_RHO_MARGIN = 1e-6
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _Moments(NamedTuple):
    """The state between modules: the mean ``(*, D)`` and the variances ``(*, D)`` or the
    covariance ``(*, D, D)``; ``spread is None`` for a value without randomness.

    Under ``covariance="full"`` the variances stand for a diagonal covariance until a module
    correlates the units (a linear map of random inputs, a family that correlates its outputs):
    exact, and it spares the ``O(D^2)`` rules where every covariance is 0 (the hidden units of a
    mean-field layer with a fixed input are independent).
    """

    mean: Tensor
    spread: Tensor | None

    @property
    def matrix(self) -> bool:
        """Whether ``spread`` is a covariance matrix (not variances)."""
        return self.spread is not None and self.spread.dim() > self.mean.dim()


# -- elementwise moments of a Gaussian through an activation --------------------------------------
def _pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _standardise(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """``(std, alpha)``: :math:`\\sqrt v` and :math:`\\mu/\\sqrt v`, finite for ``v = 0``."""
    std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    return std, (mean / std).clamp(-_ALPHA_LIMIT, _ALPHA_LIMIT)


def relu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and variance of :math:`\max(x, 0)` for :math:`x\sim\mathcal N(\mu, v)`, exact.

    With :math:`\alpha = \mu/\sqrt v`,
    :math:`E = \mu\Phi(\alpha) + \sqrt v\,\phi(\alpha)` and
    :math:`\operatorname{Var} = v\,[\alpha^2\Phi(\alpha)\Phi(-\alpha) + \Phi(\alpha) +
    \alpha\phi(\alpha)(\Phi(-\alpha) - \Phi(\alpha)) - \phi(\alpha)^2]`, a form of
    :math:`E[\max(x,0)^2] - E^2` whose terms do not cancel for a large positive :math:`\alpha`
    (where the textbook form loses :math:`\alpha^2` digits).
    """
    std, alpha = _standardise(mean, var)
    cdf, sf, pdf = ndtr(alpha), ndtr(-alpha), _pdf(alpha)
    out_mean = mean * cdf + std * pdf
    scaled = alpha * alpha * cdf * sf + cdf + alpha * pdf * (sf - cdf) - pdf * pdf
    return out_mean, var * scaled.clamp_min(0.0)


def relu_covariance(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of :math:`\max(x, 0)` for :math:`x\sim\mathcal N(\mu, C)`.

    The diagonal is exact (:func:`relu_moments`). For two units with standardised means
    :math:`\alpha_i, \alpha_j` and correlation :math:`\rho`, Price's theorem gives
    :math:`\operatorname{Cov} = C_{ij}\Phi(\alpha_i)\Phi(\alpha_j) + \sigma_i\sigma_j
    \int_0^\rho(\rho - s)\,\phi_2(\alpha_i, \alpha_j; s)\,ds`; Wu et al. (2019, Sec. 3.2)
    replace the remaining integral's exponent by its average under the weight
    :math:`(\rho - s)/\sqrt{1 - s^2}`, which gives

    .. math::
        \operatorname{Cov}(\operatorname{relu}(x_i), \operatorname{relu}(x_j)) \approx C_{ij}
        \Big[\Phi(\alpha_i)\Phi(\alpha_j) + \frac{g_\rho}{2\pi}
        e^{-Q}\Big],\quad g_\rho = \arcsin\rho - \frac{\rho}{1 + \sqrt{1-\rho^2}},

        Q = \frac{\rho\,(\alpha_i^2 + \alpha_j^2)}{2 g_\rho (1 + \sqrt{1-\rho^2})}
        - \frac{(\arcsin\rho - \rho)\,\alpha_i\alpha_j}{\rho\,g_\rho},

    exact to first order in :math:`\rho` (and for :math:`\alpha_i = \alpha_j = 0`).

    Args:
        mean: ``(*, D)``.
        cov: ``(*, D, D)``.
    """
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    out_mean, out_var = relu_moments(mean, var)
    std, alpha = _standardise(mean, var)
    rho = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    rho = rho.clamp(-1.0 + _RHO_MARGIN, 1.0 - _RHO_MARGIN)
    root = torch.sqrt(1.0 - rho * rho)
    asin = torch.asin(rho)
    # asin(rho) / rho and (asin(rho) - rho) / rho^2 by their series near 0, where the direct
    # quotients are 0 / 0 (both branches are finite, so where() passes finite gradients).
    small = rho.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(rho), rho)
    rho2 = rho * rho
    asin_ratio = torch.where(small, 1.0 + rho2 / 6.0 + 0.075 * rho2 * rho2, asin / safe)
    excess_ratio = torch.where(small, rho / 6.0 + 0.075 * rho * rho2, (asin - rho) / (safe * safe))
    h = asin_ratio - 1.0 / (1.0 + root)  # g / rho, in [1/2, pi/2 - 1]
    a_i, a_j = alpha.unsqueeze(-1), alpha.unsqueeze(-2)
    q = (a_i * a_i + a_j * a_j) / (2.0 * h * (1.0 + root)) - a_i * a_j * excess_ratio / h
    gain = ndtr(a_i) * ndtr(a_j) + (rho * h) / (2.0 * math.pi) * torch.exp(-q)
    out_cov = cov * gain
    return out_mean, _with_diagonal(out_cov, out_var)


def leaky_relu_moments(mean: Tensor, var: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variance and :math:`\Phi(\alpha)` of :math:`ax + (1-a)\max(x, 0)`, exact.

    :math:`\operatorname{Var} = a^2 v + (1-a)^2\operatorname{Var}\operatorname{relu}(x) +
    2a(1-a)\,v\,\Phi(\alpha)` (Stein's lemma for the cross term). The third value serves the
    full-covariance rule.
    """
    r_mean, r_var = relu_moments(mean, var)
    cdf = ndtr(_standardise(mean, var)[1])
    a, b = slope, 1.0 - slope
    out_var = a * a * var + b * b * r_var + 2.0 * a * b * var * cdf
    return a * mean + b * r_mean, out_var.clamp_min(0.0), cdf


def _probit_moments(mean: Tensor, var: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variance and :math:`E[\tfrac{d}{dx}\Phi(cx)]` of :math:`\Phi(cx)`, exact."""
    spread = 1.0 + scale * scale * var
    root = spread.sqrt()
    h = scale * mean / root
    out_var = bivariate_excess(h, scale * scale * var / spread)
    return ndtr(h), out_var, scale * _pdf(h) / root


def sigmoid_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variance and mean slope of :math:`\sigma(x)` by the probit approximation.

    :math:`\sigma(x)\approx\Phi(\lambda x)` with :math:`\lambda^2 = \pi/8` (MacKay 1992), whose
    moments are exact: :math:`E = \Phi(h)`, :math:`h = \lambda\mu/\sqrt{1 + \lambda^2 v}`;
    :math:`\operatorname{Var} = \Phi_2(h, h; \rho) - \Phi(h)^2` with
    :math:`\rho = \lambda^2 v / (1 + \lambda^2 v)` (Sheppard's integral).
    """
    return _probit_moments(mean, var, PROBIT_SCALE)


def tanh_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variance and mean slope of :math:`\tanh(x) = 2\sigma(2x) - 1`, through the probit
    approximation of :func:`sigmoid_moments` (:math:`\Phi(2\lambda x)`)."""
    p_mean, p_var, p_slope = _probit_moments(mean, var, 2.0 * PROBIT_SCALE)
    return 2.0 * p_mean - 1.0, 4.0 * p_var, 2.0 * p_slope


def gelu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variance and mean slope of :math:`x\Phi(x)` (GELU, ``approximate="none"``), exact.

    With :math:`s = \sqrt{1 + v}`, :math:`h = \mu/s`, Stein's lemma
    :math:`E[x f(x)] = \mu E[f] + vE[f']` reduces every moment to three Gaussian integrals:
    :math:`E[\Phi(x)^2] = \Phi(h)^2 + (\Phi_2(h, h; v/s^2) - \Phi(h)^2)`,
    :math:`E[\Phi\phi] = \phi(h)\,\Phi(\mu/\sqrt{(1+v)(1+2v)})/s` and
    :math:`E[\phi^2] = e^{-\mu^2/(1+2v)}/(2\pi\sqrt{1+2v})`. Computed in float64 (the
    variance is a difference of second moments).
    """
    dtype = mean.dtype
    m, v = mean.double(), var.double().clamp_min(0.0)
    s2 = 1.0 + v
    s = s2.sqrt()
    h = m / s
    cdf, pdf_h = ndtr(h), _pdf(h)
    e_phi = pdf_h / s  # E[phi(x)]
    e_f = m * cdf + v * e_phi  # E[x Phi(x)]
    e_cdf2 = cdf * cdf + bivariate_excess(h, v / s2)  # E[Phi^2]
    wide = 1.0 + 2.0 * v
    e_pdf2 = torch.exp(-m * m / wide) / (2.0 * math.pi * wide.sqrt())  # E[phi^2]
    e_cdf_pdf = e_phi * ndtr(m / (s2 * wide).sqrt())  # E[Phi phi]
    e_x_cdf_pdf = (m * e_cdf_pdf + v * e_pdf2) / s2  # E[x Phi phi]
    e_x_cdf2 = m * e_cdf2 + 2.0 * v * e_cdf_pdf  # E[x Phi^2]
    e_f2 = m * e_x_cdf2 + v * (e_cdf2 + 2.0 * e_x_cdf_pdf)  # E[x^2 Phi^2]
    out_var = (e_f2 - e_f * e_f).clamp_min(0.0)
    slope = cdf + m * e_phi / s2  # E[Phi(x) + x phi(x)]
    return e_f.to(dtype), out_var.to(dtype), slope.to(dtype)


def _with_diagonal(cov: Tensor, var: Tensor) -> Tensor:
    """``cov`` with its diagonal replaced by ``var`` (out of place)."""
    eye = torch.eye(cov.shape[-1], dtype=torch.bool, device=cov.device)
    return torch.where(eye, torch.diag_embed(var), cov)


def _smooth_full(
    cov: Tensor, moments: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]], mean: Tensor
) -> tuple[Tensor, Tensor]:
    """A smooth activation under ``"full"``: exact variances, covariances to first order."""
    out_mean, out_var, slope = moments(mean, torch.diagonal(cov, dim1=-2, dim2=-1))
    out_cov = cov * (slope.unsqueeze(-1) * slope.unsqueeze(-2))
    return out_mean, _with_diagonal(out_cov, out_var)


# -- rules, one per module type --------------------------------------------------------------------
_Rule = Callable[[Any, _Moments, bool], _Moments]


def _identity(module: nn.Module, state: _Moments, full: bool) -> _Moments:
    return state


def _carry(weight: Tensor, state: _Moments, full: bool) -> Tensor | None:
    """The spread of ``x @ weight`` for a fixed ``weight`` ``(in, out)``: ``W^T C W``, or
    ``v @ W^2`` for variances under ``"diagonal"``; variances become a matrix under ``"full"``."""
    spread = state.spread
    if spread is None:
        return None
    if state.matrix:
        return weight.mT @ spread @ weight
    if full:  # W^T diag(v) W
        return (weight * spread.unsqueeze(-1)).mT @ weight
    return spread @ weight.square()


def _linear(module: nn.Linear, state: _Moments, full: bool) -> _Moments:
    mean = F.linear(state.mean, module.weight, module.bias)
    return _Moments(mean, _carry(module.weight.T, state, full))


def _variational(layer: BayesianLinearBase, state: _Moments, full: bool) -> _Moments:
    V.last_dim("the input of a variational layer", state.mean, layer.in_features, "in_features")
    V.same_dtype("the input of a variational layer", state.mean, layer.w_loc)
    if layer._use_mean:  # inside varlin.deterministic(model): the posterior-mean map
        mean = layer.w_posterior.mean_output(state.mean, layer.b_posterior)
        return _Moments(mean, _carry(layer.w_loc, state, full))
    family, t = layer.w_posterior, layer._realise()
    if full and state.spread is None and family.independent_outputs:
        # A fixed input and uncorrelated weight columns: independent outputs, variances suffice.
        return _Moments(*family.output_moments_random(state.mean, None, t))
    return _Moments(
        *family.output_moments_random(
            state.mean, state.spread, t, covariance="full" if full else "diagonal"
        )
    )


def _dropout(module: nn.Dropout, state: _Moments, full: bool) -> _Moments:
    p = float(module.p)
    if not module.training or p == 0.0:
        return state
    if p == 1.0:  # every unit dropped: the output is 0
        return _Moments(torch.zeros_like(state.mean), None)
    # y = x m / (1 - p) with independent masks m ~ Bernoulli(1 - p): E[y] = E[x],
    # Var y = (v + p mu^2) / (1 - p); the covariances between units are unchanged.
    if state.spread is None:
        var = torch.zeros_like(state.mean)
    else:
        var = torch.diagonal(state.spread, dim1=-2, dim2=-1) if state.matrix else state.spread
    out_var = (var + p * state.mean.square()) / (1.0 - p)
    if not state.matrix:
        return _Moments(state.mean, out_var)
    assert state.spread is not None
    return _Moments(state.mean, _with_diagonal(state.spread, out_var))


def _flatten(module: nn.Flatten, state: _Moments, full: bool) -> _Moments:
    mean = module(state.mean)
    if state.spread is None:
        return _Moments(mean, None)
    if state.matrix:
        if mean.shape != state.mean.shape:
            raise ValueError(
                f"covariance='full' needs one vector of features per example, but nn.Flatten("
                f"start_dim={module.start_dim}, end_dim={module.end_dim}) reshapes "
                f"{tuple(state.mean.shape)} to {tuple(mean.shape)}; use covariance='diagonal'"
            )
        return _Moments(mean, state.spread)
    return _Moments(mean, module(state.spread))


def _relu(module: nn.Module, state: _Moments, full: bool) -> _Moments:
    if state.spread is None:
        return _Moments(F.relu(state.mean), None)
    if state.matrix:
        return _Moments(*relu_covariance(state.mean, state.spread))
    return _Moments(*relu_moments(state.mean, state.spread))


def _leaky_relu(module: nn.LeakyReLU, state: _Moments, full: bool) -> _Moments:
    slope = float(module.negative_slope)
    if state.spread is None:
        return _Moments(F.leaky_relu(state.mean, slope), None)
    if not state.matrix:
        return _Moments(*leaky_relu_moments(state.mean, state.spread, slope)[:2])
    cov = state.spread
    mean, var, cdf = leaky_relu_moments(state.mean, torch.diagonal(cov, dim1=-2, dim2=-1), slope)
    _, relu_cov = relu_covariance(state.mean, cov)
    a, b = slope, 1.0 - slope
    # Cov(x_i, relu(x_j)) = C_ij Phi(alpha_j) (Stein's lemma), exact.
    cross = cov * cdf.unsqueeze(-2) + cov * cdf.unsqueeze(-1)
    out = a * a * cov + b * b * relu_cov + a * b * cross
    return _Moments(mean, _with_diagonal(out, var))


def _smooth(
    function: Callable[[Tensor], Tensor],
    moments: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
) -> _Rule:
    def rule(module: nn.Module, state: _Moments, full: bool) -> _Moments:
        if state.spread is None:
            return _Moments(function(state.mean), None)
        if state.matrix:
            return _Moments(*_smooth_full(state.spread, moments, state.mean))
        return _Moments(*moments(state.mean, state.spread)[:2])

    return rule


def _gelu(module: nn.GELU, state: _Moments, full: bool) -> _Moments:
    if module.approximate != "none":
        raise ValueError(
            f"propagate supports nn.GELU(approximate='none') (x * Phi(x)), got "
            f"approximate={module.approximate!r}"
        )
    return _smooth(lambda x: F.gelu(x), gelu_moments)(module, state, full)


#: Module type -> rule; the first ``isinstance`` match wins (variational layers first).
_RULES: tuple[tuple[type[nn.Module], _Rule], ...] = (
    (BayesianLinearBase, _variational),
    (nn.Linear, _linear),
    (nn.Identity, _identity),
    (nn.Flatten, _flatten),
    (nn.Dropout, _dropout),
    (nn.ReLU, _relu),
    (nn.LeakyReLU, _leaky_relu),
    (nn.Sigmoid, _smooth(torch.sigmoid, sigmoid_moments)),
    (nn.Tanh, _smooth(torch.tanh, tanh_moments)),
    (nn.GELU, _gelu),
)

#: The module types :func:`propagate` has a rule for (and ``nn.Sequential``, by its children).
SUPPORTED: tuple[str, ...] = (
    "nn.Sequential",
    "VariationalLinear / LinearVariationalNormal (every posterior family)",
    *(f"nn.{cls.__name__}" for cls, _ in _RULES[1:]),
)


def _rule_for(module: nn.Module) -> _Rule:
    # A variational convolution is a BayesianLinearBase too, but not a map of feature vectors.
    if not isinstance(module, BayesianConvBase):
        for cls, rule in _RULES:
            if isinstance(module, cls):
                return rule
    raise TypeError(
        f"propagate has no moment rule for {type(module).__name__}; supported: "
        f"{', '.join(SUPPORTED)}"
    )


def _walk(module: nn.Module, state: _Moments, full: bool) -> _Moments:
    if isinstance(module, nn.Sequential):
        for child in module:
            state = _walk(child, state, full)
        return state
    return _rule_for(module)(module, state, full)


def _check_supported(module: nn.Module) -> None:
    """Raise before any work if some module of ``module`` has no rule."""
    if isinstance(module, nn.Sequential):
        for child in module:
            _check_supported(child)
        return
    _rule_for(module)


def check_model(model: nn.Module) -> None:
    """Raise the error :func:`propagate` would for ``model`` with fixed inputs, without inputs.

    For callers that should fail before any work (``fit(method="moments")``).

    Raises:
        TypeError: ``model`` is not a module, or one of its modules has no moment rule.
        ValueError: ``model`` has no variational layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(variational_layers(model), None) is None:
        raise ValueError(
            f"model ({type(model).__name__}) has no variational layer: there is no weight "
            "uncertainty to propagate (pass a Normal over x to propagate input noise)"
        )
    _check_supported(model)


def noise_generator(model: nn.Module) -> torch.Generator | None:
    """The generator that the draws around moment propagation come from: that of ``model``'s
    first variational layer holding one, or ``None`` (torch's default generator) if none does.

    Propagation samples no weight; the logits of a classification likelihood are sampled from
    the propagated Gaussian (in training and in prediction) from the same source the layers'
    weight noise comes from under ``method="mc"``, so that a model whose layers hold a seeded
    generator trains and predicts the same whatever torch's global random state.
    """
    for layer in variational_layers(model):
        if layer.generator is not None:
            return layer.generator
    return None


# -- the entry point ----------------------------------------------------------------------------
def _input_moments(x: Any, full: bool) -> _Moments:
    if isinstance(x, Tensor):
        V.floating_tensor("x", x)
        if x.dim() == 0:
            raise ValueError(f"x must have shape (N, features), got shape {tuple(x.shape)}")
        return _Moments(x, None)
    if isinstance(x, Normal):  # independent inputs: variances, also under "full"
        return _Moments(x.mean, x.variance)
    if isinstance(x, (MultivariateNormal, LowRankMultivariateNormal)):
        if full:
            return _Moments(x.mean, x.covariance_matrix)
        return _Moments(x.mean, x.variance)
    raise TypeError(
        "x must be a tensor of inputs, or a Normal or MultivariateNormal over them (random "
        f"inputs), got {V.describe(x)}"
    )


def _multivariate(mean: Tensor, cov: Tensor) -> MultivariateNormal:
    """``MultivariateNormal(mean, cov)`` with a jitter of ``D eps max_i C_ii`` on the diagonal,
    so that a rank-deficient covariance (a unit without variance) has a Cholesky factor."""
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    finfo = torch.finfo(cov.dtype)
    jitter = diag.amax(-1, keepdim=True).clamp_min(finfo.tiny) * (finfo.eps * cov.shape[-1])
    tril, info = torch.linalg.cholesky_ex(cov + torch.diag_embed(jitter.expand_as(diag)))
    if not torch.compiler.is_compiling() and not _batched(info) and bool((info > 0).any()):
        raise ValueError(
            "the propagated output covariance is not positive definite (the ReLU covariance "
            "approximation can lose definiteness far from its expansion point); use "
            "covariance='diagonal'"
        )
    return MultivariateNormal(mean, scale_tril=tril, validate_args=False)


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a functorch batched tensor (inside ``vmap``): no value checks there."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(check(t)) if check is not None else False


def propagate(
    model: nn.Module, x: Tensor | Distribution, *, covariance: str = "diagonal"
) -> Normal | MultivariateNormal:
    r"""The Gaussian approximation of ``model``'s output: moments pushed through every module.

    No weight is sampled: each module's rule (module docstring) maps the mean and (co)variance
    of its input to those of its output. Exact for a single variational layer, and for a
    variational layer after ReLUs of independent Gaussians; an approximation (the Gaussian
    form, and for ``"full"`` the covariance of nonlinear units) deeper in a network.

    Args:
        model: an ``nn.Sequential`` (or a single module) of supported modules
            (:data:`SUPPORTED`), holding at least one variational layer.
        x: inputs ``(N, features)`` (fixed), or a :class:`~torch.distributions.Normal` or
            ``MultivariateNormal`` over them (noisy inputs; then a model without variational
            layers is allowed).
        covariance: ``"diagonal"``: every unit's variance, correlations between units dropped
            (the cheaper rule; Wu et al.'s "diagonal DVI"); ``"full"``: the covariance of every
            layer's units, ``O(D^2)`` per example.

    Returns:
        A :class:`~torch.distributions.Normal` ``(N, out)`` (``"diagonal"``) or a
        :class:`~torch.distributions.MultivariateNormal` over the ``out`` outputs of each
        example (``"full"``).

    Raises:
        TypeError: a module has no rule (the message names its type and the supported ones),
            or ``x`` is of the wrong type.
        ValueError: ``covariance`` is not ``"diagonal"`` or ``"full"``, the model has no
            variational layer, or the shapes do not fit.

    Example:
        >>> net = nn.Sequential(VariationalLinear(3, 16), nn.ReLU(), VariationalLinear(16, 1))
        >>> out = propagate(net, torch.randn(8, 3))
        >>> out.mean.shape, out.variance.shape
        (torch.Size([8, 1]), torch.Size([8, 1]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    V.one_of("covariance", covariance, COVARIANCES)
    full = covariance == "full"
    state = _input_moments(x, full)
    if isinstance(x, Tensor):
        check_model(model)
    else:
        _check_supported(model)
    if V.is_validating():
        V.check_finite("x", state.mean)
    state = _walk(model, state, full)
    spread = state.spread
    if spread is None:  # no randomness reached the output (deterministic mode)
        spread = torch.zeros_like(state.mean)
    if full:
        if not state.matrix:
            spread = torch.diag_embed(spread)
        return _multivariate(state.mean, spread)
    scale = spread.clamp_min(torch.finfo(spread.dtype).tiny).sqrt()
    return Normal(state.mean, scale, validate_args=False)
