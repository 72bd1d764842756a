r"""Variational linear layers: the seed's ``LinearVariationalNormal`` and ``VariationalLinear``.

Both layers hold a variational posterior over weights ``W`` of shape
``(in_features, out_features)`` and an optional bias (a family of :mod:`varlin.posteriors`,
mean-field Normal by default), priors as buffers, and compute ``y = x @ W + b`` with the weights
drawn from the posterior by one of three estimators (:data:`varlin.functional.ESTIMATORS`), as far
as the family allows. They differ only in what ``forward`` returns:

- :class:`LinearVariationalNormal` (the seed's contract): ``y, kl = layer(x, kl_weight)``;
- :class:`VariationalLinear`: ``y = layer(x)``, for ``nn.Sequential`` and converted models; the
  KL of a whole model comes from :func:`kl_divergence`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from . import _fused, functional
from . import _validation as V
from . import posteriors as _posteriors
from . import priors as _priors
from .kl import distribution_kl_sum, entropy_kl, normal_kl_sum, normal_kl_sums
from .posteriors import MeanFieldNormal

__all__ = [
    "BayesianLinearBase",
    "LinearVariationalNormal",
    "VariationalLinear",
    "Estimator",
    "Posterior",
    "kl_divergence",
    "recording_kl",
    "deterministic",
    "variational_layers",
]

Estimator = Literal["reparameterization", "local", "flipout"]
Posterior = Literal["meanfield", "lowrank", "matrix_normal", "full", "radial"]
_ESTIMATORS: tuple[str, ...] = tuple(functional.ESTIMATORS)


class BayesianLinearBase(nn.Module):
    r"""Shared machinery of the variational linear layers (not used directly).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no bias (``bias_posterior()`` returns ``None``).
        make_weights_prior: callable ``(in_features, out_features) -> Distribution`` with a batch
            shape that broadcasts to ``(in_features, out_features)``; default
            ``varlin.priors.normal(1.0)``, the seed's standard Normal. A learned prior
            (``varlin.priors.normal(learn_scale=True)``, empirical Bayes) puts its scale among
            the layer's parameters (``w_prior.raw_scale``), trained by the same ELBO.
        make_bias_prior: callable ``(out_features,) -> Distribution``; default standard Normal.
        estimator: ``"reparameterization"`` (one weight sample per call, the seed's),
            ``"local"`` (local reparameterization) or ``"flipout"``; each family accepts those
            its math allows (see :mod:`varlin.posteriors`).
        init_scale: initial posterior standard deviation of every weight and bias (> 0). Small,
            so that a fresh network computes close to its mean and trains like ``nn.Linear``.
        generator: a :class:`torch.Generator` on the layer's device that all noise is drawn from;
            ``None`` uses torch's default generator.
        posterior: the variational family: ``"meanfield"`` (the default), ``"lowrank"``,
            ``"matrix_normal"``, ``"full"`` or ``"radial"`` (:data:`varlin.posteriors.FAMILIES`).
            The joint families model the bias together with the weights.
        rank: the rank ``k >= 1`` of ``posterior="lowrank"`` (required there, refused elsewhere).
        factors: ``"full"`` (default) or ``"diagonal"`` row and column factors of
            ``posterior="matrix_normal"``.
        device, dtype: factory keyword arguments, as for :class:`torch.nn.Linear`.

    Attributes:
        w_posterior: the family (a :class:`varlin.posteriors.Family` module).
        b_posterior: the bias's own :class:`~varlin.posteriors.MeanFieldNormal` for the
            mean-field family; ``None`` without a bias or when the family holds the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        make_weights_prior: Any = None,
        make_bias_prior: Any = None,
        *,
        estimator: Estimator = "reparameterization",
        init_scale: float = 1e-2,
        generator: torch.Generator | None = None,
        posterior: Posterior = "meanfield",
        rank: int | None = None,
        factors: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        V.unknown_kwargs(type(self).__name__, kwargs)
        self.in_features = V.positive_int("in_features", in_features)
        self.out_features = V.positive_int("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {V.describe(bias)}")
        self.estimator: str = V.one_of("estimator", estimator, _ESTIMATORS)
        init_scale = V.real("init_scale", init_scale, min_value=0.0, strict=True)
        self.generator = V.generator("generator", generator)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        family, bias_factor = _posteriors.build(
            posterior, self.in_features, self.out_features, bias=bias, rank=rank,
            factors=factors, init_scale=init_scale, **factory,
        )  # fmt: skip
        family.check_estimator(self.estimator)
        self.posterior_name: str = family.name
        self.has_bias = bias
        shape_w = (self.in_features, self.out_features)
        self.w_posterior: _posteriors.Family = family
        self.w_prior = _priors.build(
            make_weights_prior if make_weights_prior is not None else _priors.normal(),
            shape_w,
            name="make_weights_prior",
            **factory,
        )
        self.w_prior.check_like(family.weight_loc, name="make_weights_prior")
        self.b_posterior: MeanFieldNormal | None
        self.b_prior: _priors.Prior | None
        if bias:
            shape_b = (self.out_features,)
            self.register_module("b_posterior", bias_factor)
            self.b_prior = _priors.build(
                make_bias_prior if make_bias_prior is not None else _priors.normal(),
                shape_b,
                name="make_bias_prior",
                **factory,
            )
            self.b_prior.check_like(family.weight_loc, name="make_bias_prior")
        else:
            if make_bias_prior is not None:
                raise ValueError("make_bias_prior was given but bias=False; drop one of them")
            self.register_module("b_posterior", None)
            self.register_module("b_prior", None)
        # Sampling state, changed only by the context managers below and restored by them.
        self._use_mean = False
        self._num_weight_samples: int | None = None
        # Set by recording_kl: the KLs this layer computed along with its outputs.
        self._kl_record: list[Tensor] | None = None
        self.reset_parameters()

    # -- parameters -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Means as ``nn.Linear`` initialises them (U(±1/sqrt(in))); scales to ``init_scale``."""
        self.w_posterior.reset_parameters(self.generator)  # type: ignore[operator]
        if self.b_posterior is not None:
            # nn.Linear draws the bias from the same bound as the weight: fan_in = in_features.
            bound = 1.0 / self.in_features**0.5
            with torch.no_grad():
                self.b_posterior.loc.uniform_(-bound, bound, generator=self.generator)
            self.b_posterior.reset_scale()

    def _realise(self) -> Any:
        """The family's constrained tensors for one step (softplus once, shared by y and KL)."""
        return self.w_posterior.realise(self.b_posterior)

    @property
    def w_loc(self) -> Tensor:
        """The seed's name for the weight posterior mean."""
        return self.w_posterior.weight_loc

    @property
    def w_scale(self) -> Tensor:
        """The seed's name for the weight posterior standard deviation (of each weight)."""
        return self.w_posterior.marginals(self._realise())[1]

    @property
    def b_loc(self) -> Tensor | None:
        return self.w_posterior.bias_loc_of(self.b_posterior)

    @property
    def b_scale(self) -> Tensor | None:
        if self.b_posterior is not None:
            return self.b_posterior.scale
        return self.w_posterior.marginals(self._realise())[3]

    # -- distributions ----------------------------------------------------------------------
    def weight_posterior(self) -> Normal:
        """:math:`q(W)`, a Normal with batch shape ``(in_features, out_features)``.

        For a joint family, the marginal of each weight (their correlations are in
        :meth:`posterior`); the radial family's marginals are not Normal and it raises.
        """
        w_loc, w_std, _, _ = self._normal_marginals()
        return Normal(w_loc, w_std, validate_args=False)

    def bias_posterior(self) -> Normal | None:
        """:math:`q(b)`, a Normal with batch shape ``(out_features,)``, or ``None`` without bias."""
        if self.b_posterior is not None:
            return self.b_posterior()
        if not self.has_bias:
            return None
        _, _, b_loc, b_std = self._normal_marginals()
        assert b_loc is not None and b_std is not None
        return Normal(b_loc, b_std, validate_args=False)

    def _normal_marginals(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if not self.w_posterior.gaussian:
            raise TypeError(
                f"posterior={self.posterior_name!r} has no Normal marginals; use "
                "layer.posterior() for the distribution, layer.w_scale for the standard deviations"
            )
        return self.w_posterior.marginals(self._realise())

    def posterior(self) -> Distribution:
        r"""The joint posterior of the weights and bias, :math:`\theta = [W\text{ row by row}; b]`.

        An ``Independent`` Normal (mean-field), a ``LowRankMultivariateNormal`` (lowrank) or
        a ``MultivariateNormal`` (full) over the vector :math:`\theta`; a
        :class:`varlin.distributions.MatrixNormal` or :class:`varlin.distributions.Radial`
        over the matrix ``[W; b]`` (``(in_features + 1, out_features)`` with a bias).
        """
        return self.w_posterior.distribution(self._realise())

    def weight_prior(self) -> Distribution:
        """:math:`p(W)`, expanded to batch shape ``(in_features, out_features)``."""
        return self.w_prior()

    def bias_prior(self) -> Distribution | None:
        return None if self.b_prior is None else self.b_prior()

    # -- KL ---------------------------------------------------------------------------------
    @staticmethod
    def _kl_sum(
        loc: Tensor, scale: Tensor, p: _priors.Prior, generator: torch.Generator | None
    ) -> Tensor:
        r""":math:`\sum_i KL(\mathcal N(\mu_i, \sigma_i^2)\,\|\,p_i)`."""
        if p.distribution_type is Normal:
            # Fast path: the prior's (possibly scalar) tensors, no distribution objects, and a
            # closed-form backward (which also gives a learned prior scale its gradient).
            return normal_kl_sum(loc, scale, p.tensor("loc"), p.tensor("scale"))
        return distribution_kl_sum(
            Normal(loc, scale, validate_args=False), p(), generator=generator
        )

    def kl_divergence(self) -> Tensor:
        r""":math:`KL(q(W, b)\,\|\,p(W)p(b))`, summed over all entries, unweighted (0-dim)."""
        return self._kl_divergence(self._realise())

    def _kl_divergence(self, t: Any) -> Tensor:
        family = self.w_posterior
        priors = [self.w_prior] + ([] if self.b_prior is None else [self.b_prior])
        if all(p.distribution_type is Normal for p in priors):
            # Normal priors: per-weight Normal KLs on the fused fast path, plus what the family
            # computes in closed form (nothing for mean-field; see Family.normal_kl_split).
            w_loc, w_ref, b_loc, b_ref = family.normal_kl_split(t)
            w_prior_scale = self.w_prior.tensor("scale")  # softplus once per step if learned
            groups = [(w_loc, w_ref, self.w_prior.tensor("loc"), w_prior_scale)]
            b_scale = None
            if b_loc is not None and b_ref is not None and self.b_prior is not None:
                b_scale = self.b_prior.tensor("scale")
                groups.append((b_loc, b_ref, self.b_prior.tensor("loc"), b_scale))
            # Weights and bias in one autograd node (the value is kl_w + kl_b, bit for bit).
            kl = normal_kl_sums(groups)
            rest = family.normal_kl_rest(t, w_prior_scale, b_scale)
            return kl if rest is None else kl + rest
        w_loc, w_std, b_loc, b_std = family.marginals(t)
        if family.gaussian:
            # KL(q || prod_i p_i) = sum_i KL(q_i || p_i) + total correlation (see posteriors):
            # the marginals' KLs through the same path as the mean-field family's, plus one
            # closed-form term from the family.
            kl = self._kl_sum(w_loc, w_std, self.w_prior, self.generator)
            if b_loc is not None and b_std is not None and self.b_prior is not None:
                kl = kl + self._kl_sum(b_loc, b_std, self.b_prior, self.generator)
            gap = family.entropy_gap(t)
            return kl if gap is None else kl + gap
        w, b = family.rsample_weights(t, (), self.generator)
        samples = [(w, self.w_prior())]
        if b is not None and self.b_prior is not None:
            samples.append((b, self.b_prior()))
        return entropy_kl(family.entropy(t), samples)

    # -- forward ----------------------------------------------------------------------------
    def output_moments(self, x: Tensor) -> Distribution:
        r"""The exact distribution of this layer's output for a fixed input, per example.

        Mean-field: :math:`\mathcal N(x\mu_W + \mu_b,\; x^2\sigma_W^2 + \sigma_b^2)`, what the
        local reparameterization samples from; feeds closed-form expected log-likelihoods and
        predictives (:class:`varlin.likelihoods.Gaussian`). The other Gaussian families give a
        Normal where an example's outputs are independent (or single), else a
        ``MultivariateNormal`` (``LowRankMultivariateNormal`` for lowrank) over them; the
        radial family raises (its outputs are not Gaussian).
        """
        V.floating_tensor("x", x)
        V.last_dim("x", x, self.in_features, "in_features")
        V.same_dtype("x", x, self.w_loc)
        return self.w_posterior.output_distribution(x, self._realise())

    def _check_x(self, x: Tensor) -> None:
        V.floating_tensor("x", x)
        V.last_dim("x", x, self.in_features, "in_features")
        w_loc = self.w_loc
        if x.dtype != w_loc.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {w_loc.dtype}; "
                f"convert one of them (x.to({w_loc.dtype}) or layer.to({x.dtype}))"
            )
        if V.is_validating():
            V.check_finite("x", x)

    def _output(self, x: Tensor, t: Any = None) -> Tensor:
        self._check_x(x)
        return self._sample_checked(x, t)

    def _sample_checked(self, x: Tensor, t: Any = None) -> Tensor:
        """:meth:`_output` for a checked ``x``."""
        if self._use_mean:
            return self.w_posterior.mean_output(x, self.b_posterior)
        return self.w_posterior.sample_output(
            x,
            self._realise() if t is None else t,
            self.estimator,
            generator=self.generator,
            num_weight_samples=self._num_weight_samples,
        )

    def _fused_step(self, x: Tensor, record: bool) -> tuple[Tensor, Tensor] | None:
        """``(y, KL)`` in one autograd node for a sampling mean-field layer with Normal priors
        (:mod:`varlin._fused`: the same values, a lean backward), the KL kept for
        :func:`recording_kl` if ``record``; ``None`` where it does not apply."""
        modules = self._modules  # per step: not nn.Module's attribute lookup, four times
        family = modules["w_posterior"]
        bias = cast("MeanFieldNormal | None", modules.get("b_posterior"))
        w_prior_module = cast(_priors.Prior, modules["w_prior"])
        b_prior_module = cast("_priors.Prior | None", modules.get("b_prior"))
        if (
            type(family) is not MeanFieldNormal
            or self._use_mean
            or self._num_weight_samples is not None
            or w_prior_module.distribution_type is not Normal
            or (b_prior_module is not None and b_prior_module.distribution_type is not Normal)
        ):
            return None
        loc = family.loc
        w_prior = (w_prior_module.tensor("loc"), w_prior_module.tensor("scale"))
        checks = [(loc, *w_prior)]
        b_prior = b_loc = b_raw = None
        if bias is not None and b_prior_module is not None:
            b_prior = (b_prior_module.tensor("loc"), b_prior_module.tensor("scale"))
            b_loc, b_raw = bias.loc, bias.raw_scale
            checks.append((b_loc, *b_prior))
        if not _fused.fusable(x, loc, checks):
            return None
        y, kl = _fused.meanfield_step(
            self.estimator, x, loc, family.raw_scale, b_loc, b_raw, w_prior, b_prior,
            self.generator,
        )  # fmt: skip
        if record:
            assert self._kl_record is not None
            self._kl_record.append(kl)
        return y, kl

    def _records_kl(self) -> bool:
        """Whether this call keeps its KL for :func:`recording_kl`: inside the block, with
        gradients on (a KL without them would give the model's none), not in a replica of
        ``nn.DataParallel`` (replicas share this layer's record; the caller computes the KL),
        and not under saved-tensor hooks (activation checkpointing runs the forward again
        during the backward, outside the block, and must find the same operations)."""
        return (
            self._kl_record is not None
            and torch.is_grad_enabled()
            and not getattr(self, "_is_replica", False)
            and not _saved_tensor_hooks_active()
        )

    def set_marginal_scale(self, w_scale: Tensor, b_scale: Tensor | None = None) -> None:
        """Set every weight's (bias's) posterior standard deviation, correlations at or near 0.

        Used by the MOPED initialisation of :func:`varlin.to_variational`. The matrix-normal
        family has no scale per weight and raises.
        """
        self.w_posterior.set_marginal_scale(w_scale, b_scale)
        if self.b_posterior is not None and b_scale is not None:
            self.b_posterior.set_scale(b_scale)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.has_bias}, estimator={self.estimator!r}"
        )
        if self.posterior_name != "meanfield":
            text += f", posterior={self.posterior_name!r}"
        return text


class LinearVariationalNormal(BayesianLinearBase):
    r"""Linear layer with a mean-field Normal posterior over weights and bias (the seed's layer).

    .. math::
        y = xW + b,\quad W_{ij}\sim\mathcal N(\mu_{ij},\sigma_{ij}^2),\;
        b_j \sim \mathcal N(\mu_j, \sigma_j^2),\quad
        \sigma = \operatorname{softplus}(\rho).

    Args: see :class:`BayesianLinearBase` (same constructor, the seed's positional order).

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(y, kl)`` with ``y`` of shape ``(*, out_features)`` and ``kl`` 0-dim.

    Example:
        >>> layer = LinearVariationalNormal(3, 2)
        >>> y, kl = layer(torch.randn(5, 3), kl_weight=1.0)
        >>> y.shape, kl.shape
        (torch.Size([5, 2]), torch.Size([]))
    """

    def forward(self, x: Tensor, kl_weight: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
        """Return a stochastic output and ``kl_weight * (KL(q_w||p_w) + KL(q_b||p_b))``.

        The same ``kl_weight`` multiplies the weight and the bias terms. Pass ``1/num_data``
        (or use :class:`varlin.ELBO`) to train on minibatches.
        """
        if isinstance(kl_weight, Tensor):
            if kl_weight.dim() != 0 or not kl_weight.is_floating_point():
                raise ValueError(
                    f"kl_weight must be a number or a 0-dim floating tensor, got "
                    f"{V.describe(kl_weight)}"
                )
            if V.is_validating():
                V.real("kl_weight", kl_weight, min_value=0.0)
        else:
            kl_weight = V.real("kl_weight", kl_weight, min_value=0.0)
        self._check_x(x)
        step = self._fused_step(x, record=self._records_kl())
        if step is not None:
            return step[0], kl_weight * step[1]
        # The family's constrained tensors (softplus, factors) once per step, shared by the
        # sample and the KL (autograd adds both gradients before one softplus backward).
        t = self._realise()
        return self._sample_checked(x, t), kl_weight * self._kl_divergence(t)


class VariationalLinear(BayesianLinearBase):
    """Drop-in variational ``nn.Linear``: ``forward(x)`` returns only ``y``.

    Use it inside ``nn.Sequential`` or converted models; take the model's KL with
    :func:`varlin.kl_divergence`. Same constructor as :class:`LinearVariationalNormal`.

    Shape:
        - Input: ``(*, in_features)``. Output: ``(*, out_features)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_x(x)
        # Inside recording_kl, the output and the KL in one step, the KL kept for the caller;
        # elsewhere the plain operations, which cost less per call for the output alone.
        step = self._fused_step(x, record=True) if self._records_kl() else None
        return self._sample_checked(x) if step is None else step[0]


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are installed (``torch.utils.checkpoint`` without reentrance,
    activation offloading). torch has no public query; a build without this one reads as none."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False) is not None
    except TypeError:
        return False


def variational_layers(model: nn.Module) -> Iterator[BayesianLinearBase]:
    """Every variational linear layer of ``model`` (itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, BayesianLinearBase):
            yield module


def kl_divergence(model: nn.Module) -> Tensor:
    """Sum of the (unweighted) KL divergences of every variational layer in ``model`` (0-dim).

    A model with no variational layer has KL 0. Inside :func:`recording_kl`, a layer that
    computed its KL with its output gives that one (the same value, no second pass).
    """
    total: Tensor | None = None
    for layer in variational_layers(model):
        # A layer called twice drew two samples but has one KL.
        kl = layer._kl_record[0] if layer._kl_record else layer.kl_divergence()
        total = kl if total is None else total + kl
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


@contextlib.contextmanager
def recording_kl(model: nn.Module) -> Iterator[Callable[[], Tensor]]:
    """Inside the block, layers keep the KL they compute with their output; the function yielded
    is :func:`kl_divergence` of ``model``, which takes them: the same value, bit for bit.

    A mean-field layer with Normal priors computes its output and its KL in one step (one
    softplus, one autograd node); recording that KL spares :func:`kl_divergence` a second pass
    over the layer's parameters. A layer that recorded nothing (another family or prior, a
    layer not called, ``torch.func`` transforms) has its KL computed as usual. Call the
    function inside the block, after the forward pass (after the block it computes every KL
    again).

    Example:
        >>> with varlin.layers.recording_kl(model) as kl:
        ...     loss = elbo(model(x), y, kl())  # the loss of varlin.kl_divergence(model)
    """
    # A layer whose class computes its KL otherwise records nothing: its own method is asked.
    layers = [
        layer
        for layer in variational_layers(model)
        if type(layer).kl_divergence is BayesianLinearBase.kl_divergence
        and type(layer)._kl_divergence is BayesianLinearBase._kl_divergence
    ]
    saved = [layer._kl_record for layer in layers]
    try:
        for layer in layers:
            layer._kl_record = []
        yield functools.partial(kl_divergence, model)
    finally:
        for layer, old in zip(layers, saved, strict=True):
            layer._kl_record = old


@contextlib.contextmanager
def _set_layers(model: nn.Module, **state: Any) -> Iterator[list[BayesianLinearBase]]:
    layers = list(variational_layers(model))
    saved = [{k: getattr(layer, k) for k in state} for layer in layers]
    try:
        for layer in layers:
            for key, value in state.items():
                setattr(layer, key, value)
        yield layers
    finally:
        for layer, old in zip(layers, saved, strict=True):
            for key, value in old.items():
                setattr(layer, key, value)


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every variational layer of ``model`` uses its posterior mean.

    No noise is drawn; each layer computes exactly ``x @ loc_w + loc_b``. On exit the layers
    sample again, whatever their ``train()``/``eval()`` mode: sampling is never tied to it.

    Example:
        >>> with varlin.deterministic(model):
        ...     y_mean = model(x)
    """
    with _set_layers(model, _use_mean=True):
        yield model


@contextlib.contextmanager
def weight_samples(model: nn.Module, num_samples: int) -> Iterator[nn.Module]:
    """Inside the block, inputs carry a leading dimension of ``num_samples`` independent draws.

    Every slice ``x[s]`` is pushed through its own posterior sample: the reparameterization
    estimator draws ``num_samples`` weight matrices for one batched matmul; the local and flipout
    estimators draw per-example noise anyway. Used by :func:`varlin.predict`.
    """
    num_samples = V.positive_int("num_samples", num_samples)
    with _set_layers(model, _num_weight_samples=num_samples):
        yield model
