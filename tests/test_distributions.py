"""Tests for varlin.distributions: the matrix normal against the dense multivariate Normal, the
radial distribution against the Normal (one dimension), numerical integration and Monte Carlo."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import mean_tolerance, z_bound
from torch.distributions import MultivariateNormal, Normal

from varlin.distributions import MatrixNormal, Radial, radial_entropy_constant


def _factor(n: int, g: torch.Generator, diagonal: bool) -> torch.Tensor:
    diag = 0.3 + torch.rand(n, generator=g, dtype=torch.float64)
    if diagonal:
        return diag
    return torch.randn(n, n, generator=g, dtype=torch.float64).tril(-1) * 0.5 + torch.diag(diag)


def _matrix_normal(rows: int, cols: int, diag_row: bool, diag_col: bool) -> MatrixNormal:
    g = torch.Generator().manual_seed(rows * 10 + cols)
    loc = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return MatrixNormal(loc, _factor(rows, g, diag_row), _factor(cols, g, diag_col))


FACTOR_KINDS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize(("diag_row", "diag_col"), FACTOR_KINDS)
def test_matrix_normal_is_the_kronecker_normal(diag_row: bool, diag_col: bool) -> None:
    """log_prob, entropy, variance and covariance against MultivariateNormal(vec M, U (x) V)."""
    q = _matrix_normal(3, 4, diag_row, diag_col)
    lu = torch.diag(q.row_scale_tril) if diag_row else q.row_scale_tril
    lv = torch.diag(q.col_scale_tril) if diag_col else q.col_scale_tril
    dense = MultivariateNormal(
        q.loc.reshape(-1), covariance_matrix=torch.kron(lu @ lu.T, lv @ lv.T)
    )
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        q.log_prob(x), dense.log_prob(x.reshape(5, -1)), rtol=1e-12, atol=1e-10
    )
    torch.testing.assert_close(q.entropy(), dense.entropy(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(q.variance.reshape(-1), dense.variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.covariance_matrix, dense.covariance_matrix)
    assert q.event_shape == (3, 4) and q.batch_shape == () and torch.equal(q.mean, q.loc)


@pytest.mark.parametrize(("diag_row", "diag_col"), FACTOR_KINDS)
def test_matrix_normal_samples_have_its_moments(diag_row: bool, diag_col: bool) -> None:
    """100 000 draws: mean (known variance) and the covariance of two entries in different
    rows and columns (sd of a product estimated from the draws); rate 1e-6 over 13 checks."""
    n = 100_000
    q = _matrix_normal(2, 3, diag_row, diag_col)
    x = q.rsample((n,))
    assert x.shape == (n, 2, 3)
    assert ((x.mean(0) - q.loc).abs() <= mean_tolerance(q.variance, n, 13)).all()
    dev = x - q.loc
    product = dev[:, 0, 0] * dev[:, 1, 2]
    cov = q.covariance_matrix[0, 5]
    assert (product.mean() - cov).abs() <= z_bound(13) * product.std() / math.sqrt(n)


def test_matrix_normal_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="loc must be a matrix"):
        MatrixNormal(torch.zeros(3), torch.ones(3), torch.ones(1))
    with pytest.raises(ValueError, match=r"row_scale_tril must have shape \(2,\) or \(2, 2\)"):
        MatrixNormal(torch.zeros(2, 3), torch.ones(3), torch.ones(3))


def test_radial_in_one_dimension_is_the_normal() -> None:
    """One entry: a uniform direction is a fair sign and the radius |r|: N(mu, sigma^2)."""
    loc, scale = torch.tensor([0.4], dtype=torch.float64), torch.tensor([1.7], dtype=torch.float64)
    q, normal = Radial(loc, scale), Normal(loc, scale)
    x = torch.linspace(-5, 5, 41, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(
        q.log_prob(x), normal.log_prob(x).squeeze(-1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(q.entropy(), normal.entropy().sum(), rtol=1e-12, atol=1e-12)
    assert radial_entropy_constant(1) == pytest.approx(0.5 * math.log(2 * math.pi * math.e))


def test_radial_density_integrates_to_one_in_two_dimensions() -> None:
    """Midpoint rule on a polar grid (the density has an integrable 1/r peak at the mean)."""
    q = Radial(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64))
    radius = (torch.arange(4000, dtype=torch.float64) + 0.5) * (8.0 / 4000)
    angle = (torch.arange(720, dtype=torch.float64) + 0.5) * (2 * math.pi / 720)
    rr, aa = torch.meshgrid(radius, angle, indexing="ij")
    points = torch.stack([rr * torch.cos(aa) * 1.0, rr * torch.sin(aa) * 0.5], -1)
    jacobian = rr * 1.0 * 0.5  # polar, then the scaling by sigma
    mass = (q.log_prob(points).exp() * jacobian).sum() * (8.0 / 4000) * (2 * math.pi / 720)
    assert abs(float(mass) - 1.0) < 1e-6


@pytest.mark.parametrize("shape", [(5,), (3, 4), (20, 15)])
def test_radial_entropy_variance_and_samples_by_monte_carlo(shape: tuple[int, ...]) -> None:
    """200 000 draws: -mean log_prob vs the closed-form entropy; per-entry variance
    sigma^2 / D and mean mu (tolerances from the draws' spread); rate 1e-6 over the checks."""
    g = torch.Generator().manual_seed(len(shape))
    loc = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    q = Radial(loc, scale)
    n = 200_000 if len(shape) < 2 or shape[0] < 10 else 20_000
    x = q.rsample((n,))
    assert x.shape == (n, *shape)
    d = loc.numel()
    checks = 1 + 2 * d
    neg_log_prob = -q.log_prob(x)
    assert (neg_log_prob.mean() - q.entropy()).abs() <= z_bound(
        checks
    ) * neg_log_prob.std() / math.sqrt(n)
    torch.testing.assert_close(q.variance, scale.square() / d)
    dev = x - loc
    assert (dev.mean(0).abs() <= z_bound(checks) * dev.std(0) / math.sqrt(n)).all()
    second = dev.square()
    assert (
        (second.mean(0) - q.variance).abs() <= z_bound(checks) * second.std(0) / math.sqrt(n)
    ).all()
    # Every sample's direction is on the sphere: (x - mu) / sigma has norm |r|, one per draw.
    norms = (dev / scale).reshape(n, -1).norm(dim=-1)
    r_var = norms.square()
    assert (r_var.mean() - 1).abs() <= z_bound(checks) * r_var.std() / math.sqrt(n)


def test_radial_rejects_mismatched_shapes(float64: Any) -> None:
    with pytest.raises(ValueError, match=r"scale must have the shape of loc \(2, 3\)"):
        Radial(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        radial_entropy_constant(0)
