"""The ``varlin`` command line: ``demo``, ``fit``, ``predict``, ``uci``, ``bench``.

Every failure the user can cause (a missing file, a bad column, a non-finite value, a damaged
model file, a missing output folder) ends with one line ``varlin: error: ...`` on stderr and exit
status 1, without a traceback and without leaving a partial output file: outputs are written to a
temporary file beside the target and renamed into place only once complete.

``varlin fit DATA.csv --target COLUMN --out MODEL`` fits a variational MLP and writes a
self-describing model file (architecture, standardisation statistics, class labels, varlin
version). ``varlin predict MODEL DATA.csv --out PREDICTIONS.csv`` appends prediction columns to the
rows of ``DATA.csv``:

- regression: ``mean``, ``std`` (total), ``epistemic_std``, ``aleatoric_std``, ``lower_<L>``,
  ``upper_<L>`` (the central ``L``% interval, ``--level``);
- classification: ``p_<class>`` for every class, ``entropy`` (total uncertainty, nats),
  ``mutual_information`` (its epistemic part) and ``predicted`` (the most probable class).

A new column whose name is already taken (by a column of ``DATA.csv`` or another new column)
gets the prefix ``pred_``, repeated until the name is unique.

This module is the command line (the parser, one function per command, the exit statuses); the
files the commands read and write (CSV tables, model files, output paths) are handled in
:mod:`varlin.cli_files`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import runpy
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from . import _validation as V
from .checkpoints import save_checkpoint
from .cli_files import (
    AUTO_MAX_CLASSES,
    ESTIMATORS,
    LIKELIHOODS,
    POSTERIORS,
    TASKS,
    atomic_path,
    build_mlp,
    check_output_path,
    fit_table,
    load_model_file,
    model_file_state,
    model_likelihood,
    predict_table,
    prediction_columns,
    write_predictions,
)
from .errors import CLIError, NonFiniteLossError
from .predictive import RegressionPrediction, predict
from .training import fit

__all__ = ["main", "build_parser", "build_mlp", "load_model_file", "CLIError"]

#: Rows predicted per batch: bounds the memory of ``num_samples x rows x hidden`` activations.
PREDICT_CHUNK = 1024


# -- commands ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from . import plots

        plots.require_matplotlib()
    except ImportError as exc:  # matplotlib is an optional extra
        raise CLIError(str(exc).splitlines()[0]) from None
    from .demo import run_demo

    try:  # before any training: a bad --out must not cost a run
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{args.out}: cannot create the folder ({exc.strerror or exc})") from None
    run_demo(args.out, seed=args.seed, scale=args.scale, progress=not args.no_progress)
    return 0


def _warnings_to_stderr(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        text = " ".join(str(w.message).split())
        print(f"varlin: warning: {text}", file=sys.stderr)


def _check_method(args: argparse.Namespace) -> None:
    """``--covariance`` other than diagonal only with ``--method moments``."""
    if args.covariance != "diagonal" and args.method != "moments":
        raise CLIError(f"--covariance {args.covariance} applies only to --method moments")


def cmd_fit(args: argparse.Namespace) -> int:
    check_output_path(args.out)  # before any work: a typo in --out must not cost a training run
    _check_method(args)
    spec, x, y, rows = fit_table(
        args.data,
        args.target,
        args.task,
        likelihood=args.likelihood,
        hidden=args.hidden,
        depth=args.depth,
        estimator=args.estimator,
        posterior=args.posterior,
        rank=args.rank,
    )
    torch.manual_seed(args.seed)
    try:
        model = build_mlp(
            len(spec["features"]),
            spec["outputs"],
            hidden=args.hidden,
            depth=args.depth,
            estimator=args.estimator,
            posterior=args.posterior,
            rank=args.rank,
        )
    except ValueError as exc:  # a family option that this network's layers cannot take
        raise CLIError(f"--posterior {args.posterior}: {exc}") from None
    likelihood = model_likelihood(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            history = fit(
                model, x, y, likelihood=likelihood, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                progress=not args.no_progress, method=args.method, covariance=args.covariance,
            )  # fmt: skip
        except NonFiniteLossError as exc:
            raise CLIError(f"training diverged: {str(exc).splitlines()[0]}") from None
    _warnings_to_stderr(caught)
    last = history.records[-1]
    with atomic_path(args.out) as tmp:
        save_checkpoint(tmp, model_file_state(spec, model, likelihood))
    print(
        f"fitted a {spec['task']} model on {rows} rows x {len(spec['features'])} features "
        f"({args.epochs} epochs, final loss {last['loss']:.4f}); wrote {args.out}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    check_output_path(args.out)
    _check_method(args)
    spec, model, likelihood = load_model_file(args.model)
    header, rows, x = predict_table(args.data, spec)
    torch.manual_seed(args.seed)
    pred = predict(
        model, x, num_samples=args.num_samples, likelihood=likelihood, batch_size=PREDICT_CHUNK,
        method=args.method, covariance=args.covariance,
    )  # fmt: skip
    summary = pred.mean if isinstance(pred, RegressionPrediction) else pred.probs
    if not bool(torch.isfinite(summary).all()):
        raise CLIError(f"{args.model}: the model predicts non-finite values on {args.data}")
    write_predictions(args.out, header, rows, prediction_columns(pred, spec, args.level))
    print(f"wrote {len(rows)} predictions ({spec['task']}) to {args.out}")
    return 0


def cmd_uci(args: argparse.Namespace) -> int:
    try:
        uci = importlib.import_module("varlin.uci")
    except ImportError:
        raise CLIError(
            "the UCI benchmark runner (varlin.uci) is not installed in this version"
        ) from None
    return int(uci.main_from_args(args))


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
    if not script.is_file():
        raise CLIError(
            "the speed benchmark is not part of the installed package: run 'make bench' (or "
            "'python benchmarks/speed.py') in a checkout of varlin's source repository"
        )
    saved = sys.argv
    sys.argv = [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


_PREDICT_EPILOG = """\
columns appended to the rows of DATA:
  regression:      mean, std, epistemic_std, aleatoric_std, lower_<L>, upper_<L>
                   (standard deviations split by the law of total variance; the central L%
                   interval of --level)
  classification:  p_<class> for each class, entropy, mutual_information, predicted
a new column whose name is already taken gets the prefix pred_ (repeated until unique)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varlin", description="Variational linear methods for approximating posteriors."
    )
    parser.add_argument("--version", action="version", version=f"varlin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on embedded data; print metrics; write figures")
    p.add_argument("--out", default="varlin-demo", help="folder for the figures (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale", type=V.arg_positive_float, default=1.0, help="training length multiplier"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "fit",
        help="fit a variational MLP to a CSV file",
        description="Fit a variational MLP (every layer variational) to a CSV file with a header "
        "row and write a self-describing model file. Features and regression targets are "
        "standardised; the statistics are stored in the model file.",
    )
    p.add_argument(
        "data", help="CSV file with a header row; every column but the target is a feature"
    )
    p.add_argument("--target", required=True, help="name of the target column")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument(
        "--task",
        choices=["auto", *TASKS],
        default="auto",
        help=f"auto: classification if the target is text or has at most {AUTO_MAX_CLASSES} "
        "integer values, else regression",
    )
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default="homoscedastic",
        help="regression noise: one learned scale, or a scale predicted per row",
    )
    p.add_argument("--estimator", choices=ESTIMATORS, default="local")
    p.add_argument(
        "--posterior", choices=POSTERIORS, default="meanfield",
        help="variational family of every layer (lowrank needs --rank)",
    )  # fmt: skip
    p.add_argument(
        "--rank", type=V.arg_positive_int, default=None, help="rank of --posterior lowrank"
    )
    p.add_argument("--hidden", type=V.arg_positive_int, default=50, help="units per hidden layer")
    p.add_argument("--depth", type=V.arg_positive_int, default=1, help="number of hidden layers")
    p.add_argument("--epochs", type=V.arg_positive_int, default=200)
    p.add_argument("--batch-size", type=V.arg_positive_int, default=32)
    p.add_argument("--lr", type=V.arg_positive_float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--method", choices=["mc", "moments"], default="mc",
        help="mc: Monte Carlo ELBO; moments: the deterministic ELBO of moment propagation",
    )  # fmt: skip
    p.add_argument(
        "--covariance", choices=["diagonal", "full"], default="diagonal",
        help="with --method moments: the activations' covariance",
    )  # fmt: skip
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "predict",
        help="predict with a model file; write a CSV",
        description="Predict with a model file written by 'varlin fit'; write DATA's rows with "
        "the prediction columns appended.",
        epilog=_PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model file written by 'varlin fit'")
    p.add_argument("data", help="CSV file with the model's feature columns (others are kept)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--num-samples", type=V.arg_positive_int, default=256, help="posterior samples")
    p.add_argument("--level", type=_level, default=0.9, help="interval level in (0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--method", choices=["auto", "mc", "moments"], default="auto",
        help="auto: closed form where it applies, else Monte Carlo; moments: moment "
        "propagation, no weight sampled",
    )  # fmt: skip
    p.add_argument(
        "--covariance", choices=["diagonal", "full"], default="diagonal",
        help="with --method moments: the activations' covariance",
    )  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("uci", help="the UCI regression benchmark")
    with contextlib.suppress(ImportError):  # the runner lives in varlin.uci
        importlib.import_module("varlin.uci").add_arguments(p)
    p.set_defaults(func=cmd_uci)

    p = sub.add_parser("bench", help="speed benchmark side by side with peers")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/speed.py")
    p.set_defaults(func=cmd_bench)
    return parser


def _level(text: str) -> float:
    value = V.arg_positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``varlin`` console script; returns the exit status.

    Usage errors (argparse) exit with status 2; every other user error prints one line
    ``varlin: error: ...`` and returns 1.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to benchmarks/speed.py, options included (argparse's
        # REMAINDER would reject a leading option such as --quick).
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"varlin: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a disk full, a permission denied: the environment, not a bug
        print(f"varlin: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("varlin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
