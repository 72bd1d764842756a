r"""Tests for varlin.functional: the three estimators against the closed-form moments.

For a fixed input ``x`` every estimator must give each example the output distribution

.. math:: y_n \sim \mathcal N\big(x_n\mu_W + \mu_b,\; x_n^2\sigma_W^2 + \sigma_b^2\big)

(exactly Gaussian for all three: flipout's random signs leave each example's marginal unchanged),
and they differ only in how the noise is shared between examples: reparameterization shares one
weight sample (identical inputs -> identical outputs), local and flipout decorrelate examples.

Statistical tests: float64, a fixed explicit generator, ``N`` independent calls, tolerances from
the failure rate in ``conftest.FAILURE_RATE`` with a Bonferroni factor over the entries checked.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import (
    correlation_tolerance,
    mean_tolerance,
    sample_correlation,
    variance_tolerance,
    z_bound,
)

from varlin import functional
from varlin.functional import (
    ESTIMATORS,
    flipout_linear,
    local_reparameterized_linear,
    mean_linear,
    reparameterized_linear,
)

F64 = torch.float64
NAMES = sorted(ESTIMATORS)
IN, OUT = 4, 3

#: Independent calls per estimator in the moment and correlation tests.
NUM_CALLS = 10_000


def _posterior(dtype: torch.dtype = F64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed posterior with distinct means and scales, so a transposed or mixed-up term shows."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w_loc": torch.randn(IN, OUT, generator=g, dtype=dtype),
        "w_scale": 0.2 + torch.rand(IN, OUT, generator=g, dtype=dtype),
        "b_loc": torch.randn(OUT, generator=g, dtype=dtype),
        "b_scale": 0.2 + torch.rand(OUT, generator=g, dtype=dtype),
    }


def _inputs(dtype: torch.dtype = F64) -> torch.Tensor:
    """Rows 0 and 1 identical (for the correlation tests); rows 2..4 distinct, one with a zero."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(IN, generator=g, dtype=dtype)
    rest = torch.randn(3, IN, generator=g, dtype=dtype)
    rest[0, 1] = 0.0
    return torch.cat([x0.expand(2, IN), rest])


def _closed_form(x: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x @ p["w_loc"] + p["b_loc"]
    var = (x * x) @ p["w_scale"] ** 2 + p["b_scale"] ** 2
    return mean, var


@functools.cache
def _draws(name: str) -> torch.Tensor:
    """``NUM_CALLS`` independent calls of one estimator on the fixed input: ``(N, 5, OUT)``."""
    p = _posterior()
    x = _inputs()
    g = torch.Generator().manual_seed(2024)
    estimate = ESTIMATORS[name]
    with torch.no_grad():
        return torch.stack([estimate(x, **p, generator=g) for _ in range(NUM_CALLS)])


def test_estimator_registry_names() -> None:
    assert set(ESTIMATORS) == {"reparameterization", "local", "flipout"}
    assert ESTIMATORS["reparameterization"] is reparameterized_linear
    assert ESTIMATORS["local"] is local_reparameterized_linear
    assert ESTIMATORS["flipout"] is flipout_linear


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_per_example_moments_match_closed_form(name: str) -> None:
    r"""Sample mean and variance over N = 10 000 independent calls vs the closed form.

    Mean: each entry's sample mean is exactly :math:`\mathcal N(\mu, \sigma^2/N)` (the outputs are
    Gaussian), so :math:`|\bar y - \mu| \le z\sigma/\sqrt N`. Variance: by the normal approximation
    to the chi-square, :math:`|s^2 - \sigma^2| \le z\sigma^2\sqrt{2/(N-1)}` (about 8% here). ``z``
    is the two-sided 1e-6 quantile with a Bonferroni factor over the 2 x 5 x 3 = 30 entries
    checked, so a correct estimator fails this test for at most one seed in a million.
    """
    samples = _draws(name)
    mean, var = _closed_form(_inputs(), _posterior())
    checks = 2 * mean.numel()
    sample_mean = samples.mean(0)
    sample_var = samples.var(0)
    assert (sample_mean - mean).abs().le(mean_tolerance(var, NUM_CALLS, checks)).all()
    assert (sample_var - var).abs().le(variance_tolerance(var, NUM_CALLS, checks)).all()


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_share_noise_only_for_reparameterization(name: str) -> None:
    r"""Rows 0 and 1 of ``x`` are identical; compare their outputs call by call and across calls.

    Reparameterization draws one weight sample per call, so the two rows are equal in every call
    and their correlation across calls is 1. Local and flipout give each example its own noise,
    and the two rows' correlation across the N calls is 0 up to :math:`z\sqrt{3/N}` (flipout's
    rows are uncorrelated but share :math:`\Delta W`, so :math:`E[a^2b^2] \le 3E[a^2]E[b^2]` by
    Cauchy-Schwarz; the factor 3 covers both), Bonferroni over the 3 output units, failure rate
    1e-6.

    Equal rows within a call: never for local (continuous noise). Flipout's rows coincide exactly
    when both examples draw the same input signs and the same output signs (with a bias
    perturbation inside the sign flip, opposite signs do not cancel), probability
    :math:`p = 2^{-(in+out)} = 1/128`; the count of such calls is Binomial(N, p), checked to
    :math:`z\sqrt{Np(1-p)}` at a 1e-6 rate.
    """
    samples = _draws(name)
    first, second = samples[:, 0], samples[:, 1]
    corr = sample_correlation(first, second)
    equal_rows = int((first == second).all(-1).sum())
    if name == "reparameterization":
        assert equal_rows == NUM_CALLS
        assert corr.min() > 1 - 1e-9
        return
    bound = correlation_tolerance(NUM_CALLS, OUT, kurtosis_factor=3.0)
    assert corr.abs().max() <= bound
    if name == "local":
        assert equal_rows == 0
    else:
        p = 2.0 ** -(IN + OUT)
        expected = NUM_CALLS * p
        assert abs(equal_rows - expected) <= z_bound() * math.sqrt(expected * (1 - p))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", NAMES)
def test_distinct_inputs_are_correlated_under_reparameterization(name: str) -> None:
    r"""A second view of the sharing: rows 2 and 3 differ, yet one weight sample couples them.

    For reparameterization the correlation of the two rows' outputs across calls is the closed
    form :math:`(\sum_i x_{2i}x_{3i}\sigma_{ij}^2 + \sigma_{b,j}^2)/(\mathrm{sd}_2\mathrm{sd}_3)`;
    for local and flipout it is 0. Tolerance: 1e-6 failure rate over the 3 output units, with the
    Cauchy-Schwarz factor 3 for dependent pairs (the sd of a sample correlation is at most
    sqrt(3/N) for Gaussian marginals whatever the true correlation's magnitude below 1).
    """
    samples = _draws(name)
    x, p = _inputs(), _posterior()
    corr = sample_correlation(samples[:, 2], samples[:, 3])
    _, var = _closed_form(x, p)
    if name == "reparameterization":
        cov = (x[2] * x[3]) @ p["w_scale"] ** 2 + p["b_scale"] ** 2
        expected = cov / torch.sqrt(var[2] * var[3])
    else:
        expected = torch.zeros(OUT, dtype=F64)
    bound = correlation_tolerance(NUM_CALLS, OUT, kurtosis_factor=3.0)
    assert (corr - expected).abs().max() <= bound
    if name == "reparameterization":
        # The closed-form correlation must be far from 0 for this test to distinguish the cases.
        assert expected.abs().min() > 3 * bound


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_loc_and_raw_scale(name: str, bias: bool) -> None:
    """The loss's gradient is finite and non-zero in every entry of loc and raw_scale."""
    p = _posterior()
    w_loc = p["w_loc"].clone().requires_grad_()
    w_raw = functional.inverse_softplus(p["w_scale"]).requires_grad_()
    b_loc = p["b_loc"].clone().requires_grad_() if bias else None
    b_raw = functional.inverse_softplus(p["b_scale"]).requires_grad_() if bias else None
    x = torch.randn(6, IN, dtype=F64)
    y = ESTIMATORS[name](
        x,
        w_loc,
        TF.softplus(w_raw),
        b_loc,
        None if b_raw is None else TF.softplus(b_raw),
    )
    (y**2).sum().backward()
    leaves = [w_loc, w_raw] + ([b_loc, b_raw] if bias else [])
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_local_gradient_finite_at_zero_variance(name: str) -> None:
    """An all-zero input row has zero output variance; sqrt's infinite slope must not leak NaN."""
    p = _posterior()
    w_raw = functional.inverse_softplus(p["w_scale"]).requires_grad_()
    x = torch.zeros(2, IN, dtype=F64)
    x[1] = 1.0
    y = ESTIMATORS[name](x, p["w_loc"], TF.softplus(w_raw))
    y.sum().backward()
    assert w_raw.grad is not None
    assert torch.isfinite(w_raw.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 5)])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_dtype(
    name: str, batch_shape: tuple[int, ...], bias: bool, dtype: torch.dtype
) -> None:
    p = _posterior(dtype)
    if not bias:
        p["b_loc"] = p["b_scale"] = None  # type: ignore[assignment]
    x = torch.randn(*batch_shape, IN, dtype=dtype)
    y = ESTIMATORS[name](x, **p)
    assert y.shape == (*batch_shape, OUT)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_explicit_generator_reproduces_and_default_generator_untouched(name: str) -> None:
    p = _posterior()
    x = torch.randn(5, IN, dtype=F64)
    before = torch.random.get_rng_state()
    first = ESTIMATORS[name](x, **p, generator=torch.Generator().manual_seed(7))
    second = ESTIMATORS[name](x, **p, generator=torch.Generator().manual_seed(7))
    other = ESTIMATORS[name](x, **p, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("name", NAMES)
def test_zero_scale_is_the_mean(name: str) -> None:
    """With every scale 0 the estimators reduce to the mean map (to rounding)."""
    p = _posterior()
    x = torch.randn(5, IN, dtype=F64)
    y = ESTIMATORS[name](x, p["w_loc"], torch.zeros_like(p["w_scale"]), p["b_loc"], p["b_loc"] * 0)
    torch.testing.assert_close(y, x @ p["w_loc"] + p["b_loc"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(5,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_linear_is_bit_identical(
    dtype: torch.dtype, batch_shape: tuple[int, ...], bias: bool
) -> None:
    p = _posterior(dtype)
    x = torch.randn(*batch_shape, IN, dtype=dtype)
    if bias:
        assert torch.equal(mean_linear(x, p["w_loc"], p["b_loc"]), x @ p["w_loc"] + p["b_loc"])
    else:
        assert torch.equal(mean_linear(x, p["w_loc"]), x @ p["w_loc"])


# -- num_weight_samples: one independent weight sample per leading slice ---------------------

NUM_SLICES = 20_000


@functools.cache
def _slice_draws() -> tuple[torch.Tensor, torch.Tensor]:
    """x of shape (S, 3, IN): every slice the same 3 rows, the first two identical."""
    x0, x1 = _inputs()[1:3]
    rows = torch.stack([x0, x0, x1])
    x = rows.expand(NUM_SLICES, 3, IN)
    g = torch.Generator().manual_seed(99)
    y = reparameterized_linear(x, **_posterior(), generator=g, num_weight_samples=NUM_SLICES)
    return rows, y


def test_weight_samples_per_slice_moments() -> None:
    """Across S = 20 000 slices each slice's output is one draw of the closed-form Normal.

    Same derivation as the per-example test: z from a 1e-6 two-sided rate, Bonferroni over
    2 x 3 x 3 = 18 entries.
    """
    rows, y = _slice_draws()
    assert y.shape == (NUM_SLICES, 3, OUT)
    mean, var = _closed_form(rows, _posterior())
    checks = 2 * mean.numel()
    assert (y.mean(0) - mean).abs().le(mean_tolerance(var, NUM_SLICES, checks)).all()
    assert (y.var(0) - var).abs().le(variance_tolerance(var, NUM_SLICES, checks)).all()


def test_weight_samples_shared_within_slice_independent_across() -> None:
    """Rows of one slice share the slice's sample; consecutive slices are independent.

    Independence: the lag-1 correlation over S - 1 pairs of independent draws has sd
    1/sqrt(S - 1); bound at a 1e-6 failure rate with Bonferroni over 3 x 3 entries.
    """
    _, y = _slice_draws()
    assert torch.equal(y[:, 0], y[:, 1])
    assert not torch.equal(y[0], y[1])
    lag = sample_correlation(y[:-1], y[1:])
    assert lag.abs().max() <= correlation_tolerance(NUM_SLICES - 1, 3 * OUT)


def test_flipout_slices_get_independent_perturbations() -> None:
    """Flipout with num_weight_samples: the S outputs of ONE example are independent draws.

    One perturbation shared by all slices would make their spread a single random estimate of
    x^2 sigma^2 (for the same example, only the signs change); with S draws the sample variance
    over S = 20 000 slices matches the closed form within the same 1e-6-rate bounds as above.
    """
    x0 = _inputs()[1]
    x = x0.expand(NUM_SLICES, 1, IN)
    g = torch.Generator().manual_seed(7)
    y = flipout_linear(x, **_posterior(), generator=g, num_weight_samples=NUM_SLICES)
    mean, var = _closed_form(x0.unsqueeze(0), _posterior())
    checks = 2 * mean.numel()
    assert (y.mean(0) - mean).abs().le(mean_tolerance(var, NUM_SLICES, checks)).all()
    assert (y.var(0) - var).abs().le(variance_tolerance(var, NUM_SLICES, checks)).all()


@pytest.mark.parametrize("name", NAMES)
def test_sample_slices_without_gradients_give_the_recorded_values(name: str) -> None:
    """Monte Carlo prediction (no gradient recorded) writes its samples over the noise; the
    numbers are those of the path that records gradients, bit for bit, for the same seed."""
    x = torch.randn(3, 4, IN, dtype=F64)
    p = _posterior()
    leaf = {k: v.clone().requires_grad_() for k, v in p.items()}
    recorded = ESTIMATORS[name](
        x, **leaf, generator=torch.Generator().manual_seed(5), num_weight_samples=3
    )
    with torch.no_grad():
        plain = ESTIMATORS[name](
            x, **p, generator=torch.Generator().manual_seed(5), num_weight_samples=3
        )
    assert recorded.requires_grad and torch.equal(recorded.detach(), plain)


@pytest.mark.parametrize("name", NAMES)
def test_num_weight_samples_keeps_shape_for_every_estimator(name: str) -> None:
    x = torch.randn(4, 5, IN, dtype=F64)
    y = ESTIMATORS[name](x, **_posterior(), num_weight_samples=4)
    assert y.shape == (4, 5, OUT)
    assert not torch.equal(y[0], y[1])


def test_num_weight_samples_must_match_leading_dimension() -> None:
    """A leading dimension that is not ``num_weight_samples`` must not be silently regrouped."""
    x = torch.randn(8, IN, dtype=F64)
    with pytest.raises(ValueError, match="num_weight_samples"):
        reparameterized_linear(x, **_posterior(), num_weight_samples=4)
