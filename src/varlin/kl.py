r"""KL divergences: torch's registry first, one Monte Carlo fallback, and a Normal fast path.

:func:`distribution_kl` asks :func:`torch.distributions.kl_divergence` (and so every pair anyone
registered with :func:`torch.distributions.kl.register_kl`) for a closed form; when the registry
has none it returns the single-sample Monte Carlo estimate

.. math:: \widehat{KL} = \log q(z) - \log p(z), \quad z \sim q \text{ (reparameterized)},

which is unbiased and differentiable. That fallback lives here and nowhere else.

:func:`normal_kl` is the closed form for two Normals written for the layers' hot path: it takes
tensors (no distribution objects), is clamped at its true minimum 0 against rounding, and sums.
KLs are always **summed** over the parameters, never averaged: the ELBO needs the total.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal

__all__ = ["distribution_kl", "normal_kl", "has_closed_form"]


def has_closed_form(q: Distribution, p: Distribution) -> bool:
    """Whether torch's KL registry holds a closed form for ``(type(q), type(p))``."""
    try:
        torch.distributions.kl._dispatch_kl(type(q), type(p))
    except NotImplementedError:
        return False
    return True


def normal_kl(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    r"""Elementwise :math:`KL(\mathcal N(\mu_q,\sigma_q^2)\,\|\,\mathcal N(\mu_p,\sigma_p^2))`.

    .. math::
        \tfrac12\Big(r^2 - 1 - 2\log r + \big(\tfrac{\mu_q-\mu_p}{\sigma_p}\big)^2\Big),
        \quad r = \sigma_q/\sigma_p .

    The prior tensors may be scalars broadcast over the posterior's shape. The first part is
    :math:`\ge 0` exactly; rounding near :math:`r = 1` can make it :math:`-10^{-7}`, so it is
    clamped at 0.

    Shape:
        Output: the broadcast shape of the four inputs.
    """
    log_ratio = torch.log(q_scale) - torch.log(p_scale)
    spread = (torch.expm1(2 * log_ratio) - 2 * log_ratio).clamp_min(0)
    shift = ((q_loc - p_loc) / p_scale) ** 2
    return 0.5 * (spread + shift)


def distribution_kl(
    q: Distribution,
    p: Distribution,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Elementwise :math:`KL(q\,\|\,p)`: closed form if registered, else one-sample Monte Carlo.

    Args:
        q: the variational distribution (must support ``rsample`` for the fallback).
        p: the prior, any distribution with ``log_prob``.
        generator: noise source for the fallback when ``q`` is a :class:`Normal`.

    Returns:
        A tensor of the distributions' broadcast batch shape (sum it for the total).
    """
    if isinstance(q, Normal) and isinstance(p, Normal):
        return normal_kl(q.loc, q.scale, p.loc, p.scale)
    try:
        return torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        pass
    if isinstance(q, Normal) and generator is not None:
        eps = torch.randn(q.loc.shape, generator=generator, device=q.loc.device, dtype=q.loc.dtype)
        z = q.loc + q.scale * eps
    elif q.has_rsample:
        z = q.rsample()
    else:
        raise NotImplementedError(
            f"no closed-form KL for ({type(q).__name__}, {type(p).__name__}) and "
            f"{type(q).__name__} has no rsample for a Monte Carlo estimate"
        )
    return q.log_prob(z) - p.log_prob(z)
