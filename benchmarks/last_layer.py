"""Bayesian last layers on a shared trained feature extractor: varlin's exact and variational
heads side by side with vbll, laplace-torch and scikit-learn's BayesianRidge.

Protocol, per UCI dataset and train/test split (the standard splits, inputs and targets
standardised with the training rows' statistics, scores in original units):

1. One deterministic MLP ``D -> 50 -> 50 -> 1`` (ReLU) is trained by mean squared error (Adam,
   learning rate 1e-3, batch 32, ``--extractor-epochs`` epochs, seed = split number), in float32.
   Its body (the 50-d features) and its output layer are shared, unchanged, by every method.
2. Every method fits a Bayesian head on those features and predicts the test rows; its time is
   the wall-clock of fit + predict, feature extraction included, one thread:

   - ``varlin exact``: ``bayesian_last_layer(body, head=net[-1], method="exact", data=(x, y))``:
     closed form, unpenalised intercept, prior and noise precisions by evidence maximisation;
     ``varlin.predict`` (closed form, fitted noise).
   - ``varlin variational``: ``bayesian_last_layer(body, head=net[-1])`` (means start at the
     trained head) + ``varlin.fit`` (ELBO, standard Normal prior, learned noise starting at the
     training RMSE, ``--head-epochs`` epochs, batch 32, Adam 1e-2 with cosine decay, local
     reparameterization); closed-form ``varlin.predict``.
   - ``vbll``: ``vbll.Regression(51, 1, regularization_weight=1/N, parameterization="dense")`` on
     the features plus a constant column (the layer has no bias), its defaults otherwise
     (prior scale 1, Wishart scale 1e-2), trained on its ``train_loss_fn`` with the same budget
     as the variational route (``--head-epochs`` epochs, batch 32, Adam 1e-2); its predictive.
   - ``laplace-torch``: ``Laplace(net, "regression", subset_of_weights="last_layer",
     hessian_structure="full")``, ``fit`` on the training data, then the prior precision and
     the noise scale by maximising its ``log_marginal_likelihood`` (Adam 0.1 on their logs, 1000
     steps, as its README's regression example); GLM predictive plus noise.
   - ``sklearn BayesianRidge``: defaults, on the features (``predict(return_std=True)``).
3. Reported: test log-likelihood and RMSE (mean ± standard error over splits), the mean
   wall-clock time and the mean CPU time of the process over the call (what the call itself
   used, without the time the scheduler gave to other processes).
   With ``--repeats R`` each method's fit + predict is run R times per split and its time is the
   median of the R (the scores are the first run's): the fast heads take milliseconds, where one
   measurement on a shared machine is mostly the scheduler's noise. The 1-minute load average
   before and after the run is recorded with the machine.

The goal (issue 18): a varlin route is the best, or within one standard error (of the best
method's mean) of the best, on every dataset, and is the fastest among the methods that are.

Usage::

    python benchmarks/last_layer.py --data-dir ../shared/data/uci --splits 20 --workers 2
    python benchmarks/last_layer.py --render-only        # rebuild last_layer.md from the JSON
    # re-run some methods on every split of the JSON (same extractors), replacing their results:
    python benchmarks/last_layer.py --data-dir ../shared/data/uci --workers 2 \
        --retime "varlin exact,sklearn BayesianRidge" --repeats 5

Peers come from ``make bench-install`` (requirements-bench.txt, installed with ``--no-deps`` so
that their pins cannot pull another torch); a peer that cannot be imported is skipped with a
note.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import varlin
from varlin._io import atomic_write
from varlin.data import load_uci
from varlin.uci import SplitArrays, prepare_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
DATASETS = ("bostonHousing", "concrete", "energy", "yacht", "wine-quality-red")
SHORT = {
    "bostonHousing": "boston",
    "concrete": "concrete",
    "energy": "energy",
    "yacht": "yacht",
    "wine-quality-red": "wine",
}
WIDTH = 50
VARLIN_METHODS = ("varlin exact", "varlin variational")

#: (mean, std) of standardised predictions of the test rows, and the seconds it took.
Prediction = tuple[Tensor, Tensor, float]


# -- the shared extractor ---------------------------------------------------------------------
def train_extractor(split: SplitArrays, epochs: int, seed: int) -> nn.Sequential:
    """The deterministic MLP whose body every method shares (float32, MSE, Adam 1e-3)."""
    torch.manual_seed(seed)
    d = split.X_train.shape[1]
    net = nn.Sequential(
        nn.Linear(d, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1)
    )
    x, y = _tensor(split.X_train), _tensor(split.y_train)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            ((net(x[idx]).squeeze(-1) - y[idx]) ** 2).mean().backward()
            opt.step()
    net.eval()
    return net


def _tensor(a: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)


def _train_rmse(net: nn.Sequential, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(((net(x).squeeze(-1) - y) ** 2).mean().sqrt())


# -- methods: each returns standardised predictive mean and std of the test rows ---------------
def varlin_exact(net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any) -> Prediction:
    start = time.perf_counter()
    model = varlin.bayesian_last_layer(net[:-1], head=net[-1], method="exact", data=(x, y))
    pred = varlin.predict(model, xt)
    return pred.mean, pred.std, time.perf_counter() - start


def varlin_variational(
    net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any
) -> Prediction:
    start = time.perf_counter()
    model = varlin.bayesian_last_layer(net[:-1], head=net[-1], estimator="local")
    likelihood = varlin.likelihoods.Gaussian(_train_rmse(net, x, y), learn_noise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit's diagnostics: the table reports the outcome
        varlin.fit(
            model, x, y, likelihood=likelihood, epochs=cfg.head_epochs, batch_size=32,
            lr=1e-2, seed=cfg.seed, progress=False,
        )  # fmt: skip
    pred = varlin.predict(model, xt, likelihood=likelihood)
    return pred.mean, pred.std, time.perf_counter() - start


def sklearn_bayesian_ridge(
    net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any
) -> Prediction:
    from sklearn.linear_model import BayesianRidge

    start = time.perf_counter()
    with torch.no_grad():
        h, ht = net[:-1](x).numpy(), net[:-1](xt).numpy()
    model = BayesianRidge().fit(h, y.numpy())
    mean, std = model.predict(ht, return_std=True)
    elapsed = time.perf_counter() - start
    return torch.as_tensor(mean), torch.as_tensor(std), elapsed


def vbll_regression(net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any) -> Prediction:
    import vbll

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        h, ht = _with_ones(net[:-1](x)), _with_ones(net[:-1](xt))
    head = vbll.Regression(
        WIDTH + 1, 1, regularization_weight=1.0 / len(x), parameterization="dense"
    )
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.head_epochs):
        for idx in torch.randperm(len(h), generator=g).split(32):
            opt.zero_grad()
            head(h[idx]).train_loss_fn(y[idx, None]).backward()
            opt.step()
    with torch.no_grad():
        predictive = head(ht).predictive
        mean, std = predictive.mean[:, 0], predictive.stddev[:, 0]
    return mean, std, time.perf_counter() - start


def _with_ones(h: Tensor) -> Tensor:
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)


def laplace_last_layer(
    net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any
) -> Prediction:
    from laplace import Laplace

    start = time.perf_counter()
    model = copy.deepcopy(net)
    la = Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="full")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y[:, None]), batch_size=32
    )
    la.fit(loader)
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(1000):
        opt.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        opt.step()
    with torch.no_grad():
        f_mu, f_var = la(xt, pred_type="glm")
        mean = f_mu.reshape(-1)
        std = (f_var.reshape(-1) + la.sigma_noise.reshape(()) ** 2).sqrt()
    return mean, std, time.perf_counter() - start


METHODS: dict[str, Callable[..., Prediction]] = {
    "varlin exact": varlin_exact,
    "varlin variational": varlin_variational,
    "vbll": vbll_regression,
    "laplace-torch": laplace_last_layer,
    "sklearn BayesianRidge": sklearn_bayesian_ridge,
}
PEER_MODULES = {"vbll": "vbll", "laplace-torch": "laplace", "sklearn BayesianRidge": "sklearn"}


def available_methods(names: Sequence[str]) -> list[str]:
    """The methods whose library imports; a missing peer is skipped with a note."""
    kept = []
    for name in names:
        module = PEER_MODULES.get(name)
        if module is not None:
            try:
                __import__(module)
            except Exception as error:  # an optional peer: any import failure skips it
                print(f"skipping {name}: cannot import {module} ({error})", file=sys.stderr)
                continue
        kept.append(name)
    return kept


# -- one split --------------------------------------------------------------------------------
def run_split(name: str, index: int, cfg: Any, methods: Sequence[str]) -> dict[str, Any]:
    """Train the split's extractor once, then score every method on its features."""
    torch.set_num_threads(1)
    with _one_blas_thread():
        return _run_split(name, index, cfg, methods)


def _one_blas_thread() -> Any:
    """numpy's BLAS on one thread too (scikit-learn's solves), as torch: the same footing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it, numpy keeps its default threads
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _run_split(name: str, index: int, cfg: Any, methods: Sequence[str]) -> dict[str, Any]:
    dataset = load_uci(name, data_dir=cfg.data_dir)
    split = prepare_split(dataset, index)
    net = train_extractor(split, cfg.extractor_epochs, seed=index)
    x, y, xt = _tensor(split.X_train), _tensor(split.y_train), _tensor(split.X_eval)
    y_test = torch.as_tensor(split.y_eval, dtype=torch.float64)
    results: dict[str, Any] = {}
    run_cfg = argparse.Namespace(**{**vars(cfg), "seed": index})
    repeats = getattr(cfg, "repeats", 1)  # a JSON written before --repeats: one run
    for method in methods:
        mean, std, seconds, cpu = _timed(method, net, x, y, xt, run_cfg)
        if repeats > 1:
            again = [_timed(method, net, x, y, xt, run_cfg)[2:] for _ in range(repeats - 1)]
            seconds = statistics.median([seconds, *(wall for wall, _ in again)])
            cpu = statistics.median([cpu, *(used for _, used in again)])
        mean64, std64 = mean.double().reshape(-1), std.double().reshape(-1)
        # Scores in original units: y = y_mean + y_std * standardised.
        ll = torch.distributions.Normal(mean64, std64).log_prob(
            (y_test - split.y_mean) / split.y_std
        ) - math.log(split.y_std)
        rmse = ((mean64 * split.y_std + split.y_mean - y_test) ** 2).mean().sqrt()
        results[method] = {
            "test_ll": float(ll.mean()),
            "rmse": float(rmse),
            "seconds": seconds,
            "cpu_seconds": cpu,
        }
    return {"dataset": name, "split": index, "results": results}


def _timed(
    method: str, net: nn.Sequential, x: Tensor, y: Tensor, xt: Tensor, cfg: Any
) -> tuple[Tensor, Tensor, float, float]:
    """A method's prediction, its wall-clock time and the process's CPU time over the call.

    The CPU time is what the call itself used: on a shared machine the wall-clock time also
    holds the time the scheduler gave to other processes, which dominates calls of milliseconds.
    """
    started = time.process_time()
    mean, std, seconds = METHODS[method](net, x, y, xt, cfg)
    return mean, std, seconds, time.process_time() - started


def mean_and_stderr(values: Sequence[float]) -> list[float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return [mean, se]


def summarise(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(run["dataset"] for run in runs):
        rows = [run for run in runs if run["dataset"] == name]
        # cpu_seconds: absent from runs written before it was recorded (kept by --retime).
        summary[name] = {
            method: {
                key: mean_and_stderr([row["results"][method][key] for row in rows])
                for key in ("test_ll", "rmse", "seconds", "cpu_seconds")
                if all(key in row["results"][method] for row in rows)
            }
            for method in methods
        }
        summary[name]["splits"] = len(rows)
    return summary


def goals(summary: dict[str, Any], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per dataset: the best method by mean test LL; which methods are within one standard
    error of it (the best's SE); whether a varlin route is among them and the fastest of them."""
    rows = []
    for name, entry in summary.items():
        best = max(methods, key=lambda m: entry[m]["test_ll"][0])
        best_ll, best_se = entry[best]["test_ll"]
        close = [m for m in methods if entry[m]["test_ll"][0] >= best_ll - best_se]
        fastest = min(close, key=lambda m: entry[m]["seconds"][0])
        ours = [m for m in VARLIN_METHODS if m in close]
        top = max((m for m in VARLIN_METHODS if m in methods), key=lambda m: entry[m]["test_ll"][0])
        rows.append(
            {
                "dataset": name,
                "best": best,
                "within_one_se": close,
                "fastest_of_those": fastest,
                "varlin_close": bool(ours),
                "varlin_fastest": fastest in VARLIN_METHODS,
                "best_varlin": top,
                "gap_to_best": best_ll - entry[top]["test_ll"][0],
                "best_se": best_se,
            }
        )
    return rows


# -- output -----------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> str:
    summary, methods = data["summary"], data["methods"]
    names = list(summary)
    head = "| " + " | ".join(["method", *(SHORT.get(n, n) for n in names)]) + " |"
    rule = "|---|" + "---:|" * len(names)

    def table(key: str, digits: int, title: str, unit: float = 1.0) -> list[str]:
        lines = [f"**{title}**", "", head, rule]
        for method in methods:
            cells = []
            for name in names:
                if key not in summary[name][method]:
                    cells.append("—")  # not recorded for this method (an earlier run)
                    continue
                mean, se = (unit * value for value in summary[name][method][key])
                best = (max if key == "test_ll" else min)(
                    (m for m in methods if key in summary[name][m]),
                    key=lambda m, n=name: summary[n][m][key][0],
                )
                text = f"{mean:.{digits}f} ± {se:.{digits}f}"
                cells.append(f"**{text}**" if method == best else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    cpu_table = []
    if any("cpu_seconds" in summary[n][m] for n in names for m in methods):
        cpu_table = table(
            "cpu_seconds",
            2,
            "CPU time of fit + predict, milliseconds (the process's, one thread; — where the "
            "run did not record it)",
            unit=1e3,
        )

    splits = ", ".join(f"{SHORT.get(n, n)} {summary[n]['splits']}" for n in names)
    lines = [
        f"Splits: {splits}. Bold: the best mean per dataset.",
        "",
        *table("test_ll", 2, "Test log-likelihood (original units; higher is better)"),
        *table("rmse", 2, "Test RMSE (original units)"),
        *table("seconds", 3, "Fit + predict time, seconds (one thread)"),
        *cpu_table,
        "**Goal**: a varlin route best or within one standard error (of the best's mean) of "
        "the best test log-likelihood on every dataset, and the fastest of the methods that are.",
        "",
        "| dataset | best | within 1 SE of it | fastest of those | best varlin route, gap "
        "to best (best's SE) | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["goals"]:
        met = row["varlin_close"] and row["varlin_fastest"]
        lines.append(
            f"| {SHORT.get(row['dataset'], row['dataset'])} | {row['best']} | "
            f"{', '.join(row['within_one_se'])} | {row['fastest_of_those']} | "
            f"{row['best_varlin']}, {row['gap_to_best']:.3f} ({row['best_se']:.3f}) | "
            f"{'yes' if met else 'no'} |"
        )
    machine = data["machine"]
    retimed = data.get("retimed")
    if retimed:
        changes = "; ".join(
            f"{m}: test LL {c['test_ll']:.1e}, RMSE {c['rmse']:.1e}"
            for m, c in retimed["largest_change"].items()
        )
        lines += [
            "",
            f"Re-run with `--retime` (every split, the same extractors, "
            f"{retimed.get('workers', data['config']['workers'])} worker(s)): "
            f"{', '.join(retimed['methods'])}; their rows are from that run, the others from "
            f"the first. Largest change of a split's score against the first run: {changes}. "
            f"Time: {_timing(retimed)}.",
        ]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, one torch thread per worker "
        f"({data['config']['workers']} workers), torch {machine['torch']}, Python "
        f"{machine['python']}; time of the first run: {_timing(data)}. "
        f"Command: `{data['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _timing(run: dict[str, Any]) -> str:
    """How a run's times were taken: repeats and the machine's load around it (if recorded)."""
    repeats = run.get("repeats", run.get("config", {}).get("repeats", 1))
    text = "one measurement per split" if repeats == 1 else f"median of {repeats} per split"
    loads = run.get("load")  # [before, after] per invocation (several after --append)
    if not loads:
        return text + ", load not recorded"
    spans = ", then ".join(f"{before:.1f} before and {after:.1f} after" for before, after in loads)
    return f"{text}, 1-minute load average {spans}"


def _load_average() -> float:
    """The 1-minute load average (NaN where the platform has none): other work on the CPUs
    stretches every time in the table."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_outputs(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "last_layer.json", "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    with atomic_write(out / "last_layer.md", "w") as fh:
        fh.write(MARKDOWN_HEADER + "\n" + render(data))


MARKDOWN_HEADER = """# Bayesian last layers on UCI regression

Generated by `benchmarks/last_layer.py` (see its docstring for the full protocol): per split one
deterministic MLP (D → 50 → 50 → 1, ReLU, float32) is trained by least squares, and every method
puts a Bayesian head on the same 50-d features of that network. varlin's exact head
(`bayesian_last_layer(..., method="exact")`: closed form, intercept, evidence-maximised prior and
noise) and variational head (`bayesian_last_layer(..., head=net[-1])` + `varlin.fit`, 100 epochs)
side by side with vbll (`Regression`, dense, same training budget as varlin's variational head),
laplace-torch (last layer, full Hessian, prior precision and noise by its marginal likelihood) and
scikit-learn's `BayesianRidge`. Scores in original units, mean ± standard error over splits; the
time is fit + predict, feature extraction included, on one thread.
"""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="root of the local UCI copy")
    parser.add_argument(
        "--dataset", action="append", default=None, help="folder name; repeat; default: 5"
    )
    parser.add_argument("--splits", type=int, default=20, help="N splits of each dataset")
    parser.add_argument("--first-split", type=int, default=0, help="start at this split")
    parser.add_argument(
        "--append", action="store_true", help="add these splits to the runs in --out's JSON"
    )
    parser.add_argument("--extractor-epochs", type=int, default=100)
    parser.add_argument("--head-epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="time each method R times per split (median)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON + md")
    parser.add_argument("--render-only", action="store_true", help="rebuild md from the JSON")
    parser.add_argument(
        "--retime",
        default=None,
        help="comma-separated methods to re-run on every split in --out's JSON (the same "
        "extractors, retrained from their seeds); their results are replaced, the others kept",
    )
    args = parser.parse_args(argv)
    if not args.render_only and args.data_dir is None:
        parser.error("--data-dir is required (the folder holding bostonHousing/, concrete/, ...)")
    for option in ("splits", "extractor_epochs", "head_epochs", "workers"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.first_split < 0:
        parser.error("--first-split must be >= 0")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    chosen = args.methods.split(",") + ([] if args.retime is None else args.retime.split(","))
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return args


def _command(argv: Sequence[str] | None) -> str:
    return "python benchmarks/last_layer.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))


def _saved(out: Path) -> Any:
    """The ``last_layer.json`` of an earlier run in ``out``."""
    return json.loads((out / "last_layer.json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.render_only:
        data = _saved(args.out)
        data["goals"] = goals(data["summary"], data["methods"])
        write_outputs(data, args.out)
        return 0
    if args.retime is not None:
        return retime(args, argv)
    methods = available_methods(args.methods.split(","))
    names = args.dataset or list(DATASETS)
    tasks = []
    for name in names:
        stop = min(args.first_split + args.splits, load_uci(name, data_dir=args.data_dir).n_splits)
        tasks += [(name, i) for i in range(args.first_split, stop)]
    started, load_before = time.perf_counter(), _load_average()
    runs = _run_all(tasks, args, methods)
    command = _command(argv)
    seconds = time.perf_counter() - started
    loads = [[load_before, _load_average()]]
    if args.append:  # e.g. splits 10-19 after a run of 0-9: one table over all of them
        old = _saved(args.out)
        if old["methods"] != methods:
            raise SystemExit(f"--append: the JSON has methods {old['methods']}, not {methods}")
        done = {(run["dataset"], run["split"]) for run in runs}
        runs += [run for run in old["runs"] if (run["dataset"], run["split"]) not in done]
        names += [name for name in dict.fromkeys(r["dataset"] for r in runs) if name not in names]
        command, seconds = f"{old['command']}; {command}", seconds + old["seconds"]
        loads = [*old.get("load", []), *loads]
    runs.sort(key=lambda run: (names.index(run["dataset"]), run["split"]))
    summary = summarise(runs, methods)
    skip = ("out", "render_only", "append", "retime")
    config = {k: v for k, v in vars(args).items() if k not in skip}
    data = {
        "command": command,
        "machine": _machine(),
        "config": config,
        "methods": methods,
        "seconds": seconds,
        "load": loads,
        "summary": summary,
        "goals": goals(summary, methods),
        "runs": runs,
    }
    write_outputs(data, args.out)
    print(render(data))
    return 0


def _run_all(
    tasks: Sequence[tuple[str, int]], args: argparse.Namespace, methods: Sequence[str]
) -> list[dict[str, Any]]:
    if args.workers == 1:
        return [run_split(name, i, args, methods) for name, i in tasks]
    runs = []
    with cf.ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_split, name, i, args, methods) for name, i in tasks]
        for future in cf.as_completed(futures):
            runs.append(future.result())
            print(f"{len(runs)}/{len(tasks)} splits done", file=sys.stderr, flush=True)
    return runs


def retime(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Re-run ``--retime``'s methods on every split of the saved JSON and replace their results.

    Each split's extractor is retrained from its seed with the saved settings (the same network,
    so the same features); the other methods' results are kept. Prints, per re-run method, the
    largest change of its test log-likelihood and RMSE against the saved run, so that a re-run
    for timing shows whether the scores moved.
    """
    data = _saved(args.out)
    methods = args.retime.split(",")
    missing = sorted(set(methods) - set(data["methods"]))
    if missing:
        raise SystemExit(f"--retime: the JSON has no results of {missing}")
    unavailable = sorted(set(methods) - set(available_methods(methods)))
    if unavailable:
        raise SystemExit(f"--retime: cannot run {unavailable} here (see the notes above)")
    saved = argparse.Namespace(**{**vars(args), **data["config"]})
    saved.data_dir, saved.workers, saved.repeats = args.data_dir, args.workers, args.repeats
    tasks = [(run["dataset"], run["split"]) for run in data["runs"]]
    started, load_before = time.perf_counter(), _load_average()
    fresh = {(r["dataset"], r["split"]): r for r in _run_all(tasks, saved, methods)}
    loads = [[load_before, _load_average()]]
    changes = dict.fromkeys(methods, (0.0, 0.0))
    for run in data["runs"]:
        for method in methods:
            new = fresh[(run["dataset"], run["split"])]["results"][method]
            old = run["results"][method]
            ll, rmse = changes[method]
            changes[method] = (
                max(ll, abs(new["test_ll"] - old["test_ll"])),
                max(rmse, abs(new["rmse"] - old["rmse"])),
            )
            run["results"][method] = new
    for method, (ll, rmse) in changes.items():
        print(f"{method}: largest change of test LL {ll:.2e}, of RMSE {rmse:.2e}", file=sys.stderr)
    command = _command(argv)
    data["command"] = f"{data['command']}; {command}"
    data["retimed"] = {
        "methods": methods,
        "seconds": time.perf_counter() - started,
        "repeats": args.repeats,
        "workers": args.workers,
        "load": loads,
        "largest_change": {m: {"test_ll": c[0], "rmse": c[1]} for m, c in changes.items()},
    }
    data["summary"] = summarise(data["runs"], data["methods"])
    data["goals"] = goals(data["summary"], data["methods"])
    write_outputs(data, args.out)
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
