"""``varlin demo``: the whole library on embedded data, in under a minute.

Three generated problems, each with a fixed seed:

1. **Regression** with a gap in the inputs and input-dependent noise: a heteroscedastic
   variational MLP; test NLL, RMSE and 90% interval coverage; a figure of the predictive mean with
   its epistemic and total bands (the epistemic band widens in the gap and outside the data).
2. **Classification** (two moons): a variational MLP; accuracy, ECE, NLL; an uncertainty map
   (mutual information) and a reliability diagram.
3. **Conjugate check**: a 2-weight Bayesian linear regression with correlated inputs, where the
   exact posterior is known; a ``LinearVariationalNormal`` trained on the ELBO reaches the best
   mean-field posterior, and the figure shows what mean-field gets wrong (axis-aligned,
   over-confident ellipse).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from . import metrics, plots
from .conjugate import BayesianLinearRegression
from .data import make_regression_1d, make_two_moons, regression_1d_mean
from .elbo import ELBO
from .layers import LinearVariationalNormal, VariationalLinear, kl_divergence
from .likelihoods import Categorical, Gaussian, HeteroscedasticGaussian
from .predictive import ClassificationPrediction, RegressionPrediction, predict
from .priors import normal
from .training import fit

__all__ = ["run_demo", "DemoResult"]


@dataclass
class DemoResult:
    """Metrics (name -> value, per task) and the figures written."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _mlp(
    d_in: int, d_out: int, hidden: int, *, estimator: str, generator: torch.Generator
) -> nn.Module:
    return nn.Sequential(
        VariationalLinear(d_in, hidden, estimator=estimator, generator=generator),  # type: ignore[arg-type]
        nn.ReLU(),
        VariationalLinear(hidden, hidden, estimator=estimator, generator=generator),  # type: ignore[arg-type]
        nn.ReLU(),
        VariationalLinear(hidden, d_out, estimator=estimator, generator=generator),  # type: ignore[arg-type]
    )


def _regression(out: Path, res: DemoResult, seed: int, scale: float, progress: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    train = make_regression_1d(400, seed=seed)
    test = make_regression_1d(1000, gap=False, seed=seed + 1)
    model = _mlp(1, 2, 50, estimator="local", generator=g)
    likelihood = HeteroscedasticGaussian()
    fit(model, train.x, train.y, likelihood=likelihood, epochs=max(int(400 * scale), 2),
        batch_size=64, lr=1e-2, seed=seed, progress=progress)  # fmt: skip
    pred = predict(model, test.x, likelihood=likelihood, num_samples=128)
    assert isinstance(pred, RegressionPrediction)
    lower, upper = pred.interval(0.9)
    res.metrics["regression (gap, heteroscedastic)"] = {
        "test NLL": float(pred.nll(test.y)),
        "test RMSE": float(metrics.rmse(pred.mean, test.y)),
        "90% coverage": float(metrics.interval_coverage(lower, upper, test.y)),
    }
    plt = plots.require_matplotlib()
    grid = torch.linspace(-5, 5, 400).unsqueeze(-1)
    band = predict(model, grid, likelihood=likelihood, num_samples=256)
    assert isinstance(band, RegressionPrediction)
    fig, ax = plt.subplots(figsize=(7, 4))
    plots.regression_bands(
        grid.squeeze(-1), band.mean, band.epistemic, band.variance,
        x_train=train.x, y_train=train.y, truth=regression_1d_mean(grid.squeeze(-1)), ax=ax,
    )  # fmt: skip
    ax.axvspan(-0.5, 0.75, color="orange", alpha=0.1, label="gap in the data")
    ax.set_title("Predictive mean, epistemic (dark) and total (light) 90% bands")
    res.figures.append(plots.save(fig, out / "regression.png"))


def _classification(out: Path, res: DemoResult, seed: int, scale: float, progress: bool) -> None:
    g = torch.Generator().manual_seed(seed + 10)
    train = make_two_moons(400, noise=0.15, seed=seed)
    test = make_two_moons(1000, noise=0.15, seed=seed + 1)
    model = _mlp(2, 2, 32, estimator="flipout", generator=g)
    likelihood = Categorical()
    fit(model, train.x, train.y, likelihood=likelihood, epochs=max(int(200 * scale), 2),
        batch_size=64, lr=1e-2, seed=seed, progress=progress)  # fmt: skip
    pred = predict(model, test.x, likelihood=likelihood, num_samples=128)
    assert isinstance(pred, ClassificationPrediction)
    res.metrics["classification (two moons)"] = {
        "accuracy": float(metrics.accuracy(pred.probs, test.y)),
        "ECE": float(metrics.expected_calibration_error(pred.probs, test.y)),
        "test NLL": float(pred.nll(test.y)),
    }
    plt = plots.require_matplotlib()
    lin = torch.linspace(-2.5, 3.5, 120)
    xx, yy = torch.meshgrid(lin, lin - 0.5, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    gp = predict(model, grid, likelihood=likelihood, num_samples=128)
    assert isinstance(gp, ClassificationPrediction)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    plots.uncertainty_map(xx, yy, gp.entropy.reshape(xx.shape), x_train=train.x, y_train=train.y,
                          label="predictive entropy (total)", ax=axes[0])  # fmt: skip
    plots.uncertainty_map(xx, yy, gp.mutual_information.reshape(xx.shape), x_train=train.x,
                          y_train=train.y, label="mutual information", ax=axes[1])  # fmt: skip
    axes[0].set_title("Total uncertainty")
    axes[1].set_title("Epistemic uncertainty: grows away from the data")
    res.figures.append(plots.save(fig, out / "classification_uncertainty.png"))
    curve = metrics.calibration_curve(pred.probs, test.y, num_bins=10)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    plots.calibration_curve(curve.bin_confidence, curve.bin_accuracy, curve.bin_count, ax=ax)
    ax.set_title("Reliability diagram (test set)")
    res.figures.append(plots.save(fig, out / "calibration.png"))


def _conjugate(out: Path, res: DemoResult, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    n, prior_scale, noise_scale = 30, 1.0, 0.5
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    X = torch.stack([z[:, 0], 0.9 * z[:, 0] + 0.45 * z[:, 1]], dim=-1)  # correlation ~0.9
    w_true = torch.tensor([0.7, -0.4], dtype=torch.float64)
    y = X @ w_true + noise_scale * torch.randn(n, generator=g, dtype=torch.float64)
    exact = BayesianLinearRegression(prior_scale, noise_scale).fit(X, y)

    layer = LinearVariationalNormal(2, 1, bias=False, make_weights_prior=normal(prior_scale),
                                    init_scale=0.3, dtype=torch.float64, generator=g)  # fmt: skip
    elbo = ELBO(Gaussian(noise_scale).double(), num_data=n)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    steps = max(int(1500 * scale), 10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):  # closed-form expected log-likelihood: exact gradients, no noise
        opt.zero_grad()
        elbo(layer.output_moments(X), y, kl_divergence(layer)).backward()
        opt.step()
        sched.step()
    q = layer.weight_posterior()
    q_vec = torch.distributions.Normal(q.loc.detach().reshape(-1), q.scale.detach().reshape(-1))
    optimum = exact.mean_field_optimum()
    log_ev = float(exact.log_evidence())
    res.metrics["conjugate (2 weights, exact posterior)"] = {
        "log evidence": log_ev,
        "ELBO, trained layer": float(exact.elbo(q_vec)),
        "ELBO, best mean-field": float(exact.elbo(optimum)),
        "KL(q || posterior)": log_ev - float(exact.elbo(q_vec)),
    }
    plt = plots.require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plots.posterior_ellipses(
        [
            ("exact posterior", exact.mean, exact.covariance, {"color": "k", "lw": 2}),
            ("best mean-field q", optimum.loc, torch.diag(optimum.variance), {"color": "tab:red"}),
            ("trained LinearVariationalNormal", q_vec.loc, torch.diag(q_vec.variance),
             {"color": "tab:blue", "ls": "--"}),
        ],
        ax=ax,
    )  # fmt: skip
    ax.set_title("2-sigma ellipses: mean-field is over-confident")
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
    """
    stream = stream or sys.stdout
    out = Path(out_dir)
    started = time.perf_counter()
    res = DemoResult()
    threads = torch.get_num_threads()
    # Small networks: one thread avoids oversubscription and is faster on few cores.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the demo's sampling leaves the caller's RNG alone
            torch.manual_seed(seed)
            print("varlin demo: training on embedded, generated data", file=stream, flush=True)
            _regression(out, res, seed, scale, progress)
            _classification(out, res, seed, scale, progress)
            _conjugate(out, res, seed, scale)
    finally:
        torch.set_num_threads(threads)
    res.seconds = time.perf_counter() - started
    print(format_table(res), file=stream)
    print(f"\nfigures written to {out}/:", file=stream)
    for path in res.figures:
        print(f"  {path.name}", file=stream)
    print(f"done in {res.seconds:.1f} s", file=stream)
    return res
