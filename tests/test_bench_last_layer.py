"""Smoke test of benchmarks/last_layer.py on a tiny dataset in the UCI layout (varlin and
scikit-learn only: the other peers are benchmark extras)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "last_layer.py"


def _load():
    return load_script(SCRIPT, "bench_last_layer")


def _tiny_dataset(root: Path, n: int = 60, d: int = 3, splits: int = 2) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    y = np.sin(X[:, 0]) + X[:, 1] + 0.1 * rng.normal(size=n)
    folder = root / "tiny"
    folder.mkdir()
    np.savetxt(folder / "data.txt", np.column_stack([X, y]))
    (folder / "index_features.txt").write_text("\n".join(map(str, range(d))) + "\n")
    (folder / "index_target.txt").write_text(f"{d}\n")
    for name, value in (("n_splits", splits), ("n_hidden", 50), ("n_epochs", 40)):
        (folder / f"{name}.txt").write_text(f"{value}\n")
    for i in range(splits):
        order = rng.permutation(n)
        np.savetxt(folder / f"index_train_{i}.txt", order[:45], fmt="%d")
        np.savetxt(folder / f"index_test_{i}.txt", order[45:], fmt="%d")


def test_tiny_run_writes_tables_and_goals(tmp_path: Path) -> None:
    bench = _load()
    _tiny_dataset(tmp_path)
    threads = torch.get_num_threads()
    common = [
        "--data-dir", str(tmp_path), "--dataset", "tiny", "--splits", "1",
        "--extractor-epochs", "2", "--head-epochs", "2", "--out", str(tmp_path / "out"),
        "--methods", "varlin exact,varlin variational,sklearn BayesianRidge",
    ]  # fmt: skip
    try:
        bench.main(common)  # split 0, then split 1 added to the same table
        bench.main([*common, "--first-split", "1", "--append"])
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread; leave the session as was
    data = json.loads((tmp_path / "out" / "last_layer.json").read_text())
    assert data["methods"] == ["varlin exact", "varlin variational", "sklearn BayesianRidge"]
    assert [run["split"] for run in data["runs"]] == [0, 1]
    assert data["summary"]["tiny"]["splits"] == 2 and "--append" in data["command"]
    for method in data["methods"]:
        for key in ("test_ll", "rmse", "seconds"):
            mean, se = data["summary"]["tiny"][method][key]
            assert math.isfinite(mean) and se >= 0
    # The exact head is scikit-learn's BayesianRidge on the same features (to float32 rounding).
    for run in data["runs"]:
        ours, theirs = run["results"]["varlin exact"], run["results"]["sklearn BayesianRidge"]
        assert abs(ours["test_ll"] - theirs["test_ll"]) < 1e-3
    (goal,) = data["goals"]
    assert goal["best"] in data["methods"] and goal["fastest_of_those"] in goal["within_one_se"]
    table = (tmp_path / "out" / "last_layer.md").read_text()
    assert "varlin exact" in table and data["command"] in table


def test_retime_reruns_only_the_named_methods(tmp_path: Path) -> None:
    """``--retime``: the named methods are re-run on every saved split (same extractors, so the
    same scores to rounding) and replaced; the others' results are kept as saved."""
    bench = _load()
    _tiny_dataset(tmp_path)
    threads = torch.get_num_threads()
    out = ["--out", str(tmp_path / "out")]
    common = [
        "--data-dir", str(tmp_path), "--dataset", "tiny", "--splits", "2",
        "--extractor-epochs", "2", "--head-epochs", "2", *out,
        "--methods", "varlin exact,varlin variational",
    ]  # fmt: skip
    try:
        bench.main(common)
        before = json.loads((tmp_path / "out" / "last_layer.json").read_text())
        for run in before["runs"]:  # as a JSON written before the CPU time was recorded
            del run["results"]["varlin variational"]["cpu_seconds"]
        (tmp_path / "out" / "last_layer.json").write_text(json.dumps(before))
        bench.main(
            ["--data-dir", str(tmp_path), *out, "--retime", "varlin exact", "--repeats", "3"]
        )
    finally:
        torch.set_num_threads(threads)
    after = json.loads((tmp_path / "out" / "last_layer.json").read_text())
    assert after["retimed"]["methods"] == ["varlin exact"]
    assert after["retimed"]["largest_change"]["varlin exact"]["test_ll"] < 1e-6
    for old, new in zip(before["runs"], after["runs"], strict=True):
        assert new["results"]["varlin variational"] == old["results"]["varlin variational"]
        assert (
            abs(new["results"]["varlin exact"]["rmse"] - old["results"]["varlin exact"]["rmse"])
            < 1e-6
        )
    assert "--retime" in after["command"]
    # The re-run's timing is recorded: three runs per split (median), the load around it.
    assert after["retimed"]["repeats"] == 3 and after["config"]["repeats"] == 1
    ((load_before, load_after),) = after["retimed"]["load"]
    assert load_before >= 0 and load_after >= 0
    table = (tmp_path / "out" / "last_layer.md").read_text()
    assert "Re-run with `--retime` (every split, the same extractors, 1 worker(s))" in table
    assert "median of 3 per split" in table
    assert "one measurement per split, 1-minute load average" in table  # the first run's
    for run in after["runs"]:  # the re-run recorded the CPU time of its calls
        cpu = run["results"]["varlin exact"]["cpu_seconds"]
        assert 0 < cpu and math.isfinite(cpu)
        assert "cpu_seconds" not in run["results"]["varlin variational"]
    cpu_rows = table.split("CPU time of fit + predict, milliseconds")[1].splitlines()
    assert next(r for r in cpu_rows if r.startswith("| varlin variational |")).endswith("| — |")
    assert "—" not in next(r for r in cpu_rows if r.startswith("| varlin exact |"))


def test_retime_refuses_a_method_the_json_lacks(tmp_path: Path) -> None:
    bench = _load()
    _tiny_dataset(tmp_path)
    threads = torch.get_num_threads()
    out = ["--out", str(tmp_path / "out")]
    try:
        bench.main(
            ["--data-dir", str(tmp_path), "--dataset", "tiny", "--splits", "1",
             "--extractor-epochs", "1", *out, "--methods", "varlin exact"]
        )  # fmt: skip
        with pytest.raises(SystemExit, match="no results of \\['sklearn BayesianRidge'\\]"):
            bench.main(["--data-dir", str(tmp_path), *out, "--retime", "sklearn BayesianRidge"])
    finally:
        torch.set_num_threads(threads)


def test_repeats_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _load().parse(["--data-dir", "x", "--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
