"""The UCI regression benchmark: a thin script around :mod:`varlin.uci` (``varlin uci``'s options).

Usage::

    # one likelihood, all nine datasets, every split (what docs/results/uci.md reports)
    python benchmarks/uci.py --dataset all --data-dir ../shared/data/uci --workers 2 \\
        --likelihood homoscedastic --out /tmp/uci_hom.json
    # hyper-parameter search mode: scores 20 % held out of each training split, never the test rows
    python benchmarks/uci.py --dataset boston --data-dir ../shared/data/uci --validation

    # merge a homoscedastic and a heteroscedastic run into docs/results/uci.json and print the
    # markdown table of docs/results/uci.md, side by side with the published columns
    python benchmarks/uci.py render /tmp/uci_hom.json /tmp/uci_het.json --json docs/results/uci.json

    # the same with --prior empirical (learned prior scales), beside the fixed-prior results
    python benchmarks/uci.py render-empirical /tmp/uci_hom_eb.json /tmp/uci_het_eb.json \
        --fixed docs/results/uci.json --json docs/results/uci_empirical.json

    # moment propagation (--method moments): the runs beside the Monte Carlo ones of uci.json
    # and the published DVI columns; writes docs/results/uci_moments.json, prints the markdown
    python benchmarks/uci.py render-moments --het /tmp/het_diag.json --hom /tmp/hom_diag.json \
        [--het-full /tmp/het_full.json] [--hom-full /tmp/hom_full.json] \
        --mc docs/results/uci.json --json docs/results/uci_moments.json

See ``docs/results/uci.md`` for the protocol, the hyper-parameter search and the results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any

import torch

from varlin.uci import main, write_json_atomic

#: Test log-likelihood (original units) of Gal & Ghahramani (2016), Table 1, which reproduces VI
#: (Graves 2011) and PBP from Hernández-Lobato & Adams (2015); MCVI: Wu et al. (2019),
#: heteroscedastic. Copied from issue 5.
PUBLISHED: dict[str, tuple[str, float, float, float, float]] = {
    # folder: (short name, VI, PBP, MC dropout, MCVI)
    "bostonHousing": ("boston", -2.90, -2.57, -2.46, -2.46),
    "concrete": ("concrete", -3.39, -3.16, -3.04, -3.07),
    "energy": ("energy", -2.39, -2.04, -1.99, -1.03),
    "kin8nm": ("kin8nm", 0.90, 0.90, 0.95, 1.14),
    "naval-propulsion-plant": ("naval", 3.73, 3.73, 3.80, 5.94),
    "power-plant": ("power", -2.89, -2.84, -2.80, -2.80),
    "protein-tertiary-structure": ("protein", -2.99, -2.97, -2.89, -2.87),
    "wine-quality-red": ("wine", -0.98, -0.97, -0.93, -0.92),
    "yacht": ("yacht", -3.43, -1.63, -1.55, -0.68),
}


#: Deterministic variational inference, Wu et al. (2019), Table 2: test log-likelihood of the
#: heteroscedastic and the homoscedastic model (copied from issue 12).
PUBLISHED_DVI: dict[str, tuple[float, float]] = {
    # folder: (heteroscedastic DVI, homoscedastic DVI)
    "bostonHousing": (-2.41, -2.58),
    "concrete": (-3.06, -3.23),
    "energy": (-1.01, -2.09),
    "kin8nm": (1.13, 1.01),
    "naval-propulsion-plant": (6.29, 5.84),
    "power-plant": (-2.80, -2.82),
    "protein-tertiary-structure": (-2.85, -2.94),
    "wine-quality-red": (-0.90, -0.96),
    "yacht": (-0.47, -1.41),
}


def _pm(pair: list[float], digits: int = 2) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def render(hom: dict[str, Any], het: dict[str, Any]) -> str:
    """The markdown tables of ``docs/results/uci.md`` from two ``--out`` files."""
    lines = [
        "| test LL | VI | PBP | MC dropout | MCVI (het.) | **ours, homosc.** | **ours, "
        "heterosc.** | splits | epochs | wall s (hom / het) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, (short, vi, pbp, dropout, mcvi) in PUBLISHED.items():
        h, e = hom.get(folder), het.get(folder)
        ours_h = _pm(h["test_ll"]) if h else "—"
        ours_e = _pm(e["test_ll"]) if e else "—"
        splits = h["splits"] if h else (e["splits"] if e else "—")
        epochs = h["epochs"] if h else (e["epochs"] if e else "—")
        wall = f"{h['seconds']:.0f} / {e['seconds']:.0f}" if h and e else "—"
        lines.append(
            f"| {short} | {vi:.2f} | {pbp:.2f} | {dropout:.2f} | {mcvi:.2f} | {ours_h} | "
            f"{ours_e} | {splits} | {epochs} | {wall} |"
        )
    lines += ["", "| test RMSE | ours, homosc. | ours, heterosc. |", "|---|---:|---:|"]
    for folder, (short, *_) in PUBLISHED.items():
        h, e = hom.get(folder), het.get(folder)
        digits = 4 if folder == "naval-propulsion-plant" else 2
        lines.append(
            f"| {short} | {_pm(h['rmse'], digits) if h else '—'} | "
            f"{_pm(e['rmse'], digits) if e else '—'} |"
        )
    lines += ["", _targets(hom, het)]
    return "\n".join(lines)


def count(run: dict[str, Any], column: int, strict: bool) -> tuple[int, list[str]]:
    """Datasets where ``run``'s test LL (at the published two decimals) is above (``strict``) or
    at/above the published ``column`` of :data:`PUBLISHED`; and the others, described."""
    met, missed = 0, []
    for folder, row in PUBLISHED.items():
        if folder not in run:
            missed.append(f"{row[0]} (not run)")
            continue
        ours, ref = round(run[folder]["test_ll"][0], 2), row[column]
        if ours > ref or (ours == ref and not strict):
            met += 1
        else:
            missed.append(f"{row[0]} ({ours:.2f} vs {ref:.2f})")
    return met, missed


def _targets(hom: dict[str, Any], het: dict[str, Any]) -> str:
    out = []
    for label, run in (("homoscedastic", hom), ("heteroscedastic", het)):
        for goal, column, strict in (
            ("above VI", 1, True),
            ("at/above PBP", 2, False),
            ("at/above MC dropout", 3, False),
            ("at/above MCVI", 4, False),
        ):
            met, missed = count(run, column, strict)
            rest = f"; short: {', '.join(missed)}" if missed else ""
            out.append(f"- {label}, {goal}: {met}/9{rest}")
    return "\n".join(out)


#: Test LL within this many nats of the exact linear model counts as "reaching" it (issue 11).
GAP_TOLERANCE = 0.1


def render_families(mean_field: dict[str, Any], families: dict[str, dict[str, Any]]) -> str:
    """Test LL of other posterior families beside mean-field's (one likelihood), with tallies.

    Args:
        mean_field: ``--out`` entries of the mean-field run, by dataset folder.
        families: ``--out`` entries of each family's run, by column label.
    """
    labels = list(families)
    lines = [
        "| test LL | MC dropout | mean-field | " + " | ".join(labels) + " |",
        "|---|---:|---:|" + "---:|" * len(labels),
    ]
    for folder, (short, _, _, dropout, _) in PUBLISHED.items():
        m = mean_field.get(folder)
        cells = [
            _pm(families[k][folder]["test_ll"]) if folder in families[k] else "—" for k in labels
        ]
        lines.append(
            f"| {short} | {dropout:.2f} | {_pm(m['test_ll']) if m else '—'} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    beats, reached, short_of = [], 0, []
    for folder, (short, _, _, dropout, _) in PUBLISHED.items():
        runs = {k: families[k][folder]["test_ll"][0] for k in labels if folder in families[k]}
        if not runs or folder not in mean_field:
            short_of.append(f"{short} (not run)")
            continue
        best = max(runs, key=lambda k: runs[k])
        if runs[best] > mean_field[folder]["test_ll"][0]:
            beats.append(
                f"{short} ({best} {runs[best]:.3f} vs {mean_field[folder]['test_ll'][0]:.3f})"
            )
        if round(runs[best], 2) >= dropout:
            reached += 1
        else:
            short_of.append(f"{short} ({runs[best]:.2f} vs {dropout:.2f})")
    lines.append(
        f"- best other family above mean-field: {len(beats)}/9: {', '.join(beats) or 'none'}"
    )
    lines.append(
        f"- best other family at/above MC dropout: {reached}/9"
        + (f"; short: {', '.join(short_of)}" if short_of else "")
    )
    return "\n".join(lines)


def gap_summary(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset: each family's gap splits within :data:`GAP_TOLERANCE` of the linear model.

    Args:
        runs: ``varlin uci --gap --out`` files, by family label (all with the same datasets).

    Returns:
        ``{folder: {"dimensions": [...], "linear": [...], "families": {label: {"ll": [...],
        "within": n, "worst": (difference, dimension)}}, "best_within": n, "best_worst":
        (difference, dimension, label)}}``, differences as family minus linear, in nats.
    """
    out: dict[str, dict[str, Any]] = {}
    first = next(iter(runs.values()))
    for folder in first:
        gap = first[folder]["gap"]
        dims, linear = gap["dimensions"], gap["linear_test_ll"]
        entry: dict[str, Any] = {"dimensions": dims, "linear": linear, "families": {}}
        best: list[tuple[float, str]] = [(-math.inf, "")] * len(dims)
        for label, run in runs.items():
            if folder not in run:
                continue
            if run[folder]["gap"]["dimensions"] != dims:
                raise ValueError(f"{label}: the gap splits of {folder} differ from the others'")
            lls = run[folder]["per_split"]["test_ll"]
            diffs = [ll - ref for ll, ref in zip(lls, linear, strict=True)]
            worst = min(range(len(dims)), key=lambda i: diffs[i])
            entry["families"][label] = {
                "ll": lls,
                "within": sum(d >= -GAP_TOLERANCE for d in diffs),
                "worst": (diffs[worst], dims[worst]),
            }
            best = [max(b, (d, label)) for b, d in zip(best, diffs, strict=True)]
        entry["best_within"] = sum(d >= -GAP_TOLERANCE for d, _ in best)
        low = min(range(len(dims)), key=lambda i: best[i][0])
        entry["best_worst"] = (best[low][0], dims[low], best[low][1])
        entry["best_family"] = [label for _, label in best]
        out[folder] = entry
    return out


def render_gap(runs: dict[str, dict[str, Any]]) -> str:
    """The gap-protocol table of ``docs/results/uci.md``: per dataset and family, the mean test
    LL, the splits within 0.1 nats of the linear model and the worst split (family − linear)."""
    summary = gap_summary(runs)
    labels = list(runs)
    lines = [
        "| gap test LL | splits | linear model | "
        + " | ".join(f"{k}: mean / within 0.1 / worst (dim)" for k in labels)
        + " | best family: within 0.1 / worst (dim, family) |",
        "|---|---:|---:|" + "---|" * len(labels) + "---|",
    ]
    folders = [f for f in PUBLISHED if f in summary] + [f for f in summary if f not in PUBLISHED]
    for folder in folders:
        e = summary[folder]
        n = len(e["dimensions"])
        cells = []
        for k in labels:
            f = e["families"].get(k)
            if f is None:
                cells.append("—")
                continue
            diff, dim = f["worst"]
            cells.append(f"{sum(f['ll']) / n:.2f} / {f['within']}/{n} / {diff:+.2f} ({dim})")
        diff, dim, label = e["best_worst"]
        short = PUBLISHED[folder][0] if folder in PUBLISHED else folder
        lines.append(
            f"| {short} | {n} | {sum(e['linear']) / n:.2f} | "
            + " | ".join(cells)
            + f" | {e['best_within']}/{n} / {diff:+.2f} ({dim}, {label}) |"
        )
    total = sum(len(e["dimensions"]) for e in summary.values())
    within = sum(e["best_within"] for e in summary.values())
    lines += [
        "",
        f"- best family within {GAP_TOLERANCE} nats of the linear model: {within}/{total} "
        "gap splits",
    ]
    return "\n".join(lines)


def _read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _labelled(pairs: list[str]) -> dict[str, dict[str, Any]]:
    runs = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"uci.py: error: expected LABEL=FILE, got {pair!r}")
        runs[label] = _read_json(path)
    return runs


def _merge_json(path: str | None, key: str, value: dict[str, Any]) -> dict[str, Any] | None:
    """Merge ``value`` into ``path``'s entry ``key``; the file's content (or ``None``)."""
    if path is None:
        return None
    data: dict[str, Any] = _read_json(path)
    data.setdefault(key, {}).update(value)
    write_json_atomic(path, data)
    return data


def families_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uci.py families")
    parser.add_argument("runs", nargs="+", help="LABEL=FILE: --out files of one likelihood")
    parser.add_argument("--likelihood", choices=["homoscedastic", "heteroscedastic"], required=True)
    parser.add_argument("--json", required=True, help="uci.json: mean-field from it, runs into it")
    args = parser.parse_args(argv)
    runs = _labelled(args.runs)
    data = _merge_json(args.json, "families", {k: {args.likelihood: v} for k, v in runs.items()})
    assert data is not None
    mean_field = data[args.likelihood]  # the entry beside "families", untouched by the merge
    print(render_families(mean_field, runs))
    return 0


def gap_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uci.py gap")
    parser.add_argument("runs", nargs="+", help="LABEL=FILE: varlin uci --gap --out files")
    parser.add_argument("--json", default=None, help="merge the runs into this uci.json")
    args = parser.parse_args(argv)
    runs = _labelled(args.runs)
    _merge_json(args.json, "gap", runs)
    print(render_gap(runs))
    return 0


#: Issue 18's goals for the empirical-Bayes runs: (likelihood, published column, its name, least
#: number of datasets at/above it).
EMPIRICAL_GOALS = (("homoscedastic", 3, "MC dropout", 7), ("heteroscedastic", 4, "MCVI", 8))


def render_empirical(
    eb: dict[str, dict[str, Any]], fixed: dict[str, dict[str, Any]] | None = None
) -> str:
    """The markdown of the ``--prior empirical`` runs: test LL and RMSE beside the fixed-prior
    runs (``fixed``, as ``uci.json``) and the published columns, the learned prior scales
    (median over splits), and issue 18's goals, met or missed by how much."""
    fixed = fixed or {}
    kinds = ("homoscedastic", "heteroscedastic")

    def cell(kind: str, runs: dict[str, dict[str, Any]], folder: str, key: str, d: int) -> str:
        entry = runs.get(kind, {}).get(folder)
        return _pm(entry[key], d) if entry else "—"

    lines = [
        "| test LL | MC dropout | MCVI (het.) | homosc., fixed | **homosc., EB** | heterosc., "
        "fixed | **heterosc., EB** | splits | wall s (hom / het EB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, (short, _vi, _pbp, dropout, mcvi) in PUBLISHED.items():
        h, e = eb.get("homoscedastic", {}).get(folder), eb.get("heteroscedastic", {}).get(folder)
        splits = (h or e or {}).get("splits", "—")
        wall = " / ".join(f"{r['seconds']:.0f}" if r else "—" for r in (h, e))
        cells = [cell(k, runs, folder, "test_ll", 2) for k in kinds for runs in (fixed, eb)]
        lines.append(
            f"| {short} | {dropout:.2f} | {mcvi:.2f} | {' | '.join(cells)} | {splits} | {wall} |"
        )
    lines += [
        "",
        "| test RMSE | homosc., fixed | homosc., EB | heterosc., fixed | heterosc., EB |",
        "|---|---:|---:|---:|---:|",
    ]
    for folder, (short, *_) in PUBLISHED.items():
        d = 4 if folder == "naval-propulsion-plant" else 2
        cells = [cell(k, runs, folder, "rmse", d) for k in kinds for runs in (fixed, eb)]
        lines.append(f"| {short} | {' | '.join(cells)} |")
    lines += [
        "",
        "Learned prior scales at the end of training, median over splits (each layer's weights "
        "and bias; standardised units; they start at the fixed run's prior scale):",
        "",
        "| dataset | likelihood | start | layer 1 weights | layer 1 bias | layer 2 weights | "
        "layer 2 bias |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for folder, (short, *_) in PUBLISHED.items():
        for kind in kinds:
            entry = eb.get(kind, {}).get(folder)
            scales = entry and entry["per_split"].get("prior_scales")
            if not scales:
                continue
            medians = [
                f"{statistics.median(split[name] for split in scales):.3g}"
                for name in ("0.w_prior", "0.b_prior", "2.w_prior", "2.b_prior")
            ]
            start = entry["config"]["prior_scale"]
            lines.append(f"| {short} | {kind} | {start:g} | {' | '.join(medians)} |")
    lines.append("")
    for kind, column, name, need in EMPIRICAL_GOALS:
        run = eb.get(kind, {})
        met, missed = count(run, column, strict=False)
        verdict = "met" if met >= need else f"missed by {need - met}"
        rest = f"; short: {', '.join(missed)}" if missed else ""
        line = (
            f"- {kind} with empirical Bayes, at/above {name}: {met}/9 "
            f"(goal ≥ {need}/9: {verdict}){rest}"
        )
        if kind in fixed:
            before, _ = count(fixed[kind], column, strict=False)
            line += f"; with the fixed prior: {before}/9"
        lines.append(line)
    return "\n".join(lines)


def render_empirical_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uci.py render-empirical")
    parser.add_argument(
        "homoscedastic", help="--out file of the homoscedastic --prior empirical run"
    )
    parser.add_argument("heteroscedastic", help="--out file of the heteroscedastic one")
    parser.add_argument("--fixed", default=None, help="uci.json of the fixed-prior runs")
    parser.add_argument("--json", default=None, help="write the merged empirical results here")
    args = parser.parse_args(argv)
    eb = {}
    for kind in ("homoscedastic", "heteroscedastic"):
        eb[kind] = _read_json(getattr(args, kind))
    fixed = None
    if args.fixed is not None:
        fixed = _read_json(args.fixed)
    if args.json is not None:
        write_json_atomic(args.json, eb)
    print(render_empirical(eb, fixed))
    return 0


def _cell(run: dict[str, Any] | None, folder: str) -> str:
    if not run or folder not in run:
        return "—"
    entry = run[folder]
    splits = (
        "" if entry["splits"] >= 20 or folder.startswith("protein") else f" ({entry['splits']})"
    )
    return f"{_pm(entry['test_ll'])}{splits}"


def _at_least(run: dict[str, Any], column: int) -> tuple[int, int, list[str]]:
    """How many datasets of ``run`` are at/above the published DVI ``column`` (two decimals)."""
    met, ran, missed = 0, 0, []
    for folder, ref in PUBLISHED_DVI.items():
        if folder not in run:
            continue
        ran += 1
        ours = round(run[folder]["test_ll"][0], 2)
        if ours >= ref[column]:
            met += 1
        else:
            missed.append(f"{PUBLISHED[folder][0]} ({ours:.2f} vs {ref[column]:.2f})")
    return met, ran, missed


def render_moments(runs: dict[str, dict[str, Any] | None], mc: dict[str, Any]) -> str:
    """The markdown of the moment-propagation section of ``docs/results/uci.md``."""
    het, hom = runs["het"] or {}, runs["hom"] or {}
    het_full, hom_full = runs.get("het_full"), runs.get("hom_full")
    lines = [
        "| test LL | DVI het. (published) | **moments het., diag** | moments het., full | "
        "MC het. (ours) | DVI hom. (published) | **moments hom., diag** | moments hom., full | "
        "MC hom. (ours) | wall s, diag (het / hom) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, (dvi_het, dvi_hom) in PUBLISHED_DVI.items():
        wall = "—"
        if folder in het and folder in hom:
            wall = f"{het[folder]['seconds']:.0f} / {hom[folder]['seconds']:.0f}"
        lines.append(
            f"| {PUBLISHED[folder][0]} | {dvi_het:.2f} | {_cell(het, folder)} | "
            f"{_cell(het_full, folder)} | {_cell(mc.get('heteroscedastic'), folder)} | "
            f"{dvi_hom:.2f} | {_cell(hom, folder)} | {_cell(hom_full, folder)} | "
            f"{_cell(mc.get('homoscedastic'), folder)} | {wall} |"
        )
    lines.append("")
    for label, run, column in (
        ("heteroscedastic moments (diagonal) at/above heteroscedastic DVI", het, 0),
        ("homoscedastic moments (diagonal) at/above homoscedastic DVI", hom, 1),
        ("heteroscedastic moments (full) at/above heteroscedastic DVI", het_full or {}, 0),
        ("homoscedastic moments (full) at/above homoscedastic DVI", hom_full or {}, 1),
    ):
        met, ran, missed = _at_least(run, column)
        if ran:
            rest = f"; short: {', '.join(missed)}" if missed else ""
            lines.append(f"- {label}: {met}/{ran}{rest}")
    for label, run, key in (("heteroscedastic", het, "heteroscedastic"),
                            ("homoscedastic", hom, "homoscedastic")):  # fmt: skip
        theirs = mc.get(key, {})
        pairs = [(f, run[f]["test_ll"][0], theirs[f]["test_ll"][0]) for f in run if f in theirs]
        if pairs:
            better = sum(round(a, 2) >= round(b, 2) for _, a, b in pairs)
            lines.append(
                f"- {label} moments (diagonal) at/above our Monte Carlo model: "
                f"{better}/{len(pairs)}"
            )
    return "\n".join(lines)


def render_moments_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uci.py render-moments")
    for name in ("het", "hom", "het-full", "hom-full"):
        parser.add_argument(f"--{name}", default=None, help="--out file of a --method moments run")
    parser.add_argument("--mc", required=True, help="docs/results/uci.json (the Monte Carlo runs)")
    parser.add_argument("--json", default=None, help="write the merged moment runs here")
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, Any] | None] = {}
    for key in ("het", "hom", "het_full", "hom_full"):
        path = getattr(args, key)
        runs[key] = None
        if path is not None:
            runs[key] = _read_json(path)
    mc = _read_json(args.mc)
    if args.json is not None:
        write_json_atomic(args.json, runs)
    print(render_moments(runs, mc))
    return 0


def render_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uci.py render")
    parser.add_argument("homoscedastic", help="--out file of the homoscedastic run")
    parser.add_argument("heteroscedastic", help="--out file of the heteroscedastic run")
    parser.add_argument("--json", default=None, help="write the merged results here")
    args = parser.parse_args(argv)
    hom = _read_json(args.homoscedastic)
    het = _read_json(args.heteroscedastic)
    if args.json is not None:
        write_json_atomic(args.json, {"homoscedastic": hom, "heteroscedastic": het})
    print(render(hom, het))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["render"]:
        sys.exit(render_main(sys.argv[2:]))
    if sys.argv[1:2] == ["families"]:
        sys.exit(families_main(sys.argv[2:]))
    if sys.argv[1:2] == ["gap"]:
        sys.exit(gap_main(sys.argv[2:]))
    if sys.argv[1:2] == ["render-empirical"]:
        sys.exit(render_empirical_main(sys.argv[2:]))
    if sys.argv[1:2] == ["render-moments"]:
        sys.exit(render_moments_main(sys.argv[2:]))
    sys.exit(main())
