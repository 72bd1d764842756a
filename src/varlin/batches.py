"""The batches part of the training loop: tensor data or a loader, one shuffle per model.

The loop asks for an epoch's batches by iterating a :class:`TensorBatches` (tensors in memory,
reshuffled every epoch from a seeded generator per model) or a :class:`LoaderBatches` (a
DataLoader or any sized, re-iterable collection of ``(x, y)`` batches). With several models
trained together (``stacked``) every batch carries a leading model dimension. The ``check_*``
functions validate what ``fit`` is given before any of it is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _validation as V
from .checkpoints import from_checkpoint, per_model

__all__ = [
    "LoaderBatches",
    "TensorBatches",
    "check_loader",
    "check_tensor_data",
    "check_validation",
]


def check_validation(validation: Any) -> None:
    """``validation`` is ``None`` or a pair ``(x_val, y_val)`` of finite tensors, equal rows."""
    if validation is None:
        return
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


def check_tensor_data(x: Tensor, y: Any) -> None:
    """Training tensors: floating, finite ``x``; ``y`` with as many rows, finite if floating."""
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


def check_loader(x: Any, y: Any) -> int:
    """A sized, re-iterable collection of batches (``y`` unused); its data set size, or 0."""
    if y is not None:
        raise TypeError("pass y only with tensor x; a loader yields (x, y) batches itself")
    if isinstance(x, Iterator) or not hasattr(x, "__len__"):
        # An iterator is spent after one epoch, and the schedule needs the number of steps.
        raise TypeError(
            "x must be a tensor or a sized, re-iterable collection of (x, y) batches such as "
            f"a DataLoader, got {type(x).__name__}"
        )
    dataset = getattr(x, "dataset", None)
    return len(dataset) if dataset is not None else 0


class _Shuffles:
    """One shuffling generator per model, seeded; its state is the checkpoint's ``shuffle_rng``."""

    def __init__(self, seeds: Sequence[int], stacked: bool) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.stacked = stacked

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_rng": per_model([g.get_state() for g in self.generators], self.stacked)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = from_checkpoint(state["shuffle_rng"], self.stacked)
        for generator, rng in zip(self.generators, states, strict=True):
            generator.set_state(rng)


class TensorBatches(_Shuffles):
    """Minibatches of tensor data, reshuffled every epoch, one shuffle per model.

    Args:
        x, y: ``(N, ...)`` data shared by every model, or ``(K, N, ...)`` with ``per_model``.
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        seeds: one shuffle seed per model.
        stacked: whether batches carry a leading model dimension ``K`` (several models).
        per_model: whether ``x`` and ``y`` hold one data set per model.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        seeds: Sequence[int],
        *,
        stacked: bool,
        per_model: bool = False,
    ) -> None:
        super().__init__(seeds, stacked)
        self.x, self.y, self.batch_size, self.per_model = x, y, batch_size, per_model
        self.rows = x.shape[1] if per_model else x.shape[0]
        self.steps_per_epoch = math.ceil(self.rows / batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.stacked:
            order = torch.randperm(self.rows, generator=self.generators[0])
            for start in range(0, self.rows, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield self.x[idx], self.y[idx]
            return
        # The same permutation per model as a run of that model alone draws from its seed.
        orders = torch.stack([torch.randperm(self.rows, generator=g) for g in self.generators])
        models = torch.arange(len(self.generators)).unsqueeze(1)
        for start in range(0, self.rows, self.batch_size):
            idx = orders[:, start : start + self.batch_size]
            if self.per_model:
                yield self.x[models, idx], self.y[models, idx]
            else:
                yield self.x[idx], self.y[idx]


class LoaderBatches(_Shuffles):
    """The batches of a sized, re-iterable collection (a DataLoader), moved to ``device``.

    With several models (``stacked``) every model gets every batch (a broadcast view).
    """

    def __init__(
        self,
        loader: Iterable[tuple[Tensor, Tensor]],
        device: torch.device,
        seeds: Sequence[int],
        *,
        stacked: bool,
    ) -> None:
        super().__init__(seeds, stacked)
        self.loader, self.device = loader, device
        self.steps_per_epoch = max(len(loader), 1)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        k = len(self.generators)
        for xb, yb in self.loader:
            xb, yb = xb.to(self.device), yb.to(self.device)
            if self.stacked:
                xb, yb = xb.expand(k, *xb.shape), yb.expand(k, *yb.shape)
            yield xb, yb
