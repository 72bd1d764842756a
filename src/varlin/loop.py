"""The training loop behind :func:`varlin.fit` and :func:`varlin.ensemble.fit_ensemble`.

One short loop (:func:`run`) over named parts, each with one concern:

- :class:`~varlin.batches.TensorBatches` / :class:`~varlin.batches.LoaderBatches`: the
  minibatches of an epoch;
- :class:`Step`: one optimisation step (loss, gradient, data-parallel hooks, optimiser, schedule);
- :class:`Schedule`: the learning-rate factor per step (cosine or constant) and the KL weight
  per epoch (warm-up);
- :class:`~varlin.evaluation.Evaluation`: the validation predictive of each epoch;
- :class:`~varlin.evaluation.EarlyStopping`: the best validation state, patience, restoring the
  best at the end;
- :class:`~varlin.checkpoints.Checkpointer`: atomic, resumable checkpoints;
- :class:`Progress`: the tqdm bar;
- :class:`DataParallelHooks`: a learned likelihood kept in step across DDP ranks;
- :class:`~varlin.diagnostics.Diagnostics`: warnings about fits that look wrong.

What is trained is a :class:`Trainee`: one model and its likelihood (``fit``), or several
independent ones computed together as one vectorised model (``fit_ensemble``). The loop sees
``K`` models either way and keeps one :class:`History` per model; nothing in it knows how a model
computes its output or its KL.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _validation as V
from .batches import LoaderBatches, TensorBatches
from .checkpoints import Checkpointer, from_checkpoint, per_model
from .diagnostics import Diagnostics
from .elbo import ELBOTerms
from .errors import NonFiniteLossError
from .evaluation import EarlyStopping, Evaluation
from .history import History
from .likelihoods import Likelihood
from .priors import learned_priors, learned_scales

__all__ = [
    "DataParallelHooks",
    "FitOptions",
    "Progress",
    "STATE_KEYS",
    "Schedule",
    "Step",
    "Trainee",
    "default_optimizer",
    "run",
]

#: The entries of every checkpoint the loop writes (``cuda_rng`` too, ``None`` on a CPU).
STATE_KEYS = (
    "epoch",
    "model",
    "likelihood",
    "optimizer",
    "scheduler",
    "history",
    "best",
    "bad_epochs",
    "steps",
    "start_nll",
    "initial_scales",
    "shuffle_rng",
    "torch_rng",
    "layer_rngs",
)


# -- options ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitOptions:
    """The options of ``fit`` that every part reads, checked once (:meth:`check`)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None
    lr_schedule: str
    beta: float
    kl_warmup_epochs: int
    patience: int | None
    val_samples: int
    checkpoint: str | os.PathLike[str] | None
    resume: bool
    progress: bool
    method: str = "mc"
    covariance: str = "diagonal"

    @classmethod
    def check(cls, *, validation: Any, seed: Any = ..., **options: Any) -> FitOptions:
        """Validate the options, one error each, in the order of ``fit``'s arguments.

        ``validation`` is only looked at for ``patience``'s sake; ``seed`` (``fit``'s single
        seed, not kept here) is checked in its turn when given.
        """
        epochs = V.positive_int("epochs", options["epochs"])
        batch_size = V.positive_int("batch_size", options["batch_size"])
        lr = V.real("lr", options["lr"], min_value=0.0, strict=True)
        V.one_of("lr_schedule", options["lr_schedule"], ("cosine", "constant"))
        if options["kl_warmup_epochs"] != 0:
            V.positive_int("kl_warmup_epochs", options["kl_warmup_epochs"])
        patience = options["patience"]
        if patience is not None:
            V.positive_int("patience", patience)
            if validation is None:
                raise ValueError("patience needs validation data: pass validation=(x_val, y_val)")
        val_samples = V.positive_int("val_samples", options["val_samples"])
        if seed is not ...:
            V.integer("seed", seed)
        resume = V.boolean("resume", options["resume"])
        progress = V.boolean("progress", options["progress"])
        method = options.get("method", "mc")
        covariance = options.get("covariance", "diagonal")
        V.one_of("method", method, ("mc", "moments"))
        V.one_of("covariance", covariance, ("diagonal", "full"))
        if covariance != "diagonal" and method != "moments":
            raise ValueError(
                f"covariance={covariance!r} applies only to method='moments', got method={method!r}"
            )
        optimizer, checkpoint = options["optimizer"], options["checkpoint"]
        if optimizer is not None and not callable(optimizer):
            raise TypeError(
                f"optimizer must be a callable params -> torch.optim.Optimizer, got "
                f"{V.describe(optimizer)}"
            )
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path or None, got {V.describe(checkpoint)}")
        return cls(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            lr_schedule=options["lr_schedule"],
            beta=options["beta"],
            kl_warmup_epochs=options["kl_warmup_epochs"],
            patience=patience,
            val_samples=val_samples,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
            method=method,
            covariance=covariance,
        )


# -- what is trained --------------------------------------------------------------------------
class Trainee(Protocol):
    """What the loop trains: ``num_models`` independent models and their likelihoods.

    Values that differ per model (losses, NLLs, validation scores) are tensors or lists with
    one entry per model. ``stacked`` says whether the checkpoint holds one value per model, or
    the single model's value (the format of :func:`varlin.fit`).
    """

    num_models: int
    stacked: bool
    device: torch.device
    hooks: DataParallelHooks

    def parameters(self) -> list[Tensor]:
        """The tensors the optimiser steps."""
        ...

    def terms(self, x: Tensor, y: Tensor, beta: float) -> ELBOTerms:
        """The ELBO's terms on a batch; each of shape ``(num_models,)``, or 0-dim for one model."""
        ...

    def total(self, loss: Tensor, active: Sequence[bool]) -> Tensor:
        """The scalar to differentiate: the losses of the ``active`` models, summed."""
        ...

    def train(self, mode: bool) -> None: ...

    @property
    def training(self) -> bool: ...

    def snapshot(self) -> dict[str, Any]:
        """Copies of the model and likelihood states: ``{"model": ..., "likelihood": ...}``."""
        ...

    def restore(self, snapshot: dict[str, Any]) -> None: ...

    def keep(
        self, best: dict[str, Any] | None, current: dict[str, Any], improved: Sequence[bool]
    ) -> dict[str, Any]:
        """``best`` with the models that ``improved`` replaced by their ``current`` state."""
        ...

    def non_finite(self) -> list[int]:
        """The models holding a NaN or infinite parameter."""
        ...

    def members(self) -> list[tuple[nn.Module, Likelihood]]:
        """Each model and its likelihood, holding the current trained state."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model and likelihood states and the random states of the models' noise."""
        ...

    def load_state_dict(self, state: dict[str, Any], checkpointer: Checkpointer) -> None: ...


# -- parts ------------------------------------------------------------------------------------
class Schedule:
    """The learning-rate factor of each step and the KL weight (``beta``) of each epoch.

    ``"cosine"`` decays the learning rate to 0 over ``total_steps``, per step; ``"constant"``
    keeps it. With ``warmup_epochs = w`` the KL weight is ``beta * (epoch + 1) / w`` for the
    first ``w`` epochs, then ``beta``.
    """

    def __init__(self, kind: str, total_steps: int, beta: float, warmup_epochs: int) -> None:
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.base_beta = beta
        self.warmup_epochs = warmup_epochs

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def beta(self, epoch: int) -> float:
        if not self.warmup_epochs:
            return self.base_beta
        return self.base_beta * min(1.0, (epoch + 1) / self.warmup_epochs)

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # A plain function, not a bound method: LambdaLR saves no state for it (checkpoints).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step))

    def resume(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
    ) -> None:
        """Set the learning rate of the next step under *this* run's schedule.

        The same value when ``epochs`` is unchanged; the continued schedule when it grew.
        """
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * self.factor(scheduler.last_epoch)


class _Diverged(Exception):
    """A loss or parameter became non-finite (the loop restores the last good state)."""


def _floats(t: Tensor) -> list[float]:
    """The values of a 0-dim or ``(K,)`` tensor as a list of floats (one host read)."""
    values = t.detach().tolist()
    return values if isinstance(values, list) else [values]


class Step:
    """One optimisation step on a batch.

    Zero the gradients, compute the ELBO's terms, stop on a non-finite loss before any update,
    differentiate the active models' losses, let the data-parallel hooks average what DDP does
    not, step the optimiser and the learning-rate schedule.

    Returns ``[loss, nll, kl, kl_term]``, each a list with one float per model.
    """

    def __init__(
        self,
        trainee: Trainee,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
    ) -> None:
        self.trainee, self.optimizer, self.scheduler = trainee, optimizer, scheduler

    def __call__(
        self, x: Tensor, y: Tensor, beta: float, active: Sequence[bool], at: tuple[int, int]
    ) -> list[list[float]]:
        """One step on the batch ``(x, y)``; ``at`` is ``(epoch, step)``, for the error message."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.trainee.terms(x, y, beta)
        values = [_floats(t) for t in terms]
        bad = [k for k, loss in enumerate(values[0]) if active[k] and not math.isfinite(loss)]
        if bad:
            k = bad[0]
            of = f" of model {k}" if self.trainee.num_models > 1 else ""
            raise _Diverged(
                f"the loss{of} became {values[0][k]} at epoch {at[0]}, step {at[1]} "
                f"(nll={values[1][k]}, kl={values[2][k]})"
            )
        self.trainee.total(terms.loss, active).backward()
        self.trainee.hooks.average_grads()
        self.optimizer.step()
        self.scheduler.step()
        return values

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class Progress:
    """The tqdm bar over epochs, showing the per-datum ELBO, NLL, KL (and validation NLL).

    With several models it shows their means.
    """

    def __init__(self, enabled: bool, start: int, epochs: int) -> None:
        self.epochs = epochs
        self.bar = tqdm(
            range(start, epochs),
            desc="fit",
            disable=not enabled,
            leave=False,
            total=max(epochs - start, 0),
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.bar)

    def show(self, records: Sequence[dict[str, float]], epoch: int, last: bool) -> None:
        def mean(key: str) -> float:
            values = [r[key] for r in records if key in r]
            return values[0] if len(values) == 1 else sum(values) / len(values)

        postfix = {
            "elbo": f"{-mean('loss'):.4g}",
            "nll": f"{mean('nll'):.4g}",
            "kl": f"{mean('kl'):.4g}",
        }
        if any("val_nll" in r for r in records):
            postfix["val_nll"] = f"{mean('val_nll'):.4g}"
        # Redrawn at tqdm's own pace, and once at the end so the last values show.
        self.bar.set_postfix(postfix, refresh=epoch + 1 == self.epochs or last)

    def close(self) -> None:
        self.bar.close()


class DataParallelHooks:
    """Keep a learned likelihood in step across ranks when the model is a DDP module.

    ``DistributedDataParallel`` averages the gradients of the model's own parameters over the
    ranks; a learned noise scale lives in the likelihood, outside it, so each rank would step
    its own. This broadcasts rank 0's likelihood once and averages its gradients every step,
    exactly what DDP does for the model. A no-op outside a process group of several ranks.
    """

    def __init__(self, model: nn.Module | None = None, likelihood: Likelihood | None = None):
        self.params: list[Tensor] = []
        self.world = 1
        if model is None or likelihood is None:
            return
        model_params = {id(p) for p in model.parameters()}
        self.params = [
            p for p in likelihood.parameters() if p.requires_grad and id(p) not in model_params
        ]
        if (
            self.params
            and isinstance(model, nn.parallel.DistributedDataParallel)
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            self.world = torch.distributed.get_world_size()

    def broadcast(self) -> None:
        if self.world > 1:
            with torch.no_grad():
                for p in self.params:
                    torch.distributed.broadcast(p, src=0)

    def average_grads(self) -> None:
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside the loop, SIGTERM stops training like Ctrl-C; the checkpoint on disk stays usable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the loop ---------------------------------------------------------------------------------
def default_optimizer(params: Sequence[Tensor], lr: float) -> torch.optim.Optimizer:
    """The loop's optimiser when none is given: ``torch.optim.Adam(params, lr)``, run as torch's
    fused kernel where it has one for the parameters (the CPU from torch 2.4, CUDA).

    The fused kernel updates every parameter in one call instead of a dozen operations per
    tensor, the same update to float rounding (on the 2-core CPU box a ``fit`` step of a small
    MLP took 13–14% less time at widths 64 to 1024 with it, ``benchmarks/fit_step.py``). Where
    torch refuses it (an older torch on the CPU, another device) the plain Adam runs.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr, fused=True)
    except (RuntimeError, ValueError):  # refused (a plain Adam raises real errors again)
        return torch.optim.Adam(params, lr)


class _Parts:
    """Every part of one run, built from the options, and the run's state across them."""

    def __init__(
        self,
        trainee: Trainee,
        batches: TensorBatches | LoaderBatches,
        options: FitOptions,
        validation: Sequence[tuple[Tensor, Tensor]] | None,
    ) -> None:
        k, stacked = trainee.num_models, trainee.stacked
        params = trainee.parameters()
        make = options.optimizer
        # The stacked route's parameters are plain leaf tensors; optimisers take either.
        self.optimizer = (
            make(params)  # type: ignore[arg-type]
            if make is not None
            else default_optimizer(params, options.lr)
        )
        self.schedule = Schedule(
            options.lr_schedule,
            options.epochs * batches.steps_per_epoch,
            options.beta,
            options.kl_warmup_epochs,
        )
        self.scheduler = self.schedule.attach(self.optimizer)
        self.step = Step(trainee, self.optimizer, self.scheduler)
        self.batches = batches
        self.evaluation = (
            Evaluation(validation, options.val_samples, options.method, options.covariance)
            if validation
            else None
        )
        self.stopper = EarlyStopping(options.patience, k, stacked=stacked)
        self.checkpointer = Checkpointer(
            options.checkpoint,
            resume=options.resume,
            keys=STATE_KEYS,
        )
        models = [m for m, _ in trainee.members()]
        self.diagnostics = Diagnostics(models, stacked=stacked)
        # Empirical Bayes: the learned prior scales go into every epoch's record.
        self.learned_priors = any(True for _ in learned_priors(models[0]))
        self.histories = [History() for _ in range(k)]
        self.trainee, self.options = trainee, options

    def state_dict(self, epoch: int) -> dict[str, Any]:
        stacked = self.trainee.stacked
        return {
            "epoch": epoch,
            **self.trainee.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": per_model([h.to_dict() for h in self.histories], stacked),
            **self.stopper.state_dict(),
            **self.diagnostics.state_dict(),
            **self.batches.state_dict(),
        }

    def resume(self) -> int:
        """Load a checkpoint if there is one to resume; return the first epoch to run."""
        state = self.checkpointer.resume_state()
        if state is None:
            # Before any step: an interruption in the first epoch still leaves a checkpoint.
            self.checkpointer.save(self.state_dict(-1))
            return 0
        self.trainee.load_state_dict(state, self.checkpointer)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise self.checkpointer.error(f"holds another optimizer's state: {exc}") from None
        self.schedule.resume(self.optimizer, self.scheduler)
        histories = from_checkpoint(state["history"], self.trainee.stacked)
        self.histories = [History.from_dict(h) for h in histories]
        self.stopper.load_state_dict(state, self.histories)
        self.diagnostics.load_state_dict(state, self.trainee.device)
        self.batches.load_state_dict(state)
        if self.stopper.done:
            return self.options.epochs  # early stopping ended that run; do not train past it
        return int(state["epoch"]) + 1  # -1 for the checkpoint written before epoch 0


def _epoch_records(
    sums: list[list[float]], rows: int, steps: int, epoch: int, beta: float, lr: float
) -> list[dict[str, float]]:
    """One history record per model from an epoch's sums of ``[loss, nll, kl, kl_term]``."""
    return [
        {
            "epoch": float(epoch),
            "loss": loss / max(rows, 1),
            "nll": nll / max(rows, 1),
            "kl": kl / max(steps, 1),
            "kl_term": kl_term / max(rows, 1),
            "beta": beta,
            "lr": lr,
        }
        for loss, nll, kl, kl_term in zip(*sums, strict=True)
    ]


def run(
    trainee: Trainee,
    batches: TensorBatches | LoaderBatches,
    options: FitOptions,
    validation: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> list[History]:
    """Train ``trainee`` for ``options.epochs``; return one :class:`History` per model.

    Raises:
        NonFiniteLossError: a loss or parameter became non-finite; the models hold the last
            good epoch's state and the checkpoint on disk is the last good one.
        CheckpointError: the checkpoint exists but is unreadable or for other models.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the checkpoint of the last finished epoch stays.
    """
    parts = _Parts(trainee, batches, options, validation)
    step, stopper = parts.step, parts.stopper
    start = parts.resume()
    histories = parts.histories  # after resume: a resumed run continues the saved ones
    trainee.hooks.broadcast()
    last_good = trainee.snapshot()
    was_training = trainee.training
    progress = Progress(options.progress, start, options.epochs)
    try:
        with _sigterm_as_interrupt():
            for epoch in progress:
                started = time.perf_counter()
                beta = parts.schedule.beta(epoch)
                active = stopper.active
                trainee.train(True)
                sums = [[0.0] * trainee.num_models for _ in range(4)]
                rows = steps = 0
                for xb, yb in batches:
                    values = step(xb, yb, beta, active, (epoch, steps))
                    parts.diagnostics.step(values[1], active)
                    n = xb.shape[1] if trainee.stacked else xb.shape[0]
                    rows, steps = rows + n, steps + 1
                    for total, new, weight in zip(sums, values, (n, n, 1, n), strict=True):
                        for k, value in enumerate(new):
                            total[k] += value * weight
                bad = [k for k in trainee.non_finite() if active[k]]
                if bad:
                    of = f" of model {bad[0]}" if trainee.num_models > 1 else ""
                    raise _Diverged(f"a parameter{of} became non-finite in epoch {epoch}")
                records = _epoch_records(sums, rows, steps, epoch, beta, step.lr)
                # The members once per epoch (stacked models copy every parameter out for it).
                members = (
                    trainee.members()
                    if parts.learned_priors or parts.evaluation is not None
                    else []
                )
                if parts.learned_priors:
                    for record, (model, _) in zip(records, members, strict=True):
                        record.update(
                            {f"prior_scale.{n}": s for n, s in learned_scales(model).items()}
                        )
                if parts.evaluation is not None:
                    scores = parts.evaluation(members, active)
                    for record, score in zip(records, scores, strict=True):
                        record.update(score)
                    stopper.update(trainee, epoch, [s.get("val_nll") for s in scores])
                stopped = stopper.check(active, epoch, options.epochs)
                for k, record in enumerate(records):
                    if active[k]:
                        record["seconds"] = time.perf_counter() - started
                        histories[k].records.append(record)
                        histories[k].stopped_early = stopped[k]
                last_good = trainee.snapshot()
                shown = [r for k, r in enumerate(records) if active[k]]
                progress.show(shown, epoch, last=stopper.done)
                parts.checkpointer.save(parts.state_dict(epoch))
                if stopper.done:
                    break
    except _Diverged as exc:
        trainee.restore(last_good)
        kept = f"; the last good checkpoint is {str(options.checkpoint)!r}"
        raise NonFiniteLossError(
            f"{exc}; the model was restored to the last good epoch"
            f"{kept if options.checkpoint else ''}. Lower the learning rate or check the data."
        ) from None
    finally:
        progress.close()
        trainee.train(was_training)
    stopper.finish(trainee, histories)
    if any(h.records for h in histories):
        parts.diagnostics.finish([m for m, _ in trainee.members()], histories)
    return histories
