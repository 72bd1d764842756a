r"""Many independent models trained as one vectorised computation: ``fit_ensemble``.

``fit_ensemble(models, x, y, likelihoods=...)`` trains ``K`` models of one architecture, each
with its own likelihood, data (shared or its own) and shuffling seed, through the loop of
:func:`varlin.fit`. The models' parameters and buffers are stacked along a leading dimension
(:func:`torch.func.stack_module_state`); one step evaluates every model's ELBO at once by
mapping the first model's code over that dimension (:func:`torch.func.functional_call` under
:func:`torch.func.vmap`), and differentiates the sum of the ``K`` losses. The models share no
parameter, so each gets exactly its own gradient; an elementwise optimiser (Adam, the default)
then moves each as if it were alone. What the models share is the cost of a step's Python and
dispatch overhead, which dominates for small networks: the UCI benchmark trains its splits this
way (:mod:`varlin.uci`).

Nothing here names a layer's parameters or a posterior family: any model that ``fit`` trains and
that :func:`torch.func.vmap` can run is trained the same way.

Randomness: each model's minibatches are shuffled from its own seed, exactly as ``fit`` with that
seed would; the weight noise of all ``K`` models is drawn at once from the first model's layer
generators (or torch's default generator), ``vmap(randomness="different")``, so every model gets
independent noise, though not the numbers a run of that model alone would draw (with ``K = 1``,
the same numbers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from . import _validation as V
from .batches import (
    LoaderBatches,
    TensorBatches,
    check_loader,
    check_tensor_data,
    check_validation,
)
from .checkpoints import Checkpointer
from .elbo import ELBO, ELBOTerms
from .history import History
from .likelihoods import Likelihood
from .loop import DataParallelHooks, FitOptions, run
from .moments import check_model
from .training import (
    Objective,
    check_no_exact_head,
    make_objective,
    rng_state,
    set_rng_state,
)

__all__ = ["StackedModels", "fit_ensemble"]

_PARTS = (("model", "model."), ("likelihood", "elbo.likelihood."))


class StackedModels:
    """``K`` models of one architecture as one vectorised model (see :class:`varlin.loop.Trainee`).

    The trained values live in stacked tensors ``(K, ...)`` named as in each model's
    :class:`~varlin.training.Objective`; :meth:`members` writes them back into the models.

    Args:
        models: the models, all with the same parameter and buffer names and shapes.
        likelihoods: one per model, all of one kind.
        elbos: one :class:`varlin.ELBO` per model (over its likelihood).
        method, covariance: the objective, as for :func:`varlin.fit`.

    Raises:
        ValueError: the models (with their likelihoods) differ in structure, or live on
            several devices.
        TypeError: a model is wrapped in ``DistributedDataParallel`` (train it with ``fit``).
    """

    stacked = True

    def __init__(
        self,
        models: Sequence[nn.Module],
        likelihoods: Sequence[Likelihood],
        elbos: Sequence[ELBO],
        *,
        method: str = "mc",
        covariance: str = "diagonal",
    ) -> None:
        if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in models):
            raise TypeError(
                "fit_ensemble does not train DistributedDataParallel models; train each with "
                "varlin.fit"
            )
        self.models, self.likelihoods = list(models), list(likelihoods)
        self.num_models = len(self.models)
        self.objectives: list[Objective] = [
            make_objective(m, e, method, covariance) for m, e in zip(models, elbos, strict=True)
        ]
        devices = {t.device for o in self.objectives for t in [*o.parameters(), *o.buffers()]}
        if len(devices) > 1:
            raise ValueError(
                f"models must all live on one device, got {sorted(str(d) for d in devices)}"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        _check_same_structure(self.objectives)
        try:
            params, buffers = stack_module_state(self.objectives)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"the models cannot be stacked: {exc}") from None
        self.params: dict[str, Tensor] = dict(params)
        self.buffers: dict[str, Tensor] = dict(buffers)
        template = self.objectives[0]  # its code, and its layers' generators, serve all
        # Tied tensors (one module or tensor under two names, e.g. a likelihood inside the
        # model) need functional_call's tie handling, which scans the module every call.
        ties = _has_ties(template)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor, beta: float):
            return tuple(functional_call(template, (p, b), (x, y, beta), tie_weights=ties))

        self._terms = vmap(one, in_dims=(0, 0, 0, 0, None), randomness="different")
        self.hooks = DataParallelHooks()

    def parameters(self) -> list[Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def terms(self, x: Tensor, y: Tensor, beta: float) -> ELBOTerms:
        return ELBOTerms(*self._terms(self.params, self.buffers, x, y, beta))

    def total(self, loss: Tensor, active: Sequence[bool]) -> Tensor:
        if all(active):
            return loss.sum()
        # A model that stopped early gets a zero gradient, even from a non-finite loss.
        mask = torch.tensor(list(active), device=loss.device)
        return torch.where(mask, loss, torch.zeros_like(loss)).sum()

    def train(self, mode: bool) -> None:
        for model in self.models:
            model.train(mode)

    @property
    def training(self) -> bool:
        return self.models[0].training

    def _tensors(self) -> dict[str, Tensor]:
        return {**self.params, **self.buffers}

    def snapshot(self) -> dict[str, Any]:
        tensors = self._tensors()
        return {
            part: {n[len(p) :]: t.detach().clone() for n, t in tensors.items() if n.startswith(p)}
            for part, p in _PARTS
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        tensors = self._tensors()
        with torch.no_grad():
            for part, prefix in _PARTS:
                for name, value in snapshot[part].items():
                    tensors[prefix + name].copy_(value)
        self.write_back()

    def keep(
        self, best: dict[str, Any] | None, current: dict[str, Any], improved: Sequence[bool]
    ) -> dict[str, Any]:
        if best is None:
            return current
        rows = torch.tensor(list(improved))
        for part, _ in _PARTS:
            for name, value in best[part].items():
                mask = rows.to(value.device)
                value[mask] = current[part][name][mask]
        return best

    def non_finite(self) -> list[int]:
        finite = torch.ones(self.num_models, dtype=torch.bool, device=self.device)
        for p in self.params.values():
            finite &= torch.isfinite(p.detach()).reshape(self.num_models, -1).all(1)
        return [k for k, ok in enumerate(finite.tolist()) if not ok]

    def write_back(self) -> None:
        """Copy the stacked values into each model (and likelihood)."""
        with torch.no_grad():
            for k, objective in enumerate(self.objectives):
                for name, t in [*objective.named_parameters(), *objective.named_buffers()]:
                    t.copy_(self.params[name][k] if name in self.params else self.buffers[name][k])

    def members(self) -> list[tuple[nn.Module, Likelihood]]:
        self.write_back()
        return list(zip(self.models, self.likelihoods, strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.snapshot(),
            "num_models": self.num_models,
            **rng_state(self.models[0], self.device),
        }

    def load_state_dict(self, state: dict[str, Any], checkpointer: Checkpointer) -> None:
        if state.get("num_models") != self.num_models:
            saved = state.get("num_models", 1)
            raise checkpointer.error(f"holds {saved} models, fit_ensemble has {self.num_models}")
        mine = self.snapshot()
        for part, _ in _PARTS:
            want = {n: tuple(t.shape) for n, t in mine[part].items()}
            got = {n: tuple(t.shape) for n, t in state[part].items()}
            if want != got:
                diff = sorted(set(want.items()) ^ set(got.items()))[:3]
                raise checkpointer.error(f"does not fit these models' {part}s: {diff}")
        self.restore({part: state[part] for part, _ in _PARTS})
        set_rng_state(self.models[0], self.device, state, checkpointer)


def _has_ties(module: nn.Module) -> bool:
    """Whether some parameter or buffer of ``module`` is reachable under two names."""
    for named in (module.named_parameters, module.named_buffers):
        if len(list(named(remove_duplicate=False))) != len(list(named())):
            return True
    return False


def _check_same_structure(objectives: Sequence[nn.Module]) -> None:
    """One error naming the first model whose parameters or buffers differ from model 0's."""

    def layout(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        named = [*module.named_parameters(), *module.named_buffers()]
        return [(n, tuple(t.shape), t.dtype) for n, t in named]

    first = layout(objectives[0])
    for k, objective in enumerate(objectives[1:], start=1):
        other = layout(objective)
        if other != first:
            diff = sorted(set(first) ^ set(other))[:3]
            raise ValueError(
                f"models must share one architecture (the same parameter and buffer names, "
                f"shapes and dtypes, likelihoods included); model {k} differs from model 0: "
                f"{diff}"
            )


def _per_model_tensors(name: str, value: Any, k: int) -> Tensor | None:
    """``value`` stacked if it is a list or tuple of ``k`` tensors, ``None`` if it is a tensor."""
    if isinstance(value, Tensor) or value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Tensor) for v in value):
        return None
    if len(value) != k:
        raise ValueError(f"{name} must hold one tensor per model ({k}), got {len(value)}")
    shapes = {tuple(v.shape) for v in value}
    if len(shapes) != 1:
        raise ValueError(
            f"{name} must hold tensors of one shape (the models train in step), got "
            f"{sorted(shapes)}"
        )
    return torch.stack(list(value))


def fit_ensemble(
    models: Sequence[nn.Module],
    x: Tensor | Sequence[Tensor] | Iterable[tuple[Tensor, Tensor]],
    y: Tensor | Sequence[Tensor] | None = None,
    *,
    likelihoods: Sequence[Likelihood],
    epochs: int,
    batch_size: int = 32,
    num_data: int | None = None,
    lr: float = 1e-2,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr_schedule: str = "cosine",
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    validation: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]] | None = None,
    patience: int | None = None,
    val_samples: int = 32,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    method: str = "mc",
    covariance: str = "diagonal",
) -> list[History]:
    """Train ``K`` independent models at once, as ``fit`` would train each; in place.

    Model ``k`` ends as after ``varlin.fit(models[k], x_k, y_k, likelihood=likelihoods[k],
    seed=seeds[k], ...)`` with the same options, up to floating-point rounding and the weight
    noise, which is drawn for all models together (see the module's notes on randomness).
    A deep ensemble: ``K`` models initialised differently on the same data. Several data sets
    (cross-validation folds, benchmark splits): ``x`` and ``y`` one tensor per model.

    Args:
        models: ``K >= 1`` models of one architecture (same parameter and buffer names and
            shapes), on one device.
        x, y: training data shared by every model, ``(N, ...)`` tensors; or one ``(N, ...)``
            tensor per model in a list (the same ``N`` for all); or ``x`` a sized, re-iterable
            collection of ``(xb, yb)`` batches with ``y=None``, every batch given to every model.
        likelihoods: one :class:`varlin.likelihoods.Likelihood` per model (learned noise is
            trained per model).
        validation: ``(x_val, y_val)`` shared by every model, or a list of one pair per model.
        patience: per model: a model whose validation NLL has not improved for ``patience``
            epochs stops (its record ends) and is restored to its best epoch at the end; the
            others train on.
        checkpoint: as for ``fit``; the file holds every model's state (``num_models``).
        seeds: one shuffling seed per model (default ``0, 1, ..., K - 1``).
        epochs, batch_size, num_data, lr, optimizer, lr_schedule, beta, kl_warmup_epochs,
            val_samples, resume, progress, method, covariance: as for :func:`varlin.fit`
            (``method="moments"``: every model trained by moment propagation); ``optimizer``
            steps the stacked ``(K, ...)`` parameters, so it must act elementwise (Adam, SGD)
            for the models to stay independent.

    Returns:
        One :class:`varlin.History` per model.

    Raises:
        ValueError: the models differ in structure, the per-model data differ in size, or a
            list does not hold one entry per model.
        NonFiniteLossError: a model's loss (or parameter) became NaN/inf; every model holds the
            last good epoch's state.

    Example:
        >>> models = []
        >>> for k in range(5):
        ...     torch.manual_seed(k)
        ...     models.append(nn.Sequential(VariationalLinear(1, 32), nn.Tanh(),
        ...                                 VariationalLinear(32, 1)))
        >>> likelihoods = [Gaussian(0.1, learn_noise=True) for _ in models]
        >>> histories = fit_ensemble(models, x, y, likelihoods=likelihoods, epochs=100)
    """
    models, likelihoods = list(models), list(likelihoods)
    if not models:
        raise ValueError("models must hold at least one model, got none")
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{k}] must be a torch.nn.Module, got {type(model).__name__}")
        check_no_exact_head(model, f"models[{k}]")
    if len(likelihoods) != len(models):
        raise ValueError(
            f"likelihoods must hold one likelihood per model ({len(models)}), got "
            f"{len(likelihoods)}"
        )
    for k, likelihood in enumerate(likelihoods):
        if not isinstance(likelihood, Likelihood):
            raise TypeError(
                f"likelihoods[{k}] must be a varlin Likelihood, got {V.describe(likelihood)}"
            )
    k_models = len(models)
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
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        method=method,
        covariance=covariance,
    )
    if options.method == "moments":
        for model in models:
            check_model(model)
    seed_list = list(range(k_models)) if seeds is None else list(seeds)
    if len(seed_list) != k_models:
        raise ValueError(f"seeds must hold one seed per model ({k_models}), got {len(seed_list)}")
    seed_list = [V.integer(f"seeds[{k}]", s) for k, s in enumerate(seed_list)]
    sets = _validation_sets(validation, k_models)

    param = next(models[0].parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for likelihood in likelihoods:
        likelihood.to(device)
    batches: TensorBatches | LoaderBatches
    x_stacked = _per_model_tensors("x", x, k_models)
    if x_stacked is not None:
        y_stacked = _per_model_tensors("y", y, k_models)
        if y_stacked is None:
            raise TypeError("y must be a list of one target tensor per model, as x is")
        for k in range(k_models):
            check_tensor_data(x_stacked[k], y_stacked[k])
        x_stacked, y_stacked = x_stacked.to(device), y_stacked.to(device)
        data_size = x_stacked.shape[1]
        batches = TensorBatches(
            x_stacked, y_stacked, options.batch_size, seed_list, stacked=True, per_model=True
        )
    elif isinstance(x, Tensor):
        check_tensor_data(x, y)
        assert isinstance(y, Tensor)
        x, y = x.to(device), y.to(device)
        data_size = x.shape[0]
        batches = TensorBatches(x, y, options.batch_size, seed_list, stacked=True)
    else:
        data_size = check_loader(x, y)
        batches = LoaderBatches(x, device, seed_list, stacked=True)  # type: ignore[arg-type]
    if num_data is None:
        if data_size == 0:
            raise ValueError("num_data is required when x is an iterable without a dataset")
        num_data = data_size
    elbos = [ELBO(likelihood, num_data, beta=beta) for likelihood in likelihoods]
    trainee = StackedModels(models, likelihoods, elbos, method=method, covariance=covariance)
    try:
        return run(trainee, batches, options, [(a.to(device), b.to(device)) for a, b in sets])
    finally:
        trainee.write_back()  # also after an interruption: each model holds its latest state


def _validation_sets(validation: Any, k: int) -> list[tuple[Tensor, Tensor]]:
    """``validation`` as one checked ``(x_val, y_val)`` pair per model (empty for ``None``)."""
    if validation is None:
        return []
    pairs = list(validation) if isinstance(validation, (list, tuple)) else [validation]
    if pairs and all(isinstance(p, (list, tuple)) for p in pairs):
        if len(pairs) != k:
            raise ValueError(
                f"validation must be one pair (x_val, y_val) for every model, or one pair for "
                f"all; got {len(pairs)} pairs for {k} models"
            )
        for pair in pairs:
            check_validation(pair)
        return [(p[0], p[1]) for p in pairs]
    check_validation(validation)
    return [(validation[0], validation[1])] * k
