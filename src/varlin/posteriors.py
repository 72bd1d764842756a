r"""Variational families: modules that own the parameters and *return* torch distributions.

A posterior module is called with no argument and returns a
:class:`torch.distributions.Distribution` built from its current parameters (GPyTorch's
``_VariationalDistribution`` design). Layers, the KL
and prediction work on those distribution values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from . import _validation as V
from .functional import inverse_softplus, positive_scale

__all__ = ["MeanFieldNormal"]


class MeanFieldNormal(nn.Module):
    r"""Fully factorised Normal :math:`q(\theta) = \prod_i \mathcal N(\theta_i;\mu_i,\sigma_i^2)`.

    The scale is stored unconstrained as ``raw_scale`` and exposed as
    :math:`\sigma = \operatorname{softplus}(\rho)`, so no optimiser step can make it negative.

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

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        init_scale: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init_scale = V.real("init_scale", init_scale, min_value=0.0, strict=True)
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
            self.init_scale = V.real("init_scale", init_scale, min_value=0.0, strict=True)
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
