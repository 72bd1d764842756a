"""varlin's scikit-learn estimators against scikit-learn's own, on its bundled data sets.

Regression on ``load_diabetes`` (442 rows, 10 features): ``VariationalMLPRegressor`` (an MLP and
a linear model) against ``BayesianRidge``, ``MLPRegressor`` and ``GaussianProcessRegressor``.
Classification on ``load_breast_cancer`` (569 rows, 30 features): ``VariationalMLPClassifier``
against ``LogisticRegression`` and ``MLPClassifier``.

Protocol: repeated, shuffled K-fold cross-validation (5 folds x 2 repeats by default); every model
sees the same splits; the scores are on the held-out fold, mean ± standard error over the folds.
varlin's estimators run with their defaults (they standardise inputs and targets themselves);
scikit-learn's models get a ``StandardScaler`` on the inputs (and, for ``MLPRegressor``, on the
target), otherwise their defaults except where stated in the table's notes.

- Regression: test NLL of a Gaussian predictive (mean and standard deviation from
  ``predict(X, return_std=True)``; ``MLPRegressor`` has no predictive spread, so it gets the
  training-fold RMSE as a fixed noise standard deviation), RMSE, and the coverage of the central
  90% interval (a calibrated model covers 0.90).
- Classification: test NLL (log loss), accuracy, expected calibration error (15 bins, top label).

Run:  python examples/sklearn_comparison.py [--out docs/results/sklearn_comparison.md]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.compose import TransformedTargetRegressor
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.linear_model import BayesianRidge, LogisticRegression
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import varlin
from varlin._io import atomic_write
from varlin.sklearn import VariationalMLPClassifier, VariationalMLPRegressor
from varlin.training import VarlinWarning

Z90 = NormalDist().inv_cdf(0.95)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=200, help="epochs of varlin's models")
    parser.add_argument("--max-rows", type=int, default=None, help="subsample (smoke tests)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (+ .json beside)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# -- the models ---------------------------------------------------------------------------------
def regressors(args: argparse.Namespace, n_features: int) -> dict[str, Callable[[], Any]]:
    seed, epochs = args.seed, args.max_iter
    kernel = ConstantKernel() * RBF(np.ones(n_features)) + WhiteKernel()
    return {
        "varlin VariationalMLPRegressor (50 relu)": lambda: VariationalMLPRegressor(
            max_iter=epochs, random_state=seed
        ),
        "varlin VariationalMLPRegressor (linear)": lambda: VariationalMLPRegressor(
            hidden_layer_sizes=(), max_iter=epochs, random_state=seed
        ),
        "BayesianRidge": lambda: make_pipeline(StandardScaler(), BayesianRidge()),
        "GaussianProcessRegressor (ARD RBF + white)": lambda: make_pipeline(
            StandardScaler(),
            GaussianProcessRegressor(kernel, normalize_y=True, random_state=seed),
        ),
        "MLPRegressor (50 relu)": lambda: make_pipeline(
            StandardScaler(),
            TransformedTargetRegressor(
                MLPRegressor(hidden_layer_sizes=(50,), max_iter=2000, random_state=seed),
                transformer=StandardScaler(),
            ),
        ),
    }


def classifiers(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    seed, epochs = args.seed, args.max_iter
    return {
        "varlin VariationalMLPClassifier (50 relu)": lambda: VariationalMLPClassifier(
            max_iter=epochs, random_state=seed
        ),
        "varlin VariationalMLPClassifier (linear)": lambda: VariationalMLPClassifier(
            hidden_layer_sizes=(), max_iter=epochs, random_state=seed
        ),
        "LogisticRegression": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000)
        ),
        "MLPClassifier (50 relu)": lambda: make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(50,), max_iter=2000, random_state=seed),
        ),
    }


# -- scoring ------------------------------------------------------------------------------------
def score_regression(model: Any, X: np.ndarray, y: np.ndarray, test: np.ndarray) -> dict:
    train = np.setdiff1d(np.arange(len(y)), test)
    started = time.perf_counter()
    model.fit(X[train], y[train])
    seconds = time.perf_counter() - started
    try:
        mean, std = model.predict(X[test], return_std=True)
    except TypeError:  # no predictive spread: the training RMSE as a fixed noise scale
        mean = model.predict(X[test])
        std = np.full_like(mean, np.sqrt(np.mean((model.predict(X[train]) - y[train]) ** 2)))
    m, v, t = (torch.as_tensor(a, dtype=torch.float64) for a in (mean, std**2, y[test]))
    lower, upper = varlin.metrics.gaussian_interval(m, v, 0.9)
    return {
        "nll": float(varlin.metrics.gaussian_nll(m, v, t)),
        "rmse": float(varlin.metrics.rmse(m, t)),
        "coverage_90": float(varlin.metrics.interval_coverage(lower, upper, t)),
        "fit_seconds": seconds,
    }


def score_classification(model: Any, X: np.ndarray, y: np.ndarray, test: np.ndarray) -> dict:
    train = np.setdiff1d(np.arange(len(y)), test)
    started = time.perf_counter()
    model.fit(X[train], y[train])
    seconds = time.perf_counter() - started
    probs = torch.as_tensor(model.predict_proba(X[test]), dtype=torch.float64)
    target = torch.as_tensor(y[test])
    return {
        "nll": float(varlin.metrics.categorical_nll(probs, target)),
        "accuracy": float(varlin.metrics.accuracy(probs, target)),
        "ece": float(varlin.metrics.expected_calibration_error(probs, target)),
        "fit_seconds": seconds,
    }


def evaluate(
    models: dict[str, Callable[[], Any]],
    score: Callable[[Any, np.ndarray, np.ndarray, np.ndarray], dict],
    X: np.ndarray,
    y: np.ndarray,
    splits: list[np.ndarray],
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for test in splits:
        for name, make in models.items():
            for key, value in score(make(), X, y, test).items():
                results[name].setdefault(key, []).append(value)
    return results


# -- report -------------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values)
    return float(a.mean()), float(a.std() / math.sqrt(len(a))) if len(a) > 1 else 0.0


def table(results: dict[str, dict[str, list[float]]], columns: list[tuple[str, str]]) -> str:
    head = "| model | " + " | ".join(label for _, label in columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for name, metrics in results.items():
        cells = []
        for key, _ in columns:
            mean, se = _mean_se(metrics[key])
            cells.append(f"{mean:.2f}" if key == "fit_seconds" else f"{mean:.3f} ± {se:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load(loader: Callable[..., Any], max_rows: int | None, seed: int) -> tuple[np.ndarray, ...]:
    X, y = loader(return_X_y=True)
    if max_rows is not None and max_rows < len(y):
        keep = np.random.default_rng(seed).choice(len(y), max_rows, replace=False)
        X, y = X[keep], y[keep]
    return X, y


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both comparisons; print (and with ``--out`` write) the tables; return the results."""
    args = _parse(argv)
    Xr, yr = _load(load_diabetes, args.max_rows, args.seed)
    Xc, yc = _load(load_breast_cancer, args.max_rows, args.seed)
    reg_splits = [
        test
        for _, test in RepeatedKFold(
            n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed
        ).split(Xr)
    ]
    cls_splits = [
        test
        for _, test in RepeatedStratifiedKFold(
            n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed
        ).split(Xc, yc)
    ]
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Small-data diagnostics of the training loop and lbfgs/Adam iteration limits of the
        # baselines: expected here; the tables show how each model ends up.
        warnings.simplefilter("ignore", VarlinWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = evaluate(regressors(args, Xr.shape[1]), score_regression, Xr, yr, reg_splits)
        cls = evaluate(classifiers(args), score_classification, Xc, yc, cls_splits)
    wall = time.perf_counter() - started

    reg_table = table(
        reg,
        [("nll", "test NLL ↓"), ("rmse", "RMSE ↓"), ("coverage_90", "90% coverage"),
         ("fit_seconds", "fit s")],
    )  # fmt: skip
    cls_table = table(
        cls,
        [("nll", "test NLL ↓"), ("accuracy", "accuracy ↑"), ("ece", "ECE ↓"),
         ("fit_seconds", "fit s")],
    )  # fmt: skip
    command = "python examples/sklearn_comparison.py" + (" " + " ".join(argv) if argv else "")
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        f"Python {platform.python_version()}"
    )
    print("diabetes (regression)\n" + reg_table + "\n")
    print("breast cancer (classification)\n" + cls_table)
    print(f"\n{len(reg_splits)} + {len(cls_splits)} folds in {wall:.0f} s")
    results = {
        "command": command,
        "machine": machine,
        "folds": args.folds,
        "repeats": args.repeats,
        "max_rows": args.max_rows,
        "max_iter": args.max_iter,
        "wall_seconds": wall,
        "regression": reg,
        "classification": cls,
    }
    if args.out is not None:
        write(args.out, results, reg_table, cls_table)
    return results


def write(out: Path, results: dict[str, Any], reg_table: str, cls_table: str) -> None:
    folds = f"{results['folds']} folds x {results['repeats']} repeats"
    text = f"""# scikit-learn estimators: varlin against scikit-learn's own

Produced by `{results["command"]}` ({results["wall_seconds"]:.0f} s wall on {results["machine"]}).
Shuffled K-fold cross-validation, {folds}; every model sees the same folds; mean ± standard
error over the folds. varlin's estimators run with their defaults (50 ReLU units or a linear
model, learned noise) for {results["max_iter"]} epochs; scikit-learn's get a `StandardScaler` on
the inputs. See the docstring of `examples/sklearn_comparison.py` for the protocol.

## Regression: diabetes (442 rows, 10 features)

{reg_table}

- NLL of a Gaussian predictive with the model's mean and standard deviation
  (`predict(X, return_std=True)`). `MLPRegressor` has no predictive spread: it is scored with
  its training-fold RMSE as a fixed noise standard deviation (its target is standardised, and it
  trains for up to 2000 iterations).
- 90% coverage: the fraction of held-out targets inside the central 90% interval.

## Classification: breast cancer (569 rows, 30 features)

{cls_table}

- NLL is the log loss; ECE the expected calibration error of the top label with 15 equal-width
  bins (Guo et al., 2017). `LogisticRegression` runs with `max_iter=1000`, `MLPClassifier` with
  `max_iter=2000`.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as fh:
        fh.write(text)
    with atomic_write(out.with_suffix(".json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves the others free
    main()
