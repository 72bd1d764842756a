"""Smoke test of benchmarks/speed.py: a tiny --quick run writes a well-formed JSON and table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

import varlin

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_speed():
    return load_script(SCRIPT, "bench_speed")


def _run_quick(speed, out: Path, *args: str) -> dict:
    """A --quick run at 16 features, batch 4, without peers; the JSON it wrote."""
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--sizes", "16:4", "--no-peers", "--malloc", "default", "--out",
                    str(out), *args])  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the script sets all CPUs; leave the session as it was
    return json.loads((out / "speed.json").read_text())


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_expected_json(tmp_path: Path) -> None:
    speed = _load_speed()
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--sizes", "16:4", "--rounds", "2", "--malloc", "default", "--out",
                    str(tmp_path)])  # fmt: skip
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
    data = _run_quick(speed, tmp_path, "--rounds", "1")
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
        speed.main(["--conv", "--quick", "--conv-sizes", "4:6:2", "--rounds", "2",
                    "--malloc", "default", "--out", str(tmp_path)])  # fmt: skip
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
    for estimator in speed.VARLIN_ESTIMATORS:  # issue 17: each estimator beside its floor
        entry = size["train"][f"varlin.{estimator}"]
        assert entry["floor"] == f"floor: {estimator}" and _positive(entry["floor_ratio"])
        assert f"floor: {estimator}" not in size["inference"]
    targets = {row["target"] for row in data["targets"]}
    assert "train varlin.local at 4ch 6×6" in targets
    markdown = (tmp_path / "speed.md").read_text()
    assert "## Convolutions (issue 13)" in markdown and "load average" in markdown
    assert "| train varlin.local (vs floor: local) |" in markdown


def _floor_like(speed, layer, estimator: str):
    """A floor holding the layer's parameters (and its own generator, seeded by the caller)."""
    floor = speed.Floor(estimator, layer.in_features, layer.out_features, torch.device("cpu"))
    with torch.no_grad():
        for mine, theirs in zip(floor.params, _layer_params(layer), strict=True):
            mine.copy_(theirs)
    floor.generator = torch.Generator()
    return floor


def _layer_params(layer) -> list[torch.Tensor]:
    w, b = layer.w_posterior, layer.b_posterior
    return [w.loc, w.raw_scale, b.loc, b.raw_scale]


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_floor_computes_the_layers_loss_gradients_and_step(estimator: str) -> None:
    """Issue 17: a floor may skip overhead, never work. For the same noise (the same seed, drawn
    in the layer's order) its hand-written loss and gradients equal autograd's through the layer
    (float32 rounding only), and one Adam step moves the parameters alike."""
    speed = _load_speed()
    gen = torch.Generator().manual_seed(0)
    layer = varlin.LinearVariationalNormal(13, 7, estimator=estimator, generator=gen)
    with torch.no_grad():  # scales away from their common initial value, some near 1
        layer.w_posterior.raw_scale.copy_(torch.randn(13, 7, generator=gen) - 1.0)
        layer.b_posterior.raw_scale.copy_(torch.randn(7, generator=gen) - 1.0)
    x, t = torch.randn(5, 13, generator=gen), torch.randn(5, 7, generator=gen)
    floor = _floor_like(speed, layer, estimator)
    layer_opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    floor_opt = torch.optim.Adam(floor.params, lr=1e-2)

    gen.manual_seed(1)
    y, kl = layer(x, kl_weight=1.0 / speed.NUM_DATA)
    loss = F.mse_loss(y, t) + kl
    loss.backward()
    floor.generator.manual_seed(1)
    floor_loss, grads = floor.loss_and_grads(x, t)
    torch.testing.assert_close(floor_loss, loss.detach(), rtol=1e-6, atol=0)
    for param, grad in zip(_layer_params(layer), grads, strict=True):
        assert param.grad is not None and bool(param.grad.abs().max() > 0)
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-7)

    layer_opt.step()
    for param, grad in zip(floor.params, grads, strict=True):
        param.grad = grad
    floor_opt.step()
    for mine, theirs in zip(floor.params, _layer_params(layer), strict=True):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_floor_inference_draws_the_layers_output(estimator: str) -> None:
    speed = _load_speed()
    gen = torch.Generator().manual_seed(2)
    layer = varlin.VariationalLinear(11, 6, estimator=estimator, generator=gen)
    x = torch.randn(4, 11, generator=gen)
    floor = _floor_like(speed, layer, estimator)
    gen.manual_seed(3)
    with torch.no_grad():
        y = layer(x)
    floor.generator.manual_seed(3)
    torch.testing.assert_close(floor.infer(x), y, rtol=1e-6, atol=1e-7)


def test_floor_that_skips_work_is_caught() -> None:
    """The check above can fail: a floor that forgets the KL's gradient differs from the layer."""
    speed = _load_speed()
    gen = torch.Generator().manual_seed(4)
    layer = varlin.LinearVariationalNormal(9, 3, generator=gen)
    x, t = torch.randn(6, 9, generator=gen), torch.randn(6, 3, generator=gen)
    floor = _floor_like(speed, layer, "reparameterization")
    floor.kl_weight = 0.0  # drops the KL's gradient (and value) only
    gen.manual_seed(5)
    y, kl = layer(x, kl_weight=1.0 / speed.NUM_DATA)
    (F.mse_loss(y, t) + kl).backward()
    floor.generator.manual_seed(5)
    _, grads = floor.loss_and_grads(x, t)
    assert layer.w_posterior.raw_scale.grad is not None
    assert not torch.allclose(grads[1], layer.w_posterior.raw_scale.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_conv_floor_computes_the_layers_loss_and_gradients(estimator: str) -> None:
    """The conv table's floors, as the linear ones: for the same noise, the hand-written loss
    and gradients equal autograd's through ``VariationalConv2d`` (float32 rounding only)."""
    speed = _load_speed()
    gen = torch.Generator().manual_seed(6)
    c = 3
    layer = varlin.VariationalConv2d(c, c, 3, padding=1, estimator=estimator, generator=gen)
    with torch.no_grad():  # scales away from their common initial value
        layer.w_posterior.raw_scale.copy_(torch.randn(c * 9, c, generator=gen) - 1.0)
        layer.b_posterior.raw_scale.copy_(torch.randn(c, generator=gen) - 1.0)
    x, t = torch.randn(4, c, 5, 5, generator=gen), torch.randn(4, c, 5, 5, generator=gen)
    floor = speed.ConvFloor(estimator, c, torch.device("cpu"))
    params = _layer_params(layer)
    as_kernel = [layer.kernel, layer.kernel, lambda v: v, lambda v: v]
    with torch.no_grad():
        for mine, theirs, lay_out in zip(floor.params, params, as_kernel, strict=True):
            mine.copy_(lay_out(theirs))
    floor.generator = torch.Generator()
    gen.manual_seed(7)
    loss = F.mse_loss(layer(x), t) + varlin.kl_divergence(layer) / speed.NUM_DATA
    loss.backward()
    floor.generator.manual_seed(7)
    floor_loss, grads = floor.loss_and_grads(x, t)
    torch.testing.assert_close(floor_loss, loss.detach(), rtol=1e-6, atol=0)
    for param, grad, lay_out in zip(params, grads, as_kernel, strict=True):
        assert param.grad is not None and bool(param.grad.abs().max() > 0)
        torch.testing.assert_close(grad, lay_out(param.grad), rtol=1e-5, atol=1e-7)


def test_quick_run_has_floor_rows_and_issue_17_targets(tmp_path: Path) -> None:
    speed = _load_speed()
    data = _run_quick(speed, tmp_path, "--rounds", "2", "--no-families")
    (size,) = data["sizes"]
    assert "full_covariance" not in data  # --no-families: no family rows, no full-covariance
    assert not any(key in size["train"] for key, _, _ in speed.FAMILY_ROWS)
    for section in ("train", "inference"):
        for estimator in speed.VARLIN_ESTIMATORS:
            floor = size[section][f"floor: {estimator}"]
            assert floor["baseline"] == "nn.Linear" and _positive(floor["ratio"])
            entry = size[section][f"varlin.{estimator}"]
            assert entry["floor"] == f"floor: {estimator}" and _positive(entry["floor_ratio"])
    assert size["inference"]["varlin.deterministic"]["floor"] == "nn.Linear"
    floor_targets = [row for row in data["targets"] if row["section"] == "floor"]
    assert {row["impl"] for row in floor_targets} == set(speed.FLOOR_OF)
    assert all(row["bound"] == "<= 1.3" for row in floor_targets)  # 16 features: the 256 bound
    assert "× own floor" in (tmp_path / "speed.md").read_text()


def test_lead_targets_use_per_round_ratios() -> None:
    """The lead over a peer is the median of per-round ratios peer / varlin."""
    speed = _load_speed()
    row = {"ratio": 1.0, "median_ms": 1.0, "baseline": "nn.Linear"}
    train = {
        "varlin.reparameterization": {**row, "times_ms": [1.0, 2.0, 1.0]},
        "torchbnn.BayesLinear": {**row, "times_ms": [1.1, 2.0, 1.3]},
        "blitz.BayesianLinear": {**row, "times_ms": [5.0, 9.0, 5.0]},
    }
    (target,) = speed._floor_and_lead_targets([{"in_features": 1024, "train": train}])
    assert target["impl"] == "varlin.reparameterization"
    assert "torchbnn.BayesLinear" in target["target"]
    # medians of the times would give 1.3 / 1.0 and meet the bound; per round: 1.1, 1.0, 1.3
    assert target["value"] == pytest.approx(1.1) and not target["met"]
    assert speed._floor_bound(256) == 1.3 and speed._floor_bound(2048) == 1.15
    assert speed._floor_bound(16) == 1.3


def test_cuda_graph_variant_needs_a_gpu_and_variant_rows_pair_with_their_own_linear() -> None:
    """The GPU mode's arguments (issue 17), checked where no GPU is: the graph variant refuses
    the CPU with one line; every variant row is timed against nn.Linear with that variant."""
    speed = _load_speed()
    with pytest.raises(SystemExit, match="--variants graph: CUDA graphs need --device cuda"):
        speed.main(["--quick", "--variants", "graph", "--out", "/nonexistent"])
    with pytest.raises(SystemExit):  # argparse: not a variant
        speed.main(["--quick", "--variants", "eager", "--out", "/nonexistent"])
    rows = speed._variant_impls(["graph", "compile"])
    keys = {row.key: row for row in rows}
    for variant in ("graph", "compile"):
        assert keys[f"nn.Linear [{variant}]"].baseline == f"nn.Linear [{variant}]"
        for estimator in speed.VARLIN_ESTIMATORS:
            row = keys[f"varlin.{estimator} [{variant}]"]
            assert row.variant == variant and row.baseline == f"nn.Linear [{variant}]"
    cuda_targets = {key for _, key in speed.TARGETS["cuda"]}
    assert {"varlin.reparameterization [graph]", "varlin.reparameterization"} <= cuda_targets


@pytest.mark.slow
# torch.compile's own import path warns in this torch build (not varlin's code).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_variant_runs_on_the_cpu(tmp_path: Path) -> None:
    """``--variants compile`` end to end on a tiny layer (torch.compile takes a while)."""
    speed = _load_speed()
    data = _run_quick(speed, tmp_path, "--rounds", "1", "--variants", "compile")
    (size,) = data["sizes"]
    for section in ("train", "inference"):
        for estimator in speed.VARLIN_ESTIMATORS:
            entry = size[section][f"varlin.{estimator} [compile]"]
            assert entry["baseline"] == "nn.Linear [compile]" and _positive(entry["ratio"])


def test_before_rows_time_a_second_copy_of_varlin_in_the_same_rounds(tmp_path: Path) -> None:
    """``--before SRC`` imports the package in SRC beside this one (here: this very source)
    and times its estimator rows in the same rounds; the before → after table comes with them."""
    speed = _load_speed()
    src = Path(__file__).resolve().parents[1] / "src"
    try:
        data = _run_quick(speed, tmp_path, "--rounds", "2", "--before", str(src),
                          "--before-label", "same code")  # fmt: skip
    finally:
        sys.modules.pop("varlin_before", None)
    (size,) = data["sizes"]
    for section in ("train", "inference"):
        for estimator in speed.VARLIN_ESTIMATORS:
            entry = size[section][f"before: varlin.{estimator}"]
            assert entry["baseline"] == "nn.Linear" and len(entry["times_ms"]) == 2
    assert data["before"] == {"path": str(src), "label": "same code"}
    assert not any(key.startswith("before: ") for key in size["memory"])
    markdown = (tmp_path / "speed.md").read_text()
    assert "Before and after in the same process: `same code`" in markdown
    with pytest.raises(SystemExit, match="--before: no varlin package in"):
        speed.main(
            ["--quick", "--before", str(tmp_path), "--malloc", "default", "--out", str(tmp_path)]
        )


def test_pin_malloc_fixes_glibc_thresholds_and_the_pages_say_so(tmp_path: Path) -> None:
    """In a process of its own (pinning lasts for the process): glibc accepts both values, and
    a quick run records the allocator state in its JSON and its machine line."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import speed; "
        "print(speed.pin_malloc() == speed.MALLOC_PINNED)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=SCRIPT.parents[1],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == "True"
    data = _run_quick(_load_speed(), tmp_path, "--rounds", "2", "--no-families")
    assert data["machine"]["malloc"] == "allocator defaults"
    assert "Allocator: allocator defaults." in (tmp_path / "speed.md").read_text()


def test_profile_flag_writes_per_op_tables(tmp_path: Path) -> None:
    """``--profile`` (issue 17): per-op self times of each train step and its phases, for
    nn.Linear, every estimator and every floor, as JSON and a trimmed markdown page."""
    speed = _load_speed()
    threads = torch.get_num_threads()
    try:
        speed.main(["--profile", "--quick", "--sizes", "16:4", "--malloc", "default",
                    "--out", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "speed_profile.json").read_text())
    (size,) = data["sizes"]
    expected = {"nn.Linear", *speed.FLOOR_OF, *speed.FLOOR_OF.values()}
    assert set(size["train"]) == expected
    for key, row in size["train"].items():
        assert _positive(row["wall_ms"]) and row["ops"], key
        assert any(op["op"] in ("aten::mm", "aten::addmm") for op in row["ops"]), key
        phases = set(row["phases"])
        if key.startswith("floor: "):
            assert phases == {"forward + backward", "Adam.step"}, key
        else:
            assert {"forward", "backward", "Adam.step"} <= phases, key
    markdown = (tmp_path / "speed_profile.md").read_text()
    assert "## Summary" in markdown and "**floor: flipout**" in markdown
    assert markdown.count("| op | calls / step | self ms / step |") == len(expected)


def test_fit_step_benchmark_writes_its_table_with_a_before_tree(tmp_path: Path) -> None:
    """benchmarks/fit_step.py --quick, with this tree's own src as the --before package."""
    script = SCRIPT.parent / "fit_step.py"
    src = SCRIPT.parents[1] / "src"
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--before", str(src), "--out", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads((out / "fit_step.json").read_text())
    (row,) = result["rows"]
    assert row["width"] == 8 and row["ms"] > 0 and row["before_ms"] > 0
    assert row["after_over_before"] > 0
    assert "after / before" in (out / "fit_step.md").read_text()
    assert result["machine"]["malloc"].startswith(("glibc malloc pinned", "allocator defaults"))
