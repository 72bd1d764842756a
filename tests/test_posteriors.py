"""Tests for varlin.posteriors.MeanFieldNormal and the softplus parameterisation of its scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.distributions import Normal

from varlin.functional import inverse_softplus
from varlin.posteriors import MeanFieldNormal


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
def test_inverse_softplus_round_trip(dtype: torch.dtype, rtol: float) -> None:
    """softplus(inverse_softplus(y)) == y over 1e-6..1e3, where log(expm1(y)) naively overflows.

    float64 tolerance 1e-10: torch's softplus returns its input above ``threshold=20``, dropping
    ``log1p(exp(-20))/20 ~ 1e-10`` relative; the inverse is exact to ~1e-15.
    """
    y = torch.logspace(-6, 3, 200, dtype=dtype)
    raw = inverse_softplus(y)
    assert torch.isfinite(raw).all()
    torch.testing.assert_close(TF.softplus(raw), y, rtol=rtol, atol=0)


def test_inverse_softplus_inverts_softplus() -> None:
    x = torch.linspace(-15, 30, 301, dtype=torch.float64)
    torch.testing.assert_close(inverse_softplus(TF.softplus(x)), x, rtol=1e-9, atol=1e-9)


def test_forward_returns_normal_of_shape_with_softplus_scale() -> None:
    q = MeanFieldNormal((3, 2), init_scale=0.1)
    dist = q()
    assert isinstance(dist, Normal)
    assert dist.batch_shape == (3, 2)
    assert dist.loc is q.loc
    torch.testing.assert_close(dist.scale, TF.softplus(q.raw_scale))
    torch.testing.assert_close(q.scale, torch.full((3, 2), 0.1))
    assert dist.rsample().shape == (3, 2)


@pytest.mark.parametrize("init_scale", [1e-6, 1e-2, 1.0, 30.0])
def test_init_scale_is_exact(init_scale: float) -> None:
    q = MeanFieldNormal((4,), init_scale=init_scale, dtype=torch.float64)
    torch.testing.assert_close(q.scale, torch.full((4,), init_scale, dtype=torch.float64))


def test_parameters_are_loc_and_raw_scale_only() -> None:
    q = MeanFieldNormal((3, 2))
    assert {name for name, _ in q.named_parameters()} == {"loc", "raw_scale"}
    assert all(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_init_scale_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="init_scale"):
        MeanFieldNormal((2,), init_scale=bad)


def test_scale_stays_positive_after_big_negative_step() -> None:
    """One SGD step that moves raw_scale by -45 (the seed's scale of 1 would become -44).

    The scale is softplus(raw) = about 1e-21: tiny, but positive, so a validating Normal accepts it
    and log(scale) (the KL's term) is finite.
    """
    q = MeanFieldNormal((3, 2), init_scale=1.0)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    sigmoid = torch.sigmoid(q.raw_scale.detach())  # d softplus / d raw
    (q.scale * (45.0 / sigmoid)).sum().backward()
    opt.step()
    torch.testing.assert_close(
        q.raw_scale.detach(), torch.full((3, 2), float(inverse_softplus(torch.tensor(1.0))) - 45)
    )
    assert (q.scale > 0).all()
    assert torch.isfinite(torch.log(q.scale)).all()
    Normal(q.loc, q.scale, validate_args=True)  # raises if any scale <= 0


def test_scale_never_negative_or_nan_for_any_raw_value() -> None:
    """Even a raw value of -1e6 (underflow) maps to a scale >= 0, never negative, never NaN."""
    q = MeanFieldNormal((5,))
    with torch.no_grad():
        q.raw_scale.copy_(torch.tensor([-1e6, -100.0, 0.0, 100.0, 1e6]))
    assert (q.scale >= 0).all()
    assert not torch.isnan(q.scale).any()
    assert q.scale[3] == 100.0 and q.scale[4] == 1e6  # softplus is the identity for large raw


@pytest.mark.parametrize(("in_features", "out_features"), [(1, 3), (16, 64), (300, 2)])
def test_reset_parameters_uses_nn_linear_bounds(in_features: int, out_features: int) -> None:
    """loc ~ U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear's weight (shape (in, out): fan_in = in)."""
    q = MeanFieldNormal((in_features, out_features), init_scale=0.05)
    with torch.no_grad():
        q.raw_scale.fill_(3.0)
    q.reset_parameters()
    bound = 1 / math.sqrt(in_features)
    linear = nn.Linear(in_features, out_features)
    assert linear.weight.abs().max() <= bound
    assert q.loc.abs().max() <= bound
    if q.loc.numel() >= 64:
        # Spread over the interval, not collapsed: the max of n uniforms exceeds
        # bound * (1 - 30/n) with probability 1 - (1 - 15/n)^n > 1 - e^-15 (3e-7) per side.
        assert q.loc.max() > bound * (1 - 30 / q.loc.numel())
        assert q.loc.min() < -bound * (1 - 30 / q.loc.numel())
    torch.testing.assert_close(q.scale, torch.full_like(q.scale, 0.05))


def test_reset_parameters_with_generator_is_reproducible() -> None:
    q1, q2 = MeanFieldNormal((5, 3)), MeanFieldNormal((5, 3))
    q1.reset_parameters(torch.Generator().manual_seed(3))
    q2.reset_parameters(torch.Generator().manual_seed(3))
    assert torch.equal(q1.loc, q2.loc)
    q2.reset_parameters(torch.Generator().manual_seed(4))
    assert not torch.equal(q1.loc, q2.loc)


def test_reset_scale_changes_init_scale() -> None:
    q = MeanFieldNormal((2,), init_scale=0.1)
    q.reset_scale(0.5)
    torch.testing.assert_close(q.scale, torch.full((2,), 0.5))
    assert q.init_scale == 0.5
    assert "init_scale=0.5" in repr(q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factory_kwargs_and_double(dtype: torch.dtype) -> None:
    q = MeanFieldNormal((3,), dtype=dtype, device="cpu")
    assert q.loc.dtype == dtype and q.raw_scale.dtype == dtype
    assert q().scale.dtype == dtype
    q.double()
    assert q().loc.dtype == torch.float64
