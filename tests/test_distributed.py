"""varlin under torch.distributed: DistributedDataParallel on 2 CPU processes (gloo).

The ELBO is per datum, ``loss = -mean_batch E_q[log p(y|x)] + KL / N`` with ``N`` the *global*
dataset size. DDP averages gradients over the ranks, so with equal per-rank batches the averaged
gradient is the gradient of ``-mean over all 2B examples + KL / N``: the data term is the global
mean and the KL is counted exactly once. The tests check that against a single process that
sees all 2B examples, with the same noise (deterministic mode, or identically seeded
reparameterization noise), in float64 to 1e-12.

Starting 2 processes costs seconds on a busy machine, so the workers are spawned once for the
module (a fixture) and run every scenario; a scenario that raises writes its traceback next to
the results and only the tests reading it fail. Workers use one thread and a 30 s collective
timeout; the parent stops them after 120 s instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import varlin
from varlin.data import make_regression_1d
from varlin.likelihoods import Gaussian

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

F64 = torch.float64
WORLD = 2
B = 4  # examples per rank in the one-step test
IN, HIDDEN, OUT = 3, 5, 1
NUM_DATA = 64  # global dataset size N for the KL scaling: the step is a minibatch step
LR = 0.1
#: "lowrank": the same-noise step for a model whose layers have a low-rank posterior (their
#: weight samples draw the diagonal and the factor noise from the layer's generator).
#: "conv": the same-noise step for a small CNN (variational convolutions, issue 13).
MODES = ("deterministic", "same_noise", "lowrank", "conv")
FIT_DATA, FIT_BATCH = 64, 8


# -- helpers shared by the workers and the single-process reference ---------------------------
def _conv_model() -> nn.Module:
    """A small float64 CNN on the rows of ``_data`` read as 1-channel signals, identical on
    every rank; reparameterization noise from identically seeded generators (one kernel per
    layer per call, as in "same_noise")."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = varlin.VariationalConv1d(1, 4, 2, padding=1, init_scale=0.1, dtype=F64)
        second = varlin.VariationalConv1d(
            4, 2, 2, groups=2, padding_mode="replicate", padding=1, init_scale=0.1, dtype=F64
        )
        head = varlin.VariationalLinear(2 * (IN + 2), OUT, init_scale=0.1, dtype=F64)
    for seed, layer in enumerate((first, second, head)):
        layer.generator = torch.Generator().manual_seed(200 + seed)
    return nn.Sequential(nn.Unflatten(1, (1, IN)), first, nn.Tanh(), second, nn.Flatten(), head)


def _model(mode: str) -> nn.Module:
    """A small float64 network, identical on every rank (fixed seed, caller's RNG untouched)."""
    if mode == "conv":
        return _conv_model()
    family: dict[str, Any] = {"posterior": "lowrank", "rank": 2} if mode == "lowrank" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = varlin.VariationalLinear(IN, HIDDEN, init_scale=0.1, dtype=F64, **family)
        second = varlin.VariationalLinear(HIDDEN, OUT, init_scale=0.1, dtype=F64, **family)
    if mode in ("same_noise", "lowrank"):
        # One weight sample per layer per call (reparameterization), from identically seeded
        # generators: every rank draws the weights the single process draws for all 2B rows.
        first.generator = torch.Generator().manual_seed(100)
        second.generator = torch.Generator().manual_seed(101)
    return nn.Sequential(first, nn.Tanh(), second)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * B, IN, generator=g, dtype=F64)
    y = torch.randn(WORLD * B, generator=g, dtype=F64)
    return x, y


def _sgd_step(
    wrapped: nn.Module, inner: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, num_data: int
) -> None:
    """One SGD step on the per-datum negative ELBO; ``wrapped`` may be a DDP of ``inner``."""
    elbo = varlin.ELBO(Gaussian(0.5), num_data=num_data)
    ctx = varlin.deterministic(inner) if mode == "deterministic" else contextlib.nullcontext()
    with ctx:
        loss = elbo(wrapped(x), y, varlin.kl_divergence(inner))
    loss.backward()
    # Plain SGD written out: the update is exactly -LR times the (rank-averaged) gradient.
    with torch.no_grad():
        for param in inner.parameters():
            assert param.grad is not None
            param.sub_(LR * param.grad)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the worker's scenarios (top level, so that spawn can pickle them) --------------------------
def _one_step(rank: int, out: Path) -> None:
    x, y = _data()
    rows = slice(rank * B, (rank + 1) * B)
    for mode in MODES:
        model = _model(mode)
        _sgd_step(DistributedDataParallel(model), model, x[rows], y[rows], mode, NUM_DATA)
        torch.save(_state(model), out / f"{mode}-rank{rank}.pt")


def _fit_one_epoch(rank: int, out: Path) -> None:
    # Different initial weights and noise on each rank: DDP must broadcast rank 0's parameters,
    # and each rank should draw its own noise.
    torch.manual_seed(rank)
    model = nn.Sequential(
        varlin.VariationalLinear(1, 16), nn.Tanh(), varlin.VariationalLinear(16, 1)
    )
    data = make_regression_1d(FIT_DATA, seed=0)
    dataset = TensorDataset(data.x, data.y)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=0
    )
    loader = DataLoader(dataset, batch_size=FIT_BATCH, sampler=sampler)
    likelihood = Gaussian(0.3, learn_noise=True)
    history = varlin.fit(
        DistributedDataParallel(model),
        loader,
        likelihood=likelihood,
        epochs=1,
        num_data=len(dataset),
        progress=False,
    )
    result = {
        "model": _state(model),
        "likelihood": _state(likelihood),
        "records": history.records,
        "steps": len(loader),
    }
    torch.save(result, out / f"fit-rank{rank}.pt")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    out = Path(out_dir)
    try:
        for scenario in (_one_step, _fit_one_epoch):
            try:
                scenario(rank, out)
            except Exception:
                (out / f"{scenario.__name__}-rank{rank}.error").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _spawn(fn: Any, args: tuple[Any, ...], timeout: float = 120.0) -> None:
    """``mp.spawn`` with a deadline: stop our workers and fail instead of hanging."""
    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    assert context is not None
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises if a worker died with an exception
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"the {WORLD} DDP workers did not finish within {timeout:.0f} s")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, (str(out / "init"), str(out)))
    return out


def _load(out: Path, scenario: str, name: str) -> Any:
    for error in sorted(out.glob(f"{scenario}-rank*.error")):
        pytest.fail(f"{error.name}:\n{error.read_text()}")
    return torch.load(out / name, weights_only=True)


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_ddp_step_equals_single_process_step(results: Path, mode: str) -> None:
    """One DDP step on 2 x B examples == one step of one process on the same 2B examples."""
    x, y = _data()
    reference = _model(mode)
    initial = _state(reference)
    _sgd_step(reference, reference, x, y, mode, NUM_DATA)
    expected = _state(reference)
    for rank in range(WORLD):
        got = _load(results, "_one_step", f"{mode}-rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name].dtype == F64
            assert torch.allclose(got[name], value, rtol=0.0, atol=1e-12), (
                f"rank {rank}, {name}: max |diff| = {(got[name] - value).abs().max():.3g}"
            )
    # The step moved every parameter, so the comparison is not trivially true.
    for name, _ in reference.named_parameters():
        assert not torch.allclose(expected[name], initial[name], rtol=0.0, atol=1e-9), name


def test_ddp_step_comparison_detects_a_kl_counted_twice() -> None:
    """The comparison is sensitive to the KL scaling: counting the KL once per rank (like
    num_data=N/2 in one process) changes the update far beyond the 1e-12 tolerance."""
    x, y = _data()
    once, twice = _model("deterministic"), _model("deterministic")
    _sgd_step(once, once, x, y, "deterministic", NUM_DATA)
    _sgd_step(twice, twice, x, y, "deterministic", NUM_DATA // WORLD)
    with torch.no_grad():
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(once.parameters(), twice.parameters(), strict=True)
        )
    assert diff > 1e-6


def test_fit_runs_under_ddp_and_ranks_agree(results: Path) -> None:
    """``varlin.fit`` on a DDP model with a DistributedSampler loader, one epoch, 2 ranks."""
    first, second = (_load(results, "_fit_one_epoch", f"fit-rank{r}.pt") for r in range(WORLD))
    # 64 examples, 2 ranks, batches of 8: 4 steps per rank, and the KL scaled by the global 64.
    assert first["steps"] == second["steps"] == FIT_DATA // (WORLD * FIT_BATCH)
    for result in (first, second):
        (record,) = result["records"]
        assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "nll", "kl"))
        assert record["kl_term"] == pytest.approx(record["kl"] / FIT_DATA, rel=0.05)
    assert first["model"].keys() == second["model"].keys()
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), f"ranks differ in {name}"


def test_fit_under_ddp_keeps_learned_noise_in_sync(results: Path) -> None:
    first, second = (_load(results, "_fit_one_epoch", f"fit-rank{r}.pt") for r in range(WORLD))
    for name, value in first["likelihood"].items():
        assert torch.equal(value, second["likelihood"][name]), f"ranks differ in {name}"
