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
    "conv",
    "mean_conv",
    "sampled_conv",
    "conv_moments",
    "reparameterized_conv",
    "local_reparameterized_conv",
    "flipout_conv",
    "flip_perturbation_conv",
    "conv_patches",
    "CONV_ESTIMATORS",
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


def _records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an operation on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
    # Written over the noise where no gradient is recorded (Monte Carlo prediction): the same
    # numbers without a second S×in×out tensor (vmap: eps may be narrower than the result).
    given = [t for t in (x, w_loc, w_scale, b_loc, b_scale) if t is not None]
    in_place = not (_records_grad(*given) or _plain_ops_only())
    if in_place:
        weight = torch.addcmul(w_loc, w_scale, eps, out=eps)
    else:
        weight = torch.addcmul(w_loc, w_scale, eps)
    flat = x.reshape(s, -1, in_features)
    y = torch.bmm(flat, weight.to(flat.dtype) if flat.dtype != weight.dtype else weight)
    if b_loc is not None:
        assert b_scale is not None
        eps_b = torch.randn(
            (s, 1, out_features), generator=generator, device=b_loc.device, dtype=b_loc.dtype
        )
        bias = torch.addcmul(b_loc, b_scale, eps_b)
        y = y.add_(bias) if in_place else y + bias
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


def _from(generator: torch.Generator | None) -> dict[str, Any]:
    """``generator=`` for a random factory, omitted when ``None``: with ``generator=None``
    torch selects an overload that ``torch.compile`` cannot trace with a dynamic size (a batch
    size that changed between calls)."""
    return {} if generator is None else {"generator": generator}


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
        0, 256, ((n + 7) // 8,), **_from(generator), device=like.device, dtype=torch.int64
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
    # In place where no gradient is recorded (Monte Carlo prediction: S in×out draws): the
    # same numbers, without an S×in×out temporary.
    in_place = not (_records_grad(w_scale) or _plain_ops_only())  # vmap: eps may be narrower
    delta_w = eps.mul_(w_scale) if in_place else w_scale * eps
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
        weights = delta_w.to(flat.dtype)
        if delta_b is None:
            perturbation = torch.bmm(flat, weights)
        else:  # the bias added by the batched GEMM itself, not in a pass of its own
            perturbation = torch.baddbmm(delta_b.to(flat.dtype), flat, weights)
        perturbation = perturbation.reshape(*x.shape[:-1], delta_w.shape[2])
        if not (_records_grad(perturbation, mean) or _plain_ops_only()):
            # Monte Carlo prediction: in place (the signs are exact, so the same numbers).
            return perturbation.mul_(sign_out).add_(mean)
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


# -- convolutions -------------------------------------------------------------------------------
# A convolution applies one linear map to every input patch: with the kernel
# ``(out, in/groups, *kernel_size)`` read as the matrix ``W = kernel.reshape(out, -1).T`` of shape
# ``(in/groups * prod(kernel_size), out)``, the output at each position is ``patch @ W + b``. The
# functions below take the mean-field posterior in kernel layout (``w_loc``, ``w_scale`` of the
# kernel's shape) and give every output position the moments of the linear estimators,
#
#     E[y] = conv(x, mu_W) + mu_b,    Var[y] = conv(x^2, sigma_W^2) + sigma_b^2,
#
# per example, channel and position. Positions of one example share the kernel, so their outputs
# are correlated under the posterior: reparameterization and flipout keep that correlation (one
# kernel per example), the local estimator samples every position independently (see
# docs/explanation.md, "Convolutions").

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

Size = int | tuple[int, ...]


def _normal(shape: Any, generator: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.randn(shape, **_from(generator), device=like.device, dtype=like.dtype)


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv1d``, ``F.conv2d`` or ``F.conv3d``, chosen by the kernel's number of dimensions.

    ``weight`` is ``(out, in/groups, *kernel_size)`` with 1 to 3 spatial dimensions.
    """
    fn = _CONVS.get(weight.dim() - 2)
    if fn is None:
        raise ValueError(
            f"weight must have shape (out, in/groups, *kernel_size) with 1 to 3 spatial "
            f"dimensions, got shape {tuple(weight.shape)}"
        )
    return fn(x, weight, bias, stride, padding, dilation, groups)


def mean_conv(
    x: Tensor,
    w_loc: Tensor,
    b_loc: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
) -> Tensor:
    """The posterior-mean convolution, bit-identical to ``F.conv*d(x, w_loc, b_loc, ...)``."""
    return conv(x, w_loc, b_loc, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _geometry(stride: Size, padding: Size | str, dilation: Size, groups: int) -> dict[str, Any]:
    return {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


def _kernel_noise(
    x: Tensor,
    w_loc: Tensor,
    b_loc: Tensor | None,
    generator: torch.Generator | None,
    num_weight_samples: int | None,
) -> tuple[Tensor, Tensor | None]:
    """Standard normals of the kernel's and the bias's shape, ``S`` of each for ``S`` slices."""
    lead = () if num_weight_samples is None else (_check_sample_dim(x, num_weight_samples),)
    eps = _normal((*lead, *w_loc.shape), generator, w_loc)
    return eps, None if b_loc is None else _normal((*lead, *b_loc.shape), generator, b_loc)


def _conv_rows(x: Tensor, num_weight_samples: int | None) -> tuple[Tensor, int | None, bool]:
    """The batch that the noise-free parts of an estimator see, ``(B, C, *spatial)``.

    Returns ``(rows, S, shared)``: without sample slices ``x`` itself; with ``S`` slices
    ``x (S, N, C, ...)`` either ``x[0]`` when every slice holds the same rows (stride 0, as
    ``x.expand(S, ...)`` makes them; computed once and broadcast), or the ``S * N`` rows folded.
    """
    if num_weight_samples is None:
        return x, None, False
    s = _check_sample_dim(x, num_weight_samples)
    if x.stride(0) == 0:
        return x[0], s, True
    return x.flatten(0, 1), s, False


def _unfold_rows(y: Tensor, s: int | None, shared: bool) -> Tensor:
    """Undo the folding of :func:`_conv_rows` on an output (a shared one stays broadcastable)."""
    return y if s is None or shared else y.unflatten(0, (s, -1))


def sampled_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
    num_weight_samples: int | None = None,
) -> Tensor:
    """The convolution with given (sampled) kernels.

    Without ``num_weight_samples``, one kernel ``(out, in/groups, *k)`` and bias ``(out,)``.
    With ``num_weight_samples=S``, ``x`` is ``(S, N, C, *spatial)`` and ``weight`` holds ``S``
    kernels ``(S, out, in/groups, *k)`` (``bias`` ``(S, out)``): slice ``x[s]`` is convolved with
    kernel ``s``, all in one grouped convolution (``S * groups`` groups over ``S * C`` channels).
    """
    geometry = _geometry(stride, padding, dilation, groups)
    if num_weight_samples is None:
        return conv(x, weight, bias, **geometry)
    s = _check_sample_dim(x, num_weight_samples)
    if weight.shape[0] != s:
        raise ValueError(
            f"weight must hold num_weight_samples={s} kernels along dimension 0, got shape "
            f"{tuple(weight.shape)}"
        )
    n, c = x.shape[1], x.shape[2]
    folded = x.transpose(0, 1).reshape(n, s * c, *x.shape[3:])
    kernels = weight.reshape(s * weight.shape[1], *weight.shape[2:])
    geometry["groups"] = s * groups
    y = conv(folded, kernels, None if bias is None else bias.reshape(-1), **geometry)
    return y.view(n, s, -1, *y.shape[2:]).transpose(0, 1)


def conv_moments(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""Exact mean and variance of every output of a mean-field convolution, for a fixed ``x``.

    .. math::
        \mathbb E[y] = x \star \mu_W + \mu_b,\qquad
        \operatorname{Var}[y] = x^2 \star \sigma_W^2 + \sigma_b^2,

    per example, output channel and position (:math:`\star`: the convolution). The marginals
    of the output: positions that share a kernel are correlated, which this does not describe.
    """
    geometry = _geometry(stride, padding, dilation, groups)
    mean = conv(x, w_loc, b_loc, **geometry)
    return mean, _conv_variance(x, w_scale, b_scale, geometry, mean.dtype)


def _conv_variance(
    x: Tensor, w_scale: Tensor, b_scale: Tensor | None, geometry: dict[str, Any], dtype: Any
) -> Tensor:
    b_var = None if b_scale is None else b_scale * b_scale
    # torch.is_autocast_enabled raises for the meta device (shape inference, deferred init).
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        # x**2 overflows float16 for |x| > 256: the variance path stays in full precision.
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(w_scale.dtype)
            return conv(xf * xf, w_scale * w_scale, b_var, **geometry).to(dtype)
    return conv(x * x, w_scale * w_scale, b_var, **geometry)


def reparameterized_conv(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Sample the kernel once, :math:`W = \mu + \sigma\odot\epsilon`, and convolve with it.

    One kernel sample per call, shared by every example and position of the batch (the
    reparameterization estimator of :func:`reparameterized_linear`). With
    ``num_weight_samples=S``, ``x`` is ``(S, N, C, *spatial)`` and each slice gets its own kernel
    (one grouped convolution).

    Args:
        x: input ``(N, C, *spatial)`` (or ``(C, *spatial)``).
        w_loc, w_scale: kernel posterior mean and std, ``(out, in/groups, *kernel_size)``.
        b_loc, b_scale: bias posterior mean and std, ``(out,)``, or ``None``.
        stride, padding, dilation, groups: as for ``F.conv2d``.
        generator: source of the noise.
        num_weight_samples: ``S`` independent kernels for the ``S`` leading slices of ``x``.
    """
    eps, eps_b = _kernel_noise(x, w_loc, b_loc, generator, num_weight_samples)
    weight = _shift_scaled(w_loc, w_scale, eps)
    bias = None
    if b_loc is not None and eps_b is not None:
        assert b_scale is not None
        bias = torch.addcmul(b_loc, b_scale, eps_b)
    return sampled_conv(
        x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
        num_weight_samples=num_weight_samples,
    )  # fmt: skip


def local_reparameterized_conv(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Local reparameterization for a convolution: sample every output from its marginal.

    .. math::
        y = x\star\mu_W + \mu_b + \sqrt{x^2\star\sigma_W^2 + \sigma_b^2}\odot\epsilon,

    two convolutions and one normal per output, no kernel-sized noise (Kingma, Salimans &
    Welling 2015; Molchanov et al. 2017 for convolutions). Each output has the exact marginal
    of :func:`reparameterized_conv`'s, but outputs at different positions of one example get
    independent noise, where one sampled kernel would correlate them. Independent per output,
    so ``num_weight_samples`` needs no special handling beyond the shape.
    """
    geometry = _geometry(stride, padding, dilation, groups)
    rows, s, shared = _conv_rows(x, num_weight_samples)
    mean = conv(rows, w_loc, b_loc, **geometry)
    if s is None and _lean_local(rows, w_scale, b_scale, padding):
        eps = _normal(mean.shape, generator, mean)
        return _LocalConv.apply(mean, rows, w_scale, b_scale, eps, geometry)
    var = _conv_variance(rows, w_scale, b_scale, geometry, mean.dtype)
    # clamp: the gradient of sqrt at 0 is infinite; below `tiny` the variance is 0 anyway.
    std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
    mean, std = _unfold_rows(mean, s, shared), _unfold_rows(std, s, shared)
    shape = (s, *mean.shape) if shared else mean.shape
    eps = _normal(shape, generator, mean)
    return torch.addcmul(mean, std, eps)


def _lean_local(x: Tensor, w_scale: Tensor, b_scale: Tensor | None, padding: Any) -> bool:
    """Whether :class:`_LocalConv` applies: gradients flow, no autocast or tracing, and a
    batched input and a padding that ``convolution_backward`` takes (numbers or ``"valid"``)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not (
        w_scale.requires_grad or x.requires_grad or (b_scale is not None and b_scale.requires_grad)
    ):
        return False
    if x.device.type == "meta" or torch.is_autocast_enabled(x.device.type):
        return False
    batched = x.dim() == w_scale.dim()
    return batched and (not isinstance(padding, str) or padding == "valid")


class _LocalConv(torch.autograd.Function):
    r"""``mean + sqrt(x^2 * w_scale^2 + b_scale^2) * eps`` (``*``: the convolution) with a
    lean backward.

    Forward: ``x * x``, one convolution, the clamp at ``tiny`` and the square root in place, one
    ``addcmul``. Backward, with :math:`g = 2\,\partial L/\partial v = \text{grad}\,\epsilon /
    \text{std}` (0 where the clamp was active, as clamp's backward): the gradient of
    :math:`\sigma_W` is the convolution's weight gradient of ``x^2`` and ``g`` times
    :math:`\sigma_W`; ``grad`` passes to ``mean`` uncopied. Autograd through the plain ops takes
    about twice the passes over the output.
    """

    @staticmethod
    def forward(
        ctx: Any,
        mean: Tensor,
        x: Tensor,
        w_scale: Tensor,
        b_scale: Tensor | None,
        eps: Tensor,
        geometry: dict[str, Any],
    ) -> Tensor:
        x2 = x * x
        b_var = None if b_scale is None else b_scale * b_scale
        s2 = w_scale * w_scale
        std = conv(x2, s2, b_var, **geometry)
        tiny = torch.finfo(std.dtype).tiny
        # On the CPU one reduction (and a free sync) tells whether the clamp acts anywhere,
        # which it almost never does; then neither the clamp nor the backward's mask is needed
        # (three passes fewer).
        ctx.clamped = std.device.type != "cpu" or bool(std.min() < tiny)
        if ctx.clamped:
            std.clamp_min_(tiny)
        std.sqrt_()
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, x2, w_scale, s2,
                              b_scale, std, eps)  # fmt: skip
        ctx.geometry = geometry
        return torch.addcmul(mean, std, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x2, w_scale, s2, b_scale, std, eps = ctx.saved_tensors
        g = torch.mul(grad, eps).div_(std)
        if ctx.clamped:  # where the variance was clamped (std == sqrt(tiny)), its gradient is 0
            g.masked_fill_(std <= math.sqrt(torch.finfo(std.dtype).tiny), 0)
        geometry = ctx.geometry
        d = s2.dim() - 2
        stride, dilation = _expand(geometry["stride"], d), _expand(geometry["dilation"], d)
        padding = _expand(0 if geometry["padding"] == "valid" else geometry["padding"], d)
        with_bias = b_scale is not None and ctx.needs_input_grad[3]
        mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2], with_bias]
        # The bias's gradient (g summed over examples and positions) comes with the weights'.
        grad_in, grad_s2, grad_b2 = torch.ops.aten.convolution_backward(
            g, x2, s2, [s2.shape[0]], stride, padding, dilation, False, [0] * d,
            geometry["groups"], mask,
        )  # fmt: skip
        grad_x = None if grad_in is None or x is None else grad_in.mul_(x)
        grad_w = None if grad_s2 is None else grad_s2.mul_(w_scale)
        grad_b = None if grad_b2 is None or not with_bias else grad_b2.mul_(b_scale)
        return grad, grad_x, grad_w, grad_b, None, None


def _expand(value: Any, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims


def flipout_conv(
    x: Tensor,
    w_loc: Tensor,
    w_scale: Tensor,
    b_loc: Tensor | None = None,
    b_scale: Tensor | None = None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Flipout for a convolution (Wen et al. 2018): one shared kernel perturbation, flipped by
    random signs over the input and output channels of every example.

    With :math:`\Delta W = \sigma_W\odot\epsilon` shared by the batch and signs
    :math:`r_n\in\{\pm1\}^{C_{in}}`, :math:`s_n\in\{\pm1\}^{C_{out}}` per example (the same at
    every position),

    .. math::
        y_n = x_n\star\mu_W + \mu_b
        + \big((x_n\odot r_n)\star\Delta W + \Delta b\big)\odot s_n .

    Example ``n`` sees the kernel perturbation :math:`\Delta W_{oc\cdot}\,s_{n,o} r_{n,c}`, which
    has the law of :math:`\Delta W`, at all of its positions; pairs of examples are
    (pseudo-)independent. With ``num_weight_samples=S`` each slice draws its own perturbation.
    """
    eps, eps_b = _kernel_noise(x, w_loc, b_loc, generator, num_weight_samples)
    delta_w = w_scale * eps
    delta_b = None
    if eps_b is not None:
        assert b_scale is not None
        delta_b = b_scale * eps_b
    return flip_perturbation_conv(
        x, w_loc, b_loc, delta_w, delta_b, stride=stride, padding=padding, dilation=dilation,
        groups=groups, generator=generator, num_weight_samples=num_weight_samples,
    )  # fmt: skip


def flip_perturbation_conv(
    x: Tensor,
    w_loc: Tensor,
    b_loc: Tensor | None,
    delta_w: Tensor,
    delta_b: Tensor | None,
    *,
    stride: Size = 1,
    padding: Size | str = 0,
    dilation: Size = 1,
    groups: int = 1,
    generator: torch.Generator | None = None,
    num_weight_samples: int | None = None,
) -> Tensor:
    r"""Flipout with a given kernel perturbation :math:`(\Delta W, \Delta b)`.

    For any posterior whose perturbation keeps its law when the signs of its input-channel
    slices and output-channel slices are flipped (mean-field Normal, radial). With
    ``num_weight_samples=S``, ``delta_w`` is ``(S, out, in/groups, *k)`` and ``delta_b``
    ``(S, out)``: one perturbation per slice of ``x``.
    """
    geometry = _geometry(stride, padding, dilation, groups)
    rows, s, shared = _conv_rows(x, num_weight_samples)
    mean = _unfold_rows(conv(rows, w_loc, b_loc, **geometry), s, shared)
    spatial = (1,) * (w_loc.dim() - 2)
    sign_in = _random_signs((*x.shape[: x.dim() - len(spatial)], *spatial), generator, x)
    perturbation = sampled_conv(
        x * sign_in, delta_w, delta_b, **geometry, num_weight_samples=num_weight_samples
    )
    out = perturbation.shape[: perturbation.dim() - len(spatial)]
    sign_out = _random_signs((*out, *spatial), generator, perturbation)
    return torch.addcmul(mean, perturbation, sign_out)


def conv_patches(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...] | None = None,
    dilation: tuple[int, ...] | None = None,
) -> Tensor:
    """Every input patch of a convolution as a row: ``(N, C, *spatial) -> (N, *out_spatial, C*K)``.

    ``K = prod(kernel_size)``; a patch's entries are ordered as the kernel's ``(C, *kernel_size)``,
    so ``conv_patches(x, k) @ kernel.reshape(out, -1).T`` equals ``conv(x, kernel)`` with the
    channel dimension last. Pad ``x`` first (``F.pad``): no padding is applied here. A view
    chain of ``Tensor.unfold`` (one per spatial dimension) and one copy; memory ``K`` times the
    input's.
    """
    d = len(kernel_size)
    stride = stride or (1,) * d
    dilation = dilation or (1,) * d
    for i, (k, step, dil) in enumerate(zip(kernel_size, stride, dilation, strict=True)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, step)
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, C, *out_spatial, *kernel_size) -> (N, *out_spatial, C, *kernel_size)
    x = x.movedim(1, 1 + d)
    return x.reshape(*x.shape[: 1 + d], -1)


CONV_ESTIMATORS = {
    "reparameterization": reparameterized_conv,
    "local": local_reparameterized_conv,
    "flipout": flipout_conv,
}
