"""The seed sketch's own usage, and one test per defect of the seed (listed in issue 2).

Each defect test's docstring names the defect it would have caught. The seed is in
``shared/seed/``; it does not run as written (every call raises TypeError).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import varlin
from varlin import LinearVariationalNormal


def seed_priors() -> dict[str, object]:
    """The seed's prior factories, verbatim up to formatting (its defaults, passed explicitly)."""
    return {
        "make_weights_prior": lambda in_, out_: torch.distributions.Normal(
            loc=torch.zeros((in_, out_)), scale=torch.ones((in_, out_))
        ),
        "make_bias_prior": lambda out_: torch.distributions.Normal(
            loc=torch.zeros(out_), scale=torch.ones(out_)
        ),
    }


# -- the seed's usage ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
@pytest.mark.parametrize("custom_priors", [False, True], ids=["default-priors", "seed-lambdas"])
@pytest.mark.parametrize("bias", [True, False])
def test_seed_usage(bias: bool, custom_priors: bool, estimator: str) -> None:
    """``LinearVariationalNormal(3, 2)`` with and without bias, with the seed's prior factories."""
    kwargs = seed_priors() if custom_priors else {}
    if not bias:
        kwargs.pop("make_bias_prior", None)
    layer = LinearVariationalNormal(3, 2, bias, estimator=estimator, **kwargs)  # type: ignore[arg-type]
    y, kl = layer(torch.randn(5, 3), kl_weight=1.0)
    assert y.shape == (5, 2)
    assert kl.shape == ()
    assert torch.isfinite(y).all() and torch.isfinite(kl)
    y, kl = layer(torch.randn(5, 3))  # kl_weight defaults to 1, as in the seed
    assert y.shape == (5, 2) and kl.shape == ()


def test_seed_positional_signature() -> None:
    """The seed's positional order: (in_features, out_features, bias, weights prior, bias prior)."""
    priors = seed_priors()
    layer = LinearVariationalNormal(
        3, 2, True, priors["make_weights_prior"], priors["make_bias_prior"]
    )
    assert layer.in_features == 3 and layer.out_features == 2
    assert layer.bias_posterior() is not None
    prior = layer.weight_prior()
    assert isinstance(prior, torch.distributions.Normal)
    assert torch.equal(prior.loc, torch.zeros(3, 2)) and torch.equal(prior.scale, torch.ones(3, 2))


def test_default_priors_are_the_seeds_standard_normal() -> None:
    layer = LinearVariationalNormal(3, 2)
    w_prior, b_prior = layer.weight_prior(), layer.bias_prior()
    assert isinstance(w_prior, torch.distributions.Normal)
    assert isinstance(b_prior, torch.distributions.Normal)
    assert torch.equal(w_prior.loc, torch.zeros(3, 2)) and torch.equal(
        w_prior.scale, torch.ones(3, 2)
    )
    assert torch.equal(b_prior.loc, torch.zeros(2)) and torch.equal(b_prior.scale, torch.ones(2))


def _set_means(
    layer: LinearVariationalNormal, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    with torch.no_grad():
        layer.w_posterior.loc.copy_(weight)
        if bias is not None:
            assert layer.b_posterior is not None
            layer.b_posterior.loc.copy_(bias)


def test_in_not_equal_out_weights_and_math() -> None:
    """Weights are (in, out) and ``y = x @ W + b``, checked entry by entry against a sum."""
    layer = LinearVariationalNormal(3, 5)
    assert layer.w_loc.shape == (3, 5)
    W = torch.arange(15.0).reshape(3, 5) / 10
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    _set_means(layer, W, b)
    x = torch.randn(4, 3)
    with varlin.deterministic(layer):
        y, _ = layer(x)
    manual = torch.tensor(
        [
            [sum(float(x[n, i]) * float(W[i, j]) for i in range(3)) + float(b[j]) for j in range(5)]
            for n in range(4)
        ]
    )
    torch.testing.assert_close(y, manual)


# -- one test per seed defect ----------------------------------------------------------------


def test_defect_hasattr_name_instead_of_string() -> None:
    """Defect: ``hasattr(self, b_loc)`` passes a name, not a string -> NameError on every call
    with bias. The bias branch must run and add the bias; without bias, nothing is added."""
    layer = LinearVariationalNormal(3, 2)
    W, b = torch.randn(3, 2), torch.tensor([5.0, -7.0])
    _set_means(layer, W, b)
    x = torch.randn(4, 3)
    with varlin.deterministic(layer):
        y, _ = layer(x)
    torch.testing.assert_close(y - x @ W, b.expand(4, 2))
    no_bias = LinearVariationalNormal(3, 2, bias=False)
    _set_means(no_bias, W, None)
    with varlin.deterministic(no_bias):
        y, _ = no_bias(x)
    assert torch.equal(y, x @ W)


def test_defect_kl_loss_without_self() -> None:
    """Defect: ``def kl_loss(q, r, kl_weight)`` lacks ``self`` -> every forward raises
    TypeError. The seed README's reproduction must run and return (y, kl)."""
    y, kl = LinearVariationalNormal(3, 2)(torch.randn(5, 3))
    assert y.shape == (5, 2) and kl.shape == ()
    assert kl > 0


@pytest.mark.parametrize("in_features, out_features", [(3, 5), (5, 3)])
def test_defect_transposed_weights_shape(in_features: int, out_features: int) -> None:
    """Defect: weights are (in, out) but the seed computes ``x @ weights.T`` -> shape error
    whenever in != out."""
    layer = LinearVariationalNormal(in_features, out_features)
    y, _ = layer(torch.randn(4, in_features))
    assert y.shape == (4, out_features)


def test_defect_transposed_weights_math() -> None:
    """Defect: ``x @ weights.T`` with in == out runs but computes the wrong map. With a
    non-symmetric W the output must be ``x @ W``, not ``x @ W.T``."""
    layer = LinearVariationalNormal(3, 3, bias=False)
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    _set_means(layer, W, None)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with varlin.deterministic(layer):
        y, _ = layer(x)
    assert torch.equal(y, torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))  # rows of W
    assert not torch.allclose(y, x @ W.T)


def test_defect_unconstrained_scale() -> None:
    """Defect: ``w_scale`` is a raw Parameter; one optimiser step can make it negative and then
    ``Normal`` raises. A step of -2 on the stored value (the seed's scale 1 -> -1) must leave the
    scale positive and the layer working."""
    layer = LinearVariationalNormal(3, 2, init_scale=1.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    raw = [layer.w_posterior.raw_scale]
    assert layer.b_posterior is not None
    raw.append(layer.b_posterior.raw_scale)
    for p in raw:
        p.grad = torch.full_like(p, 2.0)  # an SGD step of -2 on every stored scale
    optimizer.step()
    assert torch.allclose(layer.w_posterior.raw_scale, torch.full((3, 2), math.log(math.e - 1) - 2))
    assert (layer.w_scale > 0).all() and (layer.b_scale > 0).all()  # type: ignore[operator]
    torch.distributions.Normal(layer.w_loc, layer.w_scale, validate_args=True)
    y, kl = layer(torch.randn(5, 3))
    assert torch.isfinite(y).all() and torch.isfinite(kl)
    assert {n for n, _ in layer.named_parameters()} >= {"w_posterior.raw_scale"}
    assert "w_scale" not in dict(layer.named_parameters())


def test_defect_elementwise_broadcast_kl() -> None:
    """Defect: the KL is returned elementwise (in, out) and the bias KL (out,) is broadcast-added
    to it (counting the bias in times). It must be a 0-dim sum, each term counted once."""
    layer = LinearVariationalNormal(3, 2, init_scale=0.5)
    _, kl = layer(torch.randn(5, 3))
    kl_w = torch.distributions.kl_divergence(layer.weight_posterior(), layer.weight_prior())
    q_b, p_b = layer.bias_posterior(), layer.bias_prior()
    assert q_b is not None and p_b is not None
    kl_b = torch.distributions.kl_divergence(q_b, p_b)
    assert kl.shape == ()
    torch.testing.assert_close(kl, kl_w.sum() + kl_b.sum())
    assert not torch.allclose(kl, (kl_w + kl_b).sum())  # the seed's broadcast sum


def test_defect_bias_kl_ignores_kl_weight() -> None:
    """Defect: the bias term is ``self.kl_loss(q_b, self.b_prior)`` without ``kl_weight``. The
    same weight must multiply both terms: kl_weight=0 gives exactly 0, 0.5 halves the total."""
    layer = LinearVariationalNormal(3, 2, init_scale=0.5)
    x = torch.randn(5, 3)
    _, full = layer(x, kl_weight=1.0)
    _, zero = layer(x, kl_weight=0.0)
    _, half = layer(x, kl_weight=0.5)
    assert zero == 0
    assert torch.equal(half, 0.5 * full)
    q_b, p_b = layer.bias_posterior(), layer.bias_prior()
    assert q_b is not None and p_b is not None
    assert torch.distributions.kl_divergence(q_b, p_b).sum() > 0  # so the test can tell


def test_defect_priors_are_plain_attributes() -> None:
    """Defect: the priors are plain attributes: not moved by ``.to()``/``.double()``, absent
    from ``state_dict``. With the seed's own float32 factories, ``.double()`` must convert
    them and the state dict must carry them."""
    layer = LinearVariationalNormal(3, 2, **seed_priors())  # type: ignore[arg-type]
    keys = set(layer.state_dict())
    assert {"w_prior.loc", "w_prior.scale", "b_prior.loc", "b_prior.scale"} <= keys
    layer.double()
    assert layer.weight_prior().loc.dtype == torch.float64
    bias_prior = layer.bias_prior()
    assert bias_prior is not None and bias_prior.scale.dtype == torch.float64
    y, kl = layer(torch.randn(5, 3, dtype=torch.float64))
    assert y.dtype == kl.dtype == torch.float64
    fresh = LinearVariationalNormal(3, 2, **seed_priors()).double()  # type: ignore[arg-type]
    with torch.no_grad():
        layer.w_prior.get_buffer("scale").fill_(2.0)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight_prior().scale, torch.full((3, 2), 2.0, dtype=torch.float64))


def test_defect_posterior_starts_at_the_prior() -> None:
    """Defect: the posterior starts at loc 0, scale 1 (= the prior): every weight is N(0, 1)
    noise and deep nets do not train. Loc must start like nn.Linear, the scale small and
    configurable; a fresh 6-layer net's output noise must stay small (N(0, 1) inputs)."""
    layer = LinearVariationalNormal(16, 64)
    assert layer.w_loc.abs().max() <= 1 / math.sqrt(16)
    assert layer.w_loc.abs().max() > 0.1  # spread, not zeros (64 * 16 uniforms)
    assert (layer.w_scale <= 0.1).all()
    assert torch.allclose(
        LinearVariationalNormal(3, 2, init_scale=0.3).w_scale, torch.full((3, 2), 0.3)
    )

    def net(**kwargs: float) -> nn.Sequential:
        body: list[nn.Module] = []
        for _ in range(5):
            body += [varlin.VariationalLinear(32, 32, **kwargs), nn.ReLU()]  # type: ignore[arg-type]
        return nn.Sequential(*body, varlin.VariationalLinear(32, 1, **kwargs))  # type: ignore[arg-type]

    x = torch.randn(64, 32)

    def output_noise(model: nn.Sequential) -> float:
        """Mean over examples of the output's standard deviation across 50 forward passes."""
        with torch.no_grad():
            draws = torch.stack([model(x) for _ in range(50)])
        return float(draws.std(0).mean())

    assert output_noise(net()) < 0.1
    assert output_noise(net(init_scale=1.0)) > 100  # the seed's scale: noise swamps everything


def test_defect_kwargs_swallowed() -> None:
    """Defect: ``**kwargs`` (constructor) and ``**forward_kws`` (forward) silently swallow
    misspelled arguments. Unknown arguments must raise TypeError naming them."""
    with pytest.raises(TypeError, match="estimater"):
        LinearVariationalNormal(3, 2, estimater="local")
    layer = LinearVariationalNormal(3, 2)
    with pytest.raises(TypeError, match="klweight"):
        layer(torch.randn(5, 3), klweight=0.1)
