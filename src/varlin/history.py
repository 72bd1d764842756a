"""The record of a training run: one :class:`History` per model, an entry per epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["History"]


@dataclass
class History:
    """Per-epoch records of a :func:`varlin.fit` run.

    Attributes:
        records: one dict per epoch with ``epoch``, ``loss``, ``nll``, ``kl``, ``kl_term``,
            ``beta``, ``lr``, ``seconds``, with validation data ``val_nll`` (and ``val_rmse``
            or ``val_accuracy``), and for every learned prior scale (empirical Bayes)
            ``prior_scale.<name>``, its value at the end of the epoch
            (:func:`varlin.priors.learned_scales`).
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
