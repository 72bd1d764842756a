"""fit_ensemble: K independent models trained as one vectorised computation through fit's loop.

The second route is ``varlin.fit`` itself, run once per model with the same seed, data and
options. Both routes draw weight noise, but from different streams (the stacked route draws all
K models' noise at once); where the comparison must be exact the posterior scales start at 1e-8,
so that the noise moves no output by more than float rounding while every estimator's code still
runs (the scales still train, driven by the KL). With one model the streams coincide, and the
comparison is made with real noise. The law of the stacked noise is checked on its own, against
the layer's closed-form output moments.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import correlation_tolerance, mean_tolerance, sample_correlation, variance_tolerance
from test_training import _InterruptAfter
from torch import nn

import varlin
from varlin import priors
from varlin.data import make_regression_1d
from varlin.elbo import ELBO
from varlin.ensemble import StackedModels, fit_ensemble
from varlin.errors import CheckpointError, NonFiniteLossError, VarlinWarning
from varlin.history import History
from varlin.likelihoods import (
    Bernoulli,
    Categorical,
    Gaussian,
    HeteroscedasticGaussian,
    Likelihood,
)

ESTIMATORS = ("local", "flipout", "reparameterization")
DATA = [make_regression_1d(48, seed=s, heteroscedastic=False) for s in range(3)]  # 3 x 16 rows


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only cost


def _model(
    k: int,
    *,
    estimator: str = "local",
    init_scale: float = 1e-8,
    heteroscedastic: bool = False,
    generator_seed: int | None = None,
    posterior: str = "meanfield",
) -> tuple[nn.Module, Likelihood]:
    """Model ``k`` of an ensemble: its own initialisation (seed 100 + k)."""
    torch.manual_seed(100 + k)
    gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    options: dict[str, Any] = {
        "estimator": estimator,
        "init_scale": init_scale,
        "generator": gen,
        "make_weights_prior": priors.normal(1.0),
        "posterior": posterior,
        "rank": 2 if posterior == "lowrank" else None,
    }
    model = nn.Sequential(
        varlin.VariationalLinear(1, 8, **options),
        nn.ReLU(),
        varlin.VariationalLinear(8, 2 if heteroscedastic else 1, **options),
    )
    likelihood = HeteroscedasticGaussian() if heteroscedastic else Gaussian(0.5, learn_noise=True)
    return model, likelihood


OPTIONS: dict[str, Any] = {"epochs": 4, "batch_size": 16, "lr": 0.02, "progress": False}


def _quiet(run: Callable[[], Any]) -> Any:
    """Run without the diagnostics of fits this short (and with scales this small)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)
        return run()


def _state(model: nn.Module, likelihood: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        **{f"likelihood.{k}": v.detach().clone() for k, v in likelihood.state_dict().items()},
    }


def _records(history: History) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.records]


def _assert_close_records(got: History, want: History) -> None:
    assert len(got) == len(want) and got.best_epoch == want.best_epoch
    assert got.stopped_early == want.stopped_early
    for a, b in zip(_records(got), _records(want), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# K stacked models == K separate fits


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("data", ["per model", "shared"])
@pytest.mark.parametrize("heteroscedastic", [False, True], ids=["gaussian", "heteroscedastic"])
def test_stacked_models_equal_separate_fits(
    estimator: str, data: str, heteroscedastic: bool
) -> None:
    k = 3
    seeds = [11, 12, 13]
    built = [_model(i, estimator=estimator, heteroscedastic=heteroscedastic) for i in range(k)]
    xs = [d.x for d in DATA] if data == "per model" else DATA[0].x
    ys = [d.y for d in DATA] if data == "per model" else DATA[0].y
    histories = _quiet(
        lambda: fit_ensemble(
            [m for m, _ in built], xs, ys, likelihoods=[lik for _, lik in built], seeds=seeds,
            kl_warmup_epochs=2, **OPTIONS,
        )
    )  # fmt: skip
    for i, ((model, likelihood), history) in enumerate(zip(built, histories, strict=True)):
        ref_model, ref_lik = _model(i, estimator=estimator, heteroscedastic=heteroscedastic)
        x, y = (DATA[i].x, DATA[i].y) if data == "per model" else (DATA[0].x, DATA[0].y)
        want = _quiet(
            lambda m=ref_model, lk=ref_lik, x=x, y=y, s=seeds[i]: varlin.fit(
                m, x, y, likelihood=lk, seed=s, kl_warmup_epochs=2, **OPTIONS
            )
        )
        got_state, want_state = _state(model, likelihood), _state(ref_model, ref_lik)
        assert got_state.keys() == want_state.keys()
        for name in want_state:
            torch.testing.assert_close(got_state[name], want_state[name], msg=name)
        _assert_close_records(history, want)
        # ... and they moved: the comparison is not between two untrained models.
        fresh, _ = _model(i, estimator=estimator, heteroscedastic=heteroscedastic)
        assert not torch.allclose(fresh[0].w_posterior.loc, model[0].w_posterior.loc)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("generator_seed", [None, 5], ids=["default-generator", "own-generator"])
def test_one_stacked_model_draws_the_noise_of_fit(
    estimator: str, generator_seed: int | None
) -> None:
    """With K = 1 the stacked route draws fit's numbers: equal with real weight noise."""
    model, likelihood = _model(
        0, estimator=estimator, init_scale=0.1, generator_seed=generator_seed
    )
    torch.manual_seed(7)
    (history,) = _quiet(
        lambda: fit_ensemble([model], DATA[0].x, DATA[0].y, likelihoods=[likelihood], seeds=[3],
                             **OPTIONS)
    )  # fmt: skip
    ref, ref_lik = _model(0, estimator=estimator, init_scale=0.1, generator_seed=generator_seed)
    torch.manual_seed(7)
    want = _quiet(
        lambda: varlin.fit(ref, DATA[0].x, DATA[0].y, likelihood=ref_lik, seed=3, **OPTIONS)
    )
    got_state, want_state = _state(model, likelihood), _state(ref, ref_lik)
    for name in want_state:
        torch.testing.assert_close(got_state[name], want_state[name], msg=name)
    _assert_close_records(history, want)


# Every family with every estimator it takes (radial has no local form; flipout needs a
# diagonal weight covariance).
FAMILY_ESTIMATORS = [
    ("lowrank", "local"), ("lowrank", "reparameterization"),
    ("matrix_normal", "local"), ("matrix_normal", "reparameterization"),
    ("full", "local"), ("full", "reparameterization"),
    ("radial", "flipout"), ("radial", "reparameterization"),
]  # fmt: skip


def _fit_both_routes(
    k: int, init_scale: float, posterior: str, estimator: str
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``k`` models of one family through ``fit_ensemble`` and each through ``fit``: states."""
    built = [
        _model(i, estimator=estimator, init_scale=init_scale, posterior=posterior) for i in range(k)
    ]
    torch.manual_seed(7)
    _quiet(
        lambda: fit_ensemble(
            [m for m, _ in built], [d.x for d in DATA[:k]], [d.y for d in DATA[:k]],
            likelihoods=[lik for _, lik in built], seeds=list(range(3, 3 + k)), **OPTIONS,
        )
    )  # fmt: skip
    pairs = []
    for i, (model, likelihood) in enumerate(built):
        ref, ref_lik = _model(i, estimator=estimator, init_scale=init_scale, posterior=posterior)
        torch.manual_seed(7)
        _quiet(
            lambda r=ref, rl=ref_lik, i=i: varlin.fit(
                r, DATA[i].x, DATA[i].y, likelihood=rl, seed=3 + i, **OPTIONS
            )
        )
        fresh, _ = _model(i, estimator=estimator, init_scale=init_scale, posterior=posterior)
        assert not torch.allclose(fresh[0].w_posterior.loc, model[0].w_posterior.loc)
        pairs.append((_state(model, likelihood), _state(ref, ref_lik)))
    return pairs


@pytest.mark.parametrize(("posterior", "estimator"), FAMILY_ESTIMATORS)
def test_one_stacked_model_of_every_family_is_fit_with_real_noise(
    posterior: str, estimator: str
) -> None:
    """Nothing in the stacked route names a family: with K = 1 each trains exactly as in fit."""
    ((got, want),) = _fit_both_routes(1, 0.1, posterior, estimator)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("estimator", ["flipout", "reparameterization"])
def test_stacked_radial_models_equal_separate_fits(estimator: str) -> None:
    """A second family, K = 3: stacked equals separate fits (scales at 1e-8, see the module).

    Radial and mean-field keep their noise negligible from that start over a short run. The
    low-rank, matrix-normal and full families do not: their off-diagonal factors start at 0 and
    Adam moves them by ~lr a step whatever the gradient's size, so within a few steps the
    weight noise is real and the K-model stream and the separate streams part (for those, the
    K = 1 test above makes the exact comparison).
    """
    for got, want in _fit_both_routes(3, 1e-8, "radial", estimator):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)


def _cnn(estimator: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        varlin.VariationalConv2d(1, 2, 3, estimator=estimator, init_scale=0.1),
        nn.ReLU(),
        nn.Flatten(),
        varlin.VariationalLinear(32, 3, estimator=estimator),
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_stacked_convolutional_model_is_fit_with_real_noise(estimator: str) -> None:
    """Convolutions too run under the stacked route unchanged (K = 1: fit's numbers)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model, ref = _cnn(estimator), _cnn(estimator)
    torch.manual_seed(7)
    _quiet(lambda: fit_ensemble([model], x, y, likelihoods=[Categorical()], seeds=[3], **OPTIONS))
    torch.manual_seed(7)
    _quiet(lambda: varlin.fit(ref, x, y, likelihood=Categorical(), seed=3, **OPTIONS))
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert not torch.allclose(_cnn(estimator)[0].w_posterior.loc, model[0].w_posterior.loc)


# ---------------------------------------------------------------------------------------------
# the stacked noise: the estimator's law, independent across models


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_model_draws_independent_noise_of_the_estimators_law(estimator: str) -> None:
    r"""K = 2000 copies of one layer, one input row: the K outputs are i.i.d. N(m, v).

    With a Bernoulli likelihood and target 1 the NLL is ``softplus(-f)``, so the output ``f`` of
    each model is recovered exactly (float64). Its sample mean and variance must match the
    layer's closed-form ``output_moments`` (mean and variance tolerances of a 1e-6 failure rate,
    3 checks), and consecutive models must be uncorrelated (the same noise for every model would
    give correlation 1).
    """
    k = 2000
    torch.manual_seed(1)
    layer = varlin.VariationalLinear(3, 1, estimator=estimator, init_scale=0.4, dtype=torch.float64)
    models = [layer] * k  # K identical models; stacking copies their values
    likelihoods = [Bernoulli() for _ in range(k)]
    stacked = StackedModels(models, likelihoods, [ELBO(lik, 10) for lik in likelihoods])
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    y = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        nll = stacked.terms(x.expand(k, 1, 3), y.expand(k, 1), 1.0).nll
    f = -varlin.functional.inverse_softplus(nll)  # softplus(-f) = nll
    moments = layer.output_moments(x)
    m, v = moments.mean.reshape(()), moments.variance.reshape(())
    checks = 3
    assert abs(f.mean() - m) <= mean_tolerance(v, k, checks)
    assert abs(f.var() - v) <= variance_tolerance(v, k, checks)
    pairs = f.reshape(-1, 2)
    corr = sample_correlation(pairs[:, 0], pairs[:, 1])
    assert abs(float(corr)) <= correlation_tolerance(k // 2, checks)


# ---------------------------------------------------------------------------------------------
# validation and early stopping per model; checkpoints; non-finite losses


def test_early_stopping_is_per_model_and_matches_separate_fits() -> None:
    """Model 0 validates on -y (its validation NLL worsens: it stops early), model 1 on y."""
    options = {**OPTIONS, "epochs": 12, "lr_schedule": "constant", "patience": 2}
    validation = [(DATA[0].x, -DATA[0].y), (DATA[1].x, DATA[1].y)]
    built = [_model(i) for i in range(2)]
    histories = _quiet(
        lambda: fit_ensemble(
            [m for m, _ in built], [DATA[0].x, DATA[1].x], [DATA[0].y, DATA[1].y],
            likelihoods=[lik for _, lik in built], seeds=[1, 2], validation=validation, **options,
        )
    )  # fmt: skip
    assert histories[0].stopped_early and len(histories[0]) < 12
    assert not histories[1].stopped_early and len(histories[1]) == 12
    for i, ((model, likelihood), history) in enumerate(zip(built, histories, strict=True)):
        ref, ref_lik = _model(i)
        want = _quiet(
            lambda r=ref, lk=ref_lik, i=i: varlin.fit(
                r, DATA[i].x, DATA[i].y, likelihood=lk, seed=i + 1, validation=validation[i],
                **options,
            )
        )  # fmt: skip
        _assert_close_records(history, want)
        got_state, want_state = _state(model, likelihood), _state(ref, ref_lik)
        for name in want_state:
            torch.testing.assert_close(got_state[name], want_state[name], msg=name)


def _ensemble(**kwargs: Any) -> tuple[list[tuple[nn.Module, Likelihood]], list[History]]:
    built = [_model(i, init_scale=0.05, generator_seed=9 if i == 0 else None) for i in range(3)]
    options = {**OPTIONS, "epochs": 5, "seeds": [4, 5, 6], **kwargs}
    histories = _quiet(
        lambda: fit_ensemble(
            [m for m, _ in built], [d.x for d in DATA], [d.y for d in DATA],
            likelihoods=[lik for _, lik in built], **options,
        )
    )  # fmt: skip
    return built, histories


def test_resume_reproduces_the_uninterrupted_stacked_run_exactly(tmp_path: Path) -> None:
    """Real noise, a cosine schedule, validation: interrupted in epoch 2, resumed to the end.

    The first model runs the code of every model, so a hook on it sees every step.
    """
    validation = (DATA[2].x, DATA[2].y)
    full, full_histories = _ensemble(validation=validation)
    path = tmp_path / "run.pt"
    built = [_model(i, init_scale=0.05, generator_seed=9 if i == 0 else None) for i in range(3)]
    built[0][0].register_forward_hook(_InterruptAfter(10))  # epoch 2, step 1 (3 steps, 1 eval)
    with pytest.raises(KeyboardInterrupt):
        _quiet(
            lambda: fit_ensemble(
                [m for m, _ in built], [d.x for d in DATA], [d.y for d in DATA],
                likelihoods=[lik for _, lik in built], checkpoint=path, validation=validation,
                **{**OPTIONS, "epochs": 5, "seeds": [4, 5, 6]},
            )
        )  # fmt: skip
    assert varlin.training.load_checkpoint(path)["epoch"] == 1
    torch.manual_seed(123)  # whatever happened in between
    resumed, histories = _ensemble(checkpoint=path, validation=validation)
    for (model, lik), (ref, ref_lik) in zip(resumed, full, strict=True):
        got, want = _state(model, lik), _state(ref, ref_lik)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert [_records(h) for h in histories] == [_records(h) for h in full_histories]


def test_checkpoints_of_one_model_and_of_several_do_not_mix(tmp_path: Path) -> None:
    single = tmp_path / "single.pt"
    model, likelihood = _model(0)
    _quiet(lambda: varlin.fit(model, DATA[0].x, DATA[0].y, likelihood=likelihood, epochs=1,
                              checkpoint=single, progress=False))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"single\.pt' holds 1 models, fit_ensemble has 3"):
        _ensemble(checkpoint=single)
    several = tmp_path / "several.pt"
    _ensemble(checkpoint=several, epochs=1)
    model, likelihood = _model(0)
    with pytest.raises(CheckpointError, match=r"several\.pt' holds 3 models trained together"):
        varlin.fit(model, DATA[0].x, DATA[0].y, likelihood=likelihood, epochs=2,
                   checkpoint=several, progress=False)  # fmt: skip


def test_a_non_finite_model_stops_the_run_and_every_model_keeps_its_last_good_state() -> None:
    calls = {"steps": 0}

    class Sabotage(torch.optim.Adam):
        def step(self, closure: Any = None) -> Any:
            super().step(closure)
            calls["steps"] += 1
            if calls["steps"] == 7:  # epoch 2, step 0: model 1's weights become infinite
                with torch.no_grad():
                    self.param_groups[0]["params"][0][1].fill_(float("inf"))

    built = [_model(i, init_scale=0.05) for i in range(3)]
    options = {**OPTIONS, "epochs": 5, "seeds": [4, 5, 6], "lr_schedule": "constant"}
    with pytest.raises(NonFiniteLossError, match=r"loss of model 1 became \S+ at epoch 2, step 1"):
        _quiet(
            lambda: fit_ensemble(
                [m for m, _ in built], [d.x for d in DATA], [d.y for d in DATA],
                likelihoods=[lik for _, lik in built],
                optimizer=lambda p: Sabotage(p, lr=0.02), **options,
            )
        )  # fmt: skip
    # The last good state is the end of epoch 1, where a clean 2-epoch run (constant lr, the
    # same plain Adam) ends.
    clean = [_model(i, init_scale=0.05) for i in range(3)]
    _quiet(
        lambda: fit_ensemble(
            [m for m, _ in clean], [d.x for d in DATA], [d.y for d in DATA],
            likelihoods=[lik for _, lik in clean], **{**options, "epochs": 2},
            optimizer=lambda p: torch.optim.Adam(p, lr=0.02),
        )
    )  # fmt: skip
    for (model, lik), (ref, ref_lik) in zip(built, clean, strict=True):
        got, want = _state(model, lik), _state(ref, ref_lik)
        for name in want:
            assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------------------------------------
# diagnostics, other models, argument errors


def test_diagnostics_name_the_model() -> None:
    """Model 1 starts with scales of 1e-7 and a negligible KL: only it collapses."""
    built = [_model(0, init_scale=1e-2), _model(1, init_scale=1e-7)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_ensemble(
            [m for m, _ in built], DATA[0].x, DATA[0].y, likelihoods=[lik for _, lik in built],
            num_data=10**9, **OPTIONS,
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("model 1: posterior scales collapsed")


def test_models_with_deterministic_layers_and_other_priors() -> None:
    """A converted model (frozen features, a Bayesian last layer with a scale-mixture prior:
    Monte Carlo KL) and a seed layer returning (y, kl) train through the stacked route."""
    prior = priors.scale_mixture(0.5, 1.0, 0.1)

    def converted(k: int) -> nn.Module:
        torch.manual_seed(k)
        net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
        return varlin.to_variational(net, layers="last", prior=prior, init_scale=0.05)

    k = 2
    models = [converted(i) for i in range(k)]
    frozen = [m[0].weight.detach().clone() for m in models]
    for m in models:
        m[0].requires_grad_(False)
    before = [m[2].w_posterior.loc.detach().clone() for m in models]
    histories = _quiet(
        lambda: fit_ensemble(models, DATA[0].x, DATA[0].y,
                             likelihoods=[Gaussian(0.5) for _ in models], **OPTIONS)
    )  # fmt: skip
    for m, w, b, h in zip(models, frozen, before, histories, strict=True):
        assert torch.equal(m[0].weight, w)  # frozen stays frozen
        assert not torch.equal(m[2].w_posterior.loc, b)  # the variational layer trained
        assert all(math.isfinite(v) for v in h["loss"])
    seeds = [varlin.LinearVariationalNormal(1, 1) for _ in range(k)]
    histories = _quiet(
        lambda: fit_ensemble(seeds, DATA[0].x, DATA[0].y,
                             likelihoods=[Gaussian(0.5) for _ in seeds], **OPTIONS)
    )  # fmt: skip
    assert [len(h) for h in histories] == [4, 4]


def test_argument_errors() -> None:
    built = [_model(i) for i in range(2)]
    models, likelihoods = [m for m, _ in built], [lik for _, lik in built]
    x, y = DATA[0].x, DATA[0].y
    with pytest.raises(ValueError, match="models must hold at least one model"):
        fit_ensemble([], x, y, likelihoods=[], epochs=1)
    with pytest.raises(ValueError, match=r"likelihoods must hold one likelihood per model \(2\)"):
        fit_ensemble(models, x, y, likelihoods=likelihoods[:1], epochs=1)
    with pytest.raises(TypeError, match=r"likelihoods\[1\] must be a varlin Likelihood"):
        fit_ensemble(models, x, y, likelihoods=[likelihoods[0], nn.MSELoss()], epochs=1)
    with pytest.raises(ValueError, match=r"seeds must hold one seed per model \(2\), got 3"):
        fit_ensemble(models, x, y, likelihoods=likelihoods, epochs=1, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match=r"x must hold one tensor per model \(2\), got 3"):
        fit_ensemble(models, [x] * 3, [y] * 3, likelihoods=likelihoods, epochs=1)
    with pytest.raises(ValueError, match="x must hold tensors of one shape"):
        fit_ensemble(models, [x, x[:40]], [y, y[:40]], likelihoods=likelihoods, epochs=1)
    with pytest.raises(TypeError, match="y must be a list of one target tensor per model"):
        fit_ensemble(models, [x, x], y, likelihoods=likelihoods, epochs=1)
    with pytest.raises(ValueError, match="x must be finite"):
        fit_ensemble(models, [x, x * math.nan], [y, y], likelihoods=likelihoods, epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit_ensemble(models, x, y, likelihoods=likelihoods, epochs=0)
    with pytest.raises(ValueError, match="validation must be one pair .* got 3 pairs for 2"):
        fit_ensemble(models, x, y, likelihoods=likelihoods, epochs=1, validation=[(x, y)] * 3)
    wider, _ = _model(0)
    wider[2] = varlin.VariationalLinear(8, 2)
    with pytest.raises(ValueError, match="models must share one architecture.* model 1 differs"):
        fit_ensemble([models[0], wider], x, y, likelihoods=likelihoods, epochs=1)
    with pytest.raises(ValueError, match="models must share one architecture.* model 1 differs"):
        fit_ensemble(models, x, y, likelihoods=[Gaussian(0.5), Gaussian(0.5, learn_noise=True)],
                     epochs=1)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# method="moments": no weight noise, so the stacked route equals separate fits with real scales


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("heteroscedastic", [False, True], ids=["gaussian", "heteroscedastic"])
def test_stacked_moment_fits_equal_separate_fits(heteroscedastic: bool, covariance: str) -> None:
    """The moment ELBO draws nothing, so K stacked models and K calls of fit agree to rounding
    with posterior scales of a real size (0.1), validation by the moments predictive included."""
    k, seeds = 2, [21, 22]
    options = {**OPTIONS, "method": "moments", "covariance": covariance}
    built = [_model(i, init_scale=0.1, heteroscedastic=heteroscedastic) for i in range(k)]
    histories = _quiet(
        lambda: fit_ensemble(
            [m for m, _ in built], [d.x for d in DATA[:k]], [d.y for d in DATA[:k]],
            likelihoods=[lik for _, lik in built], seeds=seeds,
            validation=[(d.x, d.y) for d in DATA[:k]], **options,
        )
    )  # fmt: skip
    for i, ((model, likelihood), history) in enumerate(zip(built, histories, strict=True)):
        ref_model, ref_lik = _model(i, init_scale=0.1, heteroscedastic=heteroscedastic)
        want = _quiet(
            lambda m=ref_model, lk=ref_lik, d=DATA[i], s=seeds[i]: varlin.fit(
                m, d.x, d.y, likelihood=lk, seed=s, validation=(d.x, d.y), **options
            )
        )
        got_state, want_state = _state(model, likelihood), _state(ref_model, ref_lik)
        for name in want_state:
            torch.testing.assert_close(got_state[name], want_state[name], msg=name)
        _assert_close_records(history, want)
        assert "val_nll" in history.records[-1]
        fresh, _ = _model(i, init_scale=0.1, heteroscedastic=heteroscedastic)
        assert not torch.allclose(fresh[0].w_posterior.loc, model[0].w_posterior.loc)


def test_stacked_moment_fits_draw_logits_from_the_layers_generator() -> None:
    """Classification under method="moments": the logits of all K models are drawn from the
    first model's layer generator under vmap, never from torch's global state: two runs from the
    same seeds are bit-identical although the global state differs, and leave it untouched."""
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(3))
    y = (x[:, 0] > 0).long()
    runs = []
    for global_seed in (1, 2):
        models = []
        for k in range(2):
            model, _ = _model(k, init_scale=0.1, generator_seed=50)
            models.append(nn.Sequential(*model[:2], varlin.VariationalLinear(8, 2)))
            models[-1][2].generator = model[0].generator  # one generator per model, shared
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        likelihoods = [Categorical(logit_samples=4) for _ in models]
        histories = _quiet(
            lambda m=models, lk=likelihoods: fit_ensemble(
                m, x, y, likelihoods=lk, method="moments", **OPTIONS
            )
        )
        assert torch.random.get_rng_state().equal(before)
        runs.append(([_state(m, lk) for m, lk in zip(models, likelihoods, strict=True)],
                     [_records(h) for h in histories]))  # fmt: skip
    for got, want in zip(runs[0][0], runs[1][0], strict=True):
        assert all(torch.equal(got[name], want[name]) for name in want)
    assert runs[0][1] == runs[1][1]


def test_moments_method_errors_in_fit_ensemble() -> None:
    model, lik = _model(0)
    with pytest.raises(ValueError, match="covariance='full' applies only to method='moments'"):
        fit_ensemble([model], DATA[0].x, DATA[0].y, likelihoods=[lik], covariance="full", **OPTIONS)
    bad = nn.Sequential(
        varlin.VariationalLinear(1, 4), nn.Softplus(), varlin.VariationalLinear(4, 1)
    )
    with pytest.raises(TypeError, match="no moment rule for Softplus"):
        fit_ensemble(
            [bad], DATA[0].x, DATA[0].y, likelihoods=[Gaussian()], method="moments", **OPTIONS
        )
