r"""Exact Bayesian linear regression: the closed-form reference for the variational machinery.

Model (no bias term; append a column of ones to ``X`` for one):

.. math::
    w \sim \mathcal N(0, s^2 I_d), \qquad y \mid X, w \sim \mathcal N(Xw, \sigma^2 I_n).

The posterior is Gaussian with precision :math:`A = I/s^2 + X^\top X/\sigma^2` and mean
:math:`m = A^{-1}X^\top y/\sigma^2`; the evidence :math:`p(y\mid X)` is Gaussian too. For any
variational :math:`q`, :math:`\log p(y) - \mathrm{ELBO}(q) = KL(q\,\|\,p(w\mid y))`, which
makes this class the oracle the tests check varlin's ELBO against.

Example:
    >>> blr = BayesianLinearRegression(prior_scale=1.0, noise_scale=0.5).fit(X, y)
    >>> blr.posterior, blr.log_evidence(), blr.predict(X_new)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal, Normal

from . import _validation as V

__all__ = ["BayesianLinearRegression"]


class BayesianLinearRegression:
    """Closed-form posterior, evidence and predictive of Bayesian linear regression.

    Args:
        prior_scale: standard deviation ``s`` of the isotropic Normal prior on the weights (> 0).
        noise_scale: standard deviation ``sigma`` of the Gaussian observation noise (> 0).
    """

    def __init__(self, prior_scale: float = 1.0, noise_scale: float = 1.0) -> None:
        self.prior_scale = V.real("prior_scale", prior_scale, min_value=0.0, strict=True)
        self.noise_scale = V.real("noise_scale", noise_scale, min_value=0.0, strict=True)
        self._X: Tensor | None = None

    def fit(self, X: Tensor, y: Tensor) -> BayesianLinearRegression:
        """Condition on data. ``X``: ``(n, d)`` floating, ``y``: ``(n,)``. Returns ``self``."""
        V.floating_tensor("X", X)
        V.floating_tensor("y", y)
        if X.dim() != 2:
            raise ValueError(f"X must have shape (n, d), got shape {tuple(X.shape)}")
        if y.shape != X.shape[:1]:
            raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {tuple(y.shape)}")
        if y.dtype != X.dtype:
            raise TypeError(f"y has dtype {y.dtype} but X has {X.dtype}; convert one of them")
        V.check_finite("X", X)
        V.check_finite("y", y)
        d = X.shape[1]
        noise_var = self.noise_scale**2
        eye = torch.eye(d, dtype=X.dtype, device=X.device)
        self.precision = eye / self.prior_scale**2 + X.T @ X / noise_var
        self._chol = torch.linalg.cholesky(self.precision)
        rhs = (X.T @ y / noise_var).unsqueeze(-1)
        self.mean = torch.cholesky_solve(rhs, self._chol).squeeze(-1)
        self.covariance = torch.cholesky_inverse(self._chol)
        self._X, self._y = X, y
        return self

    def _require_fit(self) -> tuple[Tensor, Tensor]:
        if self._X is None:
            raise RuntimeError("call fit(X, y) first")
        return self._X, self._y

    @property
    def posterior(self) -> MultivariateNormal:
        """The exact posterior :math:`p(w \\mid X, y)` over the ``d`` weights."""
        self._require_fit()
        return MultivariateNormal(self.mean, precision_matrix=self.precision)

    @property
    def prior(self) -> Normal:
        X, _ = self._require_fit()
        zeros = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
        return Normal(zeros, torch.full_like(zeros, self.prior_scale))

    def log_evidence(self) -> Tensor:
        r"""Exact :math:`\log p(y \mid X)` by the matrix determinant lemma, in ``O(d^3)``.

        .. math::
            -\tfrac n2\log 2\pi\sigma^2 - d\log s - \tfrac12\log|A|
            - \tfrac1{2\sigma^2}\lVert y - Xm\rVert^2 - \tfrac1{2s^2}\lVert m\rVert^2 .

        The quadratic term equals :math:`\lVert y\rVert^2/\sigma^2 - m^\top A m`, but that
        difference of two large numbers cancels catastrophically in float32 when the targets
        are large against the noise; the residual form is a sum of two small non-negative terms.
        """
        X, y = self._require_fit()
        n, d = X.shape
        noise_var = self.noise_scale**2
        half_logdet = torch.log(torch.diagonal(self._chol)).sum()
        resid = y - X @ self.mean
        quad = resid @ resid / noise_var + self.mean @ self.mean / self.prior_scale**2
        return (
            -0.5 * n * math.log(2 * math.pi * noise_var)
            - d * math.log(self.prior_scale)
            - half_logdet
            - 0.5 * quad
        )

    def predict(self, X_new: Tensor) -> Normal:
        """Exact predictive :math:`p(y_* \\mid x_*, X, y)`, observation noise included."""
        self._require_fit()
        V.floating_tensor("X_new", X_new)
        d = self.mean.shape[0]
        if X_new.dim() != 2 or X_new.shape[1] != d:
            raise ValueError(f"X_new must have shape (m, {d}), got {tuple(X_new.shape)}")
        if X_new.dtype != self.mean.dtype:
            raise TypeError(
                f"X_new has dtype {X_new.dtype} but the model was fitted in {self.mean.dtype}; "
                f"convert it with X_new.to({self.mean.dtype})"
            )
        if V.is_validating():
            V.check_finite("X_new", X_new)
        mean = X_new @ self.mean
        var = ((X_new @ self.covariance) * X_new).sum(-1) + self.noise_scale**2
        return Normal(mean, var.sqrt())

    def mean_field_optimum(self) -> Normal:
        r"""The best fully factorised Normal :math:`q`, i.e. the maximiser of the ELBO over them.

        Its mean is the posterior mean and its variances are :math:`1/A_{ii}` — the inverse of
        the precision's diagonal, smaller than the posterior's marginal variances
        :math:`(A^{-1})_{ii}` whenever the weights are correlated: mean-field is over-confident.
        """
        self._require_fit()
        return Normal(self.mean, torch.diagonal(self.precision).rsqrt())

    def expected_log_likelihood(self, q: Distribution) -> Tensor:
        r""":math:`\mathbb E_{q}[\log p(y\mid X, w)]` in closed form for a Gaussian ``q``.

        .. math::
            -\tfrac n2\log 2\pi\sigma^2 - \tfrac1{2\sigma^2}
            \big(\lVert y - X\mu_q\rVert^2 + \operatorname{tr}(X^\top X\,\Sigma_q)\big).
        """
        X, y = self._require_fit()
        mu, cov = _moments(q)
        if mu.shape != X.shape[1:]:
            raise ValueError(
                f"q must be a distribution over the {X.shape[1]} weights, got a "
                f"{type(q).__name__} over {mu.shape[0]}"
            )
        resid = y - X @ mu
        trace = (X.T @ X * cov).sum()
        noise_var = self.noise_scale**2
        n = X.shape[0]
        return (
            -0.5 * n * math.log(2 * math.pi * noise_var) - 0.5 * (resid @ resid + trace) / noise_var
        )

    def elbo(self, q: Distribution) -> Tensor:
        r"""Exact :math:`\mathrm{ELBO}(q) = \mathbb E_q[\log p(y\mid w)] - KL(q\,\|\,p(w))`.

        ``q`` is a :class:`Normal` with batch shape ``(d,)`` (mean-field) or a
        :class:`MultivariateNormal` over ``d``.
        """
        self._require_fit()
        mu, cov = _moments(q)
        prior_cov = torch.eye(mu.shape[0], dtype=mu.dtype, device=mu.device) * self.prior_scale**2
        q_full = MultivariateNormal(mu, covariance_matrix=cov)
        kl = torch.distributions.kl_divergence(
            q_full, MultivariateNormal(torch.zeros_like(mu), covariance_matrix=prior_cov)
        )
        return self.expected_log_likelihood(q) - kl


def _moments(q: Distribution) -> tuple[Tensor, Tensor]:
    """Mean vector and full covariance of a mean-field or full Gaussian over ``d`` weights."""
    if isinstance(q, MultivariateNormal):
        return q.loc, q.covariance_matrix
    if isinstance(q, Normal):
        loc = q.loc.reshape(-1)
        return loc, torch.diag(q.scale.reshape(-1) ** 2)
    raise TypeError(f"q must be a Normal or MultivariateNormal, got {type(q).__name__}")
