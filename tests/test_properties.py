"""Property-based tests (Hypothesis) over shapes, dtypes, estimators and priors.

Properties: output shapes; the KL is >= 0 and is exactly the Normal closed form; a ``state_dict``
round-trip into a fresh layer reproduces deterministic outputs and the KL bit for bit;
deterministic mode is bit-identical to ``x @ loc + b``; the same generator seed gives the same
samples. The discrete axes (estimator, prior family) are pytest parameters, so that every
combination is covered; Hypothesis draws the rest (shapes, batch dimensions, bias, dtype,
scales, locations, seeds). ``derandomize=True`` makes every run draw the same examples (stable
in CI) and ``database=None`` keeps Hypothesis from writing into the checkout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Distribution, Normal, kl_divergence

import varlin
from varlin import priors
from varlin.kl import normal_kl_sum

#: Examples per (property, estimator, prior) case.
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None)

ESTIMATOR_NAMES = ("reparameterization", "local", "flipout")
PRIOR_NAMES = ("normal", "laplace", "scale_mixture", "seed_lambda")
DTYPES = st.sampled_from([torch.float32, torch.float64])
FEATURES = st.integers(min_value=1, max_value=6)
BATCH_SHAPES = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=2).map(tuple)
#: log-uniform scales: prior and posterior standard deviations over six orders of magnitude
SCALES = st.floats(min_value=-3.0, max_value=3.0).map(lambda e: 10.0**e)
INIT_SCALES = st.floats(min_value=-4.0, max_value=0.0).map(lambda e: 10.0**e)
LOCS = st.floats(min_value=-2.0, max_value=2.0)
each_estimator = pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
each_prior = pytest.mark.parametrize("prior", PRIOR_NAMES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prior_factories(kind: str, scale: float, loc: float, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(make_weights_prior, make_bias_prior)`` of one kind."""
    if kind == "normal":
        return priors.normal(scale, loc), priors.normal(scale, loc)
    if kind == "laplace":
        return priors.laplace(scale, loc), priors.laplace(scale, loc)
    if kind == "scale_mixture":
        return priors.scale_mixture(0.3, scale, scale / 100), priors.scale_mixture(0.3, scale, 1.0)

    # The seed's style: a lambda of the shape, full-size tensors built in the layer's dtype.
    def full(*shape: int) -> Distribution:
        return Normal(
            torch.full(shape, loc, dtype=dtype),
            torch.full(shape, scale, dtype=dtype),
            validate_args=False,
        )

    return (lambda i, o: full(i, o)), (lambda o: full(o))


@st.composite
def layers(draw: Callable[..., Any], *, prior: str, estimator: str) -> dict[str, Any]:
    """Constructor arguments of a random layer, plus the matching input shape."""
    dtype, kind = draw(DTYPES), prior
    make_w, make_b = _prior_factories(kind, draw(SCALES), draw(LOCS), dtype)
    bias = draw(st.booleans())
    return {
        "in_features": draw(FEATURES),
        "out_features": draw(FEATURES),
        "bias": bias,
        "make_weights_prior": make_w,
        "make_bias_prior": make_b if bias else None,
        "estimator": estimator,
        "init_scale": draw(INIT_SCALES),
        "dtype": dtype,
        "seed": draw(st.integers(min_value=0, max_value=2**31 - 1)),
        "batch": draw(BATCH_SHAPES),
        "prior": kind,
    }


def _build(
    args: dict[str, Any], cls: type = varlin.LinearVariationalNormal, seed: int | None = None
) -> Any:
    kwargs = {k: v for k, v in args.items() if k not in ("seed", "batch", "prior")}
    generator = torch.Generator().manual_seed(args["seed"] if seed is None else seed)
    return cls(**kwargs, generator=generator)


def _input(args: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(args["seed"] + 1)
    shape = (*args["batch"], args["in_features"])
    return torch.randn(shape, generator=g, dtype=args["dtype"])


@each_estimator
@each_prior
@SETTINGS
@given(data=st.data())
def test_output_shapes(data: st.DataObject, prior: str, estimator: str) -> None:
    args = data.draw(layers(prior=prior, estimator=estimator))
    x = _input(args)
    layer = _build(args)
    y, kl = layer(x, kl_weight=0.5)
    assert y.shape == (*args["batch"], args["out_features"]) and y.dtype == args["dtype"]
    assert kl.shape == () and kl.dtype == args["dtype"]
    assert layer.weight_posterior().batch_shape == (args["in_features"], args["out_features"])
    assert layer.weight_prior().batch_shape == (args["in_features"], args["out_features"])
    b = layer.bias_posterior()
    assert (b is None) == (not args["bias"])
    assert b is None or b.batch_shape == (args["out_features"],)
    drop_in = _build(args, varlin.VariationalLinear)
    assert drop_in(x).shape == y.shape
    assert varlin.kl_divergence(drop_in).shape == ()


def _double(d: Normal) -> Normal:
    return Normal(d.loc.double(), d.scale.double())


def _kl_magnitude(q: Normal, p: Normal) -> torch.Tensor:
    """Sum of the magnitudes of the closed form's terms: the scale of its rounding error."""
    ratio = q.scale.double() / p.scale.double()
    shift = ((q.loc.double() - p.loc.double()) / p.scale.double()) ** 2
    return (ratio**2 + 1 + 2 * ratio.log().abs() + shift).sum()


@each_estimator
@pytest.mark.parametrize("prior", ["normal", "seed_lambda"])  # the Normal priors
@SETTINGS
@given(data=st.data())
def test_kl_is_nonnegative_and_exactly_the_normal_closed_form(
    data: st.DataObject, prior: str, estimator: str
) -> None:
    args = data.draw(layers(prior=prior, estimator=estimator))
    layer = _build(args)
    with torch.no_grad():  # move the posterior away from its initial values
        g = torch.Generator().manual_seed(args["seed"])
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    kl = layer.kl_divergence().detach()
    assert math.isfinite(float(kl)) and float(kl) >= 0

    with torch.no_grad():
        pairs = [(layer.weight_posterior(), layer.weight_prior())]
        if args["bias"]:
            pairs.append((layer.bias_posterior(), layer.bias_prior()))
        # Bit for bit the documented closed form summed per tensor (varlin.kl.normal_kl_sum,
        # against the prior's own tensors, before they are expanded to the weights' shape) ...
        held = [layer.w_prior] + ([layer.b_prior] if args["bias"] else [])
        expected = sum(
            normal_kl_sum(q.loc, q.scale, p.tensor("loc"), p.tensor("scale"))
            for (q, _), p in zip(pairs, held, strict=True)
        )
        assert torch.equal(kl, expected)
        # ... and, through torch's registry in float64 (another route), equal to rounding.
        reference = sum(float(kl_divergence(_double(q), _double(p)).sum()) for q, p in pairs)
        magnitude = sum(float(_kl_magnitude(q, p)) for q, p in pairs)
    assert abs(float(kl) - reference) <= 64 * torch.finfo(args["dtype"]).eps * magnitude
    # The seed layer's returned KL is the same number times kl_weight.
    _, weighted = layer(_input(args), kl_weight=0.25)
    assert torch.equal(weighted.detach(), 0.25 * kl)


@each_estimator
@each_prior
@SETTINGS
@given(data=st.data())
def test_state_dict_round_trip(data: st.DataObject, prior: str, estimator: str) -> None:
    """A fresh layer (another seed) loads the state: same deterministic outputs, same KL."""
    args = data.draw(layers(prior=prior, estimator=estimator))
    layer = _build(args)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5).add_(0.1)
    fresh = _build(args, seed=args["seed"] + 7)
    fresh.load_state_dict(layer.state_dict())
    x = _input(args)
    with varlin.deterministic(layer), varlin.deterministic(fresh):
        y, _ = layer(x)
        y_fresh, _ = fresh(x)
    assert torch.equal(y, y_fresh)
    # The KL: a Monte Carlo estimate for the scale mixture, so both draw from one seed.
    layer.generator.manual_seed(3)
    fresh.generator.manual_seed(3)
    assert torch.equal(layer.kl_divergence(), fresh.kl_divergence())
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


@each_estimator
@each_prior
@SETTINGS
@given(data=st.data())
def test_deterministic_mode_is_the_posterior_mean_map_bit_for_bit(
    data: st.DataObject, prior: str, estimator: str
) -> None:
    args = data.draw(layers(prior=prior, estimator=estimator))
    layer = _build(args)
    x = _input(args)
    drop_in = _build(args, varlin.VariationalLinear)  # the same init from the same seed
    with varlin.deterministic(layer), varlin.deterministic(drop_in):
        y, _ = layer(x)
        y_drop_in = drop_in(x)
    expected = x @ layer.w_loc
    if args["bias"]:
        expected = expected + layer.b_loc
    assert torch.equal(y, expected)
    assert torch.equal(y_drop_in, expected)
    # Outside the block the layer samples again (unless every scale underflowed, never here).
    y_sampled, _ = layer(x)
    assert not torch.equal(y_sampled, expected)


@each_estimator
@each_prior
@SETTINGS
@given(data=st.data())
def test_the_same_generator_seed_gives_the_same_samples(
    data: st.DataObject, prior: str, estimator: str
) -> None:
    args = data.draw(layers(prior=prior, estimator=estimator))
    first, second = _build(args), _build(args)
    x = _input(args)
    draws_first = [first(x)[0] for _ in range(2)]
    draws_second = [second(x)[0] for _ in range(2)]
    for a, b in zip(draws_first, draws_second, strict=True):
        assert torch.equal(a, b)
    first.generator.manual_seed(args["seed"] + 11)
    replay = first(x)[0]
    first.generator.manual_seed(args["seed"] + 11)
    assert torch.equal(first(x)[0], replay)
    # A control: the noise source is the layer's generator, not torch's global one.
    torch.manual_seed(0)
    first.generator.manual_seed(5)
    a = first(x)[0]
    torch.manual_seed(1)
    first.generator.manual_seed(5)
    assert torch.equal(first(x)[0], a)
