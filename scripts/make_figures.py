"""Regenerate every figure of ``docs/`` from varlin itself: ``python scripts/make_figures.py``.

- ``regression.png``, ``classification_uncertainty.png``, ``calibration.png`` and
  ``mean_field_vs_exact.png``: the four figures of ``varlin demo`` (same code, same seed);
- ``gradient_variance.png``: the variance of the minibatch gradient of the ELBO under the three
  estimators, measured here on a small regression MLP, against the minibatch size;
- ``posterior_families.png``: each posterior family's ELBO gap on an ill-conditioned Bayesian
  linear regression, and how far samples of a mean-field and a radial posterior lie from the mean;
- ``moment_propagation.png``: the output law of a 2-hidden-layer ReLU network under its weight
  posterior, sampled and propagated (``varlin.moments.propagate``, diagonal and full).
- ``cnn_digits.png``: ``examples/cnn_digits.py`` at its defaults (a variational CNN on the 8x8
  digits of scikit-learn, uncertainty under rotation; needs the ``sklearn`` extra).

Everything runs on one CPU thread in about a minute; the PNGs are written at 100 dpi.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import varlin
from varlin import plots
from varlin.demo import maximise_closed_form_elbo, run_demo

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("reparameterization", "local", "flipout")


def gradient_variance(
    batch_sizes: Sequence[int] = (4, 16, 64, 256, 1024),
    *,
    repeats: int = 200,
    num_data: int = 4096,
    init_scale: float = 0.3,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Variance of the minibatch ELBO gradient, per estimator and minibatch size.

    One model (a 5-32-1 ReLU MLP of ``VariationalLinear`` layers, every posterior scale
    ``init_scale``) and one dataset are shared by the three estimators; only the way the noise is
    drawn differs. For each minibatch size ``B`` the loss ``varlin.ELBO`` (mean NLL over the batch
    + KL / N) is differentiated ``repeats`` times, each time on a fresh random minibatch and fresh
    noise, and the variance over the repeats of each gradient coordinate is averaged over the
    first layer's weight means (``"loc"``) and raw scales (``"raw_scale"``).

    Returns:
        ``{estimator: {"loc": [...], "raw_scale": [...]}}``, one value per batch size.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(num_data, 5, generator=g)
    w = torch.randn(5, generator=g)
    y = torch.tanh(X @ w) + 0.1 * torch.randn(num_data, generator=g)

    def model(estimator: str) -> nn.Sequential:
        gen = torch.Generator().manual_seed(seed + 1)  # same means for every estimator
        return nn.Sequential(
            varlin.VariationalLinear(
                5, 32, estimator=estimator, init_scale=init_scale, generator=gen
            ),  # fmt: skip
            nn.ReLU(),
            varlin.VariationalLinear(
                32, 1, estimator=estimator, init_scale=init_scale, generator=gen
            ),  # fmt: skip
        )

    elbo = varlin.ELBO(varlin.likelihoods.Gaussian(0.1), num_data=num_data)
    out: dict[str, dict[str, list[float]]] = {}
    for estimator in ESTIMATORS:
        net = model(estimator)
        first = net[0]
        assert isinstance(first, varlin.VariationalLinear)
        params = {"loc": first.w_posterior.loc, "raw_scale": first.w_posterior.raw_scale}
        result: dict[str, list[float]] = {"loc": [], "raw_scale": []}
        batches = torch.Generator().manual_seed(seed + 2)  # same minibatches for every estimator
        for b in batch_sizes:
            grads: dict[str, list[torch.Tensor]] = {"loc": [], "raw_scale": []}
            for _ in range(repeats):
                idx = torch.randint(0, num_data, (b,), generator=batches)
                loss = elbo(net(X[idx]), y[idx], varlin.kl_divergence(net))
                values = torch.autograd.grad(loss, list(params.values()))
                for key, grad in zip(params, values, strict=True):
                    grads[key].append(grad.reshape(-1))
            for key in result:
                result[key].append(float(torch.stack(grads[key]).var(0).mean()))
        out[estimator] = result
    return out


def gradient_variance_figure(data: dict[str, dict[str, list[float]]], batch_sizes: Sequence[int],
                             path: Path) -> Path:  # fmt: skip
    plt = plots.require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "loc", "gradient w.r.t. the posterior means"),
        (axes[1], "raw_scale", "gradient w.r.t. the raw posterior scales"),
    ):
        plots.gradient_variance(batch_sizes, {e: data[e][key] for e in data}, ax=ax)
        ax.set_title(f"First layer, {title}", fontsize=10)
    fig.suptitle(
        "Variance of the minibatch ELBO gradient (5-32-1 ReLU MLP, posterior std 0.3): local "
        "reparameterization falls like 1/B,\nflipout nearly so (a residual second-order in the "
        "shared noise remains), one shared weight sample levels off",
        fontsize=10,
    )
    fig.tight_layout()
    return plots.save(fig, path)


#: The families of the figure: (label, posterior, options).
FAMILY_BARS = (
    ("mean-field", "meanfield", {}),
    ("low-rank 1", "lowrank", {"rank": 1}),
    ("low-rank 2", "lowrank", {"rank": 2}),
    ("low-rank 3", "lowrank", {"rank": 3}),
    ("matrix normal", "matrix_normal", {}),
    ("full", "full", {}),
)


def family_gaps(starts: int = 3) -> dict[str, float]:
    """ELBO gap to the log evidence of each family, best of ``starts`` random starts.

    The problem of ``tests/test_conjugate.py``: d = 4 features sharing one common factor
    (pairwise correlation ~0.998, precision condition number ~900), n = 100, float64. Each layer
    maximises the ELBO in closed form (exact output moments, Gaussian likelihood) with L-BFGS.
    """
    g = torch.Generator().manual_seed(1)
    own = torch.randn(100, 4, generator=g, dtype=torch.float64)
    X = 0.05 * own + torch.randn(100, 1, generator=g, dtype=torch.float64)
    y = X @ torch.randn(4, generator=g, dtype=torch.float64)
    y = y + 0.5 * torch.randn(100, generator=g, dtype=torch.float64)
    exact = varlin.BayesianLinearRegression(prior_scale=1.0, noise_scale=0.5).fit(X, y)
    likelihood = varlin.likelihoods.Gaussian(0.5, dtype=torch.float64)
    gaps = {}
    for label, posterior, options in FAMILY_BARS:
        best = math.inf
        for seed in range(starts):
            layer = varlin.LinearVariationalNormal(
                4, 1, bias=False, posterior=posterior, dtype=torch.float64, init_scale=0.1,
                generator=torch.Generator().manual_seed(seed), **options,
            )  # fmt: skip
            q = maximise_closed_form_elbo(layer, X, y, likelihood, max_iter=400, tolerance=1e-9)
            with torch.no_grad():
                best = min(best, float(exact.log_evidence() - exact.elbo(q)))
        gaps[label] = max(best, 0.0)
    return gaps


def families_figure(gaps: dict[str, float], path: Path, *, dim: int = 1000) -> Path:
    plt = plots.require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(gaps)
    bars = left.bar(range(len(labels)), [gaps[k] for k in labels], color="tab:blue")
    for bar, label in zip(bars, labels, strict=True):
        left.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.08,
                  f"{gaps[label]:.2g}" if gaps[label] >= 1e-3 else "< 1e-3",
                  ha="center", fontsize=8)  # fmt: skip
    left.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    left.set_ylabel("log evidence - ELBO (nats) = KL(q || posterior)")
    left.set_title("Bayesian linear regression, 4 correlated weights:\nthe gap each family "
                   "leaves (best of 3 starts)", fontsize=10)  # fmt: skip
    # Samples of a D-dimensional posterior with every weight's std s: how far from the mean?
    g = torch.Generator().manual_seed(0)
    samples = 20_000
    eps = torch.randn(samples, dim, generator=g, dtype=torch.float64)
    mean_field = eps.norm(dim=-1) / math.sqrt(dim)  # ||w - mu|| / (s sqrt(D))
    radial = torch.randn(samples, generator=g, dtype=torch.float64).abs()
    bins = torch.linspace(0, 3.5, 71).tolist()
    right.hist(mean_field.tolist(), bins=bins, density=True, color="tab:red", alpha=0.7,
               label="mean-field Normal")  # fmt: skip
    right.hist(radial.tolist(), bins=bins, density=True, color="tab:green", alpha=0.6,
               label="radial")  # fmt: skip
    right.set_xlabel(r"$\|w - \mu\| / (s\sqrt{D})$ of a sample")
    right.set_ylabel("density")
    right.set_title(f"D = {dim} weights of std s each: mean-field samples lie on a thin shell,\n"
                    "radial ones anywhere from the mean outwards", fontsize=10)  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path)


def moment_network(seed: int = 0) -> nn.Sequential:
    """A 4-16-16-2 ReLU network of mean-field layers, means doubled, posterior std 0.1: hidden
    units far enough from 0, and correlated enough, for the propagation rules to be tested."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for n_in, n_out in ((4, 16), (16, 16), (16, 2)):
        layer = varlin.VariationalLinear(n_in, n_out, init_scale=0.1, generator=gen,
                                         dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            layer.w_posterior.loc.mul_(2.0)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def moments_figure(path: Path, *, samples: int = 200_000, seed: int = 0) -> Path:
    """Sampled output densities of :func:`moment_network` at two inputs against the Gaussians
    that ``propagate`` gives, and the two outputs' joint spread against both covariances."""
    plt = plots.require_matplotlib()
    net = moment_network(seed)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with torch.no_grad(), varlin.layers.weight_samples(net, samples):
        y = net(x.expand(samples, 2, 4))  # (S, 2 inputs, 2 outputs), one weight sample per pass
        diagonal = varlin.moments.propagate(net, x)
        full = varlin.moments.propagate(net, x, covariance="full")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, ax in enumerate(axes[:2]):
        values = y[:, i, 0]
        ax.hist(values.tolist(), bins=120, density=True, color="0.75", label="sampled")
        grid = torch.linspace(float(values.min()), float(values.max()), 400, dtype=torch.float64)
        for law, style, label in ((diagonal, "--", "diagonal"), (full, "-", "full")):
            mean, sd = law.mean[i, 0], law.variance[i, 0].sqrt()
            density = torch.distributions.Normal(mean, sd).log_prob(grid).exp()
            ax.plot(grid.tolist(), density.tolist(), style, lw=1.6, label=f"propagated, {label}")
        ax.set_title(f"input {i + 1}: output 1", fontsize=10)
        ax.set_xlabel("output")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    ax = axes[2]
    pts = y[:20_000, 0]
    ax.scatter(pts[:, 0].tolist(), pts[:, 1].tolist(), s=1, color="0.6", alpha=0.3)
    angle = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    circle = torch.stack([angle.cos(), angle.sin()], -1)
    covs = (("diagonal", "--", torch.diag_embed(diagonal.variance[0])),
            ("full", "-", full.covariance_matrix[0]))  # fmt: skip
    for label, style, cov in covs:
        ellipse = full.mean[0] + 2 * circle @ torch.linalg.cholesky(cov).T
        ax.plot(ellipse[:, 0].tolist(), ellipse[:, 1].tolist(), style, lw=1.6,
                label=f"2 sd, {label}")  # fmt: skip
    ax.set_title("input 1: both outputs (20,000 of the samples)", fontsize=10)
    ax.set_xlabel("output 1")
    ax.set_ylabel("output 2")
    ax.legend(fontsize=8)
    fig.suptitle(f"A 4-16-16-2 ReLU network under its mean-field posterior: {samples:,} weight "
                 "samples against moment propagation", fontsize=11)  # fmt: skip
    fig.tight_layout()
    return plots.save(fig, path)


def cnn_digits_figure(path: Path) -> Path:
    """Run ``examples/cnn_digits.py`` at its defaults, writing its figure to ``path``."""
    spec = importlib.util.spec_from_file_location("cnn_digits", ROOT / "examples" / "cnn_digits.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--out", str(path)])
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--repeats", type=int, default=200, help="gradient draws per point")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    table = io.StringIO()
    result = run_demo(args.out, progress=False, stream=table)
    print(table.getvalue())
    sizes = (4, 16, 64, 256, 1024)
    data = gradient_variance(sizes, repeats=args.repeats)
    print("gradient variance (first layer, mean over coordinates):")
    print(json.dumps({e: {k: [f"{v:.3g}" for v in vs] for k, vs in d.items()} for e, d in
                      data.items()}, indent=1))  # fmt: skip
    gaps = family_gaps()
    print("ELBO gap per family:", json.dumps({k: f"{v:.3g}" for k, v in gaps.items()}))
    paths = [
        *result.figures,
        gradient_variance_figure(data, sizes, args.out / "gradient_variance.png"),
        families_figure(gaps, args.out / "posterior_families.png"),
        moments_figure(args.out / "moment_propagation.png"),
        cnn_digits_figure(args.out / "cnn_digits.png"),
    ]
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return paths


if __name__ == "__main__":
    main()
