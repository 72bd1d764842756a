"""Tests for varlin.layers: the seed's contract, VariationalLinear, deterministic(), estimators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import mean_tolerance, variance_tolerance
from torch import nn
from torch.distributions import Normal

import varlin
from varlin import functional
from varlin.layers import BayesianLinearBase, weight_samples

ESTIMATORS = ["reparameterization", "local", "flipout"]
LAYERS = [varlin.LinearVariationalNormal, varlin.VariationalLinear]
IN, OUT = 3, 4


def _y(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output tensor of either layer class (the seed's returns ``(y, kl)``)."""
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def _randomise(module: nn.Module, scale_low: float = 0.2) -> None:
    """Distinct means and non-trivial scales so a wrong formula shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("raw_scale"):
                p.copy_(functional.inverse_softplus(scale_low + torch.rand_like(p)))
            else:
                p.copy_(torch.randn_like(p))


# -- shapes and the public surface -----------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_output_shapes(
    cls: type[BayesianLinearBase], estimator: str, batch_shape: tuple[int, ...], bias: bool
) -> None:
    layer = cls(IN, OUT, bias=bias, estimator=estimator)
    x = torch.randn(*batch_shape, IN)
    out = layer(x)
    if cls is varlin.LinearVariationalNormal:
        assert isinstance(out, tuple) and len(out) == 2
        y, kl = out
        assert kl.shape == ()
    else:
        assert isinstance(out, torch.Tensor)
        y = out
    assert y.shape == (*batch_shape, OUT)
    assert torch.isfinite(y).all()


def test_weights_are_in_by_out() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT)
    assert layer.w_loc.shape == (IN, OUT) and layer.w_scale.shape == (IN, OUT)
    assert layer.b_loc is not None and layer.b_loc.shape == (OUT,)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_posteriors_are_normals_of_the_right_batch_shape(cls: type[BayesianLinearBase]) -> None:
    layer = cls(IN, OUT)
    q_w, q_b = layer.weight_posterior(), layer.bias_posterior()
    assert isinstance(q_w, Normal) and q_w.batch_shape == (IN, OUT)
    assert isinstance(q_b, Normal) and q_b.batch_shape == (OUT,)
    assert q_w.loc is layer.w_loc
    torch.testing.assert_close(q_w.scale, TF.softplus(layer.w_posterior.raw_scale))
    # The posterior is a live view of the parameters: gradients reach them through it.
    q_w.rsample().sum().backward()
    assert layer.w_posterior.raw_scale.grad is not None


def test_no_bias() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT, bias=False)
    assert layer.bias_posterior() is None and layer.bias_prior() is None
    assert layer.b_loc is None and layer.b_scale is None
    assert {n for n, _ in layer.named_parameters()} == {"w_posterior.loc", "w_posterior.raw_scale"}
    assert not any(k.startswith("b_") for k in layer.state_dict())
    x = torch.randn(5, IN)
    with varlin.deterministic(layer):
        y, kl = layer(x)
    assert torch.equal(y, x @ layer.w_loc)
    torch.testing.assert_close(
        kl,
        torch.distributions.kl_divergence(layer.weight_posterior(), layer.weight_prior()).sum(),
    )


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_kl_divergence_is_unweighted_and_0_dim(cls: type[BayesianLinearBase]) -> None:
    layer = cls(IN, OUT)
    kl = layer.kl_divergence()
    assert kl.shape == ()
    assert kl > 0
    if cls is varlin.LinearVariationalNormal:
        _, weighted = layer(torch.randn(2, IN), kl_weight=0.25)
        assert torch.equal(weighted, 0.25 * kl)
        _, unit = layer(torch.randn(2, IN))
        assert torch.equal(unit, kl)


def test_extra_repr() -> None:
    layer = varlin.VariationalLinear(IN, OUT, bias=False, estimator="flipout")
    text = repr(layer)
    assert "in_features=3, out_features=4, bias=False, estimator='flipout'" in text
    assert "VariationalLinear(" in text
    assert "init_scale=0.01" in repr(varlin.LinearVariationalNormal(IN, OUT))


@pytest.mark.parametrize("init_scale", [1e-3, 0.05, 1.0])
def test_reset_parameters(init_scale: float) -> None:
    """Means like nn.Linear (U(+-1/sqrt(in)) for weight and bias), scales back to init_scale."""
    layer = varlin.LinearVariationalNormal(16, 64, init_scale=init_scale)
    _randomise(layer, scale_low=2.0)
    layer.reset_parameters()
    bound = 1 / math.sqrt(16)
    assert layer.b_loc is not None and layer.b_scale is not None
    for loc in (layer.w_loc, layer.b_loc):
        assert loc.abs().max() <= bound
        assert loc.abs().max() > 0.8 * bound  # 64+ uniforms: P(all inside 0.8 b) < 0.8^64 ~ 6e-7
    torch.testing.assert_close(layer.w_scale, torch.full((16, 64), init_scale))
    torch.testing.assert_close(layer.b_scale, torch.full((64,), init_scale))
    linear = nn.Linear(16, 64)
    assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound


def test_unknown_constructor_kwargs_raise_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument.*init_sclae"):
        varlin.LinearVariationalNormal(IN, OUT, init_sclae=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument.*foo"):
        varlin.VariationalLinear(IN, OUT, foo=1)


def test_unknown_forward_kwargs_raise_type_error() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT)
    with pytest.raises(TypeError, match="num_samples"):
        layer(torch.randn(2, IN), num_samples=3)


def test_unknown_estimator_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"estimator must be one of .*'local'.*got 'lrt'"):
        varlin.LinearVariationalNormal(IN, OUT, estimator="lrt")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": 0}, ValueError, "in_features"),
        ({"out_features": 2.5}, TypeError, "out_features"),
        ({"bias": "yes"}, TypeError, "bias"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"generator": 3}, TypeError, "generator"),
    ],
)
def test_constructor_arguments_are_validated(kwargs: dict, error: type, match: str) -> None:  # type: ignore[type-arg]
    args = {"in_features": IN, "out_features": OUT, **kwargs}
    with pytest.raises(error, match=match):
        varlin.LinearVariationalNormal(**args)


def test_forward_arguments_are_validated() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT)
    with pytest.raises(ValueError, match=r"x must have last dimension in_features=3"):
        layer(torch.randn(2, IN + 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, IN, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, IN, dtype=torch.float64))
    with pytest.raises(ValueError, match="kl_weight"):
        layer(torch.randn(2, IN), kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        layer(torch.randn(2, IN), kl_weight=torch.ones(2))
    bad = torch.randn(2, IN)
    bad[0, 0] = float("nan")
    layer(bad)  # value checks are off by default: no device sync
    with varlin.validation(), pytest.raises(ValueError, match="x must be finite"):
        layer(bad)


# -- deterministic() and sampling ------------------------------------------------------------


def _nested_model(estimator: str = "reparameterization") -> nn.Sequential:
    return nn.Sequential(
        varlin.VariationalLinear(IN, 8, estimator=estimator),
        nn.ReLU(),
        nn.Sequential(
            varlin.VariationalLinear(8, 5, estimator=estimator),
            nn.Tanh(),
            varlin.VariationalLinear(5, 2, bias=False, estimator=estimator),
        ),
    )


def _manual_mean(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    first, _, (second, _, third) = model
    h = torch.relu(x @ first.w_loc + first.b_loc)
    h = torch.tanh(h @ second.w_loc + second.b_loc)
    return h @ third.w_loc


@pytest.mark.parametrize("batch_shape", [(6,), (2, 6)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_deterministic_is_bit_identical_to_the_mean_map(
    estimator: str, batch_shape: tuple[int, ...]
) -> None:
    model = _nested_model(estimator)
    x = torch.randn(*batch_shape, IN)
    with varlin.deterministic(model) as inside:
        assert inside is model
        first, second = model(x), model(x)
    expected = _manual_mean(model, x)
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    # Outside, the layers sample again.
    assert not torch.equal(model(x), expected)
    assert not torch.equal(model(x), model(x))


def test_deterministic_on_the_seed_layer_keeps_kl() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT)
    x = torch.randn(4, IN)
    with varlin.deterministic(layer):
        y, kl = layer(x, kl_weight=0.5)
    assert torch.equal(y, x @ layer.w_loc + layer.b_loc)
    assert torch.equal(kl, 0.5 * layer.kl_divergence())


def test_deterministic_restores_state_when_the_block_raises() -> None:
    model = _nested_model()
    x = torch.randn(3, IN)
    with pytest.raises(RuntimeError, match="boom"), varlin.deterministic(model):
        raise RuntimeError("boom")
    assert not torch.equal(model(x), model(x))
    assert not torch.equal(model(x), _manual_mean(model, x))


def test_deterministic_nests_and_restores() -> None:
    model = _nested_model()
    inner = model[2]
    x = torch.randn(3, IN)
    with varlin.deterministic(inner):
        with varlin.deterministic(model):
            assert torch.equal(model(x), _manual_mean(model, x))
        # Back to the outer block's state: the inner model is still deterministic.
        h = torch.randn(3, 8)
        assert torch.equal(inner(h), inner(h))
        assert not torch.equal(model(x), model(x))  # the first layer samples again
    assert not torch.equal(inner(h), inner(h))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_train_and_eval_do_not_change_sampling(estimator: str) -> None:
    model = _nested_model(estimator)
    x = torch.randn(4, IN)
    for mode in (model.eval, model.train):
        mode()
        assert not torch.equal(model(x), model(x))
        with varlin.deterministic(model):
            assert torch.equal(model(x), _manual_mean(model, x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_identically_seeded_generators_give_identical_layers(estimator: str) -> None:
    def make(seed: int) -> varlin.LinearVariationalNormal:
        return varlin.LinearVariationalNormal(
            IN, OUT, estimator=estimator, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = make(0), make(0), make(1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # the init draws from the generator too
    x = torch.randn(5, IN)
    before = torch.random.get_rng_state()
    ya, yb, yc = a(x)[0], b(x)[0], c(x)[0]
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert not torch.equal(a(x)[0], ya)  # the generator advances


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_layer_uses_the_functional_estimator_with_softplus_scales(
    estimator: str, bias: bool
) -> None:
    """Wiring, exactly: the layer's output is its estimator's on (loc, softplus(raw_scale))."""
    layer = varlin.VariationalLinear(
        IN, OUT, bias=bias, estimator=estimator, generator=torch.Generator().manual_seed(3)
    )
    _randomise(layer)
    x = torch.randn(5, IN)
    assert layer.generator is not None
    layer.generator.manual_seed(9)
    y = layer(x)
    expected = functional.ESTIMATORS[estimator](
        x,
        layer.w_loc,
        TF.softplus(layer.w_posterior.raw_scale),
        layer.b_loc,
        layer.b_scale,
        generator=torch.Generator().manual_seed(9),
    )
    assert torch.equal(y, expected)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_layer_output_moments_match_closed_form(float64: torch.dtype, estimator: str) -> None:
    r"""End to end through the layer: N = 4000 calls vs mean x mu + b, var x^2 sigma^2 + sigma_b^2.

    Tolerances as in test_functional (exact Gaussian sample mean; normal approximation to the
    chi-square for the variance), failure rate 1e-6 with Bonferroni over 2 x 3 x 4 entries.
    """
    n = 4000
    layer = varlin.LinearVariationalNormal(
        IN, OUT, estimator=estimator, generator=torch.Generator().manual_seed(0)
    )
    _randomise(layer)
    x = torch.randn(3, IN)
    with torch.no_grad():
        samples = torch.stack([layer(x)[0] for _ in range(n)])
        mean = x @ layer.w_loc + layer.b_loc
        var = (x * x) @ layer.w_scale**2 + layer.b_scale**2  # type: ignore[operator]
    checks = 2 * mean.numel()
    assert (samples.mean(0) - mean).abs().le(mean_tolerance(var, n, checks)).all()
    assert (samples.var(0) - var).abs().le(variance_tolerance(var, n, checks)).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_gradients_reach_every_parameter(cls: type[BayesianLinearBase], estimator: str) -> None:
    """From the data term alone (no KL): loc and raw_scale of weights and bias all get gradient."""
    layer = cls(IN, OUT, estimator=estimator)
    (_y(layer, torch.randn(6, IN)) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).all(), name


# -- weight_samples (used by predict) --------------------------------------------------------


def test_weight_samples_gives_each_slice_its_own_weights() -> None:
    model = nn.Sequential(varlin.VariationalLinear(IN, OUT), nn.ReLU())
    x = torch.randn(2, IN).expand(4, 2, IN)
    with weight_samples(model, 4):
        y = model(x)
    assert y.shape == (4, 2, OUT)
    assert not torch.equal(y[0], y[1])  # different slices, different weights
    with pytest.raises(ValueError, match="num_samples"):
        with weight_samples(model, 0):
            pass
    # Restored: no leading sample dimension expected any more.
    assert model(torch.randn(5, IN)).shape == (5, OUT)


# -- dtype, state_dict, compile --------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_double_and_back(estimator: str) -> None:
    layer = varlin.LinearVariationalNormal(
        IN, OUT, make_weights_prior=varlin.priors.scale_mixture(), estimator=estimator
    )
    layer.double()
    y, kl = layer(torch.randn(5, IN, dtype=torch.float64))
    assert y.dtype == kl.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    layer.float()
    y, kl = layer(torch.randn(5, IN))
    assert y.dtype == kl.dtype == torch.float32


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_state_dict_round_trip_reproduces_outputs(estimator: str) -> None:
    source = varlin.LinearVariationalNormal(
        IN, OUT, estimator=estimator, generator=torch.Generator()
    )
    _randomise(source)
    fresh = varlin.LinearVariationalNormal(
        IN, OUT, estimator=estimator, generator=torch.Generator()
    )
    fresh.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(5, IN)
    assert source.generator is not None and fresh.generator is not None
    source.generator.manual_seed(1)
    fresh.generator.manual_seed(1)
    y_source, kl_source = source(x)
    y_fresh, kl_fresh = fresh(x)
    assert torch.equal(y_source, y_fresh) and torch.equal(kl_source, kl_fresh)


def _compile_model(families: bool) -> nn.Sequential:
    if not families:
        return nn.Sequential(
            varlin.VariationalLinear(IN, 8, estimator="local"),
            nn.ReLU(),
            varlin.VariationalLinear(8, 4, estimator="flipout"),
            nn.ReLU(),
            varlin.VariationalLinear(4, 2),
        )
    return nn.Sequential(
        varlin.VariationalLinear(IN, 8, posterior="lowrank", rank=3, estimator="local"),
        nn.ReLU(),
        varlin.VariationalLinear(8, 4, posterior="lowrank", rank=2),
        nn.ReLU(),
        varlin.VariationalLinear(4, 4, posterior="matrix_normal", estimator="local"),
        nn.ReLU(),
        varlin.VariationalLinear(4, 3, posterior="radial", estimator="flipout"),
        nn.ReLU(),
        varlin.VariationalLinear(3, 2, posterior="full", estimator="local"),
    )


@pytest.mark.parametrize("families", [False, True], ids=["meanfield", "other-families"])
def test_torch_compile_forward_and_backward(families: bool) -> None:
    """One small model, every estimator, CPU ``aot_eager`` backend (no C++ build): a few seconds.

    ``fullgraph=True``: a graph break inside the layer (there was one, on the value-check switch)
    fails the test instead of silently splitting every layer's forward. Once with mean-field
    layers, once with the low-rank, matrix-normal, radial and full families.
    """
    model = _compile_model(families)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, IN)
    y = compiled(x)
    assert y.shape == (5, 2) and torch.isfinite(y).all()
    ((y**2).sum() + varlin.kl_divergence(model)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with varlin.deterministic(model):
        assert torch.allclose(compiled(x), _sequential_mean(model, x), rtol=1e-5, atol=1e-6)


def _sequential_mean(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = x
    for module in model:
        if isinstance(module, BayesianLinearBase):
            h = h @ module.w_loc + (0 if module.b_loc is None else module.b_loc)
        else:
            h = module(h)
    return h


def test_sequential_drop_in() -> None:
    model = nn.Sequential(
        varlin.VariationalLinear(IN, 8), nn.ReLU(), varlin.VariationalLinear(8, 1)
    )
    assert model(torch.randn(7, IN)).shape == (7, 1)
    assert varlin.kl_divergence(model).shape == ()


# -- CUDA (run where a GPU is present; skipped elsewhere) -------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cuda_layer_with_priors_forward_backward(estimator: str) -> None:
    layer = varlin.LinearVariationalNormal(
        IN, OUT, make_weights_prior=varlin.priors.scale_mixture(), estimator=estimator
    ).to("cuda")
    assert all(t.is_cuda for t in layer.state_dict().values())
    y, kl = layer(torch.randn(5, IN, device="cuda"))
    assert y.is_cuda and kl.is_cuda and torch.isfinite(kl)
    (y.sum() + kl).backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in layer.parameters())
    x = torch.randn(5, IN, device="cuda")
    with varlin.deterministic(layer):
        assert torch.equal(layer(x)[0], x @ layer.w_loc + layer.b_loc)
    cpu = varlin.LinearVariationalNormal(IN, OUT, make_weights_prior=varlin.priors.scale_mixture())
    cpu.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(cpu.state_dict()[key], value.cpu()), key


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cuda_moments_with_cuda_generator(estimator: str) -> None:
    """As the CPU moment test, on the GPU with a CUDA generator: N = 4000, rate 1e-6."""
    n = 4000
    layer = varlin.VariationalLinear(
        IN,
        OUT,
        estimator=estimator,
        generator=torch.Generator("cuda").manual_seed(0),
        device="cuda",
        dtype=torch.float64,
    )
    _randomise(layer)
    x = torch.randn(3, IN, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        samples = torch.stack([layer(x) for _ in range(n)])
        mean = x @ layer.w_loc + layer.b_loc
        var = (x * x) @ layer.w_scale**2 + layer.b_scale**2  # type: ignore[operator]
    checks = 2 * mean.numel()
    assert (samples.mean(0) - mean).abs().le(mean_tolerance(var, n, checks)).all()
    assert (samples.var(0) - var).abs().le(variance_tolerance(var, n, checks)).all()
