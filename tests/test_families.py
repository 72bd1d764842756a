r"""The posterior families on the variational linear layers: construction, estimators, KL, moments.

Every Gaussian family is checked against a second route: its KL against torch's
``kl_divergence`` of the densified distributions (float64, small layers), its exact output
distribution against Monte Carlo over weight samples, and every estimator against that exact
distribution. The radial family (not Gaussian) is checked against its own exact ``log_prob`` by
Monte Carlo. Statistical tests state their failure rate (``conftest.FAILURE_RATE``, Bonferroni
over the checks of a test).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from conftest import mean_tolerance, z_bound
from torch import nn
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import varlin
from varlin import functional, posteriors
from varlin.convert import _NormalAt
from varlin.distributions import MatrixNormal, Radial
from varlin.layers import weight_samples

IN, OUT = 3, 2

#: id -> layer options; one entry per family (two for the matrix normal's factor kinds).
FAMILIES: dict[str, dict[str, Any]] = {
    "meanfield": {"posterior": "meanfield"},
    "lowrank": {"posterior": "lowrank", "rank": 2},
    "full": {"posterior": "full"},
    "matrix_normal": {"posterior": "matrix_normal"},
    "matrix_normal-diagonal": {"posterior": "matrix_normal", "factors": "diagonal"},
    "radial": {"posterior": "radial"},
}
GAUSSIAN = [name for name in FAMILIES if name != "radial"]
CORRELATED = ["lowrank", "full", "matrix_normal"]  # outputs of one example are correlated
VALID = {
    "meanfield": ("reparameterization", "local", "flipout"),
    "lowrank": ("reparameterization", "local"),
    "full": ("reparameterization", "local"),
    "matrix_normal": ("reparameterization", "local"),
    "matrix_normal-diagonal": ("reparameterization", "local"),
    "radial": ("reparameterization", "flipout"),
}
CASES = [(name, est) for name in FAMILIES for est in VALID[name]]


def _layer(
    family: str,
    *,
    cls: type[varlin.layers.BayesianLinearBase] = varlin.VariationalLinear,
    in_features: int = IN,
    out_features: int = OUT,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    options = {**FAMILIES[family], **kwargs}
    return cls(in_features, out_features, generator=torch.Generator().manual_seed(seed), **options)


def _randomise(layer: nn.Module, seed: int = 1) -> None:
    """Distinct means, scales away from 0 and non-trivial correlations, so a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("loc"):
                p.copy_(noise)
            elif "raw_scale" in name:
                target = 0.3 + torch.rand(p.shape, generator=g, dtype=p.dtype)
                p.copy_(functional.inverse_softplus(target))
            else:  # factors and off-diagonal parts: correlations
                p.copy_(0.4 * noise)


def _output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


# -- construction and bad input ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_every_valid_estimator_runs_on_every_family(
    family: str, estimator: str, batch_shape: tuple[int, ...], bias: bool
) -> None:
    layer = _layer(family, cls=varlin.LinearVariationalNormal, estimator=estimator, bias=bias)
    y, kl = layer(torch.randn(*batch_shape, IN))
    assert y.shape == (*batch_shape, OUT) and torch.isfinite(y).all()
    assert kl.shape == () and kl > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_an_invalid_estimator_fails_at_construction_naming_both(family: str) -> None:
    for estimator in set(functional.ESTIMATORS) - set(VALID[family]):
        name = FAMILIES[family]["posterior"]
        valid = ", ".join(repr(e) for e in VALID[family])
        message = (
            f"estimator='{estimator}' is not valid with posterior='{name}'; the valid "
            f"estimators for '{name}' are {valid}"
        )
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$"):
            _layer(family, estimator=estimator)
        layer = _layer(family)  # an estimator changed later is refused when it is used
        layer.estimator = estimator
        with pytest.raises(ValueError, match="is not valid with posterior"):
            layer(torch.randn(2, IN))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"posterior": "gaussian"}, ValueError,
         "posterior must be one of 'meanfield', 'lowrank', 'matrix_normal', 'full', 'radial', "
         "got 'gaussian'"),
        ({"posterior": None}, ValueError, "posterior must be one of .* got None"),
        ({"posterior": "lowrank", "rank": 0}, ValueError,
         r"rank must be in \[1, 8\] \(the number of weights and biases of a 3 x 2 layer\), got 0"),
        ({"posterior": "lowrank", "rank": -2}, ValueError, r"rank must be in \[1, 8\].* got -2"),
        ({"posterior": "lowrank", "rank": 9}, ValueError, r"rank must be in \[1, 8\].* got 9"),
        ({"posterior": "lowrank", "rank": 9, "bias": False}, ValueError,
         r"rank must be in \[1, 6\].* got 9"),
        ({"posterior": "lowrank", "rank": 1.5}, TypeError,
         "rank must be a positive integer, got 1.5"),
        ({"posterior": "lowrank", "rank": True}, TypeError,
         "rank must be a positive integer, got True"),
        ({"posterior": "lowrank"}, ValueError, "posterior='lowrank' needs rank=k"),
        ({"rank": 2}, ValueError,
         "rank=2 was given but posterior='meanfield'; rank applies only to posterior='lowrank'"),
        ({"posterior": "full", "rank": 2}, ValueError,
         "rank=2 was given but posterior='full'"),
        ({"posterior": "lowrank", "rank": 2, "factors": "full"}, ValueError,
         "factors='full' was given but posterior='lowrank'; factors applies only to "
         "posterior='matrix_normal'"),
        ({"posterior": "matrix_normal", "factors": "cholesky"}, ValueError,
         "factors must be one of 'full', 'diagonal', got 'cholesky'"),
    ],
)  # fmt: skip
def test_bad_family_arguments_are_one_line_errors(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        varlin.VariationalLinear(IN, OUT, **kwargs)
    assert "\n" not in str(info.value)


def test_full_above_the_size_limit_gives_the_count_and_suggests_lowrank() -> None:
    message = (
        "posterior='full' on a 256 x 256 layer needs a covariance of 65792 x 65792 = "
        "4328587264 entries over its 65792 weights and biases, above the limit of 16777216 "
        "entries; use posterior='lowrank' with a rank instead"
    )
    with pytest.raises(ValueError, match="^" + message + "$"):
        varlin.VariationalLinear(256, 256, posterior="full")
    # The limit itself is allowed: 64 x 64 weights = 4096, 4096^2 = 2^24 entries.
    layer = varlin.VariationalLinear(64, 64, bias=False, posterior="full", device="meta")
    assert layer.w_posterior.offdiag.shape == (4096, 4096)


@pytest.mark.parametrize("family", FAMILIES)
def test_extra_repr_names_the_family(family: str) -> None:
    text = repr(_layer(family))
    name = FAMILIES[family]["posterior"]
    assert ("posterior=" in text) == (name != "meanfield")
    if name != "meanfield":
        assert f"posterior='{name}'" in text


# -- the public surface of a layer with a family ------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_means_marginals_and_joint_distribution(family: str, bias: bool, float64: Any) -> None:
    layer = _layer(family, bias=bias)
    _randomise(layer)
    t = layer._realise()
    mean, cov = layer.w_posterior.dense(t)
    d = IN * OUT + (OUT if bias else 0)
    assert mean.shape == (d,) and cov.shape == (d, d)
    # theta = [W row by row, b]: the means, and the marginal scales the layer reports
    expected = torch.cat([layer.w_loc.reshape(-1)] + ([layer.b_loc] if bias else []))
    torch.testing.assert_close(mean, expected, rtol=0, atol=0)
    assert layer.w_loc.shape == (IN, OUT) and layer.w_scale.shape == (IN, OUT)
    torch.testing.assert_close(layer.w_scale.reshape(-1) ** 2, cov.diagonal()[: IN * OUT])
    assert (layer.b_loc is None) == (layer.b_scale is None) == (not bias)
    if bias:
        torch.testing.assert_close(layer.b_scale**2, cov.diagonal()[IN * OUT :])
    joint = layer.posterior()
    if family == "radial":
        assert isinstance(joint, Radial)
        with pytest.raises(TypeError, match="posterior='radial' has no Normal marginals"):
            layer.weight_posterior()
        return
    q_w, q_b = layer.weight_posterior(), layer.bias_posterior()
    assert isinstance(q_w, Normal) and q_w.batch_shape == (IN, OUT)
    torch.testing.assert_close(q_w.scale, layer.w_scale)
    assert (q_b is None) == (not bias)
    kind = {"meanfield": Independent, "lowrank": LowRankMultivariateNormal,
            "full": MultivariateNormal}.get(family, MatrixNormal)  # fmt: skip
    assert isinstance(joint, kind)
    torch.testing.assert_close(joint.mean.reshape(-1), mean)
    torch.testing.assert_close(joint.variance.reshape(-1), cov.diagonal())


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_is_bit_identical_to_the_mean_map(family: str) -> None:
    for bias in (True, False):
        layer = _layer(family, bias=bias)
        _randomise(layer)
        x = torch.randn(4, IN)
        with varlin.deterministic(layer):
            y = layer(x)
        expected = x @ layer.w_loc if layer.b_loc is None else x @ layer.w_loc + layer.b_loc
        assert torch.equal(y, expected)


@pytest.mark.parametrize("init_scale", [1e-3, 0.2])
@pytest.mark.parametrize("family", FAMILIES)
def test_reset_parameters_like_nn_linear_and_init_scale(family: str, init_scale: float) -> None:
    """Means U(+-1/sqrt(in)) for weights and bias; every weight's std is init_scale (lowrank:
    in expectation, half from the diagonal and half from random factors)."""
    layer = _layer(family, in_features=16, out_features=64, init_scale=init_scale)
    bound = 1 / math.sqrt(16)
    for loc in (layer.w_loc, layer.b_loc):
        assert loc.abs().max() <= bound and loc.abs().max() > 0.8 * bound
    scales = torch.cat([layer.w_scale.reshape(-1), layer.b_scale.reshape(-1)]).detach()
    if family == "lowrank":
        # Diagonal sd init/sqrt(2); factor entries i.i.d. N(0, e^2), e^4 = init^2 / (2 rank), so
        # that E sum_k A_ik^2 B_jk^2 = init^2 / 2. The mean of n squared entries has sd
        # e^2 sqrt(2 / n) (chi-square); rate 1e-6 over the two factors.
        family_ = layer.w_posterior
        diagonal = torch.nn.functional.softplus(family_.raw_scale).detach()
        torch.testing.assert_close(diagonal, torch.full_like(diagonal, init_scale / math.sqrt(2)))
        e2 = init_scale / math.sqrt(2 * family_.rank)
        for factor in (family_.row_factor, family_.col_factor):
            n = factor.numel()
            mean_square = float(factor.detach().square().mean())
            assert abs(mean_square - e2) <= z_bound(2) * e2 * math.sqrt(2 / n)
    else:
        torch.testing.assert_close(scales, torch.full_like(scales, init_scale))


# -- KL: closed form against torch on the dense distributions ---------------------------------


def _dense_prior(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance vectors of the (Normal) prior over theta = [W row by row, b]."""
    parts = [(layer.weight_prior(), IN * OUT)]
    if layer.b_prior is not None:
        parts.append((layer.bias_prior(), OUT))
    loc = torch.cat([p.loc.expand(p.batch_shape).reshape(-1) for p, _ in parts])
    var = torch.cat([p.variance.expand(p.batch_shape).reshape(-1) for p, _ in parts])
    return loc, var


PRIORS = {
    "default": {},
    "scalar": {"make_weights_prior": varlin.priors.normal(0.7, 0.2),
               "make_bias_prior": varlin.priors.normal(1.5)},
    "at-weights": {
        "make_weights_prior": _NormalAt(torch.linspace(-1, 1, IN * OUT, dtype=torch.float64)
                                        .reshape(IN, OUT), torch.tensor(0.4, dtype=torch.float64)),
        "make_bias_prior": _NormalAt(torch.tensor([0.3, -0.2], dtype=torch.float64),
                                     torch.tensor([0.5, 2.0], dtype=torch.float64)),
    },
}  # fmt: skip


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", GAUSSIAN)
def test_kl_is_torchs_kl_of_the_dense_distributions(
    family: str, bias: bool, prior: str, float64: Any
) -> None:
    """Scalar, per-layer and weight-sized Normal priors: to 1e-10 in float64."""
    options = dict(PRIORS[prior])
    if not bias:
        options.pop("make_bias_prior", None)
    layer = _layer(family, bias=bias, **options)
    _randomise(layer)
    mean, cov = layer.w_posterior.dense(layer._realise())
    p_loc, p_var = _dense_prior(layer)
    expected = kl_divergence(
        MultivariateNormal(mean, covariance_matrix=cov), MultivariateNormal(p_loc, p_var.diag())
    )
    assert expected > 1.0
    torch.testing.assert_close(layer.kl_divergence(), expected, rtol=1e-10, atol=1e-10)
    # The seed's forward returns the same KL, weighted.
    seed_layer = _layer(family, cls=varlin.LinearVariationalNormal, bias=bias, **options)
    seed_layer.load_state_dict(layer.state_dict())
    _, weighted = seed_layer(torch.randn(2, IN), kl_weight=0.5)
    torch.testing.assert_close(weighted, 0.5 * expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_output", [False, True], ids=["per-layer", "per-output"])
@pytest.mark.parametrize("family", GAUSSIAN)
def test_kl_to_a_learned_prior_and_its_gradient_are_the_dense_kls(
    family: str, per_output: bool, float64: Any
) -> None:
    """Learned prior scales (empirical Bayes): the layer's KL and its gradient with respect to
    every parameter, the priors' ``raw_scale`` included, equal autograd through torch's KL of
    the dense distributions (to 1e-10 in float64)."""
    learned = varlin.priors.normal(0.7, learn_scale=True, per_output=per_output)
    layer = _layer(family, make_weights_prior=learned, make_bias_prior=learned)
    _randomise(layer)
    names = [name for name, _ in layer.named_parameters()]
    assert "w_prior.raw_scale" in names and "b_prior.raw_scale" in names
    params = [p for _, p in layer.named_parameters()]
    kl = layer.kl_divergence()
    mean, cov = layer.w_posterior.dense(layer._realise())
    p_loc, p_var = _dense_prior(layer)  # differentiable in the learned scales
    expected = kl_divergence(
        MultivariateNormal(mean, covariance_matrix=cov), MultivariateNormal(p_loc, p_var.diag())
    )
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(kl, params)
    want = torch.autograd.grad(expected, params)
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert all(bool(g.abs().sum() > 0) for n, g in zip(names, got, strict=True) if "prior" in n)


@pytest.mark.parametrize("family", ["lowrank", "full", "matrix_normal"])
def test_kl_to_a_laplace_prior_is_marginals_plus_total_correlation(
    family: str, float64: Any
) -> None:
    r"""A non-Normal elementwise prior: :math:`KL(q\|p) = E_q[\log q - \log p]` by Monte Carlo,
    200 000 joint draws, tolerance from the draws' own sd (failure rate 1e-6)."""
    layer = _layer(family, make_weights_prior=varlin.priors.laplace(0.5),
                   make_bias_prior=varlin.priors.laplace(2.0))  # fmt: skip
    _randomise(layer)
    with torch.no_grad():
        q = layer.posterior()
        theta = q.sample((200_000,)).reshape(200_000, -1)
        w, b = theta[:, : IN * OUT].reshape(-1, IN, OUT), theta[:, IN * OUT :]
        mean, cov = layer.w_posterior.dense(layer._realise())
        log_q = MultivariateNormal(mean, covariance_matrix=cov).log_prob(theta)
        log_p = (layer.weight_prior().log_prob(w).sum((-2, -1))
                 + layer.bias_prior().log_prob(b).sum(-1))  # fmt: skip
        samples = log_q - log_p
        sd = samples.std() / math.sqrt(samples.numel())
        assert (layer.kl_divergence() - samples.mean()).abs() <= z_bound() * sd


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("prior", ["default", "scalar"])
def test_radial_kl_to_a_normal_prior_is_exact(prior: str, float64: Any) -> None:
    r"""Radial: closed-form entropy and moment cross-entropy vs
    :math:`E_q[\log q - \log p]` with the exact radial ``log_prob`` (200 000 draws, rate 1e-6)."""
    layer = _layer("radial", **PRIORS[prior])
    _randomise(layer)
    with torch.no_grad():
        q = layer.posterior()
        theta = q.rsample((200_000,))
        p_loc, p_var = _dense_prior(layer)
        log_p = Normal(p_loc, p_var.sqrt()).log_prob(theta.reshape(200_000, -1)).sum(-1)
        samples = q.log_prob(theta) - log_p
        sd = samples.std() / math.sqrt(samples.numel())
        assert (layer.kl_divergence() - samples.mean()).abs() <= z_bound() * sd


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", ["radial", "lowrank"])
def test_kl_to_a_scale_mixture_prior_is_unbiased(family: str, float64: Any) -> None:
    """No closed form: the layer's KL is a one-draw estimate; the mean of 4000 of them matches
    the Monte Carlo reference of 200 000 draws (independent samples; rate 1e-6)."""
    layer = _layer(family, make_weights_prior=varlin.priors.scale_mixture(0.5, 1.0, 0.1),
                   make_bias_prior=varlin.priors.scale_mixture(0.3, 2.0, 0.5))  # fmt: skip
    _randomise(layer)
    with torch.no_grad():
        estimates = torch.stack([layer.kl_divergence() for _ in range(4000)])
        q = layer.posterior()
        theta = q.rsample((200_000,)).reshape(200_000, -1)
        if family == "radial":
            log_q = q.log_prob(theta.reshape(200_000, IN + 1, OUT))
        else:
            log_q = q.log_prob(theta)
        w, b = theta[:, : IN * OUT].reshape(-1, IN, OUT), theta[:, IN * OUT :]
        log_p = (layer.weight_prior().log_prob(w).sum((-2, -1))
                 + layer.bias_prior().log_prob(b).sum(-1))  # fmt: skip
        reference = log_q - log_p
    var = estimates.var() / estimates.numel() + reference.var() / reference.numel()
    assert (estimates.mean() - reference.mean()).abs() <= z_bound() * var.sqrt()
    assert estimates.std() > 0  # a Monte Carlo estimate, not a closed form in disguise


def test_lowrank_kl_stays_finite_when_the_diagonal_collapses() -> None:
    """float32, diagonal softplus(-200) = 0 and factors of size 1: the diagonal's floor
    (eps^(1/4) |a_i| |b_j|) keeps the capacitance resolvable; the KL and its gradients are finite
    and match torch's KL of the same distribution computed densely in float64."""
    layer = _layer("lowrank", in_features=30, out_features=20, rank=4)
    with torch.no_grad():
        layer.w_posterior.raw_scale.fill_(-200.0)
        layer.w_posterior.row_factor.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        layer.w_posterior.col_factor.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    kl = layer.kl_divergence()
    assert torch.isfinite(kl)
    kl.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    with torch.no_grad():
        mean, cov = (t.double() for t in layer.w_posterior.dense(layer._realise()))
        p_loc, p_var = _dense_prior(layer)
        expected = kl_divergence(
            MultivariateNormal(mean, covariance_matrix=cov),
            MultivariateNormal(p_loc.double(), p_var.double().diag()),
        )
    torch.testing.assert_close(kl.double(), expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("prior", ["normal", "scale_mixture"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_layers_train_with_a_finite_kl(
    family: str, dtype: torch.dtype, prior: str
) -> None:
    """float16/bfloat16 parameters: finite outputs and KL (float16 KLs are summed in float32),
    within 2% of the float32 KL of the same (rounded) parameters, and finite gradients. The
    scale-mixture prior's KL is a Monte Carlo estimate: there the KL is checked for finiteness
    only, and the gradients only in bfloat16 (a low-rank factor's gradient sums the spike
    component's ~1e3 per weight over a row of weights, beyond float16's 65504: pure float16
    parameters are for inference; train under autocast)."""
    options: dict[str, Any] = {}
    if prior == "scale_mixture":
        options = {"make_weights_prior": varlin.priors.scale_mixture(),
                   "make_bias_prior": varlin.priors.scale_mixture()}  # fmt: skip
    layer = _layer(family, cls=varlin.LinearVariationalNormal, in_features=30, out_features=20,
                   **options).to(dtype)  # fmt: skip
    layer.estimator = VALID[family][-1]
    y, kl = layer(torch.randn(4, 30, dtype=dtype))
    assert torch.isfinite(y).all() and torch.isfinite(kl)
    if dtype == torch.float16:
        assert kl.dtype == torch.float32
    (y.float().square().sum() + kl.float()).backward()
    if prior == "normal" or dtype == torch.bfloat16:
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    if prior == "normal":
        reference = _layer(family, cls=varlin.LinearVariationalNormal, in_features=30,
                           out_features=20)  # fmt: skip
        reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        torch.testing.assert_close(
            kl.detach().float(), reference.kl_divergence().detach(), rtol=2e-2, atol=0.0
        )


# -- the exact output distribution and every estimator -----------------------------------------


def _exact_moments(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output mean and covariance per example from the dense weights: y = x~ W~."""
    mean, cov = layer.w_posterior.dense(layer._realise())
    rows = IN + (1 if layer.b_loc is not None else 0)
    x_aug = torch.cat([x, torch.ones(x.shape[0], rows - IN, dtype=x.dtype)], -1)
    jac = torch.einsum("ni,jk->njik", x_aug, torch.eye(OUT, dtype=x.dtype)).reshape(
        x.shape[0], OUT, rows * OUT
    )
    return jac @ mean, jac @ cov @ jac.transpose(-1, -2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", GAUSSIAN)
def test_output_moments_is_the_exact_output_distribution(
    family: str, bias: bool, float64: Any
) -> None:
    """Closed form vs the dense route y = x~ vec(W~) (to 1e-10), and its kind: a Normal for
    independent outputs, a (low-rank) multivariate Normal for correlated ones."""
    layer = _layer(family, bias=bias)
    _randomise(layer)
    x = torch.randn(5, IN)
    dist = layer.output_moments(x)
    mean, cov = _exact_moments(layer, x)
    torch.testing.assert_close(dist.mean, mean, rtol=1e-10, atol=1e-10)
    if family in CORRELATED:
        assert isinstance(dist, (MultivariateNormal, LowRankMultivariateNormal))
        torch.testing.assert_close(dist.covariance_matrix, cov, rtol=1e-10, atol=1e-10)
        assert cov[:, 0, 1].abs().max() > 0.05  # the outputs are correlated indeed
    else:
        assert isinstance(dist, Normal)
        torch.testing.assert_close(cov, torch.diag_embed(cov.diagonal(0, -2, -1)))
    torch.testing.assert_close(dist.variance, cov.diagonal(0, -2, -1), rtol=1e-10, atol=1e-10)
    single = _layer(family, bias=bias, out_features=1)
    assert isinstance(single.output_moments(x), Normal)


def test_radial_has_no_closed_form_output_distribution() -> None:
    with pytest.raises(ValueError, match="posterior='radial' has no closed-form output"):
        _layer("radial").output_moments(torch.randn(2, IN))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_every_estimator_samples_the_exact_output_distribution(
    family: str, estimator: str, float64: Any
) -> None:
    r"""S = 40 000 independent draws (``weight_samples``) of 3 examples' 2 outputs.

    Means and variances per output, and the covariance of the two outputs, against the dense
    route. Tolerances: the sample mean of a quantity with known (estimated, for the 2nd moments)
    variance; failure rate 1e-6 over 3 x 2 + 3 x 2 + 3 checks. The radial outputs are not
    Gaussian, so every tolerance comes from the draws' own spread.
    """
    s = 40_000
    layer = _layer(family, estimator=estimator)
    _randomise(layer)
    x = torch.randn(3, IN)
    mean, cov = _exact_moments(layer, x)
    with torch.no_grad(), weight_samples(layer, s):
        y = layer(x.expand(s, *x.shape))
    dev = y - mean
    checks = 15
    var = cov.diagonal(0, -2, -1)
    assert (dev.mean(0).abs() <= mean_tolerance(var, s, checks)).all()
    second = dev * dev
    tol = z_bound(checks) * second.std(0) / math.sqrt(s)
    assert ((second.mean(0) - var).abs() <= tol).all()
    cross = dev[..., 0] * dev[..., 1]
    tol = z_bound(checks) * cross.std(0) / math.sqrt(s)
    assert ((cross.mean(0) - cov[:, 0, 1]).abs() <= tol).all()


@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_gradients_reach_every_parameter(family: str, estimator: str) -> None:
    layer = _layer(family, cls=varlin.LinearVariationalNormal, estimator=estimator)
    _randomise(layer)
    y, kl = layer(torch.randn(6, IN))
    ((y**2).sum() + kl).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        used = p.grad.tril(-1) if "offdiag" in name else p.grad
        assert used.abs().sum() > 0, name
        if "offdiag" in name:  # the upper triangle is not part of L: no gradient
            assert torch.equal(p.grad.triu(), torch.zeros_like(p.grad))


def test_radial_flipout_reuses_one_direction_per_call() -> None:
    """Flipout's pairs of examples share the perturbation up to signs: |y - mean| is the same
    for two identical inputs in one call whenever their signs agree, and the sign flips are
    random (not all identical)."""
    layer = _layer("radial", estimator="flipout", out_features=1, bias=False)
    _randomise(layer)
    x = torch.randn(1, IN).expand(400, IN)
    with torch.no_grad():
        dev = (layer(x) - x @ layer.w_loc).squeeze(-1)
    # Each example's deviation is sum_i x_i r_ni dW_i s_n: with 3 inputs, at most 2^3 values of
    # |dev| in one call (the sign patterns), never 400 distinct ones.
    assert torch.unique(dev.abs().round(decimals=5)).numel() <= 8
    assert (dev > 0).any() and (dev < 0).any()


# -- state, dtype, compile ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_and_dtype_moves(family: str, tmp_path: Any) -> None:
    layer = _layer(family, cls=varlin.LinearVariationalNormal,
                   make_weights_prior=varlin.priors.normal(0.5))  # fmt: skip
    _randomise(layer)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = _layer(family, cls=varlin.LinearVariationalNormal,
                   make_weights_prior=varlin.priors.normal(0.5), seed=5)  # fmt: skip
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, IN)
    layer.generator.manual_seed(1)
    fresh.generator.manual_seed(1)
    y1, kl1 = layer(x)
    y2, kl2 = fresh(x)
    assert torch.equal(y1, y2) and torch.equal(kl1, kl2)
    layer.double()
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(t.dtype == torch.float64 for t in tensors)
    layer.generator = None
    y, kl = layer(x.double())
    assert y.dtype == torch.float64 and kl.dtype == torch.float64
    torch.testing.assert_close(kl.float(), kl1, rtol=1e-5, atol=1e-6)
    layer.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in list(layer.parameters()) + list(layer.buffers()))


def test_the_family_classes_are_public_and_registered() -> None:
    assert set(posteriors.FAMILIES) == {"meanfield", "lowrank", "matrix_normal", "full", "radial"}
    for name, cls in posteriors.FAMILIES.items():
        assert issubclass(cls, posteriors.Family) and cls.name == name
        assert set(cls.estimators) <= set(functional.ESTIMATORS)


# -- prediction, the closed-form ELBO, conversion -------------------------------------------------


@pytest.mark.parametrize("family", GAUSSIAN)
def test_closed_form_predict_is_the_exact_predictive_with_output_covariance(
    family: str, float64: Any
) -> None:
    """A Bayesian last layer with each Gaussian family: ``method="closed_form"`` equals the dense
    route, covariance across outputs included (plus the noise on the diagonal)."""
    features = nn.Sequential(nn.Linear(4, IN), nn.Tanh())
    model = varlin.bayesian_last_layer(features, IN, OUT, **FAMILIES[family])
    _randomise(model[-1])
    likelihood = varlin.likelihoods.Gaussian(0.3)
    x = torch.randn(6, 4)
    pred = varlin.predict(model, x, likelihood=likelihood, method="closed_form")
    with torch.no_grad():
        mean, cov = _exact_moments(model[-1], features(x))
    torch.testing.assert_close(pred.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.epistemic, cov.diagonal(0, -2, -1), rtol=1e-10, atol=1e-12)
    if family in CORRELATED:
        total = cov + 0.09 * torch.eye(OUT)
        torch.testing.assert_close(pred.covariance, total, rtol=1e-10, atol=1e-12)
    else:
        assert pred.covariance is None and pred.epistemic_covariance is None
    assert varlin.predict(model, x, likelihood=likelihood).mean.equal(pred.mean)  # auto


def test_closed_form_needs_a_gaussian_head_and_auto_falls_back_to_monte_carlo() -> None:
    model = varlin.bayesian_last_layer(nn.Identity(), IN, 1, posterior="radial")
    x = torch.randn(5, IN)
    with pytest.raises(ValueError, match="needs a Gaussian posterior on the head, got "
                       "posterior='radial'; use method='mc'"):  # fmt: skip
        varlin.predict(model, x, method="closed_form")
    pred = varlin.predict(model, x, num_samples=8)
    assert pred.sample_means is not None and pred.sample_means.shape == (8, 5)


@pytest.mark.usefixtures("single_thread")
def test_a_full_head_trained_on_a_gaussian_model_predicts_like_bayesian_linear_regression(
    float64: Any,
) -> None:
    """The GLM-style exact predictive: ``bayesian_last_layer(posterior="full")`` trained on the
    closed-form ELBO of features h(x) gives ``BayesianLinearRegression([h, 1])``'s predictive."""
    g = torch.Generator().manual_seed(0)
    features = nn.Sequential(nn.Linear(2, IN), nn.Tanh())
    x = torch.randn(60, 2, generator=g)
    with torch.no_grad():
        h = features(x)
        y = h @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.2 * torch.randn(60, generator=g)
    model = varlin.bayesian_last_layer(features, IN, 1, posterior="full", init_scale=0.1,
                                       make_weights_prior=varlin.priors.normal(1.5),
                                       make_bias_prior=varlin.priors.normal(1.5))  # fmt: skip
    likelihood = varlin.likelihoods.Gaussian(0.2)
    head = model[-1]
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        elbo = varlin.ELBO(likelihood, num_data=60)
        loss = elbo(head.output_moments(h), y, head.kl_divergence())
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[arg-type]
    design = torch.cat([h, torch.ones(60, 1)], -1)
    exact = varlin.BayesianLinearRegression(prior_scale=1.5, noise_scale=0.2).fit(design, y)
    x_new = torch.randn(7, 2, generator=g)
    with torch.no_grad():
        reference = exact.predict(torch.cat([features(x_new), torch.ones(7, 1)], -1))
    pred = varlin.predict(model, x_new, likelihood=likelihood)
    torch.testing.assert_close(pred.mean, reference.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.variance, reference.variance, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("family", "estimator"), CASES)
def test_monte_carlo_predict_works_for_every_family(
    family: str, estimator: str, float64: Any
) -> None:
    """``predict(method="mc")``: one batched pass of S = 20 000 independent posterior draws; the
    predictive mean and epistemic variance match the exact moments (tolerances from the draws'
    spread, rate 1e-6 over 2 x 3 x 2 checks)."""
    s = 20_000
    layer = _layer(family, estimator=estimator)
    _randomise(layer)
    x = torch.randn(3, IN)
    pred = varlin.predict(layer, x, num_samples=s, method="mc")
    assert pred.sample_means is not None
    mean, cov = _exact_moments(layer, x)
    var = cov.diagonal(0, -2, -1)
    assert ((pred.mean - mean).abs() <= mean_tolerance(var, s, 12)).all()
    second = (pred.sample_means - mean).square()
    tol = z_bound(12) * second.std(0) / math.sqrt(s)
    assert ((second.mean(0) - var).abs() <= tol).all()


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", CORRELATED)
def test_closed_form_elbo_takes_correlated_outputs(family: str, float64: Any) -> None:
    """``Gaussian.expected_log_prob`` of a multivariate output distribution equals the Monte
    Carlo mean of the log-likelihood over 100 000 output draws (rate 1e-6 per example)."""
    layer = _layer(family)
    _randomise(layer)
    x, y = torch.randn(4, IN), torch.randn(4, OUT)
    likelihood = varlin.likelihoods.Gaussian(0.5)
    with torch.no_grad():
        dist = layer.output_moments(x)
        exact = likelihood.expected_log_prob(dist, y)
        draws = dist.sample((100_000,))
        log_lik = Normal(draws, 0.5).log_prob(y).sum(-1)
    tol = z_bound(4) * log_lik.std(0) / math.sqrt(100_000)
    assert ((log_lik.mean(0) - exact).abs() <= tol).all()


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("family", GAUSSIAN + ["radial"])
def test_to_variational_builds_every_family_from_the_weights(family: str) -> None:
    net = _net()
    bnn = varlin.to_variational(net, **FAMILIES[family])
    layers = list(varlin.variational_layers(bnn))
    assert len(layers) == 2
    assert all(layer.posterior_name == FAMILIES[family]["posterior"] for layer in layers)
    x = torch.randn(5, 2, dtype=torch.float64)
    with varlin.deterministic(bnn):
        assert torch.equal(bnn(x), net(x))
    assert torch.isfinite(bnn(x)).all()


@pytest.mark.parametrize("family", ["meanfield", "lowrank", "full", "radial"])
def test_moped_sets_every_weights_scale_for_the_families_that_have_one(family: str) -> None:
    """sigma = max(delta |w|, sigma_min) per weight and bias; the low-rank factors start with at
    most 1e-4 of each variance (so the std is within 5e-5 of the target)."""
    net = _net()
    bnn = varlin.to_variational(net, init_scale="moped", moped_delta=0.2, **FAMILIES[family])
    for layer, linear in zip(varlin.variational_layers(bnn), (net[0], net[2]), strict=True):
        for scale, weight in ((layer.w_scale, linear.weight.T), (layer.b_scale, linear.bias)):
            target = (0.2 * weight.detach().abs()).clamp_min(varlin.convert.MOPED_MIN_SCALE)
            rtol = 6e-5 if family == "lowrank" else 1e-12
            torch.testing.assert_close(scale.detach(), target, rtol=rtol, atol=0)


def test_moped_refuses_the_matrix_normal_and_leaves_the_model_alone() -> None:
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="posterior='matrix_normal' cannot set one scale per"):
        varlin.to_variational_(net, init_scale="moped", posterior="matrix_normal")
    assert all(isinstance(m, (nn.Linear, nn.Tanh)) for m in net)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_to_variational_reports_a_rank_too_large_for_a_layer() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[1, 18\] .* 2 x 6 layer\), got 20"):
        varlin.to_variational(_net(), posterior="lowrank", rank=20)
