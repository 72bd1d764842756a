"""Tests for varlin.ELBO: per-datum scaling, unbiased minibatches, the conjugate oracle, errors.

Everything runs in float64. The minibatch tests enumerate *every* minibatch of a tiny data set
in deterministic mode (``varlin.deterministic``), so the only randomness is the choice of batch
and the average over batches must equal the full-batch value exactly (to rounding): Pyro's
``test_subsample_gradient`` without its sampling noise.
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal
from torch.distributions import kl_divergence as torch_kl

import varlin
from varlin import priors
from varlin.conjugate import BayesianLinearRegression
from varlin.functional import inverse_softplus
from varlin.likelihoods import Categorical, Gaussian, HeteroscedasticGaussian, Likelihood

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(d_in: int, d_out: int, seed: int) -> nn.Module:
    g = _gen(seed)
    model = nn.Sequential(
        varlin.VariationalLinear(d_in, 5, generator=g, dtype=F64),
        nn.Tanh(),
        varlin.VariationalLinear(5, d_out, generator=g, dtype=F64),
    )
    for layer in varlin.variational_layers(model):
        layer.w_posterior.reset_scale(0.3)  # a KL far from 0, so its share of the loss matters
    return model


def _params(model: nn.Module, likelihood: Likelihood) -> list[torch.Tensor]:
    return [*model.parameters(), *likelihood.parameters()]


def _loss_and_grads(elbo, model, likelihood, x, y):
    params = _params(model, likelihood)
    with varlin.deterministic(model):
        loss = elbo(model(x), y, varlin.kl_divergence(model))
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# unbiasedness of the minibatch loss and gradient


@pytest.mark.parametrize(
    ("likelihood", "d_out", "classes"),
    [
        (Gaussian(0.5, learn_noise=True, dtype=F64), 1, 0),
        (HeteroscedasticGaussian(), 2, 0),
        (Categorical(), 3, 3),
    ],
    ids=["gaussian-learned-noise", "heteroscedastic", "categorical"],
)
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_minibatch_loss_and_gradient_are_unbiased(
    likelihood: Likelihood, d_out: int, classes: int, batch_size: int
) -> None:
    """Average over all C(6, B) minibatches == full-batch value == -ELBO / N, loss and gradient.

    A KL scaled by the batch size (the peers' mistake) or averaged instead of summed breaks it.
    """
    n = 6
    g = _gen(1)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g) if classes else torch.randn(n, dtype=F64)
    model = _mlp(2, d_out, seed=2)
    elbo = varlin.ELBO(likelihood, num_data=n)

    full_loss, full_grads = _loss_and_grads(elbo, model, likelihood, x, y)
    with torch.no_grad(), varlin.deterministic(model):
        ell = likelihood.expected_log_prob(model(x), y).sum()
        kl = varlin.kl_divergence(model)
    assert float(kl) > 1.0
    torch.testing.assert_close(full_loss, -(ell - kl) / n, rtol=1e-14, atol=1e-14)

    subsets = list(itertools.combinations(range(n), batch_size))
    losses, grads = [], []
    for idx in subsets:
        loss, grad = _loss_and_grads(elbo, model, likelihood, x[list(idx)], y[list(idx)])
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(torch.stack(losses).mean(), full_loss, rtol=1e-13, atol=1e-13)
    for i, full in enumerate(full_grads):
        mean = torch.stack([grad[i] for grad in grads]).mean(0)
        torch.testing.assert_close(mean, full, rtol=1e-12, atol=1e-13)
    if batch_size < n:  # the test can tell: single batches differ from the full value
        assert max(abs(float(loss - full_loss)) for loss in losses) > 1e-3


def test_random_minibatches_average_to_full_loss() -> None:
    """Many random batches (with replacement, B = 4 of N = 50): the mean loss converges.

    2,000 batches; tolerance z * SE with SE the empirical standard deviation / sqrt(2000), for a
    failure rate of 1e-6.
    """
    n, b, draws = 50, 4, 2000
    g = _gen(3)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randn(n, dtype=F64)
    model = _mlp(3, 1, seed=4)
    likelihood = Gaussian(0.3, dtype=F64)
    elbo = varlin.ELBO(likelihood, num_data=n)
    with torch.no_grad(), varlin.deterministic(model):
        out = model(x)
        kl = varlin.kl_divergence(model)
        full = elbo(out, y, kl)
        idx = torch.stack([torch.randperm(n, generator=g)[:b] for _ in range(draws)])
        losses = torch.stack([elbo(out[i], y[i], kl) for i in idx])
    se = losses.std() / math.sqrt(draws)
    z = NormalDist().inv_cdf(1 - 1e-6 / 2)
    assert abs(float(losses.mean() - full)) <= z * float(se)


# ---------------------------------------------------------------------------------------------
# the conjugate oracle


def _conjugate_problem(prior_scale: float, noise_scale: float):
    g = _gen(5)
    n, d = 40, 3
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.tensor([0.7, -1.2, 0.3], dtype=F64)
    y = x @ w + noise_scale * torch.randn(n, generator=g, dtype=F64)
    blr = BayesianLinearRegression(prior_scale=prior_scale, noise_scale=noise_scale).fit(x, y)
    layer = varlin.LinearVariationalNormal(
        d, 1, bias=False, make_weights_prior=priors.normal(prior_scale), dtype=F64
    )
    return x, y, blr, layer


def _set_q(layer: varlin.LinearVariationalNormal, loc: torch.Tensor, scale: torch.Tensor) -> None:
    with torch.no_grad():
        layer.w_posterior.loc.copy_(loc.reshape(-1, 1))
        layer.w_posterior.raw_scale.copy_(inverse_softplus(scale.reshape(-1, 1)))


def _moments(layer: varlin.LinearVariationalNormal, x: torch.Tensor) -> Normal:
    loc, scale = layer.w_loc, layer.w_scale
    return Normal(x @ loc, ((x * x) @ scale**2).sqrt())


@pytest.mark.parametrize(("prior_scale", "noise_scale"), [(1.0, 0.5), (0.3, 1.5)])
def test_elbo_equals_evidence_minus_kl_to_posterior(prior_scale: float, noise_scale: float) -> None:
    """N * (-loss) == log p(y) - KL(q || p(w | y)) for an arbitrary mean-field q, to 1e-8."""
    x, y, blr, layer = _conjugate_problem(prior_scale, noise_scale)
    n = x.shape[0]
    _set_q(layer, torch.tensor([0.1, -0.4, 0.9], dtype=F64), torch.tensor([0.2, 0.05, 0.6]))
    elbo = varlin.ELBO(Gaussian(noise_scale, dtype=F64), num_data=n)
    with torch.no_grad():
        loss = elbo(_moments(layer, x), y, layer.kl_divergence())
        loc, scale = layer.w_loc.detach()[:, 0], layer.w_scale.detach()[:, 0]
    q_mvn = MultivariateNormal(loc, covariance_matrix=torch.diag(scale**2))
    gap = torch_kl(q_mvn, blr.posterior)
    assert float(gap) > 1.0  # q is far from the posterior: the identity is not trivially 0 = 0
    expected = blr.log_evidence() - gap
    assert abs(float(-loss * n - expected)) < 1e-8
    # Second route: the conjugate module's own ELBO of the same q.
    assert abs(float(-loss * n - blr.elbo(Normal(loc, scale)))) < 1e-8


def test_elbo_is_stationary_at_the_mean_field_optimum() -> None:
    """At q = blr.mean_field_optimum() the gradient of varlin's loss vanishes (to 1e-8)."""
    x, y, blr, layer = _conjugate_problem(1.0, 0.5)
    opt = blr.mean_field_optimum()
    _set_q(layer, opt.loc, opt.scale)
    elbo = varlin.ELBO(Gaussian(0.5, dtype=F64), num_data=x.shape[0])
    loss = elbo(_moments(layer, x), y, layer.kl_divergence())
    grads = torch.autograd.grad(loss, [layer.w_posterior.loc, layer.w_posterior.raw_scale])
    assert max(float(grad.abs().max()) for grad in grads) < 1e-8
    # ...and moving away from it lowers the ELBO (raises the loss).
    _set_q(layer, opt.loc + 0.05, opt.scale)
    with torch.no_grad():
        assert float(elbo(_moments(layer, x), y, layer.kl_divergence())) > float(loss.detach())


def test_sampled_local_reparameterization_loss_is_unbiased_for_closed_form() -> None:
    """The loss from sampled outputs (local reparameterization) averages to the closed form.

    4,000 independent sampled losses; tolerance z * SE for a 1e-6 failure rate.
    """
    x, y, _, layer = _conjugate_problem(1.0, 0.5)
    layer.estimator = "local"
    layer.generator = _gen(6)
    _set_q(layer, torch.tensor([0.1, -0.4, 0.9], dtype=F64), torch.tensor([0.2, 0.05, 0.6]))
    elbo = varlin.ELBO(Gaussian(0.5, dtype=F64), num_data=x.shape[0])
    with torch.no_grad():
        exact = elbo(_moments(layer, x), y, layer.kl_divergence())
        draws = 4000
        with varlin.layers.weight_samples(layer, draws):
            out, kl = layer(x.expand(draws, *x.shape))  # (S, N, 1), one pass
        samples = torch.stack([elbo(out[s], y, kl) for s in range(draws)])
        stacked = elbo(out, y, kl, samples=True)
    torch.testing.assert_close(stacked, samples.mean(), rtol=1e-12, atol=1e-12)
    z = NormalDist().inv_cdf(1 - 1e-6 / 2)
    assert abs(float(samples.mean() - exact)) <= z * float(samples.std()) / math.sqrt(draws)


# ---------------------------------------------------------------------------------------------
# the terms, beta and errors


def test_terms_and_beta() -> None:
    likelihood = Gaussian(1.0, dtype=F64)
    elbo = varlin.ELBO(likelihood, num_data=100, beta=0.5)
    out = torch.randn(8, 1, generator=_gen(7), dtype=F64)
    y = torch.randn(8, generator=_gen(8), dtype=F64)
    kl = torch.tensor(30.0, dtype=F64)
    terms = elbo.terms(out, y, kl)
    ell = likelihood.expected_log_prob(out, y)
    torch.testing.assert_close(terms.nll, -ell.mean())
    torch.testing.assert_close(terms.expected_log_likelihood, ell.mean())
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.kl_term, kl * 0.5 / 100)
    torch.testing.assert_close(terms.loss, terms.nll + terms.kl_term)
    torch.testing.assert_close(elbo(out, y, kl), terms.loss)
    # A per-call beta (a warm-up step) overrides the constructor's, for that call only.
    torch.testing.assert_close(elbo.terms(out, y, kl, beta=0.0).kl_term, kl * 0)
    torch.testing.assert_close(elbo(out, y, kl, beta=2.0), terms.nll + kl * 2.0 / 100)
    torch.testing.assert_close(elbo.terms(out, y, kl).kl_term, kl * 0.5 / 100)
    assert "num_data=100" in repr(elbo) and "beta=0.5" in repr(elbo)
    with pytest.raises(ValueError, match="beta"):
        elbo(out, y, kl, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        varlin.ELBO(likelihood, 10, beta=-0.1)


@pytest.mark.parametrize(
    "kl", [torch.zeros(1), torch.zeros(3), torch.zeros(2, 2), 3.0], ids=["(1,)", "(3,)", "2d", "py"]
)
def test_kl_must_be_zero_dim(kl: object) -> None:
    elbo = varlin.ELBO(Gaussian(), num_data=10)
    with pytest.raises(ValueError, match="kl must be a 0-dim tensor"):
        elbo(torch.zeros(4, 1), torch.zeros(4), kl)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_data", [0, -5])
def test_num_data_must_be_positive(num_data: int) -> None:
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        varlin.ELBO(Gaussian(), num_data=num_data)


def test_constructor_type_errors() -> None:
    with pytest.raises(TypeError, match="num_data"):
        varlin.ELBO(Gaussian(), num_data=True)
    with pytest.raises(TypeError, match="num_data"):
        varlin.ELBO(Gaussian(), num_data=10.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="likelihood must be a varlin.likelihoods.Likelihood"):
        varlin.ELBO(nn.MSELoss(), num_data=10)  # type: ignore[arg-type]


def test_elbo_trains_learned_noise_through_its_parameters() -> None:
    likelihood = Gaussian(1.0, learn_noise=True)
    elbo = varlin.ELBO(likelihood, num_data=10)
    assert [name for name, _ in elbo.named_parameters()] == ["likelihood.raw_noise_scale"]
