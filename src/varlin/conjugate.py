r"""Exact Bayesian linear regression: the closed-form reference for the variational machinery,
with its prior and noise chosen by maximising the evidence (empirical Bayes).

Model, for each of the ``k`` output columns independently:

.. math::
    w \sim \mathcal N\big(0, \operatorname{diag}(\lambda)^{-1}\big), \qquad
    y \mid X, w \sim \mathcal N(b + Xw, \alpha^{-1} I_n),

with prior precision :math:`\lambda = 1/s^2` (one per output, or one per feature and output
with ``ard=True``) and noise precision :math:`\alpha = 1/\sigma^2`. Without an intercept
(``fit_intercept=False``, the default, :math:`b = 0`) append a column of ones to ``X`` for a
penalised bias. With ``fit_intercept=True`` the intercept is unpenalised (a flat prior) and
handled as scikit-learn's ``BayesianRidge`` does: ``X`` and ``y`` are centred, the weights are
fitted on the centred data and :math:`b = \bar y - \bar x^\top m`; the intercept is then
treated as known (its own posterior variance :math:`\sigma^2/n` is not in the predictive).

The posterior is Gaussian with precision :math:`A = \operatorname{diag}(\lambda) + \alpha
X^\top X` and mean :math:`m = \alpha A^{-1}X^\top y`; the evidence :math:`p(y\mid X)` is
Gaussian too. For any variational :math:`q`, :math:`\log p(y) - \mathrm{ELBO}(q) =
KL(q\,\|\,p(w\mid y))`, which makes this class the oracle the tests check varlin's ELBO against.

Evidence maximisation (``optimize=True``) runs MacKay's fixed-point updates (MacKay 1992,
*Bayesian interpolation*; per feature, MacKay 1994 and Tipping 2001, *Sparse Bayesian learning
and the relevance vector machine*), with :math:`\gamma = \sum_i (1 - \lambda_i\Sigma_{ii})`
the number of well-determined weights:

.. math::
    \lambda \leftarrow \frac{\gamma + 2a_\lambda}{\lVert m\rVert^2 + 2b_\lambda}, \qquad
    \lambda_i \leftarrow \frac{1 - \lambda_i\Sigma_{ii} + 2a_\lambda}{m_i^2 + 2b_\lambda}
    \ \text{(ARD)}, \qquad
    \alpha \leftarrow \frac{n - \gamma + 2a_\alpha}{\lVert y - Xm\rVert^2 + 2b_\alpha}.

Their fixed point is a stationary point of :math:`\log p(y\mid X, \alpha, \lambda) + \sum_\tau
(a_\tau\log\tau - b_\tau\tau)` over the precisions :math:`\tau`, i.e. the evidence times
Gamma(:math:`a, b`) hyper-priors on the log-precisions; the defaults :math:`a = b = 10^{-6}`
are nearly flat and the same as scikit-learn's ``BayesianRidge`` and ``ARDRegression``, whose
starting point (pass ``noise_scale = y.std()``, ``prior_scale = 1``) and stopping rule (the
posterior mean moves by less than ``tol`` in L1 norm) are also the same, so that both give the
same answer.

Numerics (float32 and float64): the posterior is computed from the Cholesky factor of
:math:`B = I + \alpha D X^\top X D` with :math:`D = \operatorname{diag}(\lambda)^{-1/2}`, whose
eigenvalues are all at least 1, and the evidence from residuals, never as a difference of
large quadratic forms (see :meth:`BayesianLinearRegression.log_evidence`).

Example:
    >>> blr = BayesianLinearRegression(prior_scale=1.0, noise_scale=0.5).fit(X, y)
    >>> blr.posterior, blr.log_evidence(), blr.predict(X_new)
    >>> tuned = BayesianLinearRegression(fit_intercept=True, optimize=True).fit(X, y)
    >>> tuned.noise_precision, tuned.prior_precision  # alpha and lambda
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, MultivariateNormal, Normal

from . import _validation as V

__all__ = ["BayesianLinearRegression", "ExactLinear", "GAMMA_HYPERPRIOR"]

#: Default Gamma(shape, rate) hyper-prior of both precisions: nearly flat, as scikit-learn's.
GAMMA_HYPERPRIOR = (1e-6, 1e-6)


class _Posterior(NamedTuple):
    """The Gaussian posterior of every output at given precisions (batched over outputs)."""

    mean: Tensor  # (k, d)
    covariance: Tensor  # (k, d, d); rows and columns of pruned weights are 0
    precision: Tensor  # (k, d, d); the same
    half_logdet_b: Tensor  # (k,): 1/2 log|I + alpha D X^T X D|


def _gaussian_posterior(
    gram: Tensor, xty: Tensor, alpha: Tensor, lam: Tensor, keep: Tensor
) -> _Posterior:
    r"""Posterior of ``k`` independent outputs sharing the Gram matrix ``X^T X``.

    ``gram`` (d, d), ``xty`` (d, k), ``alpha`` (k,), ``lam`` (k, d), ``keep`` (k, d) bool (a
    pruned weight is exactly 0). With :math:`D = \operatorname{diag}(\lambda)^{-1/2}`,
    :math:`A = D^{-1} B D^{-1}`, :math:`B = I + \alpha D X^\top X D`: ``B``'s eigenvalues are
    all >= 1, so its Cholesky factor exists in float32 whatever the precisions' range.
    """
    d = gram.shape[0]
    scale = torch.where(keep, lam.rsqrt(), torch.zeros_like(lam))
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    # A pruned weight's row and column of B are those of the identity: it drops out.
    b = alpha[:, None, None] * scale[:, :, None] * gram * scale[:, None, :] + eye
    chol = torch.linalg.cholesky(b)
    covariance = scale[:, :, None] * torch.cholesky_inverse(chol) * scale[:, None, :]
    mean = alpha[:, None] * (covariance @ xty.T.unsqueeze(-1)).squeeze(-1)
    mask = (keep[:, :, None] & keep[:, None, :]).to(gram.dtype)
    precision = (torch.diag_embed(torch.where(keep, lam, 0.0)) + alpha[:, None, None] * gram) * mask
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return _Posterior(mean, covariance, precision, half_logdet)


def _gamma_prior(name: str, value: Any) -> tuple[float, float]:
    rule = f"{name} must be a pair (shape, rate) of finite numbers >= 0"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{rule}, got {V.describe(value)}")
    pair = []
    for part in value:
        if isinstance(part, bool) or not isinstance(part, numbers.Real):
            raise TypeError(f"{rule}, got {V.describe(value)}")
        number = float(part)
        if not (math.isfinite(number) and number >= 0.0):
            raise ValueError(f"{rule}, got {V.describe(value)}")
        pair.append(number)
    return pair[0], pair[1]


class BayesianLinearRegression:
    r"""Closed-form posterior, evidence and predictive of Bayesian linear regression.

    Args:
        prior_scale: standard deviation ``s`` of the isotropic Normal prior on the weights
            (> 0); with ``optimize=True``, where the evidence maximisation starts.
        noise_scale: standard deviation ``sigma`` of the Gaussian observation noise (> 0); with
            ``optimize=True``, where the evidence maximisation starts (scikit-learn starts at
            ``y.std()``).
        fit_intercept: add an unpenalised intercept, fitted by centring ``X`` and ``y`` (see
            the module docstring).
        optimize: choose the prior and noise precisions by maximising the log evidence
            (MacKay's fixed-point updates, one pair per output column).
        ard: one prior precision per feature (automatic relevance determination); needs
            ``optimize=True``.
        max_iter: most fixed-point iterations (>= 1).
        tol: stop when the posterior mean of every output moved by less than ``tol`` in L1
            norm during one iteration (> 0).
        noise_precision_prior: Gamma ``(shape, rate)`` hyper-prior on the noise precision
            :math:`\alpha`, both >= 0; default :data:`GAMMA_HYPERPRIOR`.
        weight_precision_prior: the same for the prior precision(s) :math:`\lambda`.
        prune_threshold: with ``ard=True``, fix a weight at exactly 0 once its precision
            exceeds this (> 0), as scikit-learn's ``ARDRegression`` (``threshold_lambda=1e4``);
            ``None`` (default) never prunes. A pruned weight has zero rows in ``covariance``
            and ``precision``, and the posterior over all ``d`` weights is then degenerate.

    Attributes (after :meth:`fit`; ``k`` outputs, the leading ``k`` absent for a 1-D ``y``):
        mean: posterior mean of the weights, ``(k, d)``.
        covariance, precision: ``(k, d, d)``.
        intercept: ``(k,)`` (zeros without ``fit_intercept``).
        noise_precision: :math:`\alpha = 1/\sigma^2`, ``(k,)``.
        prior_precision: :math:`\lambda = 1/s^2`, ``(k,)``, or ``(k, d)`` with ``ard=True``.
        n_iter: fixed-point iterations run (0 without ``optimize``).
        converged: whether every output met ``tol`` within ``max_iter`` (``True`` without
            ``optimize``).
    """

    def __init__(
        self,
        prior_scale: float = 1.0,
        noise_scale: float = 1.0,
        *,
        fit_intercept: bool = False,
        optimize: bool = False,
        ard: bool = False,
        max_iter: int = 300,
        tol: float = 1e-3,
        noise_precision_prior: tuple[float, float] = GAMMA_HYPERPRIOR,
        weight_precision_prior: tuple[float, float] = GAMMA_HYPERPRIOR,
        prune_threshold: float | None = None,
    ) -> None:
        self.prior_scale = V.real("prior_scale", prior_scale, min_value=0.0, strict=True)
        self.noise_scale = V.real("noise_scale", noise_scale, min_value=0.0, strict=True)
        self.fit_intercept = V.boolean("fit_intercept", fit_intercept)
        self.optimize = V.boolean("optimize", optimize)
        self.ard = V.boolean("ard", ard)
        if self.ard and not self.optimize:
            raise ValueError(
                "ard=True needs optimize=True: the per-feature prior precisions are chosen by "
                "maximising the evidence"
            )
        self.max_iter = V.positive_int("max_iter", max_iter)
        self.tol = V.real("tol", tol, min_value=0.0, strict=True)
        self.noise_precision_prior = _gamma_prior("noise_precision_prior", noise_precision_prior)
        self.weight_precision_prior = _gamma_prior("weight_precision_prior", weight_precision_prior)
        self.prune_threshold: float | None = None
        if prune_threshold is not None:
            if not self.ard:
                raise ValueError("prune_threshold applies to ard=True only; drop one of them")
            self.prune_threshold = V.real(
                "prune_threshold", prune_threshold, min_value=0.0, strict=True
            )
        self._X: Tensor | None = None

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Tensor, y: Tensor) -> BayesianLinearRegression:
        """Condition on data (choosing the precisions first if ``optimize``). Returns ``self``.

        Shape:
            ``X``: ``(n, d)`` floating; ``y``: ``(n,)`` or ``(n, k)`` for ``k`` outputs, same
            dtype.
        """
        V.floating_tensor("X", X)
        V.floating_tensor("y", y)
        if X.dim() != 2:
            raise ValueError(f"X must have shape (n, d), got shape {tuple(X.shape)}")
        n, d = X.shape
        if y.dim() not in (1, 2) or y.shape[0] != n or (y.dim() == 2 and y.shape[1] == 0):
            raise ValueError(
                f"y must have shape ({n},) to match X, got {tuple(y.shape)} (or ({n}, k) for "
                "k >= 1 outputs)"
            )
        if y.dtype != X.dtype:
            raise TypeError(f"y has dtype {y.dtype} but X has {X.dtype}; convert one of them")
        V.check_finite("X", X)
        V.check_finite("y", y)
        if self.optimize and n < 2:
            raise ValueError(
                "X must have at least 2 rows to choose the prior and noise by the evidence "
                f"(optimize=True), got {n}"
            )
        Y = y if y.dim() == 2 else y.unsqueeze(-1)
        k = Y.shape[1]
        if self.fit_intercept:
            x_offset, y_offset = X.mean(0), Y.mean(0)
        else:
            x_offset, y_offset = X.new_zeros(d), Y.new_zeros(k)
        Xc, Yc = X - x_offset, Y - y_offset
        alpha = Y.new_full((k,), 1.0 / self.noise_scale**2)
        lam = Y.new_full((k, d), 1.0 / self.prior_scale**2)
        keep = torch.ones(k, d, dtype=torch.bool, device=X.device)
        self.n_iter, self.converged = 0, True
        if self.optimize:
            if self.ard:
                alpha, lam, keep = self._maximise_evidence_ard(Xc, Yc, alpha, lam, keep)
            else:
                alpha, lam = self._maximise_evidence(Xc, Yc, alpha, lam)
        gram, xty = Xc.T @ Xc, Xc.T @ Yc
        post = _gaussian_posterior(gram, xty, alpha, lam, keep)

        one = y.dim() == 1  # a 1-D y gives unbatched results, as before multi-output existed
        self._post, self._keep, self._alpha, self._lam = post, keep, alpha, lam
        self._x_offset, self._y_offset = x_offset, y_offset
        self.mean = post.mean[0] if one else post.mean
        self.covariance = post.covariance[0] if one else post.covariance
        self.precision = post.precision[0] if one else post.precision
        intercept = y_offset - post.mean @ x_offset
        self.intercept = intercept[0] if one else intercept
        self.noise_precision = alpha[0] if one else alpha
        prior_precision = lam if self.ard else lam[:, 0]
        self.prior_precision = prior_precision[0] if one else prior_precision
        self._X, self._y = Xc, (Yc[:, 0] if one else Yc)
        return self

    def _maximise_evidence(
        self, X: Tensor, Y: Tensor, alpha: Tensor, lam: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""MacKay's updates with one prior precision per output, in the SVD basis of ``X``.

        With :math:`X = U S V^\top` and :math:`c = U^\top y`, the posterior mean is
        :math:`m = V z`, :math:`z_i = s_i c_i / (s_i^2 + \lambda/\alpha)`, so that
        :math:`\lVert m\rVert^2 = \lVert z\rVert^2` and the residual splits into two sums of
        squares, :math:`\lVert y - Xm\rVert^2 = \lVert y - Uc\rVert^2 + \sum_i
        \big(c_i\,(\lambda/\alpha) / (s_i^2 + \lambda/\alpha)\big)^2`: after one SVD, each
        iteration costs O(d k), not O(n d k), and nothing cancels. The iterations run in float64
        NumPy, one output at a time (:meth:`_fixed_point`), whatever the data's dtype and
        device: a dozen operations on vectors of length ``r``, where the fixed cost of a tensor
        operation would be most of the fit.
        """
        n = X.shape[0]
        u, s_t, vh_t = torch.linalg.svd(X, full_matrices=False)
        c_t = u.T @ Y  # (r, k)
        outside_t = (Y - u @ c_t).square().sum(0)  # the part of y no weight can fit

        def host(t: Tensor) -> np.ndarray:  # a copy: a float64 CPU tensor would share memory
            return t.detach().to("cpu", torch.float64).numpy().copy()

        s, v, c, outside = host(s_t), host(vh_t).T.copy(), host(c_t), host(outside_t)
        alpha_np, lam1 = host(alpha), host(lam[:, 0])
        steps, converged = [], []
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for j in range(c.shape[1]):  # each output is its own fit
                alpha_np[j], lam1[j], step, done = self._fixed_point(
                    s, v, c[:, j], outside[j], alpha_np[j], lam1[j], n
                )
                steps.append(step)
                converged.append(done)
        self.n_iter = max(steps)
        self.converged = all(converged)
        alpha = torch.as_tensor(alpha_np).to(alpha)
        lam1_t = torch.as_tensor(lam1).to(lam)
        self._check_finite_precisions(alpha, lam1_t)
        return alpha, lam1_t[:, None].expand_as(lam).clone()

    def _fixed_point(
        self,
        s: np.ndarray,
        v: np.ndarray,
        c: np.ndarray,
        outside: np.floating[Any],
        alpha: np.floating[Any],
        lam: np.floating[Any],
        n: int,
    ) -> tuple[np.floating[Any], np.floating[Any], int, bool]:
        """MacKay's updates for one output: ``(alpha, lambda, iterations, converged)``.

        ``s`` (r,), ``v`` (d, r) and ``c`` (r,) in float64; the precisions are NumPy scalars
        (a division by 0 gives inf, caught by the caller, not an exception).
        """
        (a_noise, b_noise), (a_w, b_w) = self.noise_precision_prior, self.weight_precision_prior
        eig, sc = s * s, s * c
        previous: np.ndarray | None = None
        for step in range(self.max_iter):
            ratio = lam / alpha
            inverse = 1.0 / (eig + ratio)
            z = sc * inverse
            coef = v @ z  # the convergence test is on the posterior mean itself
            fitted = c * inverse
            sse = outside + ratio * ratio * (fitted @ fitted)
            gamma = eig @ inverse
            lam = (gamma + 2 * a_w) / (z @ z + 2 * b_w)
            alpha = (n - gamma + 2 * a_noise) / (sse + 2 * b_noise)
            # "not >=": a NaN step stops too (the caller then refuses non-finite precisions).
            if previous is not None and not np.abs(coef - previous).sum() >= self.tol:
                return alpha, lam, step + 1, True
            previous = coef
        return alpha, lam, self.max_iter, False

    def _maximise_evidence_ard(
        self, X: Tensor, Y: Tensor, alpha: Tensor, lam: Tensor, keep: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """MacKay's updates with one prior precision per feature and output (ARD)."""
        n = X.shape[0]
        (a_noise, b_noise), (a_w, b_w) = self.noise_precision_prior, self.weight_precision_prior
        gram, xty = X.T @ X, X.T @ Y
        active = torch.ones_like(alpha, dtype=torch.bool)
        previous: Tensor | None = None
        for step in range(self.max_iter):
            post = _gaussian_posterior(gram, xty, alpha, lam, keep)
            coef = post.mean  # (k, d)
            sse = (Y - X @ coef.T).square().sum(0)
            gamma = torch.where(keep, 1 - lam * torch.diagonal(post.covariance, 0, -2, -1), 0.0)
            new_lam = torch.where(keep, (gamma + 2 * a_w) / (coef.square() + 2 * b_w), lam)
            new_alpha = (n - gamma.sum(-1) + 2 * a_noise) / (sse + 2 * b_noise)
            new_keep = keep
            if self.prune_threshold is not None:
                new_keep = keep & (new_lam < self.prune_threshold)
                coef = torch.where(new_keep, coef, 0.0)
            lam = torch.where(active[:, None], new_lam, lam)
            alpha = torch.where(active, new_alpha, alpha)
            keep = torch.where(active[:, None], new_keep, keep)
            if previous is not None:
                active = active & ((coef - previous).abs().sum(-1) >= self.tol)
            previous = coef
            # An output whose every weight is pruned has nothing left to fit.
            active = active & keep.any(-1)
            self.n_iter = step + 1
            if not bool(active.any()):
                break
        self.converged = not bool(active.any())
        self._check_finite_precisions(alpha, lam)
        return alpha, lam, keep

    @staticmethod
    def _check_finite_precisions(alpha: Tensor, lam: Tensor) -> None:
        for name, value in (("noise precision", alpha), ("prior precision", lam)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"optimize=True found no finite maximum of the evidence (the {name} "
                    "diverged: the targets are fitted exactly, or X carries no signal); use "
                    "positive Gamma rates in noise_precision_prior and weight_precision_prior"
                )

    def _require_fit(self) -> tuple[Tensor, Tensor]:
        if self._X is None:
            raise RuntimeError("call fit(X, y) first")
        return self._X, self._y

    def _require_unpruned(self, what: str) -> None:
        if not bool(self._keep.all()):
            pruned = (~self._keep).nonzero()[:, -1].unique().tolist()
            raise ValueError(
                f"{what} is degenerate: weights {pruned} were pruned (prune_threshold="
                f"{self.prune_threshold:g}) and are exactly 0; use mean, covariance and "
                "predict, or prune_threshold=None"
            )

    def _require_one_output(self, what: str) -> tuple[Tensor, Tensor]:
        X, y = self._require_fit()
        if y.dim() != 1:
            raise ValueError(
                f"{what} is defined for one output, but y has {y.shape[1]} columns; fit one "
                "model per column (with a 1-D y)"
            )
        self._require_unpruned(what)
        return X, y

    # -- distributions --------------------------------------------------------------------------
    @property
    def posterior(self) -> MultivariateNormal:
        """The exact posterior :math:`p(w \\mid X, y)` over the ``d`` weights (batch ``(k,)``)."""
        self._require_fit()
        self._require_unpruned("the posterior")
        return MultivariateNormal(self.mean, precision_matrix=self.precision)

    @property
    def prior(self) -> Normal:
        """The prior over the weights, ``(d,)`` (or ``(k, d)``)."""
        self._require_fit()
        lam = self._lam if self._y.dim() == 2 else self._lam[0]
        return Normal(torch.zeros_like(lam), lam.rsqrt())

    def log_evidence(self) -> Tensor:
        r"""Exact :math:`\log p(y \mid X)` at the fitted precisions, per output (0-dim or ``(k,)``).

        .. math::
            -\tfrac n2\log 2\pi + \tfrac n2\log\alpha - \tfrac12\log|B|
            - \tfrac\alpha2\lVert y - Xm\rVert^2 - \tfrac12\textstyle\sum_i\lambda_i m_i^2,
            \qquad B = I + \alpha D X^\top X D,\ D = \operatorname{diag}(\lambda)^{-1/2},

        which is the usual :math:`-\tfrac n2\log 2\pi\sigma^2 - d\log s - \tfrac12\log|A| -
        \tfrac1{2\sigma^2}\lVert y - Xm\rVert^2 - \tfrac1{2s^2}\lVert m\rVert^2` (matrix
        determinant lemma). The quadratic terms equal :math:`\alpha\lVert y\rVert^2 - m^\top A
        m`, but that difference of two large numbers cancels catastrophically in float32 when
        the targets are large against the noise; the residual form is a sum of two small
        non-negative terms. With ``fit_intercept``, the evidence of the centred data.
        """
        X, y = self._require_fit()
        n = X.shape[0]
        Y = y if y.dim() == 2 else y.unsqueeze(-1)
        post, alpha = self._post, self._alpha
        resid = Y - X @ post.mean.T
        penalty = (torch.where(self._keep, self._lam, 0.0) * post.mean.square()).sum(-1)
        value = (
            0.5 * n * (torch.log(alpha) - math.log(2 * math.pi))
            - post.half_logdet_b
            - 0.5 * (alpha * resid.square().sum(0) + penalty)
        )
        return value if y.dim() == 2 else value[0]

    def predict(self, X_new: Tensor) -> Normal:
        """Exact predictive :math:`p(y_* \\mid x_*, X, y)`, observation noise included.

        Shape:
            ``X_new``: ``(m, d)``; the result has batch shape ``(m,)`` (or ``(m, k)``).
        """
        self._require_fit()
        V.floating_tensor("X_new", X_new)
        d = self._x_offset.shape[0]
        if X_new.dim() != 2 or X_new.shape[1] != d:
            raise ValueError(f"X_new must have shape (m, {d}), got {tuple(X_new.shape)}")
        if X_new.dtype != self._x_offset.dtype:
            raise TypeError(
                f"X_new has dtype {X_new.dtype} but the model was fitted in "
                f"{self._x_offset.dtype}; convert it with X_new.to({self._x_offset.dtype})"
            )
        if V.is_validating():
            V.check_finite("X_new", X_new)
        Xc = X_new - self._x_offset
        mean = Xc @ self._post.mean.T + self._y_offset
        epistemic = torch.einsum("md,kde,me->mk", Xc, self._post.covariance, Xc)
        var = epistemic + 1.0 / self._alpha
        if self._y.dim() == 1:
            mean, var = mean[:, 0], var[:, 0]
        return Normal(mean, var.sqrt())

    def mean_field_optimum(self) -> Normal:
        r"""The best fully factorised Normal :math:`q`, i.e. the maximiser of the ELBO over them.

        Its mean is the posterior mean and its variances are :math:`1/A_{ii}` — the inverse of
        the precision's diagonal, smaller than the posterior's marginal variances
        :math:`(A^{-1})_{ii}` whenever the weights are correlated: mean-field is over-confident.
        Batch shape ``(d,)`` (or ``(k, d)``).
        """
        self._require_fit()
        self._require_unpruned("the mean-field optimum")
        return Normal(self.mean, torch.diagonal(self.precision, 0, -2, -1).rsqrt())

    def expected_log_likelihood(self, q: Distribution) -> Tensor:
        r""":math:`\mathbb E_{q}[\log p(y\mid X, w)]` in closed form for a Gaussian ``q``.

        .. math::
            -\tfrac n2\log 2\pi\sigma^2 - \tfrac1{2\sigma^2}
            \big(\lVert y - X\mu_q\rVert^2 + \operatorname{tr}(X^\top X\,\Sigma_q)\big).

        One output only (a 1-D ``y``).
        """
        X, y = self._require_one_output("the expected log-likelihood")
        mu, cov = _moments(q, X.shape[1])
        resid = y - X @ mu
        trace = (X.T @ X * cov).sum()
        alpha = self._alpha[0]
        n = X.shape[0]
        return 0.5 * n * torch.log(alpha / (2 * math.pi)) - 0.5 * alpha * (resid @ resid + trace)

    def elbo(self, q: Distribution) -> Tensor:
        r"""Exact :math:`\mathrm{ELBO}(q) = \mathbb E_q[\log p(y\mid w)] - KL(q\,\|\,p(w))`.

        ``q`` is a :class:`Normal` with batch shape ``(d,)`` (mean-field) or a
        :class:`MultivariateNormal` over ``d``. One output only (a 1-D ``y``).
        """
        X, _ = self._require_one_output("the ELBO")
        mu, cov = _moments(q, X.shape[1])
        prior_cov = torch.diag(self._lam[0].reciprocal()).to(mu.dtype)
        q_full = MultivariateNormal(mu, covariance_matrix=cov)
        kl = torch.distributions.kl_divergence(
            q_full, MultivariateNormal(torch.zeros_like(mu), covariance_matrix=prior_cov)
        )
        return self.expected_log_likelihood(q) - kl


def _moments(q: Distribution, d: int) -> tuple[Tensor, Tensor]:
    """Mean vector and full covariance of a mean-field or full Gaussian over ``d`` weights."""
    if isinstance(q, MultivariateNormal):
        loc, cov = q.loc, q.covariance_matrix
    elif isinstance(q, Normal):
        loc = q.loc.reshape(-1)
        cov = torch.diag(q.scale.reshape(-1) ** 2)
    else:
        raise TypeError(f"q must be a Normal or MultivariateNormal, got {type(q).__name__}")
    if loc.shape != (d,):
        raise ValueError(
            f"q must be a distribution over the {d} weights, got a {type(q).__name__} over "
            f"{loc.shape[-1] if loc.dim() else 1}"
        )
    return loc, cov


#: The keyword arguments of BayesianLinearRegression that ExactLinear passes on.
_REGRESSION_OPTIONS = set(inspect.signature(BayesianLinearRegression).parameters) - {"noise_scale"}


class ExactLinear(nn.Module):
    r"""A linear layer whose weights carry the exact posterior of Bayesian linear regression.

    The head of an exact Bayesian last layer (``bayesian_last_layer(..., method="exact")``):
    :meth:`fit` conditions it, in closed form and in one pass, on features ``h`` and targets
    ``y`` with a :class:`BayesianLinearRegression` (by default with an unpenalised intercept
    and the prior and noise precisions chosen by maximising the evidence, one pair per output).
    Its ``forward`` returns the posterior mean :math:`h m + b`; :meth:`output_moments` the exact
    distribution of the output given ``h``,
    :math:`\mathcal N\big(h m + b,\ (h - \bar h)^\top\Sigma(h - \bar h)\big)`, which
    :func:`varlin.predict` uses, adding the fitted noise variance (or the given likelihood's).

    Unlike a :class:`~varlin.VariationalLinear` it has no parameters: its posterior is a set of
    buffers (in ``state_dict``), and :func:`varlin.fit` does not train it.

    Args:
        in_features: width of the features.
        out_features: number of outputs (independent regressions sharing the features).
        noise_scale: where the evidence maximisation starts for the noise; ``None`` (default)
            starts at the standard deviation of the targets, as scikit-learn's ``BayesianRidge``.
        device, dtype: of the buffers, as for :class:`torch.nn.Linear`.
        **regression_kwargs: for :class:`BayesianLinearRegression`; here ``fit_intercept`` and
            ``optimize`` default to ``True``.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    weight_mean: Tensor
    weight_covariance: Tensor
    bias: Tensor
    feature_offset: Tensor
    noise_variance: Tensor
    prior_precision: Tensor
    log_evidence: Tensor
    fitted: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        noise_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **regression_kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_features = V.positive_int("in_features", in_features)
        self.out_features = V.positive_int("out_features", out_features)
        unknown = set(regression_kwargs) - _REGRESSION_OPTIONS
        V.unknown_kwargs(type(self).__name__, dict.fromkeys(unknown))
        regression_kwargs.setdefault("fit_intercept", True)
        regression_kwargs.setdefault("optimize", True)
        if noise_scale is not None:
            regression_kwargs["noise_scale"] = noise_scale
        BayesianLinearRegression(**regression_kwargs)  # checks every argument now, not at fit
        self.regression_kwargs = regression_kwargs
        self.regression: BayesianLinearRegression | None = None
        dtype = V.floating_dtype("dtype", dtype) or torch.get_default_dtype()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        d, k = self.in_features, self.out_features
        self.register_buffer("weight_mean", torch.zeros(d, k, **factory))
        self.register_buffer("weight_covariance", torch.zeros(k, d, d, **factory))
        self.register_buffer("bias", torch.zeros(k, **factory))
        self.register_buffer("feature_offset", torch.zeros(d, **factory))
        self.register_buffer("noise_variance", torch.ones(k, **factory))
        self.register_buffer("prior_precision", torch.ones(k, d, **factory))
        self.register_buffer("log_evidence", torch.zeros(k, **factory))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))

    @property
    def w_loc(self) -> Tensor:
        """The posterior mean of the weights, ``(in_features, out_features)`` (as a layer's)."""
        return self.weight_mean

    @property
    def noise_scale(self) -> Tensor:
        """The fitted noise standard deviation per output, ``(out_features,)``."""
        return self.noise_variance.sqrt()

    @torch.no_grad()
    def fit(self, h: Tensor, y: Tensor) -> ExactLinear:
        """Condition on features ``h`` ``(n, in_features)`` and targets ``y`` (``(n,)`` for one
        output, or ``(n, out_features)``), in closed form. Returns ``self``."""
        V.floating_tensor("features", h)
        V.floating_tensor("y", y)
        if h.dim() != 2:
            raise ValueError(f"features must have shape (n, in_features), got {tuple(h.shape)}")
        V.last_dim("features", h, self.in_features, "in_features")
        V.same_dtype("features", h, self.weight_mean)
        k, n = self.out_features, h.shape[0]
        if not (y.shape == (n, k) or (k == 1 and y.shape == (n,))):
            one = f"({n},) or " if k == 1 else ""
            raise ValueError(
                f"y must have shape {one}({n}, {k}) to match the {n} feature rows and "
                f"out_features={k}, got {tuple(y.shape)}"
            )
        if y.dtype != h.dtype:
            raise TypeError(
                f"y has dtype {y.dtype} but the features are {h.dtype}; convert y with "
                f"y.to({h.dtype})"
            )
        Y = y.reshape(n, k)
        kwargs = dict(self.regression_kwargs)
        if "noise_scale" not in kwargs:
            spread = float(Y.std(correction=0)) if n > 1 else 1.0
            kwargs["noise_scale"] = spread if spread > 0 else 1.0
        blr = BayesianLinearRegression(**kwargs).fit(h, Y)
        self.weight_mean.copy_(blr.mean.T)
        self.weight_covariance.copy_(blr.covariance)
        self.bias.copy_(blr.intercept)
        self.feature_offset.copy_(blr._x_offset)
        self.noise_variance.copy_(blr.noise_precision.reciprocal())
        self.prior_precision.copy_(blr._lam)
        self.log_evidence.copy_(blr.log_evidence())
        self.fitted.fill_(True)
        self.regression = blr
        return self

    def _check_input(self, h: Tensor) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                "this ExactLinear head is not fitted yet: call fit(features, y), or "
                "model.fit_head(x, y) on a Bayesian last layer"
            )
        V.floating_tensor("x", h)
        V.last_dim("x", h, self.in_features, "in_features")
        V.same_dtype("x", h, self.weight_mean)

    def forward(self, h: Tensor) -> Tensor:
        """The posterior mean of the output, :math:`h m + b`."""
        self._check_input(h)
        return h @ self.weight_mean + self.bias

    def output_moments(self, h: Tensor) -> Normal:
        """The exact distribution of the output for fixed features ``h``, per example (no
        observation noise): the epistemic part of the predictive."""
        self._check_input(h)
        centred = h - self.feature_offset
        var = torch.einsum("...d,kde,...e->...k", centred, self.weight_covariance, centred)
        scale = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        return Normal(h @ self.weight_mean + self.bias, scale, validate_args=False)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.regression_kwargs.items()))
        return f"in_features={self.in_features}, out_features={self.out_features}, {options}"
