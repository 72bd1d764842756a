r"""Tests for the variational convolutions: the estimators of ``varlin.functional`` and the layers.

For a fixed input every estimator must give each output (example, channel, position) the
marginal of the posterior's output,

.. math:: y \sim \mathcal N\big(x\star\mu_W + \mu_b,\; x^2\star\sigma_W^2 + \sigma_b^2\big),

checked against a second route (the input patches, ``F.unfold``, times the kernel as a matrix).
They differ in how the noise is shared: reparameterization uses one kernel for the batch,
flipout one kernel per example (decorrelated between examples by its sign vectors), both
correlate the positions of one example as the posterior does; the local estimator samples every
output independently.

Statistical tests: float64, an explicit generator, a stated number of independent draws,
tolerances from ``conftest.FAILURE_RATE`` with a Bonferroni factor over the entries checked.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import pytest
import test_families
import torch
import torch.nn.functional as TF
from conftest import (
    correlation_tolerance,
    mean_tolerance,
    sample_correlation,
    variance_tolerance,
    z_bound,
)
from torch import nn

import varlin
from varlin import functional
from varlin.conv import BayesianConvBase
from varlin.functional import CONV_ESTIMATORS, conv_moments, conv_patches, mean_conv, sampled_conv
from varlin.layers import weight_samples

F64 = torch.float64
NAMES = sorted(CONV_ESTIMATORS)
C_IN, C_OUT, K = 2, 4, 3
CONVS = {1: varlin.VariationalConv1d, 2: varlin.VariationalConv2d, 3: varlin.VariationalConv3d}
TORCH_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

#: Two geometries: plain, and strided + dilated + grouped (each group one input channel).
GEOMETRIES: dict[str, dict[str, Any]] = {
    "plain": {"stride": 1, "padding": 1, "dilation": 1, "groups": 1},
    "strided": {"stride": 2, "padding": 2, "dilation": 2, "groups": 2},
}

#: Independent calls (plain geometry) and independent sample slices (strided geometry).
NUM_CALLS = 4000
NUM_SLICES = 20_000


def _posterior(groups: int = 1, dtype: torch.dtype = F64, seed: int = 0) -> dict[str, Any]:
    """Distinct means and scales away from 0, so a transposed or mixed-up term shows."""
    g = torch.Generator().manual_seed(seed)
    shape = (C_OUT, C_IN // groups, K, K)
    return {
        "w_loc": torch.randn(shape, generator=g, dtype=dtype),
        "w_scale": 0.2 + torch.rand(shape, generator=g, dtype=dtype),
        "b_loc": torch.randn(C_OUT, generator=g, dtype=dtype),
        "b_scale": 0.2 + torch.rand(C_OUT, generator=g, dtype=dtype),
    }


def _inputs(dtype: torch.dtype = F64) -> torch.Tensor:
    """4 examples of 2 x 5 x 5: examples 0 and 1 identical, example 2 with a zero entry,
    example 3 positive (neighbouring positions then share a large part of their variance)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, C_IN, 5, 5, generator=g, dtype=dtype)
    x[1] = x[0]
    x[2, 0, 2, 2] = 0.0
    x[3] = x[3].abs() + 0.5
    return x


def _patch_moments(
    x: torch.Tensor, p: dict[str, Any], geometry: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of every output by the second route: ``F.unfold`` patches of each
    group times the kernel as a matrix, ``(N, C_out, H_out, W_out)``."""
    groups = geometry["groups"]
    c_in, c_out = C_IN // groups, C_OUT // groups
    means, variances = [], []
    for g in range(groups):
        patches = TF.unfold(
            x[:, g * c_in : (g + 1) * c_in],
            K,
            dilation=geometry["dilation"],
            padding=geometry["padding"],
            stride=geometry["stride"],
        ).transpose(1, 2)  # (N, L, c_in * K * K)
        rows = slice(g * c_out, (g + 1) * c_out)
        w = p["w_loc"][rows].reshape(c_out, -1).T
        s2 = p["w_scale"][rows].reshape(c_out, -1).T ** 2
        means.append(patches @ w + p["b_loc"][rows])
        variances.append((patches * patches) @ s2 + p["b_scale"][rows] ** 2)
    side = int(math.isqrt(means[0].shape[1]))
    mean = torch.cat(means, -1).transpose(1, 2).reshape(x.shape[0], C_OUT, side, side)
    var = torch.cat(variances, -1).transpose(1, 2).reshape(x.shape[0], C_OUT, side, side)
    return mean, var


@functools.cache
def _draws(name: str) -> torch.Tensor:
    """``NUM_CALLS`` independent calls of one estimator, plain geometry: ``(N, 4, 4, 5, 5)``."""
    p, x = _posterior(), _inputs()
    g = torch.Generator().manual_seed(2024)
    estimate = CONV_ESTIMATORS[name]
    with torch.no_grad():
        return torch.stack(
            [estimate(x, **p, **GEOMETRIES["plain"], generator=g) for _ in range(NUM_CALLS)]
        )


def _rounded(p: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) for k, v in p.items()}


@functools.cache
def _slice_draws(name: str) -> torch.Tensor:
    """``NUM_SLICES`` sample slices of one batched call, strided geometry, shared input.

    In float32: a grouped convolution with ``S * groups`` groups is orders of magnitude slower
    in float64 on a CPU. The closed form is computed in float64 from the same float32 values;
    float32 rounding (~1e-7 relative) is far below the statistical tolerances (~5%).
    """
    geometry = GEOMETRIES["strided"]
    p = _rounded(_posterior(geometry["groups"]), torch.float32)
    x = _inputs().float()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        y = CONV_ESTIMATORS[name](
            x.expand(NUM_SLICES, *x.shape), **p, **geometry, generator=g,
            num_weight_samples=NUM_SLICES,
        )  # fmt: skip
    return y.double()


# -- functional: the conv estimators -----------------------------------------------------------


def test_conv_estimator_registry() -> None:
    assert set(CONV_ESTIMATORS) == set(functional.ESTIMATORS)
    assert CONV_ESTIMATORS["local"] is functional.local_reparameterized_conv


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_moments_match_the_patch_route(geometry: str) -> None:
    g = GEOMETRIES[geometry]
    p, x = _posterior(g["groups"]), _inputs()
    mean, var = conv_moments(x, **p, **g)
    expected_mean, expected_var = _patch_moments(x, p, g)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_per_output_moments_over_independent_calls(name: str) -> None:
    r"""Sample mean and variance over N = 4000 independent calls vs the closed form, per output.

    Mean: exactly :math:`\mathcal N(\mu, \sigma^2/N)` (every estimator's outputs are Gaussian),
    so :math:`|\bar y - \mu| \le z\sigma/\sqrt N`. Variance: normal approximation to the
    chi-square, :math:`|s^2-\sigma^2| \le z\sigma^2\sqrt{2/(N-1)}`. ``z`` at a 1e-6 two-sided
    rate with Bonferroni over 2 x 400 entries.
    """
    samples = _draws(name)
    mean, var = _patch_moments(_inputs(), _posterior(), GEOMETRIES["plain"])
    checks = 2 * mean.numel()
    assert (samples.mean(0) - mean).abs().le(mean_tolerance(var, NUM_CALLS, checks)).all()
    assert (samples.var(0) - var).abs().le(variance_tolerance(var, NUM_CALLS, checks)).all()


@pytest.mark.parametrize("name", NAMES)
def test_per_output_moments_over_sample_slices(name: str) -> None:
    r"""The batched path (``num_weight_samples=S``, strided, dilated, 2 groups): across
    S = 20 000 slices of one shared input each slice is one independent draw.

    Same tolerances as above, Bonferroni over 2 x 144 entries. With one input channel per
    group a flipout perturbation shared by the slices would give each output only two values
    (a sign flip) across slices, far from the closed-form variance: each slice draws its own.
    """
    geometry = GEOMETRIES["strided"]
    y = _slice_draws(name)
    p = _rounded(_rounded(_posterior(geometry["groups"]), torch.float32), F64)
    mean, var = _patch_moments(_inputs().float().double(), p, geometry)
    assert y.shape == (NUM_SLICES, *mean.shape)
    checks = 2 * mean.numel()
    assert (y.mean(0) - mean).abs().le(mean_tolerance(var, NUM_SLICES, checks)).all()
    assert (y.var(0) - var).abs().le(variance_tolerance(var, NUM_SLICES, checks)).all()


def test_reparameterized_slices_are_independent() -> None:
    """Consecutive slices use independent kernels: the lag-1 correlation over S - 1 pairs has
    sd 1/sqrt(S - 1), bounded at a 1e-6 rate with Bonferroni over the 144 outputs."""
    y = _slice_draws("reparameterization").flatten(1)
    lag = sample_correlation(y[:-1], y[1:])
    assert lag.abs().max() <= correlation_tolerance(NUM_SLICES - 1, y.shape[1])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_identical_examples_share_noise_only_under_reparameterization(name: str) -> None:
    r"""Examples 0 and 1 are identical: one kernel per call makes them equal in every call under
    reparameterization; local and flipout decorrelate them (correlation across calls within
    :math:`z\sqrt{3/N}`, the factor 3 for dependent Gaussian marginals, Bonferroni over the 100
    outputs of an example; rate 1e-6)."""
    samples = _draws(name)
    first, second = samples[:, 0].flatten(1), samples[:, 1].flatten(1)
    if name == "reparameterization":
        assert torch.equal(first, second)
        return
    corr = sample_correlation(first, second)
    assert corr.abs().max() <= correlation_tolerance(NUM_CALLS, first.shape[1], 3.0)
    if name == "local":
        assert not (first == second).any()


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_positions_of_one_example_are_correlated_as_the_posterior_says(name: str) -> None:
    r"""Two neighbouring positions of example 3 share the kernel: under reparameterization and
    flipout (one kernel per example) their outputs have the closed-form correlation
    :math:`(\sum P_pP_q\sigma^2 + \sigma_b^2)/(\mathrm{sd}_p\mathrm{sd}_q)`, per channel; the
    local estimator draws them independently (correlation 0). Tolerance
    :math:`z\sqrt{3/N}` (the sd of a sample correlation of Gaussian pairs is at most
    :math:`\sqrt{3/N}`), Bonferroni over 4 channels, rate 1e-6.
    """
    samples = _draws(name)
    x, p = _inputs(), _posterior()
    patches = TF.unfold(x[3:4], K, padding=1).transpose(1, 2)[0]  # (25, 18)
    first, second = 2 * 5 + 2, 2 * 5 + 3  # positions (2, 2) and (2, 3)
    s2 = p["w_scale"].reshape(C_OUT, -1).T ** 2
    _, var = _patch_moments(x, p, GEOMETRIES["plain"])
    var = var[3].flatten(1)
    cov = (patches[first] * patches[second]) @ s2 + p["b_scale"] ** 2
    expected = cov / torch.sqrt(var[:, first] * var[:, second])
    outputs = samples[:, 3].flatten(2)
    corr = sample_correlation(outputs[..., first], outputs[..., second])
    bound = correlation_tolerance(NUM_CALLS, C_OUT, kurtosis_factor=3.0)
    if name == "local":
        expected = torch.zeros_like(expected)
    else:
        assert expected.abs().min() > 3 * bound  # far from 0: the test tells the cases apart
    assert (corr - expected).abs().max() <= bound


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_loc_and_raw_scale(name: str, bias: bool) -> None:
    p = _posterior()
    w_loc = p["w_loc"].clone().requires_grad_()
    w_raw = functional.inverse_softplus(p["w_scale"]).requires_grad_()
    b_loc = p["b_loc"].clone().requires_grad_() if bias else None
    b_raw = functional.inverse_softplus(p["b_scale"]).requires_grad_() if bias else None
    x = torch.randn(3, C_IN, 5, 5, dtype=F64)
    y = CONV_ESTIMATORS[name](
        x, w_loc, TF.softplus(w_raw), b_loc, None if b_raw is None else TF.softplus(b_raw),
        padding=1,
    )  # fmt: skip
    (y**2).sum().backward()
    for leaf in [w_loc, w_raw] + ([b_loc, b_raw] if bias else []):
        assert leaf is not None and leaf.grad is not None
        assert torch.isfinite(leaf.grad).all() and (leaf.grad != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_local_gradient_finite_at_zero_variance(name: str) -> None:
    """An all-zero example has zero output variance; sqrt's infinite slope must not leak NaN."""
    p = _posterior()
    w_raw = functional.inverse_softplus(p["w_scale"]).requires_grad_()
    x = torch.zeros(2, C_IN, 4, 4, dtype=F64)
    x[1] = 1.0
    CONV_ESTIMATORS[name](x, p["w_loc"], TF.softplus(w_raw)).sum().backward()
    assert w_raw.grad is not None and torch.isfinite(w_raw.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_explicit_generator_reproduces_and_default_generator_untouched(name: str) -> None:
    p, x = _posterior(), _inputs()

    def run(seed: int) -> torch.Tensor:
        return CONV_ESTIMATORS[name](x, **p, generator=torch.Generator().manual_seed(seed))

    before = torch.random.get_rng_state()
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("name", NAMES)
def test_zero_scale_is_the_mean(name: str) -> None:
    p, x = _posterior(), _inputs()
    zero = torch.zeros_like(p["w_scale"])
    y = CONV_ESTIMATORS[name](x, p["w_loc"], zero, p["b_loc"], p["b_loc"] * 0, padding=1)
    expected = TF.conv2d(x, p["w_loc"], p["b_loc"], padding=1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_mean_conv_is_bit_identical_to_torch(dims: int) -> None:
    x = torch.randn(2, 4, *(6,) * dims)
    w = torch.randn(6, 2, *(3,) * dims)
    b = torch.randn(6)
    fn = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}[dims]
    geometry = {"stride": 2, "padding": 1, "dilation": 1, "groups": 2}
    assert torch.equal(mean_conv(x, w, b, **geometry), fn(x, w, b, 2, 1, 1, 2))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_patches_times_the_kernel_matrix_is_the_convolution(dims: int) -> None:
    x = torch.randn(2, 3, *(7,) * dims, dtype=F64)
    w = torch.randn(4, 3, *(3,) * dims, dtype=F64)
    stride, dilation = (2, 1, 1)[:dims], (1, 2, 1)[:dims]
    patches = conv_patches(x, (3,) * dims, stride=stride, dilation=dilation)
    y = functional.conv(x, w, stride=stride, dilation=dilation)
    torch.testing.assert_close(patches @ w.reshape(4, -1).T, y.movedim(1, -1))


def test_sampled_conv_applies_kernel_s_to_slice_s() -> None:
    s = 3
    x = torch.randn(s, 2, 4, 6, 6, dtype=F64)
    w = torch.randn(s, 6, 2, 3, 3, dtype=F64)
    b = torch.randn(s, 6, dtype=F64)
    y = sampled_conv(x, w, b, padding=1, groups=2, num_weight_samples=s)
    for i in range(s):
        torch.testing.assert_close(y[i], TF.conv2d(x[i], w[i], b[i], padding=1, groups=2))
    with pytest.raises(ValueError, match="num_weight_samples=4"):
        sampled_conv(x, w, b, num_weight_samples=4)
    with pytest.raises(ValueError, match="must hold num_weight_samples=3 kernels"):
        sampled_conv(x, w[:2], b, padding=1, groups=2, num_weight_samples=3)


# -- the layers -------------------------------------------------------------------------------

# The families and their valid estimators, as on the linear layers.
FAMILIES, VALID, CASES, CORRELATED = (
    test_families.FAMILIES, test_families.VALID, test_families.CASES, test_families.CORRELATED
)  # fmt: skip


def _layer(
    dims: int = 2, family: str = "meanfield", seed: int = 0, **kwargs: Any
) -> BayesianConvBase:
    options = {"kernel_size": K, "padding": 1, **FAMILIES[family], **kwargs}
    return CONVS[dims](C_IN, C_OUT, generator=torch.Generator().manual_seed(seed), **options)


def _randomise(layer: nn.Module, seed: int = 1) -> None:
    """Distinct means, scales away from 0 and non-trivial correlations, so a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("loc"):
                p.copy_(noise)
            elif "raw_scale" in name:
                p.copy_(functional.inverse_softplus(0.3 + torch.rand(p.shape, generator=g)))
            else:  # low-rank factors, Cholesky off-diagonals: correlations
                p.copy_(noise)


def _torch_conv(layer: BayesianConvBase) -> Any:
    return {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}[layer.dims]


def _dense_moments(layer: BayesianConvBase, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second route for any family: the family's dense ``(mean, covariance)`` of
    ``theta = [W row by row, b]`` pushed through each output's patch (``F.unfold``, 2-D).

    Returns the mean ``(N, L, C_out)`` and the covariance of the channels at each position
    ``(N, L, C_out, C_out)``.
    """
    mean_theta, cov_theta = layer.w_posterior.dense(layer._realise())
    fan_in, c_out = layer.in_features, layer.out_channels
    c_in = layer.in_channels // layer.groups
    rows = []
    for o in range(c_out):
        g = o // (c_out // layer.groups)
        patches = TF.unfold(
            x[:, g * c_in : (g + 1) * c_in], layer.kernel_size, dilation=layer.dilation,
            padding=layer.padding, stride=layer.stride,
        ).transpose(1, 2)  # fmt: skip
        row = x.new_zeros(*patches.shape[:2], mean_theta.numel())
        row[..., o : fan_in * c_out : c_out] = patches
        if layer.has_bias:
            row[..., fan_in * c_out + o] = 1.0
        rows.append(row)
    jac = torch.stack(rows, dim=2)  # (N, L, C_out, D)
    return jac @ mean_theta, jac @ cov_theta @ jac.transpose(-1, -2)


def _positions_last(y: torch.Tensor) -> torch.Tensor:
    """``(..., N, C, H, W) -> (..., N, H * W, C)``."""
    return y.flatten(-2).transpose(-1, -2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("estimator", NAMES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_shapes_batched_and_unbatched(dims: int, estimator: str, bias: bool) -> None:
    layer = _layer(dims, estimator=estimator, bias=bias, stride=2)
    reference = TORCH_CONVS[dims](C_IN, C_OUT, K, stride=2, padding=1, bias=bias)
    x = torch.randn(3, C_IN, *(6,) * dims)
    y = layer(x)
    assert y.shape == reference(x).shape and torch.isfinite(y).all()
    assert layer(x[0]).shape == reference(x[0]).shape  # unbatched, as nn.Conv*d accepts it


PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
#: (dims, family, padding_mode): every padding mode with mean-field, every family with zeros.
DETERMINISTIC = [(d, "meanfield", mode) for d in (1, 2, 3) for mode in PADDING_MODES] + [
    (d, family, "zeros") for d in (1, 2, 3) for family in FAMILIES if family != "meanfield"
]


@pytest.mark.parametrize(("dims", "family", "padding_mode"), DETERMINISTIC)
def test_deterministic_is_bit_identical_to_torchs_conv(
    dims: int, family: str, padding_mode: str
) -> None:
    """``F.conv*d(x, kernel_loc, b_loc, ...)`` exactly (after ``F.pad`` for a non-zero mode)."""
    estimator = VALID[family][-1]
    layer = _layer(dims, family, estimator=estimator, padding_mode=padding_mode, dilation=2)
    _randomise(layer)
    x = torch.randn(2, C_IN, *(7,) * dims)
    with varlin.deterministic(layer):
        y = layer(x)
    padding: Any = layer.padding
    if padding_mode != "zeros":
        x = TF.pad(x, (1, 1) * dims, mode=padding_mode)
        padding = 0
    expected = _torch_conv(layer)(x, layer.kernel_loc, layer.b_loc, 1, padding, 2, 1)
    assert torch.equal(y, expected)
    assert not torch.equal(layer(x if padding_mode == "zeros" else x[..., 1:-1]), y)


def test_kernel_is_the_matrix_transposed_and_a_view() -> None:
    layer = _layer(groups=2, posterior="lowrank", rank=1)
    assert layer.in_features == C_IN // 2 * K * K and layer.out_features == C_OUT
    assert layer.kernel_loc.shape == (C_OUT, C_IN // 2, K, K)
    assert torch.equal(layer.kernel_loc.reshape(C_OUT, -1).T, layer.w_loc)
    with torch.no_grad():
        layer.kernel_loc.copy_(torch.arange(float(layer.w_loc.numel())).view(C_OUT, 1, K, K))
    assert layer.w_loc[1, 0] == 1.0 and layer.w_loc[0, 1] == K * K  # copy_ set the parameter
    torch.testing.assert_close(layer.kernel_scale, layer.kernel(layer.w_scale))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("estimator", NAMES)
def test_layer_uses_the_functional_estimator_with_softplus_scales(
    estimator: str, bias: bool
) -> None:
    """Wiring, exactly: the mean-field layer's output is its estimator's on the kernel-shaped
    ``(loc, softplus(raw_scale))``."""
    layer = _layer(estimator=estimator, bias=bias, stride=2, groups=2)
    _randomise(layer)
    x = torch.randn(3, C_IN, 6, 6)
    assert layer.generator is not None
    layer.generator.manual_seed(9)
    expected = CONV_ESTIMATORS[estimator](
        x, layer.kernel_loc, layer.kernel(TF.softplus(layer.w_posterior.raw_scale)),
        layer.b_loc, layer.b_scale, stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2,
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "radial"])
def test_output_moments_are_the_exact_marginals(family: str, groups: int, float64: Any) -> None:
    layer = _layer(family=family, groups=groups, stride=2)
    _randomise(layer)
    x = torch.randn(3, C_IN, 5, 5)
    law = layer.output_moments(x)
    mean, cov = _dense_moments(layer, x)
    torch.testing.assert_close(_positions_last(law.mean), mean, rtol=1e-10, atol=1e-10)
    variance = cov.diagonal(0, -2, -1)
    torch.testing.assert_close(_positions_last(law.variance), variance, rtol=1e-10, atol=1e-10)
    single = layer.output_moments(x[0])
    torch.testing.assert_close(single.variance, law.variance[0])


def test_radial_has_no_closed_form_output_moments() -> None:
    with pytest.raises(ValueError, match="posterior='radial' has no closed-form output"):
        _layer(family="radial").output_moments(torch.randn(2, C_IN, 4, 4))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_every_family_and_estimator_samples_the_exact_moments(family: str, estimator: str) -> None:
    r"""S = 20 000 independent draws of 2 examples' 4 x 16 outputs vs the dense route:
    per-output mean and variance, and for the correlated families the covariance of channels 0
    and 1 at every position (the local estimator samples a position's channels jointly;
    reparameterization uses one kernel).

    The draws: for the local estimator, one call on a batch of S copies of each example (its
    noise is independent across examples); for the others, S slices of ``weight_samples``.
    Float32 layers (see ``_slice_draws``), moments in float64. Tolerances: the mean of a
    quantity of known (for the second moments, estimated) spread; failure rate 1e-6 over
    128 + 128 + 32 checks. The radial outputs are not Gaussian; every tolerance comes from the
    draws' own spread.
    """
    s = 20_000
    layer = _layer(family=family, estimator=estimator, groups=2 if family == "meanfield" else 1)
    _randomise(layer)
    x = torch.randn(2, C_IN, 4, 4)
    with torch.no_grad():
        if estimator == "local":
            copies = x.unsqueeze(1).expand(2, s, *x.shape[1:]).reshape(2 * s, *x.shape[1:])
            y = layer(copies).unflatten(0, (2, s)).transpose(0, 1)
        else:
            with weight_samples(layer, s):
                y = layer(x.expand(s, *x.shape))
    y = _positions_last(y).double()
    layer.double()
    mean, cov = _dense_moments(layer, x.double())
    checks = 2 * mean.numel() + mean[..., 0].numel()
    dev = y - mean
    var = cov.diagonal(0, -2, -1)
    assert (dev.mean(0).abs() <= mean_tolerance(var, s, checks)).all()
    second = dev * dev
    assert ((second.mean(0) - var).abs() <= z_bound(checks) * second.std(0) / math.sqrt(s)).all()
    cross = dev[..., 0] * dev[..., 1]
    tol = z_bound(checks) * cross.std(0) / math.sqrt(s)
    assert ((cross.mean(0) - cov[..., 0, 1]).abs() <= tol).all()
    if family in CORRELATED:  # the check above must be able to fail: channels are correlated
        assert (cov[..., 0, 1].abs() > 2 * tol).any()


@pytest.mark.parametrize("family", ["meanfield", "lowrank"])
def test_weight_samples_give_a_local_layer_one_kernel_per_slice(family: str) -> None:
    r"""Under ``weight_samples`` (prediction) each slice is one posterior sample of the kernel,
    also for the local estimator, whose training noise is independent across positions: two
    neighbouring positions of one example then have the posterior's correlation (dense route)
    across S = 20 000 slices, within :math:`z\sqrt{3/S}` (rate 1e-6, Bonferroni over 4
    channels); it is far from 0, the value of independent per-position noise."""
    s = 20_000
    layer = _layer(family=family, estimator="local")
    _randomise(layer)
    x = torch.rand(1, C_IN, 4, 4) + 0.5  # positive: neighbouring positions share much variance
    with torch.no_grad(), weight_samples(layer, s):
        y = _positions_last(layer(x.expand(s, *x.shape)))[:, 0].double()  # (S, 16, C_out)
    layer.double()
    first, second = 5, 6  # positions (1, 1) and (1, 2)
    joint = torch.stack([y[:, first], y[:, second]], dim=-1)  # (S, C_out, 2)
    corr = sample_correlation(joint[..., 0], joint[..., 1])
    # Cross-position covariance of one channel from the dense route: both positions' rows.
    _, cov_theta = layer.w_posterior.dense(layer._realise())
    patches = TF.unfold(x.double(), K, padding=1).transpose(1, 2)[0]
    fan_in = layer.in_features
    expected = []
    for o in range(C_OUT):
        rows = torch.zeros(2, cov_theta.shape[0], dtype=F64)
        for r, pos in enumerate((first, second)):
            rows[r, o : fan_in * C_OUT : C_OUT] = patches[pos]
            rows[r, fan_in * C_OUT + o] = 1.0
        c = rows @ cov_theta @ rows.T
        expected.append(c[0, 1] / torch.sqrt(c[0, 0] * c[1, 1]))
    expected_corr = torch.stack(expected)
    bound = correlation_tolerance(s, C_OUT, kurtosis_factor=3.0)
    assert expected_corr.abs().min() > 3 * bound
    assert (corr - expected_corr).abs().max() <= bound


@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_gradients_reach_every_parameter(family: str, estimator: str) -> None:
    """From the data term alone (no KL): every parameter gets a finite, non-zero gradient."""
    layer = _layer(family=family, estimator=estimator)
    (layer(torch.randn(3, C_IN, 5, 5)) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_is_the_linear_layers_kl_of_the_kernel_matrix(family: str) -> None:
    """The KL does not depend on the map: a VariationalLinear with the same parameters (the
    kernel as a matrix) has the same KL, for every family; and varlin.kl_divergence sums it."""
    conv = _layer(family=family, make_weights_prior=varlin.priors.normal(0.5))
    _randomise(conv)
    linear = varlin.VariationalLinear(
        conv.in_features, C_OUT, make_weights_prior=varlin.priors.normal(0.5), **FAMILIES[family]
    )
    linear.load_state_dict(conv.state_dict())
    assert torch.equal(conv.kl_divergence(), linear.kl_divergence())
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(1))
    assert torch.equal(varlin.kl_divergence(model), conv.kl_divergence())


def test_reset_parameters_like_nn_conv() -> None:
    """Means U(+-1/sqrt(fan_in)) for the kernel and bias (nn.Conv2d's bounds), scales to
    init_scale."""
    layer = CONVS[2](8, 64, 3, init_scale=0.05)
    bound = 1 / math.sqrt(8 * 9)
    assert layer.b_loc is not None
    for loc in (layer.kernel_loc, layer.b_loc):
        assert loc.abs().max() <= bound and loc.abs().max() > 0.8 * bound
    torch.testing.assert_close(layer.w_scale, torch.full((72, 64), 0.05))
    reference = nn.Conv2d(8, 64, 3)
    assert reference.weight.abs().max() <= bound and reference.weight.abs().max() > 0.8 * bound


# -- sampling state: deterministic, weight_samples ------------------------------------------


@pytest.mark.parametrize("estimator", NAMES)
def test_weight_samples_gives_each_slice_its_own_kernel(estimator: str) -> None:
    model = nn.Sequential(
        _layer(estimator=estimator),
        nn.ReLU(),
        varlin.VariationalConv2d(C_OUT, C_OUT, K, estimator=estimator),
    )
    x = torch.randn(2, C_IN, 5, 5)
    with torch.no_grad(), weight_samples(model, 4):
        y = model(x.expand(4, *x.shape))
        assert y.shape == (4, 2, C_OUT, 3, 3)
        assert not torch.equal(y[0], y[1])
        folded = model(torch.randn(4, 2, C_IN, 5, 5))
        assert folded.shape == y.shape
        with varlin.deterministic(model):
            mean = model(x.expand(4, *x.shape))
    with varlin.deterministic(model):
        expected = model(x)
    assert torch.equal(mean, expected.expand(4, *expected.shape))
    assert model(x).shape == (2, C_OUT, 3, 3)  # restored: no sample dimension


def test_identically_seeded_generators_give_identical_layers() -> None:
    a, b, c = _layer(seed=0), _layer(seed=0), _layer(seed=1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    x = torch.randn(2, C_IN, 4, 4)
    before = torch.random.get_rng_state()
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert torch.equal(torch.random.get_rng_state(), before)


# -- state, dtype, compile --------------------------------------------------------------------


@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_state_dict_round_trip_and_double(family: str, estimator: str) -> None:
    source = _layer(
        family=family, estimator=estimator, make_weights_prior=varlin.priors.laplace(0.5)
    )
    _randomise(source)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    fresh = _layer(
        family=family, estimator=estimator, seed=5, make_weights_prior=varlin.priors.laplace(0.5)
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, C_IN, 4, 4)
    assert source.generator is not None and fresh.generator is not None
    source.generator.manual_seed(1)
    fresh.generator.manual_seed(1)
    assert torch.equal(source(x), fresh(x))
    assert torch.equal(source.kl_divergence(), fresh.kl_divergence())
    source.double()
    assert all(t.dtype == F64 for t in [*source.parameters(), *source.buffers()])
    source.generator = None
    y = source(x.double())
    assert y.dtype == F64 and source.kl_divergence().dtype == F64
    with varlin.deterministic(source):
        assert torch.equal(
            source(x.double()),
            TF.conv2d(x.double(), source.kernel_loc, source.b_loc, padding=1),
        )


def _compile_model(families: bool) -> nn.Sequential:
    if not families:
        convs = [
            varlin.VariationalConv2d(1, 4, 3, padding=1, estimator="local"),
            varlin.VariationalConv2d(4, 4, 3, stride=2, groups=2, estimator="flipout"),
            varlin.VariationalConv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        ]
    else:
        convs = [
            varlin.VariationalConv2d(
                1, 4, 3, padding=1, posterior="lowrank", rank=2, estimator="local"
            ),
            varlin.VariationalConv2d(4, 4, 3, stride=2, posterior="radial", estimator="flipout"),
            varlin.VariationalConv2d(4, 4, 3, padding="same", posterior="matrix_normal"),
        ]
    return nn.Sequential(
        convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.ReLU(), nn.Flatten(),
        varlin.VariationalLinear(4 * 3 * 3, 2),
    )  # fmt: skip


@pytest.mark.parametrize("families", [False, True], ids=["meanfield", "other-families"])
def test_torch_compile_forward_and_backward(families: bool) -> None:
    """A small CNN, every estimator, CPU ``aot_eager`` backend, ``fullgraph=True`` (a graph
    break inside a layer fails the test). Once mean-field, once low-rank/radial/matrix-normal.

    The mean-field model is called again with another batch size (a last, partial batch):
    torch.compile then recompiles with a symbolic batch size, which every random draw of the
    convolutions must support.
    """
    torch._dynamo.reset()  # compiled code is cached per code object, across tests
    try:
        model = _compile_model(families)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        x = torch.randn(5, 1, 7, 7)
        y = compiled(x)
        assert y.shape == (5, 2) and torch.isfinite(y).all()
        ((y**2).sum() + varlin.kl_divergence(model)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        with varlin.deterministic(model):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        if not families:
            assert compiled(torch.randn(3, 1, 7, 7)).shape == (3, 2)
    finally:
        torch._dynamo.reset()


def test_extra_repr_reads_like_nn_conv() -> None:
    layer = varlin.VariationalConv2d(
        2, 4, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="circular",
        estimator="flipout", posterior="radial",
    )  # fmt: skip
    text = repr(layer)
    assert text.startswith("VariationalConv2d(\n  2, 4, kernel_size=(3, 3), stride=(2, 2), ")
    for part in ("padding=(1, 1)", "groups=2", "bias=False", "padding_mode='circular'",
                 "estimator='flipout'", "posterior='radial'"):  # fmt: skip
        assert part in text, part
    assert "dilation" not in text


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"in_channels": 3, "groups": 2},
            ValueError,
            r"in_channels=3 must be divisible by groups=2",
        ),
        (
            {"out_channels": 5, "groups": 2},
            ValueError,
            r"out_channels=5 must be divisible by groups=2",
        ),
        ({"groups": 0}, ValueError, r"groups must be a positive integer, got 0"),
        ({"in_channels": 0}, ValueError, r"in_channels must be a positive integer, got 0"),
        ({"out_channels": 2.0}, TypeError, r"out_channels must be a positive integer, got 2.0"),
        ({"kernel_size": 0}, ValueError, r"kernel_size must be an integer >= 1 .* got 0"),
        ({"kernel_size": (3, 3, 3)}, ValueError, r"tuple of 2 such integers, got \(3, 3, 3\)"),
        ({"kernel_size": 2.5}, TypeError, r"kernel_size must be an integer >= 1.*got 2.5"),
        ({"stride": (1, 0)}, ValueError, r"stride must be an integer >= 1 .* got \(1, 0\)"),
        ({"dilation": -1}, ValueError, r"dilation must be an integer >= 1"),
        ({"padding": -1}, ValueError, r"padding must be an integer >= 0 .* got -1"),
        ({"padding": "full"}, ValueError, r"padding must be one of 'same', 'valid', got 'full'"),
        ({"padding": "same", "stride": 2}, ValueError, r"padding='same' needs stride 1"),
        ({"padding_mode": "mirror"}, ValueError, r"padding_mode must be one of 'zeros', 'reflect'"),
        ({"bias": 1}, TypeError, r"bias must be a bool, got 1"),
        ({"estimator": "lrt"}, ValueError, r"estimator must be one of .*got 'lrt'"),
        ({"posterior": "gaussian"}, ValueError, r"posterior must be one of 'meanfield'"),
        (
            {"posterior": "lowrank", "rank": 2, "estimator": "flipout"},
            ValueError,
            r"estimator='flipout' is not valid with posterior='lowrank'; the valid estimators",
        ),
        (
            {"posterior": "lowrank", "rank": 2, "estimator": "local", "groups": 2},
            ValueError,
            r"estimator='local' with posterior='lowrank' needs groups=1 in a convolution, got "
            r"groups=2 .* the valid estimator for posterior='lowrank' with groups=2 is "
            r"'reparameterization'",
        ),
        ({"init_scale": 0.0}, ValueError, r"init_scale must be > 0"),
        ({"init_sclae": 0.1}, TypeError, r"VariationalConv2d got unexpected keyword.*init_sclae"),
    ],
)
def test_constructor_errors_name_the_argument_value_and_rule(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args = {"in_channels": 2, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        varlin.VariationalConv2d(**args)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(2, 5), r"x must have shape \(N, C_in, H, W\) or \(C_in, H, W\) with "
         r"C_in = in_channels = 2 for VariationalConv2d, got shape \(2, 5\)"),
        (torch.randn(1, 2, 2, 5, 5), r"x must have shape \(N, C_in, H, W\).*\(1, 2, 2, 5, 5\)"),
        (torch.randn(2, 3, 5, 5), r"got shape \(2, 3, 5, 5\) \(3 channels\)"),
        (torch.randn(2, 2, 5, 1), r"spatial size 1 in dimension 3, padded to 3, smaller than "
         r"the kernel's span dilation \* \(kernel_size - 1\) \+ 1 = 5"),
        (torch.ones(2, 2, 5, 5, dtype=torch.long), r"x must have a floating-point dtype"),
        (torch.randn(2, 2, 5, 5, dtype=F64), r"x has dtype torch.float64 but the layer's "),
    ],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(x: torch.Tensor, match: str) -> None:
    layer = varlin.VariationalConv2d(2, 4, 3, padding=1, dilation=2)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(x)


def test_input_checks_for_samples_padding_modes_and_values() -> None:
    layer = varlin.VariationalConv1d(2, 4, 3, padding=2, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"padding_mode='reflect' needs padding < the input size"):
        layer(torch.randn(3, 2, 2))
    layer(torch.randn(3, 2, 3))
    circular = varlin.VariationalConv1d(2, 4, 3, padding=3, padding_mode="circular")
    with pytest.raises(ValueError, match=r"padding_mode='circular' needs padding <= the input"):
        circular(torch.randn(3, 2, 2))
    with (
        weight_samples(layer, 4),
        pytest.raises(
            ValueError, match=r"x must have shape \(S, N, C_in, L\) with S = num_weight_samples = 4"
        ),
    ):
        layer(torch.randn(3, 2, 5))
    bad = torch.randn(3, 2, 5)
    bad[0, 0, 0] = float("nan")
    layer(bad)  # value checks are off by default: no device sync
    with varlin.validation(), pytest.raises(ValueError, match="x must be finite"):
        layer(bad)


# -- prediction -------------------------------------------------------------------------------


def test_predict_uses_monte_carlo_for_a_convolutional_head() -> None:
    """A variational convolution as the only (last) layer is no Bayesian *linear* last layer:
    predict samples (one kernel per sample), and the closed form is refused."""
    layer = _layer(estimator="local")
    likelihood = varlin.likelihoods.Gaussian(0.1)
    x = torch.randn(3, C_IN, 4, 4)
    pred = varlin.predict(layer, x, likelihood=likelihood, num_samples=16)
    assert isinstance(pred, varlin.RegressionPrediction)
    assert pred.sample_means is not None and pred.sample_means.shape == (16, 3, C_OUT, 4, 4)
    assert pred.mean.shape == (3, C_OUT, 4, 4) and bool((pred.epistemic > 0).all())
    with pytest.raises(ValueError, match="method='closed_form' needs a model whose only"):
        varlin.predict(layer, x, likelihood=likelihood, method="closed_form")


@pytest.mark.parametrize("estimator", NAMES)
def test_predict_folds_samples_through_a_cnn(estimator: str) -> None:
    """A CNN with pooling and flattening: predict folds the S samples into the batch (one
    kernel per sample in every variational layer); each sample's output equals the model's
    output under that sample, and the deterministic prefix runs once."""
    body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    model = nn.Sequential(
        body,
        _layer(estimator=estimator),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        varlin.VariationalLinear(C_OUT * 2 * 2, 3, estimator=estimator),
    )
    x = torch.randn(6, 1, 4, 4)
    calls = []
    body.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    pred = varlin.predict(model, x, likelihood=varlin.likelihoods.Categorical(), num_samples=32)
    assert isinstance(pred, varlin.ClassificationPrediction)
    assert calls == [6]  # the deterministic prefix ran once, on the 6 examples
    assert pred.probs.shape == (6, 3) and pred.prob_samples.shape == (32, 6, 3)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(6))
    assert bool((pred.mutual_information > 0).all())
    # Samples differ from one another, and the posterior-mean model sits among them.
    assert not torch.equal(pred.prob_samples[0], pred.prob_samples[1])
    with varlin.deterministic(model):
        mean_pred = varlin.predict(model, x, likelihood=varlin.likelihoods.Categorical(),
                                   num_samples=4)  # fmt: skip
    torch.testing.assert_close(mean_pred.prob_samples[0], mean_pred.prob_samples[3])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": 1, "padding": 1, "dilation": 1, "groups": 1},
        {"stride": (2, 1), "padding": (0, 2), "dilation": (1, 2), "groups": 2},
        {"stride": 1, "padding": "valid", "dilation": 1, "groups": 1},
    ],
)
def test_local_conv_lean_backward_equals_autograd(geometry: dict[str, Any], bias: bool) -> None:
    """The local estimator's custom backward against autograd through the plain expression
    (same noise), for the input, both means and both scales; with a zero input example, where
    the variance is clamped (no bias) and its gradient must be 0, as clamp's."""
    p = _posterior(geometry["groups"])
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    if not bias:
        leaves["b_loc"] = leaves["b_scale"] = None  # type: ignore[assignment]
    x = torch.randn(3, C_IN, 6, 7, dtype=F64)
    x[1] = 0.0
    x.requires_grad_()
    upstream = torch.randn_like(
        functional.conv(x, p["w_loc"], **{k: geometry[k] for k in geometry})
    )
    y = functional.local_reparameterized_conv(
        x, **leaves, **geometry, generator=torch.Generator().manual_seed(3)
    )
    grads = torch.autograd.grad(
        (y * upstream).sum(), [x, *[v for v in leaves.values() if v is not None]]
    )
    # The plain expression, same noise (drawn first from the same seed).
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    mean = functional.conv(x, leaves["w_loc"], leaves["b_loc"], **geometry)
    b_var = None if leaves["b_scale"] is None else leaves["b_scale"] ** 2
    var = functional.conv(x * x, leaves["w_scale"] ** 2, b_var, **geometry)
    plain = mean + var.clamp_min(torch.finfo(F64).tiny).sqrt() * eps
    torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(
        (plain * upstream).sum(), [x, *[v for v in leaves.values() if v is not None]]
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", NAMES)
def test_autocast_keeps_the_variance_in_full_precision(estimator: str, dtype: torch.dtype) -> None:
    """Under CPU autocast the output has the autocast dtype; the variance path (x^2, which
    overflows float16 for |x| > 256) stays in the parameters' float32: finite for |x| = 300."""
    layer = _layer(estimator=estimator)
    x = torch.full((2, C_IN, 4, 4), 300.0)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        law = layer.output_moments(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.isfinite(law.variance).all() and bool((law.variance > 0).all())
    ((y.float() ** 2).mean() + varlin.kl_divergence(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- CUDA (run where a GPU is present; skipped elsewhere) -------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("estimator", NAMES)
def test_cuda_forward_backward_reproducible_and_without_host_sync(estimator: str) -> None:
    from test_gpu import _no_host_sync

    cuda = torch.device("cuda")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        gen = torch.Generator(device=cuda).manual_seed(1)
        model = nn.Sequential(
            varlin.VariationalConv2d(2, 4, 3, padding=1, estimator=estimator, generator=gen,
                                     device=cuda),
            nn.ReLU(),
            varlin.VariationalConv2d(4, 4, 3, groups=2, estimator=estimator, generator=gen,
                                     device=cuda),
        )  # fmt: skip
        x = torch.randn(8, 2, 6, 6, device=cuda)
        model(x)  # warm-up: lazy CUDA initialisation
        with _no_host_sync():
            y = model(x)
            loss = y.square().mean() + varlin.kl_divergence(model) / 100
        loss.backward()
        with varlin.deterministic(model):
            first = model[0]
            assert isinstance(first, BayesianConvBase)
            expected = TF.conv2d(x, first.kernel_loc, first.b_loc, padding=1)
            assert torch.equal(first(x), expected)
        return y.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    y, grads = run()
    assert y.device.type == "cuda" and len(grads) == 8
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # The same device generator seed gives the same noise (cuDNN's weight gradients may sum in
    # another order from run to run: close, not necessarily equal).
    y2, grads2 = run()
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b)


def test_the_base_class_is_not_a_layer() -> None:
    with pytest.raises(TypeError, match="use VariationalConv1d, VariationalConv2d or"):
        BayesianConvBase(2, 4, 3)
