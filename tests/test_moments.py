r"""Moment propagation (``varlin.moments``): closed forms, a dense second route, Monte Carlo.

- The activation rules against numerical integration (scipy's ``quad``, float64), including the
  cases where Wu et al.'s ReLU covariance is exact.
- Every family's random-input moments against a dense second route (the Kronecker form of
  ``x @ W`` with the family's dense covariance), to 1e-10.
- Whole networks against Monte Carlo over 10**6 weight samples (float64, weights drawn by the
  families' ``rsample_weights``, the forward pass written out here): exact to Monte Carlo error
  where the rules are exact (one variational layer; a variational layer after a ReLU of
  independent Gaussians; dropout between layers), within a stated relative error for
  2-hidden-layer ReLU networks, where ``"full"`` must beat ``"diagonal"``.

Statistical tests fail a correct implementation with probability ``conftest.FAILURE_RATE``
(Bonferroni over the checks of a test); the standard error of a sample variance is estimated from
the sample's fourth moment (the outputs of a network are not Gaussian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import FAILURE_RATE, z_bound
from scipy import integrate
from scipy.stats import norm
from scipy.stats import t as student
from test_families import FAMILIES, _randomise
from torch import Tensor, nn
from torch.distributions import MultivariateNormal, Normal

import varlin
from varlin import moments
from varlin.moments import propagate

F64 = torch.float64
MC_SAMPLES = 10**6
CHUNK = 2 * 10**5


# -- Monte Carlo over weight samples ---------------------------------------------------------------
def _forward_samples(net: nn.Module, h: Tensor, n: int) -> Tensor:
    """``n`` independent passes ``(n, N, out)``: each variational layer draws ``n`` weight
    samples from its family (``rsample_weights``); other modules run as they are."""
    for module in net:
        if isinstance(module, varlin.layers.BayesianLinearBase):
            w, b = module.w_posterior.rsample_weights(module._realise(), (n,))
            h = h @ w if h.dim() == 3 else torch.einsum("ni,sio->sno", h, w)
            if b is not None:
                h = h + b.unsqueeze(-2)
        else:
            h = module(h)
    return h


class _Sums:
    """Running raw moments of the outputs ``(n, N, D)``: mean, covariance, and the standard
    errors of the mean and of the variance (from the fourth central moment)."""

    def __init__(self) -> None:
        self.count = 0
        self.power: list[Tensor] = []
        self.cross: Tensor | None = None

    def add(self, y: Tensor) -> None:
        y2 = y * y
        powers = [y.sum(0), y2.sum(0), (y2 * y).sum(0), (y2 * y2).sum(0)]
        cross = torch.einsum("sni,snj->nij", y, y)
        if not self.power:
            self.power, self.cross = powers, cross
        else:
            self.power = [a + b for a, b in zip(self.power, powers, strict=True)]
            assert self.cross is not None
            self.cross = self.cross + cross
        self.count += y.shape[0]

    def moments(self) -> dict[str, Tensor]:
        s = self.count
        m1, m2, m3, m4 = (p / s for p in self.power)
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        assert self.cross is not None
        cov = self.cross / s - m1.unsqueeze(-1) * m1.unsqueeze(-2)
        return {
            "mean": m1,
            "var": var,
            "cov": cov,
            "mean_se": (var / s).sqrt(),
            "var_se": ((central4 - var * var).clamp_min(0) / s).sqrt(),
        }


def _monte_carlo(net: nn.Module, draw_input: Callable[[int], Tensor]) -> dict[str, Tensor]:
    sums = _Sums()
    with torch.no_grad():
        for _ in range(MC_SAMPLES // CHUNK):
            sums.add(_forward_samples(net, draw_input(CHUNK), CHUNK))
    return sums.moments()


def _check_exact(out: Normal | MultivariateNormal, mc: dict[str, Tensor], checks: int) -> None:
    z = z_bound(checks)
    mean_err = (out.mean - mc["mean"]).abs()
    var_err = (out.variance - mc["var"]).abs()
    assert bool((mean_err <= z * mc["mean_se"]).all()), (mean_err / mc["mean_se"]).max()
    assert bool((var_err <= z * mc["var_se"]).all()), (var_err / mc["var_se"]).max()


def _net(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules).to(F64)


# -- activation rules against numerical integration ------------------------------------------------
def _quad(f: Callable[[float], float], mean: float, var: float) -> tuple[float, float]:
    """``(E f(x), Var f(x))`` for ``x ~ N(mean, var)`` by adaptive quadrature."""
    sd = math.sqrt(var)

    def moment(k: int) -> float:
        def integrand(e: float) -> float:
            return f(mean + sd * e) ** k * norm.pdf(e)

        return integrate.quad(integrand, -12, 12, points=[-mean / sd], epsabs=1e-13, limit=200)[0]

    first = moment(1)
    return first, moment(2) - first * first


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


PROBIT = moments.PROBIT_SCALE
GRID = [(-2.0, 0.3), (-0.4, 1.7), (0.0, 1.0), (0.7, 0.05), (1.5, 4.0), (3.0, 0.5)]
FUNCTIONS: dict[str, tuple[Callable[..., Any], Callable[[float], float]]] = {
    "relu": (moments.relu_moments, lambda x: max(x, 0.0)),
    "leaky_relu": (
        lambda m, v: moments.leaky_relu_moments(m, v, 0.1),
        lambda x: x if x > 0 else 0.1 * x,
    ),
    "gelu": (moments.gelu_moments, lambda x: x * norm.cdf(x)),
    # sigmoid and tanh are exact for their probit approximations (the documented rule)
    "sigmoid_probit": (moments.sigmoid_moments, lambda x: norm.cdf(PROBIT * x)),
    "tanh_probit": (moments.tanh_moments, lambda x: 2 * norm.cdf(2 * PROBIT * x) - 1),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_activation_moments_match_quadrature(name: str) -> None:
    rule, f = FUNCTIONS[name]
    mean = torch.tensor([m for m, _ in GRID], dtype=F64)
    var = torch.tensor([v for _, v in GRID], dtype=F64)
    got_mean, got_var = rule(mean, var)[:2]
    for i, (m, v) in enumerate(GRID):
        want_mean, want_var = _quad(f, m, v)
        assert float(got_mean[i]) == pytest.approx(want_mean, abs=1e-10)
        assert float(got_var[i]) == pytest.approx(want_var, abs=1e-10)


@pytest.mark.parametrize(
    ("name", "f", "tolerance"),
    [("sigmoid", _logistic, 0.02), ("tanh", math.tanh, 0.04)],
)
def test_probit_rules_stay_within_their_stated_error_of_the_true_function(
    name: str, f: Callable[[float], float], tolerance: float
) -> None:
    """|sigmoid - Phi(lambda x)| <= 0.018 everywhere bounds the error of the mean (0.036 for
    tanh = 2 sigmoid(2x) - 1); the standard deviations differ by no more."""
    rule = moments.sigmoid_moments if name == "sigmoid" else moments.tanh_moments
    mean = torch.tensor([m for m, _ in GRID], dtype=F64)
    var = torch.tensor([v for _, v in GRID], dtype=F64)
    got_mean, got_var, _ = rule(mean, var)
    for i, (m, v) in enumerate(GRID):
        want_mean, want_var = _quad(f, m, v)
        assert abs(float(got_mean[i]) - want_mean) <= tolerance
        assert abs(math.sqrt(float(got_var[i])) - math.sqrt(want_var)) <= tolerance


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "gelu", "sigmoid_probit", "tanh_probit"])
def test_activation_moments_without_variance_are_the_function(name: str) -> None:
    """A unit with variance 0 (or 1e-300) maps to f(mean) with variance 0: finite values and
    finite gradients, also at mean 0."""
    rule, f = FUNCTIONS[name]
    mean = torch.tensor([-3.0, 0.0, 2.5], dtype=F64, requires_grad=True)
    var = torch.tensor([0.0, 1e-300, 0.0], dtype=F64, requires_grad=True)
    got_mean, got_var = rule(mean, var)[:2]
    expected = [f(m) for m in mean.tolist()]
    assert got_mean.tolist() == pytest.approx(expected, abs=1e-12)
    assert got_var.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    (got_mean.sum() + got_var.sum()).backward()
    assert mean.grad is not None and var.grad is not None
    assert bool(torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all())


def test_relu_variance_keeps_its_digits_far_from_the_kink() -> None:
    """For mean/sd = 1e4 the ReLU is the identity: the variance stays v to float32 precision
    (the textbook E[relu^2] - E[relu]^2 would lose all 8 digits)."""
    mean = torch.tensor([1e4, -1e4], dtype=torch.float32)
    var = torch.tensor([1.0, 1.0], dtype=torch.float32)
    got_mean, got_var = moments.relu_moments(mean, var)
    assert got_mean.tolist() == pytest.approx([1e4, 0.0])
    assert got_var.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def _relu_pair_covariance(m1: float, m2: float, s1: float, s2: float, rho: float) -> float:
    """Cov(relu(x1), relu(x2)) by Price's theorem: s1 s2 int_0^rho Phi2(a1, a2; r) dr."""
    a1, a2 = m1 / s1, m2 / s2
    from scipy.stats import multivariate_normal

    def phi2(r: float) -> float:
        cov = [[1.0, r], [r, 1.0]]
        return float(multivariate_normal(mean=[0, 0], cov=cov).cdf([a1, a2]))

    return s1 * s2 * integrate.quad(phi2, 0.0, rho, epsabs=1e-10)[0]


def test_relu_covariance_exact_where_wu_et_al_is_exact() -> None:
    """Zero means (the arc-cosine kernel) and zero correlation: exact."""
    rho = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.99], dtype=F64)
    for r in rho.tolist():
        cov = torch.tensor([[1.0, r], [r, 1.0]], dtype=F64) * 2.0
        _, out = moments.relu_covariance(torch.zeros(2, dtype=F64), cov)
        root = math.sqrt(1 - r * r)
        kernel = (r * math.pi / 2 + r * math.asin(r) + root - 1) / (2 * math.pi)
        assert float(out[0, 1]) == pytest.approx(2.0 * kernel, abs=1e-6 * 2)
    _, out = moments.relu_covariance(
        torch.tensor([0.3, -1.2], dtype=F64), torch.diag(torch.tensor([0.5, 2.0], dtype=F64))
    )
    assert float(out[0, 1]) == 0.0


def test_relu_covariance_approximation_error_is_small() -> None:
    """Away from the exact cases, against Price's integral (scipy): within 2% of the
    product of the output standard deviations (measured: at most 0.6% on this grid)."""
    cases = [(0.5, -0.3, 1.0, 1.3, 0.6), (1.5, 1.0, 0.7, 1.2, -0.5), (-1.0, 0.8, 1.0, 1.0, 0.9)]
    for m1, m2, s1, s2, r in cases:
        mean = torch.tensor([m1, m2], dtype=F64)
        cov = torch.tensor([[s1 * s1, r * s1 * s2], [r * s1 * s2, s2 * s2]], dtype=F64)
        _, out = moments.relu_covariance(mean, cov)
        want = _relu_pair_covariance(m1, m2, s1, s2, r)
        scale = math.sqrt(float(out[0, 0] * out[1, 1]))
        assert abs(float(out[0, 1]) - want) <= 0.02 * scale, (m1, m2, r, float(out[0, 1]), want)


# -- family moments for random inputs: a dense second route ---------------------------------
def _dense_route(
    layer: varlin.layers.BayesianLinearBase, mean: Tensor, cov: Tensor
) -> tuple[Tensor, Tensor]:
    """E[y], Cov(y) of y = x~ W~ from the dense covariance of theta = vec([W; b]) (row-major):
    Cov(y) = sum_il S_il Cov(W~_i., W~_l.) + M^T C M with S = E[x~ x~^T]."""
    family = layer.w_posterior
    theta_mean, theta_cov = family.dense(layer._realise())
    rows = theta_mean.numel() // layer.out_features
    w_mean = theta_mean.reshape(rows, layer.out_features)
    blocks = theta_cov.reshape(rows, layer.out_features, rows, layer.out_features)
    aug_mean = torch.cat([mean, torch.ones(mean.shape[:-1] + (1,), dtype=F64)], -1)[..., :rows]
    aug_cov = torch.zeros(mean.shape[:-1] + (rows, rows), dtype=F64)
    aug_cov[..., : mean.shape[-1], : mean.shape[-1]] = cov
    second = aug_cov + aug_mean.unsqueeze(-1) * aug_mean.unsqueeze(-2)
    out_mean = aug_mean @ w_mean
    out_cov = torch.einsum("...il,ijlk->...jk", second, blocks) + w_mean.mT @ aug_cov @ w_mean
    return out_mean, out_cov


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_random_input_moments_match_the_dense_route(family: str, bias: bool) -> None:
    layer = varlin.VariationalLinear(4, 3, bias=bias, dtype=F64, **FAMILIES[family])
    _randomise(layer)
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(5, 4, generator=g, dtype=F64)
    root = torch.randn(5, 4, 4, generator=g, dtype=F64)
    cov = root @ root.mT / 4
    t = layer._realise()
    want_mean, want_cov = _dense_route(layer, mean, cov)
    got_mean, got_cov = layer.w_posterior.output_moments_random(mean, cov, t, covariance="full")
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_cov, want_cov, rtol=1e-10, atol=1e-10)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    _, want_diag_cov = _dense_route(layer, mean, torch.diag_embed(diag))
    got_mean, got_var = layer.w_posterior.output_moments_random(mean, diag, t)
    torch.testing.assert_close(got_var, torch.diagonal(want_diag_cov, dim1=-2, dim2=-1))
    # variances under "full": the covariance of uncorrelated inputs, without forming it
    _, got_cov = layer.w_posterior.output_moments_random(mean, diag, t, covariance="full")
    torch.testing.assert_close(got_cov, want_diag_cov, rtol=1e-10, atol=1e-10)
    # a fixed input: the output distribution's own moments
    fixed_mean, fixed_var = layer.w_posterior.output_moments_random(mean, None, t)
    _, want_fixed = _dense_route(layer, mean, torch.zeros_like(cov))
    torch.testing.assert_close(fixed_var, torch.diagonal(want_fixed, dim1=-2, dim2=-1))


# -- networks against Monte Carlo over 10**6 weight samples ---------------------------------------
def _randomised_layer(family: str, n_in: int, n_out: int, seed: int) -> nn.Module:
    layer = varlin.VariationalLinear(n_in, n_out, dtype=F64, **FAMILIES[family])
    _randomise(layer, seed)
    return layer


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_variational_layer_is_exact(family: str) -> None:
    net = _net(_randomised_layer(family, 3, 2, seed=1))
    x = torch.randn(4, 3, dtype=F64)
    mc = _monte_carlo(net, lambda n: x)
    _check_exact(propagate(net, x), mc, checks=2 * 2 * 8)
    full = propagate(net, x, covariance="full")
    _check_exact(full, mc, checks=2 * 2 * 8)
    # sd of a sample covariance <= sd1 sd2 sqrt(3 / S) (Cauchy-Schwarz on the 4th moment)
    bound = z_bound(4) * (mc["var"].prod(-1) * 3 / MC_SAMPLES).sqrt()
    assert bool(((full.covariance_matrix[:, 0, 1] - mc["cov"][:, 0, 1]).abs() <= bound).all())


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", ["meanfield", "lowrank"])
def test_variational_layer_after_a_relu_of_gaussian_inputs_is_exact(family: str) -> None:
    """Independent Gaussian inputs -> ReLU -> variational layer: every rule on the way is exact
    (the ReLU's units stay independent, the layer needs only their first two moments)."""
    net = _net(nn.ReLU(), _randomised_layer(family, 3, 2, seed=2))
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(4, 3, generator=g, dtype=F64)
    scale = 0.5 + torch.rand(4, 3, generator=g, dtype=F64)
    mc = _monte_carlo(net, lambda n: loc + scale * torch.randn(n, 4, 3, dtype=F64))
    for covariance in ("diagonal", "full"):
        out = propagate(net, Normal(loc, scale), covariance=covariance)
        _check_exact(out, mc, checks=2 * 2 * 8)


@pytest.mark.usefixtures("single_thread")
def test_dropout_in_training_mode_is_exact() -> None:
    """Variational layer -> dropout (training mode, independent masks) -> variational layer:
    the dropped units stay independent, and dropout's moment rule is exact."""
    net = _net(
        _randomised_layer("meanfield", 3, 5, seed=3),
        nn.Dropout(0.3),
        _randomised_layer("meanfield", 5, 2, seed=4),
    )
    x = torch.randn(4, 3, dtype=F64)
    mc = _monte_carlo(net, lambda n: x)
    _check_exact(propagate(net, x), mc, checks=2 * 8)
    net.eval()  # in eval mode dropout is the identity: no extra variance
    with torch.no_grad():
        plain = propagate(_net(net[0], net[2]), x)
    torch.testing.assert_close(propagate(net, x).variance, plain.variance)


#: Stated error of the 2-hidden-layer ReLU networks below (measured: mean within 1% of the
#: output's standard deviation, variances within 2% ("full"); "diagonal" 3-20% off).
DEEP_MEAN_ERROR = 0.03
DEEP_FULL_VARIANCE_ERROR = 0.05


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("seed", [0, 1])
def test_two_hidden_layer_relu_networks(seed: int) -> None:
    torch.manual_seed(seed)
    layers = [varlin.VariationalLinear(a, b, init_scale=0.1) for a, b in ((2, 6), (6, 6), (6, 2))]
    with torch.no_grad():
        for layer in layers:  # larger means: the hidden units' correlations reach the output
            layer.w_loc.mul_(2.0)
    net = _net(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    x = torch.randn(4, 2, dtype=F64)
    mc = _monte_carlo(net, lambda n: x)
    sd = mc["var"].sqrt()
    diagonal = propagate(net, x, covariance="diagonal")
    full = propagate(net, x, covariance="full")
    z = z_bound(4 * 8)
    for out in (diagonal, full):
        mean_err = (out.mean - mc["mean"]).abs()
        assert bool((mean_err <= DEEP_MEAN_ERROR * sd + z * mc["mean_se"]).all())
    full_var_err = (full.variance - mc["var"]).abs()
    assert bool((full_var_err <= DEEP_FULL_VARIANCE_ERROR * mc["var"] + z * mc["var_se"]).all())
    # "full" is closer to the Monte Carlo covariance than "diagonal", entry by entry of the
    # variances' total and as matrices (Frobenius norm), on every example
    diag_var_err = (diagonal.variance - mc["var"]).abs()
    assert bool((full_var_err.sum(-1) < diag_var_err.sum(-1)).all())
    full_cov = full.covariance_matrix
    diag_cov = torch.diag_embed(diagonal.variance)
    full_fro = (full_cov - mc["cov"]).norm(dim=(-2, -1))
    diag_fro = (diag_cov - mc["cov"]).norm(dim=(-2, -1))
    assert bool((full_fro < diag_fro).all())


# -- other activations between two variational layers ---------------------------------------------
#: The probit approximation's error: |sigmoid(x) - Phi(lambda x)| <= 0.018 for every x (0.036 for
#: tanh), so each hidden unit's mean is off by at most that, and the output mean by that times
#: sum_i |M_ij|. The variances have no such bound; measured within 3% on these networks, stated 10%.
PROBIT_MEAN_ERROR = {"sigmoid": 0.018, "tanh": 0.036}
PROBIT_VARIANCE_ERROR = 0.10


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "sigmoid", "tanh"])
def test_activation_between_two_mean_field_layers(activation: str) -> None:
    """Fixed x -> mean-field layer -> activation -> mean-field layer: the hidden units are
    independent (the weight columns are), so the rules of ReLU, LeakyReLU and GELU make the
    output moments exact; sigmoid and tanh are off by at most their probit error."""
    modules = {
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(0.2),
        "gelu": nn.GELU(),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
    }
    first = _randomised_layer("meanfield", 3, 4, seed=6)
    second = _randomised_layer("meanfield", 4, 2, seed=7)
    net = _net(first, modules[activation], second)
    x = 0.5 * torch.randn(4, 3, dtype=F64)
    mc = _monte_carlo(net, lambda n: x)
    for covariance in ("diagonal", "full"):
        out = propagate(net, x, covariance=covariance)
        if activation not in PROBIT_MEAN_ERROR:
            _check_exact(out, mc, checks=2 * 2 * 8)
            continue
        z = z_bound(2 * 2 * 8)
        bound = PROBIT_MEAN_ERROR[activation] * second.w_loc.abs().sum(0)
        assert bool(((out.mean - mc["mean"]).abs() <= bound + z * mc["mean_se"]).all())
        var_err = (out.variance - mc["var"]).abs()
        assert bool((var_err <= PROBIT_VARIANCE_ERROR * mc["var"] + z * mc["var_se"]).all())


# -- deterministic modules, modes and layers -----------------------------------------------------
def test_deterministic_linear_carries_the_input_covariance() -> None:
    g = torch.Generator().manual_seed(8)
    linear = nn.Linear(3, 2, dtype=F64)
    loc = torch.randn(5, 3, generator=g, dtype=F64)
    root = torch.randn(5, 3, 3, generator=g, dtype=F64)
    cov = root @ root.mT + 0.1 * torch.eye(3, dtype=F64)
    full = propagate(linear, MultivariateNormal(loc, cov), covariance="full")
    want = linear.weight @ cov @ linear.weight.T
    torch.testing.assert_close(full.mean, linear(loc))
    torch.testing.assert_close(full.covariance_matrix, want)
    diag = propagate(linear, MultivariateNormal(loc, cov))  # the correlations are dropped
    dropped = linear.weight.square() @ torch.diagonal(cov, dim1=-2, dim2=-1).unsqueeze(-1)
    torch.testing.assert_close(diag.variance, dropped.squeeze(-1))


def test_identity_flatten_and_eval_dropout_pass_moments_through() -> None:
    layer = _randomised_layer("lowrank", 3, 2, seed=9)
    x = torch.randn(4, 3, dtype=F64)
    plain = _net(layer)
    dressed = _net(nn.Identity(), nn.Flatten(), nn.Dropout(0.5), layer, nn.Identity()).eval()
    for covariance in ("diagonal", "full"):
        a = propagate(plain, x, covariance=covariance)
        b = propagate(dressed, x, covariance=covariance)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)


def test_inside_deterministic_the_output_is_the_mean_network() -> None:
    net = _net(
        _randomised_layer("full", 3, 4, seed=10),
        nn.ReLU(),
        _randomised_layer("radial", 4, 2, seed=12),
    )
    x = torch.randn(5, 3, dtype=F64)
    with varlin.deterministic(net):
        out = propagate(net, x)
        full = propagate(net, x, covariance="full")
        want = net(x)
    torch.testing.assert_close(out.mean, want)
    assert float(out.variance.max()) < 1e-150
    torch.testing.assert_close(full.mean, want)


def test_the_seed_layer_propagates_as_its_output_moments() -> None:
    layer = varlin.LinearVariationalNormal(3, 2, dtype=F64)
    _randomise(layer)
    x = torch.randn(6, 3, dtype=F64)
    out = propagate(layer, x)
    want = layer.output_moments(x)
    torch.testing.assert_close(out.mean, want.mean)
    torch.testing.assert_close(out.variance, want.variance)


def test_propagation_is_differentiable_and_deterministic() -> None:
    net = _net(
        _randomised_layer("meanfield", 3, 4, seed=11),
        nn.Tanh(),
        _randomised_layer("lowrank", 4, 1, seed=13),
    )
    x = torch.randn(5, 3, dtype=F64)
    grads = []
    for _ in range(2):
        net.zero_grad()
        out = propagate(net, x, covariance="full")
        (out.mean.sum() + out.variance.sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(list(net.parameters()))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


# -- bad input ------------------------------------------------------------------------------------
class _Custom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (nn.Softmax(-1), "Softmax"),
        (nn.Conv1d(1, 1, 1), "Conv1d"),
        (varlin.VariationalConv1d(1, 1, 1), "VariationalConv1d"),
        (_Custom(), "_Custom"),
    ],
)
def test_unsupported_modules_are_named(module: nn.Module, name: str) -> None:
    net = nn.Sequential(varlin.VariationalLinear(3, 3), module)
    with pytest.raises(TypeError, match=rf"no moment rule for {name}; supported: nn.Sequential"):
        propagate(net, torch.randn(2, 3))


def test_bad_arguments_get_one_line_errors() -> None:
    net = nn.Sequential(varlin.VariationalLinear(3, 2))
    x = torch.randn(4, 3)
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: propagate(nn.Sequential(nn.Linear(3, 2)), x), ValueError, "no variational layer"),
        (lambda: propagate(net, x, covariance="dense"), ValueError, "covariance"),
        (lambda: propagate(net, x.numpy()), TypeError, "x must be a tensor"),
        (lambda: propagate(net, torch.randn(4, 5)), ValueError, "in_features"),
        (lambda: propagate(net, x.double()), (TypeError, ValueError), "dtype"),
        (lambda: propagate("net", x), TypeError, "model must be a torch.nn.Module"),  # type: ignore[arg-type]
        (
            lambda: propagate(nn.Sequential(nn.GELU("tanh"), *net), x),
            ValueError,
            "approximate='none'",
        ),
        (
            lambda: propagate(
                nn.Sequential(nn.Flatten(), *net),
                MultivariateNormal(torch.zeros(4, 1, 3), torch.eye(3)),
                covariance="full",
            ),
            ValueError,
            "covariance='diagonal'",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    # independent inputs are flattened under "full" too (their covariance is diagonal)
    flat = propagate(
        nn.Sequential(nn.Flatten(), *net),
        Normal(torch.zeros(4, 1, 3), torch.ones(4, 1, 3)),
        covariance="full",
    )
    assert flat.covariance_matrix.shape == (4, 2, 2)
    # input noise through a model without variational layers is allowed
    out = propagate(nn.Sequential(nn.Linear(3, 2)), Normal(x, torch.ones_like(x)))
    assert bool((out.variance > 0).all())


# -- the moment ELBO: deterministic gradients, the mean of Monte Carlo ones -----------------------
def _elbo_case(case: str) -> tuple[nn.Module, varlin.likelihoods.Likelihood, str]:
    """Networks whose propagated output law gives the exact expected log-likelihood:

    - ``"gaussian"``: mean-field layer -> ReLU -> mean-field layer, learned noise: the Gaussian
      likelihood needs only the output's mean and variance, which are exact here;
    - ``"heteroscedastic"``: one low-rank layer with outputs (mean, raw scale): exactly jointly
      Gaussian and correlated, carried by ``covariance="full"``; the expectation over the raw
      scale is Gauss-Hermite (32 nodes, exact to ~1e-10 here).
    """
    if case == "gaussian":
        net = _net(
            _randomised_layer("meanfield", 3, 5, seed=14),
            nn.ReLU(),
            _randomised_layer("meanfield", 5, 1, seed=15),
        )
        lik = varlin.likelihoods.Gaussian(0.7, learn_noise=True, dtype=F64)
        return net, lik, "diagonal"
    net = _net(_randomised_layer("lowrank", 3, 2, seed=16))
    with torch.no_grad():
        net[0].w_posterior.loc[..., 1] -= 1.0  # raw scales around softplus(-1) = 0.31
    return net, varlin.likelihoods.HeteroscedasticGaussian(), "full"


def _moment_loss(net: nn.Module, elbo: varlin.ELBO, x: Tensor, y: Tensor, cov: str) -> Tensor:
    return elbo(propagate(net, x, covariance=cov), y, varlin.kl_divergence(net))


def _grads(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", ["gaussian", "heteroscedastic"])
def test_moment_elbo_gradient_is_deterministic_and_the_mean_of_monte_carlo_gradients(
    case: str,
) -> None:
    """Two calls give bit-identical gradients; they equal the mean of Monte Carlo ELBO gradients
    (reparameterized weight samples, ``rsample_weights``) to Monte Carlo error: 64 batches of
    2,000 samples, each batch's mean gradient an i.i.d. draw, compared by a t statistic (63
    degrees of freedom) at a 1e-6 failure rate, Bonferroni over the parameters."""
    net, lik, cov = _elbo_case(case)
    x = torch.randn(6, 3, dtype=F64)
    y = torch.randn(6, dtype=F64)
    elbo = varlin.ELBO(lik, num_data=50)
    params = [*net.parameters(), *lik.parameters()]
    first = _grads(_moment_loss(net, elbo, x, y, cov), params)
    second = _grads(_moment_loss(net, elbo, x, y, cov), params)
    assert torch.equal(first, second)

    batches, size = 64, 2000
    draws = []
    for _ in range(batches):
        out = _forward_samples(net, x, size)  # (S, N, out), differentiable in the parameters
        loss = elbo(out, y, varlin.kl_divergence(net), samples=True)
        draws.append(_grads(loss, params))
    mc = torch.stack(draws)
    se = mc.std(0) / math.sqrt(batches)
    bound = student.ppf(1 - FAILURE_RATE / (2 * first.numel()), batches - 1)
    err = (first - mc.mean(0)).abs()
    # (+1e-9 for rounding, should an entry have no Monte Carlo spread)
    assert bool((err <= bound * se + 1e-9).all()), (err / se).max()
    # the check has power: the plug-in loss at the mean weights has other gradients
    with varlin.deterministic(net):
        plug = _grads(elbo(net(x), y, varlin.kl_divergence(net)), params)
    assert bool(((plug - mc.mean(0)).abs() > bound * se).any())
