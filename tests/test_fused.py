"""The one-node training step of a mean-field layer (``varlin._fused``), against two routes.

1. The op-by-op path it replaces (``_realise``, ``_output``, ``_kl_divergence``: autograd through
   ``varlin.functional`` and ``varlin.kl``): the same output and KL bit for bit for the same
   noise, the same gradients to float64 rounding.
2. Finite differences (``torch.autograd.gradcheck``) of the hand-written backward, and of the
   gradients' own gradients (``gradgradcheck``), with the noise held fixed by reseeding the
   generator before every call.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import varlin
from varlin import _fused, priors

ESTIMATORS = ["reparameterization", "local", "flipout"]
PRIORS: dict[str, Any] = {
    "default": None,
    "shifted": priors.normal(0.7, loc=0.2),
    "full-size": lambda i, o: torch.distributions.Normal(
        torch.linspace(-0.3, 0.3, i * o, dtype=torch.float64).reshape(i, o),
        torch.linspace(0.5, 1.5, i * o, dtype=torch.float64).reshape(i, o),
    ),
    "learned": priors.normal(learn_scale=True),
}


def _layer(estimator: str, bias: bool, prior: str, seed: int = 0) -> varlin.LinearVariationalNormal:
    layer = varlin.LinearVariationalNormal(
        4, 3, bias, PRIORS[prior], estimator=estimator, init_scale=0.3,
        generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():  # scales that differ per weight, one of them at the local clamp
        layer.w_posterior.raw_scale.add_(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
    return layer


def _step(layer: varlin.LinearVariationalNormal, x: torch.Tensor, fused: bool) -> Any:
    assert layer.generator is not None
    layer.generator.manual_seed(11)
    if fused:
        y, kl = layer(x, kl_weight=0.37)
        assert type(y.grad_fn).__name__ == "_MeanFieldStepBackward"
    else:
        t = layer._realise()
        y, kl = layer._output(x, t), 0.37 * layer._kl_divergence(t)
        assert type(y.grad_fn).__name__ != "_MeanFieldStepBackward"
    target = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    loss = (y - target).square().mean() + kl
    leaves = [x, *layer.parameters()]
    grads = torch.autograd.grad(loss, leaves)
    return (
        y.detach(),
        kl.detach(),
        dict(zip(["x", *dict(layer.named_parameters())], grads, strict=True)),
    )


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_fused_step_equals_the_op_by_op_path(
    estimator: str, bias: bool, prior: str, lead: tuple[int, ...]
) -> None:
    layer = _layer(estimator, bias, prior)
    x = torch.randn(*lead, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    y, kl, grads = _step(layer, x, fused=True)
    y_ref, kl_ref, grads_ref = _step(layer, x, fused=False)
    assert torch.equal(y, y_ref)
    assert torch.equal(kl, kl_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        # The same terms; in-place accumulation may round once where autograd rounds twice.
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-13, atol=1e-15, msg=name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_backward_matches_finite_differences(estimator: str) -> None:
    layer = _layer(estimator, True, "learned")
    gen = torch.Generator()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    post, bias, prior = layer.w_posterior, layer.b_posterior, layer.w_prior
    assert bias is not None and layer.b_prior is not None
    b_prior = (layer.b_prior.tensor("loc"), layer.b_prior.tensor("scale"))
    p_loc = prior.tensor("loc").detach()
    inputs = tuple(
        t.detach().clone().requires_grad_()
        for t in (x, post.loc, post.raw_scale, bias.loc, bias.raw_scale, prior.tensor("scale"))
    )

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen.manual_seed(3)  # the same noise on every call: the map is deterministic
        x_, loc, raw, b_loc, b_raw, p_scale = args
        return _fused.meanfield_step(
            estimator, x_, loc, raw, b_loc, b_raw, (p_loc, p_scale),
            (b_prior[0].detach(), b_prior[1].detach()), gen,
        )  # fmt: skip

    assert torch.autograd.gradcheck(step, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    # second derivatives too (create_graph=True: the backward's own operations are recorded)
    assert torch.autograd.gradgradcheck(step, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_cases_the_fused_step_does_not_serve_take_the_op_by_op_path() -> None:
    """Each of these computes what it computed before: not through the one-node step."""
    x = torch.randn(6, 4)
    cases = {
        "laplace prior": varlin.LinearVariationalNormal(4, 3, True, priors.laplace()),
        "lowrank family": varlin.LinearVariationalNormal(4, 3, posterior="lowrank", rank=1),
    }
    for name, layer in cases.items():
        y, _ = layer(x)
        assert type(y.grad_fn).__name__ != "_MeanFieldStepBackward", name
    layer = varlin.LinearVariationalNormal(4, 3)
    y, _ = layer(x[0])  # one unbatched example
    assert y.shape == (3,) and type(y.grad_fn).__name__ != "_MeanFieldStepBackward"
    with varlin.deterministic(layer):
        y, _ = layer(x)
    torch.testing.assert_close(y, x @ layer.w_loc + layer.b_loc, rtol=0, atol=0)
    with varlin.layers.weight_samples(layer, 2):
        y, _ = layer(x.expand(2, 6, 4))
    assert y.shape == (2, 6, 3) and type(y.grad_fn).__name__ != "_MeanFieldStepBackward"
    half = varlin.LinearVariationalNormal(4, 3, dtype=torch.float16)
    y, kl = half(x.half())
    assert type(y.grad_fn).__name__ != "_MeanFieldStepBackward" and kl.dtype == torch.float32


def _model(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    shared = varlin.VariationalLinear(4, 4, generator=g, estimator="flipout")
    return torch.nn.ModuleDict({
        "first": varlin.VariationalLinear(3, 4, generator=g),
        "shared": shared,  # called twice: two samples, one KL
        "lowrank": varlin.VariationalLinear(4, 4, posterior="lowrank", rank=1, generator=g),
        # another prior (its KL closed form through torch's registry, not the one-node step)
        "laplace": varlin.VariationalLinear(4, 2, make_weights_prior=priors.laplace(), generator=g),
        "unused": varlin.VariationalLinear(2, 2, generator=g),
    })  # fmt: skip


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(model["first"](x))
    h = model["shared"](torch.relu(model["shared"](h)))
    return model["laplace"](model["lowrank"](h))


def test_recording_kl_gives_the_models_kl_bit_for_bit_and_the_same_gradients() -> None:
    """The KL recorded with the outputs is ``kl_divergence(model)``: the same value, and (with the
    noise reseeded) the same output and gradients to rounding; every other layer (another family
    or prior, one not called) is computed by the function; recording ends with the block."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    def run(record: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model = _model(0)  # every layer's noise from one seeded generator
        if record:
            with varlin.layers.recording_kl(model) as kl_of:
                y = _forward(model, x)
            kl = kl_of()
            assert all(layer._kl_record is None for layer in varlin.variational_layers(model))
        else:
            y = _forward(model, x)
            kl = varlin.kl_divergence(model)
        loss = y.square().mean() + kl / 100
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return y.detach(), kl.detach(), [torch.zeros(()) if g is None else g for g in grads]

    y, kl, grads = run(True)
    y_ref, kl_ref, grads_ref = run(False)
    assert torch.equal(y, y_ref)
    assert torch.equal(kl, kl_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_recording_kl_keeps_one_kl_per_layer_and_what_the_fused_step_returned() -> None:
    model = _model(0)
    x = torch.randn(5, 3)
    with varlin.layers.recording_kl(model) as kl_of:
        _forward(model, x)
        records = {name: layer._kl_record for name, layer in model.items()}
    assert records["shared"] is not None and len(records["shared"]) == 2
    assert records["first"] is not None and len(records["first"]) == 1
    assert records["lowrank"] == [] and records["laplace"] == [] and records["unused"] == []
    assert type(records["first"][0].grad_fn).__name__ == "_MeanFieldStepBackward"
    total = kl_of()
    torch.testing.assert_close(total, varlin.kl_divergence(model), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_where_the_prior_cannot_be_read_as_numbers(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the prior's numbers are not read (a sync): the KL takes the elementwise
    form and its gradients ``kl._kl_sum_grads``; the same checks as on the CPU's path."""
    monkeypatch.setattr(varlin.kl, "_prior_scalars", lambda p_loc, p_scale: None)
    monkeypatch.setattr(_fused, "_prior_scalars", lambda p_loc, p_scale: None)
    layer = _layer(estimator, True, "shifted")
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    y, kl, grads = _step(layer, x, fused=True)
    y_ref, kl_ref, grads_ref = _step(layer, x, fused=False)
    assert torch.equal(y, y_ref) and torch.equal(kl, kl_ref)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-13, atol=1e-15, msg=name)
