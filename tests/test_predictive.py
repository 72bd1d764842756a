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


# ---------------------------------------------------------------------------------------------
# a 1-D x is one example, for every method


def _reseeded(layer_or_model: nn.Module, seed: int) -> nn.Module:
    for layer in varlin.variational_layers(layer_or_model):
        assert layer.generator is not None
        layer.generator.manual_seed(seed)
    return layer_or_model


@pytest.mark.parametrize("method", ["closed_form", "mc", "moments"])
def test_one_dimensional_x_is_one_unbatched_example(method: str) -> None:
    """As ``nn.Linear``: ``(in_features,)`` in, no example dimension out; ``batch_size`` alike."""
    layer = varlin.VariationalLinear(3, 1, generator=_gen(30), dtype=F64)
    x = torch.randn(3, generator=_gen(31), dtype=F64)
    lik = Gaussian(0.5)
    batched = _regression(varlin.predict(_reseeded(layer, 1), x[None], likelihood=lik,
                                         method=method, num_samples=16))  # fmt: skip
    for batch_size in (None, 2):
        single = _regression(varlin.predict(_reseeded(layer, 1), x, likelihood=lik,
                                            method=method, num_samples=16,
                                            batch_size=batch_size))  # fmt: skip
        assert single.mean.shape == single.epistemic.shape == single.aleatoric.shape == ()
        assert torch.equal(single.mean, batched.mean[0])
        assert torch.equal(single.variance, batched.variance[0])
        if method == "mc":
            assert single.sample_means is not None and single.sample_means.shape == (16,)
        lower, upper = single.interval(0.9)
        assert lower.shape == upper.shape == () and lower < single.mean < upper
        target = torch.tensor(0.3, dtype=F64)
        torch.testing.assert_close(single.log_prob(target), batched.log_prob(target[None])[0])


def test_one_dimensional_x_classification_and_multi_output_are_unbatched() -> None:
    model = nn.Sequential(varlin.VariationalLinear(3, 4, generator=_gen(32), dtype=F64),
                          nn.Tanh(), varlin.VariationalLinear(4, 3, generator=_gen(33),
                                                              dtype=F64))  # fmt: skip
    x = torch.randn(3, generator=_gen(34), dtype=F64)
    pred = _classification(varlin.predict(model, x, num_samples=8, likelihood=Categorical()))
    assert pred.probs.shape == (3,) and pred.prob_samples.shape == (8, 3)
    assert pred.entropy.shape == pred.mutual_information.shape == pred.classes.shape == ()
    assert pred.log_prob(torch.tensor(1)).shape == ()
    reg = _regression(varlin.predict(model, x, num_samples=8))  # 3 outputs, no likelihood
    assert reg.mean.shape == (3,) and reg.sample_means is not None
    assert reg.sample_means.shape == (8, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, ...\) .* got shape \(\)"):
        varlin.predict(model, torch.tensor(1.0, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Monte Carlo through any module: CNN, BatchNorm, LSTM


def _cnn() -> nn.Sequential:
    """A small CNN on 1 x 8 x 8 images; ``to_variational(..., layers="last")`` gives the head."""
    torch.manual_seed(40)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=F64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64, 8, dtype=F64), nn.ReLU(), nn.Linear(8, 1, dtype=F64),
    )  # fmt: skip


def _assert_matches_moments(mc: RegressionPrediction, mean: torch.Tensor, var: torch.Tensor,
                            s: int, checks: int) -> None:  # fmt: skip
    """The S i.i.d. outputs per example are N(mean, var) (a Gaussian head on fixed features):
    the MC mean has SE sqrt(var/S), the population variance has mean (S-1)/S var and SD
    var sqrt(2(S-1))/S. z for a 1e-6 family-wise failure rate over ``checks``."""
    z = _z(1e-6, checks)
    assert bool(((mc.mean - mean).abs() <= z * (var / s).sqrt()).all())
    sd_var = var * math.sqrt(2 * (s - 1)) / s
    assert bool(((mc.epistemic - var * (s - 1) / s).abs() <= z * sd_var).all())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_monte_carlo_through_a_cnn_with_a_variational_head(estimator: str) -> None:
    """The issue's CNN: features by nn.Conv2d, a variational head. MC vs the exact closed form.

    The features run once (N rows), not once per sample; S = 4,000; 2 x 8 checks.
    """
    model = varlin.to_variational(_cnn(), layers="last", estimator=estimator, init_scale=0.3)
    x = torch.randn(8, 1, 8, 8, generator=_gen(41), dtype=F64)
    rows_seen: list[int] = []
    model[0].register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))
    s = 4000
    mc = _regression(varlin.predict(model, x, num_samples=s, method="mc"))
    assert rows_seen == [8]  # the convolution ran once, on the 8 examples
    assert mc.sample_means is not None and mc.sample_means.shape == (s, 8)
    exact = _regression(varlin.predict(model, x, method="closed_form"))
    _assert_matches_moments(mc, exact.mean, exact.epistemic, s, 16)
    # the sizes: 32 samples of 497 images
    big = torch.randn(497, 1, 8, 8, generator=_gen(42), dtype=F64)
    assert varlin.predict(model, big, num_samples=32, method="mc").mean.shape == (497,)


def test_monte_carlo_through_a_cnn_with_two_variational_layers_equals_the_model() -> None:
    model = varlin.to_variational(_cnn())  # both Linear layers variational, after the conv
    x = torch.randn(6, 1, 8, 8, generator=_gen(43), dtype=F64)
    pred = _regression(varlin.predict(model, x, num_samples=5))
    assert pred.sample_means is not None and pred.sample_means.shape == (5, 6)
    assert bool((pred.epistemic > 0).all())
    with varlin.deterministic(model):  # no noise: every sample is the model's own output
        mean = _regression(varlin.predict(model, x, num_samples=3)).mean
        torch.testing.assert_close(mean, model(x)[:, 0], rtol=1e-13, atol=1e-13)


def _batchnorm_mlp(estimator: str = "reparameterization") -> nn.Sequential:
    """16 hidden units; BatchNorm with running statistics that are not the identity."""
    torch.manual_seed(44)
    model = nn.Sequential(
        varlin.VariationalLinear(3, 16, estimator=estimator, generator=_gen(45), dtype=F64),
        nn.BatchNorm1d(16, dtype=F64), nn.ReLU(),
        varlin.VariationalLinear(16, 1, estimator=estimator, generator=_gen(46), dtype=F64),
    )  # fmt: skip
    for layer in varlin.variational_layers(model):
        layer.w_posterior.reset_scale(0.2)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16, generator=_gen(47), dtype=F64))
        bn.running_var.copy_(torch.rand(16, generator=_gen(48), dtype=F64) + 0.5)
    return model


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.usefixtures("single_thread")
def test_monte_carlo_through_a_batchnorm_mlp(estimator: str) -> None:
    """Eval mode, 16 examples = 16 channels (once silently normalised per example, not channel).

    No noise: every sample equals ``model(x)``. With noise: the batched estimate against a
    second route, a loop of S plain calls; the two means differ by at most z times the SE of
    a difference of two independent means (S = 4,000 each; z at 1e-6 over 16 examples).
    """
    model = _batchnorm_mlp(estimator).eval()
    x = torch.randn(16, 3, generator=_gen(49), dtype=F64)
    with varlin.deterministic(model):
        mean = _regression(varlin.predict(model, x, num_samples=3)).mean
        torch.testing.assert_close(mean, model(x)[:, 0], rtol=1e-13, atol=1e-13)
    s = 4000
    pred = _regression(varlin.predict(model, x, num_samples=s))
    assert pred.sample_means is not None and pred.sample_means.shape == (s, 16)
    with torch.no_grad():
        loop = torch.stack([model(x)[:, 0] for _ in range(s)])
    se = ((pred.epistemic + loop.var(0)) / s).sqrt()
    assert bool(((pred.mean - loop.mean(0)).abs() <= _z(1e-6, 16) * se).all())


def test_monte_carlo_through_a_batchnorm_mlp_in_training_mode_uses_the_batch() -> None:
    """Training mode normalises with each call's batch statistics: S calls on the N rows.

    So within every sample the normalised units average to 0 over the 16 examples (batch
    statistics of 7 x 16 folded rows would average them to 0 only over all 112).
    """
    model = _batchnorm_mlp().train()
    x = torch.randn(16, 3, generator=_gen(50), dtype=F64)
    with varlin.deterministic(model):
        mean = _regression(varlin.predict(model, x, num_samples=3)).mean
        torch.testing.assert_close(mean, model(x)[:, 0], rtol=1e-13, atol=1e-13)
    normalised: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, a, out: normalised.append(out))
    pred = _regression(varlin.predict(model, x, num_samples=7))
    assert pred.sample_means is not None and pred.sample_means.shape == (7, 16)
    per_sample = torch.cat(normalised).reshape(7, 16, 16)  # (sample, example, unit)
    torch.testing.assert_close(per_sample.mean(1), torch.zeros(7, 16, dtype=F64), atol=1e-12,
                               rtol=0)  # fmt: skip


class _LSTMRegressor(nn.Module):
    """An LSTM feature extractor (the last step's hidden state) and a variational head."""

    def __init__(self, batch_first: bool, estimator: str) -> None:
        super().__init__()
        torch.manual_seed(51)
        self.batch_first = batch_first
        self.lstm = nn.LSTM(2, 5, batch_first=batch_first, dtype=F64)
        self.head = varlin.VariationalLinear(5, 1, estimator=estimator, generator=_gen(52),
                                             dtype=F64)  # fmt: skip
        self.head.w_posterior.reset_scale(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, T, 2)``, examples first, whatever the LSTM's layout."""
        out, _ = self.lstm(x if self.batch_first else x.transpose(0, 1))
        return out[:, -1] if self.batch_first else out[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.usefixtures("single_thread")
def test_monte_carlo_through_an_lstm_feature_extractor(batch_first: bool, estimator: str) -> None:
    """MC vs the exact law of the head on the LSTM's features (S = 4,000; 2 x 6 checks).

    ``batch_first=True``: samples folded into the batch; ``False``: a loop of S calls.
    """
    model = _LSTMRegressor(batch_first, estimator)
    x = torch.randn(6, 7, 2, generator=_gen(53), dtype=F64)
    s = 4000
    mc = _regression(varlin.predict(model, x, num_samples=s))
    assert mc.sample_means is not None and mc.sample_means.shape == (s, 6)
    with torch.no_grad():
        exact = model.head.output_moments(model.features(x))
    _assert_matches_moments(mc, exact.loc[:, 0], exact.variance[:, 0], s, 12)


def _raise_boom(*args: object) -> None:
    raise _Boom("raised between two variational layers")


def test_folded_prediction_removes_its_hooks_even_when_the_model_raises() -> None:
    model = varlin.to_variational(_cnn())
    x = torch.randn(4, 1, 8, 8, generator=_gen(54), dtype=F64)
    relu = model[5].register_forward_hook(_raise_boom)
    with pytest.raises(_Boom):
        try:
            varlin.predict(model, x, num_samples=4)
        finally:
            relu.remove()
    for layer in varlin.variational_layers(model):
        assert not layer._forward_hooks and not layer._forward_pre_hooks
        assert layer._num_weight_samples is None
    assert model(x).shape == (4, 1)


# ---------------------------------------------------------------------------------------------
# method="moments": the propagated Gaussian, no weight sampled


@pytest.mark.parametrize("posterior", ["meanfield", "lowrank", "full"])
def test_moments_equal_the_closed_form_for_a_last_layer(posterior: str) -> None:
    """A deterministic body and one variational head: propagation is exact, so the moments
    predictive is the closed form's (second route), including the covariance across outputs."""
    torch.manual_seed(0)
    rank = {"rank": 2} if posterior == "lowrank" else {}
    head = varlin.VariationalLinear(6, 2, posterior=posterior, dtype=F64, **rank)
    head.w_posterior.set_marginal_scale(
        torch.full((6, 2), 0.3, dtype=F64), torch.full((2,), 0.2, dtype=F64)
    )
    model = nn.Sequential(nn.Linear(3, 6, dtype=F64), nn.ReLU(), head)
    x = torch.randn(7, 3, generator=_gen(40), dtype=F64)
    lik = Gaussian(0.4)
    exact = _regression(varlin.predict(model, x, likelihood=lik, method="closed_form"))
    for covariance in ("diagonal", "full"):
        got = _regression(
            varlin.predict(model, x, likelihood=lik, method="moments", covariance=covariance)
        )
        torch.testing.assert_close(got.mean, exact.mean)
        torch.testing.assert_close(got.epistemic, exact.epistemic)
        torch.testing.assert_close(got.aleatoric, exact.aleatoric)
        y = torch.randn(7, 2, generator=_gen(41), dtype=F64)
        torch.testing.assert_close(got.log_prob(y), exact.log_prob(y))
        if covariance == "full" and exact.covariance is not None:
            assert got.covariance is not None
            torch.testing.assert_close(got.covariance, exact.covariance)


def _hidden_model(out: int, seed: int) -> nn.Module:
    """Mean-field layer -> ReLU -> mean-field layer: for a fixed x the hidden units are
    independent, so the propagated moments are exact."""
    torch.manual_seed(seed)
    first = varlin.VariationalLinear(3, 8, init_scale=0.3, dtype=F64)
    second = varlin.VariationalLinear(8, out, init_scale=0.3, dtype=F64)
    return nn.Sequential(first, nn.ReLU(), second)


def test_moments_match_monte_carlo_with_the_uncertainty_split() -> None:
    """Gaussian and heteroscedastic likelihoods through a hidden layer: the moments predictive's
    mean, epistemic and aleatoric parts against S = 40,000 Monte Carlo samples. The sample
    moments' standard errors are estimated from the samples (4th moments); z for a 1e-6
    family-wise failure rate over 3 x 6 checks."""
    x = torch.randn(6, 3, generator=_gen(42), dtype=F64)
    s = 40_000
    z = _z(1e-6, 18)
    for lik, out in ((Gaussian(0.3), 1), (HeteroscedasticGaussian(), 2)):
        model = _hidden_model(out, seed=out)
        got = _regression(varlin.predict(model, x, likelihood=lik, method="moments"))
        mc = _regression(varlin.predict(model, x, likelihood=lik, num_samples=s, method="mc"))
        assert mc.sample_means is not None and mc.sample_vars is not None
        means, noise = mc.sample_means, mc.sample_vars
        assert bool(((got.mean - means.mean(0)).abs() <= z * (means.var(0) / s).sqrt()).all())
        centred4 = ((means - means.mean(0)) ** 4).mean(0)
        var_se = ((centred4 - means.var(0) ** 2) / s).sqrt()
        assert bool(((got.epistemic - means.var(0)).abs() <= z * var_se).all())
        noise_se = (noise.var(0) / s).sqrt()
        assert bool(((got.aleatoric - noise.mean(0)).abs() <= z * noise_se + 1e-12).all())
        # the total is the mixture's variance (heteroscedastic: the weighted Gauss-Hermite mixture)
        if got.sample_weights is not None:
            assert got.sample_means is not None and got.sample_vars is not None
            w = got.sample_weights[:, None]
            second = (w * (got.sample_vars + got.sample_means**2)).sum(0)
            torch.testing.assert_close(second - got.mean**2, got.variance)
            y = torch.randn(6, generator=_gen(43), dtype=F64)
            direct = (w * Normal(got.sample_means, got.sample_vars.sqrt()).log_prob(y).exp()).sum(0)
            torch.testing.assert_close(got.log_prob(y), direct.log())


@pytest.mark.parametrize(("likelihood", "out"), [(Bernoulli(), 1), (Categorical(), 3)])
def test_moments_classification_samples_the_logits(likelihood, out: int) -> None:
    """One variational layer: its logits are exactly the propagated Gaussian, so probabilities
    from logit samples match weight-sample Monte Carlo (both S = 40,000; SE from the samples,
    failure rate 1e-6 over the N x C probabilities); entropy and mutual information follow."""
    torch.manual_seed(5)
    model = nn.Sequential(varlin.VariationalLinear(3, out, init_scale=0.5, dtype=F64))
    x = torch.randn(5, 3, generator=_gen(44), dtype=F64)
    s = 40_000
    got = _classification(
        varlin.predict(model, x, likelihood=likelihood, num_samples=s, method="moments")
    )
    mc = _classification(
        varlin.predict(model, x, likelihood=likelihood, num_samples=s, method="mc")
    )
    se = (got.prob_samples.var(0) / s + mc.prob_samples.var(0) / s).sqrt()
    z = _z(1e-6, got.probs.numel())
    assert bool(((got.probs - mc.probs).abs() <= z * se).all())
    assert got.prob_samples.shape == (s, 5, 2 if out == 1 else out)
    torch.testing.assert_close(got.mutual_information, got.entropy - got.aleatoric)


@pytest.mark.parametrize(("likelihood", "out"), [(Bernoulli(), 1), (Categorical(), 3)])
def test_moments_classification_draws_from_the_layers_generator(likelihood, out: int) -> None:
    """predict(method="moments") samples the logits from the model's layers' generator, as
    method="mc" samples the weights: the same generator state gives bit-identical predictions
    whatever torch's global random state, and the global state is not consumed."""
    g = torch.Generator().manual_seed(9)
    model = nn.Sequential(
        varlin.VariationalLinear(3, 4, init_scale=0.5, dtype=F64, generator=g),
        nn.ReLU(),
        varlin.VariationalLinear(4, out, init_scale=0.5, dtype=F64, generator=g),
    )
    x = torch.randn(5, 3, generator=_gen(46), dtype=F64)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        g.manual_seed(10)
        before = torch.random.get_rng_state()
        pred = varlin.predict(model, x, likelihood=likelihood, num_samples=50, method="moments")
        assert torch.equal(torch.random.get_rng_state(), before)
        runs.append(_classification(pred))
    assert torch.equal(runs[0].prob_samples, runs[1].prob_samples)
    assert torch.equal(runs[0].probs, runs[1].probs)
    # the draws advance the layers' generator: the next call sees other logits
    after = _classification(
        varlin.predict(model, x, likelihood=likelihood, num_samples=50, method="moments")
    )
    assert not torch.equal(after.prob_samples, runs[1].prob_samples)


def test_moments_chunks_and_full_covariance_agree() -> None:
    model = _hidden_model(1, seed=3)
    x = torch.randn(10, 3, generator=_gen(45), dtype=F64)
    whole = _regression(varlin.predict(model, x, method="moments"))
    parts = _regression(varlin.predict(model, x, method="moments", batch_size=3))
    torch.testing.assert_close(parts.mean, whole.mean)
    torch.testing.assert_close(parts.epistemic, whole.epistemic)
    full = _regression(varlin.predict(model, x, method="moments", covariance="full", batch_size=4))
    # one output: "full" and "diagonal" differ only by the hidden units' correlations, which a
    # fixed input through a mean-field layer does not create
    torch.testing.assert_close(full.epistemic, whole.epistemic)


def test_moments_errors_are_one_line() -> None:
    x = torch.randn(4, 3, dtype=F64)
    cases = [
        (
            lambda: varlin.predict(_last_layer_model(), x, covariance="full"),
            ValueError,
            "covariance='full' applies only to method='moments'",
        ),
        (
            lambda: varlin.predict(_last_layer_model(), x, method="moments", covariance="dense"),
            ValueError,
            "covariance must be one of",
        ),
        (
            lambda: varlin.predict(nn.Sequential(nn.Linear(3, 1)).double(), x, method="moments"),
            ValueError,
            "no variational layer",
        ),
        (
            lambda: varlin.predict(
                nn.Sequential(varlin.VariationalLinear(3, 2, dtype=F64), nn.Softplus()),
                x,
                method="moments",
            ),
            TypeError,
            "no moment rule for Softplus",
        ),
        (
            lambda: varlin.predict(
                varlin.bayesian_last_layer(
                    nn.Sequential(nn.Linear(3, 4)).double(),
                    4,
                    1,
                    method="exact",
                    data=(x, x[:, 0]),
                ),
                x,
                method="moments",
            ),
            ValueError,
            "ExactLinear",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)
