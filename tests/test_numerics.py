"""Numerics: the layers, the KL and the ELBO stay finite and correct at extreme but legal settings.

The grid: float64, float32, and bfloat16 / float16 under CPU autocast (parameters stay float32,
matrix products run in the low precision); posterior scales from 1e-8 to 1e3; prior scales from
1e-4 to 1e4; inputs of magnitude 1 and 1e4. Every value is compared with a float64 reference
under an error bound derived from the dtype's machine epsilon, not a tuned tolerance:

- a matrix product of ``n`` terms is within ``(n + 2) * eps * (|x| @ |W| + |b|)`` of the exact
  one (Higham's bound for a dot product, plus the rounding of both inputs to the low precision);
- the KL, a sum of terms ``r^2 - 1 - 2 log r + shift^2``, is within ``64 * eps`` times the sum
  of the terms' magnitudes (a few roundings per term; cancellation is bounded by the magnitudes).

Outputs are required to be finite only where the exact output is representable in the dtype:
with inputs ``|x| <= X`` and weights drawn within 6 standard deviations of their mean,
``|y| <= X * in * (1/sqrt(in) + 6 sigma) + ...`` (:func:`output_bound`); float16 (max 65504)
cannot hold ``y`` for ``X = 1e4`` and ``sigma >= 1`` (the exact output is ~1e5 .. 1e8), and those
combinations are excluded from the float16 checks, as are float16 gradients whose exact value
exceeds 65504 (the backward GEMM ``x^T @ dL/dy`` with ``|x| = 1e4``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import varlin
import varlin._validation as V
from varlin import priors
from varlin.kl import normal_kl, normal_kl_sum
from varlin.likelihoods import Gaussian

IN, OUT, BATCH = 8, 4, 16
ESTIMATORS = ("reparameterization", "local", "flipout")
PRIOR_SCALES = (1e-4, 1e-2, 1.0, 1e2, 1e4)
POSTERIOR_SCALES = (1e-8, 1e-2, 1.0, 1e3)
INPUT_MAGNITUDES = (1.0, 1e4)
#: name -> (parameter dtype, autocast dtype or None)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "float64": (torch.float64, None),
    "float32": (torch.float32, None),
    "bfloat16": (torch.float32, torch.bfloat16),
    "float16": (torch.float32, torch.float16),
}
F16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _precision(name: str) -> Iterator[None]:
    autocast = PRECISIONS[name][1]
    if autocast is None:
        yield
    else:
        with torch.autocast("cpu", dtype=autocast):
            yield


def _compute_dtype(name: str) -> torch.dtype:
    param, autocast = PRECISIONS[name]
    return autocast or param


def output_bound(x_mag: float, posterior_scale: float, in_features: int) -> float:
    """``max |y|`` for ``|x| <= x_mag``, ``|loc| <= 1/sqrt(in)`` and ``|eps| <= 6``."""
    weight = in_features**-0.5 + 6 * posterior_scale
    return x_mag * in_features * weight + weight


def _representable(name: str, x_mag: float, posterior_scale: float, out: int) -> tuple[bool, bool]:
    """(output representable, MSE-loss gradient representable) in the compute dtype."""
    if name != "float16":
        return True, True  # bfloat16 has float32's range
    y = output_bound(x_mag, posterior_scale, IN)
    # d(mean (y^2)/2)/dW = x^T y / (BATCH * out): at most x_mag * y / out per entry.
    return y < F16_MAX, y < F16_MAX and x_mag * y / out < F16_MAX


def _matmul_rtol(name: str) -> float:
    return (IN + 2) * torch.finfo(_compute_dtype(name)).eps


def _inputs(x_mag: float, dtype: torch.dtype, rows: int = BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return ((torch.rand(rows, IN, generator=g, dtype=torch.float64) * 2 - 1) * x_mag).to(dtype)


def _kl_reference(layer: varlin.LinearVariationalNormal, prior_scale: float) -> tuple[float, float]:
    """float64 KL through torch's registry (a second route), and the sum of term magnitudes."""
    total = magnitude = 0.0
    for q in (layer.weight_posterior(), layer.bias_posterior()):
        assert q is not None
        loc, scale = q.loc.detach().double(), q.scale.detach().double()
        p = Normal(torch.zeros_like(loc), torch.full_like(scale, prior_scale))
        total += float(kl_divergence(Normal(loc, scale), p).sum())
        ratio = scale / prior_scale
        magnitude += float((ratio**2 + 1 + 2 * ratio.log().abs() + (loc / prior_scale) ** 2).sum())
    return total, magnitude


def _kl_atol(param_dtype: torch.dtype, magnitude: float) -> float:
    return 64 * torch.finfo(param_dtype).eps * magnitude


GRID = list(
    itertools.product(PRECISIONS, ESTIMATORS, PRIOR_SCALES, POSTERIOR_SCALES, INPUT_MAGNITUDES)
)


@pytest.mark.parametrize(
    ("precision", "estimator", "prior_scale", "posterior_scale", "x_mag"), GRID
)
def test_layer_is_finite_and_correct(
    precision: str, estimator: str, prior_scale: float, posterior_scale: float, x_mag: float
) -> None:
    param_dtype = PRECISIONS[precision][0]
    layer = varlin.LinearVariationalNormal(
        IN, OUT, True, priors.normal(prior_scale), priors.normal(prior_scale),
        estimator=estimator, init_scale=posterior_scale, dtype=param_dtype,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    x = _inputs(x_mag, param_dtype)
    with _precision(precision):
        y, kl = layer(x, kl_weight=1.0)
        with varlin.deterministic(layer):
            y_mean, _ = layer(x, kl_weight=1.0)

    # The KL: finite, >= 0, the float64 closed form; never touched by autocast.
    assert kl.dtype == param_dtype
    reference, magnitude = _kl_reference(layer, prior_scale)
    assert math.isfinite(float(kl.detach())) and float(kl.detach()) >= 0
    assert abs(float(kl.detach()) - reference) <= _kl_atol(param_dtype, magnitude)

    output_ok, gradient_ok = _representable(precision, x_mag, posterior_scale, OUT)
    if not output_ok:
        return  # the exact output exceeds float16's range (see the module docstring)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(y_mean).all())
    # Deterministic mode is the posterior-mean map, to the dtype's GEMM error bound.
    w, b = layer.w_loc.detach().double(), layer.b_loc.detach().double()  # type: ignore[union-attr]
    exact = x.double() @ w + b
    scale = x.double().abs() @ w.abs() + b.abs()
    assert bool(((y_mean.double() - exact).abs() <= _matmul_rtol(precision) * scale).all())

    if gradient_ok:
        loss = y.float().square().mean() / 2 + kl / 1000
        loss.backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name


ELBO_GRID = list(itertools.product(PRECISIONS, PRIOR_SCALES, POSTERIOR_SCALES, INPUT_MAGNITUDES))


@pytest.mark.parametrize(("precision", "prior_scale", "posterior_scale", "x_mag"), ELBO_GRID)
def test_elbo_is_finite_and_correct(
    precision: str, prior_scale: float, posterior_scale: float, x_mag: float
) -> None:
    param_dtype = PRECISIONS[precision][0]
    num_data = 1000
    layer = varlin.VariationalLinear(
        IN, 1, True, priors.normal(prior_scale), priors.normal(prior_scale), estimator="local",
        init_scale=posterior_scale, dtype=param_dtype, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    x = _inputs(x_mag, param_dtype)
    target = torch.randn(BATCH, generator=torch.Generator().manual_seed(2), dtype=param_dtype)
    elbo = varlin.ELBO(Gaussian(1.0, dtype=param_dtype), num_data)
    with _precision(precision):
        kl = varlin.kl_divergence(layer)
        sampled = elbo.terms(layer(x), target, kl)
        with varlin.deterministic(layer):
            mean_loss = elbo(layer(x), target, varlin.kl_divergence(layer))

    kl_reference, magnitude = _kl_reference(layer, prior_scale)  # type: ignore[arg-type]
    kl_atol = _kl_atol(param_dtype, magnitude)
    assert math.isfinite(float(sampled.kl.detach())) and float(sampled.kl.detach()) >= 0
    assert abs(float(sampled.kl.detach()) - kl_reference) <= kl_atol
    assert float(sampled.kl_term.detach()) == pytest.approx(
        float(sampled.kl.detach()) / num_data, rel=1e-6
    )

    output_ok, _ = _representable(precision, x_mag, posterior_scale, 1)
    if not output_ok:
        return
    assert math.isfinite(float(sampled.loss.detach())) and math.isfinite(
        float(sampled.nll.detach())
    )
    # Deterministic ELBO vs float64: propagate the output bound delta through r^2 / 2.
    w, b = layer.w_loc.detach().double(), layer.b_loc.detach().double()  # type: ignore[union-attr]
    y = (x.double() @ w + b).squeeze(-1)
    delta = _matmul_rtol(precision) * (x.double().abs() @ w.abs() + b.abs()).squeeze(-1)
    residual = (target.double() - y).abs()
    nll_reference = float((0.5 * math.log(2 * math.pi) + residual**2 / 2).mean())
    bound = float((delta * (2 * residual + delta) / 2).mean()) + kl_atol / num_data
    reference = nll_reference + kl_reference / num_data
    loss_eps = torch.finfo(torch.float32 if precision != "float64" else torch.float64).eps
    assert abs(float(mean_loss.detach()) - reference) <= bound + 8 * loss_eps * abs(reference)


@pytest.mark.parametrize(
    ("precision", "prior_scale", "posterior_scale", "x_mag"),
    [
        case
        for case in ELBO_GRID
        if case[1] == 1.0  # the prior does not enter the output moments
    ],
)
def test_output_moments_are_finite_and_correct(
    precision: str, prior_scale: float, posterior_scale: float, x_mag: float
) -> None:
    """The closed-form path (``layer.output_moments``, the Gaussian ELBO's exact expectation)."""
    param_dtype = PRECISIONS[precision][0]
    layer = varlin.VariationalLinear(IN, 1, init_scale=posterior_scale, dtype=param_dtype)
    x = _inputs(x_mag, param_dtype)
    with _precision(precision):
        moments = layer.output_moments(x)
        loss = varlin.ELBO(Gaussian(1.0, dtype=param_dtype), 100)(
            moments, torch.zeros(BATCH, dtype=param_dtype), varlin.kl_divergence(layer)
        )
    exact_var = (x.double() ** 2) @ layer.w_scale.detach().double() ** 2 + float(
        layer.b_scale.detach().double() ** 2  # type: ignore[union-attr]
    )
    # No cancellation in a sum of squares: the relative GEMM bound applies to the variance.
    assert bool(torch.isfinite(moments.scale).all()) and math.isfinite(float(loss.detach()))
    rel = (moments.variance.detach().double() - exact_var).abs() / exact_var
    assert float(rel.max()) <= 2 * _matmul_rtol(precision)


@pytest.mark.parametrize(
    "x_mag",
    [1.0, 1e4],
)
def test_closed_form_predictive_under_float16_autocast(x_mag: float) -> None:
    """``predict``'s exact Bayesian-last-layer path runs ``(h * h) @ scale**2`` like the layer."""
    head = varlin.VariationalLinear(IN, 1, init_scale=1e-2)
    x = _inputs(x_mag, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        pred = varlin.predict(head, x, likelihood=Gaussian(1.0), method="closed_form")
    exact = (x.double() ** 2) @ head.w_scale.detach().double() ** 2 + float(
        head.b_scale.detach().double() ** 2  # type: ignore[union-attr]
    )
    assert bool(torch.isfinite(pred.epistemic).all())
    rel = (pred.epistemic.double() - exact.squeeze(-1)).abs() / exact.squeeze(-1)
    assert float(rel.max()) <= 2 * _matmul_rtol("float16")


# -- the KL on its own -------------------------------------------------------------------------

KL_SCALES = (1e-8, 1e-4, 1e-2, 1.0, 1e2, 1e4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_normal_kl_matches_the_float64_closed_form(dtype: torch.dtype) -> None:
    """``normal_kl`` and ``normal_kl_sum`` vs torch's registry in float64, all scale pairs.

    float16 holds scales only from ~6e-8 (subnormal) to 65504, and ``(r^2)`` overflows beyond
    r = 256: its grid is the pairs whose every intermediate is representable.
    """
    pairs = [
        (q, p)
        for q, p in itertools.product(KL_SCALES, KL_SCALES)
        if dtype != torch.float16
        or (1e-4 <= q <= 1e2 and 1e-4 <= p <= 1e2 and 1e-2 <= q / p <= 1e2)
    ]
    q_scale = torch.tensor([q for q, _ in pairs], dtype=torch.float64)
    p_scale = torch.tensor([p for _, p in pairs], dtype=torch.float64)
    q_loc = torch.linspace(-1, 1, len(pairs), dtype=torch.float64) * p_scale
    p_loc = torch.zeros_like(q_loc)
    reference = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
    ratio = q_scale / p_scale
    magnitude = ratio**2 + 1 + 2 * ratio.log().abs() + ((q_loc - p_loc) / p_scale) ** 2
    atol = 64 * torch.finfo(dtype).eps * magnitude

    args = [t.to(dtype) for t in (q_loc, q_scale, p_loc, p_scale)]
    elementwise = normal_kl(*args)
    assert bool(torch.isfinite(elementwise).all()) and bool((elementwise >= 0).all())
    assert bool(((elementwise.double() - reference).abs() <= atol).all())
    total = normal_kl_sum(*args)
    assert math.isfinite(float(total.detach())) and float(total.detach()) >= 0
    assert abs(float(total.detach()) - float(reference.sum())) <= float(atol.sum())


def test_kl_is_zero_when_posterior_equals_prior() -> None:
    """The clamp keeps the exact minimum: no -1e-7 from rounding near r = 1."""
    for dtype in (torch.float64, torch.float32):
        layer = varlin.LinearVariationalNormal(50, 40, init_scale=1.0, dtype=dtype)
        with torch.no_grad():
            layer.w_posterior.loc.zero_()
            layer.b_posterior.loc.zero_()  # type: ignore[union-attr]
        kl = layer.kl_divergence()
        assert float(kl.detach()) >= 0
        assert float(kl.detach()) <= 64 * torch.finfo(dtype).eps * (50 * 40 + 40)


def test_half_precision_layer_kl_does_not_overflow() -> None:
    """``layer.half()``: 90,000 weights x ~4 nats each is ~4e5 > 65504, float16's maximum."""
    layer = varlin.VariationalLinear(300, 300)
    reference = float(layer.kl_divergence().detach())
    kl = layer.half().kl_divergence()
    assert math.isfinite(float(kl.detach()))
    assert float(kl.detach()) == pytest.approx(reference, rel=1e-2)


@pytest.mark.parametrize("prior", ["normal", "laplace", "scale_mixture"])
def test_half_precision_kl_is_summed_in_float32_for_every_prior_family(prior: str) -> None:
    """``layer.half()`` with a Laplace or scale-mixture prior: the KL (~3.5e5 here) is finite.

    Every prior family follows the Normal's rule: float16 terms computed and summed in float32.
    The reference is the float32 layer with the same noise (the scale mixture's KL is a Monte
    Carlo estimate; both draw from one seed). Bound: float16 rounds each parameter to within
    ``eps/2`` of its value; ``raw_scale`` (about -4.6) then moves ``log sigma`` by at most
    ``2**-9`` per weight, about 5e-4 of its ~4-nat term, within ``eps`` (9.8e-4) relatively.
    """
    factory = getattr(priors, prior)()
    layer = varlin.VariationalLinear(
        300, 300, make_weights_prior=factory, make_bias_prior=factory,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert layer.generator is not None
    layer.generator.manual_seed(2)
    reference = float(layer.kl_divergence().detach())
    layer.half()
    layer.generator.manual_seed(2)
    kl = layer.kl_divergence()
    assert kl.dtype == torch.float32
    assert math.isfinite(float(kl.detach())) and float(kl.detach()) > F16_MAX
    assert float(kl.detach()) == pytest.approx(reference, rel=torch.finfo(torch.float16).eps)
    kl.backward()  # the gradient reaches the float16 parameters
    grad = layer.w_posterior.raw_scale.grad
    assert grad is not None and grad.dtype == torch.float16 and bool(torch.isfinite(grad).all())


# -- scales at their floor ---------------------------------------------------------------------

#: Raw scales below softplus's underflow (about -104 in float32, -745 in float64).
RAW_FLOOR_SCALES = (-1e4, -800.0, -200.0, -110.0)


@pytest.mark.parametrize("prior", ["normal", "laplace", "scale_mixture"])
@pytest.mark.parametrize("raw", RAW_FLOOR_SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_posterior_scale_never_reaches_zero(
    precision: str, estimator: str, raw: float, prior: str
) -> None:
    """softplus underflows to 0, the scale does not: it stops at the dtype's smallest normal
    number, where the output and the KL (closed form or Monte Carlo) are finite, the Normal
    prior's KL is the float64 closed form at that scale (the grid's error bound; written with
    log-scales, as torch's squares the scale ratio to 0 there) and the gradients are finite.
    (Not for the Laplace prior: torch's closed form against a Normal differentiates
    ``exp(-(loc / scale)**2 / 2)`` into ``0 * inf`` once ``loc / scale`` overflows; its value
    stays finite.)"""
    param_dtype = PRECISIONS[precision][0]
    factory = getattr(priors, prior)()
    layer = varlin.LinearVariationalNormal(
        IN, OUT, True, factory, factory, estimator=estimator, dtype=param_dtype,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    with torch.no_grad():
        layer.w_posterior.raw_scale.fill_(raw)
    tiny = torch.finfo(param_dtype).tiny
    assert float(layer.w_scale.detach().min()) >= tiny
    with _precision(precision):
        y, kl = layer(_inputs(1.0, param_dtype), kl_weight=1.0)
    assert bool(torch.isfinite(y).all())
    assert math.isfinite(float(kl.detach()))
    if prior == "laplace":
        return
    if prior == "normal":
        reference = magnitude = 0.0
        for q in (layer.weight_posterior(), layer.bias_posterior()):
            assert q is not None
            loc, scale = q.loc.detach().double(), q.scale.detach().double()
            reference += float((-scale.log() + (scale**2 + loc**2) / 2 - 0.5).sum())
            magnitude += float((scale**2 + 1 + 2 * scale.log().abs() + loc**2).sum())
        assert abs(float(kl.detach()) - reference) <= _kl_atol(param_dtype, magnitude)
    (y.float().square().mean() + kl / 1000).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name


@pytest.mark.parametrize("offset", [0.0, 0.5])
@pytest.mark.parametrize("raw", (*RAW_FLOOR_SCALES, -20.0, 0.0, 20.0))
@pytest.mark.parametrize("likelihood", ["heteroscedastic", "learned-gaussian"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_noise_scale_at_its_floor_gives_no_nan(
    precision: str, likelihood: str, raw: float, offset: float
) -> None:
    """``HeteroscedasticGaussian(min_scale=0)`` and a learned Gaussian noise with the raw scale
    far below softplus's underflow: the noise scale stops at the square root of the dtype's
    smallest normal number, so the log density and the ELBO are never NaN (finite at the mean;
    finite or -inf away from it), and neither is the gradient where the loss is finite."""
    dtype = _compute_dtype(precision)
    target = torch.full((BATCH,), offset, dtype=dtype)
    if likelihood == "heteroscedastic":
        lik: varlin.likelihoods.Likelihood = varlin.likelihoods.HeteroscedasticGaussian(
            min_scale=0.0
        )
        output = torch.zeros(BATCH, 2, dtype=dtype)
        output[:, 1] = raw
    else:
        lik = Gaussian(1.0, learn_noise=True, dtype=dtype)
        with torch.no_grad():
            lik.raw_noise_scale.fill_(raw)  # type: ignore[operator]
        output = torch.zeros(BATCH, 1, dtype=dtype)
    output.requires_grad_(True)
    with _precision(precision):
        log_prob = lik(output).log_prob(target)
        terms = varlin.ELBO(lik, 100).terms(output, target, torch.zeros((), dtype=dtype))
    assert not bool(torch.isnan(log_prob).any()) and not math.isnan(float(terms.loss.detach()))
    if offset == 0.0:
        assert bool(torch.isfinite(log_prob).all())
    if math.isfinite(float(terms.loss.detach())):
        terms.loss.backward()
        assert output.grad is not None and not bool(torch.isnan(output.grad).any())


# -- non-finite input: reported when validating, free when not -------------------------------

NON_FINITE = (math.nan, math.inf, -math.inf)


def _poisoned(value: float, shape: tuple[int, ...] = (4, 3)) -> torch.Tensor:
    x = torch.randn(shape)
    x.view(-1)[min(5, x.numel() - 1)] = value
    return x


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_non_finite_input_is_a_clear_error_when_validating(estimator: str, value: float) -> None:
    match = r"x must be finite, got Tensor of shape \(4, 3\) and dtype torch.float32 with 1 "
    with varlin.validation():
        with pytest.raises(ValueError, match=match + "non-finite entries"):
            varlin.LinearVariationalNormal(3, 2, estimator=estimator)(_poisoned(value))
        with pytest.raises(ValueError, match=match):
            varlin.VariationalLinear(3, 2, estimator=estimator)(_poisoned(value))
        with pytest.raises(ValueError, match=match):
            varlin.predict(varlin.VariationalLinear(3, 1, estimator=estimator), _poisoned(value))
        with pytest.raises(ValueError, match=r"target must be finite"):
            varlin.ELBO(Gaussian(), 10)(torch.zeros(4), _poisoned(value, (4,)), torch.tensor(0.0))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_non_finite_input_is_not_checked_when_validation_is_off(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off (the default): no check runs, so NaN passes through to the output, silently."""
    calls = []
    real = V.check_finite
    monkeypatch.setattr(V, "check_finite", lambda *a: calls.append(a) or real(*a))
    assert not V.is_validating()
    layer = varlin.LinearVariationalNormal(3, 2, estimator=estimator)
    y, kl = layer(_poisoned(math.nan), kl_weight=torch.tensor(-1.0))  # neither is read
    assert bool(y[1].isnan().all()) and bool(torch.isfinite(y[0]).all())
    varlin.predict(varlin.VariationalLinear(3, 1, estimator=estimator), _poisoned(math.inf))
    assert calls == []
    with varlin.validation(), pytest.raises(ValueError):
        layer(_poisoned(math.nan))
    assert len(calls) == 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_validation_off_reads_no_tensor_values(estimator: str) -> None:
    """The proof that off costs no device sync: on the 'meta' device no value can be read.

    A meta tensor has a shape and no data; ``.item()``/``bool()`` (a sync on a GPU) raise. The
    forward, the KL, the ELBO and the predictive all run on meta with validation off, and the
    first value check fails on it once validation is on.
    """
    layer = varlin.LinearVariationalNormal(3, 2, estimator=estimator, device="meta")
    x = torch.empty(4, 3, device="meta")
    y, kl = layer(x, kl_weight=torch.tensor(0.5, device="meta"))
    assert y.shape == (4, 2) and y.device.type == "meta" and kl.shape == ()
    model = torch.nn.Sequential(
        varlin.VariationalLinear(3, 5, estimator=estimator, device="meta"),
        torch.nn.ReLU(),
        varlin.VariationalLinear(5, 1, estimator=estimator, device="meta"),
    )
    likelihood = Gaussian(0.5, device="meta")
    loss = varlin.ELBO(likelihood, 100)(
        model(x), torch.empty(4, device="meta"), varlin.kl_divergence(model)
    )
    assert loss.device.type == "meta"
    assert varlin.predict(model, x, num_samples=3, likelihood=likelihood).mean.shape == (4,)
    with varlin.validation(), pytest.raises(RuntimeError, match="meta"):
        layer(x)


def test_the_validation_switch_is_scoped() -> None:
    assert not V.is_validating()
    with varlin.validation():
        assert V.is_validating()
        with varlin.validation(False):
            assert not V.is_validating()
        assert V.is_validating()
        with pytest.raises(KeyError), varlin.validation(False):
            raise KeyError
        assert V.is_validating()  # restored after an exception, too
    assert not V.is_validating()
