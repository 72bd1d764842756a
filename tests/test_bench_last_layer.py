"""Smoke test of benchmarks/last_layer.py on a tiny dataset in the UCI layout (varlin and
scikit-learn only: the other peers are benchmark extras)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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
