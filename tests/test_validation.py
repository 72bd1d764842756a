"""Every public constructor and function rejects bad arguments with a clear message.

Each entry of :data:`BAD_INPUTS` is one bad call and the error it must raise: a ``ValueError`` or
``TypeError`` whose message names the argument and the rule (and the value, shape or dtype it
got), as torch's distribution validation does. Value checks (NaN targets, class indices out of
range) run only inside ``varlin.validation()``; those cases are wrapped in :func:`_validating`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributions import (
    Categorical,
    Gamma,
    Laplace,
    MultivariateNormal,
    Normal,
    Uniform,
)

import varlin
from varlin import metrics, priors
from varlin.conjugate import BayesianLinearRegression
from varlin.likelihoods import Bernoulli, Gaussian, HeteroscedasticGaussian
from varlin.likelihoods import Categorical as CategoricalLikelihood

LVN = varlin.LinearVariationalNormal
VL = varlin.VariationalLinear
NAN, INF = math.nan, math.inf


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _validating(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` run inside ``varlin.validation()`` (value checks on)."""

    def run() -> object:
        with varlin.validation():
            return call()

    return run


def _case(
    case_id: str,
    call: Callable[[], object],
    error: type[Exception],
    match: str,
) -> Any:
    return pytest.param(call, error, match, id=case_id)


# -- builders (called inside each case, so that collection stays cheap) ----------------------
def _normal(*shape: int, **factory: Any) -> Normal:
    # validate_args=False: torch's own argument check reads values (.item() fails on 'meta').
    return Normal(torch.zeros(shape, **factory), torch.ones(shape, **factory), validate_args=False)


def _mlp() -> nn.Sequential:
    return nn.Sequential(VL(3, 4), nn.ReLU(), VL(4, 1))


def _classifier() -> nn.Sequential:
    return nn.Sequential(VL(3, 4), nn.ReLU(), VL(4, 3))


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape or (5, 3), dtype=dtype)


def _elbo(**kwargs: Any) -> Any:
    elbo = varlin.ELBO(Gaussian(0.5), 100)
    args = {"output": torch.zeros(4, 1), "target": torch.zeros(4), "kl": torch.tensor(1.0)}
    args.update(kwargs)
    return elbo(args.pop("output"), args.pop("target"), args.pop("kl"), **args)


def _regression_prediction() -> Any:
    return varlin.predict(_mlp(), _x(), num_samples=4, likelihood=Gaussian(0.5))


def _classification_prediction() -> Any:
    return varlin.predict(_classifier(), _x(), num_samples=4, likelihood=CategoricalLikelihood())


_DATA = torch.Generator().manual_seed(0)
FIT_X, FIT_Y = torch.randn(8, 3, generator=_DATA), torch.randn(8, generator=_DATA)


def _fit(**kwargs: Any) -> Any:
    args: dict[str, Any] = {
        "x": FIT_X,
        "y": FIT_Y,
        "likelihood": Gaussian(0.5),
        "epochs": 1,
        "batch_size": 8,
        "progress": False,
    }
    args.update(kwargs)
    model = args.pop("model", None) or _mlp()
    return varlin.fit(model, args.pop("x"), args.pop("y"), **args)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def _blr() -> BayesianLinearRegression:
    X = torch.randn(10, 3, dtype=torch.float64)
    return BayesianLinearRegression().fit(X, torch.randn(10, dtype=torch.float64))


X64 = torch.randn(10, 3, generator=_DATA, dtype=torch.float64)
Y64 = torch.randn(10, generator=_DATA, dtype=torch.float64)

# -- the cases ----------------------------------------------------------------------------------
POSITIVE_INT = r"must be a positive integer, got "
BAD_COUNTS = [0, -1, 2.5, True, "3", None, 3.0, torch.tensor(3)]


def _count_error(value: object) -> type[Exception]:
    """A wrong type is a TypeError, a wrong int a ValueError (as for torch's arguments)."""
    return ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError


def _layer_cases() -> list[Any]:
    cases = []
    for cls in (LVN, VL):
        name = cls.__name__
        for value in BAD_COUNTS:
            error = _count_error(value)
            cases.append(
                _case(
                    f"{name}-in_features={value!r}",
                    lambda cls=cls, v=value: cls(v, 2),
                    error,
                    "in_features " + POSITIVE_INT,
                )
            )
            cases.append(
                _case(
                    f"{name}-out_features={value!r}",
                    lambda cls=cls, v=value: cls(2, v),
                    error,
                    "out_features " + POSITIVE_INT,
                )
            )
    return cases


ESTIMATOR_RULE = r"estimator must be one of 'reparameterization', 'local', 'flipout', got "

BAD_INPUTS: list[Any] = [
    *_layer_cases(),
    # -- layer constructor ----------------------------------------------------------------------
    _case(
        "estimator=bogus",
        lambda: LVN(2, 2, estimator="bogus"),
        ValueError,
        ESTIMATOR_RULE + "'bogus'",
    ),
    _case("estimator=None", lambda: LVN(2, 2, estimator=None), ValueError, ESTIMATOR_RULE + "None"),
    _case(
        "estimator=Local",
        lambda: VL(2, 2, estimator="Local"),
        ValueError,
        ESTIMATOR_RULE + "'Local'",
    ),
    _case(
        "init_scale=0",
        lambda: LVN(2, 2, init_scale=0),
        ValueError,
        r"init_scale must be > 0.0, got 0.0",
    ),
    _case(
        "init_scale=-1",
        lambda: LVN(2, 2, init_scale=-1.0),
        ValueError,
        r"init_scale must be > 0.0, got -1.0",
    ),
    _case(
        "init_scale=nan",
        lambda: LVN(2, 2, init_scale=NAN),
        ValueError,
        r"init_scale must be finite, got nan",
    ),
    _case(
        "init_scale=inf",
        lambda: LVN(2, 2, init_scale=INF),
        ValueError,
        r"init_scale must be finite, got inf",
    ),
    _case(
        "init_scale=-inf",
        lambda: VL(2, 2, init_scale=-INF),
        ValueError,
        r"init_scale must be finite, got -inf",
    ),
    _case(
        "init_scale=str",
        lambda: LVN(2, 2, init_scale="1e-2"),
        TypeError,
        r"init_scale must be a real number, got '1e-2'",
    ),
    _case(
        "init_scale=None",
        lambda: LVN(2, 2, init_scale=None),
        TypeError,
        r"init_scale must be a real number, got None",
    ),
    # 1e-50 is a positive float64 but 0 in float32: the KL would be inf.
    _case(
        "init_scale=1e-50-float32",
        lambda: LVN(2, 2, init_scale=1e-50),
        ValueError,
        r"init_scale=1e-50 is not representable in torch.float32 \(it becomes 0\)",
    ),
    _case(
        "init_scale=1e39-float32",
        lambda: VL(2, 2, init_scale=1e39),
        ValueError,
        r"init_scale=1e\+39 is not representable in torch.float32 \(it becomes inf\)",
    ),
    _case("bias=1", lambda: LVN(2, 2, bias=1), TypeError, r"bias must be a bool, got 1"),
    _case("bias='yes'", lambda: VL(2, 2, bias="yes"), TypeError, r"bias must be a bool, got 'yes'"),
    _case(
        "bias=False-with-bias-prior",
        lambda: LVN(2, 2, False, None, priors.normal()),
        ValueError,
        r"make_bias_prior was given but bias=False",
    ),
    _case(
        "generator=3",
        lambda: LVN(2, 2, generator=3),
        TypeError,
        r"generator must be a torch.Generator or None, got 3",
    ),
    _case(
        "unknown-keyword",
        lambda: LVN(2, 2, prior_scale=1.0),
        TypeError,
        r"LinearVariationalNormal got unexpected keyword argument\(s\): prior_scale",
    ),
    _case(
        "dtype=int64",
        lambda: LVN(2, 2, dtype=torch.int64),
        TypeError,
        r"dtype must be a real floating-point dtype .*got torch.int64",
    ),
    _case(
        "dtype=complex64",
        lambda: VL(2, 2, dtype=torch.complex64),
        TypeError,
        r"dtype must be a real floating-point dtype .*got torch.complex64",
    ),
    _case(
        "dtype=str",
        lambda: LVN(2, 2, dtype="float32"),
        TypeError,
        r"dtype must be a torch.dtype such as torch.float32, got 'float32'",
    ),
    # -- prior factories given to the layer -----------------------------------------------------
    _case(
        "prior-not-callable",
        lambda: LVN(2, 3, make_weights_prior=1.0),
        TypeError,
        r"make_weights_prior must be callable \(shape -> Distribution\), got 1.0",
    ),
    _case(
        "prior-returns-float",
        lambda: LVN(2, 3, make_weights_prior=lambda i, o: 1.0),
        TypeError,
        r"make_weights_prior must return a torch.distributions.Distribution, got float",
    ),
    _case(
        "prior-returns-None",
        lambda: VL(2, 3, make_weights_prior=lambda i, o: None),
        TypeError,
        r"make_weights_prior must return a torch.distributions.Distribution, got NoneType",
    ),
    _case(
        "bias-prior-returns-tensor",
        lambda: LVN(2, 3, make_bias_prior=lambda o: torch.zeros(o)),
        TypeError,
        r"make_bias_prior must return a torch.distributions.Distribution, got Tensor",
    ),
    _case(
        "prior-batch-transposed",
        lambda: LVN(2, 3, make_weights_prior=lambda i, o: _normal(o, i)),
        ValueError,
        r"make_weights_prior must return a distribution whose batch_shape broadcasts to "
        r"\(2, 3\), got batch_shape \(3, 2\)",
    ),
    _case(
        "prior-batch-too-big",
        lambda: VL(2, 3, make_weights_prior=lambda i, o: _normal(4, i, o)),
        ValueError,
        r"make_weights_prior must return a distribution whose batch_shape broadcasts to "
        r"\(2, 3\), got batch_shape \(4, 2, 3\)",
    ),
    _case(
        "bias-prior-batch-wrong",
        lambda: LVN(2, 3, make_bias_prior=lambda o: _normal(2)),
        ValueError,
        r"make_bias_prior must return a distribution whose batch_shape broadcasts to \(3,\), "
        r"got batch_shape \(2,\)",
    ),
    _case(
        "prior-event-shape",
        lambda: LVN(
            2,
            3,
            make_weights_prior=lambda i, o: MultivariateNormal(torch.zeros(i, o), torch.eye(o)),
        ),
        ValueError,
        r"make_weights_prior must return an elementwise distribution \(event_shape \(\)\), "
        r"got MultivariateNormal with event_shape \(3,\)",
    ),
    _case(
        "prior-float64-layer-float32",
        lambda: LVN(2, 3, make_weights_prior=lambda i, o: _normal(i, o, dtype=torch.float64)),
        ValueError,
        r"make_weights_prior returned a Normal whose loc is torch.float64 on cpu, but the "
        r"layer's parameters are torch.float32 on cpu",
    ),
    _case(
        "prior-float32-layer-float64",
        lambda: VL(2, 3, make_weights_prior=lambda i, o: _normal(i, o), dtype=torch.float64),
        ValueError,
        r"make_weights_prior returned a Normal whose loc is torch.float32 on cpu, but the "
        r"layer's parameters are torch.float64 on cpu",
    ),
    _case(
        "bias-prior-float64",
        lambda: LVN(2, 3, make_bias_prior=lambda o: _normal(o, dtype=torch.float64)),
        ValueError,
        r"make_bias_prior returned a Normal whose loc is torch.float64",
    ),
    # Another device, simulated with 'meta' (no GPU needed).
    _case(
        "prior-on-meta-device",
        lambda: LVN(2, 3, make_weights_prior=lambda i, o: _normal(i, o, device="meta")),
        ValueError,
        r"make_weights_prior returned a Normal whose loc is torch.float32 on meta, but the "
        r"layer's parameters are torch.float32 on cpu",
    ),
    _case(
        "bias-prior-on-meta-device",
        lambda: VL(2, 3, make_bias_prior=lambda o: _normal(o, device="meta")),
        ValueError,
        r"make_bias_prior returned a Normal whose loc is torch.float32 on meta",
    ),
    _case(
        "prior-laplace-float64",
        lambda: LVN(
            2,
            3,
            make_weights_prior=lambda i, o: Laplace(torch.zeros(i, o, dtype=torch.float64), 1.0),
        ),
        ValueError,
        r"make_weights_prior returned a Laplace whose loc is torch.float64",
    ),
    _case(
        "prior-wrong-arity",
        lambda: LVN(2, 3, make_weights_prior=lambda shape: _normal(2, 3)),
        TypeError,
        r"calling make_weights_prior\(\*\(2, 3\)\) raised TypeError: .*positional argument",
    ),
    _case(
        "bias-prior-wrong-arity",
        lambda: VL(2, 3, make_bias_prior=lambda: _normal(3)),
        TypeError,
        r"calling make_bias_prior\(\*\(3,\)\) raised TypeError",
    ),
    _case(
        "prior-gamma-support",
        lambda: LVN(2, 3, make_weights_prior=lambda i, o: Gamma(torch.ones(i, o), 1.0)),
        ValueError,
        r"make_weights_prior must return a distribution supported on the real line .*"
        r"got Gamma with support",
    ),
    _case(
        "prior-categorical-support",
        lambda: VL(2, 3, make_weights_prior=lambda i, o: Categorical(torch.ones(i, o, 4))),
        ValueError,
        r"make_weights_prior must return a distribution supported on the real line .*"
        r"got Categorical",
    ),
    _case(
        "bias-prior-uniform-support",
        lambda: LVN(2, 3, make_bias_prior=lambda o: Uniform(-torch.ones(o), torch.ones(o))),
        ValueError,
        r"make_bias_prior must return a distribution supported on the real line .*Uniform",
    ),
    _case(
        "prior-scale-underflows-float32",
        lambda: LVN(2, 3, make_weights_prior=priors.normal(1e-50)),
        ValueError,
        r"scale=1e-50 is not representable in torch.float32 \(it becomes 0\)",
    ),
    _case(
        "prior-scale-overflows-float32",
        lambda: VL(2, 3, make_bias_prior=priors.laplace(1e39)),
        ValueError,
        r"scale=1e\+39 is not representable in torch.float32 \(it becomes inf\)",
    ),
    _case(
        "prior-loc-overflows-float16",
        lambda: LVN(2, 3, make_weights_prior=priors.normal(1.0, 1e5), dtype=torch.float16),
        ValueError,
        r"loc=100000 is not representable in torch.float16",
    ),
    # -- forward: input shape and dtype ---------------------------------------------------------
    _case(
        "x-last-dim",
        lambda: LVN(3, 2)(_x(4, 5)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(4, 5\)",
    ),
    _case(
        "x-1d-wrong",
        lambda: VL(3, 2)(_x(5)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(5,\)",
    ),
    _case(
        "x-0d",
        lambda: LVN(3, 2)(torch.tensor(1.0)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(\)",
    ),
    _case(
        "x-int64",
        lambda: LVN(3, 2)(torch.ones(4, 3, dtype=torch.int64)),
        TypeError,
        r"x must have a floating-point dtype, got Tensor of shape \(4, 3\) and dtype "
        r"torch.int64; convert it with x.float\(\)",
    ),
    _case(
        "x-int32",
        lambda: VL(3, 2)(torch.ones(4, 3, dtype=torch.int32)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.int32",
    ),
    _case(
        "x-uint8",
        lambda: VL(3, 2)(torch.ones(4, 3, dtype=torch.uint8)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.uint8",
    ),
    _case(
        "x-bool",
        lambda: LVN(3, 2)(torch.ones(4, 3, dtype=torch.bool)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.bool",
    ),
    _case(
        "x-complex64",
        lambda: LVN(3, 2)(torch.ones(4, 3, dtype=torch.complex64)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.complex64",
    ),
    _case(
        "x-complex128",
        lambda: VL(3, 2)(torch.ones(4, 3, dtype=torch.complex128)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.complex128",
    ),
    _case(
        "x-list",
        lambda: LVN(3, 2)([[1.0, 2.0, 3.0]]),
        TypeError,
        r"x must be a torch.Tensor, got list",
    ),
    _case(
        "x-float64-layer-float32",
        lambda: LVN(3, 2)(_x(dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but the layer's parameters are torch.float32",
    ),
    _case(
        "x-float32-layer-float64",
        lambda: VL(3, 2, dtype=torch.float64)(_x()),
        TypeError,
        r"x has dtype torch.float32 but the layer's parameters are torch.float64",
    ),
    _case(
        "output_moments-x-last-dim",
        lambda: VL(3, 2).output_moments(_x(4, 5)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(4, 5\)",
    ),
    _case(
        "output_moments-x-int",
        lambda: VL(3, 2).output_moments(torch.ones(4, 3).long()),
        TypeError,
        r"x must have a floating-point dtype",
    ),
    _case(
        "output_moments-x-float64",
        lambda: VL(3, 2).output_moments(_x(dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but the layer's parameters are torch.float32",
    ),
    # -- kl_weight ------------------------------------------------------------------------------
    _case(
        "kl_weight=-1",
        lambda: LVN(3, 2)(_x(), kl_weight=-1.0),
        ValueError,
        r"kl_weight must be >= 0.0, got -1.0",
    ),
    _case(
        "kl_weight=-1e-12",
        lambda: LVN(3, 2)(_x(), kl_weight=-1e-12),
        ValueError,
        r"kl_weight must be >= 0.0, got -1e-12",
    ),
    _case(
        "kl_weight=nan",
        lambda: LVN(3, 2)(_x(), kl_weight=NAN),
        ValueError,
        r"kl_weight must be finite, got nan",
    ),
    _case(
        "kl_weight=inf",
        lambda: LVN(3, 2)(_x(), kl_weight=INF),
        ValueError,
        r"kl_weight must be finite, got inf",
    ),
    _case(
        "kl_weight=-inf",
        lambda: LVN(3, 2)(_x(), kl_weight=-INF),
        ValueError,
        r"kl_weight must be finite, got -inf",
    ),
    _case(
        "kl_weight=str",
        lambda: LVN(3, 2)(_x(), kl_weight="1"),
        TypeError,
        r"kl_weight must be a real number, got '1'",
    ),
    _case(
        "kl_weight=None",
        lambda: LVN(3, 2)(_x(), kl_weight=None),
        TypeError,
        r"kl_weight must be a real number, got None",
    ),
    _case(
        "kl_weight=True",
        lambda: LVN(3, 2)(_x(), kl_weight=True),
        TypeError,
        r"kl_weight must be a real number, got True",
    ),
    _case(
        "kl_weight=vector",
        lambda: LVN(3, 2)(_x(), kl_weight=torch.ones(2)),
        ValueError,
        r"kl_weight must be a number or a 0-dim floating tensor, got Tensor of shape \(2,\)",
    ),
    _case(
        "kl_weight=int-tensor",
        lambda: LVN(3, 2)(_x(), kl_weight=torch.tensor(1)),
        ValueError,
        r"kl_weight must be a number or a 0-dim floating tensor, got tensor\(1, "
        r"dtype=torch.int64\)",
    ),
    # A tensor kl_weight is read (a device sync) only when validating.
    _case(
        "kl_weight=tensor(-1)-validating",
        _validating(lambda: LVN(3, 2)(_x(), kl_weight=torch.tensor(-1.0))),
        ValueError,
        r"kl_weight must be >= 0.0, got -1.0",
    ),
    _case(
        "kl_weight=tensor(nan)-validating",
        _validating(lambda: LVN(3, 2)(_x(), kl_weight=torch.tensor(NAN))),
        ValueError,
        r"kl_weight must be finite, got nan",
    ),
    _case(
        "kl_weight=tensor(inf)-validating",
        _validating(lambda: LVN(3, 2)(_x(), kl_weight=torch.tensor(INF))),
        ValueError,
        r"kl_weight must be finite, got inf",
    ),
    # -- model-level helpers --------------------------------------------------------------------
    _case(
        "kl_divergence-not-module",
        lambda: varlin.kl_divergence("model"),
        TypeError,
        r"model must be a torch.nn.Module, got str",
    ),
    _case(
        "deterministic-not-module",
        lambda: varlin.deterministic(3).__enter__(),
        TypeError,
        r"model must be a torch.nn.Module, got int",
    ),
    _case(
        "variational_layers-not-module",
        lambda: list(varlin.variational_layers([])),
        TypeError,
        r"model must be a torch.nn.Module, got list",
    ),
    # -- ELBO -----------------------------------------------------------------------------------
    *[
        _case(
            f"ELBO-num_data={v!r}",
            lambda v=v: varlin.ELBO(Gaussian(), v),
            _count_error(v),
            r"num_data " + POSITIVE_INT,
        )
        for v in [0, -1, 2.5, True, "3", None, INF, 1000.0]
    ],
    _case(
        "ELBO-beta=-1",
        lambda: varlin.ELBO(Gaussian(), 10, beta=-1.0),
        ValueError,
        r"beta must be >= 0.0, got -1.0",
    ),
    _case(
        "ELBO-beta=nan",
        lambda: varlin.ELBO(Gaussian(), 10, beta=NAN),
        ValueError,
        r"beta must be finite, got nan",
    ),
    _case(
        "ELBO-beta=inf",
        lambda: varlin.ELBO(Gaussian(), 10, beta=INF),
        ValueError,
        r"beta must be finite, got inf",
    ),
    _case(
        "ELBO-beta=str",
        lambda: varlin.ELBO(Gaussian(), 10, beta="1"),
        TypeError,
        r"beta must be a real number, got '1'",
    ),
    _case(
        "ELBO-likelihood=str",
        lambda: varlin.ELBO("gaussian", 10),
        TypeError,
        r"likelihood must be a varlin.likelihoods.Likelihood, got 'gaussian'",
    ),
    _case(
        "ELBO-likelihood=MSELoss",
        lambda: varlin.ELBO(nn.MSELoss(), 10),
        TypeError,
        r"likelihood must be a varlin.likelihoods.Likelihood, got MSELoss",
    ),
    _case(
        "ELBO-kl-vector",
        lambda: _elbo(kl=torch.ones(3)),
        ValueError,
        r"kl must be a 0-dim tensor .*got Tensor of shape \(3,\)",
    ),
    _case(
        "ELBO-kl-float", lambda: _elbo(kl=1.0), ValueError, r"kl must be a 0-dim tensor .*got 1.0"
    ),
    _case(
        "ELBO-call-beta=-0.5",
        lambda: _elbo(beta=-0.5),
        ValueError,
        r"beta must be >= 0.0, got -0.5",
    ),
    _case(
        "ELBO-call-beta=nan", lambda: _elbo(beta=NAN), ValueError, r"beta must be finite, got nan"
    ),
    _case(
        "ELBO-target-rows",
        lambda: _elbo(target=torch.zeros(5)),
        ValueError,
        r"target must have shape \(4,\) to match the model output of shape \(4, 1\), got "
        r"target of shape \(5,\)",
    ),
    _case(
        "ELBO-target-columns",
        lambda: _elbo(target=torch.zeros(4, 2)),
        ValueError,
        r"target must have shape \(4,\) to match the model output of shape \(4, 1\), got "
        r"target of shape \(4, 2\)",
    ),
    _case(
        "ELBO-target-int",
        lambda: _elbo(target=torch.zeros(4, dtype=torch.long)),
        TypeError,
        r"target must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "ELBO-samples-output-1d",
        lambda: _elbo(output=torch.zeros(4), samples=True),
        ValueError,
        r"with samples=True, output must have shape \(S, N, ...\)",
    ),
    _case(
        "ELBO-target-nan-validating",
        _validating(lambda: _elbo(target=torch.full((4,), NAN))),
        ValueError,
        r"target must be finite, got Tensor of shape \(4,\) .* 4 non-finite",
    ),
    _case(
        "ELBO-kl-nan-validating",
        _validating(lambda: _elbo(kl=torch.tensor(NAN))),
        ValueError,
        r"kl must be finite",
    ),
    _case(
        "ELBO-output-inf-validating",
        _validating(lambda: _elbo(output=torch.full((4, 1), INF))),
        ValueError,
        r"output must be finite, got Tensor of shape \(4, 1\)",
    ),
    # -- likelihoods (prediction targets) -------------------------------------------------------
    _case(
        "Gaussian-noise=0", lambda: Gaussian(0.0), ValueError, r"noise_scale must be > 0.0, got 0.0"
    ),
    _case(
        "Gaussian-noise=-1",
        lambda: Gaussian(-1.0),
        ValueError,
        r"noise_scale must be > 0.0, got -1.0",
    ),
    _case(
        "Gaussian-noise=nan",
        lambda: Gaussian(NAN),
        ValueError,
        r"noise_scale must be finite, got nan",
    ),
    _case(
        "Gaussian-noise=inf",
        lambda: Gaussian(INF),
        ValueError,
        r"noise_scale must be finite, got inf",
    ),
    _case(
        "Gaussian-noise=str",
        lambda: Gaussian("1"),
        TypeError,
        r"noise_scale must be a real number, got '1'",
    ),
    _case(
        "Gaussian-noise=1e-50",
        lambda: Gaussian(1e-50),
        ValueError,
        r"noise_scale=1e-50 is not representable in torch.float32",
    ),
    _case(
        "Heteroscedastic-min_scale=-1",
        lambda: HeteroscedasticGaussian(min_scale=-1.0),
        ValueError,
        r"min_scale must be >= 0.0, got -1.0",
    ),
    _case(
        "Heteroscedastic-min_scale=nan",
        lambda: HeteroscedasticGaussian(min_scale=NAN),
        ValueError,
        r"min_scale must be finite, got nan",
    ),
    _case(
        "Heteroscedastic-output-width",
        lambda: HeteroscedasticGaussian().expected_log_prob(torch.zeros(4, 3), torch.zeros(4)),
        ValueError,
        r"output must have shape \(N, 2\) for a HeteroscedasticGaussian "
        r"likelihood \(mean, raw scale\), got shape \(4, 3\)",
    ),
    _case(
        "Heteroscedastic-target-rows",
        lambda: HeteroscedasticGaussian().expected_log_prob(torch.zeros(4, 2), torch.zeros(3)),
        ValueError,
        r"target must have shape \(4,\) to match the model output of shape "
        r"\(4, 2\), got target of shape \(3,\)",
    ),
    _case(
        "Bernoulli-target-rows",
        lambda: Bernoulli().expected_log_prob(torch.zeros(4, 1), torch.zeros(5)),
        ValueError,
        r"target must have shape \(4,\) to match the model output of shape \(4, 1\)",
    ),
    _case(
        "Bernoulli-target-complex",
        lambda: Bernoulli().expected_log_prob(torch.zeros(4, 1), torch.zeros(4).cfloat()),
        TypeError,
        r"target must hold 0 and 1, got .*complex64",
    ),
    _case(
        "Bernoulli-target-0.5-validating",
        _validating(lambda: Bernoulli().expected_log_prob(torch.zeros(4), torch.full((4,), 0.5))),
        ValueError,
        r"target must hold only 0 and 1 for a Bernoulli likelihood",
    ),
    _case(
        "Categorical-target-float",
        lambda: CategoricalLikelihood().expected_log_prob(torch.zeros(4, 3), torch.zeros(4)),
        TypeError,
        r"target must hold integer class indices for a Categorical likelihood, "
        r"got .*torch.float32; convert it with target.long\(\)",
    ),
    _case(
        "Categorical-target-bool",
        lambda: CategoricalLikelihood().expected_log_prob(
            torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool)
        ),
        TypeError,
        r"target must hold integer class indices .*torch.bool",
    ),
    _case(
        "Categorical-target-rows",
        lambda: CategoricalLikelihood().expected_log_prob(
            torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)
        ),
        ValueError,
        r"target must have shape \(4,\) to match the model output of shape "
        r"\(4, 3\), got target of shape \(5,\)",
    ),
    _case(
        "Categorical-target-7-validating",
        _validating(
            lambda: CategoricalLikelihood().expected_log_prob(
                torch.zeros(4, 3), torch.full((4,), 7)
            )
        ),
        ValueError,
        r"target must hold class indices in \[0, 3\)",
    ),
    _case(
        "Categorical-target--1-validating",
        _validating(
            lambda: CategoricalLikelihood().expected_log_prob(
                torch.zeros(4, 3), torch.full((4,), -1)
            )
        ),
        ValueError,
        r"target must hold class indices in \[0, 3\)",
    ),
    _case(
        "likelihood-output-list",
        lambda: Gaussian().expected_log_prob([0.0], torch.zeros(1)),
        TypeError,
        r"output must be a torch.Tensor, got \[0.0\]",
    ),
    _case(
        "likelihood-target-list",
        lambda: Gaussian().expected_log_prob(torch.zeros(1), [0.0]),
        TypeError,
        r"target must be a torch.Tensor, got \[0.0\]",
    ),
    # -- predict --------------------------------------------------------------------------------
    *[
        _case(
            f"predict-num_samples={v!r}",
            lambda v=v: varlin.predict(_mlp(), _x(), num_samples=v),
            _count_error(v),
            r"num_samples " + POSITIVE_INT,
        )
        for v in [0, -1, 2.5, True, "3", None]
    ],
    _case(
        "predict-method",
        lambda: varlin.predict(_mlp(), _x(), method="exact"),
        ValueError,
        r"method must be one of 'auto', 'mc', 'closed_form', 'moments', got 'exact'",
    ),
    _case(
        "predict-x-int",
        lambda: varlin.predict(_mlp(), torch.ones(5, 3, dtype=torch.long)),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "predict-x-list",
        lambda: varlin.predict(_mlp(), [[1.0, 2.0, 3.0]]),
        TypeError,
        r"x must be a torch.Tensor, got list",
    ),
    _case(
        "predict-x-last-dim",
        lambda: varlin.predict(_mlp(), _x(5, 4)),
        ValueError,
        r"x must have last dimension in_features=3",
    ),
    _case(
        "predict-likelihood-str",
        lambda: varlin.predict(_mlp(), _x(), likelihood="gauss"),
        TypeError,
        r"likelihood must be a varlin Likelihood or None, got 'gauss'",
    ),
    _case(
        "predict-model-str",
        lambda: varlin.predict("model", _x()),
        TypeError,
        r"model must be a torch.nn.Module, got str",
    ),
    _case(
        "predict-batch_size=0",
        lambda: varlin.predict(_mlp(), _x(), batch_size=0),
        ValueError,
        r"batch_size " + POSITIVE_INT + "0",
    ),
    _case(
        "predict-batch_size=2.5",
        lambda: varlin.predict(_mlp(), _x(), batch_size=2.5),
        TypeError,
        r"batch_size " + POSITIVE_INT + "2.5",
    ),
    _case(
        "predict-closed_form-deep-model",
        lambda: varlin.predict(_mlp(), _x(), method="closed_form"),
        ValueError,
        r"method='closed_form' needs a model whose only variational layer is its last module",
    ),
    _case(
        "predict-x-nan-validating",
        _validating(lambda: varlin.predict(_mlp(), torch.full((2, 3), NAN))),
        ValueError,
        r"x must be finite, got Tensor of shape \(2, 3\) .* 6 non-finite entries",
    ),
    _case(
        "predict-x-0d",
        lambda: varlin.predict(_mlp(), torch.tensor(1.0)),
        ValueError,
        r"x must have shape \(N, ...\) with N >= 1 examples, got shape \(\)",
    ),
    _case(
        "predict-x-no-rows",
        lambda: varlin.predict(_mlp(), _x(0, 3)),
        ValueError,
        r"x must have shape \(N, ...\) with N >= 1 examples, got shape \(0, 3\)",
    ),
    _case(
        "predict-closed-form-x-last-dim",
        lambda: varlin.predict(VL(3, 1), _x(5, 4)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(5, 4\)",
    ),
    _case(
        "predict-closed-form-x-float64",
        lambda: varlin.predict(VL(3, 1), _x(dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but the layer's parameters are torch.float32",
    ),
    # -- predictions vs targets -----------------------------------------------------------------
    _case(
        "prediction-log_prob-rows",
        lambda: _regression_prediction().log_prob(torch.zeros(4)),
        ValueError,
        r"target must have the prediction's shape \(5,\), got \(4,\)",
    ),
    _case(
        "prediction-log_prob-column",
        lambda: _regression_prediction().log_prob(torch.zeros(5, 1)),
        ValueError,
        r"target must have the prediction's shape \(5,\), got \(5, 1\)",
    ),
    _case(
        "prediction-log_prob-int",
        lambda: _regression_prediction().log_prob(torch.zeros(5, dtype=torch.long)),
        TypeError,
        r"target must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "prediction-log_prob-list",
        lambda: _regression_prediction().log_prob([0.0] * 5),
        TypeError,
        r"target must be a torch.Tensor, got list",
    ),
    _case(
        "prediction-nll-rows",
        lambda: _regression_prediction().nll(torch.zeros(6)),
        ValueError,
        r"target must have the prediction's shape \(5,\), got \(6,\)",
    ),
    _case(
        "prediction-log_prob-without-likelihood",
        lambda: varlin.predict(_mlp(), _x(), num_samples=4).log_prob(torch.zeros(5)),
        ValueError,
        r"log_prob needs a likelihood with noise",
    ),
    _case(
        "closed-form-prediction-log_prob-rows",
        lambda: varlin.predict(VL(3, 1), _x(), likelihood=Gaussian()).log_prob(torch.zeros(2)),
        ValueError,
        r"target must have the prediction's shape \(5,\), got \(2,\)",
    ),
    _case(
        "prediction-interval-level=1",
        lambda: _regression_prediction().interval(1.0),
        ValueError,
        r"level must be in the open interval \(0, 1\), got 1.0",
    ),
    _case(
        "prediction-interval-level=0",
        lambda: _regression_prediction().interval(0),
        ValueError,
        r"level must be in the open interval \(0, 1\), got 0.0",
    ),
    _case(
        "prediction-interval-level=nan",
        lambda: _regression_prediction().interval(NAN),
        ValueError,
        r"level must be finite, got nan",
    ),
    _case(
        "classification-log_prob-rows",
        lambda: _classification_prediction().log_prob(torch.zeros(4, dtype=torch.long)),
        ValueError,
        r"target must have shape \(5,\), got \(4,\)",
    ),
    _case(
        "classification-log_prob-list",
        lambda: _classification_prediction().log_prob([0] * 5),
        TypeError,
        r"target must be a torch.Tensor, got \[0, 0, 0, 0, 0\]",
    ),
    _case(
        "classification-log_prob-7-validating",
        _validating(lambda: _classification_prediction().log_prob(torch.full((5,), 7))),
        ValueError,
        r"target must hold class indices in \[0, 3\)",
    ),
    _case(
        "classification-log_prob-0.7-validating",
        _validating(lambda: _classification_prediction().log_prob(torch.full((5,), 0.7))),
        ValueError,
        r"target must hold class indices in \[0, 3\)",
    ),
    # -- fit --------------------------------------------------------------------------------------
    *[
        _case(
            f"fit-{arg}={v!r}",
            lambda arg=arg, v=v: _fit(**{arg: v}),
            _count_error(v),
            arg + " " + POSITIVE_INT,
        )
        for arg in ("epochs", "batch_size", "val_samples", "num_data")
        for v in [0, -1, 2.5, True, "3"]
    ],
    _case("fit-epochs=None", lambda: _fit(epochs=None), TypeError, "epochs " + POSITIVE_INT),
    *[
        _case(f"fit-lr={v!r}", lambda v=v: _fit(lr=v), error, match)
        for v, error, match in [
            (0, ValueError, r"lr must be > 0.0, got 0.0"),
            (-1e-3, ValueError, r"lr must be > 0.0, got -0.001"),
            (NAN, ValueError, r"lr must be finite, got nan"),
            (INF, ValueError, r"lr must be finite, got inf"),
            ("1e-2", TypeError, r"lr must be a real number, got '1e-2'"),
            (None, TypeError, r"lr must be a real number, got None"),
            (True, TypeError, r"lr must be a real number, got True"),
        ]
    ],
    _case("fit-beta=-1", lambda: _fit(beta=-1.0), ValueError, r"beta must be >= 0.0, got -1.0"),
    _case("fit-beta=nan", lambda: _fit(beta=NAN), ValueError, r"beta must be finite, got nan"),
    _case(
        "fit-lr_schedule",
        lambda: _fit(lr_schedule="step"),
        ValueError,
        r"lr_schedule must be one of 'cosine', 'constant', got 'step'",
    ),
    _case(
        "fit-kl_warmup_epochs=-1",
        lambda: _fit(kl_warmup_epochs=-1),
        ValueError,
        r"kl_warmup_epochs " + POSITIVE_INT + "-1",
    ),
    _case(
        "fit-kl_warmup_epochs=1.5",
        lambda: _fit(kl_warmup_epochs=1.5),
        TypeError,
        r"kl_warmup_epochs " + POSITIVE_INT + "1.5",
    ),
    _case(
        "fit-patience=0",
        lambda: _fit(patience=0, validation=(FIT_X, FIT_Y)),
        ValueError,
        r"patience " + POSITIVE_INT + "0",
    ),
    _case(
        "fit-patience-without-validation",
        lambda: _fit(patience=3),
        ValueError,
        r"patience needs validation data: pass validation=\(x_val, y_val\)",
    ),
    _case(
        "fit-model-str",
        lambda: _fit(model="model"),
        TypeError,
        r"model must be a torch.nn.Module, got str",
    ),
    _case(
        "fit-likelihood-str",
        lambda: _fit(likelihood="gaussian"),
        TypeError,
        r"likelihood must be a varlin Likelihood, got 'gaussian'",
    ),
    _case(
        "fit-y-rows",
        lambda: _fit(y=torch.randn(7)),
        ValueError,
        r"x and y must have the same number of rows, got 8 and 7",
    ),
    _case(
        "fit-y-None",
        lambda: _fit(y=None),
        TypeError,
        r"y must be a tensor of targets when x is a tensor",
    ),
    _case(
        "fit-x-int",
        lambda: _fit(x=FIT_X.long()),
        TypeError,
        r"x must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "fit-x-nan",
        lambda: _fit(x=torch.full((8, 3), NAN)),
        ValueError,
        r"x must be finite, got Tensor of shape \(8, 3\) .* 24 non-finite entries",
    ),
    _case(
        "fit-y-inf",
        lambda: _fit(y=torch.full((8,), INF)),
        ValueError,
        r"y must be finite, got Tensor of shape \(8,\) .* 8 non-finite entries",
    ),
    _case(
        "fit-x-no-rows",
        lambda: _fit(x=torch.randn(0, 3), y=torch.randn(0)),
        ValueError,
        r"x must hold at least one row, got 0",
    ),
    _case(
        "fit-x-last-dim",
        lambda: _fit(x=torch.randn(8, 4)),
        ValueError,
        r"x must have last dimension in_features=3, got shape \(8, 4\)",
    ),
    _case(
        "fit-y-int-gaussian",
        lambda: _fit(y=torch.zeros(8, dtype=torch.long)),
        TypeError,
        r"target must have a floating-point dtype",
    ),
    _case(
        "fit-y-columns",
        lambda: _fit(y=torch.zeros(8, 2)),
        ValueError,
        r"target must have shape \(8,\) to match the model output of shape \(8, 1\)",
    ),
    _case(
        "fit-x-iterator",
        lambda: _fit(x=iter([(FIT_X, FIT_Y)]), y=None),
        TypeError,
        r"x must be a tensor or a sized, re-iterable collection of \(x, y\) batches",
    ),
    _case(
        "fit-loader-without-num_data",
        lambda: _fit(x=[(FIT_X, FIT_Y)], y=None),
        ValueError,
        r"num_data is required when x is an iterable without a dataset",
    ),
    _case(
        "fit-seed=str",
        lambda: _fit(seed="a"),
        TypeError,
        r"seed must be an integer, got 'a'",
    ),
    _case(
        "fit-seed=1.5",
        lambda: _fit(seed=1.5),
        TypeError,
        r"seed must be an integer, got 1.5",
    ),
    _case(
        "fit-resume=str",
        lambda: _fit(resume="no"),
        TypeError,
        r"resume must be True or False, got 'no'",
    ),
    _case(
        "fit-progress=str",
        lambda: _fit(progress="no"),
        TypeError,
        r"progress must be True or False, got 'no'",
    ),
    _case(
        "fit-optimizer=3",
        lambda: _fit(optimizer=3),
        TypeError,
        r"optimizer must be a callable params -> torch.optim.Optimizer, got 3",
    ),
    _case(
        "fit-checkpoint=3",
        lambda: _fit(checkpoint=3),
        TypeError,
        r"checkpoint must be a path or None, got 3",
    ),
    _case(
        "fit-validation-tensor",
        lambda: _fit(validation=FIT_X),
        TypeError,
        r"validation must be a pair \(x_val, y_val\) of tensors, got Tensor of shape \(8, 3\)",
    ),
    _case(
        "fit-validation-triple",
        lambda: _fit(validation=(FIT_X, FIT_Y, FIT_Y)),
        TypeError,
        r"validation must be a pair \(x_val, y_val\)",
    ),
    _case(
        "fit-validation-rows",
        lambda: _fit(validation=(FIT_X, FIT_Y[:5])),
        ValueError,
        r"validation x_val and y_val must have the same number of rows, got shapes \(8, 3\) "
        r"and \(5,\)",
    ),
    _case(
        "fit-validation-x-nan",
        lambda: _fit(validation=(torch.full((4, 3), NAN), FIT_Y[:4])),
        ValueError,
        r"validation x_val must be finite",
    ),
    # -- to_variational / bayesian_last_layer ---------------------------------------------------
    _case(
        "to_variational-model-str",
        lambda: varlin.to_variational("net"),
        TypeError,
        r"model must be a torch.nn.Module, got str",
    ),
    _case(
        "to_variational-layers='first'",
        lambda: varlin.to_variational(_net(), layers="first"),
        ValueError,
        r"layers must be 'all', 'last', a callable .* got 'first'",
    ),
    _case(
        "to_variational-layers=3",
        lambda: varlin.to_variational(_net(), layers=3),
        TypeError,
        r"layers must be 'all', 'last', a callable .* got 3",
    ),
    _case(
        "to_variational-layers=[0]",
        lambda: varlin.to_variational(_net(), layers=[0]),
        TypeError,
        r"the iterable must hold str names, got 0",
    ),
    _case(
        "to_variational-layers-missing",
        lambda: varlin.to_variational(_net(), layers=["5"]),
        ValueError,
        r"layers names '5', which is not a submodule of the model; its "
        r"convertible nn.Linear modules are: '0', '2'",
    ),
    _case(
        "to_variational-layers-relu",
        lambda: varlin.to_variational(_net(), layers=["1"]),
        ValueError,
        r"layers names '1', which is a ReLU, not an nn.Linear",
    ),
    _case(
        "to_variational-layers-empty",
        lambda: varlin.to_variational(_net(), layers=[]),
        ValueError,
        r"no nn.Linear module of the model matches layers=\[\]",
    ),
    _case(
        "to_variational-no-linear",
        lambda: varlin.to_variational(nn.ReLU()),
        ValueError,
        r"no nn.Linear module of the model matches layers='all'.* modules are: none",
    ),
    *[
        _case(
            f"to_variational-init_scale={v!r}",
            lambda v=v: varlin.to_variational(_net(), init_scale=v),
            error,
            r"init_scale must be a finite number > 0 or the string 'moped', got " + shown,
        )
        for v, error, shown in [
            (0, ValueError, "0.0"),
            (-1, ValueError, "-1.0"),
            (NAN, ValueError, "nan"),
            (INF, ValueError, "inf"),
            ("big", ValueError, "'big'"),
            (None, TypeError, "None"),
            (True, TypeError, "True"),
        ]
    ],
    _case(
        "to_variational-init_scale=1e-50",
        lambda: varlin.to_variational(_net(), init_scale=1e-50),
        ValueError,
        r"init_scale=1e-50 is not representable in torch.float32",
    ),
    *[
        _case(
            f"to_variational-moped_delta={v!r}",
            lambda v=v: varlin.to_variational(_net(), init_scale="moped", moped_delta=v),
            error,
            match,
        )
        for v, error, match in [
            (0, ValueError, r"moped_delta must be > 0.0, got 0.0"),
            (-1, ValueError, r"moped_delta must be > 0.0, got -1.0"),
            (NAN, ValueError, r"moped_delta must be finite, got nan"),
            ("1", TypeError, r"moped_delta must be a real number, got '1'"),
        ]
    ],
    _case(
        "to_variational-prior-not-callable",
        lambda: varlin.to_variational(_net(), prior=1.0),
        TypeError,
        r"prior must be None or a prior factory, .* got 1.0",
    ),
    _case(
        "to_variational-prior_at_weights-laplace",
        lambda: varlin.to_variational(_net(), prior=priors.laplace(), prior_at_weights=True),
        ValueError,
        r"prior must make a torch.distributions.Normal, got Laplace",
    ),
    _case(
        "to_variational-prior_at_weights=str",
        lambda: varlin.to_variational(_net(), prior_at_weights="yes"),
        TypeError,
        r"prior_at_weights must be a bool, got 'yes'",
    ),
    _case(
        "to_variational-estimator",
        lambda: varlin.to_variational(_net(), estimator="mc"),
        ValueError,
        ESTIMATOR_RULE + "'mc'",
    ),
    _case(
        "to_variational-lazy-linear",
        lambda: varlin.to_variational(nn.LazyLinear(2)),
        TypeError,
        r"cannot convert a LazyLinear whose weight is not initialised yet",
    ),
    _case(
        "to_variational_-model-int",
        lambda: varlin.to_variational_(3),
        TypeError,
        r"model must be a torch.nn.Module, got int",
    ),
    _case(
        "to_variational_-init_scale=-1",
        lambda: varlin.to_variational_(_net(), init_scale=-1),
        ValueError,
        r"init_scale must be a finite number > 0 or the string 'moped', got -1.0",
    ),
    _case(
        "bayesian_last_layer-extractor-int",
        lambda: varlin.bayesian_last_layer(3, 2, 1),
        TypeError,
        r"feature_extractor must be a torch.nn.Module, got int",
    ),
    _case(
        "bayesian_last_layer-in_features=0",
        lambda: varlin.bayesian_last_layer(nn.Identity(), 0, 1),
        ValueError,
        r"in_features " + POSITIVE_INT + "0",
    ),
    _case(
        "bayesian_last_layer-freeze=str",
        lambda: varlin.bayesian_last_layer(nn.Identity(), 2, 1, freeze="y"),
        TypeError,
        r"freeze must be a bool, got 'y'",
    ),
    _case(
        "bayesian_last_layer-unknown-keyword",
        lambda: varlin.bayesian_last_layer(nn.Identity(), 2, 1, prior=None),
        TypeError,
        r"VariationalLinear got unexpected keyword argument\(s\): prior",
    ),
    _case(
        "bayesian_last_layer-variational-extractor",
        lambda: varlin.bayesian_last_layer(VL(2, 2), 2, 1),
        ValueError,
        r"feature_extractor must be deterministic, but it holds a variational layer",
    ),
    # -- BayesianLinearRegression ---------------------------------------------------------------
    *[
        _case(
            f"BLR-{arg}={v!r}",
            lambda arg=arg, v=v: BayesianLinearRegression(**{arg: v}),
            error,
            arg + " " + rule,
        )
        for arg in ("prior_scale", "noise_scale")
        for v, error, rule in [
            (0, ValueError, r"must be > 0.0, got 0.0"),
            (-1, ValueError, r"must be > 0.0, got -1.0"),
            (NAN, ValueError, r"must be finite, got nan"),
            (INF, ValueError, r"must be finite, got inf"),
            ("1", TypeError, r"must be a real number, got '1'"),
            (None, TypeError, r"must be a real number, got None"),
        ]
    ],
    _case(
        "BLR-fit-X-1d",
        lambda: BayesianLinearRegression().fit(Y64, Y64),
        ValueError,
        r"X must have shape \(n, d\), got shape \(10,\)",
    ),
    _case(
        "BLR-fit-X-int",
        lambda: BayesianLinearRegression().fit(X64.long(), Y64),
        TypeError,
        r"X must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "BLR-fit-X-list",
        lambda: BayesianLinearRegression().fit([[1.0]], Y64),
        TypeError,
        r"X must be a torch.Tensor, got list",
    ),
    _case(
        "BLR-fit-y-rows",
        lambda: BayesianLinearRegression().fit(X64, Y64[:9]),
        ValueError,
        r"y must have shape \(10,\) to match X, got \(9,\)",
    ),
    _case(
        "BLR-fit-y-3d",
        lambda: BayesianLinearRegression().fit(X64, Y64[:, None, None]),
        ValueError,
        r"y must have shape \(10,\) to match X, got \(10, 1, 1\) \(or \(10, k\) for k >= 1",
    ),
    _case(
        "BLR-fit-y-no-columns",
        lambda: BayesianLinearRegression().fit(X64, Y64[:, None][:, :0]),
        ValueError,
        r"y must have shape \(10,\) to match X, got \(10, 0\)",
    ),
    _case(
        "BLR-optimize-one-row",
        lambda: BayesianLinearRegression(optimize=True).fit(X64[:1], Y64[:1]),
        ValueError,
        r"X must have at least 2 rows to choose the prior and noise by the evidence "
        r"\(optimize=True\), got 1",
    ),
    _case(
        "BLR-optimize-X-inf",
        lambda: BayesianLinearRegression(optimize=True).fit(X64 * INF, Y64),
        ValueError,
        r"X must be finite, got Tensor of shape \(10, 3\) .* 30 non-finite entries",
    ),
    _case(
        "BLR-ard-without-optimize",
        lambda: BayesianLinearRegression(ard=True),
        ValueError,
        r"ard=True needs optimize=True",
    ),
    _case(
        "BLR-prune-without-ard",
        lambda: BayesianLinearRegression(optimize=True, prune_threshold=1e4),
        ValueError,
        r"prune_threshold applies to ard=True only",
    ),
    _case(
        "BLR-prune_threshold=0",
        lambda: BayesianLinearRegression(optimize=True, ard=True, prune_threshold=0),
        ValueError,
        r"prune_threshold must be > 0.0, got 0.0",
    ),
    _case(
        "BLR-max_iter=0",
        lambda: BayesianLinearRegression(max_iter=0),
        ValueError,
        r"max_iter must be a positive integer, got 0",
    ),
    _case(
        "BLR-tol=0",
        lambda: BayesianLinearRegression(tol=0),
        ValueError,
        r"tol must be > 0.0, got 0.0",
    ),
    _case(
        "BLR-optimize=str",
        lambda: BayesianLinearRegression(optimize="yes"),
        TypeError,
        r"optimize must be True or False, got 'yes'",
    ),
    _case(
        "BLR-fit_intercept=1",
        lambda: BayesianLinearRegression(fit_intercept=1),
        TypeError,
        r"fit_intercept must be True or False, got 1",
    ),
    _case(
        "BLR-noise_precision_prior-negative",
        lambda: BayesianLinearRegression(noise_precision_prior=(1e-6, -1.0)),
        ValueError,
        r"noise_precision_prior must be a pair \(shape, rate\) of finite numbers >= 0, "
        r"got \(1e-06, -1.0\)",
    ),
    _case(
        "BLR-weight_precision_prior-scalar",
        lambda: BayesianLinearRegression(weight_precision_prior=1e-6),
        TypeError,
        r"weight_precision_prior must be a pair \(shape, rate\) of finite numbers >= 0, "
        r"got 1e-06",
    ),
    _case(
        "BLR-optimize-diverges",
        lambda: BayesianLinearRegression(
            optimize=True, noise_precision_prior=(0, 0), weight_precision_prior=(0, 0)
        ).fit(X64, torch.zeros_like(Y64)),
        ValueError,
        r"optimize=True found no finite maximum of the evidence \(the noise precision diverged",
    ),
    _case(
        "BLR-elbo-multi-output",
        lambda: (
            BayesianLinearRegression()
            .fit(X64, torch.stack([Y64, Y64], -1))
            .elbo(Normal(torch.zeros(3, dtype=torch.float64), 1.0))
        ),
        ValueError,
        r"the ELBO is defined for one output, but y has 2 columns",
    ),
    _case(
        "BLR-fit-y-int",
        lambda: BayesianLinearRegression().fit(X64, Y64.long()),
        TypeError,
        r"y must have a floating-point dtype, got .*torch.int64",
    ),
    _case(
        "BLR-fit-X-nan",
        lambda: BayesianLinearRegression().fit(X64 * NAN, Y64),
        ValueError,
        r"X must be finite, got Tensor of shape \(10, 3\) .* 30 non-finite entries",
    ),
    _case(
        "BLR-fit-y-inf",
        lambda: BayesianLinearRegression().fit(X64, Y64 * INF),
        ValueError,
        r"y must be finite",
    ),
    _case(
        "BLR-fit-dtype-mix",
        lambda: BayesianLinearRegression().fit(X64, Y64.float()),
        TypeError,
        r"y has dtype torch.float32 but X has torch.float64",
    ),
    _case(
        "BLR-predict-before-fit",
        lambda: BayesianLinearRegression().predict(X64),
        RuntimeError,
        r"call fit\(X, y\) first",
    ),
    _case(
        "BLR-predict-columns",
        lambda: _blr().predict(torch.randn(4, 2, dtype=torch.float64)),
        ValueError,
        r"X_new must have shape \(m, 3\), got \(4, 2\)",
    ),
    _case(
        "BLR-predict-int",
        lambda: _blr().predict(torch.ones(4, 3, dtype=torch.long)),
        TypeError,
        r"X_new must have a floating-point dtype",
    ),
    _case(
        "BLR-predict-float32",
        lambda: _blr().predict(torch.randn(4, 3)),
        TypeError,
        r"X_new has dtype torch.float32 but the model was fitted in torch.float64",
    ),
    _case(
        "BLR-predict-nan-validating",
        _validating(lambda: _blr().predict(torch.full((4, 3), NAN, dtype=torch.float64))),
        ValueError,
        r"X_new must be finite, got Tensor of shape \(4, 3\)",
    ),
    _case(
        "BLR-elbo-q-str",
        lambda: _blr().elbo("q"),
        TypeError,
        r"q must be a Normal or MultivariateNormal, got str",
    ),
    _case(
        "BLR-elbo-q-laplace",
        lambda: _blr().elbo(Laplace(torch.zeros(3, dtype=torch.float64), 1.0)),
        TypeError,
        r"q must be a Normal or MultivariateNormal, got Laplace",
    ),
    _case(
        "BLR-elbo-q-dimension",
        lambda: _blr().elbo(Normal(torch.zeros(4, dtype=torch.float64), 1.0)),
        ValueError,
        r"q must be a distribution over the 3 weights, got a Normal over 4",
    ),
    # -- prior factories --------------------------------------------------------------------------
    *[
        _case(
            f"priors.{factory.__name__}-{arg}={v!r}",
            lambda factory=factory, arg=arg, v=v: factory(**{arg: v}),
            error,
            arg + " " + rule,
        )
        for factory in (priors.normal, priors.laplace)
        for arg, v, error, rule in [
            ("scale", 0, ValueError, r"must be > 0.0, got 0.0"),
            ("scale", -1, ValueError, r"must be > 0.0, got -1.0"),
            ("scale", NAN, ValueError, r"must be finite, got nan"),
            ("scale", INF, ValueError, r"must be finite, got inf"),
            ("scale", "1", TypeError, r"must be a real number, got '1'"),
            ("scale", None, TypeError, r"must be a real number, got None"),
            ("scale", True, TypeError, r"must be a real number, got True"),
            ("loc", NAN, ValueError, r"must be finite, got nan"),
            ("loc", -INF, ValueError, r"must be finite, got -inf"),
            ("loc", "0", TypeError, r"must be a real number, got '0'"),
        ]
    ],
    *[
        _case(
            f"priors.scale_mixture-{arg}={v!r}",
            lambda arg=arg, v=v: priors.scale_mixture(**{arg: v}),
            error,
            arg + " " + rule,
        )
        for arg, v, error, rule in [
            ("mixing", 0, ValueError, r"must be in \(0, 1\), got 0.0"),
            ("mixing", 1, ValueError, r"must be in \(0, 1\), got 1.0"),
            ("mixing", 1.5, ValueError, r"must be in \(0, 1\), got 1.5"),
            ("mixing", NAN, ValueError, r"must be finite, got nan"),
            ("mixing", "a", TypeError, r"must be a real number, got 'a'"),
            ("scale1", 0, ValueError, r"must be > 0.0, got 0.0"),
            ("scale1", INF, ValueError, r"must be finite, got inf"),
            ("scale2", -1, ValueError, r"must be > 0.0, got -1.0"),
        ]
    ],
    _case(
        "priors.Prior-not-distribution",
        lambda: priors.Prior(3, (2,)),
        TypeError,
        r"prior must return a torch.distributions.Distribution, got int",
    ),
    # -- metrics (validated in their own module; a sample) --------------------------------------
    _case(
        "metrics.gaussian_nll-var=0",
        lambda: metrics.gaussian_nll(torch.zeros(4), torch.zeros(4), torch.zeros(4)),
        ValueError,
        r"var must be > 0 everywhere, got 4 entries <= 0",
    ),
    _case(
        "metrics.gaussian_nll-var-shape",
        lambda: metrics.gaussian_nll(torch.zeros(4), torch.ones(3), torch.zeros(4)),
        ValueError,
        r"var must have the shape of mean \(4,\), got \(3,\)",
    ),
    _case(
        "metrics.gaussian_nll-reduction",
        lambda: metrics.gaussian_nll(
            torch.zeros(4), torch.ones(4), torch.zeros(4), reduction="avg"
        ),
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'",
    ),
    _case(
        "metrics.gaussian_nll-list",
        lambda: metrics.gaussian_nll([0.0], torch.ones(1), torch.zeros(1)),
        TypeError,
        r"mean must be a torch.Tensor, got list",
    ),
    _case(
        "metrics.rmse-shape",
        lambda: metrics.rmse(torch.zeros(4), torch.zeros(5)),
        ValueError,
        r"target must have the shape of pred \(4,\), got \(5,\)",
    ),
    _case(
        "metrics.rmse-empty",
        lambda: metrics.rmse(torch.zeros(0), torch.zeros(0)),
        ValueError,
        r"pred must have at least one element",
    ),
    _case(
        "metrics.interval_coverage-crossed",
        lambda: metrics.interval_coverage(torch.ones(4), torch.zeros(4), torch.zeros(4)),
        ValueError,
        r"upper must be >= lower everywhere",
    ),
    _case(
        "metrics.gaussian_interval-level",
        lambda: metrics.gaussian_interval(torch.zeros(2), torch.ones(2), 1.5),
        ValueError,
        r"level must be a number in the open interval \(0, 1\), got 1.5",
    ),
    _case(
        "metrics.accuracy-float-target",
        lambda: metrics.accuracy(torch.full((4, 3), 1 / 3), torch.zeros(4)),
        ValueError,
        r"target must hold integer class indices, got dtype torch.float32",
    ),
    _case(
        "metrics.accuracy-target-range",
        lambda: metrics.accuracy(torch.full((4, 3), 1 / 3), torch.full((4,), 5)),
        ValueError,
        r"target must hold class indices in \[0, 3\)",
    ),
    _case(
        "metrics.brier_score-off-simplex",
        lambda: metrics.brier_score(torch.full((4, 3), 2 / 3), torch.zeros(4).long()),
        ValueError,
        r"probs must sum to 1 along the class dim",
    ),
    _case(
        "metrics.expected_calibration_error-num_bins=0",
        lambda: metrics.expected_calibration_error(
            torch.full((4, 3), 1 / 3), torch.zeros(4).long(), num_bins=0
        ),
        ValueError,
        r"num_bins must be an integer >= 1, got 0",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS)
def test_bad_input_raises_a_clear_error(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_the_ids_are_unique() -> None:
    ids = [case.id for case in BAD_INPUTS]
    assert len(ids) == len(set(ids))


def test_checks_leave_good_input_alone() -> None:
    """The controls: each family of calls above succeeds with good arguments."""
    layer = LVN(3, 2, make_weights_prior=lambda i, o: _normal(i, o), init_scale=1e-3)
    y, kl = layer(_x(), kl_weight=torch.tensor(0.5))
    assert y.shape == (5, 2) and kl.shape == ()
    with varlin.validation():
        layer(_x(), kl_weight=0.0)
        _elbo(kl=torch.tensor(2.0))
    assert _regression_prediction().log_prob(torch.zeros(5)).shape == (5,)
    assert _classification_prediction().log_prob(torch.zeros(5, dtype=torch.long)).shape == (5,)
    assert varlin.predict(VL(3, 1), _x()).mean.shape == (5,)
    assert _blr().predict(torch.randn(2, 3, dtype=torch.float64)).mean.shape == (2,)
    history = _fit(seed=3, resume=False, validation=(FIT_X, FIT_Y))
    assert len(history) == 1
