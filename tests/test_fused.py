"""The one-node training step of a mean-field layer (``varlin._fused``), against two routes.

1. The op-by-op path it replaces (``_realise``, ``_output``, ``_kl_divergence``: autograd through
   ``varlin.functional`` and ``varlin.kl``): the same output and KL bit for bit for the same
   noise, the same gradients to float64 rounding.
2. Finite differences (``torch.autograd.gradcheck``) of the hand-written backward, and of the
   gradients' own gradients (``gradgradcheck``), with the noise held fixed by reseeding the
   generator before every call.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import varlin
from varlin import _fused, priors
from varlin.kl import normal_kl_sum

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


def _layer(
    estimator: str, bias: bool, prior: str, seed: int = 0, *, clamped: bool = True
) -> varlin.LinearVariationalNormal:
    layer = varlin.LinearVariationalNormal(
        4, 3, bias, PRIORS[prior], estimator=estimator, init_scale=0.3,
        generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():  # scales that differ per weight
        layer.w_posterior.raw_scale.add_(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
        if clamped:  # output 0 without variance (scales at their floor, squares 0): the local
            # estimator's clamp and its masked gradient. Its KL terms are ~700 nats, too large
            # for finite differences at 1e-7.
            layer.w_posterior.raw_scale[:, 0] = -800.0
            if layer.b_posterior is not None:
                layer.b_posterior.raw_scale[0] = -800.0
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


@pytest.mark.parametrize("prior", ["default", "shifted", "learned"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_backward_matches_finite_differences(estimator: str, prior: str) -> None:
    """The default and shifted priors take the in-place KL gradients, the learned one
    ``kl._kl_sum_grads`` (its scale is an input here)."""
    layer = _layer(estimator, True, prior, clamped=False)
    gen = torch.Generator()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    post, bias, w_prior = layer.w_posterior, layer.b_posterior, layer.w_prior
    assert bias is not None and layer.b_prior is not None
    b_prior = (layer.b_prior.tensor("loc").detach(), layer.b_prior.tensor("scale").detach())
    p_loc, p_scale = w_prior.tensor("loc").detach(), w_prior.tensor("scale").detach()
    tensors = [x, post.loc, post.raw_scale, bias.loc, bias.raw_scale]
    learned = prior == "learned"
    inputs = tuple(t.detach().clone().requires_grad_() for t in tensors + [p_scale] * learned)

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen.manual_seed(3)  # the same noise on every call: the map is deterministic
        x_, loc, raw, b_loc, b_raw = args[:5]
        scale = args[5] if learned else p_scale
        return _fused.meanfield_step(
            estimator, x_, loc, raw, b_loc, b_raw, (p_loc, scale), b_prior, gen
        )

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
                assert model["first"]._kl_record is not None  # what kl_of() took
                assert len(model["first"]._kl_record) == 1
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
        total = kl_of()
    assert records["shared"] is not None and len(records["shared"]) == 2
    assert records["first"] is not None and len(records["first"]) == 1
    assert records["lowrank"] == [] and records["laplace"] == [] and records["unused"] == []
    assert type(records["first"][0].grad_fn).__name__ == "_MeanFieldStepBackward"
    torch.testing.assert_close(total, varlin.kl_divergence(model), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_where_the_prior_cannot_be_read_as_numbers(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the prior's numbers are not read (a sync): the KL takes the elementwise
    form and its gradients ``kl._kl_sum_grads``; the same checks as on the CPU's path."""
    monkeypatch.setattr(varlin.kl, "_prior_scalars", lambda p_loc, p_scale, q: None)
    layer = _layer(estimator, True, "shifted")
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    y, kl, grads = _step(layer, x, fused=True)
    y_ref, kl_ref, grads_ref = _step(layer, x, fused=False)
    assert torch.equal(y, y_ref) and torch.equal(kl, kl_ref)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-13, atol=1e-15, msg=name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_recording_kl_under_activation_checkpointing_gives_the_same_gradients(
    reentrant: bool,
) -> None:
    """A checkpointed layer runs its forward without gradients (reentrant) or again during the
    backward, outside the block (non-reentrant): the recorded KL must still carry the layer's
    gradient, and the recomputation must find the same one-node step."""
    from torch.utils.checkpoint import checkpoint

    def run(record: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)  # the layers' noise from torch's generator, which checkpoint restores
        first, second = varlin.VariationalLinear(4, 4), varlin.VariationalLinear(4, 2)
        model = torch.nn.Sequential(first, second)
        x = torch.randn(5, 4, requires_grad=True)

        def forward() -> torch.Tensor:
            hidden = checkpoint(lambda z: torch.relu(first(z)), x, use_reentrant=reentrant)
            return second(hidden)

        if record:
            with varlin.layers.recording_kl(model) as kl_of:
                y = forward()
                kl = kl_of()
        else:
            y, kl = forward(), varlin.kl_divergence(model)
        return list(torch.autograd.grad(y.square().mean() + kl / 10, list(model.parameters())))

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_recording_kl_takes_a_kl_with_gradients_and_asks_overriding_layers() -> None:
    """A call without gradients records nothing (its KL would give the model none); a layer
    whose class computes its KL otherwise is asked for it, as kl_divergence(model) does."""

    class Halved(varlin.VariationalLinear):
        def kl_divergence(self) -> torch.Tensor:
            return 0.5 * super().kl_divergence()

    layer, halved = varlin.VariationalLinear(3, 4), Halved(4, 2)
    model = torch.nn.Sequential(layer, halved)
    x = torch.randn(5, 3)
    with varlin.layers.recording_kl(model) as kl_of:
        with torch.no_grad():
            model(x)
        assert layer._kl_record == [] and halved._kl_record is None
        model(x)
        assert layer._kl_record is not None and len(layer._kl_record) == 1
        assert halved._kl_record is None  # not recording: its own kl_divergence is used
        kl = kl_of()
    assert kl.requires_grad
    torch.testing.assert_close(kl, varlin.kl_divergence(model), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_step_takes_an_empty_batch(estimator: str) -> None:
    layer = varlin.LinearVariationalNormal(4, 3, estimator=estimator)
    for shape in [(0, 4), (2, 0, 4)]:
        y, kl = layer(torch.randn(shape))
        assert y.shape == (*shape[:-1], 3) and torch.isfinite(kl)
        (y.sum() + kl).backward()


def test_summed_kl_keeps_the_posteriors_device_and_the_elementwise_form_for_bad_scales() -> None:
    """Only a posterior on the CPU takes the summed form (its result on that device); a prior
    scale that is not finite and positive gives the elementwise form's inf or NaN, no error."""
    zero = torch.tensor(0.0)
    meta = torch.ones(3, 2, device="meta")
    assert normal_kl_sum(meta, meta, zero, torch.tensor(1.0)).device.type == "meta"
    q = torch.rand(3, 2) + 0.1
    for bad in [-1.0, 0.0, math.inf]:
        got = float(normal_kl_sum(q, q, zero, torch.tensor(bad)))
        want = float(varlin.kl.normal_kl(q, q, zero, torch.tensor(bad)).sum())
        assert not math.isfinite(got) and (got == want or math.isnan(got) and math.isnan(want))


def test_bfloat16_layer_kl_is_accurate_near_the_prior() -> None:
    """A bfloat16 layer's KL against N(0, 0.1^2), its posterior near the prior (scales 0.09):
    within two bfloat16 roundings per term of the float64 value from the same tensors (the
    ratio and its log; the sums are taken in float32). A form whose sums cancel (sigma - s
    against log sigma - log s, summed in bfloat16) was 11% off here."""
    layer = varlin.LinearVariationalNormal(
        300, 300, make_weights_prior=priors.normal(0.1), make_bias_prior=priors.normal(0.1),
        init_scale=0.09, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16,
    )  # fmt: skip
    kl = float(layer.kl_divergence().detach())
    s = 0.1
    terms, magnitude = 0.0, 0.0
    for loc, scale in [(layer.w_loc, layer.w_scale), (layer.b_loc, layer.b_scale)]:
        assert loc is not None and scale is not None
        r = scale.detach().double() / s
        shift = (loc.detach().double() / s) ** 2
        terms += float(0.5 * (r * r - 1 - 2 * r.log() + shift).sum())
        t = r - 1
        magnitude += float(0.5 * (t * t + 2 * t.abs() + 2 * r.log().abs() + shift).sum())
    assert abs(kl - terms) <= 2 * torch.finfo(torch.bfloat16).eps * magnitude


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_stacked_flipout_layers_predict_under_vmap(randomness: str) -> None:
    """Two flipout layers stacked for torch.func.vmap, without gradients: under shared
    randomness the noise is narrower than the stacked scales, so nothing is formed in place."""
    from torch.func import functional_call, stack_module_state, vmap

    base = varlin.VariationalLinear(4, 3, estimator="flipout")
    models = [varlin.VariationalLinear(4, 3, estimator="flipout") for _ in range(2)]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    x = torch.randn(5, 4)

    def call(p: Any, b: Any, x_: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x_,))

    with torch.no_grad():
        out = vmap(call, in_dims=(0, 0, None), randomness=randomness)(params, buffers, x)
    assert out.shape == (2, 5, 3) and torch.isfinite(out).all()
