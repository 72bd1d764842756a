r"""Variational convolutions: ``VariationalConv1d``, ``VariationalConv2d``, ``VariationalConv3d``.

A convolution is a linear map applied to every input patch. With the kernel
``(out_channels, in_channels/groups, *kernel_size)`` read as the matrix

.. math:: W = \operatorname{kernel.reshape}(C_{out}, -1)^\top
    \quad\text{of shape}\quad (C_{in}/g\cdot\textstyle\prod_i k_i,\ C_{out}),

each output position is ``patch @ W + b``. The layers here are therefore variational linear
layers (:class:`~varlin.layers.BayesianLinearBase`) over that matrix: the posterior family, the
priors (built for the shape ``(in_features, out_features)`` of the matrix), the KL,
``varlin.deterministic``, ``varlin.kl_divergence``, ``weight_samples`` and the MOPED
initialisation are the linear layers', and only the map from inputs to outputs differs. Their
``forward(x)`` returns ``y`` (drop-in for ``nn.Conv*d``); the KL comes from
``layer.kl_divergence()`` or :func:`varlin.kl_divergence` of the model.

Estimators, as far as the family allows:

- ``"reparameterization"``: one kernel sample per call, every family;
- ``"local"``: each output sampled from its exact marginal. For a factorised Gaussian family
  (mean-field; matrix-normal with diagonal factors) two convolutions, :math:`x\star\mu_W` and
  :math:`x^2\star\sigma_W^2`, and no kernel-sized noise; for a correlated Gaussian family
  (low-rank, full, matrix-normal) the family samples each position's outputs jointly from the
  input patches (``groups=1`` only: with groups, the outputs of different groups see different
  inputs, and their covariance is not something the family gives);
- ``"flipout"``: sign vectors over the input and the output channels of every example (Wen et
  al. 2018), for the families whose perturbation keeps its law under sign flips (mean-field,
  radial).

All three give every output (example, channel, position) the same mean and variance. They
differ in how noise is shared: reparameterization and flipout use one kernel per example at all
its positions, which correlates the positions as the posterior does; the local estimator draws
every position independently, which is right for each output but not for the joint law of an
example's outputs: its training loss estimates a surrogate of the ELBO in which the positions'
noise is independent (see ``docs/explanation.md``, "Convolutions"). For prediction
(:func:`varlin.layers.weight_samples`, used by :func:`varlin.predict`) every slice must be one
posterior sample, so there a local layer samples one kernel per slice.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal

from . import _validation as V
from . import functional
from .layers import BayesianLinearBase, Estimator, Posterior

__all__ = [
    "BayesianConvBase",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "PADDING_MODES",
]

#: ``padding_mode`` values, as for ``nn.Conv*d``.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_SPATIAL_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}


def _sizes(name: str, value: Any, dims: int, *, minimum: int) -> tuple[int, ...]:
    """An int or a tuple of ``dims`` ints, each ``>= minimum``, as a tuple."""
    items = value if isinstance(value, (tuple, list)) else (value,) * dims
    rule = f"{name} must be an integer >= {minimum} or a tuple of {dims} such integers"
    if len(items) != dims:
        raise ValueError(f"{rule}, got {V.describe(value)}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{rule}, got {V.describe(value)}")
        if item < minimum:
            raise ValueError(f"{rule}, got {V.describe(value)}")
    return tuple(int(item) for item in items)


class BayesianConvBase(BayesianLinearBase):
    r"""Shared machinery of the variational convolutions (not used directly).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as for ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``
            (``padding`` also ``"same"`` or ``"valid"``; ``padding_mode`` one of
            :data:`PADDING_MODES`).
        make_weights_prior: callable ``(in_features, out_features) -> Distribution`` over the
            kernel as a matrix, ``in_features = in_channels // groups * prod(kernel_size)``,
            ``out_features = out_channels`` (see the module docstring); default standard Normal.
        make_bias_prior: callable ``(out_channels,) -> Distribution``; default standard Normal.
        estimator, init_scale, generator, posterior, rank, factors: as for
            :class:`~varlin.VariationalLinear`, over the kernel matrix.

    Attributes:
        in_features: ``in_channels // groups * prod(kernel_size)``, the inputs of each output
            (rows of the kernel matrix); ``out_features`` equals ``out_channels``.
        kernel_loc: the posterior mean as a kernel ``(out_channels, in_channels // groups,
            *kernel_size)`` (a view of the matrix ``w_loc``).
    """

    dims: ClassVar[int] = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        make_weights_prior: Any = None,
        make_bias_prior: Any = None,
        estimator: Estimator = "reparameterization",
        init_scale: float = 1e-2,
        generator: torch.Generator | None = None,
        posterior: Posterior = "meanfield",
        rank: int | None = None,
        factors: str | None = None,
        **kwargs: Any,
    ) -> None:
        d = self.dims
        if d not in _SPATIAL_NAMES:
            raise TypeError(
                f"{type(self).__name__} has no spatial dimensions; use VariationalConv1d, "
                "VariationalConv2d or VariationalConv3d"
            )
        in_channels = V.positive_int("in_channels", in_channels)
        out_channels = V.positive_int("out_channels", out_channels)
        groups = V.positive_int("groups", groups)
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            if channels % groups:
                raise ValueError(
                    f"{name}={channels} must be divisible by groups={groups} (each group "
                    "convolves its own share of the channels)"
                )
        kernel = _sizes("kernel_size", kernel_size, d, minimum=1)
        strides = _sizes("stride", stride, d, minimum=1)
        dilations = _sizes("dilation", dilation, d, minimum=1)
        pads: tuple[int, ...] | str
        if isinstance(padding, str):
            pads = V.one_of("padding", padding, ("same", "valid"))
            if pads == "same" and any(s != 1 for s in strides):
                raise ValueError(
                    f"padding='same' needs stride 1 in every dimension (as for nn.Conv{d}d), "
                    f"got stride={strides}"
                )
        else:
            pads = _sizes("padding", padding, d, minimum=0)
        padding_mode = V.one_of("padding_mode", padding_mode, PADDING_MODES)
        fan_in = in_channels // groups * math.prod(kernel)
        super().__init__(
            fan_in, out_channels, bias, make_weights_prior, make_bias_prior,
            estimator=estimator, init_scale=init_scale, generator=generator,
            posterior=posterior, rank=rank, factors=factors, device=device, dtype=dtype,
            **kwargs,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel
        self.stride = strides
        self.padding = pads
        self.dilation = dilations
        self.groups = groups
        self.padding_mode = padding_mode
        # Per side, in F.pad's order (last dimension first), as nn.Conv*d computes it.
        self._side_pads: tuple[int, ...] = self._pad_amounts()
        with torch.no_grad():
            # Whether the weights are independent Gaussians: then every estimator works from
            # the marginals (a property of the family and its options, fixed at construction).
            t = self._realise()
            self._factorised = self.w_posterior.gaussian and self.w_posterior.entropy_gap(t) is None
        if self.estimator == "local" and not self._factorised and groups > 1:
            raise ValueError(
                f"estimator='local' with posterior={self.posterior_name!r} needs groups=1 in a "
                f"convolution, got groups={groups} (outputs of different groups see different "
                f"inputs and are correlated through the posterior); the valid estimator for "
                f"posterior={self.posterior_name!r} with groups={groups} is 'reparameterization'"
            )

    def _pad_amounts(self) -> tuple[int, ...]:
        d = self.dims
        if self.padding == "valid":
            return (0,) * (2 * d)
        if self.padding == "same":
            amounts: list[int] = []
            for k, dil in zip(reversed(self.kernel_size), reversed(self.dilation), strict=True):
                total = dil * (k - 1)
                amounts += [total // 2, total - total // 2]
            return tuple(amounts)
        assert not isinstance(self.padding, str)
        return tuple(p for p in reversed(self.padding) for _ in range(2))

    # -- kernels ----------------------------------------------------------------------------
    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """``(out_channels, in_channels // groups, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def kernel(self, matrix: Tensor) -> Tensor:
        """``(*, in_features, out_features)`` kernel matrices as kernels ``(*, *kernel_shape)``."""
        lead = matrix.shape[:-2]
        return matrix.transpose(-1, -2).reshape(*lead, *self.kernel_shape)

    @property
    def kernel_loc(self) -> Tensor:
        """The posterior mean kernel, a view of ``w_loc`` (``copy_`` sets it)."""
        return self.kernel(self.w_loc)

    @property
    def kernel_scale(self) -> Tensor:
        """The posterior standard deviation of every kernel entry."""
        return self.kernel(self.w_scale)

    # -- input ------------------------------------------------------------------------------
    def _shape_text(self, samples: int | None) -> str:
        spatial = _SPATIAL_NAMES[self.dims]
        if samples is not None:
            return (
                f"(S, N, C_in, {spatial}) with S = num_weight_samples = {samples} and "
                f"C_in = in_channels = {self.in_channels}"
            )
        return f"(N, C_in, {spatial}) or (C_in, {spatial}) with C_in = in_channels = " + str(
            self.in_channels
        )

    def _check_input(self, x: Tensor, samples: int | None) -> tuple[Tensor, bool]:
        """``x`` batched (an unbatched input gains a batch dimension: the flag says so)."""
        V.floating_tensor("x", x)
        d = self.dims
        unbatched = samples is None and x.dim() == d + 1
        rank = d + 2 if samples is None else d + 3
        if not unbatched and (x.dim() != rank or (samples is not None and x.shape[0] != samples)):
            raise ValueError(
                f"x must have shape {self._shape_text(samples)} for {type(self).__name__}, got "
                f"shape {tuple(x.shape)}"
            )
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[-d - 1] != self.in_channels:
            raise ValueError(
                f"x must have shape {self._shape_text(samples)} for {type(self).__name__}, got "
                f"shape {tuple(x.shape)} ({x.shape[-d - 1]} channels)"
            )
        V.same_dtype("x", x, self.w_loc)
        for i in range(d):
            size = x.shape[-d + i]
            before, after = self._side_pads[2 * (d - 1 - i)], self._side_pads[2 * (d - 1 - i) + 1]
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            if size + before + after < span:
                raise ValueError(
                    f"x has spatial size {size} in dimension {x.dim() - d + i}, padded to "
                    f"{size + before + after}, smaller than the kernel's span "
                    f"dilation * (kernel_size - 1) + 1 = {span}; got shape {tuple(x.shape)}"
                )
            largest = max(before, after)
            limit = size - 1 if self.padding_mode == "reflect" else size
            if self.padding_mode in ("reflect", "circular") and largest > limit:
                rule = "<" if self.padding_mode == "reflect" else "<="
                raise ValueError(
                    f"padding_mode={self.padding_mode!r} needs padding {rule} the input size in "
                    f"every spatial dimension, got padding {largest} for size {size} in "
                    f"dimension {x.dim() - d + i} of shape {tuple(x.shape)}"
                )
        if V.is_validating():
            V.check_finite("x", x)
        return x, unbatched

    def _pad(self, x: Tensor, mode: str) -> Tensor:
        """``x`` padded with ``mode`` (any leading dimensions; a shared sample dimension stays
        shared)."""
        d = self.dims
        if x.dim() == d + 3:
            if x.stride(0) == 0:
                return self._pad(x[0], mode).expand(x.shape[0], *([-1] * (d + 2)))
            return self._pad(x.flatten(0, 1), mode).unflatten(0, x.shape[:2])
        if mode == "zeros":
            return F.pad(x, self._side_pads)
        return F.pad(x, self._side_pads, mode=mode)

    def _geometry(self) -> dict[str, Any]:
        """Keyword arguments of the convolution (after the padding of a non-zero mode)."""
        padding = self.padding if self.padding_mode == "zeros" else 0
        return {
            "stride": self.stride,
            "padding": padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    def _padded_input(self, x: Tensor) -> Tensor:
        return x if self.padding_mode == "zeros" else self._pad(x, self.padding_mode)

    # -- output -----------------------------------------------------------------------------
    def _output(self, x: Tensor, t: Any = None) -> Tensor:
        samples = self._num_weight_samples
        x, unbatched = self._check_input(x, samples)
        x = self._padded_input(x)
        if self._use_mean:
            y = self._mean_output(x, samples)
        else:
            y = self._sample(x, self._realise() if t is None else t, samples)
        return y.squeeze(0) if unbatched else y

    def _mean_output(self, x: Tensor, samples: int | None) -> Tensor:
        """The posterior-mean convolution, ``F.conv*d(x, kernel_loc, b_loc, ...)``."""
        if samples is not None:  # deterministic inside weight_samples: fold the slices
            if x.stride(0) == 0:
                return self._mean_output(x[0], None).expand(samples, *([-1] * (x.dim() - 1)))
            return self._mean_output(x.flatten(0, 1), None).unflatten(0, x.shape[:2])
        return functional.mean_conv(x, self.kernel_loc, self.b_loc, **self._geometry())

    def _sample(self, x: Tensor, t: Any, samples: int | None) -> Tensor:
        family = self.w_posterior
        geometry = self._geometry()
        noise: dict[str, Any] = {"generator": self.generator, "num_weight_samples": samples}
        estimator = self.estimator
        if estimator == "local" and samples is not None:
            # weight_samples promises each slice one posterior sample of the weights; local
            # noise is right per output but independent across the positions of an example,
            # so the slices of a prediction sample the kernel instead.
            estimator = "reparameterization"
        if self._factorised:
            w_loc, w_std, b_loc, b_std = family.marginals(t)
            estimate = functional.CONV_ESTIMATORS[estimator]
            return estimate(
                x, self.kernel(w_loc), self.kernel(w_std), b_loc, b_std, **geometry, **noise
            )
        if estimator == "local":
            return self._local_from_patches(x, t)
        lead = () if samples is None else (samples,)
        w, b = family.rsample_weights(t, lead, self.generator)
        if estimator == "flipout":
            # W - M is exactly the deviation of the sampled weights (Sterbenz: W and M are
            # close), so the perturbation is the sample's, rounding included.
            w_loc, b_loc = family.weight_loc, family.bias_loc_of(self.b_posterior)
            delta_b = None if b is None or b_loc is None else b - b_loc
            return functional.flip_perturbation_conv(
                x, self.kernel(w_loc), b_loc, self.kernel(w - w_loc), delta_b, **geometry,
                **noise,
            )  # fmt: skip
        return functional.sampled_conv(x, self.kernel(w), b, **geometry, num_weight_samples=samples)

    def _patches(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial)`` (padded by a non-zero mode already) -> ``(B, *out, C * K)``."""
        if self.padding_mode == "zeros":
            x = self._pad(x, "zeros")
        return functional.conv_patches(x, self.kernel_size, stride=self.stride,
                                       dilation=self.dilation)  # fmt: skip

    def _local_from_patches(self, x: Tensor, t: Any) -> Tensor:
        # The family samples every patch's outputs from their joint law (groups == 1 here).
        y = self.w_posterior.sample_output(self._patches(x), t, "local", generator=self.generator)
        return y.movedim(-1, 1)

    def output_moments(self, x: Tensor) -> Normal:
        r"""The exact marginal distribution of every output for a fixed input.

        A :class:`~torch.distributions.Normal` of the output's shape ``(N, C_out, *spatial)``:
        for a factorised family
        :math:`\mathcal N(x\star\mu_W + \mu_b,\; x^2\star\sigma_W^2 + \sigma_b^2)`, what the
        local estimator samples from; for a correlated Gaussian family each output's variance
        from its input patch. Outputs that share a kernel (positions of one example; channels
        under a correlated family) are correlated; this gives their marginals only. The radial
        family raises (its outputs are not Gaussian).
        """
        x, unbatched = self._check_input(x, None)
        x = self._padded_input(x)
        t = self._realise()
        geometry = self._geometry()
        if self._factorised:
            w_loc, w_std, b_loc, b_std = self.w_posterior.marginals(t)
            mean, var = functional.conv_moments(
                x, self.kernel(w_loc), self.kernel(w_std), b_loc, b_std, **geometry
            )
        else:
            mean = functional.mean_conv(x, self.kernel_loc, self.b_loc, **geometry)
            var = self._correlated_variance(x, t)
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        if unbatched:
            mean, std = mean.squeeze(0), std.squeeze(0)
        return Normal(mean, std, validate_args=False)

    def _correlated_variance(self, x: Tensor, t: Any) -> Tensor:
        """Per-output variance under a correlated family, ``(N, C_out, *spatial)``."""
        per_group_in = self.in_channels // self.groups
        per_group_out = self.out_channels // self.groups
        parts = []
        for g in range(self.groups):
            patches = self._patches(x[:, g * per_group_in : (g + 1) * per_group_in])
            law = self.w_posterior.output_distribution(patches, t)
            parts.append(law.variance[..., g * per_group_out : (g + 1) * per_group_out])
        return torch.cat(parts, dim=-1).movedim(-1, 1)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0,) * self.dims:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self.dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if not self.has_bias:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        text += f", estimator={self.estimator!r}"
        if self.posterior_name != "meanfield":
            text += f", posterior={self.posterior_name!r}"
        return text

    def forward(self, x: Tensor) -> Tensor:
        """A stochastic output (the posterior mean inside :func:`varlin.deterministic`)."""
        return self._output(x)


class VariationalConv1d(BayesianConvBase):
    r"""Drop-in variational ``nn.Conv1d``: a posterior over the kernel and bias.

    Same constructor as ``nn.Conv1d`` plus varlin's options (see :class:`BayesianConvBase`).

    Shape:
        - Input: ``(N, C_in, L)`` or ``(C_in, L)``. Output: ``(N, C_out, L_out)`` or
          ``(C_out, L_out)``, ``L_out`` as for ``nn.Conv1d``.

    Example:
        >>> layer = VariationalConv1d(2, 4, kernel_size=3, padding=1, estimator="local")
        >>> layer(torch.randn(8, 2, 16)).shape
        torch.Size([8, 4, 16])
    """

    dims = 1


class VariationalConv2d(BayesianConvBase):
    r"""Drop-in variational ``nn.Conv2d``: a posterior over the kernel and bias.

    Same constructor as ``nn.Conv2d`` plus varlin's options (see :class:`BayesianConvBase`).

    .. math::
        y = x\star W + b,\quad W_{oc\,ij}\sim\mathcal N(\mu_{oc\,ij}, \sigma_{oc\,ij}^2)
        \text{ (mean-field)}.

    Shape:
        - Input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``. Output: ``(N, C_out, H_out, W_out)``
          or ``(C_out, H_out, W_out)``, sizes as for ``nn.Conv2d``.

    Example:
        >>> layer = VariationalConv2d(1, 8, kernel_size=3, padding=1)
        >>> y = layer(torch.randn(4, 1, 8, 8))
        >>> y.shape, varlin.kl_divergence(layer).shape
        (torch.Size([4, 8, 8, 8]), torch.Size([]))
    """

    dims = 2


class VariationalConv3d(BayesianConvBase):
    r"""Drop-in variational ``nn.Conv3d``: a posterior over the kernel and bias.

    Same constructor as ``nn.Conv3d`` plus varlin's options (see :class:`BayesianConvBase`).

    Shape:
        - Input: ``(N, C_in, D, H, W)`` or ``(C_in, D, H, W)``. Output:
          ``(N, C_out, D_out, H_out, W_out)`` or without ``N``, sizes as for ``nn.Conv3d``.
    """

    dims = 3
