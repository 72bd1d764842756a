"""Smoke test of benchmarks/moments.py: the agreement part at a small sample size writes its
JSON and markdown, and its figures say what the rules promise (exact networks close to Monte
Carlo, "full" closer than "diagonal" where hidden units are correlated)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "moments.py"


def test_agreement_writes_json_and_markdown(tmp_path: Path) -> None:
    bench = load_script(SCRIPT, "bench_moments")
    json_path, md_path = tmp_path / "m.json", tmp_path / "m.md"
    argv = ["--json", str(json_path), "--markdown", str(md_path), "agreement", "--samples"]
    assert bench.main([*argv, "20000"]) == 0
    data = json.loads(json_path.read_text())
    rows = {row["network"]: row for row in data["agreement"]["rows"]}
    assert len(rows) == len(bench.NETWORKS)
    # 20,000 samples: one standard error of a relative variance error is ~0.01
    exact = rows["1 layer, low-rank"]
    assert exact["full"]["var_rel_err"] < 0.05 and exact["full"]["cov_rel_fro"] < 0.05
    # a low-rank layer correlates its outputs: only "full" carries that
    assert exact["diagonal"]["cov_rel_fro"] > 4 * exact["full"]["cov_rel_fro"]
    deep = rows["2 hidden (16, 16) ReLU, low-rank"]
    assert deep["full"]["var_rel_err"] < deep["diagonal"]["var_rel_err"]
    text = md_path.read_text()
    assert "| 2 hidden (50, 50) ReLU, mean-field |" in text
    # render alone rebuilds the same markdown from the JSON
    assert bench.main(["--json", str(json_path), "--markdown", str(md_path), "render"]) == 0
    assert md_path.read_text() == text


def test_uci_render_moments_counts_against_the_published_dvi_columns() -> None:
    uci = load_script(Path(SCRIPT).parent / "uci.py", "bench_uci")

    def run(values: dict[str, float], splits: int = 20) -> dict[str, dict[str, object]]:
        return {
            f: {"test_ll": [v, 0.01], "splits": splits, "seconds": 1.0} for f, v in values.items()
        }

    het = run({"bostonHousing": -2.405, "yacht": -0.60})  # boston -2.40 at two decimals: above
    hom = run({"bostonHousing": -2.60, "yacht": -1.30}, splits=5)
    mc = {"heteroscedastic": run({"bostonHousing": -2.31}), "homoscedastic": {}}
    text = uci.render_moments({"het": het, "hom": hom}, mc)
    assert "- heteroscedastic moments (diagonal) at/above heteroscedastic DVI: 1/2; short: " in text
    assert "yacht (-0.60 vs -0.47)" in text
    assert "- homoscedastic moments (diagonal) at/above homoscedastic DVI: 1/2" in text
    assert "| boston | -2.41 | -2.40 ± 0.01 | — | -2.31 ± 0.01 | -2.58 | -2.60 ± 0.01 (5) |" in text
    assert "- heteroscedastic moments (diagonal) at/above our Monte Carlo model: 0/1" in text
