r"""Likelihoods: modules mapping a model's output to a distribution over the targets.

Each likelihood is called as ``likelihood(output)`` and returns a
:class:`torch.distributions.Distribution` over ``y``; :meth:`Likelihood.expected_log_prob` gives
the per-example expected log-likelihood :math:`\mathbb E_{q}[\log p(y_n \mid f_n)]` that the ELBO
needs:

- by Monte Carlo, from a tensor ``output``: one sample of the network, or, with
  ``samples=True``, ``S`` samples stacked in a leading dimension (averaged), for every
  likelihood;
- in closed form, from a :class:`~torch.distributions.Normal` ``output`` (the moments of a
  Gaussian pre-activation, as the local reparameterization gives them; or a multivariate Normal
  over correlated outputs), for :class:`Gaussian`:

  .. math::
      \mathbb E_{f\sim\mathcal N(m, v)}\big[\log\mathcal N(y; f, \sigma^2)\big]
      = \log\mathcal N(y; m, \sigma^2) - \frac{v}{2\sigma^2}.

Randomness: the only draws a likelihood makes are those of a classification likelihood's logits
from a Gaussian output (their ``sample_logits``); they come from the ``generator`` passed in
(``None``: torch's default generator).

Shapes follow one convention: a trailing output dimension of size 1 is the scalar target of an
example, so a model output ``(N, 1)`` pairs with targets ``(N,)`` for :class:`Gaussian` and
:class:`Bernoulli`, and ``likelihood(output)`` is a distribution with batch shape ``(N,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli as _Bernoulli
from torch.distributions import Categorical as _Categorical
from torch.distributions import (
    Distribution,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from . import _validation as V
from ._quadrature import gauss_hermite
from .functional import _normal, inverse_softplus

__all__ = ["Likelihood", "Gaussian", "HeteroscedasticGaussian", "Bernoulli", "Categorical"]


def _shape_error(expected: tuple[int, ...], output: Tensor, target: Tensor) -> ValueError:
    return ValueError(
        f"target must have shape {expected} to match the model output of shape "
        f"{tuple(output.shape)}, got target of shape {tuple(target.shape)}"
    )


def _require_width(output: Tensor, width: int, what: str) -> None:
    if output.dim() < 2 or output.shape[-1] != width:
        raise ValueError(
            f"output must have shape (N, {width}) for {what}, got shape {tuple(output.shape)}"
        )


def _squeeze_scalar(output: Tensor) -> Tensor:
    """``(N, 1) -> (N,)``: a trailing dimension of size 1 holds one scalar per example."""
    return output.squeeze(-1) if output.dim() >= 2 and output.shape[-1] == 1 else output


def _noise_floor(scale: Tensor) -> Tensor:
    """``scale`` kept at or above the square root of its dtype's smallest normal number.

    A noise scale whose square underflows to 0 makes ``Normal.log_prob`` NaN (0 / 0 at the
    mean): with the floor (1.1e-19 in float32) the log density is finite, or ``-inf`` for a
    target the model deems impossible, never NaN.
    """
    return scale.clamp_min(torch.finfo(scale.dtype).tiny ** 0.5)


#: The Gaussian outputs a likelihood integrates over (propagated moments, closed-form heads).
_GAUSSIAN_OUTPUTS = (Normal, MultivariateNormal, LowRankMultivariateNormal)


def _gaussian_draws(
    output: Distribution, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """``num_samples`` reparameterized draws ``(S, *batch, *event)`` from a Gaussian output.

    Written out rather than ``output.rsample``, which takes no generator: the same affine maps
    of standard normals (``loc + scale * eps``, ``loc + L eps``, ``loc + F eps_w + sqrt(d) eps_d``)
    with the noise drawn from ``generator``.
    """
    loc = output.mean
    shape = (num_samples, *output.batch_shape, *output.event_shape)
    eps = _normal(shape, generator, loc)
    if isinstance(output, Normal):
        return output.loc + eps * output.scale
    if isinstance(output, MultivariateNormal):
        return loc + (output.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if isinstance(output, LowRankMultivariateNormal):
        factor = output.cov_factor
        eps_w = _normal((*shape[:-1], factor.shape[-1]), generator, loc)
        low_rank = (factor @ eps_w.unsqueeze(-1)).squeeze(-1)
        return loc + low_rank + output.cov_diag.sqrt() * eps
    raise TypeError(f"no Gaussian draws from a {type(output).__name__}")  # pragma: no cover


def _per_example(log_prob: Tensor) -> Tensor:
    """Sum a log density over every dimension after the first (the examples), ``-> (N,)``."""
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1) if log_prob.dim() > 1 else log_prob


class Likelihood(nn.Module):
    """Base class: ``forward(output) -> Distribution`` over the targets.

    Subclasses define :meth:`forward` and :meth:`check_target`; :meth:`expected_log_prob` has a
    generic Monte Carlo implementation.
    """

    #: ``"regression"`` or ``"classification"``: how predictions are summarised.
    task = "regression"

    def forward(self, output: Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        """Validate ``target`` against ``output`` (one sample) and return it ready for log_prob.

        Raises:
            ValueError: the shapes do not match (the message names both).
            TypeError: the target's dtype is wrong for this likelihood.
        """
        raise NotImplementedError

    def _log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """Elementwise log density of a checked ``target`` under one sampled ``output``."""
        return self(output).log_prob(target)

    def expected_log_prob(
        self,
        output: Tensor | Distribution,
        target: Tensor,
        *,
        samples: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Per-example :math:`\mathbb E_q[\log p(y_n\mid f_n)]`, shape ``(N,)``.

        Args:
            output: the model output for ``N`` examples, ``(N, ...)``: one Monte Carlo sample,
                or, with ``samples=True``, ``S`` samples ``(S, N, ...)`` whose log densities are
                averaged. :class:`Gaussian` also accepts a :class:`~torch.distributions.Normal`
                over the output (closed form).
            target: the targets of the ``N`` examples.
            samples: whether ``output`` has a leading dimension of Monte Carlo samples.
            generator: where the draws come from when the expectation under a Gaussian
                ``output`` is estimated by sampling (the logits of :class:`Bernoulli` and
                :class:`Categorical`); ``None`` uses torch's default generator. Nothing else
                draws.

        Returns:
            The log density of each example, summed over its target dimensions, ``(N,)``.
        """
        generator = V.generator("generator", generator)
        if isinstance(output, Distribution):
            if not isinstance(output, _GAUSSIAN_OUTPUTS):
                raise TypeError(
                    f"{type(self).__name__} has no closed-form expected log-likelihood for a "
                    f"{type(output).__name__} output; pass a sampled output tensor, or a "
                    "Normal or MultivariateNormal over the outputs"
                )
            if samples:
                raise ValueError(
                    "samples=True needs sampled output tensors; a Gaussian output is integrated "
                    "over as a whole"
                )
            if not isinstance(target, Tensor):
                raise TypeError(f"target must be a torch.Tensor, got {V.describe(target)}")
            return self._gaussian_expected_log_prob(output, target, generator)
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be a torch.Tensor, got {V.describe(output)}")
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {V.describe(target)}")
        if not samples:
            target = self.check_target(output, target)
            return _per_example(self._log_prob(output, target))
        if output.dim() < 2 or target.dim() < 1:
            raise ValueError(
                "with samples=True, output must have shape (S, N, ...) and target (N, ...), got "
                f"output of shape {tuple(output.shape)} and target of shape {tuple(target.shape)}"
            )
        # Fold the S samples into the example dimension: (S, N, ...) -> (S*N, ...), so the
        # single-sample shape rules apply unchanged and unambiguously.
        target = self.check_target(output[0], target)
        s, n = output.shape[:2]
        flat_out = output.reshape(s * n, *output.shape[2:])
        flat_target = target.expand(s, *target.shape).reshape(s * n, *target.shape[1:])
        return _per_example(self._log_prob(flat_out, flat_target)).reshape(s, n).mean(0)

    def _gaussian_expected_log_prob(
        self, output: Distribution, target: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """:meth:`expected_log_prob` for a Gaussian over the model's outputs (a propagated or
        closed-form output, :func:`varlin.moments.propagate`); per likelihood. ``generator``
        serves a likelihood that estimates the expectation by sampling."""
        raise TypeError(
            f"{type(self).__name__} has no closed-form expected log-likelihood for a "
            f"{type(output).__name__} output; pass a sampled output tensor"
        )


class Gaussian(Likelihood):
    r"""Gaussian noise: :math:`y = f(x) + \varepsilon,\ \varepsilon\sim\mathcal N(0,\sigma^2)`.

    With no ``noise_scale`` given, :math:`\sigma` is learned, starting from 1 (as GPyTorch's and
    scikit-learn's Gaussian likelihoods do); a value given is held fixed unless
    ``learn_noise=True``.

    Args:
        noise_scale: :math:`\sigma` (> 0): the fixed value, or the initial value when learned;
            ``None`` (the default) starts a learned :math:`\sigma` at 1.
        learn_noise: if ``True``, :math:`\sigma` is a parameter (stored as
            ``raw_noise_scale``, :math:`\sigma = \operatorname{softplus}(\rho)`); if ``False``,
            a buffer, saved in ``state_dict()`` but not trained. ``None`` (the default) means
            ``True`` when ``noise_scale`` is not given and ``False`` when it is.
        device, dtype: factory keyword arguments, as for :class:`torch.nn.Linear`.

    Shape:
        The model output is ``(N, 1)`` or ``(N,)`` for targets ``(N,)``, or ``(N, D)`` for
        targets ``(N, D)``. ``likelihood(output)`` is a :class:`~torch.distributions.Normal`
        with the output's shape, a trailing dimension of size 1 dropped.

    Example:
        >>> Gaussian().learn_noise, Gaussian(0.1).learn_noise
        (True, False)
        >>> lik = Gaussian(0.1, learn_noise=True)
        >>> lik(torch.zeros(5, 1)).batch_shape
        torch.Size([5])
    """

    #: The initial :math:`\sigma` of a learned noise scale when none is given.
    DEFAULT_NOISE_SCALE = 1.0

    def __init__(
        self,
        noise_scale: float | None = None,
        *,
        learn_noise: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if learn_noise is None:
            learn_noise = noise_scale is None
        learn_noise = V.boolean("learn_noise", learn_noise)
        if noise_scale is None:
            noise_scale = self.DEFAULT_NOISE_SCALE
        noise_scale = V.real("noise_scale", noise_scale, min_value=0.0, strict=True)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        V.survives_cast("noise_scale", noise_scale, dtype)
        # Invert in float64, then round once: a float64 likelihood holds sigma to ~1e-16.
        raw = inverse_softplus(torch.tensor(noise_scale, dtype=torch.float64))
        raw = raw.to(device=device, dtype=dtype)
        self.learn_noise = learn_noise
        if self.learn_noise:
            self.raw_noise_scale = nn.Parameter(raw)
        else:
            self.register_buffer("raw_noise_scale", raw)

    @property
    def noise_scale(self) -> Tensor:
        r""":math:`\sigma = \operatorname{softplus}(\rho)`, 0-dim."""
        return F.softplus(self.raw_noise_scale)

    def _match(self, output: Tensor, target: Tensor) -> Tensor:
        # (N, 1) outputs pair with (N,) targets; (N, D) with (N, D), D = 1 included.
        if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
            return output.squeeze(-1)
        return output

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        V.floating_tensor("target", target)
        mean = self._match(output, target)
        if mean.shape != target.shape:
            raise _shape_error(tuple(_squeeze_scalar(output).shape), output, target)
        if V.is_validating():
            V.check_finite("target", target)
        return target

    def _scale_like(self, mean: Tensor) -> Tensor:
        return _noise_floor(self.noise_scale.to(mean.dtype))

    def forward(self, output: Tensor) -> Normal:
        mean = _squeeze_scalar(output)
        scale = self._scale_like(mean)
        return Normal(mean, scale.expand(mean.shape), validate_args=False)

    def _log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        mean = self._match(output, target)
        scale = self._scale_like(mean)
        return Normal(mean, scale.expand(mean.shape), validate_args=False).log_prob(target)

    def _gaussian_expected_log_prob(
        self, output: Distribution, target: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        # A Normal output, or a (low-rank) multivariate Normal over the last dimension (a head
        # whose posterior correlates its outputs): with independent noise only the marginal
        # variances enter the expectation.
        mean, var = output.mean, output.variance
        target = self.check_target(mean, target)
        mean, var = self._match(mean, target), self._match(var, target)
        noise_var = self._scale_like(mean) ** 2
        log_prob = Normal(mean, noise_var.sqrt(), validate_args=False).log_prob(target)
        return _per_example(log_prob - var / (2 * noise_var))

    def extra_repr(self) -> str:
        return f"noise_scale={float(self.noise_scale.detach()):.4g}, learn_noise={self.learn_noise}"


class HeteroscedasticGaussian(Likelihood):
    r"""Input-dependent Gaussian noise: the model outputs a mean and a raw scale per example.

    For targets of shape ``(N,)`` the output is ``(N, 2)``: column 0 the mean :math:`\mu`,
    column 1 :math:`\rho` with :math:`\sigma = \operatorname{softplus}(\rho) + \sigma_{\min}`.
    Whatever ``min_scale``, :math:`\sigma` stays at or above the square root of the smallest
    normal number of its dtype (1.1e-19 in float32), where softplus would underflow to 0: the
    log density is then finite, or ``-inf`` for an impossible target, never NaN.

    Args:
        min_scale: a floor :math:`\sigma_{\min} \ge 0` on the noise scale, for stability.

    Example:
        >>> lik = HeteroscedasticGaussian()
        >>> mean, scale = lik.split(torch.zeros(5, 2))
    """

    def __init__(self, *, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.min_scale = V.real("min_scale", min_scale, min_value=0.0)

    def split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, scale)``, each ``(*, N)``, from an output ``(*, N, 2)``."""
        _require_width(output, 2, "a HeteroscedasticGaussian likelihood (mean, raw scale)")
        return output[..., 0], _noise_floor(F.softplus(output[..., 1]) + self.min_scale)

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        V.floating_tensor("target", target)
        _require_width(output, 2, "a HeteroscedasticGaussian likelihood (mean, raw scale)")
        if output.shape[:-1] != target.shape:
            raise _shape_error(tuple(output.shape[:-1]), output, target)
        if V.is_validating():
            V.check_finite("target", target)
        return target

    def forward(self, output: Tensor) -> Normal:
        mean, scale = self.split(output)
        return Normal(mean, scale, validate_args=False)

    def noise_quadrature(self, output: Distribution) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""A Gaussian over the outputs :math:`(\mu, \rho)` as a mixture over the raw scale.

        For :math:`(\mu, \rho)` jointly Gaussian (means :math:`m_\mu, m_\rho`, variances
        :math:`v_\mu, v_\rho`, covariance :math:`c`; ``c = 0`` for a ``Normal``), given
        :math:`\rho` the mean :math:`\mu` is Gaussian with mean :math:`m_\mu + c(\rho -
        m_\rho)/v_\rho` and variance :math:`r = v_\mu - c^2/v_\rho`; Gauss–Hermite nodes
        :math:`\rho_k = m_\rho + \sqrt{v_\rho}\,x_k` (:data:`~varlin._quadrature.HERMITE_NODES`)
        with weights :math:`w_k` then integrate over :math:`\rho`. The softplus scale
        :math:`\sigma(\rho)` has no closed-form expectation (Wu et al. 2019 use a log-variance
        head, :math:`\sigma^2 = e^\ell`, for theirs); the quadrature keeps this likelihood's
        parameterisation, deterministically.

        Args:
            output: a :class:`~torch.distributions.Normal` or ``MultivariateNormal`` over the
                model's outputs ``(N, 2)`` (mean, raw scale).

        Returns:
            ``(means, residual, scales, weights)``: :math:`E[\mu\mid\rho_k]` ``(K, N)``,
            :math:`r` ``(N,)``, :math:`\sigma(\rho_k)` ``(K, N)``, :math:`w_k` ``(K,)``
            (summing to 1).
        """
        loc = output.mean
        _require_width(loc, 2, "a HeteroscedasticGaussian likelihood (mean, raw scale)")
        if isinstance(output, Normal):
            var = output.variance
            v_mu, v_rho, cov = var[..., 0], var[..., 1], torch.zeros_like(var[..., 0])
        else:
            matrix = output.covariance_matrix  # type: ignore[attr-defined]
            v_mu, v_rho, cov = matrix[..., 0, 0], matrix[..., 1, 1], matrix[..., 0, 1]
        nodes, weights = gauss_hermite(loc)
        nodes = nodes.reshape(-1, *([1] * v_mu.dim()))
        sd_rho = v_rho.clamp_min(torch.finfo(v_rho.dtype).tiny).sqrt()
        slope = cov / sd_rho  # Cov(mu, rho) / sd(rho): the regression of mu on x_k
        means = loc[..., 0] + slope * nodes
        residual = (v_mu - slope * slope).clamp_min(0.0)
        raw = loc[..., 1] + sd_rho * nodes
        scales = _noise_floor(F.softplus(raw) + self.min_scale)
        return means, residual, scales, weights

    def _gaussian_expected_log_prob(
        self, output: Distribution, target: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        r""":math:`\sum_k w_k\,[\log\mathcal N(y; E[\mu\mid\rho_k], \sigma_k^2) -
        r/(2\sigma_k^2)]` (:meth:`noise_quadrature`): exact for the Gaussian over
        :math:`\mu` given :math:`\rho`, Gauss–Hermite over :math:`\rho`."""
        means, residual, scales, weights = self.noise_quadrature(output)
        V.floating_tensor("target", target)
        if target.shape != means.shape[1:]:
            raise _shape_error(tuple(means.shape[1:]), output.mean, target)
        log_prob = Normal(means, scales, validate_args=False).log_prob(target)
        per_node = log_prob - residual / (2 * scales * scales)
        ell = torch.tensordot(weights, per_node, dims=1)
        return _per_example(ell)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale:g}"


class _LogitSampling(Likelihood):
    r"""Classification likelihoods: the expected log-likelihood under a Gaussian over the logits
    (a propagated output) by Monte Carlo over the logits only.

    ``logit_samples`` reparameterized draws of the logits from the Gaussian
    (:meth:`sample_logits`, from the ``generator`` of :meth:`~Likelihood.expected_log_prob`):
    an unbiased estimate of :math:`E[\log p(y\mid f)]` under that Gaussian, at the cost of
    ``logit_samples x N x C`` numbers, no network pass.
    """

    task = "classification"

    def __init__(self, *, logit_samples: int = 64) -> None:
        super().__init__()
        self.logit_samples = V.positive_int("logit_samples", logit_samples)

    def sample_logits(
        self,
        output: Distribution,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reparameterized draws of the logits from a Gaussian over them.

        Args:
            output: a :class:`~torch.distributions.Normal`, ``MultivariateNormal`` or
                ``LowRankMultivariateNormal`` over the model's outputs (a propagated output,
                :func:`varlin.moments.propagate`).
            num_samples: the number of draws ``S`` (>= 1).
            generator: the source of the draws; ``None`` uses torch's default generator.

        Returns:
            The logits ``(S, *output.batch_shape, *output.event_shape)``, differentiable in
            the Gaussian's parameters.
        """
        if not isinstance(output, _GAUSSIAN_OUTPUTS):
            raise TypeError(
                "output must be a Normal, MultivariateNormal or LowRankMultivariateNormal over "
                f"the logits, got {V.describe(output)}"
            )
        num_samples = V.positive_int("num_samples", num_samples)
        return _gaussian_draws(output, num_samples, V.generator("generator", generator))

    def _gaussian_expected_log_prob(
        self, output: Distribution, target: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        # expected_log_prob checked the output and the generator; __init__ the sample count
        logits = _gaussian_draws(output, self.logit_samples, generator)
        return self.expected_log_prob(logits, target, samples=True)

    def extra_repr(self) -> str:
        return f"logit_samples={self.logit_samples}"


class Bernoulli(_LogitSampling):
    """Two classes: the model outputs one logit per example, ``(N,)`` or ``(N, 1)``.

    Targets are ``0``/``1`` (any dtype), shape ``(N,)``.

    Args:
        logit_samples: draws of the logit from a Gaussian output (moment propagation,
            :func:`varlin.moments.propagate`) for the expected log-likelihood.

    ``sample_logits(output, num_samples, generator=None)`` draws the logits from a Gaussian
    output (``(S, *output.batch_shape)``), from ``generator`` (``None``: torch's default one).
    """

    def _logits(self, output: Tensor) -> Tensor:
        return _squeeze_scalar(output)

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        logits = self._logits(output)
        if target.shape != logits.shape:
            raise _shape_error(tuple(logits.shape), output, target)
        if target.dtype.is_complex:
            raise TypeError(f"target must hold 0 and 1, got {V.describe(target)}")
        target = target.to(logits.dtype)
        if V.is_validating() and not bool(((target == 0) | (target == 1)).all()):
            raise ValueError("target must hold only 0 and 1 for a Bernoulli likelihood")
        return target

    def forward(self, output: Tensor) -> _Bernoulli:
        return _Bernoulli(logits=self._logits(output), validate_args=False)

    def probs(self, output: Tensor) -> Tensor:
        """Class probabilities ``(*, N, 2)`` (columns: class 0, class 1) from logits."""
        p = torch.sigmoid(self._logits(output))
        return torch.stack([1 - p, p], dim=-1)


class Categorical(_LogitSampling):
    """``C`` classes: the model outputs ``C`` logits per example, ``(N, C)``.

    Targets are integer class indices in ``[0, C)``, shape ``(N,)``.

    Args:
        logit_samples: draws of the logits from a Gaussian output (moment propagation,
            :func:`varlin.moments.propagate`) for the expected log-likelihood.

    ``sample_logits(output, num_samples, generator=None)`` draws the logits from a Gaussian
    output (``(S, N, C)`` for one over ``(N, C)``), from ``generator`` (``None``: torch's
    default one).
    """

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices for a Categorical likelihood, got "
                f"{V.describe(target)}; convert it with target.long()"
            )
        if output.dim() < 1 or target.shape != output.shape[:-1]:
            raise _shape_error(tuple(output.shape[:-1]), output, target)
        if V.is_validating():
            classes = output.shape[-1]
            if bool(((target < 0) | (target >= classes)).any()):
                raise ValueError(f"target must hold class indices in [0, {classes})")
        return target

    def forward(self, output: Tensor) -> _Categorical:
        return _Categorical(logits=output, validate_args=False)

    def probs(self, output: Tensor) -> Tensor:
        """Class probabilities ``(*, N, C)``: the softmax of the logits."""
        return torch.softmax(output, dim=-1)
