r"""Training diagnostics: warnings about fits that ran but look wrong.

:func:`diagnose` reads a finished fit (its history, the posterior scales before and after, the
first step's NLL) and warns with a :class:`~varlin.errors.VarlinWarning` when the posterior
scales never moved, collapsed to a point estimate, the KL term held the data fit back, or a
learned prior scale (empirical Bayes) collapsed towards 0.
:class:`Diagnostics` is the part of :func:`varlin.fit`'s loop that collects what it needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoints import from_checkpoint, per_model
from .errors import VarlinWarning
from .history import History
from .layers import variational_layers
from .priors import learned_scales

__all__ = [
    "COLLAPSE_SCALE",
    "Diagnostics",
    "NO_GAIN",
    "STALL_MIN_STEPS",
    "STALL_RELATIVE_CHANGE",
    "diagnose",
    "posterior_scales",
]

#: Thresholds of :func:`diagnose`.
STALL_MIN_STEPS = 100  # fewer steps prove nothing about scales that did not move
STALL_RELATIVE_CHANGE = 1e-2  # no posterior scale moved by more than 1% of its initial value
COLLAPSE_SCALE = 1e-6  # median posterior scale below this: a point estimate
NO_GAIN = 0.05  # the NLL improved by less than 5% of max(1, |start NLL|) nats per datum

#: Frames between :func:`diagnose` and the caller of ``fit``: diagnose, Diagnostics.finish, the
#: loop, ``fit`` (or ``fit_ensemble``). The warning points at the user's call.
_STACKLEVEL = 5


def posterior_scales(model: nn.Module) -> Tensor | None:
    """Every weight's posterior standard deviation in ``model``, flat; ``None`` without any."""
    scales = [layer.w_scale.detach().reshape(-1) for layer in variational_layers(model)]
    return torch.cat(scales) if scales else None


def diagnose(
    model: nn.Module,
    history: History,
    initial_scales: Tensor | None,
    steps: int,
    start_nll: float | None,
    *,
    prefix: str = "",
    stacklevel: int = _STACKLEVEL,
) -> None:
    r"""Warn about fits that ran but look wrong.

    - *Scales stayed at their initial value*: after at least :data:`STALL_MIN_STEPS` steps no
      weight's posterior scale moved by :data:`STALL_RELATIVE_CHANGE` of its initial value: the
      learning rate is too small or the run too short. Nothing else is diagnosed for a fit whose
      scales have not moved (with fewer steps, not even this): it says nothing about its
      objective.
    - *Scales collapsed*: the median weight scale is below :data:`COLLAPSE_SCALE`.
    - *A learned prior scale collapsed*: a prior scale learned by the ELBO (empirical Bayes)
      ended below :data:`COLLAPSE_SCALE`. Type-II maximum likelihood can switch a layer off
      this way: prior and posterior shrink together to 0 and the layer's weights stop carrying
      anything. Diagnosed whether or not the posterior scales moved.
    - *The KL dominates*: the scales moved, yet the data fit did not improve over the run,
      :math:`\text{nll}_{\text{start}} - \text{nll}_{\text{end}} <` :data:`NO_GAIN`
      :math:`\cdot\max(1, |\text{nll}_{\text{start}}|)` (the start is the first step's NLL,
      before any update), while the KL term per datum, :math:`\beta\,KL/N`, is at least that
      threshold (a fit that got worse under a negligible KL has another cause). The prior
      holds the posterior and the model underfits: a wrong ``num_data`` (a batch's size instead
      of the data set's), a large ``beta``, a prior too narrow for the data. The KL's *share*
      of the loss is no criterion: in a healthy over-parameterized fit (two moons, 1,200
      weights, 1,000 points) it is 95%, and the NLL still drops from 0.69 to 0.09.

    Args:
        model: the trained model.
        history: its :class:`varlin.History` (at least one record).
        initial_scales: :func:`posterior_scales` of the model before training.
        steps: optimisation steps taken.
        start_nll: the first step's NLL, or ``None``.
        prefix: put before each message (which of several models it is about).
        stacklevel: as for :func:`warnings.warn`, counted from this function.
    """
    last = history.records[-1]
    for name, value in learned_scales(model).items():
        if value < COLLAPSE_SCALE:
            warnings.warn(
                f"{prefix}the learned prior scale {name} collapsed towards 0 ({value:.3g}): the "
                "evidence switched the layer off; fix the scale (learn_scale=False) if the "
                "layer is needed",
                VarlinWarning,
                stacklevel=stacklevel,
            )
    scales = posterior_scales(model)
    if scales is not None and initial_scales is not None and scales.numel() > 0:
        moved = float(((scales - initial_scales).abs() / initial_scales).max())
        if moved < STALL_RELATIVE_CHANGE:
            if steps >= STALL_MIN_STEPS:
                warnings.warn(
                    f"{prefix}posterior scales stayed at their initial values after {steps} "
                    f"steps (largest relative change {moved:.2%}): raise the learning rate or "
                    "train longer",
                    VarlinWarning,
                    stacklevel=stacklevel,
                )
            return  # a fit that has not moved says nothing about its objective
        median = float(scales.median())
        if median < COLLAPSE_SCALE:
            warnings.warn(
                f"{prefix}posterior scales collapsed towards 0 (median {median:.3g}): the "
                "posterior is a point estimate; check the KL scaling (num_data) and beta",
                VarlinWarning,
                stacklevel=stacklevel,
            )
    if start_nll is None or len(history) < 2:
        return
    gain = start_nll - last["nll"]
    threshold = NO_GAIN * max(1.0, abs(start_nll))  # the least gain that counts as one
    if gain < threshold <= last["kl_term"]:
        warnings.warn(
            f"{prefix}the KL term dominates the objective: the data fit did not improve over the "
            f"run (nll {start_nll:.4g} at the start -> {last['nll']:.4g}) while beta*KL/N = "
            f"{last['kl_term']:.4g} per datum; the prior holds the posterior and the model "
            "underfits. Check num_data (the size of the whole training set, not of a batch), "
            "use a wider prior, more data, or beta < 1",
            VarlinWarning,
            stacklevel=stacklevel,
        )


class Diagnostics:
    """The loop's diagnostics part: what :func:`diagnose` needs, gathered along the run.

    Per model: the posterior scales before training, the NLL of the first step (the data fit
    before any update) and the steps it took (a model that stopped early takes no more).

    Args:
        models: the models being trained, before their first step.
        stacked: whether the checkpoint entries hold one value per model (several models
            trained together) or the value of the single model (the format of ``fit``).
    """

    def __init__(self, models: Sequence[nn.Module], *, stacked: bool) -> None:
        self.stacked = stacked
        self.initial_scales = [posterior_scales(m) for m in models]
        self.start_nll: list[float | None] = [None] * len(models)
        self.steps = [0] * len(models)

    def step(self, nll: Sequence[float], active: Sequence[bool]) -> None:
        """Count one step of the ``active`` models; remember the first step's ``nll``."""
        for k, value in enumerate(nll):
            if self.start_nll[k] is None:
                self.start_nll[k] = value
            if active[k]:
                self.steps[k] += 1

    def finish(self, models: Sequence[nn.Module], histories: Sequence[History]) -> None:
        """Diagnose every model that trained for at least one epoch."""
        several = len(models) > 1
        for k, (model, history) in enumerate(zip(models, histories, strict=True)):
            if history.records:
                diagnose(
                    model,
                    history,
                    self.initial_scales[k],
                    self.steps[k],
                    self.start_nll[k],
                    prefix=f"model {k}: " if several else "",
                )

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": per_model(self.steps, self.stacked),
            "start_nll": per_model(self.start_nll, self.stacked),
            "initial_scales": per_model(self.initial_scales, self.stacked),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.steps = [int(s) for s in from_checkpoint(state["steps"], self.stacked)]
        self.start_nll = from_checkpoint(state["start_nll"], self.stacked)
        scales = from_checkpoint(state["initial_scales"], self.stacked)
        self.initial_scales = [None if s is None else s.to(device) for s in scales]
