"""Moment propagation (``varlin.moments``) measured: agreement with Monte Carlo, and its cost.

Three parts, each writing its section of ``docs/results/moments.json`` and re-rendering
``docs/results/moments.md`` from the whole JSON:

- ``agreement``: random networks (float64) whose propagated output mean and variance are compared
  with Monte Carlo estimates from ``--samples`` weight samples (each family's
  ``rsample_weights``, the forward pass written out). Reported per network and covariance: the
  largest error of the mean in units of the output's standard deviation, the largest relative
  error of the variance, and for two outputs the relative Frobenius error of the covariance;
  beside them the Monte Carlo standard error of the variance (relative), the noise floor.
- ``cost``: on one split of a UCI dataset (the protocol of ``docs/results/uci.md``: one hidden
  layer of 50 ReLU units, standardised data, learned noise), trains the model with
  ``fit(method="mc")`` (local reparameterization, one sample per step) and with
  ``fit(method="moments")`` (diagonal and full covariance) for the same epochs, and reports:
  seconds per epoch (a run without validation), the epochs and seconds to reach a common
  validation NLL (the worse of the methods' best values, on 20 % of the training rows held
  out), and the test log-likelihood and time of ``predict`` by moments and by 200 Monte Carlo
  samples, each model scored both ways.

Usage::

    python benchmarks/moments.py agreement --samples 1000000
    python benchmarks/moments.py cost --data-dir ../shared/data/uci --dataset kin8nm --epochs 40
    python benchmarks/moments.py render          # moments.md from moments.json

Timings use one torch thread; they are wall-clock on a shared machine (note the load in
``--note``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import varlin
from varlin._io import atomic_write
from varlin.layers import BayesianLinearBase
from varlin.moments import propagate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
F64 = torch.float64


# -- agreement with Monte Carlo -------------------------------------------------------------------
def _layer(n_in: int, n_out: int, family: str, scale: float, gen: torch.Generator) -> nn.Module:
    options: dict[str, Any] = {"rank": 2} if family == "lowrank" else {}
    layer = varlin.VariationalLinear(
        n_in, n_out, posterior=family, init_scale=scale, generator=gen, dtype=F64, **options
    )
    with torch.no_grad():  # larger means: hidden units far from 0, correlations that matter
        layer.w_posterior.loc.mul_(2.0)
        for name, p in layer.w_posterior.named_parameters():
            if name not in ("loc", "raw_scale"):  # a joint family's factors: correlations
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[name]


#: (label, input width, hidden widths, output width, family, activation, input noise)
NETWORKS: tuple[tuple[str, int, tuple[int, ...], int, str, str, bool], ...] = (
    ("1 layer, mean-field", 8, (), 2, "meanfield", "relu", False),
    ("1 layer, low-rank", 8, (), 2, "lowrank", "relu", False),
    ("1 layer, full", 8, (), 2, "full", "relu", False),
    ("1 layer, matrix-normal", 8, (), 2, "matrix_normal", "relu", False),
    ("1 layer, radial", 8, (), 2, "radial", "relu", False),
    ("ReLU of Gaussian inputs -> layer", 8, (), 2, "meanfield", "relu", True),
    ("1 hidden (50) ReLU, mean-field", 8, (50,), 2, "meanfield", "relu", False),
    ("2 hidden (16, 16) ReLU, mean-field", 4, (16, 16), 2, "meanfield", "relu", False),
    ("2 hidden (50, 50) ReLU, mean-field", 8, (50, 50), 2, "meanfield", "relu", False),
    ("2 hidden (16, 16) ReLU, low-rank", 4, (16, 16), 2, "lowrank", "relu", False),
    ("2 hidden (16, 16) tanh, mean-field", 4, (16, 16), 2, "meanfield", "tanh", False),
    ("2 hidden (16, 16) GELU, mean-field", 4, (16, 16), 2, "meanfield", "gelu", False),
)


def _network(spec: tuple[Any, ...], seed: int) -> nn.Sequential:
    _, n_in, hidden, n_out, family, activation, noisy = spec
    gen = torch.Generator().manual_seed(seed)
    widths = [n_in, *hidden, n_out]
    modules: list[nn.Module] = [_activation(activation)] if noisy else []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            modules.append(_activation(activation))
        modules.append(_layer(a, b, family, 0.1, gen))
    return nn.Sequential(*modules)


def _sample_pass(net: nn.Sequential, h: Tensor, n: int) -> Tensor:
    """``n`` passes, each with its own weight sample of every layer: ``(n, N, out)``."""
    for module in net:
        if isinstance(module, BayesianLinearBase):
            w, b = module.w_posterior.rsample_weights(module._realise(), (n,))
            h = torch.einsum("ni,sio->sno", h, w) if h.dim() == 2 else h @ w
            h = h if b is None else h + b.unsqueeze(-2)
        else:
            h = module(h)
    return h


def _monte_carlo(
    net: nn.Sequential, draw: Callable[[int], Tensor], samples: int, chunk: int
) -> dict[str, Tensor]:
    total = total2 = None
    cross: Tensor | None = None
    done = 0
    with torch.no_grad():
        while done < samples:
            n = min(chunk, samples - done)
            y = _sample_pass(net, draw(n), n)
            parts = (y.sum(0), (y * y).sum(0), torch.einsum("sni,snj->nij", y, y))
            if total is None:
                total, total2, cross = parts
            else:
                assert total2 is not None and cross is not None
                total, total2, cross = total + parts[0], total2 + parts[1], cross + parts[2]
            done += n
    assert total is not None and total2 is not None and cross is not None
    mean = total / samples
    cov = cross / samples - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return {"mean": mean, "var": torch.diagonal(cov, dim1=-2, dim2=-1), "cov": cov}


def agreement(samples: int, seed: int, chunk: int = 50_000) -> list[dict[str, Any]]:
    rows = []
    for spec in NETWORKS:
        net = _network(spec, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(8, spec[1], generator=g, dtype=F64)
        if spec[6]:
            scale = 0.5 + torch.rand(8, spec[1], generator=g, dtype=F64)
            source: Tensor | torch.distributions.Normal = torch.distributions.Normal(x, scale)

            def draw(n: int, x: Tensor = x, scale: Tensor = scale) -> Tensor:
                return x + scale * torch.randn(n, *x.shape, dtype=F64)
        else:
            source = x

            def draw(n: int, x: Tensor = x) -> Tensor:
                return x

        started = time.perf_counter()
        mc = _monte_carlo(net, draw, samples, chunk)
        mc_seconds = time.perf_counter() - started
        row: dict[str, Any] = {"network": spec[0], "samples": samples, "mc_seconds": mc_seconds}
        # The Monte Carlo noise floor of a relative variance error: ~ sqrt(2 / S) for
        # near-Gaussian outputs (a larger kurtosis raises it).
        row["mc_var_rel_se"] = math.sqrt(2.0 / samples)
        sd = mc["var"].sqrt()
        for covariance in ("diagonal", "full"):
            with torch.no_grad():
                started = time.perf_counter()
                out = propagate(net, source, covariance=covariance)
                seconds = time.perf_counter() - started
            cov = out.covariance_matrix if covariance == "full" else torch.diag_embed(out.variance)
            row[covariance] = {
                "mean_err_sd": float(((out.mean - mc["mean"]).abs() / sd).max()),
                "var_rel_err": float(((out.variance - mc["var"]).abs() / mc["var"]).max()),
                "cov_rel_fro": float(
                    ((cov - mc["cov"]).norm(dim=(-2, -1)) / mc["cov"].norm(dim=(-2, -1))).max()
                ),
                "seconds": seconds,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -- cost on a UCI split --------------------------------------------------------------------------
def _uci_cost(args: argparse.Namespace, name: str, likelihood_name: str) -> dict[str, Any]:
    from varlin.data import load_uci
    from varlin.uci import (
        build_likelihood,
        build_model,
        config_for,
        original_units_log_likelihood,
        prepare_split,
    )

    dataset = load_uci(name, data_dir=args.data_dir)
    test_split = prepare_split(dataset, args.split)
    val_split = prepare_split(dataset, args.split, validation=True)
    config = config_for(dataset, likelihood=likelihood_name, epochs=args.epochs)
    methods = [("mc", "diagonal"), ("moments", "diagonal"), ("moments", "full")]

    def tensors(split: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            torch.as_tensor(split.X_train, dtype=torch.float32),
            torch.as_tensor(split.y_train, dtype=torch.float32),
            torch.as_tensor(split.X_eval, dtype=torch.float32),
            torch.as_tensor(split.y_eval, dtype=torch.float64),
        )

    def train(
        split: Any, method: str, covariance: str, validation: bool, epochs: int | None = None
    ) -> Any:
        torch.manual_seed(args.seed)
        model = build_model(split.X_train.shape[1], config)
        likelihood = build_likelihood(config)
        x, y, x_eval, y_eval = tensors(split)
        options: dict[str, Any] = {}
        if validation:
            y_val = ((y_eval - split.y_mean) / split.y_std).to(torch.float32)
            options = {"validation": (x_eval, y_val)}
        started = time.perf_counter()
        history = varlin.fit(
            model, x, y, likelihood=likelihood, epochs=epochs or config.epochs,
            batch_size=config.batch_size, lr=config.lr, seed=args.seed, progress=False,
            method=method, covariance=covariance, **options,
        )  # fmt: skip
        return model, likelihood, history, time.perf_counter() - started

    result: dict[str, Any] = {
        "dataset": dataset.name,
        "split": args.split,
        "likelihood": likelihood_name,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "train_rows": int(test_split.X_train.shape[0]),
        "test_rows": int(test_split.X_eval.shape[0]),
        "hidden": config.hidden,
        "methods": {},
    }
    # Seconds per epoch: the least disturbed of --timing-repeats short runs per method,
    # interleaved so that a burst of load on the shared machine hits every method alike.
    names = [m if m == "mc" else f"moments-{c}" for m, c in methods]
    fastest = dict.fromkeys(names, math.inf)
    for _ in range(args.timing_repeats):
        for name, (method, covariance) in zip(names, methods, strict=True):
            seconds = train(test_split, method, covariance, False, args.timing_epochs)[3]
            fastest[name] = min(fastest[name], seconds / args.timing_epochs)
    curves = {}
    for name, (method, covariance) in zip(names, methods, strict=True):
        model, likelihood, _, seconds = train(test_split, method, covariance, validation=False)
        entry: dict[str, Any] = {
            "epoch_seconds": fastest[name],
            "epoch_seconds_full_run": seconds / config.epochs,
        }
        _, _, x_test, y_test = tensors(test_split)
        for how in ("moments", "mc"):
            kwargs: dict[str, Any] = {"method": how}
            if how == "mc":
                kwargs["num_samples"] = 200
            best = math.inf
            for _ in range(args.repeats):  # the fastest of a few calls: the least disturbed
                started = time.perf_counter()
                pred = varlin.predict(model, x_test, likelihood=likelihood, **kwargs)
                best = min(best, time.perf_counter() - started)
            assert isinstance(pred, varlin.RegressionPrediction)
            ll = original_units_log_likelihood(
                _double(pred), y_test, test_split.y_mean, test_split.y_std
            ).mean()
            entry[f"predict_{how}"] = {"seconds": best, "test_ll": float(ll)}
        _, _, history, _ = train(val_split, method, covariance, validation=True)
        curves[name] = [r["val_nll"] for r in history.records]
        entry["val_nll_best"] = min(curves[name])
        result["methods"][name] = entry
        print(name, json.dumps(entry), flush=True)
    target = max(min(c) for c in curves.values())
    result["val_nll_target"] = target
    for name, curve in curves.items():
        epoch = next(i for i, v in enumerate(curve) if v <= target)
        entry = result["methods"][name]
        entry["epochs_to_target"] = epoch + 1
        entry["seconds_to_target"] = (epoch + 1) * entry["epoch_seconds"]
    return result


def _double(pred: varlin.RegressionPrediction) -> varlin.RegressionPrediction:
    def d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.double()

    return varlin.RegressionPrediction(
        mean=pred.mean.double(),
        epistemic=pred.epistemic.double(),
        aleatoric=pred.aleatoric.double(),
        sample_means=d(pred.sample_means),
        sample_vars=d(pred.sample_vars),
        sample_weights=d(pred.sample_weights),
    )


# -- the JSON and the markdown --------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _g(value: float) -> str:
    return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def render(data: dict[str, Any]) -> str:
    lines = ["# Moment propagation: agreement with Monte Carlo, and cost", ""]
    lines += [
        "Written by `benchmarks/moments.py` from `moments.json`; the method is in "
        "[the explanation](../explanation.md#12-sampling-free-inference-moment-propagation); "
        "the UCI columns are in [uci.md](uci.md#moment-propagation-method-moments-issue-12).",
        "",
    ]
    agree = data.get("agreement")
    if agree:
        meta = agree["meta"]
        lines += [
            "## Propagated moments against Monte Carlo",
            "",
            f"{meta['samples']:,} weight samples per network, 8 random inputs, float64, "
            f"seed {meta['seed']}; {meta['machine']}. Errors are the largest over the 8 inputs "
            "and 2 outputs: the mean's in units of the output's standard deviation, the "
            "variance's relative, the 2 x 2 output covariance's relative (Frobenius). The Monte "
            f"Carlo noise floor of a relative variance error is about "
            f"{math.sqrt(2 / meta['samples']):.1g} (one standard error).",
            "",
            "| network | mean err / sd (diag) | var rel. err (diag) | cov rel. err (diag) | "
            "mean err / sd (full) | var rel. err (full) | cov rel. err (full) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in agree["rows"]:
            d, f = row["diagonal"], row["full"]
            lines.append(
                f"| {row['network']} | {_g(d['mean_err_sd'])} | {_g(d['var_rel_err'])} | "
                f"{_g(d['cov_rel_fro'])} | {_g(f['mean_err_sd'])} | {_g(f['var_rel_err'])} | "
                f"{_g(f['cov_rel_fro'])} |"
            )
        lines.append("")
    cost = data.get("cost")
    if cost:
        for run in cost["runs"]:
            lines += _cost_lines(run, cost["meta"])
    return "\n".join(lines) + "\n"


def _cost_lines(run: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    m = run["methods"]
    base = m["mc"]["epoch_seconds"]
    lines = [
        f"## Cost: {run['dataset']}, split {run['split']}, {run['likelihood']}",
        "",
        f"{run['train_rows']} training rows, {run['test_rows']} test rows, one hidden layer of "
        f"{run['hidden']} ReLU units, batch {run['batch_size']}, {run['epochs']} epochs, "
        f"Adam with cosine decay (the UCI protocol's settings); {meta['machine']}; "
        f"{meta.get('note', '')} Seconds per epoch: the fastest of "
        f"{meta.get('timing_repeats', 1)} interleaved runs of {meta.get('timing_epochs', '?')} "
        "epochs per method; epochs to the validation NLL: a run with validation each epoch (20 % "
        "of the training rows held out); predict: the fastest of 5 calls on the test rows.",
        "",
        "| trained by | s / epoch | vs MC epoch | epochs to val. NLL "
        f"{run['val_nll_target']:.3f} | s to it | test LL, moments predict | s | "
        "test LL, MC-200 predict | s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in m.items():
        pm, pc = e["predict_moments"], e["predict_mc"]
        lines.append(
            f"| {name} | {e['epoch_seconds']:.3f} | {e['epoch_seconds'] / base:.2f}x | "
            f"{e['epochs_to_target']} | {e['seconds_to_target']:.1f} | {pm['test_ll']:.3f} | "
            f"{pm['seconds'] * 1e3:.1f} ms | {pc['test_ll']:.3f} | {pc['seconds'] * 1e3:.1f} ms | "
            f"{pc['seconds'] / pm['seconds']:.0f}x |"
        )
    lines.append("")
    return lines


def _machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, 1 thread"
    )


def _save(data: dict[str, Any], json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(data, indent=1) + "\n"), (md_path, render(data))):
        with atomic_write(path, "w") as fh:
            fh.write(text)
    print(f"wrote {json_path} and {md_path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "moments.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "moments.md")
    parser.add_argument("--note", default="", help="a line about the machine's load")
    sub = parser.add_subparsers(dest="command", required=True)
    agree = sub.add_parser("agreement")
    agree.add_argument("--samples", type=int, default=10**6)
    agree.add_argument("--seed", type=int, default=0)
    cost = sub.add_parser("cost")
    cost.add_argument("--data-dir", type=Path, required=True)
    cost.add_argument("--dataset", action="append", required=True)
    cost.add_argument("--split", type=int, default=0)
    cost.add_argument("--likelihood", action="append", default=None)
    cost.add_argument("--epochs", type=int, default=None)
    cost.add_argument("--repeats", type=int, default=5, help="calls per timed predict")
    cost.add_argument("--timing-repeats", type=int, default=3, help="timed runs per method")
    cost.add_argument("--timing-epochs", type=int, default=5, help="epochs per timed run")
    cost.add_argument("--seed", type=int, default=0)
    sub.add_parser("render")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = _load(args.json)
    meta = {"machine": _machine(), "note": args.note, "argv": sys.argv[1:]}
    if args.command == "agreement":
        rows = agreement(args.samples, args.seed)
        data["agreement"] = {"meta": {**meta, "samples": args.samples, "seed": args.seed},
                             "rows": rows}  # fmt: skip
    elif args.command == "cost":
        likelihoods = args.likelihood or ["homoscedastic"]
        runs = [_uci_cost(args, name, lik) for name in args.dataset for lik in likelihoods]
        timing = {"timing_repeats": args.timing_repeats, "timing_epochs": args.timing_epochs}
        data["cost"] = {"meta": {**meta, **timing}, "runs": runs}
    _save(data, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
