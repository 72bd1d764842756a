"""Smoke test of benchmarks/ensemble.py: a --quick run writes a well-formed JSON and table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble.py"


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_ensemble", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        module.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the script sets one thread; leave the session as it was
        del sys.modules[spec.name]
    results = json.loads((tmp_path / "ensemble.json").read_text())
    assert [row["k"] for row in results["rows"]] == [1, 2]
    for row in results["rows"]:
        for key in ("stacked_s", "separate_s", "speedup", "speedup_cpu"):
            assert math.isfinite(row[key]) and row[key] > 0
    table = (tmp_path / "ensemble.md").read_text()
    assert "| local | 2 |" in table and "speed-up" in table
