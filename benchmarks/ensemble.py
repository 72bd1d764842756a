"""Speed of ``fit_ensemble`` (K models as one vectorised computation) against K ``fit`` runs.

The network of the UCI benchmark (one hidden layer of 50 ReLU units, both layers mean-field
``VariationalLinear``, a learned Gaussian noise) on a boston-sized split (455 rows, 13 features,
batch 32, fused Adam), one torch thread as the UCI runner uses. For each ``K`` the same K models
(one initialisation each, one data set each) are trained once by ``fit_ensemble`` and once by K
calls of ``varlin.fit``; the two are interleaved in rounds (the order alternates), and the table
reports the median wall times and the median of the per-round ratios. Training only: no
scoring, no progress bar, no checkpoint.

Usage::

    python benchmarks/ensemble.py                        # writes docs/results/ensemble.{json,md}
    python benchmarks/ensemble.py --quick --out /tmp/e   # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import varlin
from varlin._io import atomic_write
from varlin.errors import VarlinWarning
from varlin.likelihoods import Gaussian, Likelihood

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
ROWS, FEATURES, HIDDEN, BATCH = 455, 13, 50, 32


def _models(k: int, estimator: str) -> list[tuple[nn.Module, Likelihood]]:
    built = []
    for i in range(k):
        torch.manual_seed(i)
        model = nn.Sequential(
            varlin.VariationalLinear(FEATURES, HIDDEN, estimator=estimator, init_scale=1e-3),
            nn.ReLU(),
            varlin.VariationalLinear(HIDDEN, 1, estimator=estimator, init_scale=1e-3),
        )
        built.append((model, Gaussian(0.5, learn_noise=True)))
    return built


def _data(k: int) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(ROWS, FEATURES, generator=g) for _ in range(k)]
    ys = [x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(ROWS, generator=g) for x in xs]
    return xs, ys


def _adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2, fused=True)


def _stacked(k: int, estimator: str, epochs: int) -> Callable[[], None]:
    xs, ys = _data(k)

    def run() -> None:
        built = _models(k, estimator)
        varlin.fit_ensemble(
            [m for m, _ in built], xs, ys, likelihoods=[lik for _, lik in built], epochs=epochs,
            batch_size=BATCH, optimizer=_adam, seeds=list(range(k)), progress=False,
        )  # fmt: skip

    return run


def _separate(k: int, estimator: str, epochs: int) -> Callable[[], None]:
    xs, ys = _data(k)

    def run() -> None:
        for i, (model, likelihood) in enumerate(_models(k, estimator)):
            varlin.fit(
                model, xs[i], ys[i], likelihood=likelihood, epochs=epochs, batch_size=BATCH,
                optimizer=_adam, seed=i, progress=False,
            )  # fmt: skip

    return run


def _time(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()`` (CPU time is the steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(k: int, estimator: str, epochs: int, rounds: int) -> dict[str, Any]:
    """Median seconds of both routes for ``k`` models, and the median per-round ratios."""
    stacked, separate = _stacked(k, estimator, epochs), _separate(k, estimator, epochs)
    stacked()  # warm-up: first calls pay for lazy imports and allocations
    separate()
    wall: dict[str, list[float]] = {"stacked": [], "separate": []}
    cpu: dict[str, list[float]] = {"stacked": [], "separate": []}
    for r in range(rounds):
        order = [("stacked", stacked), ("separate", separate)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            w, c = _time(fn)
            wall[name].append(w)
            cpu[name].append(c)

    def ratio(times: dict[str, list[float]]) -> float:
        pairs = zip(times["separate"], times["stacked"], strict=True)
        return statistics.median(s / t for s, t in pairs)

    steps = epochs * -(-ROWS // BATCH)
    return {
        "k": k,
        "estimator": estimator,
        "epochs": epochs,
        "steps": steps,
        "stacked_s": statistics.median(wall["stacked"]),
        "separate_s": statistics.median(wall["separate"]),
        "speedup": ratio(wall),
        "stacked_cpu_s": statistics.median(cpu["stacked"]),
        "separate_cpu_s": statistics.median(cpu["separate"]),
        "speedup_cpu": ratio(cpu),
        "stacked_cpu_ms_per_step": 1e3 * statistics.median(cpu["stacked"]) / steps,
        "separate_cpu_ms_per_model_step": 1e3 * statistics.median(cpu["separate"]) / steps / k,
        "rounds": {"wall": wall, "cpu": cpu},
    }


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": commit,
    }


def render(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Speed: K models with `fit_ensemble` vs K `fit` runs",
        "",
        "Generated by `benchmarks/ensemble.py`. The UCI network (13 → 50 ReLU → 1, mean-field "
        f"`VariationalLinear`, learned Gaussian noise) on {ROWS} rows, batch {BATCH}, fused Adam, "
        f"{results['epochs']} epochs; training only. torch {machine['torch']}, "
        f"{machine['threads']} thread, {machine['cpu_count']} CPUs; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in machine['load_average'] or [])}. Medians over "
        f"{results['rounds']} interleaved rounds; a speed-up is the median of the per-round "
        "ratios, of wall time and of CPU time (the process's, steadier than wall time when "
        "other jobs share the machine).",
        "",
        "| estimator | K | K × `fit`, wall s | `fit_ensemble`, wall s | speed-up, wall | "
        "speed-up, CPU | CPU ms per step, `fit_ensemble` | CPU ms per model and step, `fit` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['estimator']} | {row['k']} | {row['separate_s']:.2f} | "
            f"{row['stacked_s']:.2f} | {row['speedup']:.1f}× | {row['speedup_cpu']:.1f}× | "
            f"{row['stacked_cpu_ms_per_step']:.2f} | "
            f"{row['separate_cpu_ms_per_model_step']:.2f} |"
        )
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--estimators", nargs="+", default=["local"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.rounds = [1, 2], 1, 1
    torch.set_num_threads(1)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)  # runs this short prove nothing
        for estimator in args.estimators:
            for k in args.models:
                print(f"{estimator}, K = {k} ...", file=sys.stderr, flush=True)
                rows.append(measure(k, estimator, args.epochs, args.rounds))
    results = {
        "command": "python benchmarks/ensemble.py " + shlex.join(argv or sys.argv[1:]),
        "machine": _machine(),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / "ensemble.json", "w") as fh:
        fh.write(json.dumps(results, indent=2) + "\n")
    with atomic_write(args.out / "ensemble.md", "w") as fh:
        fh.write(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
