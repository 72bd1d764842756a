"""``varlin demo``: the whole library on embedded data, in well under a minute.

Three generated problems, each from a fixed seed:

1. **Regression** with a gap in the inputs and input-dependent noise: a heteroscedastic
   variational MLP; test NLL, RMSE and 90% interval coverage; a figure of the predictive mean with
   its epistemic and total bands, and of the two standard deviations along ``x`` (the epistemic one
   grows in the gap and outside the data; the aleatoric one follows the true noise).
2. **Classification** (two moons): a variational MLP; accuracy, ECE, NLL; maps of the predictive
   probability, the total uncertainty (entropy) and its epistemic part (mutual information).
3. **Conjugate check**: a 3-weight Bayesian linear regression with correlated inputs, where the
   exact posterior is known; ``LinearVariationalNormal`` layers with the mean-field, low-rank
   (rank 1) and full-covariance posteriors are trained on the ELBO, the table gives each one's
   ELBO gap to the log evidence, and the figure shows what each gets right or wrong (mean-field:
   an axis-aligned, over-confident ellipse; full: the exact one).

A fourth figure holds the calibration of both trained models on held-out data.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

from . import metrics, plots
from .conjugate import BayesianLinearRegression
from .layers import LinearVariationalNormal, VariationalLinear, variational_layers
from .likelihoods import Categorical, Gaussian, HeteroscedasticGaussian
from .predictive import ClassificationPrediction, RegressionPrediction, predict
from .priors import normal
from .synthetic import (
    REGRESSION_1D_GAP,
    make_regression_1d,
    make_two_moons,
    regression_1d_mean,
    regression_1d_noise_std,
)
from .training import fit

__all__ = ["run_demo", "DemoResult", "format_table", "maximise_closed_form_elbo"]

FIGURES = ("regression.png", "classification_uncertainty.png", "calibration.png",
           "mean_field_vs_exact.png")  # fmt: skip


@dataclass
class DemoResult:
    """Metrics (task -> name -> value), the figures written, and the wall time."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Held:
    """Held-out predictions kept for the calibration figure."""

    regression: tuple[RegressionPrediction, Tensor] | None = None
    classification: tuple[ClassificationPrediction, Tensor] | None = None


def _mlp(
    d_in: int, d_out: int, hidden: int, *, estimator: str, generator: torch.Generator
) -> nn.Module:
    def layer(a: int, b: int) -> VariationalLinear:
        return VariationalLinear(a, b, estimator=estimator, generator=generator)  # type: ignore[arg-type]

    return nn.Sequential(
        layer(d_in, hidden), nn.ReLU(), layer(hidden, hidden), nn.ReLU(), layer(hidden, d_out)
    )


@contextlib.contextmanager
def _weight_space_samples(model: nn.Module) -> Iterator[None]:
    """Predict with whole weight samples: each posterior sample is then one smooth function.

    The local and flipout estimators draw independent noise per input, which is right for
    training and for per-point predictive statistics but makes a plotted band or map grainy. The
    marginal predictive at each input is the same either way.
    """
    layers = list(variational_layers(model))
    saved = [layer.estimator for layer in layers]
    try:
        for layer in layers:
            layer.estimator = "reparameterization"
        yield
    finally:
        for layer, estimator in zip(layers, saved, strict=True):
            layer.estimator = estimator


def _regression(
    out: Path, res: DemoResult, held: _Held, seed: int, scale: float, progress: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    train = make_regression_1d(600, seed=seed)
    test = make_regression_1d(1000, gap=False, seed=seed + 1)
    model = _mlp(1, 2, 32, estimator="local", generator=g)
    likelihood = HeteroscedasticGaussian()
    # Full-batch steps: on 600 points a step costs about what a 64-point minibatch does.
    fit(model, train.x, train.y, likelihood=likelihood, epochs=max(int(1500 * scale), 2),
        batch_size=600, lr=1e-2, seed=seed, progress=progress)  # fmt: skip
    pred = predict(model, test.x, likelihood=likelihood, num_samples=128)
    assert isinstance(pred, RegressionPrediction)
    held.regression = (pred, test.y)
    lower, upper = pred.interval(0.9)
    res.metrics["regression (gap, heteroscedastic)"] = {
        "test NLL": float(pred.nll(test.y)),
        "test RMSE": float(metrics.rmse(pred.mean, test.y)),
        "90% coverage": float(metrics.interval_coverage(lower, upper, test.y)),
    }

    plt = plots.require_matplotlib()
    x = torch.linspace(-4.5, 4.5, 361)
    with _weight_space_samples(model):
        band = predict(model, x.unsqueeze(-1), likelihood=likelihood, num_samples=256)
    assert isinstance(band, RegressionPrediction)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for ax in (top, bottom):
        ax.axvspan(*REGRESSION_1D_GAP, color="orange", alpha=0.12, lw=0)
        for edge in (-3.0, 3.0):  # the training data's domain
            ax.axvline(edge, color="0.6", lw=0.8, ls=":")
    plots.regression_bands(
        x, band.mean, band.epistemic, band.variance, x_train=train.x, y_train=train.y,
        truth=regression_1d_mean(x), level=0.9, ax=top,
    )  # fmt: skip
    top.set_ylim(-4.5, 4.5)
    top.set_xlabel("")
    top.set_title("Predictive mean with epistemic (dark) and total (light) 90% bands", fontsize=10)
    plots.uncertainty_split(
        x, band.epistemic, band.aleatoric, true_noise_std=regression_1d_noise_std(x), ax=bottom
    )
    bottom.set_ylim(0, 1.2)
    bottom.set_title(
        "Epistemic std grows in the gap (shaded) and beyond the data (dotted); "
        "aleatoric rises with the true noise",
        fontsize=9,
    )
    res.figures.append(plots.save(fig, out / "regression.png"))


def _classification(
    out: Path, res: DemoResult, held: _Held, seed: int, scale: float, progress: bool
) -> None:
    g = torch.Generator().manual_seed(seed + 10)
    train = make_two_moons(400, noise=0.15, seed=seed)
    test = make_two_moons(1000, noise=0.15, seed=seed + 1)
    model = _mlp(2, 2, 32, estimator="flipout", generator=g)
    likelihood = Categorical()
    fit(model, train.x, train.y, likelihood=likelihood, epochs=max(int(200 * scale), 2),
        batch_size=100, lr=1e-2, seed=seed, progress=progress)  # fmt: skip
    pred = predict(model, test.x, likelihood=likelihood, num_samples=128)
    assert isinstance(pred, ClassificationPrediction)
    held.classification = (pred, test.y)
    res.metrics["classification (two moons)"] = {
        "accuracy": float(metrics.accuracy(pred.probs, test.y)),
        "ECE": float(metrics.expected_calibration_error(pred.probs, test.y)),
        "test NLL": float(pred.nll(test.y)),
    }

    plt = plots.require_matplotlib()
    x1 = torch.linspace(-2.5, 3.5, 101)
    x2 = torch.linspace(-2.25, 2.75, 85)
    xx, yy = torch.meshgrid(x1, x2, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    with _weight_space_samples(model):
        gp = predict(model, grid, likelihood=likelihood, num_samples=64)
    assert isinstance(gp, ClassificationPrediction)
    p1 = gp.probs[:, 1].reshape(xx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    common: dict[str, Any] = {"x_train": train.x, "y_train": train.y, "boundary": p1}
    plots.uncertainty_map(xx, yy, p1, label="p(class 1)", cmap="RdBu_r", vmin=0.0, vmax=1.0,
                          ax=axes[0], **common)  # fmt: skip
    top = float(torch.log(torch.tensor(2.0)))
    plots.uncertainty_map(xx, yy, gp.entropy.reshape(xx.shape), label="entropy (nats)",
                          vmin=0.0, vmax=top, ax=axes[1], **common)  # fmt: skip
    plots.uncertainty_map(xx, yy, gp.mutual_information.reshape(xx.shape),
                          label="mutual information (nats)", vmin=0.0, ax=axes[2],
                          **common)  # fmt: skip
    axes[0].set_title("Predictive probability (white: decision boundary)", fontsize=10)
    axes[1].set_title("Total uncertainty: entropy of the predictive", fontsize=10)
    axes[2].set_title("Epistemic part: high where data do not pin the boundary", fontsize=10)
    fig.tight_layout()
    res.figures.append(plots.save(fig, out / "classification_uncertainty.png"))


def _calibration(out: Path, res: DemoResult, held: _Held) -> None:
    assert held.regression is not None and held.classification is not None
    plt = plots.require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.4))
    probs, labels = held.classification[0].probs, held.classification[1]
    curve = metrics.calibration_curve(probs, labels, num_bins=10)
    plots.calibration_curve(curve.bin_confidence, curve.bin_accuracy, curve.bin_count, ax=axes[0])
    axes[0].set_xlim(0.45, 1.0)  # two classes: the top-label confidence is at least 0.5
    axes[0].legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 0.08))  # clear of the points
    axes[0].set_title("Classification (two moons): reliability diagram", fontsize=10)
    pred, y = held.regression
    levels = torch.linspace(0.05, 0.95, 19)
    observed = []
    for level in levels.tolist():
        z = NormalDist().inv_cdf(0.5 + level / 2)
        observed.append(float(((y - pred.mean).abs() <= z * pred.std).float().mean()))
    plots.coverage_curve(levels, torch.tensor(observed), ax=axes[1])
    axes[1].set_title("Regression (held-out x over the whole domain, gap included)", fontsize=10)
    fig.suptitle("Calibration on held-out data", fontsize=11)
    fig.tight_layout()
    res.figures.append(plots.save(fig, out / "calibration.png"))


def maximise_closed_form_elbo(
    layer: LinearVariationalNormal,
    X: Tensor,
    y: Tensor,
    likelihood: Gaussian,
    *,
    max_iter: int = 300,
    tolerance: float = 1e-12,
) -> MultivariateNormal:
    """Fit a one-output linear layer by L-BFGS on its ELBO in closed form; return the dense q.

    The exact output moments and the Gaussian likelihood's closed form leave no sampling noise,
    so a quasi-Newton method converges in a few hundred evaluations.
    """
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=1, max_iter=max_iter, tolerance_grad=1e-10,
        tolerance_change=tolerance, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        moments = layer.output_moments(X)
        loss = -likelihood.expected_log_prob(moments, y).sum() + layer.kl_divergence()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        mean, cov = layer.w_posterior.dense(layer._realise())
        return MultivariateNormal(mean, covariance_matrix=cov)


#: The conjugate task's families: (label, posterior, options, plot style).
_FAMILIES: tuple[tuple[str, str, dict[str, Any], dict[str, Any]], ...] = (
    ("mean-field", "meanfield", {}, {"color": "tab:red"}),
    ("low-rank (rank 1)", "lowrank", {"rank": 1}, {"color": "tab:orange", "ls": "--"}),
    ("full", "full", {}, {"color": "tab:blue", "ls": ":", "lw": 2.5}),
)


def _conjugate(out: Path, res: DemoResult, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    n, prior_scale, noise_scale = 30, 1.0, 0.5
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    # w1 and w2 see features correlated ~0.9; the third feature mixes a second direction in, so
    # that one rank of correlation is not the whole posterior.
    X = torch.stack(
        [z[:, 0], 0.9 * z[:, 0] + 0.45 * z[:, 1], 0.7 * z[:, 0] + 0.3 * z[:, 1] + 0.3 * z[:, 2]],
        dim=-1,
    )
    w_true = torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64)
    y = X @ w_true + noise_scale * torch.randn(n, generator=g, dtype=torch.float64)
    exact = BayesianLinearRegression(prior_scale, noise_scale).fit(X, y)
    log_ev = float(exact.log_evidence())
    likelihood = Gaussian(noise_scale).double()
    metrics = {"log evidence": log_ev}
    curves: list[tuple[str, Tensor, Tensor, dict[str, Any]]] = [
        ("exact posterior", exact.mean[:2], exact.covariance[:2, :2], {"color": "k", "lw": 2})
    ]
    for label, posterior, options, style in _FAMILIES:
        layer = LinearVariationalNormal(
            3, 1, bias=False, make_weights_prior=normal(prior_scale), init_scale=0.3,
            dtype=torch.float64, generator=g, posterior=posterior, **options,  # type: ignore[arg-type]
        )  # fmt: skip
        q = maximise_closed_form_elbo(layer, X, y, likelihood, max_iter=max(int(300 * scale), 5))
        with torch.no_grad():
            metrics[f"ELBO gap, {label}"] = log_ev - float(exact.elbo(q))
        mean, cov = q.mean, q.covariance_matrix
        curves.append((label, mean[:2], cov[:2, :2], style))
    metrics["ELBO gap, best mean-field"] = log_ev - float(exact.elbo(exact.mean_field_optimum()))
    res.metrics["conjugate (3 weights, exact posterior)"] = metrics

    plt = plots.require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.0, 6.0))
    plots.posterior_ellipses(curves, ax=ax)
    sds = [torch.diagonal(cov).sqrt() for _, _, cov, _ in curves]
    names = ("exact", "mean-f.", "rank 1", "full")
    lines = ["marginal std" + "".join(f"{name:>9}" for name in names)]
    for i in range(2):
        lines.append(f"w{i + 1}          " + "".join(f"{float(sd[i]):9.3f}" for sd in sds))
    fig.subplots_adjust(bottom=0.2)
    fig.text(0.5, 0.02, "\n".join(lines), fontsize=8, family="monospace", ha="center")
    ax.set_title(
        "2-sigma ellipses of $(w_1, w_2)$, 3 weights: mean-field is over-confident and\n"
        "blind to correlation; rank 1 holds the main one; full lies on the exact posterior",
        fontsize=9,
    )
    res.figures.append(plots.save(fig, out / "mean_field_vs_exact.png"))


def format_table(result: DemoResult) -> str:
    """The metrics as a compact aligned text table."""
    rows = [(task, name, value) for task, m in result.metrics.items() for name, value in m.items()]
    w_task = max(len(r[0]) for r in rows)
    w_name = max(len(r[1]) for r in rows)
    lines = [f"{'task':<{w_task}}  {'metric':<{w_name}}  {'value':>10}"]
    lines.append("-" * len(lines[0]))
    previous = None
    for task, name, value in rows:
        label = task if task != previous else ""
        previous = task
        lines.append(f"{label:<{w_task}}  {name:<{w_name}}  {value:>10.4f}")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "varlin-demo",
    *,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the three demo problems, print the metrics table, write the figures to ``out_dir``.

    Args:
        out_dir: folder for the figures (created).
        seed: seeds every generator.
        scale: multiplies the training lengths (``< 1`` for a quick smoke run).
        progress: show progress bars.
        stream: where the table goes (default stdout).

    Returns:
        The metrics and the paths of the four figures (:data:`FIGURES`).
    """
    stream = stream or sys.stdout
    out = Path(out_dir)
    started = time.perf_counter()
    res = DemoResult()
    held = _Held()
    threads = torch.get_num_threads()
    # Small networks: one thread avoids oversubscription and is faster on few cores.
    torch.set_num_threads(1)

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    try:
        with torch.random.fork_rng():  # the demo's sampling leaves the caller's RNG alone
            torch.manual_seed(seed)
            say("varlin demo: training on embedded, generated data")
            say("[1/3] regression: variational MLP, heteroscedastic noise, a gap in the inputs")
            _regression(out, res, held, seed, scale, progress)
            say("[2/3] classification: variational MLP on two moons (flipout)")
            _classification(out, res, held, seed, scale, progress)
            _calibration(out, res, held)
            say("[3/3] conjugate check: mean-field, low-rank and full posteriors vs the exact one")
            _conjugate(out, res, seed, scale)
    finally:
        torch.set_num_threads(threads)
    res.seconds = time.perf_counter() - started
    say("")
    say(format_table(res))
    say(f"\nfigures written to {out}/:")
    for path in res.figures:
        say(f"  {path.name}")
    say(f"done in {res.seconds:.1f} s")
    return res
