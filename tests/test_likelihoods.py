"""Tests for varlin.likelihoods: the distributions they return, closed forms, shapes and errors.

Math tests run in float64. The one statistical test (closed-form expected log-likelihood against
Monte Carlo) draws from a fixed-seed generator and takes its tolerance from a stated failure
rate, so the seed is not what makes it pass.
"""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Normal

import varlin
from varlin.likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z(failure_rate: float, tests: int = 1) -> float:
    """Two-sided Normal quantile for ``tests`` simultaneous checks (Bonferroni)."""
    return NormalDist().inv_cdf(1.0 - failure_rate / (2.0 * tests))


# ---------------------------------------------------------------------------------------------
# outputs -> torch distributions


@pytest.mark.parametrize("learn_noise", [False, True])
def test_gaussian_returns_normal_with_noise_scale(learn_noise: bool) -> None:
    lik = Gaussian(0.3, learn_noise=learn_noise, dtype=F64)
    out = torch.randn(5, 1, generator=_gen(0), dtype=F64)
    dist = lik(out)
    assert isinstance(dist, Normal)
    assert dist.batch_shape == (5,)  # the trailing size-1 output dim is one scalar per example
    torch.testing.assert_close(dist.loc, out.squeeze(-1), rtol=0, atol=0)
    torch.testing.assert_close(dist.scale, torch.full((5,), 0.3, dtype=F64), rtol=1e-15, atol=0)
    y = torch.randn(5, generator=_gen(1), dtype=F64)
    assert dist.log_prob(y).shape == (5,)


def test_gaussian_multi_output_keeps_shape() -> None:
    lik = Gaussian(0.5, dtype=F64)
    out = torch.randn(4, 3, generator=_gen(0), dtype=F64)
    assert lik(out).batch_shape == (4, 3)
    y = torch.randn(4, 3, generator=_gen(1), dtype=F64)
    expected = Normal(out, 0.5).log_prob(y).sum(-1)
    torch.testing.assert_close(lik.expected_log_prob(out, y), expected)
    # (N, 1) outputs with (N, 1) targets: D = 1 outputs, not squeezed against the target.
    out1, y1 = out[:, :1], y[:, :1]
    torch.testing.assert_close(
        lik.expected_log_prob(out1, y1), Normal(out1, 0.5).log_prob(y1)[:, 0]
    )


def test_heteroscedastic_split_and_distribution() -> None:
    lik = HeteroscedasticGaussian(min_scale=1e-3)
    out = torch.randn(6, 2, generator=_gen(0), dtype=F64) * 3
    mean, scale = lik.split(out)
    torch.testing.assert_close(mean, out[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(scale, F.softplus(out[:, 1]) + 1e-3, rtol=0, atol=0)
    assert bool((scale > 0).all())
    dist = lik(out)
    assert isinstance(dist, Normal) and dist.batch_shape == (6,)
    y = torch.randn(6, generator=_gen(1), dtype=F64)
    expected = Normal(out[:, 0], F.softplus(out[:, 1]) + 1e-3).log_prob(y)
    torch.testing.assert_close(lik.expected_log_prob(out, y), expected, rtol=1e-14, atol=0)
    # A floor of 0 is allowed, a negative one is not.
    assert HeteroscedasticGaussian(min_scale=0.0).min_scale == 0.0
    with pytest.raises(ValueError, match="min_scale"):
        HeteroscedasticGaussian(min_scale=-1.0)


@pytest.mark.parametrize("width", [1, 3])
def test_heteroscedastic_rejects_output_width(width: int) -> None:
    lik = HeteroscedasticGaussian()
    with pytest.raises(ValueError, match=r"output must have shape \(N, 2\).*\(4, " + str(width)):
        lik(torch.zeros(4, width))


@pytest.mark.parametrize("shape", [(7,), (7, 1), (1,), (1, 1)])
def test_bernoulli_matches_torch(shape: tuple[int, ...]) -> None:
    lik = Bernoulli()
    logits = torch.randn(shape, generator=_gen(0), dtype=F64) * 2
    n = shape[0]
    y = torch.randint(0, 2, (n,), generator=_gen(1))
    dist = lik(logits)
    assert isinstance(dist, TorchBernoulli) and dist.batch_shape == (n,)
    ref = TorchBernoulli(logits=logits.reshape(n)).log_prob(y.to(F64))
    torch.testing.assert_close(lik.expected_log_prob(logits, y), ref, rtol=1e-15, atol=0)
    probs = lik.probs(logits)
    assert probs.shape == (n, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(n, dtype=F64))
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(logits.reshape(n)))


def test_categorical_matches_torch() -> None:
    lik = Categorical()
    logits = torch.randn(9, 4, generator=_gen(0), dtype=F64) * 2
    y = torch.randint(0, 4, (9,), generator=_gen(1))
    dist = lik(logits)
    assert isinstance(dist, TorchCategorical) and dist.batch_shape == (9,)
    ref = TorchCategorical(logits=logits).log_prob(y)
    torch.testing.assert_close(lik.expected_log_prob(logits, y), ref, rtol=1e-15, atol=0)
    # second route: log-softmax picked at the target
    torch.testing.assert_close(ref, F.log_softmax(logits, -1)[torch.arange(9), y])
    torch.testing.assert_close(lik.probs(logits).sum(-1), torch.ones(9, dtype=F64))


# ---------------------------------------------------------------------------------------------
# closed-form expected log-likelihood


def _gaussian_ell_formula(m: torch.Tensor, v: torch.Tensor, y: torch.Tensor, s2: float):
    return -0.5 * math.log(2 * math.pi * s2) - ((y - m) ** 2 + v) / (2 * s2)


def test_gaussian_closed_form_matches_formula_and_monte_carlo() -> None:
    """E_{f~N(m,v)} log N(y; f, s^2): closed form vs the formula vs S = 200,000 samples.

    Each of the N = 6 Monte Carlo means has standard error sd/sqrt(S) (sd estimated from the same
    samples); the tolerance is z * SE with z for a 1e-6 family-wise failure rate (Bonferroni
    over the 6 examples), so a correct implementation fails on a fresh seed once in 10^6 runs.
    """
    g = _gen(0)
    n, s = 6, 200_000
    noise = 0.4
    m = torch.randn(n, 1, generator=g, dtype=F64)
    v = torch.rand(n, 1, generator=g, dtype=F64) + 0.05
    y = torch.randn(n, generator=g, dtype=F64) * 1.5
    lik = Gaussian(noise, dtype=F64)

    closed = lik.expected_log_prob(Normal(m, v.sqrt()), y)
    assert closed.shape == (n,)
    formula = _gaussian_ell_formula(m[:, 0], v[:, 0], y, noise**2)
    torch.testing.assert_close(closed, formula, rtol=1e-14, atol=1e-14)

    f = m + v.sqrt() * torch.randn(s, n, 1, generator=g, dtype=F64)  # (S, N, 1)
    mc = lik.expected_log_prob(f, y, samples=True)
    per_sample = Normal(f[..., 0], noise).log_prob(y)  # (S, N), a second route to the average
    torch.testing.assert_close(mc, per_sample.mean(0), rtol=1e-12, atol=1e-12)
    se = per_sample.std(0) / math.sqrt(s)
    assert bool(((mc - closed).abs() <= _z(1e-6, n) * se).all()), (mc - closed) / se
    # The variance penalty is what the closed form adds: without it the check fails by far.
    plug_in = Normal(m[:, 0], noise).log_prob(y)
    assert bool(((mc - plug_in).abs() > 10 * se).all())


def test_gaussian_closed_form_gradient_reaches_moments_and_noise() -> None:
    lik = Gaussian(0.7, learn_noise=True, dtype=F64)
    m = torch.randn(5, generator=_gen(0), dtype=F64, requires_grad=True)
    sd = (torch.rand(5, generator=_gen(1), dtype=F64) + 0.1).requires_grad_()
    y = torch.randn(5, generator=_gen(2), dtype=F64)
    lik.expected_log_prob(Normal(m, sd), y).sum().backward()
    s2 = 0.7**2
    assert m.grad is not None and sd.grad is not None
    torch.testing.assert_close(m.grad, (y - m.detach()) / s2)
    torch.testing.assert_close(sd.grad, -sd.detach() / s2)
    assert lik.raw_noise_scale.grad is not None and lik.raw_noise_scale.grad != 0


def _heteroscedastic_output(n: int, correlated: bool) -> torch.distributions.Distribution:
    g = _gen(4)
    loc = torch.randn(n, 2, generator=g, dtype=F64)
    loc[:, 1] = loc[:, 1] * 0.8 - 0.5  # raw scales around softplus(-0.5) = 0.47
    sd = 0.2 + 0.6 * torch.rand(n, 2, generator=g, dtype=F64)
    if not correlated:
        return Normal(loc, sd)
    rho = 0.9 * (2 * torch.rand(n, generator=g, dtype=F64) - 1)
    cov = torch.stack(
        [
            torch.stack([sd[:, 0] ** 2, rho * sd[:, 0] * sd[:, 1]], -1),
            torch.stack([rho * sd[:, 0] * sd[:, 1], sd[:, 1] ** 2], -1),
        ],
        -2,
    )
    return torch.distributions.MultivariateNormal(loc, cov)


@pytest.mark.parametrize("correlated", [False, True])
def test_heteroscedastic_gaussian_output_matches_monte_carlo(correlated: bool) -> None:
    """E log N(y; mu, softplus(rho)^2) for (mu, rho) Gaussian (independent, or correlated by a
    MultivariateNormal): exact over mu given rho, Gauss-Hermite over rho, against 400,000 draws
    of (mu, rho); tolerance z * SE for a 1e-6 family-wise failure rate over the 6 examples."""
    n, s = 6, 400_000
    lik = HeteroscedasticGaussian()
    out = _heteroscedastic_output(n, correlated)
    y = torch.randn(n, generator=_gen(5), dtype=F64)
    got = lik.expected_log_prob(out, y)
    assert got.shape == (n,)
    draws = out.sample((s,))  # (S, N, 2), seeded by conftest
    per_sample = lik(draws).log_prob(y)
    se = per_sample.std(0) / math.sqrt(s)
    assert bool(((per_sample.mean(0) - got).abs() <= _z(1e-6, n) * se).all())
    # The spread of the raw scale matters: the plug-in at the mean scale is far off.
    scale = lik.split(out.mean)[1]
    plug = Normal(out.mean[:, 0], scale).log_prob(y) - out.variance[:, 0] / (2 * scale**2)
    assert bool(((plug - got).abs() > 10 * se).any())


def test_heteroscedastic_gaussian_output_without_scale_spread_is_closed_form() -> None:
    """A raw scale without variance: E log N(y; mu, s^2) = log N(y; m, s^2) - v / (2 s^2)."""
    lik = HeteroscedasticGaussian()
    loc = torch.randn(5, 2, generator=_gen(6), dtype=F64)
    sd = torch.stack(
        [torch.rand(5, generator=_gen(7), dtype=F64) + 0.1, torch.zeros(5, dtype=F64)], -1
    )
    y = torch.randn(5, generator=_gen(8), dtype=F64)
    got = lik.expected_log_prob(Normal(loc, sd.clamp_min(1e-300)), y)
    mean, scale = lik.split(loc)
    want = Normal(mean, scale).log_prob(y) - sd[:, 0] ** 2 / (2 * scale**2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "lik", [Bernoulli(logit_samples=50_000), Categorical(logit_samples=50_000)]
)
def test_classification_gaussian_output_samples_the_logits(
    lik: varlin.likelihoods.Likelihood,
) -> None:
    """The stated approximation for classification: Monte Carlo over the logits only, an unbiased
    estimate of E log p(y | f) under the Gaussian; against 32-node Gauss-Hermite (Bernoulli) or
    a fresh 10^6-draw average (Categorical), within z * SE (failure rate 1e-6 over N = 4)."""
    g = _gen(9)
    c = 1 if isinstance(lik, Bernoulli) else 3
    loc = torch.randn(4, c, generator=g, dtype=F64)
    sd = 0.3 + torch.rand(4, c, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 1, 0]) if c == 1 else torch.tensor([0, 2, 1, 2])
    out = Normal(loc, sd)
    got = lik.expected_log_prob(out, y)
    logits = out.sample((10**6,))  # (S, N, C)
    if c == 1:
        sign = (2 * y - 1).to(F64)
        per_sample = F.logsigmoid(sign * logits[..., 0])
        nodes, weights = np.polynomial.hermite_e.hermegauss(32)
        f = loc[:, 0, None] + sd[:, 0, None] * torch.as_tensor(nodes)
        w = torch.as_tensor(weights / weights.sum())
        reference = (F.logsigmoid(sign[:, None] * f) * w).sum(-1)
    else:
        log_p = torch.log_softmax(logits, -1)
        per_sample = log_p.gather(-1, y.expand(log_p.shape[0], -1).unsqueeze(-1))[..., 0]
        reference = per_sample.mean(0)
    # the estimate averages logit_samples draws: its SE, plus the 10^6-draw reference's
    se = per_sample.std(0) * math.sqrt(1 / lik.logit_samples + 1 / 10**6)
    assert bool(((got - reference).abs() <= _z(1e-6, 4) * se).all())


def test_samples_average_single_sample_values() -> None:
    lik = Categorical()
    logits = torch.randn(5, 3, 4, generator=_gen(0), dtype=F64)  # S=5, N=3, C=4
    y = torch.tensor([0, 3, 1])
    stacked = lik.expected_log_prob(logits, y, samples=True)
    one_by_one = torch.stack([lik.expected_log_prob(logits[s], y) for s in range(5)]).mean(0)
    torch.testing.assert_close(stacked, one_by_one, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="samples=True"):
        lik.expected_log_prob(logits[0, 0], y, samples=True)


def test_distribution_outputs_only_gaussian() -> None:
    """Every likelihood integrates over a Gaussian output (moment propagation, issue 12: this
    test pinned TypeError for the non-Gaussian likelihoods before); any other distribution is
    refused, and so is samples=True with a distribution."""
    laplace = torch.distributions.Laplace(torch.zeros(3, 2), torch.ones(3, 2))
    normal = Normal(torch.zeros(3, 2), torch.ones(3, 2))
    for lik in (Gaussian(), Bernoulli(), Categorical(), HeteroscedasticGaussian()):
        with pytest.raises(TypeError, match="no closed-form"):
            lik.expected_log_prob(laplace, torch.zeros(3))
        with pytest.raises(ValueError, match="samples=True"):
            lik.expected_log_prob(normal, torch.zeros(3), samples=True)


# ---------------------------------------------------------------------------------------------
# noise parameters


def test_learned_noise_is_parameter_fixed_noise_is_buffer() -> None:
    learned = Gaussian(0.2, learn_noise=True)
    fixed = Gaussian(0.2)
    assert [name for name, _ in learned.named_parameters()] == ["raw_noise_scale"]
    assert isinstance(learned.raw_noise_scale, nn.Parameter)
    assert list(fixed.parameters()) == []
    assert [name for name, _ in fixed.named_buffers()] == ["raw_noise_scale"]
    for lik in (learned, fixed):
        assert "raw_noise_scale" in lik.state_dict()
        assert float(lik.noise_scale.detach()) == pytest.approx(0.2, rel=1e-6)
    # The learned noise trains: one Adam step on a loss that wants more noise raises it.
    opt = torch.optim.Adam(learned.parameters(), lr=0.1)
    loss = -learned.expected_log_prob(torch.zeros(4), torch.full((4,), 3.0)).mean()
    loss.backward()
    opt.step()
    assert float(learned.noise_scale.detach()) > 0.2


@pytest.mark.parametrize(
    ("kwargs", "learned", "sigma"),
    [
        ({}, True, 1.0),  # no noise given: learned, from 1
        ({"noise_scale": 0.3}, False, 0.3),  # a value given is fixed
        ({"noise_scale": 0.3, "learn_noise": True}, True, 0.3),
        ({"learn_noise": False}, False, 1.0),  # the old default, asked for explicitly
        ({"learn_noise": True}, True, 1.0),
    ],
)
def test_gaussian_learns_noise_unless_a_value_is_given(
    kwargs: dict[str, object], learned: bool, sigma: float
) -> None:
    lik = Gaussian(**kwargs)  # type: ignore[arg-type]
    assert lik.learn_noise is learned
    assert isinstance(lik.raw_noise_scale, nn.Parameter) is learned
    assert [n for n, _ in lik.named_parameters()] == (["raw_noise_scale"] if learned else [])
    assert float(lik.noise_scale.detach()) == pytest.approx(sigma, rel=1e-6)


def test_gaussian_learn_noise_must_be_bool() -> None:
    with pytest.raises(TypeError, match=r"learn_noise must be True or False, got 'yes'"):
        Gaussian(learn_noise="yes")  # type: ignore[arg-type]


@pytest.mark.usefixtures("single_thread")  # 600 tiny steps: threads only add overhead
def test_default_gaussian_reaches_the_noise_optimum_of_the_elbo() -> None:
    r"""``Gaussian()`` learns :math:`\sigma`: at the ELBO's optimum over :math:`\sigma`,

    :math:`\sigma^2 = \frac1N\sum_n \mathbb E_q[(y_n - f_n)^2] = \frac1N\sum_n (y_n - m_n)^2
    + v_n` (set the derivative of :math:`-N\log\sigma - \sum_n\mathbb E_q(y_n-f_n)^2/2\sigma^2`
    to 0), with :math:`(m_n, v_n)` the layer's exact output moments. Trained on the closed-form
    expected log-likelihood (no Monte Carlo noise), so the stationarity holds to optimiser
    precision, not to a sampling tolerance.
    """
    gen = _gen(0)
    n, true_sigma = 400, 0.3
    x = torch.randn(n, 1, generator=gen, dtype=F64)
    y = 2.0 * x[:, 0] - 0.5 + true_sigma * torch.randn(n, generator=gen, dtype=F64)
    layer = varlin.VariationalLinear(1, 1, dtype=F64, generator=_gen(1))
    lik = Gaussian(dtype=F64)
    elbo = varlin.ELBO(lik, num_data=n)
    opt = torch.optim.Adam([*layer.parameters(), *lik.parameters()], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        elbo(layer.output_moments(x), y, layer.kl_divergence()).backward()
        opt.step()
    with torch.no_grad():
        moments = layer.output_moments(x)
        m, v = moments.loc[:, 0], moments.variance[:, 0]
        optimum = ((y - m) ** 2 + v).mean()
        sigma2 = lik.noise_scale**2
    assert float(sigma2) == pytest.approx(float(optimum), rel=1e-4)
    # And it is the data's noise: the residual variance of n Gaussian draws has sd
    # sigma^2 sqrt(2/n); 6 sd bound a failure rate below 1e-8 (the fit adds O(1/n)).
    assert abs(float(sigma2) - true_sigma**2) < 6 * true_sigma**2 * math.sqrt(2 / n)


def test_noise_dtype_and_precision() -> None:
    lik = Gaussian(0.5, dtype=F64)
    assert lik.raw_noise_scale.dtype == F64
    assert abs(float(lik.noise_scale) - 0.5) < 1e-15
    assert Gaussian(0.5).raw_noise_scale.dtype == torch.get_default_dtype()
    moved = Gaussian(0.5).double()
    assert moved.noise_scale.dtype == F64
    assert "noise_scale=0.5" in repr(Gaussian(0.5, learn_noise=True))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_gaussian_rejects_bad_noise(bad: float) -> None:
    with pytest.raises(ValueError, match="noise_scale"):
        Gaussian(bad)


# ---------------------------------------------------------------------------------------------
# target checks


@pytest.mark.parametrize(
    ("lik", "output", "target", "expected"),
    [
        (Gaussian(), torch.zeros(5, 1), torch.zeros(4), r"\(5,\)"),
        (Gaussian(), torch.zeros(5, 3), torch.zeros(5), r"\(5, 3\)"),
        (HeteroscedasticGaussian(), torch.zeros(5, 2), torch.zeros(5, 1), r"\(5,\)"),
        (Bernoulli(), torch.zeros(5, 1), torch.zeros(5, 1), r"\(5,\)"),
        (Categorical(), torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.long), r"\(5,\)"),
    ],
)
def test_target_shape_mismatch_names_target_and_shapes(lik, output, target, expected) -> None:
    with pytest.raises(ValueError, match="target") as info:
        lik.expected_log_prob(output, target)
    message = str(info.value)
    assert "target" in message
    assert str(tuple(output.shape)) in message and str(tuple(target.shape)) in message
    assert re.search(expected, message), message


def test_categorical_float_target_is_type_error() -> None:
    with pytest.raises(TypeError, match="integer class indices"):
        Categorical().expected_log_prob(torch.zeros(3, 2), torch.zeros(3))


def test_gaussian_integer_target_is_type_error() -> None:
    with pytest.raises(TypeError, match="target must have a floating-point dtype"):
        Gaussian().expected_log_prob(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_value_checks_under_validation() -> None:
    with varlin.validation():
        with pytest.raises(ValueError, match="only 0 and 1"):
            Bernoulli().expected_log_prob(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]))
        with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
            Categorical().expected_log_prob(torch.zeros(3, 2), torch.tensor([0, 2, 1]))
        with pytest.raises(ValueError, match="target must be finite"):
            Gaussian().expected_log_prob(torch.zeros(2), torch.tensor([0.0, math.nan]))
    # Outside the validation block no value is read (no device sync): a 0.5 target passes.
    Bernoulli().expected_log_prob(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]))


# ---------------------------------------------------------------------------------------------
# the logits' draws from a Gaussian output: an explicit generator, never torch's global state


def _gaussian_outputs(c: int) -> dict[str, torch.distributions.Distribution]:
    """A Normal, a MultivariateNormal and a LowRankMultivariateNormal over ``(4, c)`` logits."""
    g = _gen(31)
    loc = torch.randn(4, c, generator=g, dtype=F64)
    sd = 0.3 + torch.rand(4, c, generator=g, dtype=F64)
    factor = 0.5 * torch.randn(4, c, 2, generator=g, dtype=F64)
    tril = torch.diag_embed(sd) + torch.tril(0.4 * torch.randn(4, c, c, generator=g, dtype=F64), -1)
    return {
        "normal": Normal(loc, sd),
        "mvn": torch.distributions.MultivariateNormal(loc, scale_tril=tril),
        "lowrank": torch.distributions.LowRankMultivariateNormal(loc, factor, sd.square()),
    }


@pytest.mark.parametrize("kind", ["normal", "mvn", "lowrank"])
@pytest.mark.parametrize("lik", [Bernoulli(logit_samples=16), Categorical(logit_samples=16)])
def test_gaussian_output_draws_come_from_the_given_generator(
    lik: varlin.likelihoods.Likelihood, kind: str
) -> None:
    """The same generator state gives bit-identical estimates whatever torch's global random
    state, and the global state is not consumed (the logits used to be drawn from it)."""
    c = 1 if isinstance(lik, Bernoulli) else 3
    out = _gaussian_outputs(c)[kind]
    y = torch.tensor([0, 1, 1, 0]) if c == 1 else torch.tensor([0, 2, 1, 2])
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        runs.append(lik.expected_log_prob(out, y, generator=_gen(5)))
        assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(runs[0], runs[1])
    # the generator is the source: another seed gives other draws
    assert not torch.equal(runs[0], lik.expected_log_prob(out, y, generator=_gen(6)))
    # the ELBO passes its generator on
    elbo = varlin.ELBO(lik, num_data=4)
    loss = elbo(out, y, torch.zeros((), dtype=F64), generator=_gen(5))
    torch.testing.assert_close(loss, -runs[0].mean(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["normal", "mvn", "lowrank"])
def test_sampled_logits_follow_the_gaussian_output(kind: str) -> None:
    """The draws written out for a generator have the output's law: mean and covariance of
    200,000 draws within z * SE (failure rate 1e-6 over the 4 x (3 + 9) checks), and the draws
    are reparameterized (d mean / d loc = 1 for every entry, exactly)."""
    out = _gaussian_outputs(3)[kind]
    s = 200_000
    draws = Categorical().sample_logits(out, s, generator=_gen(7))
    assert draws.shape == (s, 4, 3)
    cov = out.covariance_matrix if kind != "normal" else torch.diag_embed(out.variance)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    z = _z(1e-6, 4 * 12)
    assert bool(((draws.mean(0) - out.mean).abs() <= z * (var / s).sqrt()).all())
    centred = draws - draws.mean(0)
    sample_cov = torch.einsum("sni,snj->nij", centred, centred) / (s - 1)
    # SE of a Gaussian sample covariance: sqrt((S_ii S_jj + S_ij^2) / s)
    cov_se = ((var.unsqueeze(-1) * var.unsqueeze(-2) + cov.square()) / s).sqrt()
    assert bool(((sample_cov - cov).abs() <= z * cov_se).all())
    loc = out.mean.detach().clone().requires_grad_(True)
    if kind == "normal":
        moved = Normal(loc, out.stddev)
    elif kind == "mvn":
        moved = torch.distributions.MultivariateNormal(loc, scale_tril=out.scale_tril)
    else:
        moved = torch.distributions.LowRankMultivariateNormal(loc, out.cov_factor, out.cov_diag)
    Categorical().sample_logits(moved, 5, generator=_gen(8)).mean(0).sum().backward()
    assert loc.grad is not None
    torch.testing.assert_close(loc.grad, torch.ones_like(loc), rtol=0, atol=1e-15)


def test_bad_generator_and_sample_count_are_one_line_errors() -> None:
    out = Normal(torch.zeros(4, 1), torch.ones(4, 1))
    y = torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got 3$"):
        Bernoulli().expected_log_prob(out, y, generator=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None"):
        Bernoulli().sample_logits(out, 2, generator="seed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples"):
        Bernoulli().sample_logits(out, 0)
    with pytest.raises(TypeError, match="output must be a Normal, MultivariateNormal or"):
        Bernoulli().sample_logits(torch.zeros(4, 1), 2)  # type: ignore[arg-type]
