r"""Two distributions torch does not ship: the matrix normal and the radial distribution.

Both are :class:`torch.distributions.Distribution` values with ``rsample``, ``mean``,
``variance``, ``entropy`` and ``log_prob``, the posteriors of
:class:`varlin.posteriors.MatrixNormal` and :class:`varlin.posteriors.Radial`. Each treats its
whole ``loc`` tensor as one event (an empty batch shape): a layer's weights are one random object.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

__all__ = ["MatrixNormal", "Radial", "radial_direction", "radial_entropy_constant"]

_EULER_GAMMA = 0.5772156649015329


def _tril_or_diag(factor: Tensor) -> Tensor:
    """A lower-triangular factor as a matrix (a 1-D tensor is a diagonal one)."""
    return torch.diag(factor) if factor.dim() == 1 else factor


def _log_diag_sum(factor: Tensor) -> Tensor:
    """:math:`\\sum_i \\log L_{ii}` of a triangular factor (or of a diagonal given as a vector)."""
    diag = factor if factor.dim() == 1 else torch.diagonal(factor)
    return torch.log(diag).sum()


class _OneEvent(Distribution):
    """A distribution whose whole ``loc`` is one event (no batch dimensions)."""

    loc: Tensor

    def expand(self, batch_shape: Any, _instance: Any = None) -> _OneEvent:
        if tuple(batch_shape) != ():
            raise NotImplementedError(f"{type(self).__name__} has no batch dimensions")
        return self

    @property
    def mean(self) -> Tensor:
        return self.loc


class MatrixNormal(_OneEvent):
    r"""Matrix normal :math:`X \sim \mathcal{MN}(M, U, V)` over ``(rows, cols)`` matrices.

    .. math::
        \operatorname{vec}(X) \sim \mathcal N\big(\operatorname{vec}(M),\; U \otimes V\big),
        \qquad \operatorname{Cov}(X_{ij}, X_{kl}) = U_{ik} V_{jl},

    with ``vec`` stacking the rows (row-major, as ``X.reshape(-1)``). ``U`` (rows x rows) is the
    covariance between rows, ``V`` (cols x cols) between columns, each given by a lower-triangular
    factor with a positive diagonal (``U = L_U L_U^T``) or, as a 1-D tensor, by the diagonal of a
    diagonal factor (Louizos & Welling 2016 use diagonal factors). ``X = M + L_U E L_V^T`` with
    ``E`` standard normal (Gupta & Nagar 2000).

    Args:
        loc: :math:`M`, ``(rows, cols)``.
        row_scale_tril: :math:`L_U`, ``(rows, rows)`` lower triangular, or ``(rows,)``.
        col_scale_tril: :math:`L_V`, ``(cols, cols)`` lower triangular, or ``(cols,)``.
    """

    arg_constraints = {"loc": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        row_scale_tril: Tensor,
        col_scale_tril: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if loc.dim() != 2:
            raise ValueError(f"loc must be a matrix (rows, cols), got shape {tuple(loc.shape)}")
        rows, cols = loc.shape
        for name, factor, size in (("row_scale_tril", row_scale_tril, rows),
                                   ("col_scale_tril", col_scale_tril, cols)):  # fmt: skip
            if factor.shape not in ((size,), (size, size)):
                raise ValueError(
                    f"{name} must have shape ({size},) or ({size}, {size}) for loc of shape "
                    f"{tuple(loc.shape)}, got {tuple(factor.shape)}"
                )
        self.loc = loc
        self.row_scale_tril = row_scale_tril
        self.col_scale_tril = col_scale_tril
        super().__init__(torch.Size(), loc.shape, validate_args=validate_args)

    @property
    def row_variance(self) -> Tensor:
        """:math:`\\operatorname{diag} U`, ``(rows,)``."""
        f = self.row_scale_tril
        return f.square() if f.dim() == 1 else f.square().sum(-1)

    @property
    def col_variance(self) -> Tensor:
        """:math:`\\operatorname{diag} V`, ``(cols,)``."""
        f = self.col_scale_tril
        return f.square() if f.dim() == 1 else f.square().sum(-1)

    @property
    def variance(self) -> Tensor:
        return self.row_variance.unsqueeze(-1) * self.col_variance

    @property
    def covariance_matrix(self) -> Tensor:
        """:math:`U \\otimes V`, the dense covariance of ``X.reshape(-1)`` (small matrices only)."""
        lu = _tril_or_diag(self.row_scale_tril)
        lv = _tril_or_diag(self.col_scale_tril)
        return torch.kron(lu @ lu.T, lv @ lv.T)

    def rsample(self, sample_shape: Any = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self._colour(eps)

    def _colour(self, eps: Tensor) -> Tensor:
        """:math:`L_U E L_V^T` for standard-normal ``E`` of shape ``(..., rows, cols)``."""
        lu, lv = self.row_scale_tril, self.col_scale_tril
        out = lu.unsqueeze(-1) * eps if lu.dim() == 1 else lu @ eps
        return out * lv if lv.dim() == 1 else out @ lv.T

    def entropy(self) -> Tensor:
        r""":math:`\tfrac{rc}{2}\log(2\pi e) + c\sum\log L_{U,ii} + r\sum\log L_{V,jj}`."""
        rows, cols = self.loc.shape
        return (
            0.5 * rows * cols * (1.0 + math.log(2 * math.pi))
            + cols * _log_diag_sum(self.row_scale_tril)
            + rows * _log_diag_sum(self.col_scale_tril)
        )

    def log_prob(self, value: Tensor) -> Tensor:
        r""":math:`-\tfrac{rc}{2}\log 2\pi - c\log|L_U| - r\log|L_V|
        - \tfrac12\lVert L_U^{-1}(X-M)L_V^{-T}\rVert_F^2`."""
        if self._validate_args:
            self._validate_sample(value)
        rows, cols = self.loc.shape
        diff = value - self.loc
        lu, lv = self.row_scale_tril, self.col_scale_tril
        if lu.dim() == 1:
            white = diff / lu.unsqueeze(-1)
        else:
            white = torch.linalg.solve_triangular(lu, diff, upper=False)
        if lv.dim() == 1:
            white = white / lv
        else:  # Z L_V^{-T}: solve Y L_V^T = Z for Y
            white = torch.linalg.solve_triangular(lv.T, white, upper=True, left=False)
        return (
            -0.5 * white.square().sum((-2, -1))
            - 0.5 * rows * cols * math.log(2 * math.pi)
            - cols * _log_diag_sum(lu)
            - rows * _log_diag_sum(lv)
        )


def radial_entropy_constant(dim: int) -> float:
    r"""Entropy of :math:`z = r\,\epsilon/\lVert\epsilon\rVert` in :math:`\mathbb R^D`.

    With :math:`\epsilon\sim\mathcal N(0, I_D)` and :math:`r\sim\mathcal N(0,1)`, ``z`` has a
    uniform direction and a radius :math:`|r|`, so its density is
    :math:`2\varphi(\lVert z\rVert)/(A_{D-1}\lVert z\rVert^{D-1})` with :math:`A_{D-1} =
    2\pi^{D/2}/\Gamma(D/2)` the area of the unit sphere, and

    .. math::
        H(z) = \log A_{D-1} + \tfrac12\log(2\pi) + \tfrac12 - \log 2
        - \tfrac{D-1}{2}(\gamma + \log 2),

    using :math:`\mathbb E\log|r| = -(\gamma+\log 2)/2`. This is the constant that Farquhar,
    Osborne & Gal (2020) leave out of the radial posterior's entropy
    :math:`\sum_i\log\sigma_i + \text{const}`. For :math:`D = 1` it is the standard Normal's.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    log_area = math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)
    return (
        log_area
        + 0.5 * math.log(2 * math.pi)
        + 0.5
        - math.log(2.0)
        - 0.5 * (dim - 1) * (_EULER_GAMMA + math.log(2.0))
    )


class Radial(_OneEvent):
    r"""The radial distribution of Farquhar, Osborne & Gal (2020) over a whole tensor.

    .. math::
        w = \mu + \sigma \odot \frac{\epsilon}{\lVert\epsilon\rVert}\, r,\qquad
        \epsilon \sim \mathcal N(0, I_D),\; r \sim \mathcal N(0, 1),

    where :math:`D` is the number of entries of ``loc`` (all of them form one event). The noise
    direction is uniform on the sphere and its radius is :math:`|r|`: unlike a mean-field Normal
    in high dimension, samples are not concentrated on a thin shell far from the mean. Each
    entry has mean :math:`\mu_i` and variance :math:`\sigma_i^2/D`.

    Args:
        loc: :math:`\mu`, any shape (the event shape).
        scale: :math:`\sigma > 0`, the shape of ``loc``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        if loc.shape != scale.shape:
            raise ValueError(
                f"scale must have the shape of loc {tuple(loc.shape)}, got {tuple(scale.shape)}"
            )
        self.loc = loc
        self.scale = scale
        super().__init__(torch.Size(), loc.shape, validate_args=validate_args)

    @property
    def dim(self) -> int:
        return self.loc.numel()

    @property
    def variance(self) -> Tensor:
        return self.scale.square() / self.dim

    def rsample(self, sample_shape: Any = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        lead = shape[: len(shape) - len(self.event_shape)]
        radius = torch.randn(lead, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * radial_direction(eps, self.loc.dim(), radius)

    def entropy(self) -> Tensor:
        r""":math:`\sum_i \log\sigma_i` + :func:`radial_entropy_constant` of :math:`D`."""
        return torch.log(self.scale).sum() + radial_entropy_constant(self.dim)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dims = tuple(range(-self.loc.dim(), 0)) if self.loc.dim() else ()
        z = (value - self.loc) / self.scale
        radius = z.square().sum(dims).sqrt() if dims else z.abs()
        d = self.dim
        log_area = math.log(2.0) + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d)
        log_radius_density = math.log(2.0) - 0.5 * math.log(2 * math.pi) - 0.5 * radius.square()
        return (
            log_radius_density
            - log_area
            - (d - 1) * torch.log(radius)
            - torch.log(self.scale).sum()
        )


def radial_direction(eps: Tensor, event_dims: int, radius: Tensor) -> Tensor:
    r""":math:`r\,\epsilon/\lVert\epsilon\rVert`, the norm over the last ``event_dims`` dimensions.

    ``radius`` has the leading (sample) shape of ``eps``.
    """
    dims = tuple(range(-event_dims, 0))
    norm = eps.square().sum(dims, keepdim=True).sqrt() if dims else eps.abs()
    factor = radius.reshape(*radius.shape, *([1] * event_dims)) / norm
    return eps * factor
