"""Classification with an uncertainty map: a variational MLP on two moons (flipout).

1. Fit a ``VariationalLinear`` MLP (flipout estimator) to the two-moons problem by the per-datum
   ELBO with a ``Categorical`` likelihood (``varlin.fit``).
2. Predict with posterior samples: the predictive probabilities are the average of the sampled
   softmax outputs; their entropy is the total uncertainty, and it splits into the expected
   entropy of the samples (aleatoric) plus the mutual information between the label and the
   weights (epistemic).
3. Report accuracy, ECE and NLL on held-out points; draw the mutual information over the plane
   into a PNG, with the decision boundary and the training points.

Run:  python examples/classification_uncertainty.py [--out classification_uncertainty.png]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import varlin
from varlin import plots
from varlin.synthetic import make_two_moons


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=400, help="training points")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out points")
    parser.add_argument("--hidden", type=int, default=32, help="units per hidden layer")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--grid", type=int, default=80, help="map resolution per axis")
    parser.add_argument("--samples", type=int, default=64, help="posterior samples")
    parser.add_argument("--out", type=Path, default=Path("classification_uncertainty.png"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, evaluate, draw; return the test metrics (also printed)."""
    args = _parse(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = make_two_moons(args.n_train, noise=0.15, seed=args.seed)
    test = make_two_moons(args.n_test, noise=0.15, seed=args.seed + 1)

    h = args.hidden
    model = nn.Sequential(
        varlin.VariationalLinear(2, h, estimator="flipout", generator=g),
        nn.ReLU(),
        varlin.VariationalLinear(h, h, estimator="flipout", generator=g),
        nn.ReLU(),
        varlin.VariationalLinear(h, 2, estimator="flipout", generator=g),
    )
    likelihood = varlin.likelihoods.Categorical()
    varlin.fit(model, train.x, train.y, likelihood=likelihood, epochs=args.epochs,
               batch_size=100, lr=1e-2, seed=args.seed, progress=False)  # fmt: skip

    pred = varlin.predict(model, test.x, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(pred, varlin.ClassificationPrediction)
    # A grid over the plane, well beyond the data.
    x1 = torch.linspace(-2.5, 3.5, args.grid)
    x2 = torch.linspace(-2.25, 2.75, args.grid)
    xx, yy = torch.meshgrid(x1, x2, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    gp = varlin.predict(model, grid, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(gp, varlin.ClassificationPrediction)
    # "Far" grid points: more than 1 away from every training point.
    far = torch.cdist(grid, train.x).min(dim=1).values > 1.0
    train_pred = varlin.predict(model, train.x, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(train_pred, varlin.ClassificationPrediction)
    metrics = {
        "accuracy": float(varlin.metrics.accuracy(pred.probs, test.y)),
        "ece": float(varlin.metrics.expected_calibration_error(pred.probs, test.y)),
        "test_nll": float(pred.nll(test.y)),
        "mutual_information_train": float(train_pred.mutual_information.mean()),
        "mutual_information_far": float(gp.mutual_information[far].mean()),
        "max_entropy": float(gp.entropy.max()),
    }

    plt = plots.require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    plots.uncertainty_map(xx, yy, gp.mutual_information.reshape(xx.shape), x_train=train.x,
                          y_train=train.y, label="mutual information (nats)",
                          boundary=gp.probs[:, 1].reshape(xx.shape), ax=ax)  # fmt: skip
    ax.set_title("Epistemic uncertainty (mutual information); white: decision boundary")
    plots.save(fig, args.out)

    print(
        f"accuracy {metrics['accuracy']:.3f}  ECE {metrics['ece']:.3f}  "
        f"NLL {metrics['test_nll']:.3f}"
    )
    print(
        f"mean mutual information: {metrics['mutual_information_train']:.3f} on the training "
        f"points, {metrics['mutual_information_far']:.3f} far from them; figure: {args.out}"
    )
    return metrics


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves the others free
    main()
