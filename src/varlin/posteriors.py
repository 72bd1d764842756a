r"""Variational families: modules that own the parameters and *return* torch distributions.

A posterior module is called with no argument and returns a
:class:`torch.distributions.Distribution` built from its current parameters (GPyTorch's
``_VariationalDistribution`` design). Layers, the KL and prediction work on those distribution
values, and on the few questions below that only the family can answer.

Every family of a linear map :math:`y = xW + b` (weights ``(in_features, out_features)``) is a
:class:`Family`:

============== ============================================== =====================================
family         covariance of the weights (and bias)            estimators
============== ============================================== =====================================
meanfield      :math:`\operatorname{diag}(\sigma^2)`           reparameterization, local, flipout
lowrank        :math:`\operatorname{diag}(\sigma^2) + VV^\top` reparameterization, local
matrix_normal  :math:`U \otimes V` (row and column factors)     reparameterization, local
full           :math:`LL^\top` (one Cholesky factor)           reparameterization, local
radial         non-Gaussian (Farquhar et al. 2020)             reparameterization, flipout
============== ============================================== =====================================

The joint families treat the bias as one more row of the weight matrix,
:math:`\tilde W = [W; b]` of shape ``(in_features + 1, out_features)`` with :math:`\tilde x =
[x, 1]`, so they capture weight–bias correlations. The mean-field family keeps the weight and the
bias in two :class:`MeanFieldNormal` modules (independent, so nothing is lost), which is the layout
of every checkpoint written before the other families existed.

A layer asks its family, once per step, for the constrained tensors of the step
(:meth:`Family.realise`: softplus scales, Cholesky factors; shared by the sample and the KL), and
then for what it needs: a sampled output for an estimator (:meth:`Family.sample_output`), the
exact output distribution (:meth:`Family.output_distribution`), weight samples, the marginals of
every weight and the difference between the entropy of the marginals and the joint entropy
(:meth:`Family.entropy_gap`), from which the KL to any elementwise prior follows:

.. math::
    KL(q\,\|\,p) = \sum_i KL(q_i\,\|\,p_i) + \Big(\sum_i H(q_i) - H(q)\Big),

exact for a factorised prior :math:`p = \prod_i p_i` (the bracket, the *total correlation*, is 0
for mean-field and never needs a dense covariance).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from . import _validation as V
from . import functional
from .distributions import MatrixNormal as _MatrixNormalDistribution
from .distributions import Radial as _RadialDistribution
from .distributions import radial_direction, radial_entropy_constant
from .functional import inverse_softplus, positive_scale

__all__ = [
    "Family",
    "MeanFieldNormal",
    "LowRankNormal",
    "MatrixNormal",
    "FullNormal",
    "Radial",
    "FAMILIES",
    "FULL_MAX_ENTRIES",
    "build",
]

#: Largest covariance (entries of the ``D x D`` Cholesky factor) ``posterior="full"`` accepts:
#: 2**24 entries, 64 MiB in float32 (``D = 4096`` weights and biases).
FULL_MAX_ENTRIES = 1 << 24


def _check_init_scale(init_scale: Any) -> float:
    return V.real("init_scale", init_scale, min_value=0.0, strict=True)


def _fill_softplus(raw: Tensor, value: float | Tensor) -> None:
    """Set ``raw`` so that ``softplus(raw) == value`` (inverted in float64, rounded once)."""
    target = torch.as_tensor(value, dtype=torch.float64, device=raw.device)
    with torch.no_grad():
        raw.copy_(inverse_softplus(target).expand(raw.shape))


class Family(nn.Module):
    r"""A variational posterior over the weights ``W (in, out)`` and bias ``b (out,)`` of a
    linear map ``y = x @ W + b``.

    Subclasses own their parameters and answer the questions below; layers never look inside.
    Each method that computes from the parameters takes ``t``, the value of
    :meth:`realise` for the current step, so that the constrained tensors are computed once.

    Attributes:
        name: the family's name for ``posterior=`` (``"lowrank"``, ...).
        estimators: the gradient estimators valid for this family.
        gaussian: whether :math:`q` is Gaussian (then every output ``x @ W + b`` is Gaussian
            and the marginals are Normal).
    """

    name: ClassVar[str] = ""
    estimators: ClassVar[tuple[str, ...]] = ()
    #: Whether the outputs of ``x @ W + b`` are uncorrelated for a fixed ``x`` (the weight
    #: columns and the bias entries are): moment propagation then keeps variances only.
    independent_outputs: ClassVar[bool] = False
    gaussian: ClassVar[bool] = True

    # -- shape --------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def weight_loc(self) -> Tensor:
        """The mean of ``W``, ``(in, out)`` (a view of a parameter: ``copy_`` sets it)."""
        raise NotImplementedError

    def bias_loc_of(self, bias: MeanFieldNormal | None) -> Tensor | None:
        """The mean of ``b`` (a view of a parameter), or ``None`` without a bias."""
        raise NotImplementedError

    def check_estimator(self, estimator: str) -> str:
        """``estimator`` if it is valid for this family, else a ``ValueError`` naming both."""
        if estimator not in self.estimators:
            valid = ", ".join(repr(e) for e in self.estimators)
            raise ValueError(
                f"estimator={estimator!r} is not valid with posterior={self.name!r}; the valid "
                f"estimators for {self.name!r} are {valid}"
            )
        return estimator

    # -- per-step values ----------------------------------------------------------------------
    def realise(self, bias: MeanFieldNormal | None = None) -> Any:
        """The constrained tensors of one step (scales, factors), shared by sample and KL.

        ``bias`` is an independent mean-field bias factor, only for a family that does not
        model the bias itself (the mean-field family).
        """
        raise NotImplementedError

    def marginals(self, t: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(w_loc, w_std, b_loc, b_std)``: the mean and standard deviation of every weight
        and bias."""
        raise NotImplementedError

    def entropy(self, t: Any) -> Tensor:
        """The joint entropy :math:`H(q)` of weights and bias (0-dim)."""
        raise NotImplementedError

    def entropy_gap(self, t: Any) -> Tensor | None:
        r""":math:`\sum_i H(\mathcal N(m_i, v_i)) - H(q)`, :math:`m_i, v_i` the marginal moments.

        For a Gaussian ``q`` it is the total correlation (``>= 0``, 0 for mean-field, returned
        as ``None`` then). Added to the marginal KLs it gives :math:`KL(q\|p)` for a factorised
        prior; for a non-Gaussian ``q`` it does so for a Normal prior (whose cross-entropy
        depends only on the first two moments).
        """
        raise NotImplementedError

    def normal_kl_split(self, t: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        r"""``(w_loc, w_ref, b_loc, b_ref)`` such that, against a Normal prior
        :math:`\mathcal N(m, \operatorname{diag} s^2)`,
        :math:`KL(q\|p) = \sum_i KL(\mathcal N(\mu_i, r_i^2)\|\mathcal N(m_i, s_i^2))` +
        :meth:`normal_kl_rest`. By default the marginals (and the rest is the entropy gap); a
        family whose covariance has a diagonal part may name that part instead and put the rest
        in closed form (the low-rank family does, to skip per-weight work).
        """
        return self.marginals(t)

    def normal_kl_rest(
        self, t: Any, w_prior_scale: Tensor, b_prior_scale: Tensor | None
    ) -> Tensor | None:
        """The part of the KL to a Normal prior that :meth:`normal_kl_split` leaves out."""
        return self.entropy_gap(t)

    def distribution(self, t: Any) -> Distribution:
        """The joint distribution of the weights and bias."""
        raise NotImplementedError

    def dense(self, t: Any) -> tuple[Tensor, Tensor]:
        """``(mean, covariance)`` of ``theta = [W.reshape(-1), b]``: dense, for small layers."""
        raise NotImplementedError

    def rsample_weights(
        self,
        t: Any,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Reparameterized draws ``(W, b)`` of shapes ``(*sample_shape, in, out)`` and
        ``(*sample_shape, out)``."""
        raise NotImplementedError

    def mean_output(self, x: Tensor, bias: MeanFieldNormal | None = None) -> Tensor:
        """``x @ W_loc + b_loc``: the posterior-mean map, bit-identical to that expression."""
        return functional.mean_linear(x, self.weight_loc, self.bias_loc_of(bias))

    def output_distribution(self, x: Tensor, t: Any) -> Distribution:
        """The exact distribution of ``x @ W + b`` per example, for fixed ``x``.

        A :class:`~torch.distributions.Normal` of shape ``(*, out)`` where the outputs of an
        example are independent (or ``out == 1``), else a (low-rank) multivariate Normal over
        the ``out`` outputs of each example.
        """
        raise ValueError(
            f"posterior={self.name!r} has no closed-form output distribution (its outputs are "
            "not Gaussian); use Monte Carlo (estimator 'reparameterization' or 'flipout')"
        )

    def sample_output(
        self,
        x: Tensor,
        t: Any,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        """One stochastic output ``(*, out)`` drawn by ``estimator``.

        With ``num_weight_samples=S``, ``x`` leads with a dimension of ``S`` and every slice
        gets its own posterior sample (see :func:`varlin.layers.weight_samples`).
        """
        raise NotImplementedError

    # -- moment propagation -------------------------------------------------------------------
    def output_moments_random(
        self, mean: Tensor, spread: Tensor | None, t: Any, *, covariance: str = "diagonal"
    ) -> tuple[Tensor, Tensor]:
        r"""The exact mean and (co)variance of ``y = x @ W + b`` for a *random* input ``x``
        independent of the weights.

        With :math:`m = E[x]`, :math:`C = \operatorname{Cov}(x)`, :math:`\tilde m = [m, 1]` and
        :math:`M` the mean of ``W``, by the laws of total expectation and covariance,

        .. math::
            E[y] = \tilde m\tilde M,\qquad
            \operatorname{Cov}(y) = \underbrace{\operatorname{Cov}_W(y \mid x = m)}_{
            \text{output distribution at } m}
            + T(C) + M^\top C M,\qquad
            T(C)_{jk} = \sum_{il} C_{il}\operatorname{Cov}(W_{ij}, W_{lk}),

        which needs only the first two moments of ``x`` and of ``q``. ``T`` is the family's
        (:meth:`_weight_trace`); for a diagonal :math:`C = \operatorname{diag}(v)` the output
        variance is :math:`\operatorname{Var}_W(y_j \mid x = m) + \sum_i v_i(s_{ij}^2 +
        M_{ij}^2)`, :math:`s_{ij}` the marginal standard deviations, for every family.

        Args:
            mean: :math:`E[x]`, ``(*, in)``.
            spread: the variances ``(*, in)`` (the entries of ``x`` uncorrelated; under
                ``covariance="diagonal"`` taken so), the covariance ``(*, in, in)``
                (``covariance="full"`` only), or ``None`` for a fixed input ``x = mean``.
            t: the value of :meth:`realise`.
            covariance: ``"diagonal"`` returns the output variances ``(*, out)``; ``"full"``
                the output covariance ``(*, out, out)``.

        Returns:
            ``(E[y], Var[y] or Cov(y))``.
        """
        full = covariance == "full"
        out_mean, fixed = self._fixed_output_moments(mean, t, full=full)
        if spread is None:
            return out_mean, fixed
        w_loc, w_std, _, _ = self.marginals(t)
        if not full:
            return out_mean, fixed + spread @ (w_std.square() + w_loc.square())
        if spread.dim() == mean.dim():  # variances: C = diag(v), without forming it
            carried = (w_loc * spread.unsqueeze(-1)).mT @ w_loc
            if self.independent_outputs:  # uncorrelated columns: T(diag v) = diag(v @ s^2)
                trace = torch.diag_embed(spread @ w_std.square())
            else:
                trace = self._weight_trace_diagonal(spread, t)
            return out_mean, fixed + trace + carried
        return out_mean, fixed + self._weight_trace(spread, t) + w_loc.mT @ spread @ w_loc

    def _fixed_output_moments(self, x: Tensor, t: Any, *, full: bool) -> tuple[Tensor, Tensor]:
        """Mean and variance ``(*, out)`` (or covariance ``(*, out, out)``) of ``x @ W + b`` for
        a fixed ``x``; by default from :meth:`output_distribution`."""
        dist = self.output_distribution(x, t)
        if not full:
            return dist.mean, dist.variance
        if isinstance(dist, Normal):
            return dist.mean, torch.diag_embed(dist.variance)
        return dist.mean, dist.covariance_matrix  # type: ignore[attr-defined]

    def _weight_trace_diagonal(self, var: Tensor, t: Any) -> Tensor:
        """:meth:`_weight_trace` of ``C = diag(var)``, ``var`` ``(*, in)``."""
        return self._weight_trace(torch.diag_embed(var), t)

    def _weight_trace(self, cov: Tensor, t: Any) -> Tensor:
        r""":math:`T(C)_{jk} = \sum_{il} C_{il}\operatorname{Cov}(W_{ij}, W_{lk})` for input
        covariances ``C`` ``(*, in, in)``, ``(*, out, out)``: the family's weight correlations
        met by the input's (see :meth:`output_moments_random`)."""
        raise NotImplementedError(
            f"posterior={self.name!r} does not propagate a full input covariance"
        )

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None) -> None:
        """Re-initialise the spread so that every weight (bias) has standard deviation
        ``w_scale`` (``b_scale``), correlations starting at or near 0 (MOPED, ``init_scale``)."""
        raise ValueError(
            f"posterior={self.name!r} cannot set one scale per weight; initialise it with a "
            "number init_scale instead"
        )


# -- mean-field ---------------------------------------------------------------------------------
class _MeanFieldTensors(NamedTuple):
    loc: Tensor
    scale: Tensor
    b_loc: Tensor | None
    b_scale: Tensor | None


class MeanFieldNormal(Family):
    r"""Fully factorised Normal :math:`q(\theta) = \prod_i \mathcal N(\theta_i;\mu_i,\sigma_i^2)`.

    The scale is stored unconstrained as ``raw_scale`` and exposed as
    :math:`\sigma = \operatorname{softplus}(\rho)`, so no optimiser step can make it negative.

    A module over one tensor of any shape. As the family of a linear layer, it covers the
    weights ``(in, out)`` and takes the bias's own :class:`MeanFieldNormal` as the independent
    factor ``bias`` of :meth:`realise`; its estimators are the fused functions of
    :mod:`varlin.functional`.

    Args:
        shape: shape of the random tensor, e.g. ``(in_features, out_features)``.
        init_scale: initial :math:`\sigma` of every entry (> 0).
        device, dtype: factory keyword arguments, as for :class:`torch.nn.Linear`.

    Attributes:
        loc: the mean :math:`\mu`, a parameter of ``shape``.
        raw_scale: :math:`\rho` with :math:`\sigma = \operatorname{softplus}(\rho)`.

    Example:
        >>> q = MeanFieldNormal((3, 2), init_scale=0.1)
        >>> q().rsample().shape
        torch.Size([3, 2])
    """

    name = "meanfield"
    estimators = tuple(functional.ESTIMATORS)
    independent_outputs = True

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        init_scale: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init_scale = _check_init_scale(init_scale)
        V.floating_dtype("dtype", dtype)
        factory = {"device": device, "dtype": dtype}
        self.loc = nn.Parameter(torch.zeros(shape, **factory))  # type: ignore[arg-type]
        self.raw_scale = nn.Parameter(torch.empty(shape, **factory))  # type: ignore[arg-type]
        self.reset_scale()

    @property
    def scale(self) -> Tensor:
        """The standard deviation :math:`\\sigma = \\operatorname{softplus}(\\rho)`, never 0.

        Floored at the dtype's smallest normal number (:func:`~varlin.functional.positive_scale`).
        """
        return positive_scale(self.raw_scale)

    def reset_scale(self, init_scale: float | None = None) -> None:
        """Set every scale to ``init_scale`` (default: the constructor's)."""
        if init_scale is not None:
            self.init_scale = _check_init_scale(init_scale)
        V.survives_cast("init_scale", self.init_scale, self.raw_scale.dtype)
        with torch.no_grad():
            value = torch.tensor(self.init_scale, dtype=torch.float64)
            self.raw_scale.fill_(float(inverse_softplus(value)))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``-style mean init (uniform in ±1/sqrt(fan_in)) and the initial scale."""
        fan_in = self.loc.shape[0]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.loc.uniform_(-bound, bound, generator=generator)
        self.reset_scale()

    def forward(self) -> Normal:
        """The distribution :math:`q` at the current parameters."""
        return Normal(self.loc, self.scale, validate_args=False)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.loc.shape)}, init_scale={self.init_scale:g}"

    # -- as the family of a linear layer ------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.loc.shape[0]

    @property
    def out_features(self) -> int:
        return self.loc.shape[-1]

    @property
    def weight_loc(self) -> Tensor:
        return self.loc

    def bias_loc_of(self, bias: MeanFieldNormal | None) -> Tensor | None:
        return None if bias is None else bias.loc

    def realise(self, bias: MeanFieldNormal | None = None) -> _MeanFieldTensors:
        b_scale = None if bias is None else positive_scale(bias.raw_scale)
        return _MeanFieldTensors(
            self.loc, positive_scale(self.raw_scale), None if bias is None else bias.loc, b_scale
        )

    def marginals(
        self, t: _MeanFieldTensors
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        return t.loc, t.scale, t.b_loc, t.b_scale

    def entropy(self, t: _MeanFieldTensors) -> Tensor:
        h = _normal_entropy(t.scale)
        return h if t.b_scale is None else h + _normal_entropy(t.b_scale)

    def entropy_gap(self, t: _MeanFieldTensors) -> None:
        return None

    def distribution(self, t: _MeanFieldTensors) -> Distribution:
        loc, scale = _flat(t.loc, t.b_loc), _flat(t.scale, t.b_scale)
        return Independent(Normal(loc, scale, validate_args=False), 1)

    def dense(self, t: _MeanFieldTensors) -> tuple[Tensor, Tensor]:
        return _flat(t.loc, t.b_loc), torch.diag(_flat(t.scale, t.b_scale).square())

    def rsample_weights(
        self,
        t: _MeanFieldTensors,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        w = t.loc + t.scale * _randn((*sample_shape, *t.loc.shape), t.loc, generator)
        if t.b_loc is None or t.b_scale is None:
            return w, None
        return w, t.b_loc + t.b_scale * _randn((*sample_shape, *t.b_loc.shape), t.loc, generator)

    def output_distribution(self, x: Tensor, t: _MeanFieldTensors) -> Normal:
        r""":math:`\mathcal N(x\mu_W + \mu_b,\; x^2\sigma_W^2 + \sigma_b^2)`, per example."""
        mean = functional.mean_linear(x, t.loc, t.b_loc)
        w_scale = t.scale
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            # x**2 and scale**2 leave float16's range: the variance path stays in full precision.
            with torch.autocast(x.device.type, enabled=False):
                xf = x.to(w_scale.dtype)
                var = (xf * xf) @ w_scale.square()
        else:
            var = (x * x) @ w_scale.square()
        if t.b_scale is not None:
            var = var + t.b_scale.square()
        return Normal(mean, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(), validate_args=False)

    def sample_output(
        self,
        x: Tensor,
        t: _MeanFieldTensors,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        estimate = functional.ESTIMATORS[self.check_estimator(estimator)]
        return estimate(
            x,
            t.loc,
            t.scale,
            t.b_loc,
            t.b_scale,
            generator=generator,
            num_weight_samples=num_weight_samples,
        )

    def _fixed_output_moments(
        self, x: Tensor, t: _MeanFieldTensors, *, full: bool
    ) -> tuple[Tensor, Tensor]:
        # The variance of output_distribution without its square root (moments need var).
        var = (x * x) @ t.scale.square()
        if t.b_scale is not None:
            var = var + t.b_scale.square()
        mean = functional.mean_linear(x, t.loc, t.b_loc)
        return mean, (torch.diag_embed(var) if full else var)

    def _weight_trace(self, cov: Tensor, t: _MeanFieldTensors) -> Tensor:
        return _uncorrelated_trace(cov, t.scale)

    def set_scale(self, scale: Tensor) -> None:
        """Set every entry's standard deviation (a tensor of ``shape``; inverted in float64)."""
        with torch.no_grad():
            self.raw_scale.copy_(inverse_softplus(scale.to(torch.float64)))

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None) -> None:
        self.set_scale(w_scale)


def _flat(w: Tensor, b: Tensor | None) -> Tensor:
    """``[W.reshape(-1), b]``: the weights row by row, then the bias."""
    flat = w.reshape(-1)
    return flat if b is None else torch.cat([flat, b])


def _normal_entropy(scale: Tensor) -> Tensor:
    return torch.log(scale).sum() + 0.5 * scale.numel() * (1.0 + math.log(2 * math.pi))


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return functional._normal(shape, generator, like)


def _uncorrelated_trace(cov: Tensor, w_std: Tensor) -> Tensor:
    r""":math:`T(C)` of :meth:`Family._weight_trace` for weights that are uncorrelated with
    each other (mean-field, radial): :math:`\operatorname{diag}(\operatorname{diag}(C)\,s^2)`."""
    return torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1) @ w_std.square())


# -- the joint families -------------------------------------------------------------------------
class _Joint(Family):
    r"""Shared parts of the families over the augmented weights :math:`\tilde W = [W; b]`.

    ``loc`` is ``(rows, out)`` with ``rows = in + 1`` when there is a bias (its last row).
    Subclasses add the spread: ``reset_scale``, ``realise`` and the methods that use it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        init_scale: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._in = V.positive_int("in_features", in_features)
        self._out = V.positive_int("out_features", out_features)
        self.bias = V.boolean("bias", bias)
        self.init_scale = _check_init_scale(init_scale)
        V.floating_dtype("dtype", dtype)
        self._factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.loc = nn.Parameter(torch.zeros(self.rows, self._out, **self._factory))
        self._init_spread(**options)
        self.reset_scale()

    def _init_spread(self) -> None:
        """Create the parameters of the spread (values are set by ``reset_scale``)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def rows(self) -> int:
        """Rows of the augmented weights: ``in_features`` plus one for the bias."""
        return self._in + int(self.bias)

    @property
    def num_weights(self) -> int:
        """``D``: the number of random weights and biases."""
        return self.rows * self._out

    @property
    def weight_loc(self) -> Tensor:
        return self.loc[: self._in]

    def bias_loc_of(self, bias: MeanFieldNormal | None) -> Tensor | None:
        return self.loc[self._in] if self.bias else None

    def _no_bias_factor(self, bias: MeanFieldNormal | None) -> None:
        if bias is not None:
            raise ValueError(
                f"posterior={self.name!r} models the bias as a row of its weights; it takes no "
                "separate bias factor"
            )

    def _split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(W, b)`` from augmented ``(..., rows, out)`` (views).

        One ``split`` rather than two indexing ops: its backward concatenates the two gradients
        (one copy), where each index op's backward would fill a zero tensor of the full size.
        """
        if not self.bias:
            return w, None
        head, last = w.split([self._in, 1], dim=-2)
        return head, last.squeeze(-2)

    def _aug(self, x: Tensor, m: Tensor) -> Tensor:
        r""":math:`\tilde x\,M` for augmented ``M (rows, k)``, without concatenating 1 to ``x``."""
        w, b = self._split(m)
        return functional.mean_linear(x, w, b)

    def reset_scale(self, init_scale: float | None = None, generator: Any = None) -> None:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Means as ``nn.Linear`` (U(±1/sqrt(in)) for weights, then bias); the initial spread."""
        bound = 1.0 / math.sqrt(self._in)
        with torch.no_grad():
            self.loc[: self._in].uniform_(-bound, bound, generator=generator)
            if self.bias:
                self.loc[self._in].uniform_(-bound, bound, generator=generator)
        self.reset_scale(generator=generator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self._in}, out_features={self._out}, bias={self.bias}, "
            f"init_scale={self.init_scale:g}"
        )

    # -- generic parts ------------------------------------------------------------------------
    def _noise(self, t: Any, lead: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """A reparameterized draw of :math:`\\tilde W - \\tilde M`, ``(*lead, rows, out)``."""
        raise NotImplementedError

    def _output_noise(
        self, rows: Tensor, t: Any, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        """A draw of ``y - E[y]`` for inputs ``rows`` (local estimator), ``(*lead, *rows, out)``."""
        raise NotImplementedError

    def marginals(self, t: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        var = self._marginal_variance(t)
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        w_loc, b_loc = self._split(t.loc)
        w_std, b_std = self._split(std)
        return w_loc, w_std, b_loc, b_std

    def _marginal_variance(self, t: Any) -> Tensor:
        raise NotImplementedError

    def rsample_weights(
        self,
        t: Any,
        sample_shape: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        return self._split(t.loc + self._noise(t, tuple(sample_shape), generator))

    def sample_output(
        self,
        x: Tensor,
        t: Any,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        self.check_estimator(estimator)
        if estimator == "local":
            # Independent noise per example, so sample slices need nothing special; the parts
            # that do not depend on the noise are computed once for a repeated batch.
            rows = functional._shared_rows(x, t.loc)
            lead = tuple(x.shape[: x.dim() - rows.dim()])
            return self._aug(rows, t.loc) + self._output_noise(rows, t, lead, generator)
        if estimator == "flipout":
            return self._flipout(x, t, generator, num_weight_samples)
        if num_weight_samples is None:
            w, b = self.rsample_weights(t, (), generator)
            return functional.mean_linear(x, w, b)
        s = functional._check_sample_dim(x, num_weight_samples)
        w, b = self.rsample_weights(t, (s,), generator)
        y = torch.bmm(x.reshape(s, -1, self._in), w)
        if b is not None:
            y = y + b.unsqueeze(1)
        return y.reshape(*x.shape[:-1], self._out)

    def _flipout(
        self, x: Tensor, t: Any, generator: torch.Generator | None, num_weight_samples: int | None
    ) -> Tensor:
        raise NotImplementedError

    def _scaled_sample_output(self, x: Tensor, parts: tuple[Any, ...], eps: Tensor) -> Tensor:
        r"""``x @ W + b`` for :math:`\tilde W = \tilde M + S\odot\varepsilon`, one sample.

        ``parts`` is ``(w_loc, w_scale, b_loc, b_scale)`` (already split, so that their backward
        concatenates once); the weight part goes through the mean-field estimator's lean
        ``loc + scale * eps`` and one ``addmm``, as fast as a mean-field layer.
        """
        w_loc, w_scale, b_loc, b_scale = parts
        eps_w, eps_b = self._split(eps)
        w = functional._shift_scaled(w_loc, w_scale, eps_w)
        b = None if b_loc is None or eps_b is None else torch.addcmul(b_loc, b_scale, eps_b)
        return functional._affine(x, w, b)

    def entropy(self, t: Any) -> Tensor:
        d = self.num_weights
        return 0.5 * self._log_det(t) + 0.5 * d * (1.0 + math.log(2 * math.pi))

    def _log_det(self, t: Any) -> Tensor:
        raise NotImplementedError

    def dense(self, t: Any) -> tuple[Tensor, Tensor]:
        dist = self.distribution(t)
        return t.loc.reshape(-1), dist.covariance_matrix  # type: ignore[attr-defined]

    def _single_output(self, mean: Tensor, var: Tensor) -> Normal:
        return Normal(mean, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(), validate_args=False)


#: ``c`` of the low-rank family's diagonal floor ``c |a_i| |b_j|`` (see ``LowRankNormal.realise``):
#: factor-to-diagonal variance ratios stay below ``c**-2 = 65536``, resolvable in float32.
LOWRANK_DIAGONAL_FLOOR = 2.0**-8


class _LowRankTensors(NamedTuple):
    loc: Tensor
    scale: Tensor  # the diagonal part's standard deviation
    row_factor: Tensor
    col_factor: Tensor
    parts: tuple[Tensor, Tensor, Tensor | None, Tensor | None]  # w_loc, w_scale, b_loc, b_scale


class LowRankNormal(_Joint):
    r"""Low-rank plus diagonal Normal over the weights and bias of a linear map.

    .. math::
        \operatorname{Cov}(\theta) = \operatorname{diag}(\sigma^2) + VV^\top,\qquad
        V_{:,k} = \operatorname{vec}(a_k b_k^\top),

    over :math:`\theta = \operatorname{vec}([W; b])`: a sample is
    :math:`\tilde W = \tilde M + \sigma\odot E + A\operatorname{diag}(z)B^\top` with
    :math:`E, z` standard normal, ``A`` (``rows x k``, ``row_factor``) and ``B``
    (``out x k``, ``col_factor``). Each of the ``k`` directions of correlation is a rank-one
    matrix, so the family costs ``(rows + out) k`` parameters and the local estimator ``k`` extra
    narrow products (:math:`\tilde x A`), not ``k`` copies of the weights. With one output
    (``out = 1``, a Bayesian linear model) ``V`` is an arbitrary ``rows x k`` matrix, and
    ``k = rows - 1`` or more covers every covariance.

    KL and entropy need no dense covariance: :math:`\log|\Sigma| = \sum\log\sigma^2 +
    \log|I_k + V^\top\operatorname{diag}(\sigma^{-2})V|` (the matrix determinant lemma). The
    diagonal is :math:`\sigma_{ij} = \operatorname{softplus}(\rho_{ij}) +
    2^{-8}\lVert a_i\rVert\lVert b_j\rVert` (see :meth:`realise`).

    Args:
        in_features, out_features: the linear map's shape.
        rank: ``k >= 1`` (at most the number of weights and biases).
        bias: whether the map has a bias (one more row of the augmented weights).
        init_scale: initial standard deviation of every weight (half its variance from
            :math:`\sigma`, half from the random factors, in expectation).
    """

    name = "lowrank"
    estimators = ("reparameterization", "local")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 1,
        bias: bool = True,
        init_scale: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias=bias, init_scale=init_scale, device=device,
            dtype=dtype, rank=rank,
        )  # fmt: skip

    def _init_spread(self, rank: Any = 1) -> None:
        self.rank = check_rank(rank, self.num_weights, self._in, self._out)
        self.raw_scale = nn.Parameter(torch.empty(self.rows, self._out, **self._factory))
        self.row_factor = nn.Parameter(torch.empty(self.rows, self.rank, **self._factory))
        self.col_factor = nn.Parameter(torch.empty(self._out, self.rank, **self._factory))

    def reset_scale(
        self, init_scale: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Diagonal ``softplus(raw_scale) = init_scale / sqrt(2)``; factors with i.i.d. Normal
        entries whose contribution ``sum_k A_ik^2 B_jk^2`` has expectation ``init_scale**2 / 2``
        (so each weight's variance is about ``init_scale**2``; the diagonal's floor term adds
        at most 2^-8 of the factors' scale).

        The factors start random, not at 0: at :math:`V = 0` the gradient with respect to
        :math:`V` vanishes (a saddle point).
        """
        if init_scale is not None:
            self.init_scale = _check_init_scale(init_scale)
        V.survives_cast("init_scale", self.init_scale, self.raw_scale.dtype)
        _fill_softplus(self.raw_scale, self.init_scale / math.sqrt(2.0))
        entry = (self.init_scale**2 / (2 * self.rank)) ** 0.25
        with torch.no_grad():
            self.row_factor.normal_(0.0, entry, generator=generator)
            self.col_factor.normal_(0.0, entry, generator=generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"

    def realise(self, bias: MeanFieldNormal | None = None) -> _LowRankTensors:
        r"""The diagonal scales :math:`\sigma_{ij} = \operatorname{softplus}(\rho_{ij}) +
        c\,\lVert a_i\rVert\,\lVert b_j\rVert`, :math:`c` = :data:`LOWRANK_DIAGONAL_FLOOR`.

        Where the factors explain a weight's variance, nothing holds its diagonal scale up and
        it can decay towards 0; :math:`V^\top\operatorname{diag}(\sigma^{-2})V` then spans more
        orders of magnitude than the dtype resolves and its log-determinant is lost. The second
        term keeps every ratio :math:`(VV^\top)_{ii}/\sigma_i^2 \le c^{-2}` (Cauchy-Schwarz:
        :math:`\sum_k A_{ik}^2B_{jk}^2 \le \lVert a_i\rVert^2\lVert b_j\rVert^2`), costs
        one fused ``addr`` (its backward: two matrix-vector products) and is the same in every
        dtype, so ``.double()`` does not change the distribution.
        """
        self._no_bias_factor(bias)
        floor = LOWRANK_DIAGONAL_FLOOR
        row_norm = torch.linalg.vector_norm(self.row_factor, dim=-1)
        col_norm = torch.linalg.vector_norm(self.col_factor, dim=-1)
        scale = torch.addr(positive_scale(self.raw_scale), row_norm, col_norm, alpha=floor)
        (w_loc, b_loc), (w_scale, b_scale) = self._split(self.loc), self._split(scale)
        parts = (w_loc, w_scale, b_loc, b_scale)
        return _LowRankTensors(self.loc, scale, self.row_factor, self.col_factor, parts)

    @staticmethod
    def _factor_variance(t: _LowRankTensors) -> Tensor:
        r""":math:`(VV^\top)_{ii} = \sum_k A_{ik}^2 B_{jk}^2`, ``(rows, out)``."""
        return t.row_factor.square() @ t.col_factor.square().T

    def _marginal_variance(self, t: _LowRankTensors) -> Tensor:
        # float32 for float16/bfloat16 layers: scales of ~1e-2 square to float16's subnormals.
        return _wide(t.scale).square() + _wide(self._factor_variance(t))

    def _gram(self, t: _LowRankTensors) -> Tensor:
        r""":math:`V^\top\operatorname{diag}(\sigma^{-2})V`, ``(k, k)``.

        :math:`\sum_i A_{ik}A_{il}\sum_j \sigma_{ij}^{-2}B_{jk}B_{jl}`: one ``rows x out``
        product with the ``k(k+1)/2`` distinct column pairs of ``B`` (the matrix is symmetric),
        no dense covariance.
        """
        a, b, scale, k = t.row_factor, t.col_factor, t.scale, self.rank
        if scale.dtype in (torch.float16, torch.bfloat16):
            # sigma^-2 leaves float16's range below sigma = 4e-3, and eigvalsh takes neither.
            a, b, scale = a.float(), b.float(), scale.float()
        first, second = torch.triu_indices(k, k, device=b.device)
        inner = scale.pow(-2) @ (b[:, first] * b[:, second])  # (rows, k(k+1)/2)
        upper = (a[:, first] * a[:, second] * inner).sum(0)
        gram = torch.zeros(k, k, dtype=upper.dtype, device=upper.device)
        gram = gram.index_put((first, second), upper)
        return gram.index_put((second, first), upper)

    def _capacitance(self, t: _LowRankTensors) -> Tensor:
        r""":math:`I_k + V^\top\operatorname{diag}(\sigma^{-2})V`, ``(k, k)``."""
        gram = self._gram(t)
        return gram + torch.eye(self.rank, dtype=gram.dtype, device=gram.device)

    def _log_det_capacitance(self, t: _LowRankTensors) -> Tensor:
        r""":math:`\log|I + V^\top D^{-1}V|` from the eigenvalues of the ``k x k`` Gram matrix.

        Eigenvalues rather than a Cholesky factor: rounding can leave the computed Gram matrix
        slightly indefinite when its eigenvalues span many orders of magnitude, which a Cholesky
        factorisation refuses; the eigenvalues, clamped at their true lower bound 0, stay exact
        to rounding (and the gradient of a function of the eigenvalues alone is stable even for
        repeated ones).
        """
        return torch.log1p(torch.linalg.eigvalsh(self._gram(t)).clamp_min(0)).sum()

    def _log_det(self, t: _LowRankTensors) -> Tensor:
        return 2 * torch.log(t.scale).sum() + self._log_det_capacitance(t)

    def entropy_gap(self, t: _LowRankTensors) -> Tensor:
        # sum_i log(v_i / sigma_i^2) - log|I + V^T D^-1 V|, halved: log1p keeps the small
        # correlations of early training from cancelling.
        ratio = _wide(self._factor_variance(t)) / _wide(t.scale).square()
        return 0.5 * torch.log1p(ratio).sum() - 0.5 * self._log_det_capacitance(t)

    def _dense_factor(self, t: _LowRankTensors) -> Tensor:
        return (t.row_factor.unsqueeze(1) * t.col_factor.unsqueeze(0)).reshape(-1, self.rank)

    def dense(self, t: _LowRankTensors) -> tuple[Tensor, Tensor]:
        # Formed directly: torch's LowRankMultivariateNormal factorises the capacitance, which
        # rounding can make indefinite when a diagonal scale has collapsed (a legitimate optimum
        # where the factors carry that weight's variance).
        factor = self._dense_factor(t)
        cov = torch.diag(t.scale.square().reshape(-1)) + factor @ factor.T
        return t.loc.reshape(-1), cov

    def distribution(self, t: _LowRankTensors) -> LowRankMultivariateNormal:
        """:class:`~torch.distributions.LowRankMultivariateNormal` over ``vec([W; b])``."""
        return LowRankMultivariateNormal(
            t.loc.reshape(-1), self._dense_factor(t), t.scale.square().reshape(-1),
            validate_args=False,
        )  # fmt: skip

    def _noise(
        self, t: _LowRankTensors, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        eps = _randn((*lead, self.rows, self._out), t.loc, generator)
        z = _randn((*lead, 1, self.rank), t.loc, generator)
        return t.scale * eps + (t.row_factor * z) @ t.col_factor.T

    def sample_output(
        self,
        x: Tensor,
        t: _LowRankTensors,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        r"""As every joint family; the weight sample's low-rank part never reaches weight space.

        ``x W`` for :math:`W = M + \sigma\odot E + A\operatorname{diag}(z)B^\top` is
        :math:`x(M + \sigma\odot E) + ((\tilde xA)\odot z)B^\top`: the factor part costs two
        narrow products instead of a weight-sized matrix and its backward.
        """
        if estimator == "local":
            # The diagonal part exactly as the mean-field local estimator (its lean std
            # backward), the factor part through k narrow products.
            w_loc, w_scale, b_loc, b_scale = t.parts
            rows = functional._shared_rows(x, w_loc)
            lead = tuple(x.shape[: x.dim() - rows.dim()])
            mean = functional._affine(rows, w_loc, b_loc)
            std = functional._local_std(rows, w_scale, b_scale)
            proj = self._aug(rows, t.row_factor)
            eps = _randn((*lead, *mean.shape), t.loc, generator)
            z = _randn((*lead, *proj.shape), t.loc, generator)
            return torch.addcmul(mean, std, eps) + (proj * z) @ t.col_factor.T
        if estimator != "reparameterization" or num_weight_samples is not None:
            return super().sample_output(
                x, t, estimator, generator=generator, num_weight_samples=num_weight_samples
            )
        eps = _randn((self.rows, self._out), t.loc, generator)
        z = _randn((self.rank,), t.loc, generator)
        y = self._scaled_sample_output(x, t.parts, eps)
        return y + (self._aug(x, t.row_factor) * z) @ t.col_factor.T

    def normal_kl_split(
        self, t: _LowRankTensors
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The diagonal part's scales: the factors enter through :meth:`normal_kl_rest`."""
        return t.parts

    def normal_kl_rest(
        self, t: _LowRankTensors, w_prior_scale: Tensor, b_prior_scale: Tensor | None
    ) -> Tensor:
        r""":math:`\tfrac12\sum_i (VV^\top)_{ii}/s_i^2 - \tfrac12\log|I + V^\top D^{-1}V|`.

        With the mean-field KL of :math:`(\mu, \sigma)` it is the KL of
        :math:`\mathcal N(\mu, D + VV^\top)` to :math:`\mathcal N(m, \operatorname{diag}s^2)`:
        the trace term :math:`\sum_{ijk}A_{ik}^2B_{jk}^2/s_{ij}^2` costs
        :math:`O((\text{rows} + \text{out})k)` for a scalar prior scale, and nothing is done per
        weight that the mean-field KL does not do already.
        """
        a2, b2 = t.row_factor.square(), t.col_factor.square()
        trace = _weighted_factor_sum(a2[: self._in], b2, w_prior_scale)
        if self.bias and b_prior_scale is not None:
            trace = trace + _weighted_factor_sum(a2[self._in :], b2, b_prior_scale)
        return 0.5 * trace - 0.5 * self._log_det_capacitance(t)

    def output_distribution(self, x: Tensor, t: _LowRankTensors) -> Distribution:
        mean = self._aug(x, t.loc)
        diag = self._aug(x * x, t.scale.square())
        proj = self._aug(x, t.row_factor)  # (*, k)
        if self._out == 1:
            return self._single_output(mean, diag + (proj.square() @ t.col_factor.square().T))
        factor = t.col_factor * proj.unsqueeze(-2)  # (*, out, k)
        return LowRankMultivariateNormal(mean, factor, diag.clamp_min(torch.finfo(diag.dtype).tiny),
                                         validate_args=False)  # fmt: skip

    def _fixed_output_moments(
        self, x: Tensor, t: _LowRankTensors, *, full: bool
    ) -> tuple[Tensor, Tensor]:
        # As output_distribution, without the distribution's k x k capacitance factorisation.
        mean = self._aug(x, t.loc)
        diag = self._aug(x * x, t.scale.square())
        proj = self._aug(x, t.row_factor)  # (*, k)
        if not full:
            return mean, diag + proj.square() @ t.col_factor.square().T
        factor = t.col_factor * proj.unsqueeze(-2)  # (*, out, k)
        return mean, torch.diag_embed(diag) + factor @ factor.mT

    def _weight_trace(self, cov: Tensor, t: _LowRankTensors) -> Tensor:
        r""":math:`\operatorname{diag}(\operatorname{diag}(C)\sigma^2) + B\operatorname{diag}(q)
        B^\top` with :math:`q_k = a_k^\top C a_k` (``a_k`` the factor's weight rows): ``k``
        quadratic forms per example, no dense covariance."""
        a = t.row_factor[: self._in]
        q = ((cov @ a) * a).sum(-2)  # (*, k)
        b = t.col_factor
        return _uncorrelated_trace(cov, t.parts[1]) + (b * q.unsqueeze(-2)) @ b.T

    def _output_noise(
        self,
        rows: Tensor,
        t: _LowRankTensors,
        lead: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        var = self._aug(rows * rows, t.scale.square())
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        proj = self._aug(rows, t.row_factor)
        eps = _randn((*lead, *std.shape), t.loc, generator)
        z = _randn((*lead, *proj.shape), t.loc, generator)
        return std * eps + (proj * z) @ t.col_factor.T

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None) -> None:
        """Diagonal scales to the targets; the factors shrunk until their share of every
        variance is at most 1e-4 (correlations start near 0 and are learned)."""
        target = _join(w_scale, b_scale, self.bias).to(torch.float64)
        with torch.no_grad():
            t = self.realise()
            share = (self._factor_variance(t) / target.square().to(t.loc.dtype)).max()
            shrink = float((1e-4 / share.clamp_min(1e-300)).clamp_max(1.0)) ** 0.25
            self.row_factor.mul_(shrink)
            self.col_factor.mul_(shrink)
            # The diagonal's floor term (realise) is part of the scale: subtract it.
            row_norm = torch.linalg.vector_norm(self.row_factor, dim=-1).double()
            col_norm = torch.linalg.vector_norm(self.col_factor, dim=-1).double()
            floor = LOWRANK_DIAGONAL_FLOOR * torch.outer(row_norm, col_norm)
            softplus_part = (target - floor).clamp_min(1e-3 * target)
            self.raw_scale.copy_(inverse_softplus(softplus_part))


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 if it is float16 or bfloat16 (variances underflow there), else as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _weighted_factor_sum(a2: Tensor, b2: Tensor, prior_scale: Tensor) -> Tensor:
    r""":math:`\sum_{ijk} a_{ik} b_{jk} / s_{ij}^2` for ``s`` broadcastable to ``(rows, out)``."""
    if prior_scale.numel() == 1:
        return (a2.sum(0) * b2.sum(0)).sum() / prior_scale.reshape(()).square()
    precision = prior_scale.pow(-2).expand(a2.shape[0], b2.shape[0])
    return (a2 * (precision @ b2)).sum()


def _join(w: Tensor, b: Tensor | None, bias: bool) -> Tensor:
    """Augmented ``(rows, out)`` from a weight tensor and an optional bias tensor."""
    if not bias:
        return w
    if b is None:
        raise ValueError("a bias target is needed for a layer with a bias")
    return torch.cat([w, b.unsqueeze(0)])


def check_rank(rank: Any, num_weights: int, in_features: int, out_features: int) -> int:
    """``rank`` if it is an integer in ``[1, num_weights]``, else a one-line error."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be a positive integer, got {V.describe(rank)}")
    if not 1 <= rank <= num_weights:
        raise ValueError(
            f"rank must be in [1, {num_weights}] (the number of weights and biases of a "
            f"{in_features} x {out_features} layer), got {rank}"
        )
    return rank


class _FullTensors(NamedTuple):
    loc: Tensor
    scale_tril: Tensor  # (D, D)


class FullNormal(_Joint):
    r"""Full-covariance Normal over weights and bias, :math:`\operatorname{Cov}(\theta) = LL^\top`.

    ``L`` is lower triangular over :math:`\theta = \operatorname{vec}([W; b])`: its diagonal is
    :math:`\operatorname{softplus}` of ``raw_scale`` (positive, so ``L`` is a Cholesky factor) and
    its strict lower triangle is the lower part of the parameter ``offdiag`` (``D x D``; the upper
    part gets no gradient and is unused). Able to represent any Gaussian posterior, hence the
    exact posterior of a Bayesian linear model; ``D^2`` parameters, so only for small layers
    (at most :data:`FULL_MAX_ENTRIES` covariance entries).

    Args:
        in_features, out_features, bias: the linear map.
        init_scale: initial standard deviation of every weight (correlations start at 0).
    """

    name = "full"
    estimators = ("reparameterization", "local")

    def _init_spread(self) -> None:
        d = self.num_weights
        check_full_size(d, self._in, self._out, self.bias)
        self.raw_scale = nn.Parameter(torch.empty(self.rows, self._out, **self._factory))
        self.offdiag = nn.Parameter(torch.zeros(d, d, **self._factory))

    def reset_scale(self, init_scale: float | None = None, generator: Any = None) -> None:
        """Every standard deviation to ``init_scale``, every correlation to 0."""
        if init_scale is not None:
            self.init_scale = _check_init_scale(init_scale)
        V.survives_cast("init_scale", self.init_scale, self.raw_scale.dtype)
        _fill_softplus(self.raw_scale, self.init_scale)
        with torch.no_grad():
            self.offdiag.zero_()

    def realise(self, bias: MeanFieldNormal | None = None) -> _FullTensors:
        self._no_bias_factor(bias)
        diag = positive_scale(self.raw_scale).reshape(-1)
        return _FullTensors(self.loc, torch.tril(self.offdiag, -1) + torch.diag(diag))

    def _marginal_variance(self, t: _FullTensors) -> Tensor:
        return t.scale_tril.square().sum(-1).reshape(self.rows, self._out)

    def _log_det(self, t: _FullTensors) -> Tensor:
        return 2 * torch.log(torch.diagonal(t.scale_tril)).sum()

    def entropy_gap(self, t: _FullTensors) -> Tensor:
        var = t.scale_tril.square().sum(-1)
        return 0.5 * torch.log(var).sum() - torch.log(torch.diagonal(t.scale_tril)).sum()

    def distribution(self, t: _FullTensors) -> MultivariateNormal:
        """:class:`~torch.distributions.MultivariateNormal` over ``vec([W; b])``."""
        return MultivariateNormal(t.loc.reshape(-1), scale_tril=t.scale_tril, validate_args=False)

    def _noise(
        self, t: _FullTensors, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        eps = _randn((*lead, self.num_weights), t.loc, generator)
        return (eps @ t.scale_tril.T).reshape(*lead, self.rows, self._out)

    def _output_factor(self, x: Tensor, t: _FullTensors) -> Tensor:
        r""":math:`G = (\tilde x \otimes I_{out}) L`, ``(*, out, D)``: ``y - E[y] = G\epsilon``."""
        d = self.num_weights
        g = self._aug(x, t.scale_tril.reshape(self.rows, self._out * d))
        return g.reshape(*x.shape[:-1], self._out, d)

    def output_distribution(self, x: Tensor, t: _FullTensors) -> Distribution:
        mean = self._aug(x, t.loc)
        g = self._output_factor(x, t)
        if self._out == 1:
            return self._single_output(mean, g.square().sum(-1))
        return MultivariateNormal(mean, covariance_matrix=g @ g.transpose(-1, -2),
                                  validate_args=False)  # fmt: skip

    def _fixed_output_moments(
        self, x: Tensor, t: _FullTensors, *, full: bool
    ) -> tuple[Tensor, Tensor]:
        # G G^T directly: no Cholesky factor of the output covariance is needed here.
        mean = self._aug(x, t.loc)
        g = self._output_factor(x, t)
        return mean, (g @ g.mT if full else g.square().sum(-1))

    def _weight_trace(self, cov: Tensor, t: _FullTensors) -> Tensor:
        # The dense weight covariance (this family is for small layers): O(in^2 out^2) per row.
        dense = t.scale_tril @ t.scale_tril.T
        blocks = dense.reshape(self.rows, self._out, self.rows, self._out)
        weights = blocks[: self._in, :, : self._in, :]
        return torch.einsum("...il,ijlk->...jk", cov, weights)

    def _output_noise(
        self,
        rows: Tensor,
        t: _FullTensors,
        lead: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        g = self._output_factor(rows, t)
        eps = _randn((*lead, *rows.shape[:-1], self.num_weights), t.loc, generator)
        return (g @ eps.unsqueeze(-1)).squeeze(-1)

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None) -> None:
        target = _join(w_scale, b_scale, self.bias)
        with torch.no_grad():
            self.offdiag.zero_()
            self.raw_scale.copy_(inverse_softplus(target.to(torch.float64)))


def check_full_size(num_weights: int, in_features: int, out_features: int, bias: bool) -> None:
    """Refuse a full covariance above :data:`FULL_MAX_ENTRIES` entries, with the count."""
    entries = num_weights * num_weights
    if entries > FULL_MAX_ENTRIES:
        what = "weights and biases" if bias else "weights"
        raise ValueError(
            f"posterior='full' on a {in_features} x {out_features} layer needs a covariance of "
            f"{num_weights} x {num_weights} = {entries} entries over its {num_weights} {what}, "
            f"above the limit of {FULL_MAX_ENTRIES} entries; use posterior='lowrank' with a "
            "rank instead"
        )


class _MatrixNormalTensors(NamedTuple):
    loc: Tensor
    row_tril: Tensor  # (rows, rows) lower triangular, or (rows,) diagonal
    col_tril: Tensor  # (out, out) lower triangular, or (out,) diagonal
    # diagonal factors: (w_loc, w_scale, b_loc, b_scale) with scale = outer(u, v); else None
    parts: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None


class MatrixNormal(_Joint):
    r"""Matrix normal posterior :math:`\tilde W\sim\mathcal{MN}(M, U, V)` (Louizos & Welling 2016).

    :math:`\operatorname{Cov}(\tilde W_{ij}, \tilde W_{kl}) = U_{ik}V_{jl}`: ``U`` (``rows x
    rows``) correlates the inputs (and the bias row), ``V`` (``out x out``) the outputs. Each is
    :math:`LL^\top` for a lower-triangular ``L`` with a positive (softplus) diagonal, or, with
    ``factors="diagonal"``, a diagonal (then every weight's standard deviation is
    :math:`u_i v_j`, a rank-one matrix of scales, and the outputs are independent). The output
    of one example is :math:`y = \tilde x M + \sqrt{\tilde x U \tilde x^\top}\,\epsilon L_V^\top`:
    the local estimator costs one quadratic form per example.

    Args:
        in_features, out_features, bias: the linear map.
        factors: ``"full"`` (Cholesky factors) or ``"diagonal"``.
        init_scale: initial standard deviation of every weight (correlations start at 0).
    """

    name = "matrix_normal"
    estimators = ("reparameterization", "local")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        factors: str = "full",
        bias: bool = True,
        init_scale: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias=bias, init_scale=init_scale, device=device,
            dtype=dtype, factors=factors,
        )  # fmt: skip

    def _init_spread(self, factors: Any = "full") -> None:
        self.factors = V.one_of("factors", factors, MATRIX_NORMAL_FACTORS)
        self.row_raw_scale = nn.Parameter(torch.empty(self.rows, **self._factory))
        self.col_raw_scale = nn.Parameter(torch.empty(self._out, **self._factory))
        self.row_offdiag: nn.Parameter | None
        self.col_offdiag: nn.Parameter | None
        if self.factors == "full":
            self.row_offdiag = nn.Parameter(torch.zeros(self.rows, self.rows, **self._factory))
            self.col_offdiag = nn.Parameter(torch.zeros(self._out, self._out, **self._factory))
        else:
            self.register_parameter("row_offdiag", None)
            self.register_parameter("col_offdiag", None)

    def reset_scale(self, init_scale: float | None = None, generator: Any = None) -> None:
        """Both factors diagonal with entries ``sqrt(init_scale)``: every weight's standard
        deviation is ``init_scale``, every correlation 0."""
        if init_scale is not None:
            self.init_scale = _check_init_scale(init_scale)
        V.survives_cast("init_scale", self.init_scale, self.row_raw_scale.dtype)
        root = math.sqrt(self.init_scale)
        _fill_softplus(self.row_raw_scale, root)
        _fill_softplus(self.col_raw_scale, root)
        with torch.no_grad():
            for offdiag in (self.row_offdiag, self.col_offdiag):
                if offdiag is not None:
                    offdiag.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factors={self.factors!r}"

    def realise(self, bias: MeanFieldNormal | None = None) -> _MatrixNormalTensors:
        self._no_bias_factor(bias)
        row = positive_scale(self.row_raw_scale)
        col = positive_scale(self.col_raw_scale)
        if self.row_offdiag is not None and self.col_offdiag is not None:
            row = torch.tril(self.row_offdiag, -1) + torch.diag(row)
            col = torch.tril(self.col_offdiag, -1) + torch.diag(col)
            return _MatrixNormalTensors(self.loc, row, col, None)
        # Diagonal factors: a mean-field Normal with scales u_i v_j; one outer product serves
        # the sample and the KL.
        (w_loc, b_loc), (w_scale, b_scale) = (
            self._split(self.loc),
            self._split(torch.outer(row, col)),
        )
        return _MatrixNormalTensors(self.loc, row, col, (w_loc, w_scale, b_loc, b_scale))

    def marginals(
        self, t: _MatrixNormalTensors
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        return super().marginals(t) if t.parts is None else t.parts

    def sample_output(
        self,
        x: Tensor,
        t: _MatrixNormalTensors,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        if estimator != "reparameterization" or num_weight_samples is not None or t.parts is None:
            return super().sample_output(
                x, t, estimator, generator=generator, num_weight_samples=num_weight_samples
            )
        eps = _randn((self.rows, self._out), t.loc, generator)
        return self._scaled_sample_output(x, t.parts, eps)

    def distribution(self, t: _MatrixNormalTensors) -> _MatrixNormalDistribution:
        """:class:`varlin.distributions.MatrixNormal` over the matrix ``[W; b]``."""
        return _MatrixNormalDistribution(t.loc, t.row_tril, t.col_tril, validate_args=False)

    def _marginal_variance(self, t: _MatrixNormalTensors) -> Tensor:
        return self.distribution(t).variance

    def _log_det(self, t: _MatrixNormalTensors) -> Tensor:
        return 2 * (self._out * _log_diag(t.row_tril) + self.rows * _log_diag(t.col_tril))

    def entropy_gap(self, t: _MatrixNormalTensors) -> Tensor | None:
        if t.row_tril.dim() == 1:
            return None  # diagonal factors: a mean-field Normal with scales u_i v_j
        dist = self.distribution(t)
        half_log_var = (
            self._out * 0.5 * torch.log(dist.row_variance).sum()
            + self.rows * 0.5 * torch.log(dist.col_variance).sum()
        )
        return half_log_var - 0.5 * self._log_det(t)

    def _noise(
        self, t: _MatrixNormalTensors, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        eps = _randn((*lead, self.rows, self._out), t.loc, generator)
        return self.distribution(t)._colour(eps)

    def _row_quadratic(self, x: Tensor, t: _MatrixNormalTensors) -> Tensor:
        r""":math:`\tilde x U \tilde x^\top` per example, ``(*, 1)``."""
        if t.row_tril.dim() == 1:
            return self._aug(x * x, t.row_tril.square().unsqueeze(-1))
        return self._aug(x, t.row_tril).square().sum(-1, keepdim=True)

    def output_distribution(self, x: Tensor, t: _MatrixNormalTensors) -> Distribution:
        mean = self._aug(x, t.loc)
        quad = self._row_quadratic(x, t)
        col = t.col_tril
        if col.dim() == 1 or self._out == 1:
            col_var = col.square() if col.dim() == 1 else col.square().sum(-1)
            return self._single_output(mean, quad * col_var)
        tril = quad.clamp_min(torch.finfo(quad.dtype).tiny).sqrt().unsqueeze(-1) * col
        return MultivariateNormal(mean, scale_tril=tril, validate_args=False)

    def _weight_trace(self, cov: Tensor, t: _MatrixNormalTensors) -> Tensor:
        r""":math:`\operatorname{tr}(U_{WW} C)\,V`: the row covariance's weight block met by
        the input covariance, times the column covariance."""
        row, col = t.row_tril[: self._in], t.col_tril
        if row.dim() == 1:
            trace = torch.diagonal(cov, dim1=-2, dim2=-1) @ row.square()
        else:
            trace = (cov * (row @ row.T)).sum((-2, -1))
        col_cov = torch.diag(col.square()) if col.dim() == 1 else col @ col.T
        return trace[..., None, None] * col_cov

    def _output_noise(
        self,
        rows: Tensor,
        t: _MatrixNormalTensors,
        lead: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        quad = self._row_quadratic(rows, t)
        root = quad.clamp_min(torch.finfo(quad.dtype).tiny).sqrt()
        eps = _randn((*lead, *rows.shape[:-1], self._out), t.loc, generator)
        col = t.col_tril
        return root * (eps * col if col.dim() == 1 else eps @ col.T)


MATRIX_NORMAL_FACTORS = ("full", "diagonal")


def _log_diag(factor: Tensor) -> Tensor:
    return torch.log(factor if factor.dim() == 1 else torch.diagonal(factor)).sum()


class _RadialTensors(NamedTuple):
    loc: Tensor
    scale: Tensor
    parts: tuple[Tensor, Tensor, Tensor | None, Tensor | None]  # w_loc, w_scale, b_loc, b_scale


class Radial(_Joint):
    r"""The radial posterior of Farquhar, Osborne & Gal (2020) over a layer's weights and bias.

    .. math::
        \tilde W = \tilde M + \sigma\odot\frac{E}{\lVert E\rVert}\,r,\qquad
        E\sim\mathcal N(0, I),\ r\sim\mathcal N(0,1),

    one direction on the sphere of all ``D`` weights and biases and one radius per sample
    (:class:`varlin.distributions.Radial`). Every weight has variance :math:`\sigma_i^2/D`; the
    parameter :math:`\sigma` is therefore initialised to ``init_scale * sqrt(D)`` so that
    ``init_scale`` is each weight's standard deviation, as for the other families. Not Gaussian:
    no local estimator and no closed-form output distribution; flipout applies, because
    flipping the signs of entries of a uniform direction leaves its law unchanged. The entropy is
    closed form (:func:`varlin.distributions.radial_entropy_constant`); the cross-entropy to a
    Normal prior depends only on the moments, to any other prior it is a Monte Carlo estimate.
    """

    name = "radial"
    estimators = ("reparameterization", "flipout")
    independent_outputs = True
    gaussian = False

    def _init_spread(self) -> None:
        self.raw_scale = nn.Parameter(torch.empty(self.rows, self._out, **self._factory))

    def reset_scale(self, init_scale: float | None = None, generator: Any = None) -> None:
        """Every weight's standard deviation to ``init_scale`` (:math:`\\sigma = s\\sqrt D`)."""
        if init_scale is not None:
            self.init_scale = _check_init_scale(init_scale)
        sigma = self.init_scale * math.sqrt(self.num_weights)
        V.survives_cast("init_scale", sigma, self.raw_scale.dtype)
        _fill_softplus(self.raw_scale, sigma)

    def realise(self, bias: MeanFieldNormal | None = None) -> _RadialTensors:
        self._no_bias_factor(bias)
        scale = positive_scale(self.raw_scale)
        (w_loc, b_loc), (w_scale, b_scale) = self._split(self.loc), self._split(scale)
        return _RadialTensors(self.loc, scale, (w_loc, w_scale, b_loc, b_scale))

    def marginals(self, t: _RadialTensors) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        w_loc, w_scale, b_loc, b_scale = t.parts
        root = 1.0 / math.sqrt(self.num_weights)
        return w_loc, w_scale * root, b_loc, None if b_scale is None else b_scale * root

    def _direction(
        self, t: _RadialTensors, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        r""":math:`r\,E/\lVert E\rVert` per sample, ``(*lead, rows, out)`` (no gradient)."""
        eps = _randn((*lead, self.rows, self._out), t.loc, generator)
        radius = _randn(lead, t.loc, generator)
        return radial_direction(eps, 2, radius)

    def sample_output(
        self,
        x: Tensor,
        t: _RadialTensors,
        estimator: str,
        *,
        generator: torch.Generator | None = None,
        num_weight_samples: int | None = None,
    ) -> Tensor:
        if estimator != "reparameterization" or num_weight_samples is not None:
            return super().sample_output(
                x, t, estimator, generator=generator, num_weight_samples=num_weight_samples
            )
        return self._scaled_sample_output(x, t.parts, self._direction(t, (), generator))

    def distribution(self, t: _RadialTensors) -> _RadialDistribution:
        """:class:`varlin.distributions.Radial` over the matrix ``[W; b]``."""
        return _RadialDistribution(t.loc, t.scale, validate_args=False)

    def _marginal_variance(self, t: _RadialTensors) -> Tensor:
        return t.scale.square() / self.num_weights

    def entropy(self, t: _RadialTensors) -> Tensor:
        return torch.log(t.scale).sum() + radial_entropy_constant(self.num_weights)

    def entropy_gap(self, t: _RadialTensors) -> Tensor:
        # sum_i 1/2 log(2 pi e sigma_i^2 / D) - H(q): the log sigma terms cancel.
        d = self.num_weights
        constant = 0.5 * d * (1.0 + math.log(2 * math.pi / d)) - radial_entropy_constant(d)
        return t.scale.new_tensor(constant)

    def dense(self, t: _RadialTensors) -> tuple[Tensor, Tensor]:
        """Mean and covariance (diagonal: the direction's entries are uncorrelated)."""
        return t.loc.reshape(-1), torch.diag(self._marginal_variance(t).reshape(-1))

    def _fixed_output_moments(
        self, x: Tensor, t: _RadialTensors, *, full: bool
    ) -> tuple[Tensor, Tensor]:
        """The output's mean and variance (not its law, which is not Gaussian): the weights are
        uncorrelated, so the outputs are too."""
        w_loc, w_std, b_loc, b_std = self.marginals(t)
        var = (x * x) @ w_std.square()
        if b_std is not None:
            var = var + b_std.square()
        mean = functional.mean_linear(x, w_loc, b_loc)
        return mean, (torch.diag_embed(var) if full else var)

    def _weight_trace(self, cov: Tensor, t: _RadialTensors) -> Tensor:
        return _uncorrelated_trace(cov, self.marginals(t)[1])

    def _noise(
        self, t: _RadialTensors, lead: tuple[int, ...], generator: torch.Generator | None
    ) -> Tensor:
        return t.scale * self._direction(t, lead, generator)

    def _flipout(
        self,
        x: Tensor,
        t: _RadialTensors,
        generator: torch.Generator | None,
        num_weight_samples: int | None,
    ) -> Tensor:
        lead = () if num_weight_samples is None else (
            functional._check_sample_dim(x, num_weight_samples),)  # fmt: skip
        eps_w, eps_b = self._split(self._direction(t, lead, generator))
        w_loc, w_scale, b_loc, b_scale = t.parts
        delta_w = w_scale * eps_w
        delta_b = None if eps_b is None or b_scale is None else b_scale * eps_b
        if lead and delta_b is not None:
            delta_b = delta_b.unsqueeze(1)
        return functional.flip_perturbation(x, w_loc, b_loc, delta_w, delta_b, generator=generator)

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None) -> None:
        target = _join(w_scale, b_scale, self.bias) * math.sqrt(self.num_weights)
        with torch.no_grad():
            self.raw_scale.copy_(inverse_softplus(target.to(torch.float64)))


FAMILIES: dict[str, type[Family]] = {
    "meanfield": MeanFieldNormal,
    "lowrank": LowRankNormal,
    "matrix_normal": MatrixNormal,
    "full": FullNormal,
    "radial": Radial,
}


def build(
    posterior: Any,
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    rank: Any = None,
    factors: Any = None,
    init_scale: float,
    device: Any = None,
    dtype: Any = None,
) -> tuple[Family, MeanFieldNormal | None]:
    """The family named ``posterior`` for a linear map, and its separate bias factor, if any.

    Checks the family-specific options: ``rank`` only (and always) with ``"lowrank"``,
    ``factors`` only with ``"matrix_normal"``.

    Returns:
        ``(family, bias_factor)``: ``bias_factor`` is the bias's own :class:`MeanFieldNormal`
        for ``"meanfield"`` with a bias, else ``None`` (the other families hold the bias).
    """
    name = V.one_of("posterior", posterior, tuple(FAMILIES))
    if rank is not None and name != "lowrank":
        raise ValueError(
            f"rank={V.describe(rank)} was given but posterior={name!r}; rank applies only to "
            "posterior='lowrank'"
        )
    if factors is not None and name != "matrix_normal":
        raise ValueError(
            f"factors={V.describe(factors)} was given but posterior={name!r}; factors applies "
            "only to posterior='matrix_normal'"
        )
    factory = {"init_scale": init_scale, "device": device, "dtype": dtype}
    if name == "meanfield":
        weights = MeanFieldNormal((in_features, out_features), **factory)
        return weights, (MeanFieldNormal((out_features,), **factory) if bias else None)
    if name == "lowrank":
        if rank is None:
            raise ValueError("posterior='lowrank' needs rank=k, an integer >= 1")
        return LowRankNormal(in_features, out_features, rank=rank, bias=bias, **factory), None
    if name == "matrix_normal":
        return MatrixNormal(in_features, out_features, factors=factors or "full", bias=bias,
                            **factory), None  # fmt: skip
    family = FAMILIES[name]
    return family(in_features, out_features, bias=bias, **factory), None
