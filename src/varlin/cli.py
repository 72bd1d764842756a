"""The ``varlin`` command line: ``demo``, ``fit``, ``predict``, ``uci``, ``bench``.

Every failure the user can cause (a missing file, a bad column, a non-finite value, a damaged
model file) ends with one line ``varlin: error: ...`` on stderr and exit status 1, without a
traceback and without leaving a partial output file: outputs are written to a temporary file and
renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import os
import runpy
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .layers import VariationalLinear
from .likelihoods import Categorical, Gaussian, HeteroscedasticGaussian, Likelihood
from .predictive import ClassificationPrediction, RegressionPrediction, predict
from .training import CheckpointError, fit, load_checkpoint, save_checkpoint

__all__ = ["main", "build_mlp", "load_model_file"]

MODEL_KIND = "varlin-mlp"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# -- CSV --------------------------------------------------------------------------------------
def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file, with clear errors for missing, empty or ragged files."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CLIError(f"{path}: cannot read it as CSV ({exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise CLIError(f"{path}: the file is empty (a header row is required)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise CLIError(f"{path}: duplicate column names in the header: {header}")
    body = rows[1:]
    if not body:
        raise CLIError(f"{path}: the file has a header but no data rows")
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise CLIError(f"{path}: line {i} has {len(row)} fields, the header has {len(header)}")
    return header, body


def numeric_column(path: str, name: str, cells: Sequence[str]) -> list[float]:
    values = []
    for line, cell in enumerate(cells, start=2):
        try:
            value = float(cell)
        except ValueError:
            raise CLIError(
                f"{path}: column {name!r}, line {line}: {cell!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise CLIError(f"{path}: column {name!r}, line {line}: value {cell!r} is not finite")
        values.append(value)
    return values


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise CLIError(f"{path}: the folder {str(target.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# -- models -----------------------------------------------------------------------------------
def build_mlp(d_in: int, d_out: int, *, hidden: int, depth: int, estimator: str) -> nn.Sequential:
    """A ReLU MLP of ``depth`` hidden layers of ``hidden`` units, every layer variational."""
    sizes = [d_in] + [hidden] * depth + [d_out]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        modules.append(VariationalLinear(a, b, estimator=estimator))  # type: ignore[arg-type]
        if i < len(sizes) - 2:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def _likelihood(spec: dict[str, Any]) -> Likelihood:
    if spec["task"] == "classification":
        return Categorical()
    if spec["likelihood"] == "heteroscedastic":
        return HeteroscedasticGaussian()
    return Gaussian(1.0, learn_noise=True)


def load_model_file(path: str) -> tuple[dict[str, Any], nn.Module, Likelihood]:
    """Read a model file written by ``varlin fit`` and rebuild its model and likelihood."""
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such model file") from None
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    spec = state.get("spec")
    if state.get("kind") != MODEL_KIND or not isinstance(spec, dict):
        raise CLIError(f"{path}: not a model file written by 'varlin fit'")
    model = build_mlp(
        len(spec["features"]),
        spec["outputs"],
        hidden=spec["hidden"],
        depth=spec["depth"],
        estimator=spec["estimator"],
    )
    likelihood = _likelihood(spec)
    for what, module in (("model", model), ("likelihood", likelihood)):
        try:
            module.load_state_dict(state[what])
        except (RuntimeError, KeyError) as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
            raise CLIError(
                f"{path}: the stored {what} does not match the architecture it declares "
                f"({len(spec['features'])} inputs, depth {spec['depth']}, hidden {spec['hidden']}, "
                f"{spec['outputs']} outputs): {detail}"
            ) from None
    return spec, model, likelihood


# -- commands ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, scale=args.scale, progress=not args.no_progress)
    return 0


def _infer_task(values: list[str]) -> str:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return "classification"
    distinct = set(numbers)
    if all(float(v).is_integer() for v in distinct) and len(distinct) <= 10:
        return "classification"
    return "regression"


def cmd_fit(args: argparse.Namespace) -> int:
    header, rows = read_csv(args.data)
    if args.target not in header:
        raise CLIError(
            f"{args.data}: target column {args.target!r} not found (columns: {', '.join(header)})"
        )
    features = [h for h in header if h != args.target]
    if not features:
        raise CLIError(f"{args.data}: no feature columns besides the target {args.target!r}")
    columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    X = torch.tensor(
        [numeric_column(args.data, f, columns[f]) for f in features], dtype=torch.float32
    ).T
    raw_target = [c.strip() for c in columns[args.target]]
    task = args.task if args.task != "auto" else _infer_task(raw_target)
    spec: dict[str, Any] = {
        "version": __version__,
        "features": features,
        "target": args.target,
        "task": task,
        "hidden": args.hidden,
        "depth": args.depth,
        "estimator": args.estimator,
        "likelihood": args.likelihood,
    }
    x_mean, x_std = X.mean(0), X.std(0, unbiased=False)
    x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
    Xs = (X - x_mean) / x_std
    if task == "classification":
        classes = sorted(set(raw_target), key=lambda v: (_as_float(v), v))
        if len(classes) < 2:
            raise CLIError(f"{args.data}: target {args.target!r} has a single class {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in raw_target])
        spec.update(classes=classes, outputs=len(classes), y_mean=0.0, y_std=1.0)
    else:
        y_raw = torch.tensor(numeric_column(args.data, args.target, raw_target))
        y_mean, y_std = float(y_raw.mean()), float(y_raw.std(unbiased=False)) or 1.0
        y = (y_raw - y_mean) / y_std
        outputs = 2 if args.likelihood == "heteroscedastic" else 1
        spec.update(classes=[], outputs=outputs, y_mean=y_mean, y_std=y_std)
    spec.update(x_mean=x_mean.tolist(), x_std=x_std.tolist())

    torch.manual_seed(args.seed)
    model = build_mlp(
        len(features),
        spec["outputs"],
        hidden=args.hidden,
        depth=args.depth,
        estimator=args.estimator,
    )
    likelihood = _likelihood(spec)
    history = fit(
        model, Xs, y, likelihood=likelihood, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    last = history.records[-1]
    with atomic_path(args.out) as tmp:
        save_checkpoint(
            tmp,
            {
                "kind": MODEL_KIND,
                "spec": spec,
                "model": model.state_dict(),
                "likelihood": likelihood.state_dict(),
            },
        )
    print(
        f"fitted a {task} model on {len(rows)} rows x {len(features)} features "
        f"({args.epochs} epochs, final loss {last['loss']:.4f}); wrote {args.out}"
    )
    return 0


def _as_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.inf


def cmd_predict(args: argparse.Namespace) -> int:
    spec, model, likelihood = load_model_file(args.model)
    header, rows = read_csv(args.data)
    missing = [f for f in spec["features"] if f not in header]
    if missing:
        raise CLIError(
            f"{args.data}: columns {missing} are missing; the model was fitted on "
            f"{spec['features']}"
        )
    columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    X = torch.tensor(
        [numeric_column(args.data, f, columns[f]) for f in spec["features"]], dtype=torch.float32
    ).T
    Xs = (X - torch.tensor(spec["x_mean"])) / torch.tensor(spec["x_std"])
    torch.manual_seed(args.seed)
    pred = predict(model, Xs, num_samples=args.num_samples, likelihood=likelihood)
    out_header = list(header)
    out_rows = [list(r) for r in rows]
    if isinstance(pred, RegressionPrediction):
        scale = spec["y_std"]
        lower, upper = pred.interval(args.level)
        pct = f"{args.level * 100:g}"
        cols = {
            "mean": pred.mean * scale + spec["y_mean"],
            "std": pred.std * scale,
            "epistemic_std": pred.epistemic.sqrt() * scale,
            "aleatoric_std": pred.aleatoric.sqrt() * scale,
            f"lower_{pct}": lower * scale + spec["y_mean"],
            f"upper_{pct}": upper * scale + spec["y_mean"],
        }
    else:
        assert isinstance(pred, ClassificationPrediction)
        classes = spec["classes"]
        cols = {f"p_{c}": pred.probs[:, i] for i, c in enumerate(classes)}
        cols["entropy"] = pred.entropy
        cols["mutual_information"] = pred.mutual_information
    out_header += [f"{'pred_' if name in header else ''}{name}" for name in cols]
    if isinstance(pred, ClassificationPrediction):
        out_header.append("predicted")
    for i, row in enumerate(out_rows):
        row.extend(f"{float(v[i]):.6g}" for v in cols.values())
        if isinstance(pred, ClassificationPrediction):
            row.append(spec["classes"][int(pred.classes[i])])
    with atomic_path(args.out) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(out_header)
        writer.writerows(out_rows)
    print(f"wrote {len(out_rows)} predictions to {args.out}")
    return 0


def cmd_uci(args: argparse.Namespace) -> int:
    uci = importlib.import_module("varlin.uci")
    return int(uci.main_from_args(args))


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
    if not script.is_file():
        raise CLIError("varlin bench runs from a source checkout (benchmarks/speed.py not found)")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varlin", description="Variational linear methods for approximating posteriors."
    )
    parser.add_argument("--version", action="version", version=f"varlin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on embedded data; print metrics; write figures")
    p.add_argument("--out", default="varlin-demo", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="training length multiplier")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="fit a variational MLP to a CSV file")
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument("--target", required=True, help="name of the target column")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--task", choices=["auto", "regression", "classification"], default="auto")
    p.add_argument(
        "--likelihood", choices=["homoscedastic", "heteroscedastic"], default="homoscedastic"
    )
    p.add_argument(
        "--estimator", choices=["reparameterization", "local", "flipout"], default="local"
    )
    p.add_argument("--hidden", type=_positive_int, default=50)
    p.add_argument("--depth", type=_positive_int, default=1, help="number of hidden layers")
    p.add_argument("--epochs", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_positive_float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="predict with a model file; write a CSV")
    p.add_argument("model", help="model file written by 'varlin fit'")
    p.add_argument("data", help="CSV file with the model's feature columns")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--num-samples", type=_positive_int, default=256)
    p.add_argument("--level", type=_level, default=0.9, help="interval level in (0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("uci", help="the UCI regression benchmark")
    with contextlib.suppress(ImportError):  # the runner lives in varlin.uci
        importlib.import_module("varlin.uci").add_arguments(p)
    p.set_defaults(func=cmd_uci)

    p = sub.add_parser("bench", help="speed benchmark side by side with peers")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/speed.py")
    p.set_defaults(func=cmd_bench)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _level(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``varlin`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"varlin: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("varlin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
