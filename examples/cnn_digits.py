"""A variational CNN on scikit-learn's 8x8 digits: accuracy, calibration, and uncertainty that
rises as the digits are rotated away from upright.

1. Load the digits bundled with scikit-learn (1797 images, no download); hold out a stratified
   third as the test set.
2. Fit a small CNN of ``VariationalConv2d`` and ``VariationalLinear`` layers by the per-datum ELBO
   with a ``Categorical`` likelihood (``varlin.fit``).
3. Predict with posterior samples (``varlin.predict``: one kernel sample per Monte Carlo sample,
   folded into the batch): accuracy and expected calibration error (ECE) on the test set.
4. Rotate the test digits by 0 to 180 degrees (out of distribution: the network never saw a
   rotated digit) and follow the predictive entropy (total uncertainty) and the mutual
   information between the label and the weights (epistemic uncertainty). Both rise as the
   digits turn; the figure shows them with the accuracy, and one digit at a few angles.

Run:  python examples/cnn_digits.py [--out docs/figures/cnn_digits.png]

Measured at the defaults (8 and 16 channels, local estimator, 300 epochs, 1198 training and
599 test images) on one CPU thread, about 35 s: seed 0, test accuracy 0.957, ECE 0.037, NLL
0.142; seed 1, 0.970, 0.043, 0.121 (flipout: 0.967, 0.043; reparameterization: 0.968, 0.046).
Averaged over the test digits, the predictive entropy rises from 0.26 nats upright to 1.15 at
45-60 degrees and the mutual information from 0.13 to 0.63 (seed 0). Past 90 degrees the
accuracy recovers somewhat: a 0, 1 or 8 turned by 180 degrees is still itself. With 16 and 32
channels the accuracy is higher (0.988 at 200 epochs) and the predictions underconfident (ECE
0.075): 1198 images pin down fewer weights.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import varlin
from varlin import plots


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--channels", type=int, default=8, help="channels of the first conv")
    parser.add_argument("--estimator", default="local", choices=("local", "flipout",
                                                                 "reparameterization"))  # fmt: skip
    parser.add_argument("--prior-scale", type=float, default=1.0, help="std of the Normal prior")
    parser.add_argument("--samples", type=int, default=64, help="posterior samples")
    parser.add_argument("--angles", type=int, default=13, help="rotations from 0 to 180 degrees")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 2/3)")
    parser.add_argument("--out", type=Path, default=Path("cnn_digits.png"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_digits(seed: int, n_train: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images ``(N, 1, 8, 8)`` scaled to [0, 1] and labels, split stratified: 2/3 train."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=1 / 3, stratify=data.target, random_state=seed
    )
    idx_train = idx_train[:n_train] if n_train is not None else idx_train
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate ``(N, 1, H, W)`` images about their centre (bilinear, zeros outside)."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    affine = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(affine.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def make_model(
    channels: int, estimator: str, prior_scale: float, generator: torch.Generator
) -> nn.Sequential:
    """Two variational 3x3 convolutions with max-pooling, a variational linear classifier."""
    c = channels
    prior = varlin.priors.normal(prior_scale)
    options = {
        "estimator": estimator,
        "generator": generator,
        "make_weights_prior": prior,
        "make_bias_prior": prior,
    }
    return nn.Sequential(
        varlin.VariationalConv2d(1, c, 3, padding=1, **options),  # 8x8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        varlin.VariationalConv2d(c, 2 * c, 3, padding=1, **options),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2x2
        nn.Flatten(),
        varlin.VariationalLinear(2 * c * 4, 10, **options),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, evaluate, rotate, draw; return the metrics (also printed)."""
    args = _parse(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits(args.seed, args.n_train)

    model = make_model(args.channels, args.estimator, args.prior_scale, g)
    likelihood = varlin.likelihoods.Categorical()
    varlin.fit(model, x_train, y_train, likelihood=likelihood, epochs=args.epochs,
               batch_size=64, lr=1e-2, seed=args.seed, progress=False)  # fmt: skip

    angles = torch.linspace(0.0, 180.0, args.angles).tolist()
    curves: dict[str, list[float]] = {"accuracy": [], "entropy": [], "mutual_information": []}
    for angle in angles:
        pred = varlin.predict(model, rotate(x_test, angle), likelihood=likelihood,
                              num_samples=args.samples)  # fmt: skip
        assert isinstance(pred, varlin.ClassificationPrediction)
        if angle == 0.0:
            upright = pred
        curves["accuracy"].append(float(varlin.metrics.accuracy(pred.probs, y_test)))
        curves["entropy"].append(float(pred.entropy.mean()))
        curves["mutual_information"].append(float(pred.mutual_information.mean()))
    metrics = {
        "accuracy": curves["accuracy"][0],
        "ece": float(varlin.metrics.expected_calibration_error(upright.probs, y_test)),
        "test_nll": float(upright.nll(y_test)),
        "entropy_upright": curves["entropy"][0],
        "entropy_rotated": max(curves["entropy"]),
        "mutual_information_upright": curves["mutual_information"][0],
        "mutual_information_rotated": max(curves["mutual_information"]),
    }
    _figure(model, likelihood, x_test, angles, curves, metrics, args)

    print(
        f"test accuracy {metrics['accuracy']:.3f}  ECE {metrics['ece']:.3f}  "
        f"NLL {metrics['test_nll']:.3f}"
    )
    for angle, acc, ent, mi in zip(angles, *curves.values(), strict=True):
        print(f"rotated {angle:5.1f} deg: accuracy {acc:.3f}  entropy {ent:.3f}  MI {mi:.3f}")
    print(f"figure: {args.out}")
    return metrics


def _figure(
    model: nn.Module,
    likelihood: varlin.likelihoods.Categorical,
    x_test: Tensor,
    angles: list[float],
    curves: dict[str, list[float]],
    metrics: dict[str, float],
    args: argparse.Namespace,
) -> None:
    plt = plots.require_matplotlib()
    fig = plt.figure(figsize=(10, 5))
    grid = fig.add_gridspec(2, 5, height_ratios=[3, 1.25], hspace=0.6, wspace=0.3)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(angles, curves["entropy"], "o-", color="tab:blue",
            label="predictive entropy (total)")  # fmt: skip
    ax.plot(angles, curves["mutual_information"], "s-", color="tab:red",
            label="mutual information (epistemic)")  # fmt: skip
    ax.set_xlabel("rotation of the test digits (degrees)")
    ax.set_ylabel("mean over test digits (nats)")
    ax.set_xticks(angles[:: max(1, len(angles) // 7)])
    ax.set_ylim(bottom=0.0)
    right = ax.twinx()
    right.plot(angles, curves["accuracy"], "^--", color="0.35", label="accuracy (right axis)")
    right.set_ylim(0.0, 1.02)
    right.set_ylabel("accuracy")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=9)  # fmt: skip
    fig.suptitle(
        f"Variational CNN on 8x8 digits ({args.estimator} estimator): upright test accuracy "
        f"{metrics['accuracy']:.3f}, ECE {metrics['ece']:.3f}; uncertainty as the test digits "
        "are rotated",
        fontsize=10,
    )
    # One test digit at five angles: image, predicted class, mutual information.
    digit = x_test[:1]
    shown = [0.0, 45.0, 90.0, 135.0, 180.0]
    for i, angle in enumerate(shown):
        image = rotate(digit, angle)
        pred = varlin.predict(model, image, likelihood=likelihood, num_samples=args.samples)
        assert isinstance(pred, varlin.ClassificationPrediction)
        cell = fig.add_subplot(grid[1, i])
        cell.imshow(image[0, 0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
        cell.set_xticks([])
        cell.set_yticks([])
        cell.set_title(
            f"{angle:.0f}°: predicts {int(pred.classes[0])} (p={float(pred.probs[0].max()):.2f})"
            f"\nMI {float(pred.mutual_information[0]):.2f} nats",
            fontsize=8,
        )
    plots.save(fig, args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves the others free
    main()
