"""benchmarks/uci.py's tables: the gap protocol's tallies and the family columns."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "uci.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_uci_gap", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _gap_run(lls: list[float]) -> dict[str, Any]:
    gap = {"dimensions": [0, 2, 5], "linear_test_ll": [-1.0, -2.0, -3.0]}
    return {"yacht": {"gap": gap, "per_split": {"test_ll": lls}}}


def test_gap_summary_counts_splits_within_a_tenth_of_a_nat_and_finds_the_worst(
    bench: ModuleType,
) -> None:
    runs = {"A": _gap_run([-1.05, -2.5, -3.0]), "B": _gap_run([-1.2, -2.08, -10.0])}
    entry = bench.gap_summary(runs)["yacht"]
    a, b = entry["families"]["A"], entry["families"]["B"]
    assert a["within"] == 2 and a["worst"] == (pytest.approx(-0.5), 2)
    assert b["within"] == 1 and b["worst"] == (pytest.approx(-7.0), 5)
    # Best family per split: A (-0.05), B (-0.08), A (0.0): all three within 0.1.
    assert entry["best_family"] == ["A", "B", "A"] and entry["best_within"] == 3
    assert entry["best_worst"] == (pytest.approx(-0.08), 2, "B")
    table = bench.render_gap(runs)
    assert "| yacht | 3 | -2.00 |" in table and "3/3 / -0.08 (2, B)" in table
    assert "within 0.1 nats of the linear model: 3/3 gap splits" in table


def test_gap_summary_refuses_runs_on_different_splits(bench: ModuleType) -> None:
    other = _gap_run([-1.0, -2.0, -3.0])
    other["yacht"]["gap"]["dimensions"] = [0, 1, 2]
    with pytest.raises(ValueError, match="gap splits of yacht differ"):
        bench.gap_summary({"A": _gap_run([-1.0, -2.0, -3.0]), "B": other})


def test_family_columns_count_datasets_above_mean_field_and_mc_dropout(
    bench: ModuleType,
) -> None:
    mean_field = {
        "yacht": {"test_ll": [-1.11, 0.05]},
        "wine-quality-red": {"test_ll": [-0.96, 0.01]},
    }
    lowrank = {"yacht": {"test_ll": [-1.00, 0.05]}, "wine-quality-red": {"test_ll": [-0.99, 0.01]}}
    table = bench.render_families(mean_field, {"lowrank": lowrank})
    assert "| yacht | -1.55 | -1.11 ± 0.05 | -1.00 ± 0.05 |" in table
    assert "above mean-field: 1/9: yacht (lowrank -1.000 vs -1.110)" in table
    # Only yacht and wine were run: wine is short of MC dropout (-0.93), yacht above (-1.55).
    assert "at/above MC dropout: 1/9; short: boston (not run), concrete (not run)" in table
    assert "wine (-0.99 vs -0.93)" in table
