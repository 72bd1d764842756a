"""The files of ``varlin fit`` and ``varlin predict``: CSV tables, model files, output paths.

- CSV tables: :func:`read_csv` with one-line errors for every malformed file, numeric columns
  that name a bad cell, the task of a target column (``--task auto``) and its class labels;
  :func:`fit_table` turns a table into a model description and standardised tensors,
  :func:`predict_table` a table into the inputs of a stored model, :func:`write_predictions`
  writes the rows back with the prediction columns appended.
- Model files: :func:`build_mlp`, the file's self-description (:func:`model_file_state`) and
  :func:`load_model_file`, which rebuilds the model and refuses a file that does not hold what
  it declares.
- Output paths: :func:`check_output_path` fails before any work; :func:`atomic_path` writes a
  file completely or not at all.

Every user error is a :class:`~varlin.errors.CLIError`, printed by :mod:`varlin.cli` as one line.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, _io
from .checkpoints import load_checkpoint
from .errors import CheckpointError, CLIError
from .layers import VariationalLinear
from .likelihoods import Categorical, Gaussian, HeteroscedasticGaussian, Likelihood
from .posteriors import FAMILIES
from .predictive import ClassificationPrediction, RegressionPrediction

__all__ = [
    "AUTO_MAX_CLASSES",
    "ESTIMATORS",
    "LIKELIHOODS",
    "MODEL_KIND",
    "POSTERIORS",
    "TASKS",
    "atomic_path",
    "build_mlp",
    "check_output_path",
    "fit_table",
    "load_model_file",
    "model_file_state",
    "model_likelihood",
    "numeric_column",
    "prediction_columns",
    "predict_table",
    "read_csv",
    "write_predictions",
]

MODEL_KIND = "varlin-mlp"
TASKS = ("regression", "classification")
ESTIMATORS = ("reparameterization", "local", "flipout")
POSTERIORS = tuple(FAMILIES)
LIKELIHOODS = ("homoscedastic", "heteroscedastic")
#: With ``--task auto``, an integer-valued target with at most this many values is a class label.
AUTO_MAX_CLASSES = 10


# -- CSV --------------------------------------------------------------------------------------
def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file, with clear errors for missing, empty or ragged files."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{path}: is a folder, not a CSV file")
    if not p.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) must not stick to the first column.
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CLIError(f"{path}: cannot read it as a UTF-8 CSV file ({exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise CLIError(f"{path}: the file is empty (a header row and data rows are required)")
    header = [h.strip() for h in rows[0]]
    if len(header) == 1 and ";" in header[0]:
        # One column named "a;b;c": a semicolon-separated export (common where the decimal
        # separator is a comma), which the comma reader would only report indirectly.
        raise CLIError(
            f"{path}: the file looks semicolon-separated (header {rows[0][0]!r}); varlin reads "
            "comma-separated files: save it with commas as separators"
        )
    if any(not h for h in header):
        raise CLIError(f"{path}: the header has an empty column name: {rows[0]}")
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise CLIError(f"{path}: duplicate column names in the header: {dupes}")
    body = rows[1:]
    if not body:
        raise CLIError(f"{path}: the file has a header but no data rows")
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise CLIError(
                f"{path}: data row {i - 1} has {len(row)} fields, the header has {len(header)}"
            )
    return header, body


def numeric_column(path: str, name: str, cells: Sequence[str]) -> list[float]:
    """The cells of one column as finite floats, or a one-line error naming the bad cell."""
    values = []
    for row, cell in enumerate(cells, start=1):
        text = cell.strip()
        if not text:
            raise CLIError(f"{path}: column {name!r}, data row {row}: empty value")
        try:
            value = float(text)
        except ValueError:
            raise CLIError(
                f"{path}: column {name!r}, data row {row}: {cell!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise CLIError(
                f"{path}: column {name!r}, data row {row}: {cell!r} is not a finite number "
                "(NaN and infinite values are not allowed)"
            )
        values.append(value)
    return values


def _feature_matrix(path: str, names: Sequence[str], columns: dict[str, list[str]]) -> torch.Tensor:
    """The named columns as a float64 ``(rows, len(names))`` tensor of finite values."""
    data = [numeric_column(path, name, columns[name]) for name in names]
    return torch.tensor(data, dtype=torch.float64).T.contiguous()


def _to_float32(path: str, what: str, values: torch.Tensor) -> torch.Tensor:
    """Cast to float32, refusing values that overflow it (finite in float64, inf in float32)."""
    out = values.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise CLIError(
            f"{path}: {what} holds values too large for float32 after standardisation "
            f"(largest magnitude {float(values.abs().max()):.3g}); rescale the column"
        )
    return out


# -- output files -----------------------------------------------------------------------------
def check_output_path(path: str) -> Path:
    """Fail early (before any work) if ``path`` cannot be written as a file."""
    target = Path(path)
    parent = target.parent
    if not parent.exists():
        raise CLIError(f"{path}: the folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{path}: {str(parent)!r} is not a folder")
    if target.is_dir():
        raise CLIError(f"{path}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{path}: the folder {str(parent)!r} is not writable")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    On any error inside the block the temporary file is removed and ``path`` is untouched
    (:func:`varlin._io.atomic_path`); errors of the file system become one-line CLI errors.
    """
    target = check_output_path(str(path))
    try:
        with _io.atomic_path(target) as tmp:
            yield tmp
    except OSError as exc:
        raise CLIError(f"{path}: cannot write the file ({exc})") from None


# -- models -----------------------------------------------------------------------------------
def build_mlp(
    d_in: int,
    d_out: int,
    *,
    hidden: int,
    depth: int,
    estimator: str,
    posterior: str = "meanfield",
    rank: int | None = None,
) -> nn.Sequential:
    """A ReLU MLP of ``depth`` hidden layers of ``hidden`` units, every layer variational."""
    sizes = [d_in] + [hidden] * depth + [d_out]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        family: dict[str, Any] = {"posterior": posterior, "rank": rank}
        modules.append(VariationalLinear(a, b, estimator=estimator, **family))  # type: ignore[arg-type]
        if i < len(sizes) - 2:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def model_likelihood(spec: dict[str, Any]) -> Likelihood:
    """The likelihood a model file's description calls for."""
    if spec["task"] == "classification":
        return Categorical()
    if spec["likelihood"] == "heteroscedastic":
        return HeteroscedasticGaussian()
    return Gaussian(1.0, learn_noise=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
    )


def _spec_problem(spec: dict[str, Any]) -> str | None:
    """What is wrong with a model file's spec, or ``None`` if it is consistent."""
    required = (
        "version", "features", "target", "task", "hidden", "depth", "estimator", "likelihood",
        "outputs", "classes", "x_mean", "x_std", "y_mean", "y_std",
    )  # fmt: skip
    missing = [k for k in required if k not in spec]
    if missing:
        return f"it lacks {', '.join(missing)}"
    features = spec["features"]
    if not (isinstance(features, list) and features and all(isinstance(f, str) for f in features)):
        return f"'features' must be a non-empty list of column names, got {features!r}"
    if spec["task"] not in TASKS:
        return f"'task' must be one of {TASKS}, got {spec['task']!r}"
    if spec["estimator"] not in ESTIMATORS:
        return f"'estimator' must be one of {ESTIMATORS}, got {spec['estimator']!r}"
    # 'posterior' and 'rank' are absent from files written before the posterior families.
    if spec.get("posterior", "meanfield") not in POSTERIORS:
        return f"'posterior' must be one of {POSTERIORS}, got {spec['posterior']!r}"
    if not (spec.get("rank") is None or (_is_int(spec["rank"]) and spec["rank"] > 0)):
        return f"'rank' must be a positive integer or null, got {spec['rank']!r}"
    if spec["likelihood"] not in LIKELIHOODS:
        return f"'likelihood' must be one of {LIKELIHOODS}, got {spec['likelihood']!r}"
    for key in ("hidden", "depth", "outputs"):
        if not (_is_int(spec[key]) and spec[key] > 0):
            return f"{key!r} must be a positive integer, got {spec[key]!r}"
    classes = spec["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return f"'classes' must be a list of labels, got {classes!r}"
    if len(set(classes)) != len(classes):
        return f"'classes' must be distinct labels, got {classes!r}"
    if spec["task"] == "classification":
        expected = len(classes)
        if expected < 2:
            return f"a classifier needs at least 2 classes, got {classes!r}"
    else:
        expected = 2 if spec["likelihood"] == "heteroscedastic" else 1
    if spec["outputs"] != expected:
        return f"'outputs' is {spec['outputs']} but the task and classes need {expected}"
    d = len(features)
    if not (_finite_list(spec["x_mean"], d) and _finite_list(spec["x_std"], d)):
        return f"'x_mean' and 'x_std' must be lists of {d} finite numbers"
    if any(v <= 0 for v in spec["x_std"]):
        return "'x_std' must be positive"
    if not _finite_list([spec["y_mean"], spec["y_std"]], 2) or spec["y_std"] <= 0:
        return "'y_mean' and 'y_std' must be finite numbers, 'y_std' positive"
    return None


def load_model_file(path: str) -> tuple[dict[str, Any], nn.Module, Likelihood]:
    """Read a model file written by ``varlin fit`` and rebuild its model and likelihood.

    Raises:
        CLIError: the file is missing, unreadable, not a ``varlin fit`` model file, or its stored
            parameters do not match the architecture it declares.
    """
    if Path(path).is_dir():
        raise CLIError(f"{path}: is a folder, not a model file")
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such model file") from None
    except CheckpointError as exc:
        raise CLIError(f"{path}: not a readable model file ({exc})") from None
    spec = state.get("spec")
    if state.get("kind") != MODEL_KIND or not isinstance(spec, dict):
        raise CLIError(f"{path}: not a model file written by 'varlin fit'")
    problem = _spec_problem(spec)
    if problem is not None:
        raise CLIError(f"{path}: the model file's description is invalid: {problem}")
    model = build_mlp(
        len(spec["features"]),
        spec["outputs"],
        hidden=spec["hidden"],
        depth=spec["depth"],
        estimator=spec["estimator"],
        posterior=spec.get("posterior", "meanfield"),
        rank=spec.get("rank"),
    )
    likelihood = model_likelihood(spec)
    for what, module in (("model", model), ("likelihood", likelihood)):
        stored = state.get(what)
        try:
            if not isinstance(stored, dict):
                raise TypeError(f"no {what} parameters stored")
            module.load_state_dict(stored)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
            if len(detail) > 200:
                detail = detail[:197] + "..."
            raise CLIError(
                f"{path}: the stored {what} does not match the architecture it declares "
                f"({len(spec['features'])} inputs, depth {spec['depth']}, hidden {spec['hidden']}, "
                f"{spec['outputs']} outputs): {detail}"
            ) from None
        if not all(bool(torch.isfinite(t).all()) for t in module.state_dict().values()):
            raise CLIError(f"{path}: the stored {what} holds NaN or infinite parameters")
    return spec, model, likelihood


# -- targets: the task and class labels -------------------------------------------------------
def _exact_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal number if Python reads it as a float, else ``None``.

    Exact, not a float: labels such as 9007199254740992 and 9007199254740993 stay distinct.
    """
    try:
        float(text)  # the gate: the spellings float accepts, and no others
    except ValueError:
        return None
    return Decimal(text)


def _infer_task(path: str, name: str, values: list[str]) -> str:
    """``--task auto``: classification for text or few integer values, else regression.

    A column that is mostly numbers but has an empty or non-numeric cell is a typo more often
    than a set of class labels: the cell is named rather than guessed around.
    """
    numbers = [_exact_number(v) for v in values]
    bad = [row for row, n in enumerate(numbers, start=1) if n is None]
    if len(bad) * 2 >= len(values):
        return "classification"  # text labels (a minority of numeric-looking ones allowed)
    if bad:
        cell = values[bad[0] - 1]
        what = f"{cell!r} is not a number" if cell else "empty value"
        raise CLIError(
            f"{path}: column {name!r}, data row {bad[0]}: {what}, although "
            f"{len(values) - len(bad)} of its {len(values)} values are numbers; fix the cell, or "
            "pass --task classification if the column holds class labels"
        )
    exact = [n for n in numbers if n is not None]
    if not all(n.is_finite() for n in exact):
        return "regression"  # the numeric reader names the non-finite cell
    distinct = set(exact)
    if len(distinct) <= AUTO_MAX_CLASSES and all(n == n.to_integral_value() for n in distinct):
        return "classification"
    return "regression"


def _class_labels(path: str, name: str, raw: list[str]) -> tuple[list[str], list[int]]:
    """Sorted class labels and each row's class index; numeric labels compare as numbers.

    Numeric labels are compared exactly: every distinct number is its own class, and equal
    numbers are one class ("1" and "1.0"; "0" and "-0"). An integer-valued class is written as
    an integer ("1"), any other numeric class as its first spelling in the data; text labels
    are kept as they are.
    """
    for row, value in enumerate(raw, start=1):
        if not value:
            raise CLIError(f"{path}: column {name!r}, data row {row}: empty class label")
    numbers = [_exact_number(v) for v in raw]
    if all(n is not None for n in numbers):
        exact = [n for n in numbers if n is not None]
        for row, (value, number) in enumerate(zip(raw, exact, strict=True), start=1):
            if not number.is_finite():
                raise CLIError(
                    f"{path}: column {name!r}, data row {row}: {value!r} is not a finite number "
                    "(NaN and infinite values are not allowed)"
                )
        text: dict[Decimal, str] = {}
        for value, number in zip(raw, exact, strict=True):
            integral = number == number.to_integral_value()
            text.setdefault(number, str(int(number)) if integral else value)
        labels = [text[n] for n in exact]
        classes = [text[n] for n in sorted(text)]
    else:
        labels = raw
        classes = sorted(set(raw))
    if len(classes) < 2:
        raise CLIError(f"{path}: target {name!r} has a single class {classes}; nothing to learn")
    if len(classes) > max(AUTO_MAX_CLASSES, len(raw) // 2):
        raise CLIError(
            f"{path}: target {name!r} has {len(classes)} distinct values in {len(raw)} rows, too "
            "many for classification; use --task regression"
        )
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[v] for v in labels]


# -- the tables of fit and predict ------------------------------------------------------------
def fit_table(
    path: str,
    target: str,
    task: str,
    *,
    likelihood: str,
    hidden: int,
    depth: int,
    estimator: str,
    posterior: str = "meanfield",
    rank: int | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, int]:
    """Read the CSV file ``path`` for ``varlin fit``.

    Every column but ``target`` is a feature, standardised (statistics in float64, a constant
    column gets std 1); a regression target is standardised too, a classification target
    becomes class indices (``task="auto"`` infers which).

    Returns:
        ``(spec, x, y, rows)``: the model file's description (everything but its parameters),
        the float32 features ``(rows, features)``, the targets ``(rows,)`` and the row count.
    """
    header, rows = read_csv(path)
    if target not in header:
        raise CLIError(f"{path}: target column {target!r} not found (columns: {', '.join(header)})")
    features = [h for h in header if h != target]
    if not features:
        raise CLIError(f"{path}: no feature columns besides the target {target!r}")
    columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    X = _feature_matrix(path, features, columns)
    raw_target = [c.strip() for c in columns[target]]
    task = task if task != "auto" else _infer_task(path, target, raw_target)
    spec: dict[str, Any] = {
        "version": __version__,
        "features": features,
        "target": target,
        "task": task,
        "hidden": hidden,
        "depth": depth,
        "estimator": estimator,
        "posterior": posterior,
        "rank": rank,
        "likelihood": likelihood,
    }
    # Statistics in float64: float32 would overflow squaring values of ~1e20.
    x_mean, x_std = X.mean(0), X.std(0, unbiased=False)
    for name, m, s in zip(features, x_mean.tolist(), x_std.tolist(), strict=True):
        if not (math.isfinite(m) and math.isfinite(s)):
            raise CLIError(
                f"{path}: column {name!r} holds values too large to standardise "
                f"(largest magnitude {float(X[:, features.index(name)].abs().max()):.3g}); "
                "rescale it"
            )
    x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
    Xs = _to_float32(path, "the features", (X - x_mean) / x_std)
    y: torch.Tensor
    if task == "classification":
        classes, index = _class_labels(path, target, raw_target)
        y = torch.tensor(index)
        spec.update(classes=classes, outputs=len(classes), y_mean=0.0, y_std=1.0)
    else:
        if len(rows) < 2:
            # A standard deviation needs two values: with one row the target (and every
            # feature) would be "standardised" by an arbitrary 1, and the fit learns nothing.
            raise CLIError(
                f"{path}: a regression fit needs at least 2 data rows to standardise the "
                f"target {target!r} and the features, got {len(rows)}"
            )
        y_raw = torch.tensor(numeric_column(path, target, raw_target), dtype=torch.float64)
        y_mean, y_std = float(y_raw.mean()), float(y_raw.std(unbiased=False))
        if not (math.isfinite(y_mean) and math.isfinite(y_std)):
            raise CLIError(
                f"{path}: column {target!r} holds values too large to standardise "
                f"(largest magnitude {float(y_raw.abs().max()):.3g}); rescale it"
            )
        y_std = y_std if y_std > 0 else 1.0
        y = _to_float32(path, f"the target {target!r}", (y_raw - y_mean) / y_std)
        outputs = 2 if likelihood == "heteroscedastic" else 1
        spec.update(classes=[], outputs=outputs, y_mean=y_mean, y_std=y_std)
    spec.update(x_mean=x_mean.tolist(), x_std=x_std.tolist())
    return spec, Xs, y, len(rows)


def model_file_state(
    spec: dict[str, Any], model: nn.Module, likelihood: Likelihood
) -> dict[str, Any]:
    """What a model file holds: its kind, its description and the trained parameters."""
    return {
        "kind": MODEL_KIND,
        "spec": spec,
        "model": model.state_dict(),
        "likelihood": likelihood.state_dict(),
    }


def predict_table(
    path: str, spec: dict[str, Any]
) -> tuple[list[str], list[list[str]], torch.Tensor]:
    """Read the CSV file ``path`` for a stored model: ``(header, rows, standardised inputs)``.

    The model's feature columns must be present (others are kept for the output).
    """
    header, rows = read_csv(path)
    missing = [f for f in spec["features"] if f not in header]
    if missing:
        raise CLIError(
            f"{path}: columns {missing} are missing; the model was fitted on the columns "
            f"{spec['features']}"
        )
    columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    X = _feature_matrix(path, spec["features"], columns)
    x_mean = torch.tensor(spec["x_mean"], dtype=torch.float64)
    x_std = torch.tensor(spec["x_std"], dtype=torch.float64)
    return header, rows, _to_float32(path, "the features", (X - x_mean) / x_std)


def prediction_columns(
    pred: RegressionPrediction | ClassificationPrediction, spec: dict[str, Any], level: float
) -> dict[str, list[str]]:
    """The new columns, name -> formatted cells, in the documented order."""

    def fmt(values: torch.Tensor) -> list[str]:
        return [f"{float(v):.6g}" for v in values]

    if isinstance(pred, RegressionPrediction):
        scale, shift = spec["y_std"], spec["y_mean"]
        lower, upper = pred.interval(level)
        pct = f"{level * 100:g}"
        return {
            "mean": fmt(pred.mean * scale + shift),
            "std": fmt(pred.std * scale),
            "epistemic_std": fmt(pred.epistemic.sqrt() * scale),
            "aleatoric_std": fmt(pred.aleatoric.sqrt() * scale),
            f"lower_{pct}": fmt(lower * scale + shift),
            f"upper_{pct}": fmt(upper * scale + shift),
        }
    classes = spec["classes"]
    cols = {f"p_{c}": fmt(pred.probs[:, i]) for i, c in enumerate(classes)}
    cols["entropy"] = fmt(pred.entropy)
    cols["mutual_information"] = fmt(pred.mutual_information)
    cols["predicted"] = [classes[int(k)] for k in pred.classes]
    return cols


def _unique_names(header: Sequence[str], names: Sequence[str]) -> list[str]:
    """``names`` made unique against ``header`` and each other by prefixing ``pred_``.

    The prefix is repeated until the name is free: with columns ``mean`` and ``pred_mean`` in
    the input, the new ``mean`` column is ``pred_pred_mean``.
    """
    taken = set(header)
    unique = []
    for name in names:
        while name in taken:
            name = f"pred_{name}"
        taken.add(name)
        unique.append(name)
    return unique


def write_predictions(
    path: str, header: list[str], rows: list[list[str]], columns: dict[str, list[str]]
) -> None:
    """Write ``rows`` with ``columns`` appended (names made unique) to ``path``, atomically."""
    out_header = list(header) + _unique_names(header, list(columns))
    out_rows = [row + [cells[i] for cells in columns.values()] for i, row in enumerate(rows)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(out_header)
        writer.writerows(out_rows)
