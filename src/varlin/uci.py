r"""The UCI regression benchmark runner: ``varlin uci`` and ``benchmarks/uci.py``.

Runs the protocol of :mod:`varlin.uci_protocol` (configurations, splits, training, scoring) over
datasets: the splits of a dataset in groups on worker processes (one torch thread each), a
progress bar, one JSON entry per dataset (``--out``, written atomically), and the command-line
options. The protocol's names are importable from here too.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _validation as V
from ._io import atomic_write
from .data import UCI_DATASETS, UCIDataset, load_uci
from .errors import CLIError
from .posteriors import FAMILIES
from .uci_gap import GAP_MIN_DISTINCT, gap_splits, linear_reference, prepare_gap_split
from .uci_protocol import (
    _OVERRIDES,
    DEFAULT_CONFIGS,
    FALLBACK_CONFIG,
    SplitArrays,
    SplitResult,
    UCIConfig,
    build_likelihood,
    build_model,
    config_for,
    mean_and_stderr,
    original_units_log_likelihood,
    prepare_split,
    run_group,
    run_split,
    score,
    train_stacked,
)

__all__ = [
    "DEFAULT_CONFIGS",
    "FALLBACK_CONFIG",
    "UCIConfig",
    "SplitArrays",
    "SplitResult",
    "add_arguments",
    "build_model",
    "build_likelihood",
    "config_for",
    "main",
    "main_from_args",
    "mean_and_stderr",
    "original_units_log_likelihood",
    "prepare_split",
    "run_dataset",
    "run_group",
    "run_split",
    "score",
    "train_stacked",
    "write_json_atomic",
]


def _worker_init() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[cf.Executor | None]:
    if workers <= 1:
        yield None
        return
    # spawn: a fresh interpreter per worker, no inherited torch thread pools or locks.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        yield pool


def run_dataset(
    dataset: UCIDataset,
    config: UCIConfig,
    *,
    splits: int | None = None,
    validation: bool = False,
    gap: bool = False,
    gap_min_distinct: int = GAP_MIN_DISTINCT,
    executor: cf.Executor | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol on the first ``splits`` splits of ``dataset``; return its JSON entry.

    Args:
        dataset: The dataset.
        config: Training settings.
        splits: Number of splits (from split 0); default all of them.
        validation: Score a held-out 20 % of each training split instead of the test rows.
        gap: Run the gap protocol (:mod:`varlin.uci_gap`) instead of the standard splits: one
            split per input dimension with at least ``gap_min_distinct`` distinct values, each
            also scored by the exact linear reference (``"gap"`` in the entry).
        gap_min_distinct: Least number of distinct values of a dimension split by ``gap``.
        executor: Runs the splits in parallel if given (each worker with one torch thread).
        workers: Number of groups the splits are divided into for ``executor``.
        progress: Show a progress bar over the splits.

    Returns:
        ``{"test_ll": [mean, stderr], "rmse": [mean, stderr], "splits": k, "epochs": e,
        "seconds": t, "config": {...}, ...}``, in original units.
    """
    if gap and validation:
        raise ValueError(
            "gap=True and validation=True cannot be combined: the gap protocol "
            "scores the middle third of each dimension, not a validation carve-out"
        )
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if gap:
        chosen, skipped = gap_splits(dataset.X, min_distinct=gap_min_distinct)
        if not chosen:
            raise ValueError(
                f"{dataset.name}: no input dimension has at least {gap_min_distinct} distinct "
                "values, so there is no gap split"
            )
        chosen = chosen[:splits]
        arrays = [prepare_gap_split(dataset, s) for s in chosen]
        linear = [linear_reference(a) for a in arrays]
        extra["gap"] = {
            "dimensions": [s.dimension for s in chosen],
            "skipped": {str(d): n for d, n in skipped.items()},
            "min_distinct": gap_min_distinct,
            "train_rows": int(chosen[0].train.size),
            "test_rows": int(chosen[0].test.size),
            "linear_test_ll": [ll for ll, _ in linear],
            "linear_rmse": [rmse for _, rmse in linear],
        }
    else:
        k = dataset.n_splits if splits is None else min(splits, dataset.n_splits)
        arrays = [
            prepare_split(dataset, i, validation=validation, seed=config.seed) for i in range(k)
        ]
    k = len(arrays)
    results: list[SplitResult] = []
    bar = tqdm(total=k, desc=dataset.name, disable=not progress, unit="split", leave=True)
    try:
        if executor is None:
            for group in _groups(arrays, config, 1):
                results.extend(run_group(group, config))
                _update(bar, results, len(group))
        else:
            futures = [
                executor.submit(run_group, group, config)
                for group in _groups(arrays, config, workers)
            ]
            for future in cf.as_completed(futures):
                done = future.result()
                results.extend(done)
                _update(bar, results, len(done))
    finally:
        bar.close()
    results.sort(key=lambda r: r.index)  # split number, or the dimension of a gap split
    lls = [r.log_likelihood for r in results]
    rmses = [r.rmse for r in results]
    notes = sorted({f"split {r.index}: {w}" for r in results for w in r.warnings})
    return {
        "test_ll": mean_and_stderr(lls),
        "rmse": mean_and_stderr(rmses),
        "splits": k,
        "epochs": config.epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "config": config.to_dict(),
        "evaluated_on": (
            "validation: 20% of each training split (test rows unused)"
            if validation
            else "gap: the middle third along each dimension"
            if gap
            else "test"
        ),
        "per_split": {
            "test_ll": lls,
            "rmse": rmses,
            "seconds": [round(r.seconds, 2) for r in results],
            "noise_std": [r.noise for r in results],
            **(
                {"prior_scales": [r.prior_scales for r in results]}
                if any(r.prior_scales for r in results)
                else {}
            ),
        },
        "diagnostics": notes,
        **extra,
    }


def _groups(arrays: list[SplitArrays], config: UCIConfig, workers: int) -> list[list[SplitArrays]]:
    """Splits per task: one each for ``fit``; for ``stacked``, as many groups as workers."""
    if config.trainer == "fit":
        return [[a] for a in arrays]
    by_shape: dict[tuple[int, ...], list[SplitArrays]] = {}
    for a in arrays:
        by_shape.setdefault(a.X_train.shape, []).append(a)
    groups: list[list[SplitArrays]] = []
    for same in by_shape.values():
        n = min(workers, len(same))
        groups.extend(same[i::n] for i in range(n))
    return groups


def _update(bar: Any, results: list[SplitResult], n: int) -> None:
    bar.update(n)
    bar.set_postfix(
        ll=f"{np.mean([r.log_likelihood for r in results]):.3f}",
        rmse=f"{np.mean([r.rmse for r in results]):.3f}",
    )


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``varlin uci`` (and ``benchmarks/uci.py``) to ``parser``."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name or alias (boston, concrete, energy, kin8nm, naval, power, protein, "
        "wine, yacht), a folder in --data-dir, or 'all' for the nine",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="root of a local copy in the UCI layout (default: download into the cache)",
    )
    parser.add_argument(
        "--splits",
        type=V.arg_positive_int,
        default=None,
        help="use the first K splits (default all)",
    )
    parser.add_argument(
        "--estimator", choices=["reparameterization", "local", "flipout"], default="local"
    )
    parser.add_argument(
        "--posterior",
        choices=tuple(FAMILIES),
        default=None,
        help="variational family of the weights (default meanfield; lowrank needs --rank)",
    )
    parser.add_argument(
        "--rank", type=V.arg_positive_int, default=None, help="rank of --posterior lowrank"
    )
    parser.add_argument(
        "--likelihood", choices=["homoscedastic", "heteroscedastic"], default="homoscedastic"
    )
    parser.add_argument(
        "--epochs", type=V.arg_positive_int, default=None, help="override the per-dataset epochs"
    )
    parser.add_argument("--batch-size", type=V.arg_positive_int, default=None)
    parser.add_argument("--lr", type=V.arg_positive_float, default=None)
    parser.add_argument("--init-scale", type=V.arg_positive_float, default=None)
    parser.add_argument(
        "--prior-scale",
        type=V.arg_positive_float,
        default=None,
        help="prior standard deviation (with --prior empirical, where the learned scales start)",
    )
    parser.add_argument(
        "--prior",
        choices=["fixed", "empirical"],
        default=None,
        help="fixed (default): the prior scale is --prior-scale; empirical: empirical Bayes, "
        "each layer's weight and bias prior scales learned by the ELBO (as MCVI)",
    )
    parser.add_argument(
        "--noise-init", type=V.arg_positive_float, default=None, help="standardised units"
    )
    parser.add_argument(
        "--test-samples", type=V.arg_positive_int, default=None, help="posterior samples S"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--trainer",
        choices=["stacked", "fit"],
        default=None,
        help="stacked (default): the splits of a worker train together as one batch of "
        "independent models; fit: varlin.fit per split (the reference route, slower)",
    )
    parser.add_argument(
        "--method",
        choices=["mc", "moments"],
        default=None,
        help="mc (default): Monte Carlo ELBO and predictive; moments: moment propagation for "
        "both (fit and predict with method='moments')",
    )
    parser.add_argument(
        "--covariance",
        choices=["diagonal", "full"],
        default=None,
        help="with --method moments: the activations' covariance (default diagonal)",
    )
    parser.add_argument(
        "--workers", type=V.arg_positive_int, default=1, help="parallel processes, one thread each"
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="hyper-parameter search mode: hold out 20%% of each training split and score it; "
        "the test rows are not used",
    )
    parser.add_argument(
        "--gap",
        action="store_true",
        help="the gap protocol (Foong et al. 2019): one split per input dimension, rows sorted "
        "by it, train on the outer two thirds, test on the middle third; each split is also "
        "scored by exact Bayesian linear regression (prior and noise by the evidence)",
    )
    parser.add_argument(
        "--gap-min-distinct",
        type=V.arg_positive_int,
        default=GAP_MIN_DISTINCT,
        help="with --gap, skip a dimension with fewer distinct values than this (default "
        f"{GAP_MIN_DISTINCT}: binary and constant columns have no middle third)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file of results, written atomically after every dataset; entries of other "
        "datasets already in it are kept",
    )
    parser.add_argument("--no-progress", action="store_true")


def _dataset_names(spec: str) -> list[str]:
    return list(UCI_DATASETS) if spec.lower() == "all" else [spec]


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``varlin uci`` with parsed ``args``; print a summary line per dataset; return 0."""
    torch.set_num_threads(1)
    gap = bool(getattr(args, "gap", False))
    if gap and args.validation:
        raise CLIError(
            "--gap and --validation cannot be combined: --gap scores the middle third of each "
            "input dimension, --validation a carve-out of the standard training splits"
        )
    overrides = {name: getattr(args, name, None) for name in _OVERRIDES}
    if overrides["covariance"] not in (None, "diagonal") and overrides["method"] != "moments":
        raise CLIError(f"--covariance {overrides['covariance']} applies only to --method moments")
    results: dict[str, Any] = {}
    if args.out is not None and Path(args.out).is_file():
        with contextlib.suppress(ValueError, OSError):
            existing = json.loads(Path(args.out).read_text())
            if isinstance(existing, dict):
                results.update(existing)
    try:
        datasets = [
            load_uci(name, data_dir=args.data_dir) for name in _dataset_names(str(args.dataset))
        ]
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    with _executor(args.workers) as pool:
        for dataset in datasets:
            config = config_for(dataset, **overrides)
            try:  # a family option the layers refuse fails here, not in a worker process
                build_model(dataset.X.shape[1], config)
            except ValueError as exc:
                raise CLIError(f"--posterior {config.posterior}: {exc}") from None
            try:
                entry = run_dataset(
                    dataset,
                    config,
                    splits=args.splits,
                    validation=args.validation,
                    gap=gap,
                    gap_min_distinct=getattr(args, "gap_min_distinct", GAP_MIN_DISTINCT),
                    executor=pool,
                    workers=args.workers,
                    progress=not args.no_progress,
                )
            except ValueError as exc:  # e.g. --gap on a dataset without a dimension to split
                raise CLIError(str(exc)) from None
            results[dataset.name] = entry
            if args.out is not None:
                write_json_atomic(args.out, results)
            ll, rmse = entry["test_ll"], entry["rmse"]
            what = "val" if args.validation else "gap" if gap else "test"
            linear = ""
            if gap:
                ref = mean_and_stderr(entry["gap"]["linear_test_ll"])
                linear = f"; linear model LL {ref[0]:.3f} ± {ref[1]:.3f}"
            print(
                f"{dataset.name}: {what} LL {ll[0]:.3f} ± {ll[1]:.3f}, RMSE {rmse[0]:.3f} ± "
                f"{rmse[1]:.3f}{linear} ({entry['splits']} splits, {config.epochs} epochs, "
                f"{config.likelihood}, {config.prior} prior, {entry['seconds']:.0f} s)",
                flush=True,
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/uci.py``: the options of ``varlin uci``."""
    parser = argparse.ArgumentParser(prog="uci", description="The UCI regression benchmark.")
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
