"""Small synthetic problems, every draw from an explicit seed or ``torch.Generator``.

* :func:`make_regression_1d` -- 1-D regression with a gap in the inputs and input-dependent noise,
  for looking at in-between uncertainty and aleatoric vs. epistemic uncertainty.
* :func:`make_two_moons` -- the two-moons binary classification problem in 2-D.
* :func:`make_linear_regression` -- a conjugate Bayesian linear regression problem; its exact
  posterior is :func:`linear_regression_posterior`, a closed form to test variational fits against.

They return torch tensors. The UCI benchmark datasets are in :mod:`varlin.data` (which also
re-exports these names).
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

__all__ = [
    "REGRESSION_1D_DOMAIN",
    "REGRESSION_1D_GAP",
    "ClassificationData",
    "Dataset1D",
    "LinearRegressionData",
    "linear_regression_posterior",
    "make_linear_regression",
    "make_regression_1d",
    "make_two_moons",
    "regression_1d_mean",
    "regression_1d_noise_std",
]


#: Input interval of :func:`make_regression_1d`.
REGRESSION_1D_DOMAIN: Final[tuple[float, float]] = (-3.0, 3.0)
#: Closed interval left without inputs by :func:`make_regression_1d` when ``gap=True``.
REGRESSION_1D_GAP: Final[tuple[float, float]] = (-0.5, 0.75)
_HOMOSCEDASTIC_STD: Final = 0.2


class Dataset1D(NamedTuple):
    """A 1-D regression sample from :func:`make_regression_1d`.

    Attributes:
        x: Inputs, shape ``(n, 1)``.
        y: Noisy targets, shape ``(n,)``.
        noise_std: True standard deviation of the noise of each target, shape ``(n,)``.
    """

    x: Tensor
    y: Tensor
    noise_std: Tensor


class ClassificationData(NamedTuple):
    """A labelled classification sample.

    Attributes:
        x: Inputs, shape ``(n, 2)``, floating point.
        y: Class labels, shape ``(n,)``, ``torch.int64``.
    """

    x: Tensor
    y: Tensor


class LinearRegressionData(NamedTuple):
    """A conjugate linear regression sample from :func:`make_linear_regression`.

    Attributes:
        X: Design matrix, shape ``(n, d)``.
        y: Targets ``X @ w_true + noise``, shape ``(n,)``.
        w_true: The weights drawn from the prior, shape ``(d,)``.
    """

    X: Tensor
    y: Tensor
    w_true: Tensor


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} to be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}, got {name}={value}")
    return value


def _check_scale(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not (ok and math.isfinite(value)):
        rule = "finite and >= 0" if allow_zero else "finite and > 0"
        raise ValueError(f"Expected {name} to be {rule}, got {name}={value}")
    return value


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Expected dtype to be a floating-point torch.dtype, got dtype={dtype}")
    return dtype


def _make_generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected seed to be an int, got {type(seed).__name__} ({seed!r})")
        return torch.Generator().manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"Expected generator to be a torch.Generator, got {type(generator).__name__}"
        )
    if generator.device.type != "cpu":
        raise ValueError(f"Expected a CPU generator, got generator on device {generator.device}")
    return generator


def regression_1d_mean(x: Tensor) -> Tensor:
    r"""The noise-free function of :func:`make_regression_1d`.

    .. math:: f(x) = \sin(3x) + 0.3\,x

    Args:
        x: Inputs, any shape.

    Returns:
        ``f(x)``, same shape and dtype as ``x``.
    """
    return torch.sin(3.0 * x) + 0.3 * x


def regression_1d_noise_std(x: Tensor, *, heteroscedastic: bool = True) -> Tensor:
    r"""The true noise standard deviation of :func:`make_regression_1d`.

    .. math:: \sigma(x) = 0.05 + 0.3\,\operatorname{sigmoid}(x)
        \quad\text{(heteroscedastic)}, \qquad \sigma(x) = 0.2 \quad\text{(homoscedastic)}.

    The heteroscedastic scale grows smoothly from about 0.06 at ``x = -3`` to about 0.34 at
    ``x = 3`` and is positive for every ``x``; the homoscedastic one equals it at ``x = 0``.

    Args:
        x: Inputs, any shape.
        heteroscedastic: Whether the scale depends on ``x``.

    Returns:
        ``sigma(x)``, same shape and dtype as ``x``.
    """
    if heteroscedastic:
        return 0.05 + 0.3 * torch.sigmoid(x)
    return torch.full_like(x, _HOMOSCEDASTIC_STD)


def make_regression_1d(
    n: int = 200,
    *,
    gap: bool = True,
    heteroscedastic: bool = True,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset1D:
    r"""Sample a 1-D regression problem with an input gap and input-dependent noise.

    .. math::
        x_i \sim \mathcal{U}(D), \qquad
        y_i = \sin(3 x_i) + 0.3\,x_i + \sigma(x_i)\,\varepsilon_i, \qquad
        \varepsilon_i \sim \mathcal{N}(0, 1),

    with :math:`\sigma` from :func:`regression_1d_noise_std` and :math:`D = [-3, 3]`, or
    :math:`D = [-3, -0.5) \cup (0.75, 3]` when ``gap=True``: no input falls in the closed gap
    :data:`REGRESSION_1D_GAP`, where a good posterior should show growing epistemic uncertainty.
    The draws are made in float64 and then cast, so ``dtype`` changes only the rounding.

    Args:
        n: Number of points.
        gap: Leave the interval ``[-0.5, 0.75]`` without inputs.
        heteroscedastic: Noise scale that grows with ``x`` (else constant 0.2).
        seed: Seed of a fresh generator; ignored when ``generator`` is given.
        generator: Source of randomness to use instead of ``seed``; a CPU generator.
        dtype: Floating-point dtype of the returned tensors.

    Returns:
        :class:`Dataset1D` ``(x, y, noise_std)`` with shapes ``(n, 1)``, ``(n,)``, ``(n,)``, in
        random (unsorted) order.

    Example:
        >>> x, y, noise_std = make_regression_1d(100, seed=1)
        >>> x.shape, y.shape, noise_std.shape
        (torch.Size([100, 1]), torch.Size([100]), torch.Size([100]))
    """
    n = _check_count("n", n, 1)
    dtype = _check_dtype(dtype)
    gen = _make_generator(seed, generator)
    low, high = REGRESSION_1D_DOMAIN
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    if gap:
        gap_low, gap_high = REGRESSION_1D_GAP
        left = gap_low - low
        # u * total lies in [0, total); the left part maps onto [low, gap_low) and the right part,
        # reflected, onto (gap_high, high], so both ends of the gap stay empty.
        t = u * (left + high - gap_high)
        x = torch.where(t < left, low + t, high - (t - left))
    else:
        x = low + (high - low) * u
    std = regression_1d_noise_std(x, heteroscedastic=heteroscedastic)
    y = regression_1d_mean(x) + std * torch.randn(n, generator=gen, dtype=torch.float64)
    return Dataset1D(x.unsqueeze(-1).to(dtype), y.to(dtype), std.to(dtype))


def make_two_moons(
    n: int = 200,
    *,
    noise: float = 0.1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> ClassificationData:
    r"""Sample the two-moons binary classification problem.

    Class 0 lies on the upper half circle :math:`(\cos t, \sin t)` and class 1 on the shifted lower
    half circle :math:`(1 - \cos t, \tfrac12 - \sin t)`, with :math:`t \sim \mathcal{U}[0, \pi]`,
    plus isotropic Gaussian noise of standard deviation ``noise`` on both coordinates. Class 0 gets
    ``n // 2`` points, class 1 the rest; the rows are shuffled.

    Args:
        n: Number of points, at least 2.
        noise: Standard deviation of the Gaussian noise added to each coordinate.
        seed: Seed of a fresh generator; ignored when ``generator`` is given.
        generator: Source of randomness to use instead of ``seed``; a CPU generator.
        dtype: Floating-point dtype of ``x``.

    Returns:
        :class:`ClassificationData` ``(x, y)``: ``x`` of shape ``(n, 2)`` and labels ``y`` of shape
        ``(n,)``, ``torch.int64`` in ``{0, 1}``.

    Example:
        >>> x, y = make_two_moons(50, noise=0.05, seed=3)
        >>> x.shape, y.dtype
        (torch.Size([50, 2]), torch.int64)
    """
    n = _check_count("n", n, 2)
    noise = _check_scale("noise", noise, allow_zero=True)
    dtype = _check_dtype(dtype)
    gen = _make_generator(seed, generator)
    n0 = n // 2
    t = math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    y = (torch.arange(n) >= n0).to(torch.int64)
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=-1)
    x = torch.where(y.unsqueeze(-1) == 0, upper, lower)
    x = x + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    return ClassificationData(x[perm].to(dtype), y[perm])


def make_linear_regression(
    n: int,
    d: int,
    *,
    noise_scale: float = 0.5,
    prior_scale: float = 1.0,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearRegressionData:
    r"""Sample a conjugate Bayesian linear regression problem.

    .. math::
        w \sim \mathcal{N}(0, \alpha^2 I_d), \qquad X_{ij} \sim \mathcal{N}(0, 1), \qquad
        y = X w + \sigma\,\varepsilon, \quad \varepsilon \sim \mathcal{N}(0, I_n),

    with :math:`\alpha` = ``prior_scale`` and :math:`\sigma` = ``noise_scale``. There is no bias
    term. The exact posterior of :math:`w` is :func:`linear_regression_posterior`.

    Args:
        n: Number of observations.
        d: Number of features (weights).
        noise_scale: Observation noise standard deviation :math:`\sigma`, ``>= 0``.
        prior_scale: Prior standard deviation :math:`\alpha` of each weight, ``> 0``.
        seed: Seed of a fresh generator; ignored when ``generator`` is given.
        generator: Source of randomness to use instead of ``seed``; a CPU generator.
        dtype: Floating-point dtype of the returned tensors.

    Returns:
        :class:`LinearRegressionData` ``(X, y, w_true)`` with shapes ``(n, d)``, ``(n,)``, ``(d,)``.

    Example:
        >>> X, y, w = make_linear_regression(20, 3, noise_scale=0.1, seed=0, dtype=torch.float64)
        >>> X.shape, y.shape, w.shape
        (torch.Size([20, 3]), torch.Size([20]), torch.Size([3]))
    """
    n = _check_count("n", n, 1)
    d = _check_count("d", d, 1)
    noise_scale = _check_scale("noise_scale", noise_scale, allow_zero=True)
    prior_scale = _check_scale("prior_scale", prior_scale, allow_zero=False)
    dtype = _check_dtype(dtype)
    gen = _make_generator(seed, generator)
    w = prior_scale * torch.randn(d, generator=gen, dtype=torch.float64)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = X @ w + noise_scale * torch.randn(n, generator=gen, dtype=torch.float64)
    return LinearRegressionData(X.to(dtype), y.to(dtype), w.to(dtype))


def linear_regression_posterior(
    X: Tensor, y: Tensor, *, noise_scale: float, prior_scale: float
) -> MultivariateNormal:
    r"""Exact posterior of the weights of a conjugate Bayesian linear regression.

    For the model of :func:`make_linear_regression`,

    .. math::
        p(w \mid X, y) = \mathcal{N}(m, S), \qquad
        S = \Big(\frac{X^\top X}{\sigma^2} + \frac{I}{\alpha^2}\Big)^{-1}, \qquad
        m = \frac{S X^\top y}{\sigma^2}.

    Computed in the dtype of ``X``; use float64 when comparing against it tightly.

    Args:
        X: Design matrix, shape ``(n, d)``.
        y: Targets, shape ``(n,)``.
        noise_scale: Observation noise standard deviation :math:`\sigma`, ``> 0``.
        prior_scale: Prior standard deviation :math:`\alpha`, ``> 0``.

    Returns:
        The posterior as a ``MultivariateNormal`` over ``d`` weights.
    """
    noise_scale = _check_scale("noise_scale", noise_scale, allow_zero=False)
    prior_scale = _check_scale("prior_scale", prior_scale, allow_zero=False)
    if X.dim() != 2 or y.shape != X.shape[:1]:
        raise ValueError(
            f"Expected X of shape (n, d) and y of shape (n,), got X of shape {tuple(X.shape)} and "
            f"y of shape {tuple(y.shape)}"
        )
    y = y.to(X.dtype)
    d = X.shape[-1]
    eye = torch.eye(d, dtype=X.dtype, device=X.device)
    precision = X.mT @ X / noise_scale**2 + eye / prior_scale**2
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve((X.mT @ y / noise_scale**2).unsqueeze(-1), chol).squeeze(-1)
    cov = torch.cholesky_inverse(chol)
    # Symmetrise: cholesky_inverse is symmetric only up to rounding, and MultivariateNormal
    # re-factorises the covariance.
    return MultivariateNormal(mean, covariance_matrix=(cov + cov.mT) / 2)
