"""Tests for varlin.priors: priors as buffers, factories, validation, the scale-mixture prior."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import mean_tolerance, z_bound
from torch import nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    Laplace,
    LogNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    StudentT,
)

import varlin
from varlin import priors
from varlin.diagnostics import diagnose
from varlin.errors import VarlinWarning
from varlin.functional import inverse_softplus
from varlin.priors import Prior, ScaleMixtureNormal

IN, OUT = 3, 4


# -- factories used below, in the seed's style: plain callables of the shape ----------------


def seed_weight_prior(in_: int, out_: int) -> Distribution:
    """The seed's default weight prior, verbatim apart from the name."""
    return Normal(loc=torch.zeros((in_, out_)), scale=torch.ones((in_, out_)))


def seed_bias_prior(out_: int) -> Distribution:
    return Normal(loc=torch.zeros(out_), scale=torch.ones(out_))


def random_normal_prior(in_: int, out_: int) -> Distribution:
    """Full-size prior with random values: a fresh layer gets different ones each time."""
    return Normal(torch.randn(in_, out_), 0.5 + torch.rand(in_, out_))


def random_mixture_prior(in_: int, out_: int) -> Distribution:
    return ScaleMixtureNormal(
        0.1 + 0.8 * torch.rand(in_, out_), 0.5 + torch.rand(in_, out_), 0.01 + torch.rand(())
    )


def random_bias_prior(out_: int) -> Distribution:
    return Normal(torch.randn(out_), 0.5 + torch.rand(out_))


FACTORY_CASES = {
    "default": (None, None),
    "seed-lambdas": (seed_weight_prior, seed_bias_prior),
    "random-full-size": (random_normal_prior, random_bias_prior),
    "scale-mixture-factory": (priors.scale_mixture(0.3, 2.0, 0.1), priors.normal(0.7, 0.2)),
    "scale-mixture-full-size": (random_mixture_prior, random_bias_prior),
    "laplace-factory": (priors.laplace(0.5), priors.laplace(2.0)),
}


def _layer(case: str, **kwargs: object) -> varlin.LinearVariationalNormal:
    w, b = FACTORY_CASES[case]
    return varlin.LinearVariationalNormal(IN, OUT, True, w, b, **kwargs)  # type: ignore[arg-type]


def _prior_tensors(layer: varlin.LinearVariationalNormal) -> dict[str, torch.Tensor]:
    """The priors' distribution tensors in the state (not the family record, ``_extra_state``)."""
    return {
        k: v for k, v in layer.state_dict().items() if "_prior." in k and "_extra_state" not in k
    }


# -- buffers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(FACTORY_CASES))
def test_prior_tensors_are_buffers_in_state_dict(case: str) -> None:
    layer = _layer(case)
    buffers = dict(layer.named_buffers())
    prior_tensors = _prior_tensors(layer)
    assert prior_tensors, "the priors' tensors must appear in state_dict()"
    assert any(k.startswith("w_prior.") for k in prior_tensors)
    assert any(k.startswith("b_prior.") for k in prior_tensors)
    assert set(prior_tensors) <= set(buffers)
    # Buffers are not parameters: an optimiser never touches the prior.
    assert not any("_prior." in name for name, _ in layer.named_parameters())


@pytest.mark.parametrize("case", sorted(FACTORY_CASES))
def test_priors_follow_double_and_half(case: str) -> None:
    layer = _layer(case)
    layer.double()
    for name, tensor in _prior_tensors(layer).items():
        assert tensor.dtype == torch.float64, name
    w_prior, b_prior = layer.weight_prior(), layer.bias_prior()
    assert b_prior is not None
    assert w_prior.sample().dtype == torch.float64
    assert w_prior.batch_shape == (IN, OUT) and b_prior.batch_shape == (OUT,)
    y, kl = layer(torch.randn(5, IN, dtype=torch.float64))
    assert y.dtype == kl.dtype == torch.float64
    assert torch.isfinite(kl)
    layer.half()
    assert all(t.dtype == torch.float16 for t in _prior_tensors(layer).values())
    layer.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in _prior_tensors(layer).values())
    y, kl = layer(torch.randn(5, IN))
    assert y.dtype == kl.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_priors_follow_to_device() -> None:
    layer = _layer("random-full-size").to("cuda")
    assert all(t.is_cuda for t in _prior_tensors(layer).values())
    y, kl = layer(torch.randn(5, IN, device="cuda"))
    assert y.is_cuda and kl.is_cuda


@pytest.mark.parametrize("case", sorted(FACTORY_CASES))
def test_state_dict_round_trip_is_exact(case: str) -> None:
    """Load a trained-looking layer into a fresh one: every tensor, priors included, transfers."""
    source = _layer(case)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
        for name, b in source.named_buffers():
            # Perturb the prior too, within its constraints, so the round trip has to carry it.
            if "mixing" in name:
                b.mul_(0.9)
            else:
                b.mul_(1.5)
    fresh = _layer(case)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    fresh.load_state_dict(source.state_dict())
    assert source.state_dict().keys() == fresh.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(6, IN)
    with varlin.deterministic(source), varlin.deterministic(fresh):
        assert torch.equal(source(x)[0], fresh(x)[0])
    if source.w_prior.distribution_type is not ScaleMixtureNormal:
        # Closed-form KL: deterministic, so the two layers must agree exactly.
        assert torch.equal(source.kl_divergence(), fresh.kl_divergence())
    for a, b in [(source.weight_prior(), fresh.weight_prior())]:
        for attr in vars(a):
            if isinstance(getattr(a, attr), torch.Tensor):
                assert torch.equal(getattr(a, attr), getattr(b, attr))


def test_state_dict_round_trip_with_scale_mixture_kl_matches_under_same_generator() -> None:
    """Monte Carlo KL: equal after the round trip when both layers draw the same noise."""
    source = _layer("scale-mixture-full-size", generator=torch.Generator().manual_seed(5))
    fresh = _layer("scale-mixture-full-size", generator=torch.Generator().manual_seed(5))
    fresh.load_state_dict(source.state_dict())
    assert source.generator is not None and fresh.generator is not None
    source.generator.manual_seed(11)
    fresh.generator.manual_seed(11)
    assert torch.equal(source.kl_divergence(), fresh.kl_divergence())


def test_default_prior_stores_scalars_not_weight_sized_tensors() -> None:
    layer = varlin.LinearVariationalNormal(50, 40)
    for name, tensor in _prior_tensors(layer).items():
        assert tensor.dim() == 0, name
    prior = layer.weight_prior()
    assert isinstance(prior, Normal)
    assert prior.batch_shape == (50, 40)
    assert torch.equal(prior.loc, torch.zeros(50, 40)) and torch.equal(
        prior.scale, torch.ones(50, 40)
    )


# -- the prior's family in the state ----------------------------------------------------------


def _normal_mixture(*shape: int) -> Distribution:
    return MixtureSameFamily(
        Categorical(probs=torch.tensor([0.3, 0.7])),
        Normal(torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 2.0])),
    )


def _full_size_normal_at(*shape: int) -> Distribution:
    """A weight-sized Normal centred at fixed values (as ``prior_at_weights=True`` makes)."""
    g = torch.Generator().manual_seed(sum(shape))
    return Normal(torch.randn(shape, generator=g), torch.full(shape, 0.3))


#: One case per family and shape: (weight prior, bias prior).
STATE_CASES = {
    **FACTORY_CASES,
    "normal-at-weights": (_full_size_normal_at, _full_size_normal_at),
    "mixture-same-family": (_normal_mixture, _normal_mixture),
}


def _kl_with_seed(layer: varlin.LinearVariationalNormal, seed: int = 5) -> torch.Tensor:
    assert layer.generator is not None
    layer.generator.manual_seed(seed)
    return layer.kl_divergence().detach()


def _assert_same_kl(a: torch.Tensor, b: torch.Tensor, terms: int = IN * OUT + OUT) -> None:
    """The KL of one prior however it is held: against a one-entry prior the sum is formed by
    other operations than against a full-size one (``varlin.kl._kl_sum_value``), so the two agree
    to the rounding of sums of ``terms`` float32 terms: a relative ``2 * terms * eps`` at most
    here, where the posteriors are at their initial scales, far from the prior, and each term is
    of the order of its value (nothing cancels; near the prior see
    ``test_kl.py::test_summed_kl_against_a_one_entry_prior_is_exact_to_rounding``)."""
    torch.testing.assert_close(a, b, rtol=2 * terms * torch.finfo(a.dtype).eps, atol=0)


def _assert_same_prior(a: Distribution | None, b: Distribution | None) -> None:
    assert a is not None and b is not None and type(a) is type(b)
    assert a.batch_shape == b.batch_shape
    value = torch.linspace(-2, 2, a.batch_shape.numel()).reshape(a.batch_shape)
    assert torch.equal(a.log_prob(value), b.log_prob(value))


@pytest.mark.parametrize("target", sorted(STATE_CASES))
@pytest.mark.parametrize("source", sorted(STATE_CASES))
def test_loading_restores_exactly_the_saved_prior_or_refuses(source: str, target: str) -> None:
    """Every family and shape into every other: the saved prior exactly, or a one-line refusal.

    A Laplace prior's ``loc``/``scale`` used to load silently into a Normal prior's buffers of
    the same names, and a weight-sized prior into a scalar one failed with a raw size mismatch.
    """
    src = varlin.LinearVariationalNormal(
        IN,
        OUT,
        True,
        *STATE_CASES[source],
        generator=torch.Generator(),  # type: ignore[arg-type]
    )
    dst = varlin.LinearVariationalNormal(
        IN,
        OUT,
        True,
        *STATE_CASES[target],
        generator=torch.Generator(),  # type: ignore[arg-type]
    )
    w_same = type(src.weight_prior()) is type(dst.weight_prior())
    b_same = type(src.bias_prior()) is type(dst.bias_prior())
    if not (w_same and b_same):
        which = "b_prior" if w_same else "w_prior"
        with pytest.raises(RuntimeError) as info:
            dst.load_state_dict(src.state_dict())
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"cannot load {which}: the state holds a ")
        assert "prior, this module's is" in message
        return
    dst.load_state_dict(src.state_dict())
    _assert_same_prior(src.weight_prior(), dst.weight_prior())
    _assert_same_prior(src.bias_prior(), dst.bias_prior())
    _assert_same_kl(_kl_with_seed(src), _kl_with_seed(dst))


def test_family_mismatch_names_both_priors() -> None:
    laplace = varlin.LinearVariationalNormal(IN, OUT, True, priors.laplace(), priors.laplace())
    normal = varlin.LinearVariationalNormal(IN, OUT)
    expected = (
        r"^cannot load w_prior: the state holds a Laplace\(loc, scale\) prior, this module's is "
        r"Normal\(loc, scale\); "
    )
    with pytest.raises(RuntimeError, match=expected):
        normal.load_state_dict(laplace.state_dict())
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 1))
    with pytest.raises(RuntimeError, match=r"^cannot load 0\.w_prior: the state holds a Laplace"):
        varlin.to_variational(model).load_state_dict(
            varlin.to_variational(model, prior=priors.laplace()).state_dict()
        )


def test_weight_sized_prior_loads_into_a_default_prior_model_and_back() -> None:
    """MOPED with ``prior_at_weights=True`` and the default N(0, 1): either state, either model."""
    net = nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, 2))
    moped = varlin.to_variational(net, init_scale="moped", prior_at_weights=True)
    plain = varlin.to_variational(net)
    pairs = [
        (moped, varlin.to_variational(net)),
        (plain, varlin.to_variational(net, init_scale="moped", prior_at_weights=True)),
    ]
    for source, target in pairs:
        target.load_state_dict(source.state_dict())
        layers = [*varlin.variational_layers(source)], [*varlin.variational_layers(target)]
        for a, b in zip(*layers, strict=True):
            _assert_same_prior(a.weight_prior(), b.weight_prior())
            _assert_same_prior(a.bias_prior(), b.bias_prior())
            _assert_same_kl(a.kl_divergence(), b.kl_divergence(), a.w_loc.numel() + a.out_features)
        # what was loaded is what is saved again (a scalar prior may be held broadcast)
        again = target.state_dict()
        for key, value in source.state_dict().items():
            assert torch.equal(*torch.broadcast_tensors(again[key], value)), key


def test_saved_prior_tensors_of_a_wrong_shape_are_refused() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT)
    state = layer.state_dict()
    state["w_prior.loc"] = torch.zeros(OUT + 1)
    expected = (
        r"^cannot load w_prior: the saved Normal\(loc, scale\) prior's tensors \(loc \(5,\)\) "
        r"do not make a prior over shape \(3, 4\)$"
    )
    with pytest.raises(RuntimeError, match=expected):
        varlin.LinearVariationalNormal(IN, OUT).load_state_dict(state)


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_written_without_the_family_still_loads(case: str) -> None:
    """A state from before the family was recorded (its ``_extra_state`` keys stripped)."""
    src = varlin.LinearVariationalNormal(
        IN,
        OUT,
        True,
        *STATE_CASES[case],
        generator=torch.Generator(),  # type: ignore[arg-type]
    )
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    assert len(old) < len(src.state_dict())
    dst = varlin.LinearVariationalNormal(
        IN,
        OUT,
        True,
        *STATE_CASES[case],
        generator=torch.Generator(),  # type: ignore[arg-type]
    )
    dst.load_state_dict(old)  # strict: the missing family is not an error
    _assert_same_prior(src.weight_prior(), dst.weight_prior())
    _assert_same_kl(_kl_with_seed(src), _kl_with_seed(dst))


def test_family_record_follows_dtype_and_loads_across_dtypes() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT, True, priors.laplace(), priors.laplace())
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        layer.to(dtype)
        record = layer.state_dict()["w_prior._extra_state"]
        assert record.dtype == dtype
        assert bytes(int(c) for c in record.tolist()).decode() == layer.w_prior.family
    fresh = varlin.LinearVariationalNormal(IN, OUT, True, priors.laplace(), priors.laplace())
    fresh.load_state_dict(layer.double().state_dict())
    assert fresh.w_prior.family == "torch.distributions.laplace.Laplace(loc, scale)"


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_shape", [(), (OUT,), (1, OUT), (IN, 1), (IN, OUT)], ids=lambda s: str(s)
)
def test_broadcastable_batch_shape_is_accepted(batch_shape: tuple[int, ...]) -> None:
    loc = torch.randn(batch_shape)
    layer = varlin.LinearVariationalNormal(
        IN, OUT, make_weights_prior=lambda i, o: Normal(loc, torch.ones(batch_shape))
    )
    prior = layer.weight_prior()
    assert prior.batch_shape == (IN, OUT)
    torch.testing.assert_close(prior.loc, loc.expand(IN, OUT))
    expected = torch.distributions.kl_divergence(layer.weight_posterior(), prior).sum()
    bias_prior, bias_q = layer.bias_prior(), layer.bias_posterior()
    assert bias_prior is not None and bias_q is not None
    expected = expected + torch.distributions.kl_divergence(bias_q, bias_prior).sum()
    torch.testing.assert_close(layer.kl_divergence(), expected)


@pytest.mark.parametrize("batch_shape", [(OUT, IN), (IN + 1, OUT), (2, IN, OUT), (IN,)])
def test_wrong_batch_shape_raises_value_error(batch_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"make_weights_prior.*batch_shape.*\(3, 4\)"):
        varlin.LinearVariationalNormal(
            IN, OUT, make_weights_prior=lambda i, o: Normal(torch.zeros(batch_shape), 1.0)
        )


def test_wrong_bias_batch_shape_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"make_bias_prior.*batch_shape"):
        varlin.LinearVariationalNormal(
            IN, OUT, make_bias_prior=lambda o: Normal(torch.zeros(o + 1), 1.0)
        )


@pytest.mark.parametrize("bad", [torch.zeros(IN, OUT), 1.0, None, "normal"])
def test_factory_returning_non_distribution_raises_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=r"make_weights_prior must return a torch\.distributions"):
        varlin.LinearVariationalNormal(IN, OUT, make_weights_prior=lambda i, o: bad)


def test_non_callable_factory_raises_type_error() -> None:
    with pytest.raises(TypeError, match="make_bias_prior must be callable"):
        varlin.LinearVariationalNormal(IN, OUT, make_bias_prior=Normal(0.0, 1.0))


def test_non_elementwise_prior_raises_value_error() -> None:
    with pytest.raises(ValueError, match="event_shape"):
        varlin.LinearVariationalNormal(
            IN, OUT, make_weights_prior=lambda i, o: Independent(Normal(torch.zeros(i, o), 1.0), 1)
        )
    with pytest.raises(ValueError, match="event_shape"):
        varlin.LinearVariationalNormal(
            IN, OUT, make_bias_prior=lambda o: MultivariateNormal(torch.zeros(o), torch.eye(o))
        )


def test_wrong_dtype_raises_value_error() -> None:
    """A user factory gets only the shape (the seed's signature); a float32 prior for a float64
    layer is refused with a message naming both dtypes, not silently promoted."""
    with pytest.raises(ValueError, match=r"make_weights_prior.*float32.*float64"):
        varlin.LinearVariationalNormal(
            IN, OUT, make_weights_prior=seed_weight_prior, dtype=torch.float64
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_varlin_factories_take_the_layer_dtype(dtype: torch.dtype) -> None:
    layer = varlin.LinearVariationalNormal(
        IN,
        OUT,
        make_weights_prior=priors.scale_mixture(),
        make_bias_prior=priors.normal(2.0),
        dtype=dtype,
    )
    assert all(t.dtype == dtype for t in _prior_tensors(layer).values())
    assert layer.kl_divergence().dtype == dtype


def test_bias_prior_without_bias_raises() -> None:
    with pytest.raises(ValueError, match="bias=False"):
        varlin.LinearVariationalNormal(IN, OUT, bias=False, make_bias_prior=seed_bias_prior)


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (priors.normal, {"scale": 0.0}, "scale"),
        (priors.normal, {"scale": -1.0}, "scale"),
        (priors.laplace, {"scale": float("nan")}, "scale"),
        (priors.scale_mixture, {"mixing": 1.0}, "mixing"),
        (priors.scale_mixture, {"mixing": 0.0}, "mixing"),
        (priors.scale_mixture, {"scale2": 0.0}, "scale2"),
    ],
)
def test_factory_hyperparameters_are_validated(factory, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_factories_are_picklable_and_repr() -> None:
    import pickle

    factory = priors.scale_mixture(0.25, 1.5, 0.01)
    clone = pickle.loads(pickle.dumps(factory))
    assert repr(clone) == repr(factory)
    assert "ScaleMixtureNormal" in repr(factory) and "mixing=0.25" in repr(factory)


# -- the Prior module on other distributions -------------------------------------------------


@pytest.mark.parametrize(
    "dist",
    [
        StudentT(torch.tensor(3.0), torch.zeros(OUT), torch.ones(OUT)),
        Laplace(torch.zeros(IN, 1), torch.full((IN, 1), 0.5)),
        LogNormal(torch.zeros(IN, OUT), torch.ones(IN, OUT)),  # nested: base_dist's tensors
    ],
    ids=["StudentT", "Laplace", "LogNormal-nested"],
)
def test_prior_module_rebuilds_any_distribution_from_buffers(dist: Distribution) -> None:
    prior = Prior(dist, (IN, OUT), name="p")
    value = torch.rand(IN, OUT) + 0.1
    rebuilt = prior()
    assert type(rebuilt) is type(dist)
    assert rebuilt.batch_shape == (IN, OUT)
    torch.testing.assert_close(rebuilt.log_prob(value), dist.expand((IN, OUT)).log_prob(value))
    prior.double()
    assert len(list(prior.buffers())) >= 2
    assert all(b.dtype == torch.float64 for b in prior.buffers())
    lp = prior().log_prob(value.double())
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp.float(), dist.expand((IN, OUT)).log_prob(value))


def test_prior_extra_repr_names_the_distribution() -> None:
    layer = varlin.LinearVariationalNormal(IN, OUT, make_weights_prior=priors.scale_mixture(0.5))
    text = repr(layer.w_prior)
    assert "ScaleMixtureNormal" in text and "mixing=0.5" in text and f"shape={(IN, OUT)}" in text


# -- ScaleMixtureNormal ----------------------------------------------------------------------


def test_scale_mixture_log_prob_matches_mixture_same_family(float64: torch.dtype) -> None:
    """Second route: torch's MixtureSameFamily over two zero-mean Normals, per element."""
    mixing = torch.tensor([0.5, 0.1, 0.9, 0.3])
    scale1 = torch.tensor([1.0, 3.0, 0.5, 1.0])
    scale2 = torch.tensor([math.exp(-6), 0.2, 0.05, 1.0])
    ours = ScaleMixtureNormal(mixing, scale1, scale2)
    reference = MixtureSameFamily(
        Categorical(probs=torch.stack([mixing, 1 - mixing], -1)),
        Normal(torch.zeros(4, 2), torch.stack([scale1, scale2], -1)),
    )
    values = torch.linspace(-8, 8, 161).unsqueeze(-1).expand(161, 4)
    torch.testing.assert_close(
        ours.log_prob(values), reference.log_prob(values), rtol=1e-12, atol=0
    )
    assert ours.batch_shape == (4,)
    torch.testing.assert_close(ours.variance, reference.variance, rtol=1e-12, atol=0)
    assert torch.equal(ours.mean, torch.zeros(4))


def test_scale_mixture_sample_moments(float64: torch.dtype) -> None:
    r"""N = 200 000 samples: mean and variance within failure-rate bounds of the closed form.

    Mean: sd :math:`\sigma/\sqrt N` (CLT). Variance: the sample variance of a non-Gaussian
    distribution has :math:`\operatorname{Var}(s^2) \approx (\mu_4 - \sigma^4)/N` with the
    mixture's fourth moment :math:`\mu_4 = 3(\pi s_1^4 + (1-\pi)s_2^4)`; z at a 1e-6 two-sided
    rate, Bonferroni over 2 x 2 entries.
    """
    n = 200_000
    mixing = torch.tensor([0.5, 0.2])
    s1 = torch.tensor([1.0, 2.0])
    s2 = torch.tensor([0.3, 0.5])
    dist = ScaleMixtureNormal(mixing, s1, s2)
    samples = dist.sample((n,))
    assert samples.shape == (n, 2)
    var = dist.variance
    mu4 = 3 * (mixing * s1**4 + (1 - mixing) * s2**4)
    assert (samples.mean(0).abs() <= mean_tolerance(var, n, 4)).all()
    var_tol = z_bound(4) * torch.sqrt((mu4 - var**2) / n)
    assert ((samples.var(0) - var).abs() <= var_tol).all()


def test_scale_mixture_expand_and_validation() -> None:
    dist = ScaleMixtureNormal(0.5, torch.ones(OUT), 0.1)
    assert dist.batch_shape == (OUT,)
    expanded = dist.expand((IN, OUT))
    assert expanded.batch_shape == (IN, OUT)
    torch.testing.assert_close(
        expanded.log_prob(torch.zeros(IN, OUT))[0], dist.log_prob(0.0 * torch.ones(OUT))
    )
    with pytest.raises(ValueError):
        ScaleMixtureNormal(1.5, 1.0, 0.1, validate_args=True)
    with pytest.raises(ValueError):
        ScaleMixtureNormal(0.5, -1.0, 0.1, validate_args=True)


# -- learned priors (empirical Bayes) ----------------------------------------------------------


def _learned_layer(per_output: bool = False, **kwargs: object) -> varlin.LinearVariationalNormal:
    make = priors.normal(0.7, 0.1, learn_scale=True, per_output=per_output)
    return varlin.LinearVariationalNormal(IN, OUT, True, make, make, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("per_output", [False, True], ids=["per-layer", "per-output"])
@pytest.mark.parametrize("factory", [priors.normal, priors.laplace])
def test_learned_scale_is_a_parameter_stored_unconstrained(factory, per_output: bool) -> None:  # type: ignore[no-untyped-def]
    layer = varlin.LinearVariationalNormal(
        IN, OUT, True, factory(0.7, 0.1, learn_scale=True, per_output=per_output)
    )
    prior = layer.w_prior
    assert prior.learns_scale and not layer.b_prior.learns_scale  # type: ignore[union-attr]
    raw = dict(layer.named_parameters())["w_prior.raw_scale"]
    assert raw.shape == ((OUT,) if per_output else ())
    assert "scale" not in dict(prior.named_buffers())  # the scale is no buffer ...
    assert "w_prior.loc" in layer.state_dict()  # ... the location still is
    torch.testing.assert_close(torch.nn.functional.softplus(raw), torch.full_like(raw, 0.7))
    dist = layer.weight_prior()
    assert dist.batch_shape == (IN, OUT)
    torch.testing.assert_close(dist.scale, torch.full((IN, OUT), 0.7))
    assert prior.family.endswith("(loc, scale)")  # the same family as a fixed prior's
    with torch.no_grad():
        raw.fill_(-3.0)  # any real number is a valid unconstrained value
    assert bool((layer.weight_prior().scale > 0).all())
    layer.double()
    assert raw.dtype == torch.float64 == layer.weight_prior().scale.dtype
    layer.half()
    assert layer.state_dict()["w_prior.raw_scale"].dtype == torch.float16


def test_learned_prior_state_round_trip_and_fixed_states_load_both_ways() -> None:
    """Learned into learned exactly; a fixed prior's state into a learned prior (the learned
    scale starts from the saved value) and a learned prior's into a fixed one (it takes it)."""
    source = _learned_layer()
    with torch.no_grad():
        source.w_prior.raw_scale.fill_(-0.25)  # type: ignore[operator]
    target = _learned_layer()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.w_prior.raw_scale, source.w_prior.raw_scale)  # type: ignore[arg-type]
    assert torch.equal(target.kl_divergence(), source.kl_divergence())

    fixed = varlin.LinearVariationalNormal(IN, OUT, True, priors.normal(0.3, 0.1), priors.normal())
    learned = _learned_layer()
    learned.load_state_dict(fixed.state_dict())
    torch.testing.assert_close(learned.w_prior.tensor("scale"), torch.tensor(0.3))
    torch.testing.assert_close(learned.kl_divergence(), fixed.kl_divergence())
    back = varlin.LinearVariationalNormal(IN, OUT, True, priors.normal(), priors.normal())
    back.load_state_dict(source.state_dict())
    assert not back.w_prior.learns_scale
    torch.testing.assert_close(back.kl_divergence(), source.kl_divergence())
    # An old state, written before the family was recorded, loads into a learned prior too.
    old = {k: v for k, v in fixed.state_dict().items() if not k.endswith("_extra_state")}
    _learned_layer().load_state_dict(old)


def test_learned_prior_states_that_cannot_load_are_one_line_errors() -> None:
    per_output = _learned_layer(per_output=True)
    with pytest.raises(RuntimeError) as info:
        _learned_layer().load_state_dict(per_output.state_dict())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load w_prior: the saved learned scale has shape (4,)")
    assert "build it with the same per_output" in message
    varied = varlin.LinearVariationalNormal(IN, OUT, True, random_normal_prior, priors.normal())
    with pytest.raises(RuntimeError, match=r"^cannot load w_prior: the saved fixed scale \(shape "
                       r"\(3, 4\)\) is not one value across the weights"):  # fmt: skip
        _learned_layer().load_state_dict(varied.state_dict())


def _mixture_factory(in_: int, out_: int) -> Distribution:
    return ScaleMixtureNormal(0.5, 1.0, 0.1)


@pytest.mark.parametrize(
    ("factory", "family"),
    [
        (priors.learned(priors.scale_mixture()), r"ScaleMixtureNormal\(mixing, scale1, scale2\)"),
        (priors.learned(_mixture_factory), r"ScaleMixtureNormal\(mixing, scale1, scale2\)"),
        (priors.learned(lambda i, o: LogNormal(0.0, 1.0)), r"LogNormal\(base_dist__loc, "),
    ],
    ids=["scale-mixture", "user-mixture", "nested-scale"],
)
def test_a_learned_prior_on_a_family_without_a_scale_is_a_one_line_error(
    factory: object, family: str
) -> None:
    with pytest.raises(ValueError) as info:
        varlin.LinearVariationalNormal(IN, OUT, make_weights_prior=factory)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "make_weights_prior: a learned prior scale (learn_scale) needs a prior family with a "
        "'scale' parameter, and "
    )
    assert re.search(family, message)


def test_learned_prior_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^per_output=True needs learn_scale=True"):
        priors.normal(per_output=True)
    with pytest.raises(TypeError, match=r"^learn_scale must be True or False, got 'yes'"):
        priors.laplace(learn_scale="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^factory must be a prior factory"):
        priors.learned(0.5)
    rule = r"^make_bias_prior: a learned prior scale is one per layer, so the starting Normal"
    with pytest.raises(ValueError, match=rule):
        varlin.LinearVariationalNormal(IN, OUT, make_bias_prior=priors.learned(random_bias_prior))
    # per output: a scale varying over the output units is a valid start
    layer = varlin.LinearVariationalNormal(
        IN, OUT, make_bias_prior=priors.learned(random_bias_prior, per_output=True)
    )
    assert layer.b_prior is not None and layer.b_prior.get_parameter("raw_scale").shape == (OUT,)


def test_learned_factories_pickle_and_say_what_they_learn() -> None:
    import pickle

    for factory, text in [
        (priors.normal(0.5, learn_scale=True), "Normal(loc=0, scale=0.5, learn_scale=True)"),
        (
            priors.learned(priors.laplace(2.0), per_output=True),
            "Laplace(loc=0, scale=2, learn_scale=True, per_output=True)",
        ),
        (priors.learned(seed_weight_prior), "learned(<function seed_weight_prior"),
    ]:
        assert repr(factory).startswith(text)
        assert repr(pickle.loads(pickle.dumps(factory))) == repr(factory)
    layer = _learned_layer(per_output=True)
    assert "scale=(4,) learned" in repr(layer.w_prior)
    assert [name for name, _ in priors.learned_priors(layer)] == ["w_prior", "b_prior"]


@pytest.mark.parametrize("per_output", [False, True], ids=["per-layer", "per-output"])
def test_for_a_fixed_posterior_the_learned_scale_is_best_at_the_mean_square(
    per_output: bool, float64: torch.dtype
) -> None:
    r"""For fixed q the KL to :math:`\mathcal N(m, s^2)` is smallest at
    :math:`s^2 = \operatorname{mean}((\mu - m)^2 + \sigma^2)` over the weights ``s`` covers:
    the gradient reaching the prior is 0 there (to rounding) and points towards it elsewhere."""
    layer = _learned_layer(per_output=per_output)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.w_posterior.loc.copy_(torch.randn(IN, OUT, generator=g))
        layer.w_posterior.raw_scale.copy_(torch.randn(IN, OUT, generator=g))
    mu, sigma = layer.w_loc.detach(), layer.w_scale.detach()
    second = ((mu - 0.1).square() + sigma.square()).mean(0 if per_output else None)
    best = second.sqrt()
    raw = layer.w_prior.get_parameter("raw_scale")
    for factor, sign in [(1.0, 0.0), (1.2, 1.0), (1 / 1.2, -1.0)]:
        with torch.no_grad():
            raw.copy_(varlin.functional.inverse_softplus(best * factor))
        (grad,) = torch.autograd.grad(layer.kl_divergence(), [raw])
        if sign == 0.0:
            torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
        else:
            assert bool((torch.sign(grad) == sign).all())


def _conjugate_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = x @ torch.tensor([0.8, -0.5, 0.3, 0.0]) + 0.4 * torch.randn(40, generator=g)
    return x, y


def _maximise_exact_elbo(
    posterior: str, x: torch.Tensor, y: torch.Tensor, **prior: bool
) -> tuple[varlin.VariationalLinear, varlin.likelihoods.Gaussian]:
    """Maximise the exact ELBO (closed-form expected log-likelihood from ``output_moments``)
    over q, the learned prior scale and the noise, full batch, by L-BFGS: no Monte Carlo noise,
    so the optimum is reached to the optimiser's precision."""
    out = 1 if y.dim() == 1 else y.shape[1]
    layer = varlin.VariationalLinear(
        x.shape[1], out, bias=False, posterior=posterior, init_scale=0.1,  # type: ignore[arg-type]
        make_weights_prior=priors.normal(1.0, learn_scale=True, **prior),
    )  # fmt: skip
    likelihood = varlin.likelihoods.Gaussian(1.0, learn_noise=True)
    elbo = varlin.ELBO(likelihood, num_data=len(x))
    optimizer = torch.optim.LBFGS(
        [*layer.parameters(), *likelihood.parameters()], lr=1, max_iter=2000, history_size=50,
        tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = elbo(layer.output_moments(x), y, layer.kl_divergence())
        loss.backward()
        return loss

    for _ in range(5):  # L-BFGS restarts: its stopping rule can fire early on a flat stretch
        optimizer.step(closure)  # type: ignore[arg-type]
    return layer, likelihood


@pytest.mark.usefixtures("single_thread")
def test_a_learned_prior_scale_reaches_the_evidence_maximum_with_a_full_posterior(
    float64: torch.dtype,
) -> None:
    r"""With a family that holds the exact posterior, the ELBO's maximum over (q, prior scale,
    noise) is the exact posterior at the type-II maximum-likelihood prior and noise: the
    ELBO equals the evidence there, and any other (prior, noise) has a lower evidence.

    Reference: ``BayesianLinearRegression(optimize=True)`` (MacKay's updates) with flat
    hyper-priors (``(0, 0)``, so it maximises the evidence itself) and no intercept (the layer
    has no bias: the same model, the same objective).
    """
    x, y = _conjugate_problem()
    layer, likelihood = _maximise_exact_elbo("full", x, y)
    exact = varlin.BayesianLinearRegression(
        optimize=True, tol=1e-14, max_iter=100_000,
        noise_precision_prior=(0, 0), weight_precision_prior=(0, 0),
    ).fit(x, y)  # fmt: skip
    assert exact.converged
    scale = layer.w_prior.tensor("scale").detach()
    torch.testing.assert_close(scale, exact.prior_precision.rsqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        likelihood.noise_scale.detach(), exact.noise_precision.rsqrt(), rtol=1e-6, atol=0
    )
    mean, cov = layer.w_posterior.dense(layer._realise())
    torch.testing.assert_close(mean.detach(), exact.mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(cov.detach(), exact.covariance, rtol=1e-5, atol=1e-8)
    elbo = varlin.ELBO(likelihood, num_data=len(x))
    loss = elbo(layer.output_moments(x), y, layer.kl_divergence()).detach()
    torch.testing.assert_close(-loss * len(x), exact.log_evidence(), rtol=1e-9, atol=0)


def _mean_field_optimum(
    x: torch.Tensor, y: torch.Tensor, per_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The optimum of the exact mean-field ELBO over (q, prior scales, noise), by coordinate
    ascent: q given the scales is ``mean_field_optimum()`` (per output column); the scales
    given q are :math:`s^2 = \operatorname{mean}(\mu^2 + v)` (per column with ``per_output``)
    and :math:`\sigma^2 = (\lVert y - X\mu\rVert^2 + \sum_i (X^\top X)_{ii} v_i) / n`."""
    y2 = y if y.dim() == 2 else y.unsqueeze(-1)
    k = y2.shape[1]
    scale, noise = torch.ones(k if per_output else 1), torch.tensor(1.0)
    for _ in range(10_000):
        mus, variances = [], []
        for j in range(k):
            s = scale[j] if per_output else scale[0]
            blr = varlin.BayesianLinearRegression(float(s), float(noise)).fit(x, y2[:, j])
            q = blr.mean_field_optimum()
            mus.append(q.loc)
            variances.append(q.scale.square())
        mu, v = torch.stack(mus, -1), torch.stack(variances, -1)  # (d, k)
        second = mu.square() + v
        new_scale = (second.mean(0) if per_output else second.mean().reshape(1)).sqrt()
        sse = (y2 - x @ mu).square().sum() + (x.square().sum(0)[:, None] * v).sum()
        new_noise = (sse / y2.numel()).sqrt()
        done = (new_scale - scale).abs().max() < 1e-15 and (new_noise - noise).abs() < 1e-15
        scale, noise = new_scale, new_noise
        if done:
            break
    return scale, noise


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("per_output", [False, True], ids=["per-layer", "per-output"])
def test_a_learned_prior_scale_reaches_the_mean_field_optimum(
    per_output: bool, float64: torch.dtype
) -> None:
    """Mean-field: the learned scale(s) and noise are the maximiser of the exact mean-field ELBO
    (a second route: coordinate ascent on closed forms), not the evidence maximiser, which this
    family cannot reach (they differ by ~1e-3 here, well above the tolerance)."""
    x, y = _conjugate_problem()
    if per_output:  # two outputs on their own scales: one prior scale each
        y = torch.stack([y, 3 * x[:, 1] - 0.2 * x[:, 3] + 0.4 * torch.randn(40)], -1)
    layer, likelihood = _maximise_exact_elbo("meanfield", x, y, per_output=per_output)
    scale, noise = _mean_field_optimum(x, y, per_output)
    learned = layer.w_prior.tensor("scale").detach().reshape(-1)
    torch.testing.assert_close(learned, scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(likelihood.noise_scale.detach(), noise, rtol=1e-6, atol=0)
    if not per_output:
        exact = varlin.BayesianLinearRegression(
            optimize=True, tol=1e-14, max_iter=100_000,
            noise_precision_prior=(0, 0), weight_precision_prior=(0, 0),
        ).fit(x, y)  # fmt: skip
        assert abs(float(learned / exact.prior_precision.rsqrt()) - 1) > 1e-4


# -- learned scales in fit's history and diagnostics ------------------------------------------
def _regression(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)


def _learned_net(per_output: bool = False) -> torch.nn.Sequential:
    prior = priors.normal(2.0, learn_scale=True, per_output=per_output)
    return torch.nn.Sequential(
        varlin.VariationalLinear(3, 8, make_weights_prior=prior, make_bias_prior=prior),
        torch.nn.ReLU(),
        varlin.VariationalLinear(8, 1, make_weights_prior=priors.normal(1.0)),
    )


def test_learned_scales_names_every_learned_prior_and_averages_per_output() -> None:
    net = _learned_net(per_output=True)
    with torch.no_grad():
        net[0].w_prior.raw_scale.copy_(inverse_softplus(torch.arange(1.0, 9.0)))
    scales = priors.learned_scales(net)
    assert list(scales) == ["0.w_prior", "0.b_prior"]  # the fixed prior of layer 2 is not one
    assert scales["0.w_prior"] == pytest.approx(4.5, rel=1e-6)  # mean of 1..8
    assert scales["0.b_prior"] == pytest.approx(2.0, rel=1e-6)
    assert priors.learned_scales(varlin.VariationalLinear(3, 1)) == {}


def test_fit_records_the_learned_prior_scales_every_epoch() -> None:
    x, y = _regression()
    torch.manual_seed(0)
    net = _learned_net()
    lik = varlin.likelihoods.Gaussian(0.5, learn_noise=True)
    history = varlin.fit(
        net, x, y, likelihood=lik, epochs=5, batch_size=16, lr=5e-2, progress=False
    )
    column = history["prior_scale.0.w_prior"]
    assert len(column) == 5 and len(history["prior_scale.0.b_prior"]) == 5
    # The record is the scale after the epoch: the last one is the model's final scale, and it
    # moved from where it started (2.0): the KL's gradient reached the prior.
    assert column[-1] == priors.learned_scales(net)["0.w_prior"]
    assert abs(column[0] - 2.0) > 1e-3 and column[0] != column[-1]
    # A model with fixed priors has no such column.
    fixed = varlin.fit(
        torch.nn.Sequential(varlin.VariationalLinear(3, 1)), x, y,
        likelihood=varlin.likelihoods.Gaussian(0.5), epochs=1, progress=False,
    )  # fmt: skip
    assert not any(key.startswith("prior_scale.") for key in fixed.records[0])


def test_fit_ensemble_records_each_models_own_learned_scales() -> None:
    x, y = _regression()
    torch.manual_seed(0)
    nets = [_learned_net(), _learned_net()]
    liks = [varlin.likelihoods.Gaussian(0.5, learn_noise=True) for _ in nets]
    ys = [y, 3 * y]  # different targets: different evidence, different scales
    histories = varlin.fit_ensemble(
        nets, [x, x], ys, likelihoods=liks, epochs=4, batch_size=16, lr=5e-2, progress=False,
        seeds=[0, 1],
    )  # fmt: skip
    finals = [h["prior_scale.0.w_prior"][-1] for h in histories]
    assert finals == [priors.learned_scales(net)["0.w_prior"] for net in nets]
    assert finals[0] != finals[1]


def test_a_collapsed_learned_prior_scale_is_diagnosed() -> None:
    x, y = _regression()
    net = _learned_net()
    history = varlin.History(records=[{"epoch": 0.0, "nll": 1.0, "kl_term": 0.0}])
    with torch.no_grad():
        net[0].w_prior.raw_scale.fill_(-30.0)  # softplus(-30) ~ 1e-13
    with pytest.warns(VarlinWarning, match=r"learned prior scale 0\.w_prior collapsed"):
        diagnose(net, history, None, 0, None)
    with torch.no_grad():
        net[0].w_prior.raw_scale.fill_(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VarlinWarning)
        diagnose(net, history, None, 0, None)  # a healthy scale: nothing to say
