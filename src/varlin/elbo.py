r"""The evidence lower bound as a loss object of its own, scaled per datum.

For a dataset of :math:`N` examples, a variational posterior :math:`q(\theta)` and a prior
:math:`p(\theta)`,

.. math::
    \mathrm{ELBO}(q) = \sum_{n=1}^{N}\mathbb E_q\big[\log p(y_n\mid x_n,\theta)\big]
    - KL\big(q(\theta)\,\|\,p(\theta)\big) \;\le\; \log p(y_{1:N}\mid x_{1:N}).

On a minibatch :math:`B` the loss is

.. math::
    \mathcal L_B = -\frac1{|B|}\sum_{n\in B}\mathbb E_q\big[\log p(y_n\mid x_n,\theta)\big]
    + \beta\,\frac{KL(q\,\|\,p)}{N},

an unbiased estimate of :math:`-\mathrm{ELBO}/N` for :math:`\beta = 1`: the per-datum scale makes
learning rates independent of :math:`N`, and the KL is divided by the **dataset** size, not the
batch size (the mistake peers make). Under ``DistributedDataParallel`` pass the global dataset
size: the gradient average over processes then counts the KL exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from . import _validation as V
from .likelihoods import Likelihood

__all__ = ["ELBO", "ELBOTerms"]


class ELBOTerms(NamedTuple):
    """The parts of one minibatch loss, for logging (all 0-dim tensors).

    Attributes:
        loss: the value minimised, ``nll + beta * kl / num_data``.
        nll: minus the mean expected log-likelihood per example of the batch.
        kl: the total (unweighted) KL divergence.
        kl_term: ``beta * kl / num_data``, the KL's share of ``loss``.
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_term: Tensor

    @property
    def expected_log_likelihood(self) -> Tensor:
        """Mean expected log-likelihood per example of the batch, ``-nll``."""
        return -self.nll


class ELBO(nn.Module):
    r"""Negative ELBO per datum: ``loss = elbo(output, target, kl)``.

    Args:
        likelihood: a :class:`varlin.likelihoods.Likelihood`.
        num_data: number of examples :math:`N` in the **whole** training set (> 0).
        beta: weight of the KL term (1 for the ELBO; < 1 tempers it). For KL warm-up or
            annealing pass the current value per call, ``elbo(..., beta=b)``; :func:`varlin.fit`
            does so with ``kl_warmup_epochs``.

    Example:
        >>> elbo = varlin.ELBO(varlin.likelihoods.Gaussian(0.1), num_data=len(dataset))
        >>> loss = elbo(model(xb), yb, varlin.kl_divergence(model))
        >>> loss.backward()
    """

    def __init__(self, likelihood: Likelihood, num_data: int, *, beta: float = 1.0) -> None:
        super().__init__()
        if not isinstance(likelihood, Likelihood):
            raise TypeError(
                f"likelihood must be a varlin.likelihoods.Likelihood, got {V.describe(likelihood)}"
            )
        self.likelihood = likelihood
        self.num_data = V.positive_int("num_data", num_data)
        self.beta = V.real("beta", beta, min_value=0.0)

    def terms(
        self,
        output: Tensor | Distribution,
        target: Tensor,
        kl: Tensor,
        *,
        beta: float | None = None,
        samples: bool = False,
        generator: torch.Generator | None = None,
    ) -> ELBOTerms:
        """The loss and its parts.

        Args:
            output: the model output on the minibatch (see
                :meth:`varlin.likelihoods.Likelihood.expected_log_prob`): one sample ``(B, ...)``,
                ``S`` samples ``(S, B, ...)`` with ``samples=True``, or a
                :class:`~torch.distributions.Normal` (or a multivariate Normal over correlated
                outputs, from ``layer.output_moments``) for the closed form.
            target: the minibatch targets ``(B, ...)``.
            kl: the model's total KL, a 0-dim tensor (``varlin.kl_divergence(model)``).
            beta: overrides the constructor's KL weight for this call (a warm-up or annealing
                schedule passes its current value here).
            samples: whether ``output`` stacks Monte Carlo samples in a leading dimension.
            generator: the source of the draws of a likelihood that samples under a Gaussian
                ``output`` (the logits of a classification likelihood); ``None`` uses torch's
                default generator.

        Raises:
            ValueError: ``kl`` is not 0-dim (a per-layer or per-weight KL must be summed first).
        """
        beta = self.beta if beta is None else V.real("beta", beta, min_value=0.0)
        if not isinstance(kl, Tensor) or kl.dim() != 0:
            raise ValueError(
                "kl must be a 0-dim tensor (the summed KL of the model: "
                f"varlin.kl_divergence(model)), got {V.describe(kl)}"
            )
        if V.is_validating():
            V.check_finite("kl", kl)
            if isinstance(output, Tensor):
                V.check_finite("output", output)
        ell = self.likelihood.expected_log_prob(
            output, target, samples=samples, generator=generator
        )
        nll = -ell.mean()
        kl_term = kl * (beta / self.num_data)
        return ELBOTerms(loss=nll + kl_term, nll=nll, kl=kl, kl_term=kl_term)

    def forward(
        self,
        output: Tensor | Distribution,
        target: Tensor,
        kl: Tensor,
        *,
        beta: float | None = None,
        samples: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``terms(...).loss``: the value to minimise (see :meth:`terms`)."""
        return self.terms(output, target, kl, beta=beta, samples=samples, generator=generator).loss

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, beta={self.beta:g}"
