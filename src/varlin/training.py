"""Training one model: ``history = varlin.fit(model, x, y, likelihood=...)``.

What it does each epoch: shuffle (from an explicit seed), minimise :class:`varlin.ELBO` on
minibatches with Adam (cosine learning-rate decay by default), show a tqdm bar with the ELBO per
datum, the NLL and the KL, evaluate a validation set (predictive NLL) if given, stop early on it,
and write an atomic, resumable checkpoint. It warns when the fit looks wrong (KL dominating,
posterior scales collapsed or never moved) and stops on a non-finite loss, keeping the last good
state.

The loop and its parts live in :mod:`varlin.loop`; this module checks ``fit``'s arguments and
hands the loop one :class:`SingleModel`. :func:`varlin.ensemble.fit_ensemble` runs the same loop
for several models at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from . import _validation as V
from .batches import (
    LoaderBatches,
    TensorBatches,
    check_loader,
    check_tensor_data,
    check_validation,
)
from .checkpoints import (
    CHECKPOINT_FORMAT,
    Checkpointer,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from .conjugate import ExactLinear
from .diagnostics import diagnose as _diagnose  # noqa: F401  (its former home; tests use it)
from .elbo import ELBO, ELBOTerms
from .errors import CheckpointError, NonFiniteLossError, VarlinWarning
from .history import History
from .layers import kl_divergence, recording_kl, variational_layers
from .likelihoods import Likelihood
from .loop import DataParallelHooks, FitOptions, run
from .moments import check_model, noise_generator, propagate

__all__ = [
    "fit",
    "History",
    "METHODS",
    "MomentObjective",
    "Objective",
    "make_objective",
    "SingleModel",
    "VarlinWarning",
    "NonFiniteLossError",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]


class Objective(nn.Module):
    """A model and its ELBO as one module: ``objective(x, y, beta)`` is the batch's terms.

    The one place where a model's output and its KL meet the ELBO, for one model
    (:class:`SingleModel` calls it) and for several (:mod:`varlin.ensemble` calls it through
    :func:`torch.func.functional_call` under :func:`torch.func.vmap`). A model returning
    ``(y, kl)`` (the seed's layer) is accepted; the KL used is always
    :func:`varlin.kl_divergence` of the model (recorded with the output where a layer computes
    both in one step, :func:`varlin.layers.recording_kl`).
    """

    def __init__(self, model: nn.Module, elbo: ELBO) -> None:
        super().__init__()
        self.model = model
        self.elbo = elbo

    def output(self, x: Tensor) -> Tensor | Distribution:
        """What the ELBO's expected log-likelihood is taken over: the model's (sampled) output."""
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x: Tensor, y: Tensor, beta: float) -> ELBOTerms:
        # The KL that mean-field layers compute with their output, not a second pass.
        with recording_kl(self.model) as kl:
            return self.elbo.terms(self.output(x), y, kl(), beta=beta)


class MomentObjective(Objective):
    """The deterministic ELBO of moment propagation (``fit(method="moments")``).

    The expected log-likelihood is taken under the Gaussian over the outputs that
    :func:`varlin.moments.propagate` pushes through the model (Wu et al. 2019): in closed form
    for Gaussian likelihoods (by quadrature over a heteroscedastic scale), so the loss and its
    gradient carry no sampling noise; by sampling the logits only for classification, from the
    model's layers' generator (:func:`varlin.moments.noise_generator`; torch's default one when
    no layer holds one), as their weight noise is drawn under ``method="mc"``. The KL is the
    model's, as for :class:`Objective`.

    Args:
        model: a model :func:`varlin.moments.propagate` supports.
        elbo: its ELBO.
        covariance: ``"diagonal"`` or ``"full"`` (see :func:`varlin.moments.propagate`).
    """

    def __init__(self, model: nn.Module, elbo: ELBO, covariance: str = "diagonal") -> None:
        super().__init__(model, elbo)
        self.covariance = covariance
        # Once per fit: the layers (and their generators) do not change while it runs.
        self.generator = noise_generator(model)

    def output(self, x: Tensor) -> Distribution:
        return propagate(self.model, x, covariance=self.covariance)

    def forward(self, x: Tensor, y: Tensor, beta: float) -> ELBOTerms:
        kl = kl_divergence(self.model)
        return self.elbo.terms(self.output(x), y, kl, beta=beta, generator=self.generator)


#: The values of ``fit``'s ``method``: the Monte Carlo ELBO, or the moment-propagation one.
METHODS = ("mc", "moments")


def make_objective(
    model: nn.Module, elbo: ELBO, method: str = "mc", covariance: str = "diagonal"
) -> Objective:
    """The objective of ``fit(method=...)``: :class:`Objective` or :class:`MomentObjective`."""
    if method == "moments":
        return MomentObjective(model, elbo, covariance)
    return Objective(model, elbo)


def _clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def rng_state(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """The random states a model's noise is drawn from: torch's, and each layer's generator."""
    return {
        "torch_rng": torch.get_rng_state(),
        "layer_rngs": [
            layer.generator.get_state() if layer.generator is not None else None
            for layer in variational_layers(model)
        ],
        # Layers without a generator of their own draw on the device's default one.
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(
    model: nn.Module, device: torch.device, state: dict[str, Any], checkpointer: Checkpointer
) -> None:
    """Restore :func:`rng_state`; the checkpoint must hold as many variational layers."""
    layers = list(variational_layers(model))
    if len(state["layer_rngs"]) != len(layers):
        raise checkpointer.error(
            f"has {len(state['layer_rngs'])} variational layers, this model has {len(layers)}"
        )
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    for layer, rng in zip(layers, state["layer_rngs"], strict=True):
        if layer.generator is not None and rng is not None:
            layer.generator.set_state(rng)


class SingleModel:
    """One model and its likelihood, as the loop trains them (see :class:`varlin.loop.Trainee`).

    The optimiser steps every parameter of the model and then of the likelihood that requires
    a gradient, each once (a likelihood inside the model counts once).
    """

    num_models = 1
    stacked = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        elbo: ELBO,
        *,
        method: str = "mc",
        covariance: str = "diagonal",
    ) -> None:
        self.model, self.likelihood = model, likelihood
        self.objective = make_objective(model, elbo, method, covariance)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.hooks = DataParallelHooks(model, likelihood)

    def parameters(self) -> list[Tensor]:
        params: list[Tensor] = []
        seen: set[int] = set()
        for p in [*self.model.parameters(), *self.likelihood.parameters()]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def terms(self, x: Tensor, y: Tensor, beta: float) -> ELBOTerms:
        # forward, not __call__: the wrapper has no hooks of its own (the model's still run),
        # and this is the per-step path.
        return self.objective.forward(x, y, beta)

    def total(self, loss: Tensor, active: Sequence[bool]) -> Tensor:
        return loss

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    @property
    def training(self) -> bool:
        return self.model.training

    def snapshot(self) -> dict[str, Any]:
        return {"model": _clone_state(self.model), "likelihood": _clone_state(self.likelihood)}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot["model"])
        self.likelihood.load_state_dict(snapshot["likelihood"])

    def keep(
        self, best: dict[str, Any] | None, current: dict[str, Any], improved: Sequence[bool]
    ) -> dict[str, Any]:
        return current if improved[0] or best is None else best

    def non_finite(self) -> list[int]:
        modules = (self.model, self.likelihood)
        finite = all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())
        return [] if finite else [0]

    def members(self) -> list[tuple[nn.Module, Likelihood]]:
        return [(self.model, self.likelihood)]

    def state_dict(self) -> dict[str, Any]:
        return {**self.snapshot(), **rng_state(self.model, self.device)}

    def load_state_dict(self, state: dict[str, Any], checkpointer: Checkpointer) -> None:
        if "num_models" in state:
            raise checkpointer.error(
                f"holds {state['num_models']} models trained together (fit_ensemble), not one"
            )
        load_module_state(self.model, state["model"], "model", checkpointer.path)
        load_module_state(self.likelihood, state["likelihood"], "likelihood", checkpointer.path)
        set_rng_state(self.model, self.device, state, checkpointer)


def check_no_exact_head(model: nn.Module, name: str = "model") -> None:
    """Refuse a model with an exact last-layer head: it is fitted in closed form, and gradient
    training would move nothing but the likelihood's noise."""
    if any(isinstance(module, ExactLinear) for module in model.modules()):
        raise ValueError(
            f"{name} has an exact head (varlin.conjugate.ExactLinear), fitted in closed form, not "
            "by fit: call model.fit_head(x, y) on the Bayesian last layer, or "
            "bayesian_last_layer(..., method='exact', data=(x, y))"
        )


def fit(
    model: nn.Module,
    x: Tensor | Iterable[tuple[Tensor, Tensor]],
    y: Tensor | None = None,
    *,
    likelihood: Likelihood,
    epochs: int,
    batch_size: int = 32,
    num_data: int | None = None,
    lr: float = 1e-2,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr_schedule: str = "cosine",
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    validation: tuple[Tensor, Tensor] | None = None,
    patience: int | None = None,
    val_samples: int = 32,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    method: str = "mc",
    covariance: str = "diagonal",
) -> History:
    """Train ``model`` (and the likelihood's parameters) by minimising the negative ELBO.

    Args:
        model: a module with variational layers; its output feeds ``likelihood``. A model that
            returns ``(y, kl)`` (the seed's layer) is accepted; the KL used is always
            :func:`varlin.kl_divergence` of the model, counted once per step.
        x, y: training tensors ``(N, ...)`` and ``(N, ...)``; or ``x`` a sized, re-iterable
            collection of ``(xb, yb)`` batches (a DataLoader) with ``y=None``.
        likelihood: a :class:`varlin.likelihoods.Likelihood`; learned noise is trained too.
        epochs: total passes over the data (>= 1), counting those of a resumed checkpoint.
        batch_size: minibatch size for tensor data.
        num_data: dataset size ``N`` for the KL scaling (default: ``len(x)`` or
            ``len(loader.dataset)``; under data parallelism, the global size).
        lr: Adam's learning rate (torch's fused Adam where it has one for the parameters:
            :func:`varlin.loop.default_optimizer`); ``optimizer`` (params -> optimizer)
            replaces Adam.
        lr_schedule: ``"cosine"`` (decay to 0 over the run, per step) or ``"constant"``.
        beta: KL weight (1 gives the ELBO).
        kl_warmup_epochs: KL warm-up: ``beta`` ramps linearly, ``beta * (epoch + 1) / k`` for the
            first ``k`` epochs, then stays at ``beta``.
        validation: ``(x_val, y_val)``; its Monte Carlo predictive NLL is logged each epoch.
        patience: stop after this many epochs without a better validation NLL and restore the
            best epoch's state (needs ``validation``).
        val_samples: Monte Carlo samples for the validation predictive.
        checkpoint: path of a checkpoint written atomically before the first epoch and after
            every epoch (model, likelihood, optimizer, scheduler, history, random states); with
            ``resume`` an existing one is loaded and training continues after its epoch, exactly
            as if it had not been interrupted (same seed, same device).
        resume: load ``checkpoint`` if it exists (``False``: start over and overwrite it).
        seed: seeds the shuffling generator (the layers' noise comes from their own generators,
            or torch's default one, whose state the checkpoint also saves; so do the logits
            sampled under ``method="moments"`` for a classification likelihood).
        progress: show a tqdm progress bar with the per-datum ELBO, the NLL and the KL.
        method: ``"mc"``: the expected log-likelihood from the model's sampled output (its
            layers' estimators); ``"moments"``: from the Gaussian over the outputs that
            :func:`varlin.moments.propagate` pushes through the model (:class:`MomentObjective`:
            deterministic loss and gradients for Gaussian likelihoods, Wu et al. 2019); the
            validation predictive is then ``predict(method="moments")`` too.
        covariance: with ``method="moments"``: ``"diagonal"`` or ``"full"`` (see
            :func:`varlin.moments.propagate`).

    Returns:
        :class:`History`, one record per epoch.

    Raises:
        NonFiniteLossError: the loss (or a parameter) became NaN/inf; the model holds the last
            good epoch's state and the checkpoint on disk is the last good one.
        CheckpointError: ``checkpoint`` exists but is unreadable or for another model.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the checkpoint of the last finished epoch stays on
            disk, and calling ``fit`` again with the same arguments resumes from it.

    Warns:
        VarlinWarning: the fit ran but looks wrong (see :func:`varlin.diagnostics.diagnose`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be a varlin Likelihood, got {V.describe(likelihood)}")
    options = FitOptions.check(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        beta=beta,
        kl_warmup_epochs=kl_warmup_epochs,
        patience=patience,
        validation=validation,
        val_samples=val_samples,
        seed=seed,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        method=method,
        covariance=covariance,
    )
    seed = int(seed)
    check_validation(validation)
    check_no_exact_head(model)
    if options.method == "moments":
        check_model(model)

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    likelihood.to(device)
    batches: TensorBatches | LoaderBatches
    if isinstance(x, Tensor):
        check_tensor_data(x, y)
        assert y is not None
        x, y = x.to(device), y.to(device)
        data_size = x.shape[0]
        batches = TensorBatches(x, y, options.batch_size, [seed], stacked=False)
    else:
        data_size = check_loader(x, y)
        batches = LoaderBatches(x, device, [seed], stacked=False)
    if num_data is None:
        if data_size == 0:
            raise ValueError("num_data is required when x is an iterable without a dataset")
        num_data = data_size
    elbo = ELBO(likelihood, num_data, beta=beta)
    sets = None if validation is None else [(validation[0].to(device), validation[1].to(device))]
    trainee = SingleModel(model, likelihood, elbo, method=method, covariance=covariance)
    return run(trainee, batches, options, sets)[0]
