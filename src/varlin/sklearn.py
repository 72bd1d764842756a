r"""scikit-learn estimators: variational MLPs for tabular data, with calibrated uncertainty.

:class:`VariationalMLPRegressor` and :class:`VariationalMLPClassifier` are multilayer
perceptrons whose every layer is a :class:`varlin.VariationalLinear`, trained by maximising the
ELBO (:func:`varlin.fit`) and predicting with the posterior predictive (:func:`varlin.predict`).
They follow :class:`sklearn.neural_network.MLPRegressor` and
:class:`~sklearn.neural_network.MLPClassifier` wherever a parameter means the same thing
(``hidden_layer_sizes``, ``activation``, ``batch_size``, ``learning_rate_init``, ``max_iter``,
``early_stopping``, ``validation_fraction``, ``n_iter_no_change``, ``random_state``,
``verbose``), add varlin's own (``posterior``, ``estimator``, ``prior_scale``, ``likelihood``,
``n_predict_samples``, ``device``), and pass scikit-learn's own estimator checks, so they work in
``Pipeline``, ``GridSearchCV`` and ``cross_val_score``.

The regressor's ``predict(X, return_std=True)`` returns the predictive mean and standard
deviation, as :class:`~sklearn.linear_model.BayesianRidge` and
:class:`~sklearn.gaussian_process.GaussianProcessRegressor` do; ``predict_uncertainty(X)`` splits
the variance into its epistemic and aleatoric parts. The classifier has ``predict_proba`` and the
entropy split (mutual information for the epistemic part).

Needs the ``sklearn`` extra: ``pip install "varlin[sklearn]"``.

How the estimators work:

- Inputs (and the regressor's targets) are standardised with the training set's mean and standard
  deviation (fitted attributes ``x_mean_``, ``x_scale_``, ``y_mean_``, ``y_scale_``); predictions
  are returned in the original units. The network computes in the input's floating dtype
  (float32 stays float32, anything else becomes float64), as ``MLPRegressor`` does.
- Training uses ``estimator`` (``"local"`` by default: the lowest-variance gradients). Prediction
  draws ``n_predict_samples`` weight samples that every row shares, from a seed fixed at ``fit``:
  predictions are deterministic, and a row's prediction does not depend on the other rows of the
  batch (scikit-learn requires both).
- ``random_state`` seeds the initialisation, the training noise, the shuffling, the early-stopping
  split and the prediction samples: two fits with the same integer give the same model.

Example:
    >>> from sklearn.datasets import load_diabetes
    >>> X, y = load_diabetes(return_X_y=True)
    >>> reg = VariationalMLPRegressor(random_state=0).fit(X, y)
    >>> mean, std = reg.predict(X[:5], return_std=True)
"""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'varlin.sklearn needs scikit-learn >= 1.6: pip install "varlin[sklearn]"'
    ) from exc

from . import _validation as V
from . import priors
from .layers import VariationalLinear, variational_layers
from .likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, Likelihood
from .predictive import ClassificationPrediction, RegressionPrediction, predict
from .training import History, fit

__all__ = [
    "VariationalMLPRegressor",
    "VariationalMLPClassifier",
    "RegressionUncertainty",
    "ClassificationUncertainty",
]

#: ``activation`` names, as in ``MLPRegressor``, and the modules they stand for.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}
LIKELIHOODS = ("homoscedastic", "heteroscedastic")
#: The default posterior family; the only one when the layers take no ``posterior`` argument.
DEFAULT_POSTERIOR = "meanfield"
#: Rows per prediction chunk are chosen so that samples x rows x widest layer stays below this.
_PREDICT_ELEMENTS = 1 << 23


def _layers_take_posterior() -> bool:
    """Whether :class:`VariationalLinear` has a ``posterior=`` argument (a choice of family)."""
    return "posterior" in inspect.signature(VariationalLinear).parameters


@dataclass(frozen=True)
class RegressionUncertainty:
    """The predictive of :class:`VariationalMLPRegressor` at ``n`` rows, in the target's units.

    ``std**2 == epistemic_std**2 + aleatoric_std**2`` (the law of total variance).

    Attributes:
        mean: predictive mean, ``(n,)``.
        std: total predictive standard deviation, ``(n,)``.
        epistemic_std: the part from the posterior over the weights (shrinks with more data).
        aleatoric_std: the noise the model attributes to the data (does not shrink).
    """

    mean: np.ndarray
    std: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_std: np.ndarray


@dataclass(frozen=True)
class ClassificationUncertainty:
    """The predictive of :class:`VariationalMLPClassifier` at ``n`` rows (entropies in nats).

    ``entropy == aleatoric_entropy + mutual_information`` (the entropy decomposition).

    Attributes:
        proba: predictive class probabilities ``(n, n_classes)``, columns in ``classes_`` order.
        entropy: entropy of ``proba`` (total uncertainty), ``(n,)``.
        aleatoric_entropy: expected entropy under the posterior (data uncertainty).
        mutual_information: between the label and the weights (model uncertainty).
    """

    proba: np.ndarray
    entropy: np.ndarray
    aleatoric_entropy: np.ndarray
    mutual_information: np.ndarray


def _hidden_sizes(value: Any) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        sizes = tuple(value)
    except TypeError:
        raise TypeError(
            f"hidden_layer_sizes must be a positive integer or a sequence of them, got "
            f"{V.describe(value)}"
        ) from None
    return tuple(V.positive_int(f"hidden_layer_sizes[{i}]", s) for i, s in enumerate(sizes))


def _device(value: Any) -> torch.device:
    if value is None:
        return torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be None or a torch device such as 'cpu' or 'cuda:0', got "
            f"{V.describe(value)}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {value!r} but CUDA is not available on this machine")
    return device


def _standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations; a constant column keeps scale 1 (no division by 0)."""
    mean = a.mean(axis=0)
    scale = a.std(axis=0)
    scale = np.where(scale > 10 * np.finfo(a.dtype).eps * np.maximum(np.abs(mean), 1), scale, 1)
    return mean.astype(a.dtype), scale.astype(a.dtype)


class _VariationalMLP(BaseEstimator):
    """What the regressor and the classifier share: checks, the network, training, prediction."""

    def __init__(
        self,
        hidden_layer_sizes: Any = (50,),
        activation: str = "relu",
        *,
        batch_size: int | str = "auto",
        learning_rate_init: float = 0.01,
        max_iter: int = 200,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: Any = None,
        verbose: bool = False,
        posterior: str = DEFAULT_POSTERIOR,
        posterior_options: Mapping[str, Any] | None = None,
        estimator: str = "local",
        prior_scale: float = 1.0,
        n_predict_samples: int = 100,
        device: Any = None,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose
        self.posterior = posterior
        self.posterior_options = posterior_options
        self.estimator = estimator
        self.prior_scale = prior_scale
        self.n_predict_samples = n_predict_samples
        self.device = device

    # -- to be provided by the subclasses ---------------------------------------------------
    def _output_width(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_likelihood(self) -> Likelihood:  # pragma: no cover - abstract
        raise NotImplementedError

    def _target_tensor(self, y: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- fitting ----------------------------------------------------------------------------
    def _check_params(self) -> dict[str, Any]:
        """Validate the hyper-parameters (at ``fit``, as scikit-learn asks); return them parsed."""
        checked: dict[str, Any] = {
            "hidden": _hidden_sizes(self.hidden_layer_sizes),
            "activation": V.one_of("activation", self.activation, tuple(ACTIVATIONS)),
            "lr": V.real("learning_rate_init", self.learning_rate_init, min_value=0.0, strict=True),
            "epochs": V.positive_int("max_iter", self.max_iter),
            "early_stopping": V.boolean("early_stopping", self.early_stopping),
            "patience": V.positive_int("n_iter_no_change", self.n_iter_no_change),
            "prior_scale": V.real("prior_scale", self.prior_scale, min_value=0.0, strict=True),
            "device": _device(self.device),
        }
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise ValueError(
                f"batch_size must be 'auto' or a positive integer, got {self.batch_size!r}"
            )
        if self.batch_size != "auto":
            V.positive_int("batch_size", self.batch_size)
        fraction = V.real("validation_fraction", self.validation_fraction)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
        if isinstance(self.verbose, bool) or isinstance(self.verbose, numbers.Integral):
            checked["progress"] = bool(self.verbose)
        else:
            raise TypeError(f"verbose must be a bool, got {V.describe(self.verbose)}")
        V.positive_int("n_predict_samples", self.n_predict_samples)
        if not isinstance(self.posterior, str):
            raise TypeError(f"posterior must be a string, got {V.describe(self.posterior)}")
        options = self.posterior_options
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(
                f"posterior_options must be None or a dict of keyword arguments for the "
                f"posterior family, got {V.describe(options)}"
            )
        checked["family"] = self._family_kwargs(dict(options or {}))
        # The layers check the estimator and the family (and whether they go together): ask a
        # 1 x 1 layer now, before any fitted attribute is set (its own generator: torch's
        # default one is not touched).
        VariationalLinear(
            1,
            1,
            estimator=self.estimator,  # type: ignore[arg-type]
            generator=torch.Generator(),
            **checked["family"],
        )
        return checked

    def _family_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """The layers' keyword arguments that choose the posterior family.

        The layers validate ``posterior`` themselves, so every family they know works here too.
        Layers without a ``posterior`` argument have one family, the mean-field Normal.
        """
        if _layers_take_posterior():
            return {"posterior": self.posterior, **options}
        if self.posterior != DEFAULT_POSTERIOR:
            raise ValueError(
                f"posterior must be {DEFAULT_POSTERIOR!r} (the only posterior family of this "
                f"varlin's layers), got {self.posterior!r}"
            )
        return options

    def _build(
        self,
        n_features: int,
        params: dict[str, Any],
        dtype: torch.dtype,
        generator: torch.Generator,
    ) -> nn.Sequential:
        sizes = [n_features, *params["hidden"], self._output_width()]
        prior = priors.normal(params["prior_scale"])
        modules: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i > 0:
                modules.append(ACTIVATIONS[params["activation"]]())
            modules.append(
                VariationalLinear(
                    n_in,
                    n_out,
                    make_weights_prior=prior,
                    make_bias_prior=prior,
                    estimator=self.estimator,  # type: ignore[arg-type]  # the layer checks it
                    generator=generator,
                    device=params["device"],
                    dtype=dtype,
                    **params["family"],
                )
            )
        return nn.Sequential(*modules)

    def _fit(
        self, X: np.ndarray, y: np.ndarray, params: dict[str, Any], stratify: np.ndarray | None
    ) -> None:
        """Standardise ``X``, build the network and the likelihood, train; set fitted attributes.

        ``y`` is already the training target in the network's units (standardised values or
        class indices); ``params`` are the checked hyper-parameters (:meth:`_check_params`).
        """
        device = params["device"]
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        X = X.astype(np.float32 if dtype == torch.float32 else np.float64, copy=False)
        rng = check_random_state(self.random_state)
        init_seed, shuffle_seed, predict_seed = (int(s) for s in rng.randint(0, 2**31 - 1, 3))

        self.x_mean_, self.x_scale_ = _standardise(X)
        x = torch.tensor((X - self.x_mean_) / self.x_scale_, dtype=dtype, device=device)
        target = self._target_tensor(y, dtype, device)
        validation = None
        patience = None
        if params["early_stopping"]:
            train_idx, val_idx = train_test_split(
                np.arange(len(X)),
                test_size=self.validation_fraction,
                random_state=rng,
                stratify=stratify,
            )
            train_t = torch.as_tensor(train_idx, device=device)
            val_t = torch.as_tensor(val_idx, device=device)
            validation = (x[val_t], target[val_t])
            x, target = x[train_t], target[train_t]
            patience = params["patience"]
        batch_size = min(200, len(x)) if self.batch_size == "auto" else int(self.batch_size)

        generator = torch.Generator(device=device).manual_seed(init_seed)
        model = self._build(X.shape[1], params, dtype, generator)
        likelihood = self._make_likelihood().to(device=device, dtype=dtype)
        history = fit(
            model,
            x,
            target,
            likelihood=likelihood,
            epochs=params["epochs"],
            batch_size=batch_size,
            lr=params["lr"],
            validation=validation,
            patience=patience,
            seed=shuffle_seed,
            progress=params["progress"],
        )
        for layer in variational_layers(model):
            layer.generator = None  # the training noise source is not part of the model
        model.eval()
        self.model_ = model
        self.likelihood_ = likelihood
        self.history_: History = history
        self.loss_curve_ = history["loss"]
        self.n_iter_ = len(history)
        self._predict_seed = predict_seed

    # -- prediction -------------------------------------------------------------------------
    def _inputs(self, X: Any) -> Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        reference = next(self.model_.parameters())
        np_dtype = np.float32 if reference.dtype == torch.float32 else np.float64
        X = (X.astype(np_dtype, copy=False) - self.x_mean_) / self.x_scale_
        return torch.tensor(X, dtype=reference.dtype, device=reference.device)

    def _prediction(self, X: Any) -> RegressionPrediction | ClassificationPrediction:
        """The posterior predictive at ``X``: the same weight samples for every row."""
        x = self._inputs(X)
        samples = V.positive_int("n_predict_samples", self.n_predict_samples)
        # A copy, so that prediction never changes the fitted model (and stays thread-safe):
        # its layers draw whole weight matrices (shared by the rows) from one seeded generator.
        model = copy.deepcopy(self.model_)
        generator = torch.Generator(device=x.device)
        widest = 1
        for layer in variational_layers(model):
            layer.estimator = "reparameterization"
            layer.generator = generator
            widest = max(widest, layer.in_features, layer.out_features)
        rows = max(1, _PREDICT_ELEMENTS // (samples * widest))
        parts = []
        for chunk in x.split(rows):
            generator.manual_seed(self._predict_seed)  # every chunk sees the same samples
            parts.append(predict(model, chunk, num_samples=samples, likelihood=self.likelihood_))
        return _concatenate(parts)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False  # fixed seeds: the same fit and the same predictions
        return tags


def _concatenate(
    parts: list[RegressionPrediction | ClassificationPrediction],
) -> RegressionPrediction | ClassificationPrediction:
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, RegressionPrediction):
        regs = [p for p in parts if isinstance(p, RegressionPrediction)]
        return RegressionPrediction(
            mean=torch.cat([p.mean for p in regs]),
            epistemic=torch.cat([p.epistemic for p in regs]),
            aleatoric=torch.cat([p.aleatoric for p in regs]),
        )
    cls = [p for p in parts if isinstance(p, ClassificationPrediction)]
    return ClassificationPrediction(
        probs=torch.cat([p.probs for p in cls]),
        entropy=torch.cat([p.entropy for p in cls]),
        aleatoric=torch.cat([p.aleatoric for p in cls]),
        mutual_information=torch.cat([p.mutual_information for p in cls]),
        prob_samples=torch.cat([p.prob_samples for p in cls], dim=1),
    )


def _label(value: Any) -> Any:
    """A class label as Python shows it: ``'a'`` rather than ``np.str_('a')``."""
    return value.item() if isinstance(value, np.generic) else value


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class VariationalMLPRegressor(RegressorMixin, _VariationalMLP):
    """Variational MLP regressor: a Bayesian neural network trained by variational inference.

    Args:
        hidden_layer_sizes: units of each hidden layer, e.g. ``(50,)`` or ``(64, 64)``; ``()``
            gives Bayesian linear regression (whose predictive is then exact).
        activation: ``"relu"``, ``"tanh"``, ``"logistic"`` or ``"identity"``, as for
            ``MLPRegressor``.
        batch_size: minibatch size; ``"auto"`` is ``min(200, n_samples)``, as for
            ``MLPRegressor``.
        learning_rate_init: Adam's initial learning rate (decayed to 0 along a cosine over
            ``max_iter`` epochs).
        max_iter: epochs (passes over the training data).
        early_stopping: hold out ``validation_fraction`` of the training data, stop when its
            predictive negative log-likelihood has not improved for ``n_iter_no_change``
            epochs, and keep the best epoch's model.
        validation_fraction: the held-out fraction for ``early_stopping``, in (0, 1).
        n_iter_no_change: patience of ``early_stopping``, in epochs.
        random_state: ``None``, an integer or a ``numpy.random.RandomState``; seeds everything
            random (see the module's notes).
        verbose: show a progress bar with the ELBO while training.
        posterior: the variational family of every layer: ``"meanfield"`` (a mean-field
            Normal) or any other family :class:`varlin.VariationalLinear` accepts as its
            ``posterior`` argument.
        posterior_options: further keyword arguments for the family (e.g. ``{"rank": 2}``),
            passed to every layer.
        estimator: the training gradient estimator: ``"local"`` (local reparameterization),
            ``"reparameterization"`` or ``"flipout"``.
        prior_scale: standard deviation of the Normal prior :math:`\\mathcal N(0, s^2)` on every
            weight and bias (the inputs and targets are standardised, so 1 is a neutral scale).
        likelihood: ``"homoscedastic"`` (one noise scale, learned) or ``"heteroscedastic"``
            (the network predicts a noise scale per row).
        n_predict_samples: posterior samples of the predictive.
        device: a torch device (``"cpu"``, ``"cuda"``); ``None`` is the CPU.

    Attributes:
        model_: the trained network, an ``nn.Sequential`` of variational layers (standardised
            inputs in, standardised target units out).
        likelihood_: the trained :class:`varlin.likelihoods.Gaussian` or
            :class:`~varlin.likelihoods.HeteroscedasticGaussian`.
        x_mean_, x_scale_: the standardisation of the inputs, ``(n_features_in_,)``.
        y_mean_, y_scale_: the standardisation of the target (floats).
        n_iter_: the number of epochs run.
        loss_curve_: the negative ELBO per datum of each epoch.
        history_: the :class:`varlin.History` of the training run.
        n_features_in_, feature_names_in_: as for every scikit-learn estimator.

    Example:
        >>> reg = VariationalMLPRegressor(hidden_layer_sizes=(32,), random_state=0).fit(X, y)
        >>> mean, std = reg.predict(X_test, return_std=True)
        >>> split = reg.predict_uncertainty(X_test)  # .epistemic_std, .aleatoric_std
    """

    def __init__(
        self,
        hidden_layer_sizes: Any = (50,),
        activation: str = "relu",
        *,
        batch_size: int | str = "auto",
        learning_rate_init: float = 0.01,
        max_iter: int = 200,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: Any = None,
        verbose: bool = False,
        posterior: str = DEFAULT_POSTERIOR,
        posterior_options: Mapping[str, Any] | None = None,
        estimator: str = "local",
        prior_scale: float = 1.0,
        likelihood: str = "homoscedastic",
        n_predict_samples: int = 100,
        device: Any = None,
    ) -> None:
        super().__init__(
            hidden_layer_sizes,
            activation,
            batch_size=batch_size,
            learning_rate_init=learning_rate_init,
            max_iter=max_iter,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            random_state=random_state,
            verbose=verbose,
            posterior=posterior,
            posterior_options=posterior_options,
            estimator=estimator,
            prior_scale=prior_scale,
            n_predict_samples=n_predict_samples,
            device=device,
        )
        self.likelihood = likelihood

    def _output_width(self) -> int:
        return 2 if self.likelihood == "heteroscedastic" else 1

    def _make_likelihood(self) -> Likelihood:
        if V.one_of("likelihood", self.likelihood, LIKELIHOODS) == "heteroscedastic":
            return HeteroscedasticGaussian()
        return Gaussian()  # the noise scale is learned, from 1 standard deviation of y

    def _target_tensor(self, y: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.tensor((y - self.y_mean_) / self.y_scale_, dtype=dtype, device=device)

    def fit(self, X: Any, y: Any) -> VariationalMLPRegressor:
        """Fit the network to ``X`` ``(n_samples, n_features)`` and ``y`` ``(n_samples,)``.

        Returns:
            ``self``, fitted.
        """
        params = self._check_params()  # before any fitted attribute is set
        V.one_of("likelihood", self.likelihood, LIKELIHOODS)
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), y_numeric=True)
        y = y.astype(np.float64)
        mean, scale = _standardise(y)
        self.y_mean_, self.y_scale_ = float(mean), float(scale)
        self._fit(X, y, params, stratify=None)
        return self

    def predict_uncertainty(self, X: Any) -> RegressionUncertainty:
        """Predictive mean and standard deviations, total and split, in the target's units."""
        pred = self._prediction(X)
        assert isinstance(pred, RegressionPrediction)
        scale = self.y_scale_
        return RegressionUncertainty(
            mean=_numpy(pred.mean * scale + self.y_mean_),
            std=_numpy(pred.variance.sqrt() * scale),
            epistemic_std=_numpy(pred.epistemic.sqrt() * scale),
            aleatoric_std=_numpy(pred.aleatoric.sqrt() * scale),
        )

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Predictive mean at ``X``, and with ``return_std=True`` its standard deviation.

        Args:
            X: inputs ``(n_samples, n_features)``.
            return_std: also return the predictive standard deviation (epistemic and aleatoric
                together, as ``BayesianRidge`` and ``GaussianProcessRegressor`` return it).

        Returns:
            ``mean`` ``(n_samples,)``, or ``(mean, std)`` with ``return_std=True``.
        """
        u = self.predict_uncertainty(X)
        return (u.mean, u.std) if return_std else u.mean


class VariationalMLPClassifier(ClassifierMixin, _VariationalMLP):
    """Variational MLP classifier: a Bayesian neural network trained by variational inference.

    Two classes use one logit and a Bernoulli likelihood, more a softmax over one logit per class
    (a categorical likelihood). Labels may be of any type (``classes_`` holds them, sorted).

    Args: the same as :class:`VariationalMLPRegressor`'s, without ``likelihood``.

    Attributes:
        classes_: the class labels, sorted; the columns of ``predict_proba``.

    The other fitted attributes (``model_``, ``likelihood_``, ``x_mean_``, ``x_scale_``,
    ``n_iter_``, ``loss_curve_``, ``history_``, ``n_features_in_``, ``feature_names_in_``) are
    those of :class:`VariationalMLPRegressor`.

    Example:
        >>> clf = VariationalMLPClassifier(random_state=0).fit(X, labels)
        >>> proba = clf.predict_proba(X_test)
        >>> split = clf.predict_uncertainty(X_test)  # .mutual_information: epistemic part
    """

    def _output_width(self) -> int:
        n = len(self.classes_)
        return 1 if n == 2 else n

    def _make_likelihood(self) -> Likelihood:
        return Bernoulli() if len(self.classes_) == 2 else Categorical()

    def _target_tensor(self, y: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
        if len(self.classes_) == 2:
            return torch.tensor(y, dtype=dtype, device=device)
        return torch.tensor(y, dtype=torch.long, device=device)

    def fit(self, X: Any, y: Any) -> VariationalMLPClassifier:
        """Fit the network to ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: ``y`` holds fewer than two classes, or continuous values.
        """
        params = self._check_params()  # before any fitted attribute is set
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"y must hold at least two classes to fit a classifier, got one class: "
                f"{_label(classes[0])!r}"
            )
        self.classes_ = classes
        self._fit(X, index, params, stratify=index)
        return self

    def predict_uncertainty(self, X: Any) -> ClassificationUncertainty:
        """Predictive probabilities and the entropy split into aleatoric and epistemic parts."""
        pred = self._prediction(X)
        assert isinstance(pred, ClassificationPrediction)
        return ClassificationUncertainty(
            proba=_numpy(pred.probs),
            entropy=_numpy(pred.entropy),
            aleatoric_entropy=_numpy(pred.aleatoric),
            mutual_information=_numpy(pred.mutual_information),
        )

    def predict_proba(self, X: Any) -> np.ndarray:
        """Predictive class probabilities ``(n_samples, n_classes)``, columns as ``classes_``."""
        return self.predict_uncertainty(X).proba

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """The logarithm of :meth:`predict_proba`."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label of each row, ``(n_samples,)``."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]
