"""Smoke test of benchmarks/speed.py: a tiny --quick run writes a well-formed JSON and table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_speed():
    return load_script(SCRIPT, "bench_speed")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_expected_json(tmp_path: Path) -> None:
    speed = _load_speed()
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--sizes", "16:4", "--rounds", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the script sets all CPUs; leave the session as it was

    data = json.loads((tmp_path / "speed.json").read_text())
    assert {"command", "machine", "config", "sizes", "mc_prediction", "targets"} <= set(data)
    assert {"cpu_count", "torch", "device_type"} <= set(data["machine"])
    (size,) = data["sizes"]
    assert (size["in_features"], size["batch"]) == (16, 4)

    train, inference, memory = size["train"], size["inference"], size["memory"]
    expected_train = {"nn.Linear"} | {f"varlin.{e}" for e in speed.VARLIN_ESTIMATORS}
    assert expected_train <= set(train)
    assert expected_train | {"varlin.deterministic"} <= set(inference)
    for entry in [*train.values(), *inference.values()]:
        assert _positive(entry["median_ms"]) and _positive(entry["ratio"])
        assert len(entry["times_ms"]) == 2
    assert train["nn.Linear"]["ratio"] == 1.0

    assert {"nn.Linear", "varlin.reparameterization"} <= set(memory)
    for entry in memory.values():
        assert _positive(entry["parameters"]) and _positive(entry["total"])
        assert _positive(entry["params_buffers_ratio"])
    # the default prior is two scalars per tensor: 2 x nn.Linear's parameters plus 16 bytes
    varlin_mem = memory["varlin.reparameterization"]
    assert varlin_mem["parameters"] == 2 * memory["nn.Linear"]["parameters"]
    assert varlin_mem["buffers"] == 4 * 4

    mc = data["mc_prediction"]
    assert mc["samples"] == speed.MC_SAMPLES
    for estimator in speed.VARLIN_ESTIMATORS:
        assert all(_positive(mc[estimator][k]) for k in ("batched_ms", "separate_ms", "speedup"))

    assert all({"target", "value", "bound", "met"} <= set(row) for row in data["targets"])
    table = (tmp_path / "speed.md").read_text()
    assert "nn.Linear" in table and data["command"] in table


def test_quick_run_has_the_posterior_family_rows(tmp_path: Path) -> None:
    """Issue 11's rows: every family's train step against the mean-field step with the same
    estimator, a memory row per family, and the full-covariance layer on a shape of its own."""
    speed = _load_speed()
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--sizes", "16:4", "--rounds", "1", "--no-peers", "--out",
                    str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "speed.json").read_text())
    (size,) = data["sizes"]
    for key, _options, estimator in speed.FAMILY_ROWS:
        entry = size["train"][key]
        assert entry["baseline"] == f"varlin.{estimator}" and _positive(entry["ratio"])
        if not key.endswith("]"):
            assert _positive(size["memory"][key]["params_buffers_ratio"]), key
    memory = size["memory"]
    # low rank k: (in + 1 + out) k more parameters than mean-field; matrix-normal diagonal
    # factors: one loc plus (in + 1) + out scales
    extra = (
        memory["varlin.lowrank-4"]["parameters"] - memory["varlin.reparameterization"]["parameters"]
    )
    assert extra == (16 + 1 + 16) * 4 * 4
    assert memory["varlin.matrix_normal-diagonal"]["parameters"] == (17 * 16 + 17 + 16) * 4
    full = data["full_covariance"]
    assert {"varlin.full", "varlin.full [local]"} <= set(full["train"])
    d = (full["in_features"] + 1) * full["out_features"]
    assert full["memory"]["varlin.full"]["parameters"] == (2 * d + d * d) * 4
    assert "full covariance" in (tmp_path / "speed.md").read_text()


def test_quick_conv_run_writes_the_convolution_table(tmp_path: Path) -> None:
    """Issue 13's table: nn.Conv2d, varlin's three estimators and its posterior mean, the peers
    that import; ratios to nn.Conv2d; the local target and the same-estimator comparisons."""
    speed = _load_speed()
    threads = torch.get_num_threads()
    try:
        speed.main(["--conv", "--quick", "--conv-sizes", "4:6:2", "--rounds", "2", "--out",
                    str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "speed_conv.json").read_text())
    assert {"command", "machine", "config", "sizes", "targets", "load_average"} <= set(data)
    (size,) = data["sizes"]
    assert (size["channels"], size["size"], size["batch"]) == (4, 6, 2)
    expected = {"nn.Conv2d"} | {f"varlin.{e}" for e in speed.VARLIN_ESTIMATORS}
    assert expected <= set(size["train"])
    assert expected | {"varlin.deterministic"} <= set(size["inference"])
    for table in (size["train"], size["inference"]):
        for entry in table.values():
            assert _positive(entry["median_ms"]) and _positive(entry["ratio"])
            assert entry["baseline"] == "nn.Conv2d" and len(entry["times_ms"]) == 2
    assert size["train"]["nn.Conv2d"]["ratio"] == 1.0
    targets = {row["target"] for row in data["targets"]}
    assert "train varlin.local at 4ch 6×6" in targets
    markdown = (tmp_path / "speed.md").read_text()
    assert "## Convolutions (issue 13)" in markdown and "load average" in markdown
