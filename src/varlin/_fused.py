r"""One autograd node for a mean-field layer's whole training step: ``(y, KL)``.

:class:`varlin.LinearVariationalNormal` with the mean-field family and Normal priors computes,
per call, the scales :math:`\sigma = \operatorname{softplus}(\rho)`, one stochastic output by its
estimator and the closed-form KL. Recorded op by op, that is about twenty autograd nodes whose
bookkeeping costs more than their arithmetic at small sizes, and whose backward replays
elementwise passes the math does not need (the sample's and the KL's gradients of
:math:`\sigma` are added in a pass of their own before softplus's backward).
:class:`_MeanFieldStep` does the same forward, op for op, and writes the backward out by hand:

.. math::
    \nabla_\mu = X^\top G + \nabla_\mu \mathrm{KL}, \qquad
    \nabla_\rho = \big(\nabla_\sigma \text{ of the sample} + \nabla_\sigma \mathrm{KL}\big)
    \odot \operatorname{sigmoid}(\rho),

with :math:`G` the gradient of the output and the estimator's own :math:`\nabla_\sigma` (for
reparameterization :math:`X^\top G \odot \epsilon`). Values are bit-identical to the op-by-op
path (the same operations in the same order); gradients agree to rounding (tests pin both). A
double backward (``create_graph=True``) differentiates a recomputation of the step with the same
noise instead, so second derivatives are exact too.

It serves the common case only; :func:`fusable` says when, and every other case (other families,
priors without a closed form, float16 or autocast, ``torch.compile`` and ``torch.func``, Monte
Carlo sample slices, 1-D input) takes the op-by-op path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import functional
from .functional import _affine, _flip_signs, positive_scale
from .kl import _fast_path, _kl_sum_grads, _kl_sums_value, normal_kl

__all__: list[str] = []

_CODES = {"reparameterization": 0, "local": 1, "flipout": 2}


def fusable(x: Tensor, loc: Tensor, priors: Sequence[tuple[Tensor, Tensor, Tensor]]) -> bool:
    """Whether :func:`meanfield_step` serves this call.

    ``priors`` holds ``(posterior loc, prior loc, prior scale)`` for the weights and the bias.
    """
    return (
        x.dim() >= 2
        and x.dtype == loc.dtype
        and x.device == loc.device
        and x.stride(0) != 0  # a repeated batch (Monte Carlo slices) takes functional's path
        and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type))
        # the KL's closed-form path: not float16, torch.compile or torch.func, prior shapes
        and all(_fast_path(q, q, p_loc, p_scale) for q, p_loc, p_scale in priors)
    )


def meanfield_step(
    estimator: str,
    x: Tensor,
    loc: Tensor,
    raw_scale: Tensor,
    b_loc: Tensor | None,
    b_raw_scale: Tensor | None,
    w_prior: tuple[Tensor, Tensor],
    b_prior: tuple[Tensor, Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """``(y, KL(q || p))`` of a mean-field layer in one autograd node (see the module docstring).

    The noise is drawn in the order of :mod:`varlin.functional`'s estimator, so for the same
    generator state the output is the one the op-by-op path gives.
    """
    if b_loc is None:
        b_raw_scale = None
        b_prior = None
    priors = (*w_prior, *((None, None) if b_prior is None else b_prior))
    code = _CODES[estimator]
    out: tuple[Tensor, Tensor]
    if any(p is not None and p.requires_grad for p in priors):  # learned: inputs, for their grads
        out = _MeanFieldStep.apply(code, generator, None, x, loc, raw_scale, b_loc, b_raw_scale,
                                   *priors)  # fmt: skip
    else:  # fixed priors ride along as constants: no graph edges, nothing saved for them
        out = _MeanFieldStep.apply(code, generator, priors, x, loc, raw_scale, b_loc, b_raw_scale)
    return out


class _MeanFieldStep(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        code: int,
        generator: torch.Generator | None,
        constant_priors: tuple[Tensor | None, ...] | None,
        x: Tensor,
        loc: Tensor,
        raw: Tensor,
        b_loc: Tensor | None,
        b_raw: Tensor | None,
        *prior_inputs: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        # The priors (loc, scale, bias loc, bias scale): constants, or inputs when learned.
        ctx.constant_priors = constant_priors
        p_loc, p_scale, p_b_loc, p_b_scale = (
            prior_inputs if constant_priors is None else constant_priors
        )
        assert p_loc is not None and p_scale is not None
        ctx.set_materialize_grads(False)
        scale = positive_scale(raw)
        b_scale = None if b_raw is None else positive_scale(b_raw)
        # The KL first, while the scales just written are in the cache.
        groups = [(loc, scale, p_loc, p_scale)]
        if b_loc is not None:
            assert b_scale is not None and p_b_loc is not None and p_b_scale is not None
            groups.append((b_loc, b_scale, p_b_loc, p_b_scale))
        kl, ctx.scalars = _kl_sums_value(groups)
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        rand: dict[str, Any] = {"device": loc.device, "dtype": loc.dtype}
        if generator is not None:
            rand["generator"] = generator
        eps_b = None
        if code == 0:  # reparameterization: W = mu + sigma * eps, shared by the batch
            eps = torch.randn(loc.shape, **rand)
            weight = torch.addcmul(loc, scale, eps)
            bias = None
            if b_loc is not None:
                assert b_scale is not None
                eps_b = torch.randn(b_loc.shape, **rand)
                bias = torch.addcmul(b_loc, b_scale, eps_b)
            y = _affine(x2d, weight, bias)
            saved: tuple[Tensor | None, ...] = (
                eps, weight if x.requires_grad else None, None, None, None
            )  # fmt: skip
        elif code == 1:  # local reparameterization: sample each pre-activation
            mean = _affine(x2d, loc, b_loc)
            x2 = x2d * x2d
            s2 = scale * scale
            var = _affine(x2, s2, None if b_scale is None else b_scale * b_scale)
            std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
            eps = torch.randn((*x.shape[:-1], loc.shape[1]), **rand).view(-1, loc.shape[1])
            y = torch.addcmul(mean, std, eps)
            saved = (eps, x2, s2, var, std)
        else:  # flipout: one shared perturbation, signs per example
            mean = _affine(x2d, loc, b_loc)
            eps = torch.randn(loc.shape, **rand)
            delta_w = scale * eps
            sign_in, sign_out = _flip_signs(x, x, mean.view(*x.shape[:-1], loc.shape[1]), generator)
            sign_in, sign_out = sign_in.view(x2d.shape), sign_out.view(mean.shape)
            delta_b = None
            if b_loc is not None:
                assert b_scale is not None
                eps_b = torch.randn(b_loc.shape, **rand)
                delta_b = b_scale * eps_b
            xs = x2d * sign_in
            y = torch.addcmul(mean, _affine(xs, delta_w, delta_b), sign_out)
            saved = (eps, delta_w, xs, sign_in, sign_out)
        ctx.code = code
        ctx.x_shape = x.shape
        ctx.save_for_backward(
            x, loc, raw, scale, b_loc, b_raw, b_scale, eps_b, *saved, *prior_inputs
        )  # fmt: skip
        return (y if x.dim() == 2 else y.view(*x.shape[:-1], loc.shape[1])), kl

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_kl: Tensor | None) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            # create_graph=True (a double backward): the hand-written gradients below use
            # tensors the forward made without a graph, so differentiate a recomputation.
            return _recomputed_backward(ctx, grad_y, grad_kl)
        (x, loc, raw, scale, b_loc, b_raw, b_scale, eps_b,
         *saved) = ctx.saved_tensors  # fmt: skip
        saved, prior_inputs = saved[:5], saved[5:]  # the estimator's five slots, then priors
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        needs = ctx.needs_input_grad  # (code, generator, priors, x, loc, raw, b_loc, b_raw, ...)
        g_x = g_loc = g_scale = g_b_loc = g_b_scale = None
        if grad_y is not None:
            g = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, loc.shape[1])
            if ctx.code == 0:
                eps, weight = saved[:2]
                if needs[3]:
                    g_x = g.mm(weight.t())
                g_loc = x2d.t().mm(g)
                g_scale = g_loc * eps
                if b_loc is not None:
                    g_b_loc = g.sum(0)
                    g_b_scale = g_b_loc * eps_b
            else:
                # Both add noise * factor to the mean map: local's sqrt(x^2 sigma^2 + sigma_b^2)
                # * eps, flipout's ((x * r) (sigma * eps) + sigma_b * eps_b) * s.
                if ctx.code == 1:
                    eps, x2, s2, var, std = saved
                    # 2 dL/dvar = (dL/dy * eps) / std, zero where the variance was clamped.
                    tiny = torch.finfo(var.dtype).tiny
                    g_noise = torch.mul(g, eps).div_(std).masked_fill_(var < tiny, 0)
                    through, x_factor, rows, w_factor, b_factor = s2, x2d, x2, scale, b_scale
                else:
                    eps, delta_w, xs, sign_in, sign_out = saved
                    g_noise = g * sign_out
                    through, x_factor, rows, w_factor, b_factor = delta_w, sign_in, xs, eps, eps_b
                if needs[3]:
                    g_x = g.mm(loc.t()).add_(g_noise.mm(through.t()).mul_(x_factor))
                g_loc = x2d.t().mm(g)
                g_scale = rows.t().mm(g_noise).mul_(w_factor)
                if b_loc is not None:
                    g_b_loc = g.sum(0)
                    g_b_scale = g_noise.sum(0).mul_(b_factor)
        g_p: list[Tensor | None] = [None, None, None, None]
        if grad_kl is not None:
            learned = ctx.constant_priors is None
            p_loc, p_scale, p_b_loc, p_b_scale = _prior_tensors(ctx, prior_inputs)
            p_needs = tuple(needs[8:12]) if learned else (False,) * 4
            g_loc, g_scale, g_p[0], g_p[1] = _add_kl_grads(
                grad_kl, g_loc, g_scale, loc, scale, p_loc, p_scale, ctx.scalars[0],
                (needs[4], needs[5], *p_needs[:2]),
            )  # fmt: skip
            if b_loc is not None:
                g_b_loc, g_b_scale, g_p[2], g_p[3] = _add_kl_grads(
                    grad_kl, g_b_loc, g_b_scale, b_loc, b_scale, p_b_loc, p_b_scale,
                    ctx.scalars[1], (needs[6], needs[7], *p_needs[2:]),
                )  # fmt: skip
        g_raw = None if g_scale is None else _softplus_backward(g_scale, raw)
        g_b_raw = None if g_b_scale is None else _softplus_backward(g_b_scale, b_raw)
        if g_x is not None and x.dim() != 2:
            g_x = g_x.view(ctx.x_shape)
        grads = (
            None, None, None, g_x,
            g_loc if needs[4] else None, g_raw if needs[5] else None,
            g_b_loc if needs[6] else None, g_b_raw if needs[7] else None,
        )  # fmt: skip
        return grads if ctx.constant_priors is not None else (*grads, *g_p)


def _prior_tensors(ctx: Any, prior_inputs: Sequence[Tensor | None]) -> tuple[Any, ...]:
    """``(p_loc, p_scale, p_b_loc, p_b_scale)``: the saved inputs of a learned prior, or the
    constants the forward was given."""
    return tuple(prior_inputs) if ctx.constant_priors is None else ctx.constant_priors


def _recomputed_backward(
    ctx: Any, grad_y: Tensor | None, grad_kl: Tensor | None
) -> tuple[Any, ...]:
    """The gradients by autograd through the step's plain operations, with the forward's noise:
    differentiable again (for ``create_graph=True``), and the same values to rounding."""
    (x, loc, raw, _, b_loc, b_raw, _, eps_b, *saved) = ctx.saved_tensors  # fmt: skip
    saved, prior_inputs = saved[:5], saved[5:]
    p_loc, p_scale, p_b_loc, p_b_scale = _prior_tensors(ctx, prior_inputs)
    scale = positive_scale(raw)
    b_scale = None if b_raw is None else positive_scale(b_raw)
    x2d = x.reshape(-1, x.shape[-1])
    eps = saved[0]
    if ctx.code == 0:
        bias = None if b_loc is None or b_scale is None else b_loc + b_scale * eps_b
        y = _affine(x2d, loc + scale * eps, bias)
    elif ctx.code == 1:
        var = _affine(x2d * x2d, scale * scale, None if b_scale is None else b_scale * b_scale)
        y = _affine(x2d, loc, b_loc) + var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() * eps
    else:
        sign_in, sign_out = saved[3], saved[4]
        delta_b = None if b_scale is None else b_scale * eps_b
        perturbation = _affine(x2d * sign_in, scale * eps, delta_b)
        y = _affine(x2d, loc, b_loc) + perturbation * sign_out
    kl = normal_kl(loc, scale, p_loc, p_scale).sum()
    if b_loc is not None and b_scale is not None:
        kl = kl + normal_kl(b_loc, b_scale, p_b_loc, p_b_scale).sum()
    learned = ctx.constant_priors is None
    inputs = (x, loc, raw, b_loc, b_raw, *((p_loc, p_scale, p_b_loc, p_b_scale) if learned else ()))
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
    outputs, grads = [], []
    for out, grad in ((y, grad_y), (kl, grad_kl)):
        if grad is not None:
            outputs.append(out)
            grads.append(grad.reshape(out.shape))
    found = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, found, strict=True):
        result[i] = grad
    return (None, None, None, *result)


def _add_kl_grads(
    grad: Tensor,
    g_loc: Tensor | None,
    g_scale: Tensor | None,
    loc: Tensor,
    scale: Tensor,
    p_loc: Tensor,
    p_scale: Tensor,
    scalars: tuple[float, float] | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    r"""The sample's gradients of :math:`\mu` and :math:`\sigma` plus the KL's, and the prior's.

    Against a fixed one-entry prior :math:`\mathcal N(m, s^2)` whose numbers are known (the
    CPU, see :func:`varlin.kl._prior_scalars`), added in place:
    :math:`\partial_\mu \mathrel{+}= c(\mu - m)/s^2`,
    :math:`\partial_\sigma \mathrel{+}= c(\sigma/s^2 - 1/\sigma)`; otherwise
    :func:`varlin.kl._kl_sum_grads`' tensors are added.
    """
    if scalars is not None and g_loc is not None and g_scale is not None and not any(needs[2:]):
        m, s = scalars
        c = float(grad)
        a = c / (s * s)
        g_loc = g_loc.add_(loc, alpha=a) if m == 0.0 else g_loc.add_(loc - m, alpha=a)
        g_scale = g_scale.add_(scale, alpha=a).sub_(torch.reciprocal(scale), alpha=c)
        return g_loc, g_scale, None, None
    kl = _kl_sum_grads(grad, loc, scale, p_loc, p_scale, scalars, needs)
    return _add(g_loc, kl[0]), _add(g_scale, kl[1]), kl[2], kl[3]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a.add_(b)


def _softplus_backward(grad: Tensor, raw: Tensor) -> Tensor:
    """softplus's gradient, as autograd computes it (``threshold=20``: identity above)."""
    return torch.ops.aten.softplus_backward(grad, raw, 1.0, 20.0)


# Keep the estimator names in step with functional's table.
assert set(_CODES) == set(functional.ESTIMATORS)
