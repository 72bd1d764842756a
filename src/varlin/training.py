"""A short, readable training loop: ``history = varlin.fit(model, x, y, likelihood=...)``.

What it does each epoch: shuffle (from an explicit seed), minimise :class:`varlin.ELBO` on
minibatches with Adam (cosine learning-rate decay by default), show a tqdm bar with the loss, the
NLL and the KL, evaluate a validation set (predictive NLL) if given, stop early on it, and write an
atomic, resumable checkpoint. It warns when the fit looks wrong (KL dominating, posterior scales
collapsed or never moved) and stops on a non-finite loss, keeping the last good state.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _validation as V
from .elbo import ELBO
from .layers import kl_divergence, variational_layers
from .likelihoods import Likelihood
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
        stopped_early: whether early stopping ended the run.
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (truncated or corrupted): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{str(path)!r} is not a varlin checkpoint (no 'format' entry)")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']}, this varlin reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return state


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


def _clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _scales(model: nn.Module) -> Tensor | None:
    scales = [layer.w_scale.detach().reshape(-1) for layer in variational_layers(model)]
    return torch.cat(scales) if scales else None


def _diagnose(
    model: nn.Module, history: History, initial_scales: Tensor | None, steps: int
) -> None:
    """Warn about fits that ran but look wrong (see the module docstring)."""
    first, last = history.records[0], history.records[-1]
    share = last["kl_term"] / (abs(last["nll"]) + last["kl_term"] + 1e-12)
    fit_gain = first["nll"] - last["nll"]
    if share > 0.5 and fit_gain < 0.05 * abs(first["nll"]) and len(history) > 1:
        warnings.warn(
            f"the KL term dominates the objective ({share:.0%} of it at the last epoch, "
            f"beta*KL/N={last['kl_term']:.4g}) and the data fit did not improve (nll "
            f"{first['nll']:.4g} -> {last['nll']:.4g}): the posterior is held at the prior and "
            "the model underfits; use a wider prior, more data, or beta < 1",
            VarlinWarning,
            stacklevel=3,
        )
    scales = _scales(model)
    if scales is None or initial_scales is None or scales.numel() == 0:
        return
    if float(scales.median()) < 1e-6:
        warnings.warn(
            f"posterior scales collapsed towards 0 (median {float(scales.median()):.3g}): the "
            "posterior is a point estimate; check the KL scaling (num_data) and beta",
            VarlinWarning,
            stacklevel=3,
        )
    elif steps >= 100:
        moved = ((scales - initial_scales).abs() / initial_scales).max()
        if float(moved) < 1e-2:
            warnings.warn(
                f"posterior scales stayed at their initial values after {steps} steps (largest "
                f"relative change {float(moved):.2%}): raise the learning rate or train longer",
                VarlinWarning,
                stacklevel=3,
            )


def _evaluate(
    model: nn.Module, likelihood: Likelihood, x: Tensor, y: Tensor, num_samples: int
) -> dict[str, float]:
    pred = predict(model, x, num_samples=num_samples, likelihood=likelihood, method="mc")
    out = {"val_nll": float(pred.nll(y))}
    if isinstance(pred, ClassificationPrediction):
        out["val_accuracy"] = float((pred.classes == y.long()).float().mean())
    else:
        out["val_rmse"] = float(((pred.mean - y) ** 2).mean().sqrt())
    return out


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
) -> History:
    """Train ``model`` (and the likelihood's parameters) by minimising the negative ELBO.

    Args:
        model: a module with variational layers; its output feeds ``likelihood``. A model that
            returns ``(y, kl)`` (the seed's layer) is accepted; the KL used is always
            :func:`varlin.kl_divergence` of the model, counted once per step.
        x, y: training tensors ``(N, ...)`` and ``(N, ...)``; or ``x`` an iterable of ``(xb, yb)``
            batches (a DataLoader) with ``y=None`` and ``num_data`` the global dataset size.
        likelihood: a :class:`varlin.likelihoods.Likelihood`; learned noise is trained too.
        epochs: passes over the data (>= 1).
        batch_size: minibatch size for tensor data.
        num_data: dataset size ``N`` for the KL scaling (default: ``len(x)`` or
            ``len(loader.dataset)``).
        lr: Adam's learning rate; ``optimizer`` (params -> optimizer) replaces Adam.
        lr_schedule: ``"cosine"`` (decay to 0 over the run, per step) or ``"constant"``.
        beta: KL weight (1 gives the ELBO).
        kl_warmup_epochs: ramp beta linearly from ``beta/kl_warmup_epochs`` up to ``beta``.
        validation: ``(x_val, y_val)``; its predictive NLL is logged each epoch.
        patience: stop after this many epochs without a better validation NLL and keep the best
            state (needs ``validation``).
        val_samples: Monte Carlo samples for the validation predictive.
        checkpoint: path of a checkpoint written atomically after every epoch; with ``resume``
            an existing one is loaded and training continues after its epoch.
        seed: seeds the shuffling generator (the layers' noise comes from their own generators,
            or torch's default one, whose state the checkpoint also saves).
        progress: show a tqdm progress bar.

    Returns:
        :class:`History`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the model holds the last good epoch's state
            and the checkpoint on disk is the last good one.
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
        dataset = getattr(x, "dataset", None)
        data_size = len(dataset) if dataset is not None else 0
        steps_per_epoch = len(x) if hasattr(x, "__len__") else 1  # type: ignore[arg-type]
    if num_data is None:
        if data_size == 0:
            raise ValueError("num_data is required when x is an iterable without a dataset")
        num_data = data_size
    elbo = ELBO(likelihood, num_data, beta=beta)

    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for p in likelihood.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    total_steps = max(epochs * steps_per_epoch, 1)
    if lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    shuffle = torch.Generator().manual_seed(int(seed))
    history = History()
    best: dict[str, Any] | None = None
    bad_epochs = 0
    start_epoch = 0
    layers = list(variational_layers(model))

    def snapshot() -> dict[str, Any]:
        return {
            "model": _clone_state(model),
            "likelihood": _clone_state(likelihood),
        }

    def full_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            **snapshot(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "history": history.to_dict(),
            "best": best,
            "bad_epochs": bad_epochs,
            "shuffle_rng": shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "layer_rngs": [
                layer.generator.get_state() if layer.generator is not None else None
                for layer in layers
            ],
        }

    if checkpoint is not None and resume and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint, map_location=device)
        _load_module_state(model, state["model"], "model", checkpoint)
        _load_module_state(likelihood, state["likelihood"], "likelihood", checkpoint)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = History.from_dict(state["history"])
        best, bad_epochs = state["best"], int(state["bad_epochs"])
        shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        for layer, rng in zip(layers, state["layer_rngs"], strict=False):
            if layer.generator is not None and rng is not None:
                layer.generator.set_state(rng)
        start_epoch = int(state["epoch"]) + 1

    initial_scales = _scales(model)
    last_good = snapshot()
    steps = 0
    bar = tqdm(range(start_epoch, epochs), desc="fit", disable=not progress, leave=False)
    with _sigterm_as_interrupt():
        for epoch in bar:
            started = time.perf_counter()
            epoch_beta = (
                beta * min(1.0, (epoch + 1) / kl_warmup_epochs) if kl_warmup_epochs else beta
            )
            model.train()
            sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "kl_term": 0.0}
            count = 0
            batches = _batches(x, y, batch_size, shuffle) if isinstance(x, Tensor) else x  # type: ignore[arg-type]
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                opt.zero_grad(set_to_none=True)
                terms = elbo.terms(_output(model, xb), yb, kl_divergence(model), beta=epoch_beta)
                if not torch.isfinite(terms.loss):
                    model.load_state_dict(last_good["model"])
                    likelihood.load_state_dict(last_good["likelihood"])
                    where = f"epoch {epoch}, step {count}"
                    kept = (
                        f"; the last good checkpoint is {str(checkpoint)!r}" if checkpoint else ""
                    )
                    raise NonFiniteLossError(
                        f"the loss became {float(terms.loss)} at {where} (nll={float(terms.nll)}, "
                        f"kl={float(terms.kl)}); the model was restored to the last good epoch"
                        f"{kept}. Lower the learning rate or check the data."
                    )
                terms.loss.backward()
                opt.step()
                sched.step()
                steps += 1
                n = xb.shape[0]
                count += n
                for key in sums:
                    sums[key] += float(getattr(terms, key).detach()) * (n if key != "kl" else 1)
            record = {
                "epoch": float(epoch),
                "loss": sums["loss"] / max(count, 1),
                "nll": sums["nll"] / max(count, 1),
                "kl": sums["kl"] / max(steps_per_epoch, 1),
                "kl_term": sums["kl_term"] / max(count, 1),
                "beta": epoch_beta,
                "lr": float(opt.param_groups[0]["lr"]),
            }
            if validation is not None:
                record.update(_evaluate(model, likelihood, *validation, val_samples))
                if best is None or record["val_nll"] < best["val_nll"]:
                    best = {"val_nll": record["val_nll"], "epoch": epoch, **snapshot()}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            record["seconds"] = time.perf_counter() - started
            history.records.append(record)
            last_good = snapshot()
            postfix: dict[str, str] = {k: f"{record[k]:.4g}" for k in ("loss", "nll", "kl")}
            if "val_nll" in record:
                postfix["val_nll"] = f"{record['val_nll']:.4g}"
            bar.set_postfix(postfix)
            stop = patience is not None and bad_epochs >= patience
            if checkpoint is not None:
                save_checkpoint(checkpoint, full_state(epoch))
            if stop:
                history.stopped_early = True
                break
    bar.close()
    history.best_epoch = int(history.records[-1]["epoch"]) if history.records else -1
    if patience is not None and best is not None:
        model.load_state_dict(best["model"])
        likelihood.load_state_dict(best["likelihood"])
        history.best_epoch = int(best["epoch"])
    if history.records:
        _diagnose(model, history, initial_scales, steps)
    return history
