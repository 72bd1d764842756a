r"""Private: fixed quadrature rules for the one-dimensional integrals of moment propagation.

- :func:`gauss_hermite`: nodes and weights for :math:`\mathbb E[f(z)]`, :math:`z\sim\mathcal
  N(0, 1)` (probabilists' form: weights sum to 1, :math:`\sum_k w_k x_k = 0`,
  :math:`\sum_k w_k x_k^2 = 1` exactly). Used for expectations of smooth functions of one
  Gaussian variable (the heteroscedastic likelihood's noise scale).
- :func:`gauss_legendre`: nodes and weights on :math:`[0, 1]`, for Sheppard's integral of the
  bivariate normal distribution function (:func:`bivariate_excess`).

Nodes are computed once per ``(n, dtype, device)`` in float64 by NumPy and cached; the cache is
a deterministic function of its key (no state that changes results).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

__all__: list[str] = []

#: Nodes of :func:`gauss_hermite` used by the library's expectations: exact for polynomials of
#: degree < 2 * 32, and to ~1e-10 for the smooth, slowly growing integrands it meets.
HERMITE_NODES = 32
#: Nodes of :func:`gauss_legendre` in Sheppard's integral (a smooth integrand on a short range).
LEGENDRE_NODES = 16


@functools.lru_cache(maxsize=32)
def _hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite.hermgauss(n)  # physicists': weight exp(-x^2)
    return x * math.sqrt(2.0), w / math.sqrt(math.pi)


@functools.lru_cache(maxsize=32)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)  # on [-1, 1]
    return (x + 1.0) / 2.0, w / 2.0


def _as(array: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


def gauss_hermite(like: Tensor, n: int = HERMITE_NODES) -> tuple[Tensor, Tensor]:
    r"""``(x, w)``, ``(n,)`` each: :math:`\mathbb E[f(z)] \approx \sum_k w_k f(x_k)` for
    :math:`z\sim\mathcal N(0,1)`, in ``like``'s dtype and device."""
    x, w = _hermite(n)
    return _as(x, like), _as(w, like)


def gauss_legendre(like: Tensor, n: int = LEGENDRE_NODES) -> tuple[Tensor, Tensor]:
    r"""``(t, w)`` on :math:`[0, 1]`: :math:`\int_0^1 f \approx \sum_k w_k f(t_k)`."""
    t, w = _legendre(n)
    return _as(t, like), _as(w, like)


def bivariate_excess(h: Tensor, rho: Tensor) -> Tensor:
    r""":math:`\Phi_2(h, h; \rho) - \Phi(h)^2` for a correlation :math:`0 \le \rho \le 1`.

    Sheppard's formula: with :math:`r = \sin\theta`,

    .. math::
        \Phi_2(h, h; \rho) - \Phi(h)^2 = \int_0^\rho \phi_2(h, h; r)\,dr
        = \frac{1}{2\pi}\int_0^{\arcsin\rho} \exp\Big(-\frac{h^2}{1 + \sin\theta}\Big)\,d\theta,

    a smooth integrand on a range of at most :math:`\pi/2`, by Gauss–Legendre quadrature. It is
    the variance of :math:`\Phi(a z + b)` for Gaussian :math:`z` (see :mod:`varlin.moments`),
    computed without the cancellation of :math:`E[\Phi^2] - E[\Phi]^2`. ``h`` and ``rho``
    broadcast.
    """
    t, w = gauss_legendre(h)
    upper = torch.asin(rho.clamp(0.0, 1.0)).unsqueeze(-1)  # (..., 1)
    theta = upper * t  # (..., n)
    h2 = (h * h).unsqueeze(-1)
    integrand = torch.exp(-h2 / (1.0 + torch.sin(theta)))
    return (integrand * w).sum(-1) * upper.squeeze(-1) / (2.0 * math.pi)
