"""Validation during training: the evaluation and early-stopping parts of the loop.

:class:`Evaluation` scores each model's Monte Carlo predictive on validation data after an
epoch; :class:`EarlyStopping` keeps each model's best state by that score, stops a model whose
score has not improved for ``patience`` epochs, and restores the best states at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, cast

from torch import Tensor, nn

from .checkpoints import from_checkpoint, per_model
from .history import History
from .likelihoods import Likelihood
from .predictive import ClassificationPrediction, predict

__all__ = ["EarlyStopping", "Evaluation"]


class _KeepsStates(Protocol):
    """What early stopping asks of the trained models (a :class:`varlin.loop.Trainee` part)."""

    def snapshot(self) -> dict[str, Any]: ...

    def keep(
        self, best: dict[str, Any] | None, current: dict[str, Any], improved: Sequence[bool]
    ) -> dict[str, Any]: ...

    def restore(self, snapshot: dict[str, Any]) -> None: ...


def _evaluate(
    model: nn.Module,
    likelihood: Likelihood,
    x: Tensor,
    y: Tensor,
    num_samples: int,
    method: Literal["mc", "moments"],
    covariance: Literal["diagonal", "full"],
) -> dict[str, float]:
    pred = predict(
        model, x, num_samples=num_samples, likelihood=likelihood, method=method,
        covariance=covariance,
    )  # fmt: skip
    out = {"val_nll": float(pred.nll(y))}
    if isinstance(pred, ClassificationPrediction):
        out["val_accuracy"] = float((pred.classes == y.long()).float().mean())
    else:
        out["val_rmse"] = float(((pred.mean - y) ** 2).mean().sqrt())
    return out


class Evaluation:
    """The validation predictive of each model after an epoch: NLL and RMSE or accuracy.

    Args:
        sets: ``(x_val, y_val)`` per model.
        num_samples: Monte Carlo samples of :func:`varlin.predict`.
        method: ``"mc"``, or ``"moments"`` for models trained by moment propagation (the
            predictive of ``predict(method="moments")``).
        covariance: with ``method="moments"``, ``"diagonal"`` or ``"full"``.
    """

    def __init__(
        self,
        sets: Sequence[tuple[Tensor, Tensor]],
        num_samples: int,
        method: str = "mc",
        covariance: str = "diagonal",
    ) -> None:
        self.sets, self.num_samples = sets, num_samples
        self.method, self.covariance = method, covariance

    def __call__(
        self, members: Sequence[tuple[nn.Module, Likelihood]], active: Sequence[bool]
    ) -> list[dict[str, float]]:
        """Scores of each ``active`` model (``{}`` for the others), in eval mode."""
        scores: list[dict[str, float]] = []
        for k, (model, likelihood) in enumerate(members):
            if active[k]:
                model.eval()
                x, y = self.sets[k]
                method = cast(Literal["mc", "moments"], self.method)
                covariance = cast(Literal["diagonal", "full"], self.covariance)
                scores.append(
                    _evaluate(model, likelihood, x, y, self.num_samples, method, covariance)
                )
                model.train()
            else:
                scores.append({})
        return scores


class EarlyStopping:
    """The best validation state of each model; a model stops after ``patience`` bad epochs.

    Every validated epoch that lowers a model's validation NLL is its best so far (its state is
    kept); with ``patience`` the models are restored to their best states at the end. Several
    models train on together until the last one stops; a model that stopped takes no more steps
    and gets no more records.
    """

    def __init__(self, patience: int | None, num_models: int, *, stacked: bool) -> None:
        self.patience, self.stacked = patience, stacked
        self.best_val: list[float | None] = [None] * num_models
        self.best_epoch = [-1] * num_models
        self.best_state: dict[str, Any] | None = None
        self.bad_epochs = [0] * num_models
        self.stopped = [False] * num_models

    @property
    def active(self) -> list[bool]:
        return [not s for s in self.stopped]

    @property
    def done(self) -> bool:
        return all(self.stopped)

    def update(self, trainee: _KeepsStates, epoch: int, val_nll: Sequence[float | None]) -> None:
        """Record an epoch's validation NLLs (``None`` for a model already stopped)."""
        improved = [
            v is not None and (b is None or v < b)
            for v, b in zip(val_nll, self.best_val, strict=True)
        ]
        if any(improved):
            self.best_state = trainee.keep(self.best_state, trainee.snapshot(), improved)
        for k, value in enumerate(val_nll):
            if value is None:
                continue
            if improved[k]:
                self.best_val[k], self.best_epoch[k], self.bad_epochs[k] = value, epoch, 0
            else:
                self.bad_epochs[k] += 1

    def check(self, active: Sequence[bool], epoch: int, epochs: int) -> list[bool]:
        """Mark the ``active`` models whose patience ran out as stopped; return the flags.

        Early stopping ends a run only before its last epoch: patience running out on the last
        one is a completed run, which a resume with more epochs continues.
        """
        if self.patience is None or epoch + 1 >= epochs:
            return list(self.stopped)
        for k, is_active in enumerate(active):
            if is_active and self.bad_epochs[k] >= self.patience:
                self.stopped[k] = True
        return list(self.stopped)

    def finish(self, trainee: _KeepsStates, histories: Sequence[History]) -> None:
        """Set each history's best epoch; with ``patience``, restore the best states."""
        for history in histories:
            history.best_epoch = int(history.records[-1]["epoch"]) if history.records else -1
        if self.patience is not None and self.best_state is not None:
            trainee.restore(self.best_state)
            for history, epoch in zip(histories, self.best_epoch, strict=True):
                history.best_epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        best = None
        if self.best_state is not None:
            best = {
                "val_nll": per_model(self.best_val, self.stacked),
                "epoch": per_model(self.best_epoch, self.stacked),
                **self.best_state,
            }
        return {"best": best, "bad_epochs": per_model(self.bad_epochs, self.stacked)}

    def load_state_dict(self, state: dict[str, Any], histories: Sequence[History]) -> None:
        best = state["best"]
        if best is not None:
            self.best_val = from_checkpoint(best["val_nll"], self.stacked)
            self.best_epoch = [int(e) for e in from_checkpoint(best["epoch"], self.stacked)]
            self.best_state = {"model": best["model"], "likelihood": best["likelihood"]}
        self.bad_epochs = [int(b) for b in from_checkpoint(state["bad_epochs"], self.stacked)]
        self.stopped = [h.stopped_early for h in histories]
