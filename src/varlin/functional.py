r"""Pure math of variational linear maps: one function per gradient estimator.

Every function takes the posterior's tensors of a mean-field Normal
:math:`q(W) = \prod_{ij} \mathcal N(W_{ij};\, \mu_{ij}, \sigma_{ij}^2)` over weights of shape
``(in_features, out_features)`` (``y = x @ W + b``) and an optional Normal bias, and returns one
stochastic output whose per-example mean and variance are, for every estimator,

.. math::
    \mathbb E[y_n] = x_n \mu_W + \mu_b, \qquad
    \operatorname{Var}[y_n] = x_n^{2} \sigma_W^{2} + \sigma_b^{2}.

They differ in how the noise is shared between the examples of a batch, hence in the variance of
the gradient: see ``docs/explanation.md``.

Randomness comes only from ``generator`` (a :class:`torch.Generator` on the tensors' device) or,
when it is ``None``, from torch's default generator.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mean_linear",
    "reparameterized_linear",
    "local_reparameterized_linear",
    "flipout_linear",
    "flip_perturbation",
    "inverse_softplus",
    "positive_scale",
    "ESTIMATORS",
]


def inverse_softplus(y: Tensor) -> Tensor:
    r"""Inverse of :func:`torch.nn.functional.softplus`, stable for small and large ``y > 0``.

    .. math:: x = y + \log(-\operatorname{expm1}(-y)).
    """
    return y + torch.log(-torch.expm1(-y))


def positive_scale(raw: Tensor) -> Tensor:
    r"""A scale :math:`\sigma = \operatorname{softplus}(\rho)`, floored at the dtype's ``tiny``.

    softplus underflows to 0 below :math:`\rho \approx -104` in float32 (-745 in float64, -17
    in float16), where :math:`\log\sigma` and the KL would be infinite. The floor is the
    smallest normal number of the dtype (1.2e-38 in float32). It is *added*, which costs nothing
    in the backward and leaves every scale above ~1e-31 (float32) bit-identical; in float16 an
    added 6.1e-5 would shift ordinary scales, so there it clamps.
    """
    scale = F.softplus(raw)
    tiny = torch.finfo(scale.dtype).tiny
    if scale.dtype == torch.float16:
        return scale.clamp_min(tiny)
    return scale.add_(tiny)  # in place: softplus's backward reads its input, not this output


def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight + bias`` with one fused call (``addmm``) for a single weight matrix."""
    if bias is not None and x.dim() >= 2 and weight.dim() == 2:
        if x.dim() == 2:
            return torch.addmm(bias, x, weight)
        y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return y.view(*x.shape[:-1], weight.shape[-1])
    y = torch.matmul(x, weight)
    return y if bias is None else y + bias


def _shared_rows(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` without its leading broadcast dimensions (stride 0, as from ``x.expand(S, ...)``).

    Monte Carlo prediction feeds the same batch to every sample slice; the parts of an estimator
    that do not depend on the noise are then computed once and broadcast. Only for a single
    weight matrix (stacked weights would broadcast against the stripped dimensions).
    """
    while weight.dim() == 2 and x.dim() > 2 and x.stride(0) == 0:
        x = x[0]
    return x


class _ShiftScaled(torch.autograd.Function):
    """``loc + scale * eps`` (``torch.addcmul``) for a constant ``eps`` of the same shape.

    Autograd's addcmul backward forms ``eps * 1`` before multiplying by the gradient (two
    weight-sized passes and a temporary); this one does ``grad * eps`` once and passes ``grad``
    through to ``loc`` uncopied.
    """

    @staticmethod
    def forward(ctx: Any, loc: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
        ctx.save_for_backward(eps)
        return torch.addcmul(loc, scale, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (eps,) = ctx.saved_tensors
        grad_scale = grad * eps if ctx.needs_input_grad[1] else None
        return grad, grad_scale, None


def _plain_ops_only() -> bool:
    """Whether the custom autograd Functions below must give way to the plain ops they replace.

    ``torch.compile`` fuses the plain ops itself, and ``torch.func`` transforms (``vmap`` over
    stacked models) cannot run a Function without a vmap rule.
    """
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _shift_scaled(loc: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
    """``torch.addcmul(loc, scale, eps)``, with the lean backward when shapes match.

    Only for large tensors (the saved pass outweighs a custom Function's call overhead from
    about 2**17 elements on a CPU), and not under ``torch.compile`` or ``torch.func.vmap``
    (:func:`_plain_ops_only`).
    """
    if (
        loc.numel() >= 1 << 17
        and torch.is_grad_enabled()
        and not _plain_ops_only()
        and (loc.requires_grad or scale.requires_grad)
        and loc.shape == scale.shape == eps.shape
    ):
        return _ShiftScaled.apply(loc, scale, eps)
    return torch.addcmul(loc, scale, eps)


def mean_linear(x: Tensor, w_loc: Tensor, b_loc: Tensor | None = None) -> Tensor:
    """The posterior-mean map ``x @ w_loc + b_loc``: no noise, bit-identical to that expression."""
    y = x @ w_loc
    return y if b_loc is None else y + b_loc


def _check_sample_dim(x: Tensor, num_weight_samples: int) -> int:
    """``num_weight_samples``, after checking that ``x`` leads with a dimension of that size."""
    if x.dim() < 2 or x.shape[0] != num_weight_samples:
        # reshape(s, -1, in) would otherwise silently regroup examples across samples.
        raise ValueError(
            f"x must have a leading sample dimension num_weight_samples={num_weight_samples}, "
            f"got shape {tuple(x.shape)}"
        )
    return num_weight_samples


def reparameterized_linear(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Sample the weights once, :math:`W = \mu + \sigma \odot \epsilon`, and apply them.

    The seed's estimator (Kingma & Welling 2014; Blundell et al. 2015): one weight sample is shared
    by every example in the batch, so the per-example noise is correlated across the batch.

    Args:
        x: input, ``(*, in_features)``.
        w_loc, w_scale: weight posterior mean and std, ``(in_features, out_features)``.
        b_loc, b_scale: bias posterior mean and std, ``(out_features,)``, or ``None``.
        generator: source of the noise.
        num_weight_samples: if given as ``S``, ``x`` has a leading sample dimension ``S`` and each
            slice ``x[s]`` gets its own independent weight sample (one batched matmul).

    Shape:
        Output: ``(*, out_features)``.
    """
    if num_weight_samples is None:
        eps = torch.randn(w_loc.shape, generator=generator, device=w_loc.device, dtype=w_loc.dtype)
        weight = _shift_scaled(w_loc, w_scale, eps)
        bias = None
        if b_loc is not None:
            assert b_scale is not None
            eps_b = torch.randn(
                b_loc.shape, generator=generator, device=b_loc.device, dtype=b_loc.dtype
            )
            bias = _shift_scaled(b_loc, b_scale, eps_b)
        return _affine(x, weight, bias)

    s = _check_sample_dim(x, num_weight_samples)
    in_features, out_features = w_loc.shape
    shape = (s, in_features, out_features)
    eps = torch.randn(shape, generator=generator, device=w_loc.device, dtype=w_loc.dtype)
    weight = torch.addcmul(w_loc, w_scale, eps)
    flat = x.reshape(s, -1, in_features)
    y = torch.bmm(flat, weight.to(flat.dtype) if flat.dtype != weight.dtype else weight)
    if b_loc is not None:
        assert b_scale is not None
        eps_b = torch.randn(
            (s, 1, out_features), generator=generator, device=b_loc.device, dtype=b_loc.dtype
        )
        y = y + torch.addcmul(b_loc, b_scale, eps_b)
    return y.reshape(*x.shape[:-1], out_features)


class _LocalStd(torch.autograd.Function):
    r"""Per-example output std of the local estimator, :math:`\sqrt{x^2\sigma_W^2+\sigma_b^2}`.

    The forward is the plain expression (``x * x``, ``w_scale * w_scale``, one GEMM, clamp at
    ``tiny``, sqrt). The backward uses :math:`\partial v/\partial\sigma_W = 2\sigma_W x^2`:
    one GEMM and one weight-sized pass, where autograd through ``w_scale * w_scale`` takes three
    weight-sized passes and a sum of two gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_scale: Tensor, b_scale: Tensor | None) -> Tensor:
        x2 = x * x
        s2 = w_scale * w_scale
        var = _affine(x2, s2, None if b_scale is None else b_scale * b_scale)
        # clamp: the gradient of sqrt at 0 is infinite; below `tiny` the variance is 0 anyway.
        std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
        ctx.save_for_backward(x, x2, w_scale, s2, b_scale, var, std)
        return std

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x2, w_scale, s2, b_scale, var, std = ctx.saved_tensors
        # 2 * dL/dvar = grad / std, zero where the clamp was active (as clamp_min's backward).
        grad_var2 = torch.div(grad, std).masked_fill_(var < torch.finfo(var.dtype).tiny, 0)
        flat = grad_var2.reshape(-1, grad_var2.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_var2, s2.t()).mul_(x)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(x2.reshape(-1, x2.shape[-1]).t(), flat).mul_(w_scale)
        if b_scale is not None and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0).mul_(b_scale)
        return grad_x, grad_w, grad_b


def _local_std(x: Tensor, w_scale: Tensor, b_scale: Tensor | None) -> Tensor:
    """:class:`_LocalStd` for one weight matrix when gradients flow, else the plain ops.

    The plain ops also serve stacked (batched) weights, ``torch.compile`` (which fuses them) and
    ``torch.func.vmap``.
    """
    if (
        torch.is_grad_enabled()
        and not _plain_ops_only()
        and w_scale.dim() == 2
        and (b_scale is None or b_scale.dim() == 1)
    ):
        return _LocalStd.apply(x, w_scale, b_scale)
    var = _affine(x * x, w_scale * w_scale, None if b_scale is None else b_scale * b_scale)
    return torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))


def local_reparameterized_linear(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Local reparameterization (Kingma, Salimans & Welling 2015): sample the pre-activations.

    Under a mean-field Normal posterior the output of each example is Normal with the moments in
    the module docstring, so it is sampled directly, independently for every example:

    .. math:: y_n = x_n\mu_W + \mu_b + \sqrt{x_n^2\sigma_W^2 + \sigma_b^2}\odot\epsilon_n .

    Draws ``batch x out_features`` normals instead of ``in x out``, at the cost of a second GEMM.
    Per-example noise is independent, so ``num_weight_samples`` needs no special handling.
    """
    del num_weight_samples  # every example, hence every sample slice, gets its own noise
    rows = _shared_rows(x, w_loc)  # mean and std of a repeated batch are computed once
    mean = _affine(rows, w_loc, b_loc)
    # torch.is_autocast_enabled raises for the meta device (shape inference, deferred init).
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        # x**2 overflows float16 for |x| > 256: the variance path stays in full precision.
        with torch.autocast(x.device.type, enabled=False):
            std = _local_std(rows.to(w_scale.dtype), w_scale, b_scale).to(mean.dtype)
    else:
        std = _local_std(rows, w_scale, b_scale)
    shape = (*x.shape[: x.dim() - rows.dim()], *mean.shape)
    eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return torch.addcmul(mean, std, eps)


_SIGN_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Row ``k`` holds the 8 bits of ``k`` as signs: ``(256, 8)``, entries ``±1``."""
    key = (device, dtype)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
        table = (bits & 1).to(dtype).mul_(2).sub_(1)
        if not torch.compiler.is_compiling():
            _SIGN_TABLES[key] = table
    return table


def _random_signs(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    like: Tensor,
) -> Tensor:
    """Independent fair ``±1`` of ``shape``: 8 signs per random byte, unpacked by table lookup.

    One generator call per 8 signs instead of one per sign: ``bernoulli_`` costs about as much as
    ``randn`` per element on the CPU (the generator is sequential), this about 1/20 of it.
    """
    n = math.prod(shape)
    words = torch.randint(
        0, 256, ((n + 7) // 8,), generator=generator, device=like.device, dtype=torch.int64
    )
    signs = _sign_table(like.device, like.dtype).index_select(0, words)
    return signs.view(-1)[:n].view(shape)


def flipout_linear(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Flipout (Wen et al. 2018): one shared perturbation, decorrelated per example by signs.

    With one draw :math:`\Delta W = \sigma_W \odot \epsilon` shared by the batch and random signs
    :math:`r_n \in \{\pm1\}^{in}`, :math:`s_n \in \{\pm1\}^{out}` per example,

    .. math:: y_n = x_n\mu_W + \mu_b + \big((x_n \odot r_n)\,\Delta W + \Delta b\big) \odot s_n .

    Each example sees a weight perturbation :math:`\Delta W \odot r_n s_n^\top` with the same
    marginal distribution as :math:`\Delta W`, but pairs of examples are (pseudo-)independent.
    """
    rows = _shared_rows(x, w_loc)  # the mean of a repeated batch is computed once
    mean = _affine(rows, w_loc, b_loc)
    # With num_weight_samples=S each slice x[s] gets its own perturbation (S draws, one bmm):
    # a single shared draw would make the S outputs of one example share it, and their spread
    # would not estimate the posterior's.
    lead = () if num_weight_samples is None else (_check_sample_dim(x, num_weight_samples),)
    eps = torch.randn(
        (*lead, *w_loc.shape), generator=generator, device=w_loc.device, dtype=w_loc.dtype
    )
    delta_w = w_scale * eps
    sign_in, sign_out = _flip_signs(x, rows, mean, generator)
    delta_b = None
    if b_loc is not None:
        assert b_scale is not None
        shape_b = (*lead, *([1] if lead else []), *b_loc.shape)
        eps_b = torch.randn(shape_b, generator=generator, device=b_loc.device, dtype=b_loc.dtype)
        delta_b = b_scale * eps_b
    return _flip(x, mean, delta_w, delta_b, sign_in, sign_out)


def _flip_signs(
    x: Tensor, rows: Tensor, mean: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Flipout's random signs over the inputs and the outputs of every example."""
    sign_in = _random_signs(x.shape, generator, x)
    sign_out = _random_signs((*x.shape[: x.dim() - rows.dim()], *mean.shape), generator, mean)
    return sign_in, sign_out


def _flip(
    x: Tensor,
    mean: Tensor,
    delta_w: Tensor,
    delta_b: Tensor | None,
    sign_in: Tensor,
    sign_out: Tensor,
) -> Tensor:
    """``mean + ((x * sign_in) @ delta_w + delta_b) * sign_out``; ``delta_w`` may be stacked
    ``(S, in, out)`` for ``S`` sample slices of ``x`` (``delta_b`` then ``(S, 1, out)``)."""
    if delta_w.dim() == 3:
        flat = (x * sign_in).reshape(delta_w.shape[0], -1, delta_w.shape[1])
        perturbation = torch.bmm(flat, delta_w.to(flat.dtype))
        if delta_b is not None:
            perturbation = perturbation + delta_b
        perturbation = perturbation.reshape(*x.shape[:-1], delta_w.shape[2])
    else:
        perturbation = _affine(x * sign_in, delta_w, delta_b)
    return torch.addcmul(mean, perturbation, sign_out)


def flip_perturbation(
    x: Tensor,
    w_loc: Tensor,
    b_loc: Tensor | None,
    delta_w: Tensor,
    delta_b: Tensor | None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Flipout with a given shared perturbation :math:`(\Delta W, \Delta b)`.

    For any posterior whose perturbation keeps its law under sign flips of its entries (the
    mean-field Normal, the radial distribution):
    :math:`y_n = x_n\mu_W + \mu_b + ((x_n\odot r_n)\Delta W + \Delta b)\odot s_n`. A stacked
    ``delta_w`` of shape ``(S, in, out)`` (``delta_b`` ``(S, 1, out)``) serves ``S`` sample
    slices of ``x``, one perturbation each.
    """
    rows = _shared_rows(x, w_loc)
    mean = _affine(rows, w_loc, b_loc)
    sign_in, sign_out = _flip_signs(x, rows, mean, generator)
    return _flip(x, mean, delta_w, delta_b, sign_in, sign_out)


ESTIMATORS = {
    "reparameterization": reparameterized_linear,
    "local": local_reparameterized_linear,
    "flipout": flipout_linear,
}
