"""Regression with uncertainty bands: a variational MLP, split into epistemic and aleatoric parts.

1. Generate the 1-D problem of ``varlin.synthetic``: ``y = sin(3x) + 0.3x`` plus noise that grows
   with ``x``, and no inputs in the gap ``(-0.5, 0.75)``.
2. Fit a ``VariationalLinear`` MLP whose last layer outputs a mean and a noise scale
   (``HeteroscedasticGaussian``) by the per-datum ELBO (``varlin.fit``).
3. Predict with posterior samples (``varlin.predict``): the variance of the sampled means is the
   epistemic part, the mean of the noise variances the aleatoric part (law of total variance).
4. Report test NLL, RMSE and 90% interval coverage; draw both bands into a PNG.

Run:  python examples/regression_uncertainty.py [--out regression_uncertainty.png]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import varlin
from varlin import plots
from varlin.synthetic import REGRESSION_1D_GAP, make_regression_1d, regression_1d_mean


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=600, help="training points")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out points (no gap)")
    parser.add_argument("--hidden", type=int, default=32, help="units per hidden layer")
    parser.add_argument("--epochs", type=int, default=1500, help="full-batch epochs")
    parser.add_argument("--samples", type=int, default=128, help="posterior samples")
    parser.add_argument("--out", type=Path, default=Path("regression_uncertainty.png"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(hidden: int, generator: torch.Generator) -> nn.Sequential:
    """Two hidden ReLU layers; the output is (mean, raw noise scale) per input."""

    def layer(a: int, b: int) -> varlin.VariationalLinear:
        return varlin.VariationalLinear(a, b, estimator="local", generator=generator)

    return nn.Sequential(
        layer(1, hidden), nn.ReLU(), layer(hidden, hidden), nn.ReLU(), layer(hidden, 2)
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, evaluate, draw; return the test metrics (also printed)."""
    args = _parse(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = make_regression_1d(args.n_train, seed=args.seed)
    test = make_regression_1d(args.n_test, gap=False, seed=args.seed + 1)

    model = build_model(args.hidden, g)
    likelihood = varlin.likelihoods.HeteroscedasticGaussian()
    varlin.fit(model, train.x, train.y, likelihood=likelihood, epochs=args.epochs,
               batch_size=args.n_train, lr=1e-2, seed=args.seed, progress=False)  # fmt: skip

    pred = varlin.predict(model, test.x, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(pred, varlin.RegressionPrediction)
    lower, upper = pred.interval(0.9)
    x = test.x.squeeze(-1)
    in_gap = (x > REGRESSION_1D_GAP[0]) & (x < REGRESSION_1D_GAP[1])
    epistemic_std = pred.epistemic.sqrt()
    metrics = {
        "test_nll": float(pred.nll(test.y)),
        "test_rmse": float(varlin.metrics.rmse(pred.mean, test.y)),
        "coverage_90": float(varlin.metrics.interval_coverage(lower, upper, test.y)),
        "epistemic_std_gap": float(epistemic_std[in_gap].mean()) if bool(in_gap.any()) else 0.0,
        "epistemic_std_data": float(epistemic_std[~in_gap].mean()),
        "aleatoric_std": float(pred.aleatoric.sqrt().mean()),
    }

    plt = plots.require_matplotlib()
    grid = torch.linspace(-4.5, 4.5, 300)
    band = varlin.predict(model, grid.unsqueeze(-1), likelihood=likelihood, num_samples=256)
    assert isinstance(band, varlin.RegressionPrediction)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axvspan(*REGRESSION_1D_GAP, color="orange", alpha=0.12, lw=0)
    plots.regression_bands(grid, band.mean, band.epistemic, band.variance, x_train=train.x,
                           y_train=train.y, truth=regression_1d_mean(grid), ax=ax)  # fmt: skip
    ax.set_ylim(-4.5, 4.5)
    ax.set_title("Variational MLP: epistemic (dark) and total (light) 90% bands; gap shaded")
    plots.save(fig, args.out)

    print(
        f"test NLL {metrics['test_nll']:.3f}  RMSE {metrics['test_rmse']:.3f}  "
        f"90% coverage {metrics['coverage_90']:.3f}"
    )
    print(
        f"epistemic std: {metrics['epistemic_std_gap']:.3f} in the gap, "
        f"{metrics['epistemic_std_data']:.3f} elsewhere; figure written to {args.out}"
    )
    return metrics


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves the others free
    main()
