"""A short, readable training loop: ``history = varlin.fit(model, x, y, likelihood=...)``.

What it does each epoch: shuffle (from an explicit seed), minimise :class:`varlin.ELBO` on
minibatches with Adam (cosine learning-rate decay by default), show a tqdm bar with the ELBO per
datum, the NLL and the KL, evaluate a validation set (predictive NLL) if given, stop early on it,
and write an atomic, resumable checkpoint. It warns when the fit looks wrong (KL dominating,
posterior scales collapsed or never moved) and stops on a non-finite loss, keeping the last good
state.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _validation as V
from ._io import atomic_write
from .elbo import ELBO
from .layers import kl_divergence, variational_layers
from .likelihoods import Likelihood
from .moments import COVARIANCES, check_model, propagate
from .predictive import ClassificationPrediction, predict

__all__ = [
    "fit",
    "History",
    "VarlinWarning",
    "NonFiniteLossError",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = 1


class VarlinWarning(UserWarning):
    """A training diagnostic: the fit ran, but something in it looks wrong."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the model holds the last good state."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, of another format, or for another model."""


@dataclass
class History:
    """Per-epoch records of a :func:`fit` run.

    Attributes:
        records: one dict per epoch with ``epoch``, ``loss``, ``nll``, ``kl``, ``kl_term``,
            ``beta``, ``lr``, ``seconds`` and, with validation data, ``val_nll`` (and ``val_rmse``
            or ``val_accuracy``).
        best_epoch: the epoch whose state the model holds at the end (early stopping), or the
            last epoch.
        stopped_early: whether early stopping ended the run before its last epoch (patience
            running out on the last epoch leaves it ``False``: the run completed).
    """

    records: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[float]:
        """The column ``key`` over epochs, e.g. ``history["loss"]``."""
        return [r[key] for r in self.records if key in r]

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            records=[dict(r) for r in data["records"]],
            best_epoch=int(data["best_epoch"]),
            stopped_early=bool(data["stopped_early"]),
        )


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash during the write leaves the previous checkpoint intact. The file holds only tensors,
    numbers, strings and containers, so it loads with ``torch.load(weights_only=True)``.
    """
    V.weights_only_safe("state", state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", durable=True) as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupted, not a varlin checkpoint, or of a newer
            format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        damaged = _damaged_entry(path)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (truncated or corrupted): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its entry {damaged!r} fails its CRC-32 check"
        )
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{str(path)!r} is not a varlin checkpoint (no 'format' entry)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']}, this varlin reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return state


def _damaged_entry(path: Path) -> str | None:
    """The first entry of a zip checkpoint whose CRC-32 does not match (torch.load never checks)."""
    if not zipfile.is_zipfile(path):
        return None  # not a zip archive: torch.load reports it
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _load_module_state(module: nn.Module, state: dict[str, Tensor], what: str, path: Any) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this {what}: {detail}"
        ) from None


# -- data -------------------------------------------------------------------------------------
def _batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def _output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


#: The values of ``fit``'s ``method``: a Monte Carlo ELBO, or the moment-propagation one.
METHODS = ("mc", "moments")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside ``fit``, SIGTERM stops training like Ctrl-C; the checkpoint on disk stays usable."""
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


class _LikelihoodSync:
    """Keep a learned likelihood in step across ranks when ``model`` is a DDP module.

    ``DistributedDataParallel`` averages the gradients of the model's own parameters over the
    ranks; a learned noise scale lives in the likelihood, outside it, so each rank would step
    its own. This broadcasts rank 0's likelihood once and averages its gradients every step,
    exactly what DDP does for the model. A no-op outside a process group of several ranks.
    """

    def __init__(self, model: nn.Module, likelihood: Likelihood) -> None:
        model_params = {id(p) for p in model.parameters()}
        self.params = [
            p for p in likelihood.parameters() if p.requires_grad and id(p) not in model_params
        ]
        self.world = 1
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


def _clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _all_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _scales(model: nn.Module) -> Tensor | None:
    scales = [layer.w_scale.detach().reshape(-1) for layer in variational_layers(model)]
    return torch.cat(scales) if scales else None


#: Thresholds of :func:`_diagnose`.
STALL_MIN_STEPS = 100  # fewer steps prove nothing about scales that did not move
STALL_RELATIVE_CHANGE = 1e-2  # no posterior scale moved by more than 1% of its initial value
COLLAPSE_SCALE = 1e-6  # median posterior scale below this: a point estimate
NO_GAIN = 0.05  # the NLL improved by less than 5% of max(1, |start NLL|) nats per datum


def _diagnose(
    model: nn.Module,
    history: History,
    initial_scales: Tensor | None,
    steps: int,
    start_nll: float | None,
) -> None:
    r"""Warn about fits that ran but look wrong.

    - *Scales stayed at their initial value*: after at least :data:`STALL_MIN_STEPS` steps no
      weight's posterior scale moved by :data:`STALL_RELATIVE_CHANGE` of its initial value: the
      learning rate is too small or the run too short. Nothing else is diagnosed for a fit whose
      scales have not moved (with fewer steps, not even this): it says nothing about its
      objective.
    - *Scales collapsed*: the median weight scale is below :data:`COLLAPSE_SCALE`.
    - *The KL dominates*: the scales moved, yet the data fit did not improve over the run,
      :math:`\text{nll}_{\text{start}} - \text{nll}_{\text{end}} <` :data:`NO_GAIN`
      :math:`\cdot\max(1, |\text{nll}_{\text{start}}|)` (the start is the first step's NLL,
      before any update), while the KL term per datum, :math:`\beta\,KL/N`, is at least that
      threshold (a fit that got worse under a negligible KL has another cause). The prior
      holds the posterior and the model underfits: a wrong ``num_data`` (a batch's size instead
      of the data set's), a large ``beta``, a prior too narrow for the data. The KL's *share*
      of the loss is no criterion: in a healthy over-parameterized fit (two moons, 1,200
      weights, 1,000 points) it is 95%, and the NLL still drops from 0.69 to 0.09.
    """
    last = history.records[-1]
    scales = _scales(model)
    if scales is not None and initial_scales is not None and scales.numel() > 0:
        moved = float(((scales - initial_scales).abs() / initial_scales).max())
        if moved < STALL_RELATIVE_CHANGE:
            if steps >= STALL_MIN_STEPS:
                warnings.warn(
                    f"posterior scales stayed at their initial values after {steps} steps "
                    f"(largest relative change {moved:.2%}): raise the learning rate or train "
                    "longer",
                    VarlinWarning,
                    stacklevel=3,
                )
            return  # a fit that has not moved says nothing about its objective
        median = float(scales.median())
        if median < COLLAPSE_SCALE:
            warnings.warn(
                f"posterior scales collapsed towards 0 (median {median:.3g}): the posterior is a "
                "point estimate; check the KL scaling (num_data) and beta",
                VarlinWarning,
                stacklevel=3,
            )
    if start_nll is None or len(history) < 2:
        return
    gain = start_nll - last["nll"]
    threshold = NO_GAIN * max(1.0, abs(start_nll))  # the least gain that counts as one
    if gain < threshold <= last["kl_term"]:
        warnings.warn(
            f"the KL term dominates the objective: the data fit did not improve over the run "
            f"(nll {start_nll:.4g} at the start -> {last['nll']:.4g}) while beta*KL/N = "
            f"{last['kl_term']:.4g} per datum; the prior holds the posterior and the model "
            "underfits. Check num_data (the size of the whole training set, not of a batch), "
            "use a wider prior, more data, or beta < 1",
            VarlinWarning,
            stacklevel=3,
        )


def _evaluate(
    model: nn.Module,
    likelihood: Likelihood,
    x: Tensor,
    y: Tensor,
    num_samples: int,
    method: str = "mc",
    covariance: str = "diagonal",
) -> dict[str, float]:
    pred = predict(
        model, x, num_samples=num_samples, likelihood=likelihood, method=method,  # type: ignore[arg-type]
        covariance=covariance,  # type: ignore[arg-type]
    )  # fmt: skip
    out = {"val_nll": float(pred.nll(y))}
    if isinstance(pred, ClassificationPrediction):
        out["val_accuracy"] = float((pred.classes == y.long()).float().mean())
    else:
        out["val_rmse"] = float(((pred.mean - y) ** 2).mean().sqrt())
    return out


_STATE_KEYS = (
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
        lr: Adam's learning rate; ``optimizer`` (params -> optimizer) replaces Adam.
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
            or torch's default one, whose state the checkpoint also saves).
        progress: show a tqdm progress bar with the per-datum ELBO, the NLL and the KL.
        method: ``"mc"``: the expected log-likelihood from the model's sampled output (its
            layers' estimators); ``"moments"``: from the Gaussian over the outputs that
            :func:`varlin.moments.propagate` pushes through the model, in closed form for
            Gaussian likelihoods (deterministic loss and gradients, Wu et al. 2019), by sampling
            the logits only for classification; the validation predictive is then
            ``predict(method="moments")`` too.
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
        VarlinWarning: the fit ran but looks wrong (see :func:`_diagnose`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be a varlin Likelihood, got {V.describe(likelihood)}")
    epochs = V.positive_int("epochs", epochs)
    batch_size = V.positive_int("batch_size", batch_size)
    lr = V.real("lr", lr, min_value=0.0, strict=True)
    V.one_of("lr_schedule", lr_schedule, ("cosine", "constant"))
    if kl_warmup_epochs != 0:
        V.positive_int("kl_warmup_epochs", kl_warmup_epochs)
    if patience is not None:
        V.positive_int("patience", patience)
        if validation is None:
            raise ValueError("patience needs validation data: pass validation=(x_val, y_val)")
    val_samples = V.positive_int("val_samples", val_samples)
    V.one_of("method", method, METHODS)
    V.one_of("covariance", covariance, COVARIANCES)
    if covariance != "diagonal" and method != "moments":
        raise ValueError(
            f"covariance={covariance!r} applies only to method='moments', got method={method!r}"
        )
    if method == "moments":
        check_model(model)
    seed = V.integer("seed", seed)
    resume = V.boolean("resume", resume)
    progress = V.boolean("progress", progress)
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            f"optimizer must be a callable params -> torch.optim.Optimizer, got "
            f"{V.describe(optimizer)}"
        )
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or None, got {V.describe(checkpoint)}")
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError(
                f"validation must be a pair (x_val, y_val) of tensors, got {V.describe(validation)}"
            )
        x_val, y_val = validation
        V.floating_tensor("validation x_val", x_val)
        if not isinstance(y_val, Tensor):
            raise TypeError(f"validation y_val must be a tensor, got {V.describe(y_val)}")
        if x_val.dim() == 0 or y_val.dim() == 0 or x_val.shape[0] != y_val.shape[0]:
            raise ValueError(
                "validation x_val and y_val must have the same number of rows, got shapes "
                f"{tuple(x_val.shape)} and {tuple(y_val.shape)}"
            )
        V.check_finite("validation x_val", x_val)
        if y_val.is_floating_point():
            V.check_finite("validation y_val", y_val)

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    likelihood.to(device)
    if isinstance(x, Tensor):
        if y is None or not isinstance(y, Tensor):
            raise TypeError("y must be a tensor of targets when x is a tensor")
        V.floating_tensor("x", x)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}"
            )
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one row, got 0")
        V.check_finite("x", x)
        if y.is_floating_point():
            V.check_finite("y", y)
        x, y = x.to(device), y.to(device)
        data_size = x.shape[0]
        steps_per_epoch = math.ceil(data_size / batch_size)
    else:
        if y is not None:
            raise TypeError("pass y only with tensor x; a loader yields (x, y) batches itself")
        if isinstance(x, Iterator) or not hasattr(x, "__len__"):
            # An iterator is spent after one epoch, and the schedule needs the number of steps.
            raise TypeError(
                "x must be a tensor or a sized, re-iterable collection of (x, y) batches such as "
                f"a DataLoader, got {type(x).__name__}"
            )
        dataset = getattr(x, "dataset", None)
        data_size = len(dataset) if dataset is not None else 0
        steps_per_epoch = max(len(x), 1)  # type: ignore[arg-type]
    if num_data is None:
        if data_size == 0:
            raise ValueError("num_data is required when x is an iterable without a dataset")
        num_data = data_size
    elbo = ELBO(likelihood, num_data, beta=beta)
    if validation is not None:
        if (
            not isinstance(validation, (tuple, list))
            or len(validation) != 2
            or not all(isinstance(t, Tensor) for t in validation)
        ):
            raise TypeError(
                f"validation must be a pair of tensors (x_val, y_val), got {V.describe(validation)}"
            )
        validation = (validation[0].to(device), validation[1].to(device))

    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in [*model.parameters(), *likelihood.parameters()]:
        if p.requires_grad and id(p) not in seen:  # a likelihood inside the model counts once
            seen.add(id(p))
            params.append(p)
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    total_steps = max(epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    shuffle = torch.Generator().manual_seed(int(seed))
    layers = list(variational_layers(model))
    history = History()
    best: dict[str, Any] | None = None
    bad_epochs = 0
    steps = 0
    start_nll: float | None = None
    initial_scales = _scales(model)
    start_epoch = 0

    def snapshot() -> dict[str, Any]:
        return {"model": _clone_state(model), "likelihood": _clone_state(likelihood)}

    def full_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            **snapshot(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "history": history.to_dict(),
            "best": best,
            "bad_epochs": bad_epochs,
            "steps": steps,
            "start_nll": start_nll,
            "initial_scales": initial_scales,
            "shuffle_rng": shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "layer_rngs": [
                layer.generator.get_state() if layer.generator is not None else None
                for layer in layers
            ],
            # Layers without a generator of their own draw on the device's default one.
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    if checkpoint is not None and resume and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)  # on the CPU: RNG states must stay there
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} was not written by varlin.fit (it lacks "
                f"{', '.join(missing)}); pass resume=False to overwrite it"
            )
        _load_module_state(model, state["model"], "model", checkpoint)
        _load_module_state(likelihood, state["likelihood"], "likelihood", checkpoint)
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} holds another optimizer's state: {exc}"
            ) from None
        if len(state["layer_rngs"]) != len(layers):
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} has {len(state['layer_rngs'])} variational "
                f"layers, this model has {len(layers)}"
            )
        # The learning rate of the next step under *this* run's schedule (the same value when
        # ``epochs`` is unchanged; the continued schedule when it grew).
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            group["lr"] = base * factor(sched.last_epoch)
        history = History.from_dict(state["history"])
        best, bad_epochs = state["best"], int(state["bad_epochs"])
        steps, start_nll = int(state["steps"]), state["start_nll"]
        initial_scales = state["initial_scales"]
        if initial_scales is not None:
            initial_scales = initial_scales.to(device)
        shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        for layer, rng in zip(layers, state["layer_rngs"], strict=True):
            if layer.generator is not None and rng is not None:
                layer.generator.set_state(rng)
        start_epoch = int(state["epoch"]) + 1  # -1 for the checkpoint written before epoch 0
        if history.stopped_early:
            start_epoch = epochs  # early stopping ended that run; do not train past it
    elif checkpoint is not None:
        # Before any step: an interruption in the first epoch still leaves a checkpoint.
        save_checkpoint(checkpoint, full_state(-1))

    sync = _LikelihoodSync(model, likelihood)
    sync.broadcast()
    last_good = snapshot()
    was_training = model.training
    bar = tqdm(
        range(start_epoch, epochs),
        desc="fit",
        disable=not progress,
        leave=False,
        total=max(epochs - start_epoch, 0),
    )

    def restore_and_raise(message: str) -> NoReturn:
        model.load_state_dict(last_good["model"])
        likelihood.load_state_dict(last_good["likelihood"])
        kept = f"; the last good checkpoint is {str(checkpoint)!r}" if checkpoint else ""
        raise NonFiniteLossError(
            f"{message}; the model was restored to the last good epoch{kept}. Lower the "
            "learning rate or check the data."
        )

    try:
        with _sigterm_as_interrupt():
            for epoch in bar:
                started = time.perf_counter()
                epoch_beta = (
                    beta * min(1.0, (epoch + 1) / kl_warmup_epochs) if kl_warmup_epochs else beta
                )
                model.train()
                sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "kl_term": 0.0}
                count = epoch_steps = 0
                if isinstance(x, Tensor):
                    assert y is not None
                    batches: Iterable[tuple[Tensor, Tensor]] = _batches(x, y, batch_size, shuffle)
                else:
                    batches = x
                for xb, yb in batches:
                    xb, yb = xb.to(device), yb.to(device)
                    opt.zero_grad(set_to_none=True)
                    output = (
                        propagate(model, xb, covariance=covariance)
                        if method == "moments"
                        else _output(model, xb)
                    )
                    terms = elbo.terms(output, yb, kl_divergence(model), beta=epoch_beta)
                    if not bool(torch.isfinite(terms.loss)):
                        loss, nll, kl = (float(t.detach()) for t in terms[:3])
                        restore_and_raise(
                            f"the loss became {loss} at epoch {epoch}, step {epoch_steps} "
                            f"(nll={nll}, kl={kl})"
                        )
                    if start_nll is None:
                        start_nll = float(terms.nll.detach())  # the data fit before any update
                    terms.loss.backward()
                    sync.average_grads()
                    opt.step()
                    sched.step()
                    steps += 1
                    epoch_steps += 1
                    n = xb.shape[0]
                    count += n
                    sums["kl"] += float(terms.kl.detach())
                    for key in ("loss", "nll", "kl_term"):
                        sums[key] += float(getattr(terms, key).detach()) * n
                if not _all_finite(model, likelihood):
                    restore_and_raise(f"a parameter became non-finite in epoch {epoch}")
                record = {
                    "epoch": float(epoch),
                    "loss": sums["loss"] / max(count, 1),
                    "nll": sums["nll"] / max(count, 1),
                    "kl": sums["kl"] / max(epoch_steps, 1),
                    "kl_term": sums["kl_term"] / max(count, 1),
                    "beta": epoch_beta,
                    "lr": float(opt.param_groups[0]["lr"]),
                }
                if validation is not None:
                    model.eval()
                    record.update(
                        _evaluate(model, likelihood, *validation, val_samples, method, covariance)
                    )
                    model.train()
                    if best is None or record["val_nll"] < best["val_nll"]:
                        best = {"val_nll": record["val_nll"], "epoch": epoch, **snapshot()}
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                record["seconds"] = time.perf_counter() - started
                history.records.append(record)
                # Early stopping ends a run only before its last epoch: patience running out
                # on the last one is a completed run, which a resume with more epochs continues.
                history.stopped_early = (
                    patience is not None and bad_epochs >= patience and epoch + 1 < epochs
                )
                last_good = snapshot()
                postfix = {
                    "elbo": f"{-record['loss']:.4g}",
                    "nll": f"{record['nll']:.4g}",
                    "kl": f"{record['kl']:.4g}",
                }
                if "val_nll" in record:
                    postfix["val_nll"] = f"{record['val_nll']:.4g}"
                # Redrawn at tqdm's own pace, and once at the end so the last values show.
                bar.set_postfix(postfix, refresh=epoch + 1 == epochs or history.stopped_early)
                if checkpoint is not None:
                    save_checkpoint(checkpoint, full_state(epoch))
                if history.stopped_early:
                    break
    finally:
        bar.close()
        model.train(was_training)
    history.best_epoch = int(history.records[-1]["epoch"]) if history.records else -1
    if patience is not None and best is not None:
        model.load_state_dict(best["model"])
        likelihood.load_state_dict(best["likelihood"])
        history.best_epoch = int(best["epoch"])
    if history.records:
        _diagnose(model, history, initial_scales, steps, start_nll)
    return history
