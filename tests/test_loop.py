"""The named parts of the training loop, each on its own (``fit`` end to end: test_training.py).

Batches, step, schedule, evaluation and early stopping, checkpointer, progress, data-parallel
hooks and diagnostics; closed forms where there are any (the cosine schedule, the warm-up),
otherwise the behaviour ``fit`` relies on, stated per part.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import varlin
from varlin.batches import LoaderBatches, TensorBatches, check_loader, check_tensor_data
from varlin.checkpoints import Checkpointer, from_checkpoint, per_model, save_checkpoint
from varlin.diagnostics import Diagnostics
from varlin.elbo import ELBO
from varlin.errors import CheckpointError
from varlin.evaluation import EarlyStopping, Evaluation
from varlin.history import History
from varlin.likelihoods import Gaussian
from varlin.loop import (
    STATE_KEYS,
    DataParallelHooks,
    Progress,
    Schedule,
    Step,
    _Diverged,
    default_optimizer,
)
from varlin.training import SingleModel

# -- the default optimiser --------------------------------------------------------------------


def _adam_run(make: Any, steps: int = 20) -> list[Tensor]:
    """``steps`` Adam steps on three tensors of different shapes from fixed gradients."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (5,), ()]]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


def test_default_optimizer_is_fused_adam_and_updates_as_the_plain_one() -> None:
    opt = default_optimizer([nn.Parameter(torch.zeros(3))], 0.1)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.1
    assert opt.defaults["fused"] is True  # torch 2.4+ has a CPU kernel; the pinned torch does
    fused = _adam_run(lambda p: default_optimizer(p, 0.05))
    plain = _adam_run(lambda p: torch.optim.Adam(p, 0.05))
    for a, b in zip(fused, plain, strict=True):
        # 20 steps of size <= lr from the same gradients: equal to float32 rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_default_optimizer_falls_back_to_plain_adam_where_torch_refuses_fused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OldAdam(torch.optim.Adam):  # an older torch: no fused kernel for the CPU
        def __init__(self, params: Any, lr: float, **kwargs: Any) -> None:
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be on CUDA")
            super().__init__(params, lr, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", OldAdam)
    params = (p for p in [nn.Parameter(torch.zeros(3))])  # an iterator is read once
    opt = default_optimizer(params, 0.1)  # type: ignore[arg-type]
    assert type(opt) is OldAdam and not opt.defaults["fused"]
    assert len(opt.param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="empty parameter list"):  # real errors still raise
        default_optimizer([], 0.1)


# -- schedule ---------------------------------------------------------------------------------


def test_cosine_schedule_matches_its_closed_form_and_constant_is_one() -> None:
    schedule = Schedule("cosine", total_steps=10, beta=1.0, warmup_epochs=0)
    for step in range(12):
        want = 0.5 * (1 + math.cos(math.pi * min(step, 10) / 10))
        assert schedule.factor(step) == pytest.approx(want, abs=1e-15)
    assert schedule.factor(0) == 1.0 and schedule.factor(10) == pytest.approx(0.0, abs=1e-15)
    assert Schedule("constant", 10, 1.0, 0).factor(7) == 1.0


def test_kl_warmup_ramps_beta_linearly_then_holds() -> None:
    schedule = Schedule("constant", 10, beta=0.5, warmup_epochs=4)
    assert [schedule.beta(e) for e in range(6)] == pytest.approx(
        [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    )
    assert Schedule("constant", 10, beta=0.5, warmup_epochs=0).beta(0) == 0.5


def test_schedule_sets_the_learning_rate_per_step_and_on_resume() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    schedule = Schedule("cosine", total_steps=4, beta=1.0, warmup_epochs=0)
    sched = schedule.attach(opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * schedule.factor(s) for s in range(4)])
    # A resumed run with a longer schedule continues on *its* curve from the saved step.
    longer = Schedule("cosine", total_steps=8, beta=1.0, warmup_epochs=0)
    longer.resume(opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * longer.factor(4))


# -- batches ----------------------------------------------------------------------------------


def test_tensor_batches_cover_the_data_once_per_epoch_in_a_seeded_order() -> None:
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10.0)
    batches = TensorBatches(x, y, 4, [3], stacked=False)
    assert batches.steps_per_epoch == 3
    epoch = list(batches)
    assert [len(b[0]) for b in epoch] == [4, 4, 2]
    order = torch.cat([b[1] for b in epoch])
    assert torch.equal(
        order, torch.randperm(10, generator=torch.Generator().manual_seed(3)).float()
    )
    assert torch.equal(torch.cat([b[0] for b in epoch]).squeeze(1), order)
    assert not torch.equal(torch.cat([b[1] for b in batches]), order)  # reshuffled next epoch


def test_stacked_batches_give_each_model_the_batches_of_its_own_seed() -> None:
    xs = torch.randn(3, 10, 2)
    ys = torch.randn(3, 10)
    stacked = list(TensorBatches(xs, ys, 4, [5, 6, 7], stacked=True, per_model=True))
    for k, seed in enumerate([5, 6, 7]):
        alone = list(TensorBatches(xs[k], ys[k], 4, [seed], stacked=False))
        for (xb, yb), (xa, ya) in zip(stacked, alone, strict=True):
            assert torch.equal(xb[k], xa) and torch.equal(yb[k], ya)
    shared = list(TensorBatches(xs[0], ys[0], 4, [5, 6], stacked=True))
    assert shared[0][0].shape == (2, 4, 2)
    alone = list(TensorBatches(xs[0], ys[0], 4, [6], stacked=False))
    assert torch.equal(shared[0][0][1], alone[0][0])


def test_loader_batches_and_their_checks() -> None:
    loader = [(torch.ones(2, 3), torch.zeros(2)), (torch.ones(1, 3), torch.zeros(1))]
    assert [
        xb.shape for xb, _ in LoaderBatches(loader, torch.device("cpu"), [0], stacked=False)
    ] == [
        (2, 3),
        (1, 3),
    ]
    stacked = list(LoaderBatches(loader, torch.device("cpu"), [0, 1, 2], stacked=True))
    assert stacked[0][0].shape == (3, 2, 3) and stacked[1][1].shape == (3, 1)
    assert LoaderBatches(loader, torch.device("cpu"), [0], stacked=False).steps_per_epoch == 2
    assert check_loader(loader, None) == 0
    with pytest.raises(TypeError, match="sized, re-iterable"):
        check_loader(iter(loader), None)
    with pytest.raises(TypeError, match="pass y only with tensor x"):
        check_loader(loader, torch.zeros(3))
    with pytest.raises(ValueError, match="x must hold at least one row"):
        check_tensor_data(torch.zeros(0, 3), torch.zeros(0))


def test_shuffle_state_round_trips_in_both_checkpoint_layouts() -> None:
    x, y = torch.randn(6, 1), torch.randn(6)
    single = TensorBatches(x, y, 2, [1], stacked=False)
    list(single)
    state = single.state_dict()
    assert isinstance(state["shuffle_rng"], Tensor)  # fit's layout: one generator state
    after = [b[1] for b in single]
    again = TensorBatches(x, y, 2, [99], stacked=False)
    again.load_state_dict(state)
    assert all(torch.equal(a, b[1]) for a, b in zip(after, again, strict=True))
    several = TensorBatches(x, y, 2, [1, 2], stacked=True)
    assert isinstance(several.state_dict()["shuffle_rng"], list)
    assert per_model([1, 2], stacked=False) == 1 and from_checkpoint(1, stacked=False) == [1]
    assert per_model([1, 2], stacked=True) == [1, 2] == from_checkpoint([1, 2], stacked=True)


# -- step -------------------------------------------------------------------------------------


def _trainee() -> SingleModel:
    torch.manual_seed(0)
    model = nn.Sequential(varlin.VariationalLinear(2, 3), nn.Tanh(), varlin.VariationalLinear(3, 1))
    likelihood = Gaussian(0.5, learn_noise=True)
    return SingleModel(model, likelihood, ELBO(likelihood, 100))


def test_step_returns_the_terms_and_updates_every_parameter_once() -> None:
    trainee = _trainee()
    opt = torch.optim.SGD(trainee.parameters(), lr=0.1)
    sched = Schedule("constant", 1, 1.0, 0).attach(opt)
    x, y = torch.randn(5, 2), torch.randn(5)
    before = [p.detach().clone() for p in trainee.parameters()]
    torch.manual_seed(1)
    terms = trainee.terms(x, y, 1.0)
    terms.loss.backward()
    want_grads = [p.grad.clone() for p in trainee.parameters()]  # type: ignore[union-attr]
    torch.manual_seed(1)  # the same noise again
    values = Step(trainee, opt, sched)(x, y, 1.0, [True], (0, 0))
    assert [v[0] for v in values] == pytest.approx([float(t.detach()) for t in terms])
    for p, b, g in zip(trainee.parameters(), before, want_grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    assert len(trainee.parameters()) == len({id(p) for p in trainee.parameters()})


def test_step_stops_on_a_non_finite_loss_before_any_update() -> None:
    trainee = _trainee()
    opt = torch.optim.SGD(trainee.parameters(), lr=0.1)
    sched = Schedule("constant", 1, 1.0, 0).attach(opt)
    before = [p.detach().clone() for p in trainee.parameters()]
    x = torch.full((4, 2), 1e30)  # tanh survives, but the KL term is fine: poison the output
    trainee.model[2].w_posterior.loc.data.fill_(float("inf"))
    before = [p.detach().clone() for p in trainee.parameters()]
    with pytest.raises(_Diverged, match=r"the loss became \S+ at epoch 3, step 2 \(nll="):
        Step(trainee, opt, sched)(x, torch.zeros(4), 1.0, [True], (3, 2))
    for p, b in zip(trainee.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


# -- evaluation and early stopping ------------------------------------------------------------


class _States:
    """A stand-in for the trained models: its state is a counter, one entry per model."""

    def __init__(self, k: int) -> None:
        self.value = torch.zeros(k)
        self.restored: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"model": {"v": self.value.clone()}, "likelihood": {}}

    def keep(self, best: Any, current: Any, improved: list[bool]) -> dict[str, Any]:
        if best is None:
            return current
        mask = torch.tensor(improved)
        best["model"]["v"][mask] = current["model"]["v"][mask]
        return best

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.restored = snapshot


def test_early_stopping_keeps_each_models_best_and_stops_after_patience() -> None:
    states, stopper = _States(2), EarlyStopping(2, 2, stacked=True)
    val = [(3.0, 5.0), (2.0, 4.0), (2.5, 4.5), (2.6, 3.0), (1.0, 3.5)]
    stopped = []
    for epoch, scores in enumerate(val):
        states.value += 1
        active = stopper.active
        stopper.update(
            states, epoch, [s if a else None for s, a in zip(scores, active, strict=True)]
        )
        stopped.append(stopper.check(active, epoch, epochs=10))
    # model 0: best at epoch 1, bad at 2 and 3 -> stops after epoch 3 (its 1.0 at epoch 4 is
    # not seen); model 1: best at 1, then 3, never two bad epochs in a row
    assert stopped[2] == [False, False] and stopped[3] == stopped[4] == [True, False]
    assert stopper.best_epoch == [1, 3] and stopper.best_val == [2.0, 3.0]
    assert stopper.best_state is not None
    assert stopper.best_state["model"]["v"].tolist() == [2.0, 4.0]
    histories = [History(records=[{"epoch": 3.0}]), History(records=[{"epoch": 4.0}])]
    stopper.finish(states, histories)
    assert states.restored is stopper.best_state
    assert [h.best_epoch for h in histories] == [1, 3]


def test_patience_running_out_on_the_last_epoch_is_no_early_stop() -> None:
    states, stopper = _States(1), EarlyStopping(1, 1, stacked=False)
    for epoch, v in enumerate([1.0, 2.0]):
        stopper.update(states, epoch, [v])
        flags = stopper.check([True], epoch, epochs=2)
    assert flags == [False]
    state = stopper.state_dict()  # fit's layout: one model's numbers, not lists
    assert state["bad_epochs"] == 1 and state["best"]["val_nll"] == 1.0
    again = EarlyStopping(1, 1, stacked=False)
    again.load_state_dict(state, [History()])
    assert again.best_val == [1.0] and again.bad_epochs == [1] and again.best_epoch == [0]


def test_evaluation_scores_active_models_in_eval_mode() -> None:
    trainee = _trainee()
    seen: list[bool] = []
    trainee.model.register_forward_hook(lambda m, a, o: seen.append(m.training))
    x, y = torch.randn(8, 2), torch.randn(8)
    scores = Evaluation([(x, y)], num_samples=4)(trainee.members(), [True])
    assert set(scores[0]) == {"val_nll", "val_rmse"} and math.isfinite(scores[0]["val_nll"])
    assert seen and not any(seen) and trainee.model.training
    assert Evaluation([(x, y)], num_samples=4)(trainee.members(), [False]) == [{}]


# -- checkpointer, progress, data-parallel hooks, diagnostics --------------------------------


def test_checkpointer_resumes_only_what_the_loop_wrote(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    assert Checkpointer(path, resume=True, keys=STATE_KEYS).resume_state() is None  # no file yet
    Checkpointer(None, resume=True, keys=STATE_KEYS).save({"epoch": 0})  # no path: nothing
    assert not path.exists()
    save_checkpoint(path, {"epoch": 2})
    with pytest.raises(CheckpointError, match=r"run\.pt' was not written by varlin.fit"):
        Checkpointer(path, resume=True, keys=STATE_KEYS).resume_state()
    assert Checkpointer(path, resume=False, keys=STATE_KEYS).resume_state() is None
    full = dict.fromkeys(STATE_KEYS, 0)
    Checkpointer(path, resume=True, keys=STATE_KEYS).save(full)
    assert Checkpointer(path, resume=True, keys=STATE_KEYS).resume_state() == {
        "format": 1,
        **full,
    }


def test_progress_shows_the_mean_over_models(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(True, 0, 1)
    for epoch in progress:
        records = [{"loss": 1.0, "nll": 0.5, "kl": 2.0}, {"loss": 3.0, "nll": 1.5, "kl": 4.0}]
        progress.show(records, epoch, last=False)
    progress.close()
    err = capsys.readouterr().err
    assert "elbo=-2" in err and "nll=1" in err and "kl=3" in err
    quiet = Progress(False, 0, 1)
    for epoch in quiet:
        quiet.show([{"loss": 1.0, "nll": 0.5, "kl": 2.0}], epoch, last=True)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_data_parallel_hooks_are_a_no_op_outside_a_process_group() -> None:
    trainee = _trainee()
    hooks = DataParallelHooks(trainee.model, trainee.likelihood)
    assert hooks.world == 1 and hooks.params == [trainee.likelihood.raw_noise_scale]
    trainee.likelihood.raw_noise_scale.grad = torch.tensor(2.0)
    hooks.broadcast()
    hooks.average_grads()
    assert float(trainee.likelihood.raw_noise_scale.grad) == 2.0
    assert DataParallelHooks().params == []


def test_diagnostics_count_steps_per_active_model_and_keep_the_first_nll() -> None:
    models = [nn.Sequential(varlin.VariationalLinear(1, 2)) for _ in range(2)]
    diagnostics = Diagnostics(models, stacked=True)
    diagnostics.step([0.7, 0.9], [True, True])
    diagnostics.step([0.5, 0.8], [True, False])
    assert diagnostics.start_nll == [0.7, 0.9] and diagnostics.steps == [2, 1]
    state = diagnostics.state_dict()
    assert state["steps"] == [2, 1]
    single = Diagnostics(models[:1], stacked=False)
    single.step([0.3], [True])
    assert single.state_dict()["start_nll"] == 0.3 and single.state_dict()["steps"] == 1
