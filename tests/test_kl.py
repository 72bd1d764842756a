r"""Tests for varlin.kl and the layers' KL: closed forms, the Monte Carlo fallback, the sums.

Closed forms are checked against torch's registry in float64. The Monte Carlo fallback
:math:`\widehat{KL} = \log q(z) - \log p(z)`, :math:`z \sim q`, is checked for unbiasedness
against the closed form it should estimate, with a tolerance from a stated failure rate.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import z_bound
from torch import nn
from torch.distributions import Distribution, Laplace, Normal, StudentT, constraints

import varlin
from varlin import priors
from varlin.kl import distribution_kl, has_closed_form, normal_kl, normal_kl_sum, normal_kl_sums
from varlin.priors import ScaleMixtureNormal


class UnregisteredNormal(Distribution):
    """A Normal that torch's KL registry does not know (not a subclass of ``Normal``).

    Pairs with it have no closed form, so they exercise the Monte Carlo fallback on a pair whose
    true KL is known.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, *, rsample: bool = True) -> None:
        self.loc, self.scale = torch.distributions.utils.broadcast_all(loc, scale)
        self.has_rsample = rsample
        super().__init__(self.loc.shape, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return Normal(self.loc, self.scale, validate_args=False).log_prob(value)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return Normal(self.loc, self.scale).rsample(sample_shape)


# -- closed form -----------------------------------------------------------------------------


def test_normal_kl_matches_torch_registry(float64: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (50, 7)
    q_loc, p_loc = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    q_scale = torch.exp(2 * torch.randn(shape, generator=g))
    p_scale = torch.exp(2 * torch.randn(shape, generator=g))
    ours = normal_kl(q_loc, q_scale, p_loc, p_scale)
    theirs = torch.distributions.kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
    assert ours.shape == shape
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)


def test_normal_kl_broadcasts_scalar_prior(float64: torch.dtype) -> None:
    q_loc, q_scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    ours = normal_kl(q_loc, q_scale, torch.tensor(0.5), torch.tensor(2.0))
    theirs = torch.distributions.kl_divergence(Normal(q_loc, q_scale), Normal(0.5, 2.0))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_kl_is_zero_when_q_equals_p(dtype: torch.dtype) -> None:
    loc = torch.randn(10, dtype=dtype)
    scale = torch.logspace(-4, 4, 10, dtype=dtype)
    assert torch.equal(normal_kl(loc, scale, loc, scale), torch.zeros(10, dtype=dtype))


def test_normal_kl_never_negative_on_a_scale_grid_in_float32() -> None:
    """Scales 1e-4..1e4 for both q and p, means equal or close: KL >= 0, finite, and accurate.

    Near ``r = 1`` the terms ``r^2 - 1`` and ``2 log r`` cancel; rounding must neither make the
    KL negative nor lose its accuracy against a float64 evaluation.
    """
    scales = torch.logspace(-4, 4, 41)
    near_one = 1 + torch.tensor([-1e-6, -1e-7, 0.0, 1e-7, 1e-6])
    q_scale = torch.cat([scales, near_one]).view(-1, 1, 1)
    p_scale = torch.cat([scales, torch.ones(5)]).view(1, -1, 1)
    delta = torch.tensor([0.0, 1e-6, 1e-3, 1.0]).view(1, 1, -1)
    q_loc, p_loc = 0.3 + delta, torch.full_like(delta, 0.3)
    kl = normal_kl(q_loc, q_scale, p_loc, p_scale)
    assert kl.shape == (46, 46, 4)
    assert (kl >= 0).all()
    assert torch.isfinite(kl).all()
    exact = normal_kl(q_loc.double(), q_scale.double(), p_loc.double(), p_scale.double())
    torch.testing.assert_close(kl.double(), exact, rtol=1e-4, atol=1e-6)


def test_distribution_kl_uses_closed_form_when_registered(float64: torch.dtype) -> None:
    q = Normal(torch.randn(5), torch.rand(5) + 0.1)
    for p in [Normal(torch.zeros(5), 2.0), Laplace(torch.zeros(5), 0.5)]:
        assert has_closed_form(q, p)
        kl = distribution_kl(q, p)
        assert torch.equal(kl, distribution_kl(q, p))  # deterministic: no sampling
        torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "p",
    [
        UnregisteredNormal(torch.zeros(3), torch.ones(3)),
        StudentT(3.0, torch.zeros(3), torch.ones(3)),
        ScaleMixtureNormal(0.5, 1.0, 0.1).expand((3,)),
    ],
    ids=["UnregisteredNormal", "StudentT", "ScaleMixtureNormal"],
)
def test_has_closed_form_is_false_without_registry_entry(p: Distribution) -> None:
    q = Normal(torch.zeros(3), torch.ones(3))
    assert not has_closed_form(q, p)
    with pytest.raises(NotImplementedError):
        torch.distributions.kl_divergence(q, p)


# -- Monte Carlo fallback --------------------------------------------------------------------

#: Monte Carlo estimates averaged in the unbiasedness tests.
NUM_MC = 100_000


def _mc_variance(q_loc, q_scale, p_loc, p_scale):  # type: ignore[no-untyped-def]
    r"""Exact variance of one estimate :math:`\log q(z) - \log p(z)` for two Normals.

    With :math:`z = \mu_q + \sigma_q\epsilon`, :math:`r = \sigma_q/\sigma_p`,
    :math:`\Delta = \mu_q - \mu_p`: the estimate is
    :math:`c + \tfrac{r^2-1}{2}\epsilon^2 + \tfrac{\Delta\sigma_q}{\sigma_p^2}\epsilon`, and
    :math:`\epsilon^2`, :math:`\epsilon` are uncorrelated with variances 2 and 1, so
    :math:`\operatorname{Var} = (r^2-1)^2/2 + (\Delta\sigma_q/\sigma_p^2)^2`.
    """
    r = q_scale / p_scale
    return (r**2 - 1) ** 2 / 2 + ((q_loc - p_loc) * q_scale / p_scale**2) ** 2


@pytest.mark.parametrize("use_generator", [False, True], ids=["rsample", "generator"])
def test_monte_carlo_fallback_is_unbiased(float64: torch.dtype, use_generator: bool) -> None:
    r"""Mean of N = 100 000 one-sample estimates vs the closed form, for 4 (q, p) pairs.

    The mean of N i.i.d. estimates has sd :math:`\sqrt{\operatorname{Var}/N}` with the exact
    variance of :func:`_mc_variance`; by the CLT (the estimate is a quadratic in a Normal, so its
    skewness is bounded and /sqrt(N) negligible) the bound z sd fails at a 1e-6 two-sided rate,
    Bonferroni over the 4 pairs.
    """
    q_loc = torch.tensor([0.0, 1.0, -0.5, 2.0])
    q_scale = torch.tensor([1.0, 0.5, 2.0, 0.1])
    p_loc = torch.tensor([0.0, 0.0, 0.5, 1.0])
    p_scale = torch.tensor([2.0, 1.0, 1.5, 0.3])
    shape = (NUM_MC, 4)
    q = Normal(q_loc.expand(shape), q_scale.expand(shape))
    p = UnregisteredNormal(p_loc.expand(shape), p_scale.expand(shape))
    generator = torch.Generator().manual_seed(3) if use_generator else None
    estimates = distribution_kl(q, p, generator=generator)
    assert estimates.shape == shape
    exact = normal_kl(q_loc, q_scale, p_loc, p_scale)
    sd_of_mean = torch.sqrt(_mc_variance(q_loc, q_scale, p_loc, p_scale) / NUM_MC)
    assert ((estimates.mean(0) - exact).abs() <= z_bound(4) * sd_of_mean).all()
    # And it is a Monte Carlo estimate: the individual estimates vary.
    assert estimates.std(0).min() > 0


def test_monte_carlo_fallback_is_differentiable(float64: torch.dtype) -> None:
    loc = torch.tensor([0.3, -1.0], requires_grad=True)
    scale = torch.tensor([0.5, 2.0], requires_grad=True)
    kl = distribution_kl(Normal(loc, scale), UnregisteredNormal(torch.zeros(2), torch.ones(2)))
    kl.sum().backward()
    for leaf in (loc, scale):
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all() and (leaf.grad != 0).all()


def test_monte_carlo_fallback_needs_rsample() -> None:
    q = UnregisteredNormal(torch.zeros(3), torch.ones(3), rsample=False)
    with pytest.raises(NotImplementedError, match="rsample"):
        distribution_kl(q, StudentT(3.0, torch.zeros(3), torch.ones(3)))


def _quadrature_kl(q_loc: float, q_scale: float, p: Distribution) -> float:
    """KL(N(q_loc, q_scale^2) || p) by the trapezoid rule over q_loc +- 12 q_scale (float64)."""
    z = torch.linspace(q_loc - 12 * q_scale, q_loc + 12 * q_scale, 40_001, dtype=torch.float64)
    log_q = Normal(torch.tensor(q_loc, dtype=torch.float64), q_scale).log_prob(z)
    integrand = log_q.exp() * (log_q - p.log_prob(z))
    return float(torch.trapezoid(integrand, z))


def test_scale_mixture_kl_monte_carlo_matches_quadrature(float64: torch.dtype) -> None:
    """ScaleMixtureNormal has no closed form: the MC mean matches numerical integration.

    N = 100 000 estimates per element; sd of the mean from the estimates' own sample sd (N large
    enough that its error is negligible); z at a 1e-6 rate over 3 elements.
    """
    prior = ScaleMixtureNormal(0.5, 1.0, math.exp(-6))
    q_loc = torch.tensor([0.0, 0.05, 1.0])
    q_scale = torch.tensor([0.01, 0.002, 0.3])
    shape = (NUM_MC, 3)
    q = Normal(q_loc.expand(shape), q_scale.expand(shape))
    assert not has_closed_form(q, prior)
    estimates = distribution_kl(q, prior.expand(shape), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(estimates).all()
    exact = torch.tensor(
        [_quadrature_kl(float(m), float(s), prior) for m, s in zip(q_loc, q_scale, strict=True)]
    )
    sd_of_mean = estimates.std(0) / math.sqrt(NUM_MC)
    assert ((estimates.mean(0) - exact).abs() <= z_bound(3) * sd_of_mean).all()


# -- the layers' KL --------------------------------------------------------------------------


def _closed_form_sum(layer: varlin.LinearVariationalNormal) -> torch.Tensor:
    """Second route: torch's registry on the layer's distributions, summed."""
    total = torch.distributions.kl_divergence(layer.weight_posterior(), layer.weight_prior()).sum()
    q_b, p_b = layer.bias_posterior(), layer.bias_prior()
    if q_b is not None and p_b is not None:
        total = total + torch.distributions.kl_divergence(q_b, p_b).sum()
    return total


def _randomise(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "factories",
    [
        (None, None),
        (priors.normal(0.5, 0.1), priors.normal(3.0)),
        (priors.laplace(0.5), priors.laplace(1.0)),
        (lambda i, o: Normal(torch.randn(i, o), torch.rand(i, o) + 0.5), None),
    ],
    ids=["default", "normal-factory", "laplace", "full-size-lambda"],
)
def test_layer_kl_equals_sum_of_closed_forms(float64: torch.dtype, factories, bias: bool) -> None:  # type: ignore[no-untyped-def]
    make_w, make_b = factories
    layer = varlin.LinearVariationalNormal(
        3, 4, bias, make_w, make_b if bias else None, init_scale=0.3
    )
    _randomise(layer)
    kl = layer.kl_divergence()
    assert kl.shape == ()
    torch.testing.assert_close(kl, _closed_form_sum(layer), rtol=1e-12, atol=0)
    assert kl > 0


def test_layer_kl_is_zero_when_posterior_equals_prior(float64: torch.dtype) -> None:
    layer = varlin.LinearVariationalNormal(3, 4, make_weights_prior=priors.normal(0.7, 0.2))
    with torch.no_grad():
        layer.w_posterior.loc.fill_(0.2)
        layer.w_posterior.reset_scale(0.7)
        assert layer.b_posterior is not None
        layer.b_posterior.loc.zero_()
        layer.b_posterior.reset_scale(1.0)
    torch.testing.assert_close(layer.kl_divergence(), torch.tensor(0.0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("kl_weight", [0.0, 0.37, 1.0, 2.5, "tensor"])
def test_returned_kl_is_weight_times_sum_of_both_terms(kl_weight: float | str) -> None:
    """``kl == kl_weight * (KL_w.sum() + KL_b.sum())`` bit for bit, the weight on both terms."""
    layer = varlin.LinearVariationalNormal(3, 4, init_scale=0.3)
    _randomise(layer)
    weight = torch.tensor(0.37) if kl_weight == "tensor" else kl_weight
    _, kl = layer(torch.randn(2, 3), kl_weight=weight)
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    kl_w = normal_kl_sum(layer.w_loc, layer.w_scale, zero, one)
    assert layer.b_loc is not None and layer.b_scale is not None
    kl_b = normal_kl_sum(layer.b_loc, layer.b_scale, zero, one)
    assert kl.shape == ()
    assert torch.equal(kl, weight * (kl_w + kl_b))
    assert kl_w > 0 and kl_b > 0
    # and each term is the elementwise closed form's sum, to the rounding of 12 (4) terms
    for term, loc, scale in [
        (kl_w, layer.w_loc, layer.w_scale),
        (kl_b, layer.b_loc, layer.b_scale),
    ]:
        plain = normal_kl(loc, scale, zero, one).sum()
        torch.testing.assert_close(term, plain, rtol=2 * loc.numel() * 1.2e-7, atol=0)


def test_returned_kl_is_differentiable() -> None:
    layer = varlin.LinearVariationalNormal(3, 4)
    _, kl = layer(torch.randn(2, 3), kl_weight=0.5)
    kl.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_model_kl_is_the_sum_of_layer_kls() -> None:
    first, second = varlin.VariationalLinear(3, 5), varlin.VariationalLinear(5, 2, bias=False)
    model = nn.Sequential(first, nn.ReLU(), second)
    _randomise(model)
    total = varlin.kl_divergence(model)
    assert total.shape == ()
    assert torch.equal(total, first.kl_divergence() + second.kl_divergence())
    # Nested containers and the seed layer count too; each layer once.
    seed_layer = varlin.LinearVariationalNormal(2, 1)
    outer = nn.ModuleDict({"body": model, "head": seed_layer})
    torch.testing.assert_close(varlin.kl_divergence(outer), total + seed_layer.kl_divergence())
    assert list(varlin.variational_layers(outer)) == [first, second, seed_layer]


def test_model_without_variational_layers_has_zero_kl() -> None:
    kl = varlin.kl_divergence(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert kl.shape == () and kl == 0
    with pytest.raises(TypeError, match="nn.Module"):
        varlin.kl_divergence([varlin.VariationalLinear(2, 3)])  # type: ignore[arg-type]


def test_scale_mixture_layer_kl_is_monte_carlo_and_finite() -> None:
    layer = varlin.LinearVariationalNormal(
        3, 4, make_weights_prior=priors.scale_mixture(), generator=torch.Generator().manual_seed(0)
    )
    assert not has_closed_form(layer.weight_posterior(), layer.weight_prior())
    first, second = layer.kl_divergence(), layer.kl_divergence()
    assert first.shape == ()
    assert torch.isfinite(first) and torch.isfinite(second)
    assert not torch.equal(first, second)  # a fresh Monte Carlo draw per call
    # The layer's MC term is distribution_kl on its own distributions with its own generator.
    assert layer.generator is not None
    layer.generator.manual_seed(7)
    ours = layer.kl_divergence()
    g = torch.Generator().manual_seed(7)
    q, p = layer.weight_posterior(), layer.weight_prior()
    expected = distribution_kl(q, p, generator=g).sum()
    assert layer.b_loc is not None and layer.b_scale is not None
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    expected = expected + normal_kl(layer.b_loc, layer.b_scale, zero, one).sum()
    torch.testing.assert_close(ours, expected)


def _normal_mixture(*shape: int) -> Distribution:
    """A two-component Normal mixture prior (support: every real), scalar batch shape."""
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor([0.3, 0.7])),
        Normal(torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 2.0])),
    )


def test_mixture_same_family_prior_is_accepted_and_its_kl_is_unbiased(float64: torch.dtype) -> None:
    """A MixtureSameFamily of Normals is supported on the real line, so it is a valid prior.

    Its KL against the posterior has no closed form: the layer's Monte Carlo term is
    distribution_kl on its own distributions, and with every weight's posterior N(0.3, 0.2^2)
    its 20 000 terms are i.i.d. estimates of one KL, whose mean matches numerical integration
    (sd of the mean from the terms' own sample sd; z at a 1e-6 rate).
    """
    layer = varlin.LinearVariationalNormal(
        200, 100, bias=False, make_weights_prior=_normal_mixture,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    with torch.no_grad():
        layer.w_posterior.loc.fill_(0.3)
        layer.w_posterior.reset_scale(0.2)
    assert layer.generator is not None
    layer.generator.manual_seed(4)
    ours = layer.kl_divergence()
    q, p = layer.weight_posterior(), layer.weight_prior()
    terms = distribution_kl(q, p, generator=torch.Generator().manual_seed(4)).detach()
    assert torch.equal(ours.detach(), terms.sum())
    exact = _quadrature_kl(0.3, float(layer.w_scale[0, 0].detach()), _normal_mixture())
    sd_of_mean = terms.std() / math.sqrt(terms.numel())
    assert abs(float(terms.mean()) - exact) <= z_bound(1) * float(sd_of_mean)
    # Supported where it matters: a mixture of Gammas (support [0, inf)) is still refused.
    gammas = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor([0.5, 0.5])),
        torch.distributions.Gamma(torch.ones(2), torch.ones(2)),
    )
    with pytest.raises(ValueError, match="supported on the real line.*MixtureSameFamily"):
        varlin.LinearVariationalNormal(3, 2, make_weights_prior=lambda i, o: gammas)


@pytest.mark.parametrize("prior", ["neutral", "shifted"])
def test_normal_kl_sums_is_the_sum_of_the_groups_bit_for_bit(prior: str) -> None:
    """One autograd node for a layer's weights and bias (issue 17): the value of adding the
    groups' ``normal_kl_sum`` in order and the same gradients, for the default N(0, 1) prior
    (whose no-op passes are skipped) and a shifted, rescaled one."""
    gen = torch.Generator().manual_seed(0)
    p_loc, p_scale = (0.0, 1.0) if prior == "neutral" else (0.3, 0.7)
    tensors = [
        (torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) + 0.05)
        for shape in [(6, 5), (5,)]
    ]
    priors_ = [
        (torch.tensor(p_loc), torch.tensor(p_scale)),
        (torch.tensor(p_loc), torch.tensor(p_scale)),
    ]

    def run(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_() for pair in tensors for t in pair]
        groups = [(leaves[0], leaves[1], *priors_[0]), (leaves[2], leaves[3], *priors_[1])]
        if fused:
            total = normal_kl_sums(groups)
        else:
            total = normal_kl_sum(*groups[0]) + normal_kl_sum(*groups[1])
        total.backward()
        return total.detach(), [leaf.grad for leaf in leaves]  # type: ignore[misc]

    fused, fused_grads = run(True)
    separate, separate_grads = run(False)
    assert torch.equal(fused, separate)
    for a, b in zip(fused_grads, separate_grads, strict=True):
        assert torch.equal(a, b)
    # and it is the KL: against the elementwise closed form in float64
    exact = sum(
        normal_kl(q.double(), s.double(), torch.tensor(p_loc, dtype=torch.float64),
                  torch.tensor(p_scale, dtype=torch.float64)).sum()
        for q, s in tensors
    )  # fmt: skip
    assert float(fused) == pytest.approx(float(exact), rel=1e-6)


def test_normal_kl_sums_gives_a_learned_prior_its_gradient_and_needs_a_group() -> None:
    """A prior that requires grad gets its gradient through the one node; no group: an error."""
    q = torch.randn(4, requires_grad=True)
    s = torch.rand(4).add_(0.1).requires_grad_()
    p_scale = torch.tensor(1.5, requires_grad=True)
    total = normal_kl_sums([(q, s, torch.tensor(0.0), p_scale), (q, s, torch.tensor(0.0), p_scale)])
    total.backward()
    assert p_scale.grad is not None and q.grad is not None
    with pytest.raises(ValueError, match="at least one group"):
        normal_kl_sums([])


# -- learned priors: the fused sum's gradient reaches the prior --------------------------------


@pytest.mark.parametrize(
    "p_scale_shape", [(), (4,), (1, 4), (5, 1), (5, 4)], ids=lambda s: f"scale{s}"
)
@pytest.mark.parametrize("p_loc_shape", [(), (4,)], ids=lambda s: f"loc{s}")
@pytest.mark.parametrize("neutral", [False, True], ids=["prior", "N(0,1)-valued"])
def test_fused_normal_kl_sum_gives_a_learned_prior_autograds_gradient(
    float64: torch.dtype,
    p_scale_shape: tuple[int, ...],
    p_loc_shape: tuple[int, ...],
    neutral: bool,
) -> None:
    """The closed-form backward of ``normal_kl_sum`` against autograd through ``normal_kl``:
    value bit for bit (to rounding against a one-entry prior, whose sum is formed differently),
    the gradients of all four inputs (the prior's too) to 1e-12.

    ``neutral``: a prior whose values are exactly 0 and 1 (a learned scale starting at 1), where
    the forward skips the exact no-ops; the prior must still get its gradient.
    """
    g = torch.Generator().manual_seed(0)
    q_loc = torch.randn(5, 4, generator=g).requires_grad_()
    q_scale = (0.2 + torch.rand(5, 4, generator=g)).requires_grad_()
    if neutral:
        p_loc = torch.zeros(p_loc_shape).requires_grad_()
        p_scale = torch.ones(p_scale_shape).requires_grad_()
    else:
        p_loc = (0.3 * torch.randn(p_loc_shape, generator=g)).requires_grad_()
        p_scale = (0.5 + torch.rand(p_scale_shape, generator=g)).requires_grad_()
    inputs = (q_loc, q_scale, p_loc, p_scale)
    fused = varlin.kl.normal_kl_sum(*inputs)
    assert type(fused.grad_fn).__name__ == "_NormalKLSumBackward"  # not the autograd fallback
    plain = normal_kl(*inputs).sum()
    if p_loc.numel() == p_scale.numel() == 1:
        # A one-entry prior's KL is formed from sums (kl._kl_sum_value): equal to the rounding
        # of sums of 20 float64 terms, a relative 2 * 20 * eps at most.
        torch.testing.assert_close(fused, plain, rtol=40 * torch.finfo(float64).eps, atol=0)
    else:
        assert torch.equal(fused, plain)
    weight = torch.tensor(0.37)  # a non-unit upstream gradient
    for got, want in zip(
        torch.autograd.grad(weight * fused, inputs),
        torch.autograd.grad(weight * plain, inputs),
        strict=True,
    ):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_normal_kl_sum_with_only_the_prior_learned(float64: torch.dtype) -> None:
    """A frozen posterior (no grad) and a learned scale: only the prior gets a gradient."""
    q_loc, q_scale = torch.randn(6, 3), 0.5 + torch.rand(6, 3)
    p_scale = torch.tensor(0.8, requires_grad=True)
    (grad,) = torch.autograd.grad(
        varlin.kl.normal_kl_sum(q_loc, q_scale, torch.tensor(0.0), p_scale), [p_scale]
    )
    # d/ds sum_i KL = n / s - sum_i (q_scale_i^2 + q_loc_i^2) / s^3, in closed form.
    expected = 18 / 0.8 - (q_scale.square() + q_loc.square()).sum() / 0.8**3
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("near", [True, False], ids=["posterior-near-prior", "narrow-posterior"])
@pytest.mark.parametrize(
    "prior", [(0.0, 1.0), (0.2, 0.7), (0.0, 0.1), (0.0, 3.0)], ids=lambda p: f"N({p[0]},{p[1]}^2)"
)
def test_summed_kl_against_a_one_entry_prior_is_exact_to_rounding(
    prior: tuple[float, float], near: bool
) -> None:
    """The summed form (``kl._kl_sum_value``, float32) against the elementwise closed form in
    float64, within the rounding bound of pairwise summation: ``(2 + log2 n) eps`` times the sum
    of the terms' magnitudes, ``t = sigma / s - 1``, its square, ``log(sigma / s)`` and the
    shift (each rounded once, then ``log2 n`` levels of sums). Near the prior (sigma =
    s(1 + delta), delta ~ 1e-4, n = 2**18) those terms are ~1e-4 while a naive
    ``sum(sigma^2) / s^2 - n - 2 (sum(log sigma) - n log s)`` sums terms ~1: its rounding
    exceeds the bound, which the ratio's sums keep for every prior scale."""
    m, s = prior
    g = torch.Generator().manual_seed(0)
    shape = (512, 512)
    if near:
        scale = s * (1 + 1e-4 * torch.randn(shape, generator=g, dtype=torch.float64))
        loc = m + 1e-4 * s * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        scale = s * (0.005 + 0.02 * torch.rand(shape, generator=g, dtype=torch.float64))
        loc = m + 0.1 * s * torch.randn(shape, generator=g, dtype=torch.float64)
    loc32, scale32 = loc.float(), scale.float()
    got = normal_kl_sum(loc32, scale32, torch.tensor(m), torch.tensor(s))
    m64, s64 = torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    exact = normal_kl(loc32.double(), scale32.double(), m64, s64).sum()
    ratio = scale32.double() / s
    t = ratio - 1
    magnitude = 0.5 * float(
        (t * t + 2 * t.abs() + 2 * ratio.log().abs()).sum()
        + (((loc32.double() - m) / s) ** 2).sum()
    )
    bound = (2 + math.log2(scale.numel())) * torch.finfo(torch.float32).eps * magnitude
    assert abs(float(got) - float(exact)) <= bound
    if near:  # the bound refuses the naive sums
        naive = (scale32.square().sum() / s**2 - scale32.numel()) - 2 * (
            scale32.log().sum() - scale32.numel() * math.log(s)
        )
        naive = 0.5 * (naive + ((loc32 - m) / s).square().sum())
        assert abs(float(naive) - float(exact)) > bound
