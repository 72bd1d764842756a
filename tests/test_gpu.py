"""varlin on CUDA: priors move with the layer, noise is drawn on the device, no host syncs.

Skipped without CUDA (``pytest -m gpu`` selects them on a GPU machine). Each test is small; the
whole file runs in a few seconds on one GPU once CUDA is initialised.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import varlin
from varlin.convert import bayesian_last_layer, to_variational
from varlin.data import make_regression_1d
from varlin.likelihoods import Bernoulli, Gaussian

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ESTIMATORS = ("reparameterization", "local", "flipout")
CUDA = torch.device("cuda")


def _on_cuda(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


@contextlib.contextmanager
def _no_host_sync() -> Iterator[None]:
    """Inside, any operation that synchronises the host with the device raises."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with warnings.catch_warnings():
            # "Synchronization debug mode is a prototype feature ...", once per process.
            warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _mlp(estimator: str, generator: torch.Generator | None = None) -> nn.Sequential:
    return nn.Sequential(
        varlin.VariationalLinear(4, 16, estimator=estimator, generator=generator, device=CUDA),
        nn.Tanh(),
        varlin.VariationalLinear(16, 1, estimator=estimator, generator=generator, device=CUDA),
    )


@pytest.mark.parametrize(
    "prior", [varlin.priors.normal(0.5), varlin.priors.laplace(0.5), varlin.priors.scale_mixture()]
)
def test_layer_moves_to_cuda_with_its_priors(prior: varlin.priors.PriorFactory) -> None:
    layer = varlin.LinearVariationalNormal(3, 2, True, prior, prior).to(CUDA)
    assert _on_cuda(layer)
    assert all(t.device.type == "cuda" for t in layer.state_dict().values())
    p = layer.weight_prior()
    assert p.mean.device.type == "cuda" and p.batch_shape == (3, 2)
    y, kl = layer(torch.randn(5, 3, device=CUDA))
    assert y.device.type == "cuda" and kl.device.type == "cuda" and kl.dim() == 0
    # ... and back, in another dtype.
    layer = layer.to("cpu", torch.float64)
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in layer.buffers())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_forward_backward_with_a_cuda_generator(estimator: str) -> None:
    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)  # the same initial means
        gen = torch.Generator(device=CUDA).manual_seed(1)
        model = _mlp(estimator, gen)
        x = torch.randn(32, 4, device=CUDA)
        y = model(x)
        loss = y.square().mean() + varlin.kl_divergence(model) / 100
        loss.backward()
        return y.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    y, grads = run()
    assert y.shape == (32, 1) and y.device.type == "cuda"
    assert len(grads) == 8 and all(g.device.type == "cuda" for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # All noise comes from the device generator: the same seed gives the same draws.
    y2, grads2 = run()
    assert torch.equal(y, y2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("generator", [False, True])
def test_forward_kl_and_loss_make_no_host_sync(estimator: str, generator: bool) -> None:
    gen = torch.Generator(device=CUDA).manual_seed(0) if generator else None
    model = _mlp(estimator, gen)
    elbo = varlin.ELBO(Gaussian(0.1).to(CUDA), num_data=1000)
    x = torch.randn(64, 4, device=CUDA)
    target = torch.randn(64, device=CUDA)
    elbo(model(x), target, varlin.kl_divergence(model))  # warm-up: lazy CUDA initialisation
    with _no_host_sync():
        output = model(x)
        kl = varlin.kl_divergence(model)
        loss = elbo(output, target, kl)
        with varlin.deterministic(model):
            model(x)
    assert loss.device.type == "cuda"


@pytest.mark.parametrize(
    "prior",
    [
        pytest.param(varlin.priors.laplace(0.5), id="laplace"),
        pytest.param(varlin.priors.scale_mixture(), id="scale_mixture"),
    ],
)
def test_kl_with_a_monte_carlo_prior_makes_no_host_sync(prior: varlin.priors.PriorFactory) -> None:
    layer = varlin.VariationalLinear(4, 3, make_weights_prior=prior, device=CUDA)
    layer.kl_divergence()
    with _no_host_sync():
        kl = layer.kl_divergence()
    assert kl.device.type == "cuda"


def test_to_variational_keeps_the_device() -> None:
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(CUDA, torch.float64)
    bnn = to_variational(net, init_scale="moped", prior_at_weights=True)
    assert _on_cuda(bnn)
    x = torch.randn(10, 2, device=CUDA, dtype=torch.float64)
    with torch.no_grad(), varlin.deterministic(bnn):
        assert torch.allclose(bnn(x), net(x), rtol=0.0, atol=1e-12)


def test_predict_on_cuda() -> None:
    model = _mlp("local")
    x = torch.randn(50, 4, device=CUDA)
    lik = Gaussian(0.3).to(CUDA)
    pred = varlin.predict(model, x, likelihood=lik, num_samples=16)
    assert pred.mean.device.type == "cuda" and pred.mean.shape == (50,)
    assert bool((pred.epistemic > 0).all())
    probs = varlin.predict(model, x, likelihood=Bernoulli(), num_samples=16)
    assert probs.probs.device.type == "cuda" and probs.probs.shape == (50, 2)
    # A Bayesian last layer on the device: closed form, and Monte Carlo close to it.
    bll = bayesian_last_layer(nn.Sequential(nn.Linear(4, 8), nn.Tanh()).to(CUDA), 8, 1)
    closed = varlin.predict(bll, x, likelihood=lik, method="closed_form")
    mc = varlin.predict(bll, x, likelihood=lik, method="mc", num_samples=2000)
    assert closed.mean.device.type == "cuda"
    assert torch.allclose(mc.mean, closed.mean, atol=0.05)


@pytest.mark.filterwarnings("ignore::varlin.training.VarlinWarning")  # 2 epochs: a smoke run
def test_fit_two_epochs_on_cuda() -> None:
    data = make_regression_1d(128, seed=0)  # CPU tensors: fit moves them to the model's device
    model = nn.Sequential(
        varlin.VariationalLinear(1, 32, device=CUDA),
        nn.Tanh(),
        varlin.VariationalLinear(32, 1, device=CUDA),
    )
    lik = Gaussian(0.3, learn_noise=True)
    history = varlin.fit(
        model,
        data.x,
        data.y,
        likelihood=lik,
        epochs=2,
        batch_size=32,
        validation=(data.x.to(CUDA), data.y.to(CUDA)),
        progress=False,
    )
    assert len(history) == 2
    assert all(math.isfinite(r[k]) for r in history.records for k in ("loss", "val_nll"))
    assert _on_cuda(model) and _on_cuda(lik)


def test_fit_on_cuda_with_cpu_validation_data() -> None:
    data = make_regression_1d(64, seed=0)
    model = varlin.VariationalLinear(1, 1, device=CUDA)
    varlin.fit(
        model,
        data.x,
        data.y,
        likelihood=Gaussian(0.3),
        epochs=1,
        validation=(data.x, data.y),
        progress=False,
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_on_cuda_matches_the_op_by_op_path_without_host_syncs(estimator: str) -> None:
    """The seed layer's one-node step (varlin._fused) on the device: the prior's numbers are not
    read there, so no sync in the forward or the backward, and the output, the KL and the
    gradients are those of the op-by-op path for the same noise (recording the KL too)."""
    gen = torch.Generator(device=CUDA)
    layer = varlin.LinearVariationalNormal(8, 5, estimator=estimator, generator=gen, device=CUDA)
    x = torch.randn(6, 8, device=CUDA)

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        gen.manual_seed(3)
        if fused:
            with varlin.layers.recording_kl(layer) as kl_of:
                y, kl = layer(x, kl_weight=0.1)
                assert torch.equal(0.1 * kl_of(), kl)
            assert type(y.grad_fn).__name__ == "_MeanFieldStepBackward"
        else:
            t = layer._realise()
            y, kl = layer._output(x, t), 0.1 * layer._kl_divergence(t)
        grads = torch.autograd.grad(y.square().mean() + kl, list(layer.parameters()))
        return y.detach(), kl.detach(), list(grads)

    run(True)  # warm-up: lazy CUDA initialisation
    with _no_host_sync():
        y, kl, grads = run(True)
    y_ref, kl_ref, grads_ref = run(False)
    assert torch.equal(y, y_ref) and torch.equal(kl, kl_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
