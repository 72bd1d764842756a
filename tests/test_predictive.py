"""Tests for varlin.predict: Monte Carlo vs closed form, the uncertainty split, intervals, state.

Math tests run in float64. Statistical tests use a fixed-seed generator and a tolerance from a
stated failure rate (Bonferroni over the examples checked together), so the seed is not what
makes them pass.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

import varlin
from varlin import metrics
from varlin.likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian
from varlin.predictive import ClassificationPrediction, RegressionPrediction

F64 = torch.float64
ESTIMATORS = ["reparameterization", "local", "flipout"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z(failure_rate: float, tests: int = 1) -> float:
    return NormalDist().inv_cdf(1.0 - failure_rate / (2.0 * tests))


def _last_layer_model(estimator: str = "reparameterization", out: int = 1, seed: int = 0):
    """nn.Sequential(nn.Linear, ReLU, VariationalLinear): a Bayesian last layer."""
    torch.manual_seed(seed)
    head = varlin.VariationalLinear(6, out, estimator=estimator, generator=_gen(seed), dtype=F64)
    head.w_posterior.reset_scale(0.3)
    assert head.b_posterior is not None
    head.b_posterior.reset_scale(0.2)
    return nn.Sequential(nn.Linear(3, 6, dtype=F64), nn.ReLU(), head)


def _regression(pred: object) -> RegressionPrediction:
    assert isinstance(pred, RegressionPrediction)
    return pred


def _classification(pred: object) -> ClassificationPrediction:
    assert isinstance(pred, ClassificationPrediction)
    return pred


# ---------------------------------------------------------------------------------------------
# closed form


def test_auto_uses_closed_form_for_bayesian_last_layer_and_equals_hand_computation() -> None:
    model = _last_layer_model()
    x = torch.randn(7, 3, generator=_gen(1), dtype=F64)
    pred = _regression(varlin.predict(model, x, likelihood=Gaussian(0.25, dtype=F64)))
    assert pred.sample_means is None  # no sampling happened: the closed form
    head = model[2]
    h = torch.relu(model[0](x))
    mean = (h @ head.w_loc + head.b_loc)[:, 0]
    epistemic = ((h * h) @ head.w_scale**2 + head.b_scale**2)[:, 0]
    torch.testing.assert_close(pred.mean, mean.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(pred.epistemic, epistemic.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(pred.aleatoric, torch.full((7,), 0.0625, dtype=F64))
    torch.testing.assert_close(pred.variance, pred.epistemic + 0.0625)
    # Its log density is the Gaussian's, and it is what method="closed_form" returns too.
    y = torch.randn(7, generator=_gen(2), dtype=F64)
    expected = Normal(mean.detach(), (epistemic.detach() + 0.0625).sqrt()).log_prob(y)
    torch.testing.assert_close(pred.log_prob(y), expected)
    forced = _regression(varlin.predict(model, x, likelihood=Gaussian(0.25), method="closed_form"))
    torch.testing.assert_close(forced.mean, pred.mean, rtol=0, atol=0)
    # Inside varlin.deterministic the model is its posterior mean: no epistemic spread.
    with varlin.deterministic(model):
        det = _regression(varlin.predict(model, x))
    torch.testing.assert_close(det.mean, pred.mean, rtol=0, atol=0)
    assert bool((det.epistemic == 0).all())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_monte_carlo_matches_closed_form(estimator: str) -> None:
    """MC mean and epistemic variance with S = 20,000 samples vs the closed form.

    Per example the S outputs are i.i.d. N(m, v): the MC mean has SE sqrt(v/S), and the
    population variance has mean (S-1)/S v and SD v sqrt(2(S-1))/S. Tolerances: z for a 1e-6
    family-wise failure rate over 2 x 8 checks. Flipout layers are predicted with whole weight
    samples (see predictive._whole_weight_samples); without that their MC variance converges to
    a random value and this test fails for them.
    """
    model = _last_layer_model(estimator)
    x = torch.randn(8, 3, generator=_gen(3), dtype=F64)
    s = 20_000
    exact = _regression(varlin.predict(model, x, method="closed_form"))
    mc = _regression(varlin.predict(model, x, num_samples=s, method="mc"))
    assert mc.sample_means is not None and mc.sample_means.shape == (s, 8)
    z = _z(1e-6, 16)
    v = exact.epistemic
    assert bool(((mc.mean - exact.mean).abs() <= z * (v / s).sqrt()).all())
    sd_var = v * math.sqrt(2 * (s - 1)) / s
    assert bool(((mc.epistemic - v * (s - 1) / s).abs() <= z * sd_var).all())
    assert bool((mc.aleatoric == 0).all())


def test_mc_is_used_when_the_closed_form_does_not_apply() -> None:
    x = torch.randn(4, 3, generator=_gen(4), dtype=F64)
    first_is_variational = nn.Sequential(
        varlin.VariationalLinear(3, 6, dtype=F64), nn.ReLU(), nn.Linear(6, 1, dtype=F64)
    )
    pred = _regression(varlin.predict(first_is_variational, x, num_samples=5))
    assert pred.sample_means is not None and pred.sample_means.shape == (5, 4)
    hetero = _regression(
        varlin.predict(_last_layer_model(out=2), x, likelihood=HeteroscedasticGaussian())
    )
    assert hetero.sample_means is not None
    with pytest.raises(ValueError, match="method='closed_form' needs"):
        varlin.predict(first_is_variational, x, method="closed_form")
    with pytest.raises(ValueError, match="method='closed_form' needs"):
        varlin.predict(_last_layer_model(), x, likelihood=Bernoulli(), method="closed_form")


# ---------------------------------------------------------------------------------------------
# Monte Carlo: independent samples in one pass


def test_reparameterization_samples_are_independent_across_s() -> None:
    """Each slice along S is its own weight sample: not equal, uncorrelated, right variance.

    S = 4,000 samples of one layer's outputs; the lag-1 correlation of i.i.d. samples is within
    z / sqrt(S) of 0 and the sample variance within z * SD of its mean (failure rate 1e-6 over
    the 2 x 4 checks). Samples shared across S would give 0 variance and correlation 1.
    """
    layer = varlin.VariationalLinear(3, 1, generator=_gen(5), dtype=F64)
    layer.w_posterior.reset_scale(0.5)
    x = torch.randn(4, 3, generator=_gen(6), dtype=F64)
    s = 4000
    pred = _regression(varlin.predict(layer, x, num_samples=s, method="mc"))
    means = pred.sample_means
    assert means is not None and means.shape == (s, 4)
    assert bool((means[1:] != means[:1]).any(dim=0).all())
    centred = means - means.mean(0)
    lag1 = (centred[1:] * centred[:-1]).mean(0) / centred.pow(2).mean(0)
    z = _z(1e-6, 8)
    assert bool((lag1.abs() <= z / math.sqrt(s)).all()), lag1
    exact = _regression(varlin.predict(layer, x, method="closed_form")).epistemic
    assert bool(((pred.epistemic - exact).abs() <= z * exact * math.sqrt(2 / s) + 1e-12).all())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_predict_restores_layer_state_even_when_the_model_raises(estimator: str) -> None:
    model = nn.Sequential(
        varlin.VariationalLinear(3, 4, estimator=estimator, dtype=F64),
        nn.ReLU(),
        varlin.VariationalLinear(4, 1, estimator=estimator, dtype=F64),
    )
    x = torch.randn(5, 3, generator=_gen(7), dtype=F64)

    def boom(module: nn.Module, args: object, output: torch.Tensor) -> None:
        raise _Boom("raised inside the batched pass")

    handle = model[1].register_forward_hook(boom)
    with pytest.raises(_Boom):
        varlin.predict(model, x, num_samples=8)
    handle.remove()
    for layer in varlin.variational_layers(model):
        assert layer._num_weight_samples is None  # not left in batched mode
        assert layer.estimator == estimator  # flipout is not left as reparameterization
        assert layer._use_mean is False
    assert model(x).shape == (5, 1)  # a plain forward works: one sample, no S dimension
    varlin.predict(model, x, num_samples=3)
    assert all(layer._num_weight_samples is None for layer in varlin.variational_layers(model))


# ---------------------------------------------------------------------------------------------
# regression summaries


def test_mixture_log_prob_equals_direct_computation() -> None:
    model = nn.Sequential(varlin.VariationalLinear(2, 4, dtype=F64), nn.Tanh())
    model.append(varlin.VariationalLinear(4, 1, dtype=F64))
    for layer in varlin.variational_layers(model):
        layer.w_posterior.reset_scale(0.4)
    x = torch.randn(6, 2, generator=_gen(8), dtype=F64)
    y = torch.randn(6, generator=_gen(9), dtype=F64)
    pred = _regression(varlin.predict(model, x, num_samples=32, likelihood=Gaussian(0.3)))
    assert pred.sample_means is not None and pred.sample_vars is not None
    direct = torch.empty(6, dtype=F64)
    for n in range(6):
        dens = [
            math.exp(Normal(float(pred.sample_means[s, n]), 0.3).log_prob(y[n]).item())
            for s in range(32)
        ]
        direct[n] = math.log(sum(dens) / 32)
    torch.testing.assert_close(pred.log_prob(y), direct, rtol=1e-6, atol=1e-8)
    ref = metrics.mixture_nll(pred.sample_means, pred.sample_vars, y)
    torch.testing.assert_close(pred.nll(y), ref)
    torch.testing.assert_close(pred.mean, pred.sample_means.mean(0))
    torch.testing.assert_close(pred.variance, pred.sample_means.var(0, unbiased=False) + 0.09)


def test_heteroscedastic_split_against_deterministic_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(varlin.VariationalLinear(2, 8, dtype=F64), nn.ReLU())
    model.append(varlin.VariationalLinear(8, 2, dtype=F64))
    lik = HeteroscedasticGaussian()
    x = torch.randn(5, 2, generator=_gen(10), dtype=F64)
    with varlin.deterministic(model):
        out = model(x)
        pred = _regression(varlin.predict(model, x, num_samples=4, likelihood=lik))
    torch.testing.assert_close(pred.mean, out[:, 0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(pred.epistemic, torch.zeros(5, dtype=F64), rtol=0, atol=0)
    expected = (F.softplus(out[:, 1]) + lik.min_scale).detach() ** 2
    torch.testing.assert_close(pred.aleatoric, expected)
    for layer in varlin.variational_layers(model):
        layer.w_posterior.reset_scale(0.5)
    sampled = _regression(varlin.predict(model, x, num_samples=64, likelihood=lik))
    assert sampled.sample_vars is not None and sampled.sample_means is not None
    assert bool((sampled.epistemic > 0).all())
    torch.testing.assert_close(sampled.aleatoric, sampled.sample_vars.mean(0))
    torch.testing.assert_close(sampled.variance, sampled.epistemic + sampled.aleatoric)
    # the per-sample noise varies with the sample: heteroscedastic per posterior draw
    assert bool((sampled.sample_vars.std(0) > 0).all())


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_interval_has_the_requested_mass_and_coverage(level: float) -> None:
    """Exact mass under the Gaussian predictive, and empirical coverage of 20,000 draws.

    The covered count is Binomial(20000, level); the tolerance is z * sqrt(level (1-level) / n)
    for a 1e-6 failure rate.
    """
    mean = torch.linspace(-2, 2, 20_000, dtype=F64)
    epistemic = torch.linspace(0.1, 1.0, 20_000, dtype=F64)
    pred = RegressionPrediction(mean, epistemic, torch.full_like(mean, 0.2))
    lower, upper = pred.interval(level)
    dist = Normal(mean, pred.std)
    torch.testing.assert_close(dist.cdf(upper) - dist.cdf(lower), torch.full_like(mean, level))
    torch.testing.assert_close(dist.cdf(lower), torch.full_like(mean, (1 - level) / 2))
    y = mean + pred.std * torch.randn(20_000, generator=_gen(11), dtype=F64)
    coverage = float(metrics.interval_coverage(lower, upper, y))
    tolerance = _z(1e-6) * math.sqrt(level * (1 - level) / 20_000)
    assert abs(coverage - level) <= tolerance
    narrower = pred.interval(level / 2)
    assert bool((narrower[0] > lower).all() and (narrower[1] < upper).all())


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, -0.1])
def test_interval_rejects_levels_outside_0_1(level: float) -> None:
    pred = RegressionPrediction(torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"level must be in the open interval \(0, 1\)"):
        pred.interval(level)


def test_log_prob_needs_noise_and_matching_target() -> None:
    layer = varlin.VariationalLinear(2, 1, dtype=F64)
    x = torch.randn(3, 2, generator=_gen(12), dtype=F64)
    no_noise = _regression(varlin.predict(layer, x, num_samples=4, method="mc"))
    with pytest.raises(ValueError, match="aleatoric variance > 0"):
        no_noise.log_prob(torch.zeros(3, dtype=F64))
    with varlin.deterministic(layer):
        exact = _regression(varlin.predict(layer, x))
    with pytest.raises(ValueError, match="predictive variance > 0"):
        exact.log_prob(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"target must have the prediction's shape \(3,\)"):
        no_noise.log_prob(torch.zeros(4, dtype=F64))


# ---------------------------------------------------------------------------------------------
# classification summaries


def _classifier(out: int, scale: float, seed: int) -> nn.Module:
    g = _gen(seed)
    model = nn.Sequential(
        varlin.VariationalLinear(2, 8, generator=g, dtype=F64),
        nn.ReLU(),
        varlin.VariationalLinear(8, out, generator=g, dtype=F64),
    )
    with torch.no_grad():
        for layer in varlin.variational_layers(model):
            layer.w_posterior.loc.mul_(4.0)  # confident logits
            layer.w_posterior.reset_scale(scale)
            assert layer.b_posterior is not None
            layer.b_posterior.reset_scale(scale)
    return model


@pytest.mark.parametrize(("likelihood", "out"), [(Categorical(), 3), (Bernoulli(), 1)])
def test_classification_summary(likelihood, out: int) -> None:
    x = torch.randn(50, 2, generator=_gen(13), dtype=F64) * 2
    pred = _classification(
        varlin.predict(_classifier(out, 1.0, seed=14), x, num_samples=64, likelihood=likelihood)
    )
    classes = max(out, 2)
    assert pred.probs.shape == (50, classes) and pred.prob_samples.shape == (64, 50, classes)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(50, dtype=F64))
    torch.testing.assert_close(pred.probs, pred.prob_samples.mean(0))
    entropy = -torch.special.xlogy(pred.probs, pred.probs).sum(-1)
    torch.testing.assert_close(pred.entropy, entropy)
    expected_entropy = -torch.special.xlogy(pred.prob_samples, pred.prob_samples).sum(-1).mean(0)
    torch.testing.assert_close(pred.aleatoric, expected_entropy)
    torch.testing.assert_close(pred.mutual_information, (entropy - expected_entropy).clamp_min(0))
    assert bool((pred.mutual_information >= 0).all())
    assert float(pred.mutual_information.mean()) > 0.05  # a wide posterior disagrees with itself
    torch.testing.assert_close(
        pred.mutual_information,
        metrics.mutual_information(pred.prob_samples, reduction="none"),
    )
    y = pred.classes
    torch.testing.assert_close(pred.log_prob(y), pred.probs.max(-1).values.log())


@pytest.mark.parametrize(("likelihood", "out"), [(Categorical(), 3), (Bernoulli(), 1)])
def test_mutual_information_vanishes_for_a_near_deterministic_model(likelihood, out: int) -> None:
    x = torch.randn(50, 2, generator=_gen(15), dtype=F64) * 2
    model = _classifier(out, 1e-7, seed=16)
    pred = _classification(varlin.predict(model, x, num_samples=32, likelihood=likelihood))
    assert float(pred.mutual_information.max()) < 1e-9
    with varlin.deterministic(model):
        logits = model(x)
    probs = likelihood.probs(logits).detach()
    torch.testing.assert_close(pred.probs, probs, rtol=1e-5, atol=1e-6)


def test_bernoulli_single_example_and_squeezed_output() -> None:
    """One example, and a model whose output is already (N,): no dimension is squeezed away."""
    model = nn.Sequential(varlin.VariationalLinear(2, 1, dtype=F64), nn.Flatten(-2, -1))
    x = torch.randn(1, 2, generator=_gen(17), dtype=F64)
    pred = _classification(varlin.predict(model, x, num_samples=8, likelihood=Bernoulli()))
    assert pred.probs.shape == (1, 2)
    reg = _regression(varlin.predict(model, x, num_samples=8))
    assert reg.mean.shape == (1,)


# ---------------------------------------------------------------------------------------------
# arguments


def test_predict_argument_errors() -> None:
    model = _last_layer_model()
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        varlin.predict(model, x, num_samples=0)
    with pytest.raises(ValueError, match="method must be one of"):
        varlin.predict(model, x, method="exact")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="likelihood must be a varlin Likelihood"):
        varlin.predict(model, x, likelihood=nn.MSELoss())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        varlin.predict(model, torch.zeros(2, 3, dtype=torch.long))


def test_batch_size_chunks_match_one_pass() -> None:
    model = nn.Sequential(varlin.VariationalLinear(3, 4, dtype=F64), nn.ReLU())
    model.append(varlin.VariationalLinear(4, 1, dtype=F64))
    x = torch.randn(10, 3, generator=_gen(18), dtype=F64)
    chunked = _regression(varlin.predict(model, x, num_samples=16, batch_size=3))
    assert chunked.sample_means is not None and chunked.sample_means.shape == (16, 10)
    with varlin.deterministic(model):  # no noise: chunks must reassemble the one-pass result
        whole = _regression(varlin.predict(model, x, num_samples=2))
        parts = _regression(varlin.predict(model, x, num_samples=2, batch_size=3))
        direct = model(x)[:, 0].detach()
    torch.testing.assert_close(parts.mean, whole.mean, rtol=0, atol=0)
    torch.testing.assert_close(whole.mean, direct, rtol=1e-15, atol=1e-15)
