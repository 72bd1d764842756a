"""Figures (matplotlib, an optional extra: ``pip install varlin[plots]``), imported lazily.

Every function draws on a given :class:`matplotlib.axes.Axes` (or makes one) and returns it, so
figures compose; :func:`save` writes a figure atomically. Inputs are torch tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write

__all__ = [
    "require_matplotlib",
    "regression_bands",
    "uncertainty_split",
    "posterior_ellipses",
    "calibration_curve",
    "coverage_curve",
    "uncertainty_map",
    "gradient_variance",
    "save",
]


def require_matplotlib() -> Any:
    """Import matplotlib with the file-only Agg backend, or explain how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'varlin[plots]' (or pip install matplotlib)"
        ) from exc
    return plt


def _axes(ax: Any) -> Any:
    if ax is None:
        plt = require_matplotlib()
        _, ax = plt.subplots(figsize=(6, 4))
    return ax


def _np(t: Tensor) -> Any:
    return t.detach().cpu().double().numpy()


def regression_bands(
    x_grid: Tensor,
    mean: Tensor,
    epistemic: Tensor,
    total: Tensor,
    *,
    x_train: Tensor | None = None,
    y_train: Tensor | None = None,
    truth: Tensor | None = None,
    level: float = 0.9,
    ax: Any = None,
) -> Any:
    """Predictive mean with an epistemic band and a total (epistemic + aleatoric) band.

    Args:
        x_grid: 1-D inputs ``(M,)``; mean, epistemic, total: ``(M,)`` mean and *variances*.
        x_train, y_train: training data drawn as points.
        truth: the noise-free function on ``x_grid``, drawn dashed.
        level: central probability of both bands (Gaussian).
    """
    from statistics import NormalDist

    ax = _axes(ax)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    xs, m = _np(x_grid), _np(mean)
    tot, epi = z * _np(total.sqrt()), z * _np(epistemic.sqrt())
    ax.fill_between(xs, m - tot, m + tot, color="tab:blue", alpha=0.18, lw=0, label="total")
    ax.fill_between(xs, m - epi, m + epi, color="tab:blue", alpha=0.45, lw=0, label="epistemic")
    ax.plot(xs, m, color="tab:blue", lw=1.5, label="predictive mean")
    if truth is not None:
        ax.plot(xs, _np(truth), color="k", lw=1, ls="--", label="true function")
    if x_train is not None and y_train is not None:
        ax.scatter(_np(x_train.reshape(-1)), _np(y_train), s=5, color="k", alpha=0.4, label="data")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="upper left", fontsize=8, title=f"{level:.0%} bands", title_fontsize=8)
    return ax


def uncertainty_split(
    x_grid: Tensor,
    epistemic: Tensor,
    aleatoric: Tensor,
    *,
    true_noise_std: Tensor | None = None,
    ax: Any = None,
) -> Any:
    """Epistemic and aleatoric predictive standard deviations along a 1-D input.

    Args:
        x_grid: ``(M,)``; epistemic, aleatoric: ``(M,)`` *variances* (law of total variance).
        true_noise_std: the data's true noise standard deviation, for comparison.
    """
    ax = _axes(ax)
    xs = _np(x_grid)
    ax.plot(xs, _np(epistemic.sqrt()), color="tab:blue", lw=1.8, label="epistemic std")
    ax.plot(xs, _np(aleatoric.sqrt()), color="tab:orange", lw=1.8, label="aleatoric std")
    if true_noise_std is not None:
        ax.plot(xs, _np(true_noise_std), color="k", lw=1, ls="--", label="true noise std")
    ax.set_xlabel("x")
    ax.set_ylabel("standard deviation")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    return ax


def _ellipse(mean: Tensor, cov: Tensor, n_std: float = 2.0) -> tuple[Any, Any]:
    evals, evecs = torch.linalg.eigh(cov.double())
    angles = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()])
    pts = evecs @ (evals.clamp_min(0).sqrt()[:, None] * circle) * n_std + mean.double()[:, None]
    return _np(pts[0]), _np(pts[1])


def posterior_ellipses(
    curves: list[tuple[str, Tensor, Tensor, dict[str, Any]]],
    *,
    n_std: float = 2.0,
    ax: Any = None,
) -> Any:
    """Draw ``n_std``-sigma ellipses of 2-D Gaussians: ``(label, mean (2,), cov (2, 2), style)``."""
    ax = _axes(ax)
    for label, mean, cov, style in curves:
        xs, ys = _ellipse(mean, cov, n_std)
        ax.plot(xs, ys, label=label, **style)
        ax.plot(*_np(mean.reshape(2, 1)), marker="+", color=style.get("color", "k"))
    ax.set_xlabel("$w_1$")
    ax.set_ylabel("$w_2$")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8)
    return ax


def calibration_curve(
    bin_confidence: Tensor,
    bin_accuracy: Tensor,
    bin_count: Tensor,
    *,
    show_counts: bool = True,
    ax: Any = None,
) -> Any:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal.

    The bins are assumed equal-width on [0, 1] (:func:`varlin.metrics.calibration_curve`). With
    ``show_counts``, grey bars show the fraction of examples in each bin: a point far from the
    diagonal over a handful of examples is noise, not miscalibration.
    """
    ax = _axes(ax)
    keep = bin_count > 0
    if show_counts:
        bins = bin_count.numel()
        centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        fraction = bin_count.double() / max(int(bin_count.sum()), 1)
        ax.bar(_np(centres), _np(fraction), width=0.9 / bins, color="0.75",
               label="fraction of examples")  # fmt: skip
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    ax.plot(
        _np(bin_confidence[keep]),
        _np(bin_accuracy[keep]),
        marker="o",
        color="tab:red",
        label="model",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    return ax


def coverage_curve(levels: Tensor, observed: Tensor, *, ax: Any = None) -> Any:
    """Regression calibration: observed coverage of central intervals against their level.

    Args:
        levels: nominal levels ``(K,)`` in (0, 1).
        observed: the fraction of held-out targets inside each interval, ``(K,)``.
    """
    ax = _axes(ax)
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    ax.plot(_np(levels), _np(observed), marker="o", ms=3, color="tab:blue", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("observed coverage")
    ax.legend(fontsize=8, loc="upper left")
    return ax


def uncertainty_map(
    xx: Tensor,
    yy: Tensor,
    values: Tensor,
    *,
    x_train: Tensor | None = None,
    y_train: Tensor | None = None,
    label: str = "predictive entropy",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    boundary: Tensor | None = None,
    ax: Any = None,
) -> Any:
    """Filled contour of ``values`` over a 2-D grid, with the training points on top.

    Args:
        xx, yy, values: grid coordinates and values, all of one 2-D shape.
        vmin, vmax: colour range (default: the values' range).
        boundary: class-1 probabilities on the grid; its 0.5 level (the decision boundary) is
            drawn as a white line.
    """
    import numpy as np

    ax = _axes(ax)
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    levels = np.linspace(lo, hi if hi > lo else lo + 1e-9, 21)
    cs = ax.contourf(_np(xx), _np(yy), _np(values).clip(lo, hi), levels=levels, cmap=cmap)
    from matplotlib.ticker import MaxNLocator

    bar = ax.figure.colorbar(cs, ax=ax, label=label)
    bar.locator = MaxNLocator(nbins=6)  # round ticks, not the 21 contour levels
    bar.update_ticks()
    if boundary is not None:
        ax.contour(_np(xx), _np(yy), _np(boundary), levels=[0.5], colors="w", linewidths=1.5)
    if x_train is not None and y_train is not None:
        ax.scatter(
            *_np(x_train).T, c=_np(y_train.float()), cmap="coolwarm", s=7, edgecolors="k", lw=0.3
        )
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax


def gradient_variance(
    batch_sizes: Sequence[int],
    variances: Mapping[str, Sequence[float]],
    *,
    ax: Any = None,
) -> Any:
    """Log-log plot of gradient-estimator variance against the minibatch size, per estimator.

    A ``1/B`` reference line is drawn through the first estimator's first point.
    """
    ax = _axes(ax)
    bs = [float(b) for b in batch_sizes]
    markers = "osD^v"
    for i, (name, values) in enumerate(variances.items()):
        ax.loglog(bs, list(values), marker=markers[i % len(markers)], label=name)
    first = next(iter(variances.values()))[0]
    ax.loglog(bs, [first * bs[0] / b for b in bs], color="gray", ls=":", label="$\\propto 1/B$")
    ax.set_xlabel("minibatch size $B$")
    ax.set_ylabel("variance of the gradient estimate")
    ax.legend(fontsize=8)
    return ax


def save(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` atomically (no half-written image) and close it.

    The file gets ordinary permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
