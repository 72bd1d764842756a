"""Tests for varlin.sklearn: scikit-learn's own estimator checks, meta-estimators, and the math.

The estimator checks run on small networks trained for few epochs (``_CHECKED``): the checks
test the API contract (validation, fitted attributes, determinism, pickling, subsets of rows)
plus a training-set score on easy problems, not the quality of a long fit.
"""

from __future__ import annotations

import ast
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.linear_model import BayesianRidge  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import varlin  # noqa: E402
from varlin import sklearn as vsk  # noqa: E402
from varlin.sklearn import (  # noqa: E402
    ClassificationUncertainty,
    RegressionUncertainty,
    VariationalMLPClassifier,
    VariationalMLPRegressor,
)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "varlin"

#: Small and quick, yet enough for the checks' training scores (R^2 > 0.5, accuracy > 0.83).
_CHECKED = {
    "hidden_layer_sizes": (8,),
    "max_iter": 15,
    "learning_rate_init": 0.1,
    "n_predict_samples": 8,
}


# Tiny networks: one intra-op thread is fastest (and immune to a loaded machine).
pytestmark = pytest.mark.usefixtures("single_thread")


# The checks train on random targets and on one or two rows, where varlin.fit rightly warns
# that the data fit did not improve (a training diagnostic, not part of the estimator's
# contract); pytest's filterwarnings=error would turn that into a failure of the check.
@pytest.mark.filterwarnings("ignore::varlin.training.VarlinWarning")
@parametrize_with_checks(
    [VariationalMLPRegressor(**_CHECKED), VariationalMLPClassifier(**_CHECKED)],
)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


# ---------------------------------------------------------------------------------------------
# helpers


def _linear_data(n: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([0.0, 5.0, -2.0])
    y = X @ np.array([1.5, -0.2, 8.0]) + 3.0 + noise * rng.normal(size=n)
    return X, y


def _small(cls: type, **kwargs: Any) -> Any:
    return cls(**{**_CHECKED, "random_state": 0, **kwargs})


# ---------------------------------------------------------------------------------------------
# meta-estimators


def test_pipeline_grid_search_and_cross_val_score() -> None:
    X, y = _linear_data(120, seed=1)
    pipe = make_pipeline(StandardScaler(), _small(VariationalMLPRegressor, max_iter=40))
    search = GridSearchCV(
        pipe, {"variationalmlpregressor__prior_scale": [0.5, 1.0]}, cv=KFold(2), error_score="raise"
    )
    search.fit(X, y)
    assert search.best_params_["variationalmlpregressor__prior_scale"] in (0.5, 1.0)
    assert search.best_score_ > 0.8  # R^2 of a nearly linear problem with noise sd 0.5
    assert search.predict(X[:5]).shape == (5,)

    Xc, yc = make_classification(
        n_samples=150, n_features=4, n_informative=3, n_redundant=0, random_state=0
    )
    labels = np.array(["no", "yes"])[yc]
    scores = cross_val_score(_small(VariationalMLPClassifier), Xc, labels, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.7  # chance is 0.5


# ---------------------------------------------------------------------------------------------
# the math: a linear model against the exact posterior, the splits, the standardisation


def test_linear_model_reaches_the_mean_field_optimum_of_the_exact_posterior() -> None:
    """``hidden_layer_sizes=()`` is Bayesian linear regression: on standardised data, its
    variational posterior must be the best mean-field approximation of the exact posterior
    (``BayesianLinearRegression.mean_field_optimum``: the posterior mean, and variances
    ``1 / diag(precision)``) for the noise scale it learned.

    Tolerances: training is stochastic (minibatch and local-reparameterization noise, cosine
    decay to 0); the mean must sit within 0.25 posterior standard deviations of the optimum and
    each scale within 15% of it.
    """
    X, y = _linear_data(400, seed=2)
    reg = VariationalMLPRegressor(
        hidden_layer_sizes=(), max_iter=400, learning_rate_init=0.02, random_state=0
    ).fit(X, y)
    layer = reg.model_[0]
    xs = torch.tensor((X - reg.x_mean_) / reg.x_scale_)
    ys = torch.tensor((y - reg.y_mean_) / reg.y_scale_)
    design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1)  # bias as a column
    sigma = float(reg.likelihood_.noise_scale.detach())
    optimum = varlin.BayesianLinearRegression(prior_scale=1.0, noise_scale=sigma).fit(design, ys)
    best = optimum.mean_field_optimum()
    loc = torch.cat([layer.w_loc.detach()[:, 0], layer.b_loc.detach()])
    scale = torch.cat([layer.w_scale.detach()[:, 0], layer.b_scale.detach()])
    assert float(((loc - best.loc) / best.scale).abs().max()) < 0.25
    assert float((scale / best.scale - 1).abs().max()) < 0.15
    # The learned noise is the data's (0.5 in y's units): sd of a residual variance estimate
    # from 400 draws is sqrt(2/400) = 7% of it; 6 sd bounds the failure rate below 1e-8.
    assert abs(sigma * reg.y_scale_ / 0.5 - 1) < 6 * math.sqrt(2 / 400) / 2 + 0.02
    # In y's units the predictive is BayesianRidge's (a second route to the same posterior).
    Xt, _ = _linear_data(50, seed=3)
    mean, std = reg.predict(Xt, return_std=True)
    ridge_mean, ridge_std = BayesianRidge().fit(X, y).predict(Xt, return_std=True)
    np.testing.assert_allclose(mean, ridge_mean, atol=0.05 * ridge_std.min())
    np.testing.assert_allclose(std, ridge_std, rtol=0.03)


def test_regression_uncertainty_split_adds_up_and_follows_the_noise() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, size=(600, 1))
    y = np.sin(x[:, 0]) + (0.05 + 0.4 * (x[:, 0] > 0)) * rng.normal(size=600)
    reg = VariationalMLPRegressor(
        hidden_layer_sizes=(16,), likelihood="heteroscedastic", max_iter=150, random_state=0
    ).fit(x, y)
    grid = np.array([[-1.5], [-1.0], [1.0], [1.5]])
    u = reg.predict_uncertainty(grid)
    assert isinstance(u, RegressionUncertainty)
    np.testing.assert_allclose(u.std**2, u.epistemic_std**2 + u.aleatoric_std**2, rtol=1e-12)
    mean, std = reg.predict(grid, return_std=True)
    np.testing.assert_array_equal(mean, u.mean)
    np.testing.assert_array_equal(std, u.std)
    np.testing.assert_array_equal(reg.predict(grid), u.mean)
    # the noise sd is 0.05 left of 0 and 0.45 right of it: the aleatoric part must see that
    assert u.aleatoric_std[2:].min() > 3 * u.aleatoric_std[:2].max()
    assert np.all(u.aleatoric_std[:2] < 0.2) and np.all(np.abs(u.aleatoric_std[2:] - 0.45) < 0.15)


def test_classification_uncertainty_split_adds_up() -> None:
    Xc, yc = make_classification(n_samples=200, n_features=4, n_classes=3, n_informative=3,
                                 n_redundant=0, random_state=1)  # fmt: skip
    clf = _small(VariationalMLPClassifier).fit(Xc, yc)
    u = clf.predict_uncertainty(Xc[:20])
    assert isinstance(u, ClassificationUncertainty)
    np.testing.assert_allclose(u.proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(u.entropy, u.aleatoric_entropy + u.mutual_information, atol=1e-12)
    assert np.all(u.mutual_information >= 0) and np.all(u.entropy <= math.log(3) + 1e-12)
    np.testing.assert_array_equal(clf.predict_proba(Xc[:20]), u.proba)
    np.testing.assert_allclose(clf.predict_log_proba(Xc[:20]), np.log(u.proba))


def test_inputs_and_targets_are_standardised_inside() -> None:
    """Affine changes of units in X and y change nothing but the units of the predictions."""
    X, y = _linear_data(100, seed=5)
    reg = _small(VariationalMLPRegressor).fit(X, y)
    np.testing.assert_allclose(reg.x_mean_, X.mean(0))
    np.testing.assert_allclose(reg.x_scale_, X.std(0))
    assert reg.y_mean_ == pytest.approx(y.mean()) and reg.y_scale_ == pytest.approx(y.std())
    moved = _small(VariationalMLPRegressor).fit(X * 1000.0 - 7.0, y * 100.0 + 3.0)
    mean, std = reg.predict(X[:10], return_std=True)
    mean2, std2 = moved.predict(X[:10] * 1000.0 - 7.0, return_std=True)
    np.testing.assert_allclose(mean2, mean * 100.0 + 3.0, rtol=1e-6)
    np.testing.assert_allclose(std2, std * 100.0, rtol=1e-6)


def test_constant_feature_does_not_divide_by_zero() -> None:
    X, y = _linear_data(60, seed=6)
    X[:, 1] = 4.0
    reg = _small(VariationalMLPRegressor).fit(X, y)
    assert reg.x_scale_[1] == 1.0
    assert np.all(np.isfinite(reg.predict(X)))


# ---------------------------------------------------------------------------------------------
# labels, feature names, dtypes, pickling, options


@pytest.mark.parametrize(
    "labels",
    [np.array(["cat", "dog", "emu"]), np.array([-1, 7, 30]), np.array([False, True, True])],
    ids=["strings", "integers", "booleans"],
)
def test_classes_of_any_label_type(labels: np.ndarray) -> None:
    Xc, yc = make_classification(n_samples=150, n_features=4, n_classes=3, n_informative=3,
                                 n_redundant=0, n_clusters_per_class=1, class_sep=3.0,
                                 random_state=2)  # fmt: skip
    classes = np.unique(labels)
    y = classes[yc % len(classes)]
    clf = _small(VariationalMLPClassifier).fit(Xc, y)
    np.testing.assert_array_equal(clf.classes_, classes)
    pred = clf.predict(Xc)
    assert pred.dtype == classes.dtype and set(pred) <= set(classes)
    assert clf.predict_proba(Xc).shape == (150, len(classes))
    assert clf.score(Xc, y) > 0.9  # separable classes (class_sep=3)


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match=r"at least two classes.*got one class: 'a'"):
        _small(VariationalMLPClassifier).fit(np.zeros((5, 2)), ["a"] * 5)


def test_feature_names_and_count() -> None:
    pd = pytest.importorskip("pandas")
    X, y = _linear_data(60, seed=7)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    reg = _small(VariationalMLPRegressor).fit(frame, y)
    assert reg.n_features_in_ == 3
    np.testing.assert_array_equal(reg.feature_names_in_, ["a", "b", "c"])
    with pytest.raises(ValueError, match="feature names should match"):
        reg.predict(frame.rename(columns={"a": "z"}))
    plain = _small(VariationalMLPRegressor).fit(X, y)
    assert plain.n_features_in_ == 3 and not hasattr(plain, "feature_names_in_")
    with pytest.raises(ValueError, match="X has 2 features, but VariationalMLPRegressor is "
                                         "expecting 3 features"):  # fmt: skip
        plain.predict(X[:, :2])


def test_float32_inputs_train_a_float32_network() -> None:
    X, y = _linear_data(60, seed=8)
    reg = _small(VariationalMLPRegressor).fit(X.astype(np.float32), y)
    assert all(p.dtype == torch.float32 for p in reg.model_.parameters())
    assert reg.predict(X).dtype == np.float32
    assert _small(VariationalMLPRegressor).fit(X, y).predict(X).dtype == np.float64


def test_pickle_round_trip_predicts_the_same() -> None:
    Xc, yc = make_classification(n_samples=80, n_features=4, random_state=3)
    clf = _small(VariationalMLPClassifier).fit(Xc, yc)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(Xc), clf.predict_proba(Xc))
    assert clone(clf).get_params() == clf.get_params()


def test_same_random_state_same_model_other_state_other_model() -> None:
    X, y = _linear_data(80, seed=9)
    a = _small(VariationalMLPRegressor, random_state=1).fit(X, y).predict(X, return_std=True)
    b = _small(VariationalMLPRegressor, random_state=1).fit(X, y).predict(X, return_std=True)
    c = _small(VariationalMLPRegressor, random_state=2).fit(X, y).predict(X, return_std=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], c[1])


def test_early_stopping_keeps_the_best_epoch() -> None:
    X, y = _linear_data(200, seed=10)
    reg = _small(
        VariationalMLPRegressor, early_stopping=True, n_iter_no_change=3, max_iter=300
    ).fit(X, y)
    history = reg.history_
    assert "val_nll" in history.records[0]
    assert reg.n_iter_ == len(history) <= 300
    if history.stopped_early:
        val = history["val_nll"]
        assert history.best_epoch == int(np.argmin(val))
        assert reg.n_iter_ == history.best_epoch + 1 + 3
    assert len(reg.loss_curve_) == reg.n_iter_


def test_fit_and_predict_leave_torch_default_generator_alone() -> None:
    """All randomness comes from ``random_state``: torch's global generator is never drawn."""
    X, y = _linear_data(40, seed=16)
    state = torch.get_rng_state()
    reg = _small(VariationalMLPRegressor, early_stopping=True).fit(X, y)
    reg.predict(X, return_std=True)
    clf = _small(VariationalMLPClassifier).fit(X, y > np.median(y))
    clf.predict_proba(X)
    assert torch.equal(torch.get_rng_state(), state)


def test_verbose_shows_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    X, y = _linear_data(40, seed=11)
    _small(VariationalMLPRegressor, verbose=True, max_iter=3).fit(X, y)
    assert "fit" in capsys.readouterr().err
    _small(VariationalMLPRegressor, max_iter=3).fit(X, y)
    assert capsys.readouterr().err == ""


class _RecordingLayer(varlin.VariationalLinear):
    """A layer with a ``posterior`` argument, as families beyond mean-field add to it."""

    calls: list[dict[str, Any]] = []

    def __init__(self, *args: Any, posterior: str = "meanfield", **kwargs: Any) -> None:
        rank = kwargs.pop("rank", None)
        if posterior not in ("meanfield", "lowrank"):
            raise ValueError(f"posterior must be one of 'meanfield', 'lowrank', got {posterior!r}")
        type(self).calls.append({"posterior": posterior, "rank": rank})
        super().__init__(*args, **kwargs)


def test_posterior_is_passed_through_to_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimators validate ``posterior`` by handing it to the layers, so a family the layers
    learn works here without a change."""
    monkeypatch.setattr(vsk, "VariationalLinear", _RecordingLayer)
    _RecordingLayer.calls = []
    X, y = _linear_data(40, seed=12)
    reg = _small(
        VariationalMLPRegressor, posterior="lowrank", posterior_options={"rank": 2}, max_iter=2
    )
    reg.fit(X, y)
    # a 1 x 1 probe (the hyper-parameter check), then the network's two layers
    assert _RecordingLayer.calls == [{"posterior": "lowrank", "rank": 2}] * 3
    with pytest.raises(ValueError, match="posterior must be one of 'meanfield', 'lowrank', got"):
        reg.set_params(posterior="nonesuch").fit(X, y)


def test_unknown_posterior_is_refused_by_name() -> None:
    X, y = _linear_data(20, seed=13)
    with pytest.raises(ValueError, match=r"posterior must be .*got 'nonesuch'"):
        _small(VariationalMLPRegressor, posterior="nonesuch").fit(X, y)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"hidden_layer_sizes": (8, 0)}, ValueError, r"hidden_layer_sizes\[1\] must be a positive"),
        ({"hidden_layer_sizes": "big"}, TypeError, r"hidden_layer_sizes\[0\] must be a positive"),
        ({"hidden_layer_sizes": 2.5}, TypeError, "hidden_layer_sizes must be a positive integer"),
        ({"activation": "softmax"}, ValueError, "activation must be one of 'identity'"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"batch_size": "big"}, ValueError, "batch_size must be 'auto' or a positive integer"),
        ({"learning_rate_init": 0.0}, ValueError, "learning_rate_init must be > 0.0, got 0.0"),
        ({"max_iter": 0}, ValueError, "max_iter must be a positive integer, got 0"),
        ({"early_stopping": "yes"}, TypeError, "early_stopping must be True or False"),
        ({"validation_fraction": 1.0}, ValueError, r"validation_fraction must be in \(0, 1\)"),
        ({"n_iter_no_change": -1}, ValueError, "n_iter_no_change must be a positive integer"),
        ({"verbose": "loud"}, TypeError, "verbose must be a bool, got 'loud'"),
        ({"posterior_options": [1]}, TypeError, "posterior_options must be None or a dict"),
        ({"estimator": "magic"}, ValueError, "estimator must be one of"),
        ({"prior_scale": -1.0}, ValueError, "prior_scale must be > 0.0, got -1.0"),
        ({"likelihood": "poisson"}, ValueError, "likelihood must be one of 'homoscedastic'"),
        ({"n_predict_samples": 0}, ValueError, "n_predict_samples must be a positive integer"),
        ({"device": "abacus"}, ValueError, "device must be None or a torch device"),
    ],
)
def test_bad_hyper_parameters_are_named_at_fit(
    params: dict[str, Any], error: type[Exception], message: str
) -> None:
    X, y = _linear_data(20, seed=14)
    reg = _small(VariationalMLPRegressor, **params)  # the constructor only stores them
    with pytest.raises(error, match=message):
        reg.fit(X, y)
    assert not [k for k in vars(reg) if k.endswith("_")]  # nothing fitted is left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda_is_refused() -> None:
    X, y = _linear_data(20, seed=15)
    with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available"):
        _small(VariationalMLPRegressor, device="cuda").fit(X, y)


def test_readme_example_runs() -> None:
    """The README's scikit-learn snippet runs as written (with 5 epochs)."""
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    start = readme.index("```python\nfrom sklearn.datasets import load_diabetes")
    code = readme[start + len("```python\n") : readme.index("\n```", start)]
    code, replaced = re.subn(r"random_state=0\)", "random_state=0, max_iter=5)", code)
    assert replaced == 1
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    mean, std, split = namespace["mean"], namespace["std"], namespace["split"]
    assert mean.shape == std.shape == (442,) and np.all(std > 0)
    np.testing.assert_allclose(split.std, std)


# ---------------------------------------------------------------------------------------------
# an optional extra


def test_import_varlin_does_not_import_sklearn() -> None:
    code = "import sys, varlin; sys.exit('sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_only_varlin_sklearn_imports_sklearn() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "sklearn":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            assert not any(n.split(".")[0] == "sklearn" for n in names), path.name
