"""varlin: variational linear methods for approximating posteriors, in PyTorch.

Linear layers whose weights carry a variational posterior, trained by maximising the ELBO and used
to predict with calibrated uncertainty. See ``docs/explanation.md`` for the math.
"""

from . import conjugate, functional, kl, posteriors, priors
from ._validation import validation
from .conjugate import BayesianLinearRegression
from .layers import (
    LinearVariationalNormal,
    VariationalLinear,
    deterministic,
    kl_divergence,
    variational_layers,
)
from .posteriors import MeanFieldNormal

__version__ = "0.1.0"

__all__ = [
    "BayesianLinearRegression",
    "LinearVariationalNormal",
    "MeanFieldNormal",
    "VariationalLinear",
    "conjugate",
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
