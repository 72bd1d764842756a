"""Figures (matplotlib, an optional extra: ``pip install varlin[plots]``), imported lazily.

Every function draws on a given :class:`matplotlib.axes.Axes` (or makes one) and returns it, so
figures compose; :func:`save` writes a figure atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "require_matplotlib",
    "regression_bands",
    "posterior_ellipses",
    "calibration_curve",
    "uncertainty_map",
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
        level: central probability of both bands (Gaussian).
    """
    from statistics import NormalDist

    ax = _axes(ax)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    xs, m = _np(x_grid), _np(mean)
    tot, epi = z * _np(total.sqrt()), z * _np(epistemic.sqrt())
    ax.fill_between(xs, m - tot, m + tot, color="tab:blue", alpha=0.18, label=f"total {level:.0%}")
    ax.fill_between(
        xs, m - epi, m + epi, color="tab:blue", alpha=0.4, label=f"epistemic {level:.0%}"
    )
    ax.plot(xs, m, color="tab:blue", lw=1.5, label="predictive mean")
    if truth is not None:
        ax.plot(xs, _np(truth), color="k", lw=1, ls="--", label="true function")
    if x_train is not None and y_train is not None:
        ax.scatter(_np(x_train.reshape(-1)), _np(y_train), s=6, color="k", alpha=0.5, label="data")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
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
    bin_confidence: Tensor, bin_accuracy: Tensor, bin_count: Tensor, *, ax: Any = None
) -> Any:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    ax = _axes(ax)
    keep = bin_count > 0
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
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return ax


def uncertainty_map(
    xx: Tensor,
    yy: Tensor,
    values: Tensor,
    *,
    x_train: Tensor | None = None,
    y_train: Tensor | None = None,
    label: str = "predictive entropy",
    ax: Any = None,
) -> Any:
    """Filled contour of ``values`` over a 2-D grid, with the training points on top."""
    ax = _axes(ax)
    cs = ax.contourf(_np(xx), _np(yy), _np(values), levels=20, cmap="viridis")
    ax.figure.colorbar(cs, ax=ax, label=label)
    if x_train is not None and y_train is not None:
        ax.scatter(
            *_np(x_train).T, c=_np(y_train.float()), cmap="coolwarm", s=8, edgecolors="k", lw=0.3
        )
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax


def save(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (no half-written image) and close it."""
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return path
