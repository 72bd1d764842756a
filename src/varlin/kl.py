r"""KL divergences: torch's registry first, one Monte Carlo fallback, and a Normal fast path.

:func:`distribution_kl` asks :func:`torch.distributions.kl_divergence` (and so every pair anyone
registered with :func:`torch.distributions.kl.register_kl`) for a closed form; when the registry
has none it returns the single-sample Monte Carlo estimate

.. math:: \widehat{KL} = \log q(z) - \log p(z), \quad z \sim q \text{ (reparameterized)},

which is unbiased and differentiable. That fallback lives here and nowhere else; so does its
variant :func:`entropy_kl` for a posterior whose entropy is closed form (the radial family):
:math:`-H(q) - \log p(z)`, the Monte Carlo part reduced to the cross-entropy.

:func:`normal_kl` is the closed form for two Normals written for the layers' hot path: it takes
tensors (no distribution objects), is clamped at its true minimum 0 against rounding, and sums.
KLs are always **summed** over the parameters, never averaged: the ELBO needs the total.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal

from .functional import _plain_ops_only

__all__ = [
    "distribution_kl",
    "distribution_kl_sum",
    "entropy_kl",
    "normal_kl",
    "normal_kl_sum",
    "normal_kl_sums",
    "has_closed_form",
]


def has_closed_form(q: Distribution, p: Distribution) -> bool:
    """Whether torch's KL registry holds a closed form for ``(type(q), type(p))``."""
    # _dispatch_kl signals "no match" by *returning* NotImplemented, it does not raise.
    return torch.distributions.kl._dispatch_kl(type(q), type(p)) is not NotImplemented


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


def _prior_scalars(p_loc: Tensor, p_scale: Tensor, q: Tensor) -> tuple[float, float] | None:
    """A one-entry prior's ``(loc, scale)`` as numbers, where reading them is free: the prior
    and the posterior ``q`` on the CPU (not on an accelerator, where it is a sync), not while
    tracing, and a finite positive scale (else the elementwise form gives its NaN or inf);
    otherwise ``None``.

    With them the summed KL needs a handful of passes over the posterior (sums, no
    per-element ``expm1``), and its default ``N(0, 1)`` skips the exact no-ops ``- 0``, ``/ 1``.
    """
    if (
        p_loc.numel() != 1
        or p_scale.numel() != 1
        or p_loc.device.type != "cpu"
        or q.device.type != "cpu"
        or torch.compiler.is_compiling()
    ):
        return None
    m, s = float(p_loc), float(p_scale)
    if not (0.0 < s < math.inf and math.isfinite(m)):
        return None
    return m, s


def _kl_sum_value(
    q_loc: Tensor,
    q_scale: Tensor,
    p_loc: Tensor,
    p_scale: Tensor,
    scalars: tuple[float, float] | None,
) -> Tensor:
    r"""``normal_kl(...).sum()``, equal to rounding.

    Against a one-entry prior :math:`\mathcal N(m, s^2)` given as numbers (``scalars``), one
    sum over the ratios :math:`r = \sigma / s` through :math:`t = r - 1` (exact near the prior,
    as ``expm1`` is in the elementwise form):

    .. math::
        \tfrac12\big(r^2 - 1 - 2\log r\big) + \tfrac12\Big(\frac{\mu - m}{s}\Big)^2
        = \big(t + \tfrac12 t^2\big) - \log r + \tfrac12\Big(\frac{\mu - m}{s}\Big)^2 .

    Per element, :math:`t + t^2/2` and :math:`\log r` come from the same rounded :math:`r`, so
    near the prior their rounding cancels as the elementwise form's does; the terms are summed
    once (torch's cascade summation; computed in float32 for a bfloat16 layer). Five passes
    (three in place) and one reduction over two weight-sized temporaries (one more for
    :math:`s \ne 1`, one for :math:`m \ne 0`), instead of the elementwise form's dozen passes
    and five temporaries, and no ``expm1`` (not vectorised on the CPU). The total,
    :math:`\ge 0` exactly, is clamped at 0 against rounding. Otherwise the elementwise
    :func:`normal_kl`, summed.
    """
    if scalars is None:
        # normal_kl's operations in its order, in place where they may be.
        log_ratio = torch.log(q_scale).sub_(torch.log(p_scale))
        spread = torch.mul(log_ratio, 2).expm1_().sub_(log_ratio, alpha=2).clamp_min_(0)
        shift = torch.sub(q_loc, p_loc).div_(p_scale)
        return spread.add_(shift.mul_(shift)).sum() * 0.5
    m, s = scalars
    dtype = q_scale.dtype
    if dtype == torch.bfloat16:  # bfloat16 terms would keep 3 digits
        q_loc, q_scale = q_loc.float(), q_scale.float()
    ratio = q_scale if s == 1.0 else torch.div(q_scale, s)
    terms = torch.sub(ratio, 1.0)
    terms.addcmul_(terms, terms, value=0.5).sub_(torch.log(ratio))
    diff = q_loc if m == 0.0 else torch.sub(q_loc, m)
    terms.addcmul_(diff, diff, value=0.5 / (s * s))
    value = max(float(terms.sum()), 0.0)
    return torch.tensor(value, dtype=dtype, device=q_scale.device)


def _kl_sums_value(
    groups: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
) -> tuple[Tensor, list[tuple[float, float] | None]]:
    """:func:`_kl_sum_value` of every group ``(q_loc, q_scale, p_loc, p_scale)``, added in
    order, and each group's prior numbers (:func:`_prior_scalars`) for the backward."""
    scalars = [_prior_scalars(p_loc, p_scale, q_loc) for q_loc, _, p_loc, p_scale in groups]
    total: Tensor | None = None
    for group, numbers in zip(groups, scalars, strict=True):
        value = _kl_sum_value(*group, numbers)
        total = value if total is None else total + value
    if total is None:
        raise ValueError("a KL sum needs at least one group")
    return total, scalars


def _kl_sum_grads(
    grad: Tensor,
    q_loc: Tensor,
    q_scale: Tensor,
    p_loc: Tensor,
    p_scale: Tensor,
    scalars: tuple[float, float] | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The closed-form gradients of :func:`_kl_sum_value` for ``q_loc``, ``q_scale`` and, for a
    learned prior (its tensors require grad), ``p_loc`` and ``p_scale``."""
    loc_zero = scalars is not None and scalars[0] == 0.0
    scale_one = scalars is not None and scalars[1] == 1.0
    need_q_loc, need_q_scale, need_p_loc, need_p_scale = needs
    coef = grad if scale_one else grad / p_scale.square()
    grad_loc = grad_scale = grad_p_loc = grad_p_scale = None
    diff = None
    if need_q_loc or need_p_loc or need_p_scale:
        diff = q_loc if loc_zero else torch.sub(q_loc, p_loc)
    if need_p_scale:
        assert diff is not None
        # Before grad_loc reuses diff's memory. n weights per prior entry (broadcast).
        n = q_loc.numel() // p_scale.numel()
        spread = _sum_squares_to(q_scale, p_scale.shape)
        spread = spread + _sum_squares_to(diff, p_scale.shape)
        grad_p_scale = (n - spread / p_scale.square()) / p_scale * grad
    if need_q_loc or need_p_loc:
        assert diff is not None
        grad_loc = torch.mul(diff, coef) if diff is q_loc else diff.mul_(coef)
        if need_p_loc:
            grad_p_loc = grad_loc.sum_to_size(p_loc.shape).neg()
        if not need_q_loc:
            grad_loc = None
    if need_q_scale:
        grad_scale = torch.div(grad.neg(), q_scale).addcmul_(q_scale, coef)
    return grad_loc, grad_scale, grad_p_loc, grad_p_scale


def _sum_squares_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.square().sum_to_size(shape)``; a dot product (no temporary) for a one-entry shape."""
    if shape.numel() == 1:
        flat = t.reshape(-1)
        return torch.dot(flat, flat).reshape(shape)
    return t.square().sum_to_size(shape)


class _NormalKLSum(torch.autograd.Function):
    r"""``normal_kl(...).sum()`` with a hand-written backward.

    Autograd through :func:`normal_kl` records a dozen weight-sized temporaries and replays as
    many elementwise passes backwards; the gradient is known in closed form and elementwise,

    .. math::
        \partial_{\mu_q} = \frac{\mu_q-\mu_p}{\sigma_p^2}, \qquad
        \partial_{\sigma_q} = \frac{\sigma_q}{\sigma_p^2} - \frac{1}{\sigma_q},

    so the backward is two passes per input and nothing is saved but the inputs. A prior that
    is learned (empirical Bayes: its tensors require grad) gets its gradient too, summed over
    the weights each of its entries covers (:math:`n` of them):

    .. math::
        \partial_{\mu_p} = -\sum \frac{\mu_q-\mu_p}{\sigma_p^2}, \qquad
        \partial_{\sigma_p} = \frac{n}{\sigma_p}
        - \frac{\sum\big(\sigma_q^2 + (\mu_q-\mu_p)^2\big)}{\sigma_p^3},

    two sums of squares (one dot product each for a scalar prior) on top of the posterior's
    passes.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q_loc: Tensor,
        q_scale: Tensor,
        p_loc: Tensor,
        p_scale: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(q_loc, q_scale, p_loc, p_scale)
        ctx.scalars = _prior_scalars(p_loc, p_scale, q_loc)
        return _kl_sum_value(q_loc, q_scale, p_loc, p_scale, ctx.scalars)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q_loc, q_scale, p_loc, p_scale = ctx.saved_tensors
        return _kl_sum_grads(
            grad, q_loc, q_scale, p_loc, p_scale, ctx.scalars, tuple(ctx.needs_input_grad)
        )


class _NormalKLSums(torch.autograd.Function):
    """:class:`_NormalKLSum` over several groups ``(q_loc, q_scale, p_loc, p_scale)`` (a layer's
    weights and bias), added in order: one graph node and one backward call instead of one per
    group plus an addition, which at small layers costs more than their arithmetic. The value
    is bit-identical to adding the groups' :func:`normal_kl_sum` one after the other."""

    @staticmethod
    def forward(ctx: Any, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors)
        groups = [tensors[i : i + 4] for i in range(0, len(tensors), 4)]
        total, ctx.scalars = _kl_sums_value(groups)  # type: ignore[arg-type]
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        tensors, needs = ctx.saved_tensors, ctx.needs_input_grad
        grads: list[Tensor | None] = []
        for i, scalars in zip(range(0, len(tensors), 4), ctx.scalars, strict=True):
            q_loc, q_scale, p_loc, p_scale = tensors[i : i + 4]
            needed = tuple(needs[i : i + 4])
            grads += _kl_sum_grads(grad, q_loc, q_scale, p_loc, p_scale, scalars, needed)
        return tuple(grads)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it (cheaper than
    ``torch.broadcast_shapes`` on the per-step path)."""
    if shape == target or not shape:
        return True
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))


def normal_kl_sum(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    r"""``normal_kl(q_loc, q_scale, p_loc, p_scale).sum()`` (0-dim), the layers' hot path.

    The same value to rounding (against a one-entry prior on the CPU, the default, it is formed
    from a few sums, see :func:`_kl_sum_value`; otherwise with the elementwise operations of
    :func:`normal_kl`, bit for bit); the backward is a closed-form elementwise pass instead of
    autograd through every intermediate (about 3x less time and no saved temporaries), for the
    posterior and for a prior whose tensors require grad (a learned prior scale). If the prior is
    larger than the posterior it falls back to autograd through :func:`normal_kl`, as it does under
    ``torch.compile`` (which fuses the plain expression itself) and ``torch.func.vmap``.
    """
    if q_loc.dtype == torch.float16:
        # float16 tops out at 65504; a 300 x 300 layer's KL is ~4e5. Sum in float32.
        return normal_kl_sum(q_loc.float(), q_scale.float(), p_loc.float(), p_scale.float())
    if not _fast_path(q_loc, q_scale, p_loc, p_scale):
        return normal_kl(q_loc, q_scale, p_loc, p_scale).sum()
    return _NormalKLSum.apply(q_loc, q_scale, p_loc, p_scale)


def _fast_path(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> bool:
    """Whether :func:`normal_kl_sum` takes its closed-form backward (float16 aside): not under
    ``torch.compile`` or ``torch.func`` transforms (``_plain_ops_only``), nor for a prior larger
    than the posterior (a learned prior, whose tensors require grad, gets its closed-form
    gradient)."""
    return not (
        q_loc.dtype == torch.float16
        or _plain_ops_only()
        or q_scale.shape != q_loc.shape
        or not _broadcasts_to(p_loc.shape, q_loc.shape)
        or not _broadcasts_to(p_scale.shape, q_loc.shape)
    )


def normal_kl_sums(groups: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Tensor:
    """``normal_kl_sum(*groups[0]) + normal_kl_sum(*groups[1]) + ...``, in that order (0-dim).

    The same value, bit for bit; where every group takes :func:`normal_kl_sum`'s fast path they
    are computed in one autograd node (a layer's weights and bias: one backward call, not two
    plus an addition).
    """
    if len(groups) > 1 and all(_fast_path(*group) for group in groups):
        return _NormalKLSums.apply(*(t for group in groups for t in group))
    total = None
    for group in groups:
        value = normal_kl_sum(*group)
        total = value if total is None else total + value
    if total is None:
        raise ValueError("normal_kl_sums needs at least one group")
    return total


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
    if isinstance(q, Normal):
        # torch.randn rather than q.rsample() (the same numbers): vmap draws it per model.
        eps = torch.randn(q.loc.shape, generator=generator, device=q.loc.device, dtype=q.loc.dtype)
        z = q.loc + q.scale * eps
        # log q(z) from the noise itself, the same value as q.log_prob(z) but exact where
        # (z - loc) / scale rounds, or where scale**2 underflows (a scale at its floor).
        log_q = -0.5 * eps.square() - torch.log(q.scale) - 0.5 * math.log(2 * math.pi)
        return log_q - p.log_prob(z)
    if q.has_rsample:
        z = q.rsample()
    else:
        raise NotImplementedError(
            f"no closed-form KL for ({type(q).__name__}, {type(p).__name__}) and "
            f"{type(q).__name__} has no rsample for a Monte Carlo estimate"
        )
    return q.log_prob(z) - p.log_prob(z)


def _float16_to_float32(dist: Distribution) -> Distribution:
    """A shallow copy of ``dist`` whose float16 tensors (nested ones too) are float32 copies."""
    new = copy.copy(dist)
    for key, value in vars(dist).items():
        if isinstance(value, Tensor) and value.dtype == torch.float16:
            new.__dict__[key] = value.float()
        elif isinstance(value, Distribution):
            new.__dict__[key] = _float16_to_float32(value)
    return new


def distribution_kl_sum(
    q: Distribution,
    p: Distribution,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r""":func:`distribution_kl` summed over every entry (0-dim), in float32 for float16 input.

    The same rule as :func:`normal_kl_sum`, for every prior family: float16 tops out at 65504,
    and a layer's KL is a sum of ~1 nat per weight (a 300 x 300 layer's is ~1e5), so with
    float16 parameters the terms are computed and summed in float32 (gradients still reach the
    float16 parameters). Other dtypes are summed in their own precision.
    """
    if any(t.dtype == torch.float16 for t in vars(q).values() if isinstance(t, Tensor)):
        q, p = _float16_to_float32(q), _float16_to_float32(p)
    return distribution_kl(q, p, generator=generator).sum()


def entropy_kl(entropy: Tensor, samples: list[tuple[Tensor, Distribution]]) -> Tensor:
    r""":math:`KL(q\,\|\,p) \approx -H(q) - \sum_k \log p_k(z_k)` for a joint draw :math:`z \sim q`.

    For a posterior with a closed-form entropy but no closed-form cross-entropy to the prior
    (the radial posterior against a scale-mixture prior, say): unbiased, with the Monte Carlo
    noise of the cross-entropy only.

    Args:
        entropy: :math:`H(q)`, 0-dim.
        samples: ``(z_k, p_k)`` pairs: the parts of one reparameterized draw (the weights, the
            bias) and the elementwise priors over them.

    Returns:
        The estimate, 0-dim.
    """
    if any(z.dtype == torch.float16 for z, _ in samples):
        # As distribution_kl_sum: float16 sums of ~1 nat per weight overflow; use float32.
        samples = [(z.float(), _float16_to_float32(prior)) for z, prior in samples]
        entropy = entropy.float()
    cross = sum((-prior.log_prob(z).sum() for z, prior in samples), torch.zeros_like(entropy))
    return cross - entropy
