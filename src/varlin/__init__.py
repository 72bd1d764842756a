"""varlin: variational linear methods for approximating posteriors, in PyTorch.

Linear layers whose weights carry a variational posterior, trained by maximising the ELBO and used
to predict with calibrated uncertainty. See ``docs/explanation.md`` for the math.
"""

from . import (
    conjugate,
    conv,
    convert,
    ensemble,
    functional,
    kl,
    likelihoods,
    metrics,
    moments,
    posteriors,
    priors,
)
from ._validation import validation
from .conjugate import BayesianLinearRegression
from .conv import VariationalConv1d, VariationalConv2d, VariationalConv3d
from .convert import bayesian_last_layer, bayesian_last_layer_, to_variational, to_variational_
from .elbo import ELBO, ELBOTerms
from .ensemble import fit_ensemble
from .layers import (
    LinearVariationalNormal,
    VariationalLinear,
    deterministic,
    kl_divergence,
    variational_layers,
)
from .posteriors import MeanFieldNormal
from .predictive import ClassificationPrediction, RegressionPrediction, predict
from .training import History, fit

__version__ = "0.1.0"

__all__ = [
    "BayesianLinearRegression",
    "ClassificationPrediction",
    "ELBO",
    "ELBOTerms",
    "History",
    "RegressionPrediction",
    "fit",
    "fit_ensemble",
    "ensemble",
    "likelihoods",
    "metrics",
    "moments",
    "predict",
    "to_variational",
    "to_variational_",
    "LinearVariationalNormal",
    "MeanFieldNormal",
    "VariationalLinear",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "bayesian_last_layer",
    "bayesian_last_layer_",
    "conjugate",
    "conv",
    "convert",
    "deterministic",
    "functional",
    "kl",
    "kl_divergence",
    "posteriors",
    "priors",
    "validation",
    "variational_layers",
    "__version__",
]
