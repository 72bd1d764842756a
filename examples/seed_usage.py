"""The seed's own usage, made to run: ``LinearVariationalNormal`` with its prior factories.

The sketch the project started from (``shared/seed``) builds a linear layer whose weights and bias
have a mean-field Normal posterior, priors made by factory callables, and a ``forward`` that
returns ``(output, kl)``. This script uses exactly that contract:

1. ``LinearVariationalNormal(3, 2)`` with and without bias, default priors (standard Normal);
2. the same layer with custom prior factories written exactly as the seed wrote its defaults
   (lambdas returning ``torch.distributions.Normal``), then with a Laplace and with Blundell et
   al.'s scale-mixture prior (KL by Monte Carlo: no closed form against a Normal);
3. training a tiny Bayesian linear regression with the returned ``kl`` and ``kl_weight=1/N``:
   the minibatch loss ``mean NLL + kl`` is then an unbiased estimate of ``-ELBO / N``. The model
   is conjugate, so the result is checked against the exact posterior.

Run:  python examples/seed_usage.py [--n 200] [--steps 1500]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.distributions import Laplace, Normal

import varlin
from varlin import LinearVariationalNormal


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="training points")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def seed_layers() -> dict[str, float]:
    """Parts 1 and 2: build the seed's layers and call them once; return their KLs."""
    x = torch.randn(5, 3)
    out: dict[str, float] = {}

    # 1. Default priors: a standard Normal on every weight and bias, as in the seed.
    layer = LinearVariationalNormal(3, 2)
    y, kl = layer(x, kl_weight=1.0)
    assert y.shape == (5, 2) and kl.shape == ()
    out["kl_bias"] = float(kl.detach())

    no_bias = LinearVariationalNormal(3, 2, bias=False)
    y, kl = no_bias(x)  # kl_weight defaults to 1
    assert no_bias.bias_posterior() is None
    out["kl_no_bias"] = float(kl.detach())

    # 2. Prior factories, exactly as the seed wrote its defaults.
    custom = LinearVariationalNormal(
        3,
        2,
        make_weights_prior=lambda in_, out_: torch.distributions.Normal(
            loc=torch.zeros((in_, out_)), scale=torch.ones((in_, out_))
        ),
        make_bias_prior=lambda out_: torch.distributions.Normal(
            loc=torch.zeros((out_)),  # noqa: UP034
            scale=torch.ones((out_)),  # noqa: UP034 - the seed's text
        ),
    )
    y, kl = custom(x, kl_weight=0.5)
    # The seed's contract: the same weight on both terms, KL summed over every entry.
    assert torch.allclose(kl, 0.5 * custom.kl_divergence())
    out["kl_custom_half"] = float(kl.detach())

    # Any torch distribution works as a prior; without a closed-form KL it is estimated.
    laplace = LinearVariationalNormal(
        3, 2, make_weights_prior=lambda i, o: Laplace(torch.zeros(i, o), 0.5 * torch.ones(i, o))
    )
    out["kl_laplace"] = float(laplace(x)[1].detach())
    mixture = LinearVariationalNormal(3, 2, make_weights_prior=varlin.priors.scale_mixture(0.5))
    out["kl_scale_mixture"] = float(mixture(x)[1].detach())
    return out


def train_seed_layer(args: argparse.Namespace) -> dict[str, float]:
    """Part 3: a tiny Bayesian linear regression trained with ``kl_weight = 1/N``."""
    g = torch.Generator().manual_seed(args.seed)
    n, noise = args.n, 0.5
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = X @ w_true + noise * torch.randn(n, generator=g, dtype=torch.float64)

    # bias=False and float64, so that the exact posterior below is the reference.
    layer = LinearVariationalNormal(3, 1, bias=False, init_scale=0.1, dtype=torch.float64,
                                    estimator="local", generator=g)  # fmt: skip
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    first_loss = last_loss = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        out, kl = layer(X[idx], kl_weight=1.0 / n)  # the KL share of one datum
        nll = -Normal(out.squeeze(-1), noise).log_prob(y[idx]).mean()
        loss = nll + kl  # unbiased for -ELBO / N
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 0:
            first_loss = float(loss.detach())
        last_loss = float(loss.detach())

    exact = varlin.BayesianLinearRegression(prior_scale=1.0, noise_scale=noise).fit(X, y)
    q = layer.weight_posterior()
    best = exact.mean_field_optimum()
    return {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "mean_error": float((q.loc.detach().reshape(-1) - exact.mean).abs().max()),
        "posterior_std": float(exact.covariance.diagonal().sqrt().mean()),
        "std_ratio": float((q.scale.detach().reshape(-1) / best.scale).mean()),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the three parts and return their numbers (also printed)."""
    args = _parse(argv)
    torch.manual_seed(args.seed)
    result = {**seed_layers(), **train_seed_layer(args)}
    print("KL of LinearVariationalNormal(3, 2) at initialisation (nats):")
    for key in ("kl_bias", "kl_no_bias", "kl_custom_half", "kl_laplace", "kl_scale_mixture"):
        print(f"  {key:<18} {result[key]:8.3f}")
    print(
        f"trained with kl_weight=1/N: loss {result['first_loss']:.3f} -> "
        f"{result['last_loss']:.3f}; "
        f"largest |q mean - exact posterior mean| = {result['mean_error']:.3f} "
        f"(posterior std {result['posterior_std']:.3f}); q std / best mean-field std = "
        f"{result['std_ratio']:.2f}"
    )
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves the others free
    main()
