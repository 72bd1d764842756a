r"""Likelihoods: modules mapping a model's output to a distribution over the targets.

Each likelihood is called as ``likelihood(output)`` and returns a
:class:`torch.distributions.Distribution` over ``y``; :meth:`Likelihood.expected_log_prob` gives
the per-example expected log-likelihood :math:`\mathbb E_{q}[\log p(y_n \mid f_n)]` that the ELBO
needs:

- from a tensor ``output`` (one Monte Carlo sample of the network, or ``S`` samples stacked in a
  leading dimension, averaged), for every likelihood;
- from a :class:`~torch.distributions.Normal` ``output`` (the moments of a Gaussian
  pre-activation, as the local reparameterization gives them), in closed form, for
  :class:`Gaussian`:

  .. math::
      \mathbb E_{f\sim\mathcal N(m, v)}\big[\log\mathcal N(y; f, \sigma^2)\big]
      = \log\mathcal N(y; m, \sigma^2) - \frac{v}{2\sigma^2}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli as _Bernoulli
from torch.distributions import Categorical as _Categorical
from torch.distributions import Distribution, Normal

from . import _validation as V
from .functional import inverse_softplus

__all__ = ["Likelihood", "Gaussian", "HeteroscedasticGaussian", "Bernoulli", "Categorical"]


def _require_width(output: Tensor, width: int) -> None:
    if output.shape[-1:] != (width,):
        raise ValueError(
            f"output must have last dimension {width} for this likelihood, "
            f"got shape {tuple(output.shape)}"
        )


class Likelihood(nn.Module):
    """Base class: ``forward(output) -> Distribution`` over the targets.

    Subclasses define :meth:`forward`; :meth:`expected_log_prob` and :meth:`check_target` have
    generic implementations.
    """

    #: ``"regression"`` or ``"classification"``: how predictions are summarised.
    task = "regression"

    def forward(self, output: Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        """Validate ``target`` against ``output`` (one sample) and return it ready for log_prob."""
        raise NotImplementedError

    def expected_log_prob(self, output: Tensor | Normal, target: Tensor) -> Tensor:
        r"""Per-example :math:`\mathbb E[\log p(y_n\mid f_n)]`, shape ``target.shape[:1]``.

        Args:
            output: one model output (a single Monte Carlo sample), ``(N, ...)``.
            target: the targets of the ``N`` examples.
        """
        if isinstance(output, Distribution):
            raise TypeError(
                f"{type(self).__name__} has no closed-form expected log-likelihood for a "
                f"{type(output).__name__} output; pass a sampled output tensor"
            )
        target = self.check_target(output, target)
        log_prob = self(output).log_prob(target)
        return log_prob.reshape(log_prob.shape[0], -1).sum(-1) if log_prob.dim() > 1 else log_prob


class Gaussian(Likelihood):
    r"""Gaussian noise: :math:`y = f(x) + \varepsilon,\ \varepsilon\sim\mathcal N(0,\sigma^2)`.

    Args:
        noise_scale: :math:`\sigma` (> 0), fixed or the initial value when learned.
        learn_noise: if ``True``, :math:`\sigma` is a parameter (stored as softplus-inverse).

    The model output has shape ``(N, 1)`` (or ``(N,)``) for targets of shape ``(N,)``, or
    ``(N, D)`` for targets ``(N, D)``.
    """

    def __init__(self, noise_scale: float = 1.0, *, learn_noise: bool = False) -> None:
        super().__init__()
        noise_scale = V.real("noise_scale", noise_scale, min_value=0.0, strict=True)
        raw = inverse_softplus(torch.tensor(noise_scale, dtype=torch.float64)).float()
        self.learn_noise = bool(learn_noise)
        if self.learn_noise:
            self.raw_noise_scale = nn.Parameter(raw)
        else:
            self.register_buffer("raw_noise_scale", raw)

    @property
    def noise_scale(self) -> Tensor:
        return F.softplus(self.raw_noise_scale)

    def _match(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        if target is not None and output.dim() == target.dim() + 1 and output.shape[-1] == 1:
            return output.squeeze(-1)
        return output

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        V.floating_tensor("target", target)
        mean = self._match(output, target)
        if mean.shape != target.shape:
            raise ValueError(
                f"target must have shape {tuple(mean.shape)} to match the model output "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if V.is_validating():
            V.check_finite("target", target)
        return target

    def forward(self, output: Tensor) -> Normal:
        scale = self.noise_scale.to(output.dtype)
        return Normal(output, scale.expand(output.shape), validate_args=False)

    def expected_log_prob(self, output: Tensor | Normal, target: Tensor) -> Tensor:
        if isinstance(output, Normal):
            mean, var = output.loc, output.variance
            target = self.check_target(mean, target)
            mean, var = self._match(mean, target), self._match(var, target)
            noise_var = self.noise_scale.to(mean.dtype) ** 2
            log_prob = Normal(mean, noise_var.sqrt(), validate_args=False).log_prob(target)
            log_prob = log_prob - var / (2 * noise_var)
        else:
            target = self.check_target(output, target)
            log_prob = self(self._match(output, target)).log_prob(target)
        return log_prob.reshape(log_prob.shape[0], -1).sum(-1) if log_prob.dim() > 1 else log_prob

    def extra_repr(self) -> str:
        return f"noise_scale={float(self.noise_scale):.4g}, learn_noise={self.learn_noise}"


class HeteroscedasticGaussian(Likelihood):
    r"""Input-dependent Gaussian noise: the model outputs a mean and a raw scale per target.

    For targets of shape ``(N,)`` the output is ``(N, 2)``: column 0 the mean, column 1
    :math:`\rho` with :math:`\sigma = \operatorname{softplus}(\rho) + \sigma_{\min}`.

    Args:
        min_scale: a floor :math:`\sigma_{\min} \ge 0` on the noise scale, for stability.
    """

    def __init__(self, *, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.min_scale = V.real("min_scale", min_scale, min_value=0.0)

    def split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, scale)`` from an output whose last dimension is 2."""
        _require_width(output, 2)
        return output[..., 0], F.softplus(output[..., 1]) + self.min_scale

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        V.floating_tensor("target", target)
        _require_width(output, 2)
        if output.shape[:-1] != target.shape:
            raise ValueError(
                f"target must have shape {tuple(output.shape[:-1])} to match the model output "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if V.is_validating():
            V.check_finite("target", target)
        return target

    def forward(self, output: Tensor) -> Normal:
        mean, scale = self.split(output)
        return Normal(mean, scale, validate_args=False)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale:g}"


class Bernoulli(Likelihood):
    """Two classes: the model outputs one logit per example, ``(N,)`` or ``(N, 1)``.

    Targets are ``0``/``1`` (any dtype), shape ``(N,)``.
    """

    task = "classification"

    def _logits(self, output: Tensor) -> Tensor:
        if output.dim() >= 1 and output.shape[-1] == 1:
            return output.squeeze(-1)
        return output

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        logits = self._logits(output)
        if target.shape != logits.shape:
            raise ValueError(
                f"target must have shape {tuple(logits.shape)} to match the model output "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        target = target.to(logits.dtype)
        if V.is_validating() and not bool(((target == 0) | (target == 1)).all()):
            raise ValueError("target must hold only 0 and 1 for a Bernoulli likelihood")
        return target

    def forward(self, output: Tensor) -> _Bernoulli:
        return _Bernoulli(logits=self._logits(output), validate_args=False)

    def probs(self, output: Tensor) -> Tensor:
        """Class probabilities ``(N, 2)`` from logits."""
        p = torch.sigmoid(self._logits(output))
        return torch.stack([1 - p, p], dim=-1)


class Categorical(Likelihood):
    """``C`` classes: the model outputs ``C`` logits per example, ``(N, C)``.

    Targets are integer class indices in ``[0, C)``, shape ``(N,)``.
    """

    task = "classification"

    def check_target(self, output: Tensor, target: Tensor) -> Tensor:
        if target.dtype.is_floating_point or target.dtype.is_complex:
            raise TypeError(
                f"target must hold integer class indices for a Categorical likelihood, got "
                f"{V.describe(target)}"
            )
        if target.shape != output.shape[:-1]:
            raise ValueError(
                f"target must have shape {tuple(output.shape[:-1])} to match the model output "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if V.is_validating():
            classes = output.shape[-1]
            if bool(((target < 0) | (target >= classes)).any()):
                raise ValueError(f"target must hold class indices in [0, {classes})")
        return target

    def forward(self, output: Tensor) -> _Categorical:
        return _Categorical(logits=output, validate_args=False)

    def probs(self, output: Tensor) -> Tensor:
        return torch.softmax(output, dim=-1)
