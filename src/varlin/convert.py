r"""Make deterministic networks variational: ``to_variational(model)`` and a Bayesian last layer.

:func:`to_variational` replaces chosen :class:`torch.nn.Linear` and ``nn.Conv1d``/``2d``/``3d``
modules of a (usually trained) network by :class:`varlin.VariationalLinear` and
:class:`varlin.VariationalConv1d`/``2d``/``3d`` layers whose posterior means are the
deterministic weights, so the converted model, in :func:`varlin.deterministic` mode, computes what
the original computed; a short ELBO fine-tune then learns the posterior scales. Selection is by
type (``isinstance(module, nn.Linear)``, subclasses included), never by class-name strings.

Two initialisations of the posterior scales:

- a constant ``init_scale`` (small, so the converted network starts close to the original);
- MOPED (Krishnan, Subedar & Tickoo 2020, *Specifying weight priors in Bayesian deep neural
  networks with empirical Bayes*): each scale relative to its weight,

  .. math:: \sigma_{ij} = \max(\delta\,|w_{ij}|,\ \sigma_{\min}),

  with ``prior_at_weights=True`` also centring the prior at the weights (empirical Bayes),
  :math:`p(w_{ij}) = \mathcal N(w_{ij}^{\text{det}}, s^2)`.

:func:`bayesian_last_layer` builds the other common recipe: a frozen deterministic feature
extractor followed by one Bayesian head — variational (trained by the ELBO, started from the
trained head's weights) or exact (:class:`~varlin.conjugate.ExactLinear`, fitted in closed form
with its prior and noise chosen by the evidence) — whose predictive :func:`varlin.predict`
computes in closed form for a Gaussian likelihood.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, overload

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from . import _validation as V
from . import functional
from . import priors as _priors
from .conjugate import ExactLinear
from .conv import BayesianConvBase, VariationalConv1d, VariationalConv2d, VariationalConv3d
from .layers import BayesianLinearBase, Estimator, Posterior, VariationalLinear, variational_layers

__all__ = [
    "to_variational",
    "to_variational_",
    "bayesian_last_layer",
    "bayesian_last_layer_",
    "BayesianLastLayer",
    "LayerSelection",
    "MOPED_MIN_SCALE",
]

#: Floor :math:`\sigma_{\min}` of the MOPED scales: a weight that is exactly 0 still gets a
#: positive scale (softplus cannot reach 0) that its gradient can grow.
MOPED_MIN_SCALE = 1e-5

ModuleT = TypeVar("ModuleT", bound=nn.Module)

LayerSelection = Literal["all", "last"] | Callable[[str, nn.Module], bool] | Iterable[str]

#: The deterministic module types that are converted, and what each becomes.
CONVERTIBLE: dict[type[nn.Module], type[BayesianLinearBase]] = {
    nn.Linear: VariationalLinear,
    nn.Conv1d: VariationalConv1d,
    nn.Conv2d: VariationalConv2d,
    nn.Conv3d: VariationalConv3d,
}
_KINDS = "nn.Linear or nn.Conv1d/2d/3d"

# Modules that read their child ``nn.Linear``'s ``.weight`` directly instead of calling it:
# replacing that child would break them, so automatic selection skips it.
_READS_CHILD_WEIGHTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class _NormalAt:
    """Prior factory ``(*shape) -> Normal(loc, scale)`` with ``loc`` a given full-size tensor.

    MOPED's empirical-Bayes prior: centred at the deterministic weights. ``loc`` and ``scale``
    already have the layer's dtype and device, as :func:`varlin.priors.build` requires of a
    user factory. A class, not a closure, so that converted models pickle.
    """

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        self.loc = loc.detach().clone()
        self.scale = scale.detach().clone()

    def __call__(self, *shape: int) -> Normal:
        if tuple(shape) != tuple(self.loc.shape):
            raise ValueError(
                f"this prior is centred at a tensor of shape {tuple(self.loc.shape)}, "
                f"asked for shape {tuple(shape)}"
            )
        return Normal(self.loc, self.scale.expand(self.loc.shape), validate_args=False)

    def __repr__(self) -> str:
        return f"Normal(loc=<weights {tuple(self.loc.shape)}>, scale={tuple(self.scale.shape)})"


class BayesianLastLayer(nn.Sequential):
    """``nn.Sequential(features, head)`` whose frozen feature extractor stays in eval mode.

    Built by :func:`bayesian_last_layer`. It *is* an ``nn.Sequential`` (``model[0]`` is the
    feature extractor, ``model[-1]`` the :class:`~varlin.VariationalLinear` head), so
    :func:`varlin.predict` recognises it and computes the predictive in closed form. With frozen
    features, :meth:`train` leaves the extractor in eval mode: :func:`varlin.fit` calls
    ``model.train()`` every epoch, which would otherwise switch dropout on and let batch-norm
    update its running statistics inside a network that is meant to stay fixed.

    Args:
        *modules: the modules, as for ``nn.Sequential``.
        frozen_features: keep ``self[0]`` in eval mode whatever :meth:`train` is asked.
    """

    def __init__(self, *modules: Any, frozen_features: bool = False) -> None:
        super().__init__(*modules)
        self.frozen_features = bool(frozen_features)

    def train(self, mode: bool = True) -> BayesianLastLayer:
        super().train(mode)
        if self.frozen_features and len(self) > 0:
            self[0].eval()
        return self

    def extra_repr(self) -> str:
        return f"frozen_features={self.frozen_features}"

    @torch.no_grad()
    def fit_head(self, x: Tensor, y: Tensor, *, batch_size: int | None = None) -> BayesianLastLayer:
        """Fit an exact head (:class:`~varlin.conjugate.ExactLinear`) in closed form on the
        features of ``x``: one pass through the extractor (in eval mode, in chunks of
        ``batch_size`` rows if given), then the exact posterior. Returns ``self``.
        """
        head = self[-1]
        if not isinstance(head, ExactLinear):
            raise TypeError(
                "fit_head fits an exact head (bayesian_last_layer(..., method='exact')), but "
                f"this model's head is a {type(head).__name__}; train it with varlin.fit"
            )
        V.floating_tensor("x", x)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
        size = x.shape[0] if batch_size is None else V.positive_int("batch_size", batch_size)
        features = self[0]
        was_training = features.training
        features.eval()
        try:
            h = torch.cat([features(chunk) for chunk in x.split(size)])
        finally:
            features.train(was_training)
        head.fit(h, y)
        return self


# -- argument checks ------------------------------------------------------------------------
def _check_init_scale(init_scale: Any) -> float | Literal["moped"]:
    rule = "init_scale must be a finite number > 0 or the string 'moped'"
    if isinstance(init_scale, str):
        if init_scale != "moped":
            raise ValueError(f"{rule}, got {init_scale!r}")
        return "moped"
    if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real):
        raise TypeError(f"{rule}, got {V.describe(init_scale)}")
    value = float(init_scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{rule}, got {value}")
    return value


def _check_selection(layers: Any) -> str | Callable[[str, nn.Module], bool] | list[str]:
    rule = (
        "layers must be 'all', 'last', a callable (name, module) -> bool, or an iterable of "
        "module names"
    )
    if isinstance(layers, str):
        if layers not in ("all", "last"):
            raise ValueError(
                f"{rule}, got {layers!r}; to pick one module by its name pass [{layers!r}]"
            )
        return layers
    if callable(layers):
        return layers
    if isinstance(layers, Iterable):
        names = list(layers)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"{rule}; the iterable must hold str names, got {V.describe(name)}")
        return names
    raise TypeError(f"{rule}, got {V.describe(layers)}")


def _convertible(module: nn.Module) -> bool:
    return isinstance(module, tuple(CONVERTIBLE)) and not isinstance(module, BayesianLinearBase)


def _linear_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every convertible module (:data:`CONVERTIBLE`), first name of
    shared ones."""
    skipped: set[int] = set()
    for module in model.modules():
        if isinstance(module, _READS_CHILD_WEIGHTS):
            skipped.update(id(child) for child in module.children())
    return [
        (name, module)
        for name, module in model.named_modules()
        if _convertible(module) and id(module) not in skipped
    ]


def _kind_names(modules: Iterable[nn.Module]) -> str:
    """``"nn.Linear"``, ``"nn.Linear and nn.Conv2d"``, ...: the convertible types present."""
    kinds = []
    for module in modules:
        kind = next(f"nn.{k.__name__}" for k in CONVERTIBLE if isinstance(module, k))
        if kind not in kinds:
            kinds.append(kind)
    return " and ".join(kinds) or "nn.Linear"


def _select(model: nn.Module, layers: Any) -> list[nn.Module]:
    """The convertible modules chosen by ``layers`` (distinct, in module order)."""
    candidates = _linear_candidates(model)
    available = ", ".join(repr(n) for n, _ in candidates) or "none"
    kinds = _kind_names(m for _, m in candidates)
    if layers == "all":
        chosen = [m for _, m in candidates]
    elif layers == "last":
        chosen = [m for _, m in candidates[-1:]]
    elif callable(layers):
        chosen = [m for n, m in candidates if bool(layers(n, m))]
    else:
        every = dict(model.named_modules(remove_duplicate=False))
        convertible = {id(m) for _, m in candidates}
        chosen = []
        for name in layers:
            if name not in every:
                raise ValueError(
                    f"layers names {name!r}, which is not a submodule of the model; its "
                    f"convertible {kinds} modules are: {available}"
                )
            module = every[name]
            if isinstance(module, BayesianLinearBase):
                continue  # already variational: nothing to do
            if not _convertible(module):
                raise ValueError(
                    f"layers names {name!r}, which is a {type(module).__name__}, not an "
                    f"{_KINDS}; convertible {kinds} modules are: {available}"
                )
            if id(module) not in convertible:
                raise ValueError(
                    f"layers names {name!r}, an nn.Linear whose parent reads its weight "
                    "directly (e.g. nn.MultiheadAttention.out_proj); it cannot be replaced"
                )
            if all(module is not m for m in chosen):
                chosen.append(module)
    if not chosen:
        shown = layers if isinstance(layers, str) else getattr(layers, "__name__", layers)
        raise ValueError(
            f"no nn.Linear module of the model matches layers={shown!r}, nor any "
            f"nn.Conv1d/2d/3d (already variational layers are skipped); convertible {kinds} "
            f"modules are: {available}"
        )
    return chosen


# -- one layer ------------------------------------------------------------------------------
def _prior_scale(prior: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The scale of the Normal that ``prior`` makes for ``shape`` (1 without a prior)."""
    if prior is None:
        return torch.ones((), device=like.device, dtype=like.dtype)
    built = _priors.build(prior, shape, name="prior", device=like.device, dtype=like.dtype)
    if built.distribution_type is not Normal:
        raise ValueError(
            "prior_at_weights=True centres a Normal prior at the weights and takes its scale "
            f"from prior, so prior must make a torch.distributions.Normal, got "
            f"{built.distribution_type.__name__}"
        )
    return built.tensor("scale").detach().to(device=like.device, dtype=like.dtype)


def _geometry(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments that fix the map's shape, for the variational counterpart."""
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "padding_mode": module.padding_mode,
    }


def _variational_from(
    module: nn.Module,
    *,
    prior: Any,
    init_scale: float | Literal["moped"],
    moped_delta: float,
    prior_at_weights: bool,
    estimator: str,
    family: dict[str, Any],
) -> BayesianLinearBase:
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise TypeError(
            f"cannot convert a {type(module).__name__} whose weight is not initialised yet; "
            "run one forward pass through the model first"
        )
    assert isinstance(weight, Tensor)
    kind = "nn.Linear" if isinstance(module, nn.Linear) else type(module).__name__
    if not weight.is_floating_point():
        raise TypeError(
            f"cannot convert an {kind} with weight dtype {weight.dtype}; a variational "
            "layer needs floating-point weights"
        )
    # The variational layers store W as (in, out) for y = x @ W + b; nn.Linear stores
    # (out, in), a convolution (out, in/groups, *kernel_size): its kernel as that matrix.
    loc_w = weight.detach().reshape(weight.shape[0], -1).t()
    bias = module.bias
    loc_b = bias.detach() if isinstance(bias, Tensor) else None
    make_w: Any = prior
    make_b: Any = prior if loc_b is not None else None
    if prior_at_weights:
        make_w = _NormalAt(loc_w, _prior_scale(prior, tuple(loc_w.shape), loc_w))
        if loc_b is not None:
            make_b = _NormalAt(loc_b, _prior_scale(prior, tuple(loc_b.shape), loc_b))
        learn = _priors.learn_mode(prior)
        if learn:  # empirical Bayes around the weights: the scale stays learned
            make_w = _priors.learned(make_w, per_output=learn == "output")
            make_b = make_b and _priors.learned(make_b, per_output=learn == "output")
    device, dtype = loc_w.device, loc_w.dtype
    cls = next(v for k, v in CONVERTIBLE.items() if isinstance(module, k))
    # The constructor's nn.Linear-style random init is overwritten below; fork the RNG so that
    # converting a model does not advance the caller's random stream.
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        layer = cls(
            **_geometry(module),
            bias=loc_b is not None,
            make_weights_prior=make_w,
            make_bias_prior=make_b,
            estimator=estimator,  # type: ignore[arg-type]
            init_scale=1.0 if init_scale == "moped" else init_scale,
            device=device,
            dtype=dtype,
            **family,
        )
    with torch.no_grad():
        layer.w_loc.copy_(loc_w)  # a view of the family's mean: copy_ sets the parameter
        b_mean = layer.b_loc
        if b_mean is not None and loc_b is not None:
            b_mean.copy_(loc_b)
        if init_scale == "moped":
            w_scale = (moped_delta * layer.w_loc.double().abs()).clamp_min(MOPED_MIN_SCALE)
            b_scale = None
            if b_mean is not None:
                b_scale = (moped_delta * b_mean.double().abs()).clamp_min(MOPED_MIN_SCALE)
            layer.set_marginal_scale(w_scale, b_scale)
    layer.train(module.training)
    return layer


# -- public API -----------------------------------------------------------------------------
@overload
def to_variational_(
    model: nn.Linear,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> VariationalLinear: ...


@overload
def to_variational_(
    model: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> BayesianConvBase: ...


@overload
def to_variational_(
    model: ModuleT,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> ModuleT: ...


def to_variational_(
    model: nn.Module,
    *,
    layers: LayerSelection = "all",
    prior: Any = None,
    init_scale: float | Literal["moped"] = 1e-3,
    moped_delta: float = 0.1,
    prior_at_weights: bool = False,
    estimator: Estimator = "reparameterization",
    posterior: Posterior = "meanfield",
    rank: int | None = None,
    factors: str | None = None,
) -> nn.Module:
    r"""Replace chosen ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules of ``model`` by variational
    layers, in place.

    Same arguments as :func:`to_variational`, which works on a copy. All arguments are checked
    and every new layer is built before ``model`` is touched, so an error leaves it unchanged.

    Returns:
        ``model`` itself; or, when ``model`` is itself an ``nn.Linear`` or a convolution (there
        is no parent to put the replacement into), the new variational layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    selection = _check_selection(layers)
    if prior is not None and not callable(prior):
        raise TypeError(
            "prior must be None or a prior factory, a callable shape -> "
            f"torch.distributions.Distribution such as varlin.priors.normal(1.0), got "
            f"{V.describe(prior)}"
        )
    scale = _check_init_scale(init_scale)
    moped_delta = V.real("moped_delta", moped_delta, min_value=0.0, strict=True)
    if not isinstance(prior_at_weights, bool):
        raise TypeError(f"prior_at_weights must be a bool, got {V.describe(prior_at_weights)}")
    estimator = V.one_of("estimator", estimator, tuple(functional.ESTIMATORS))  # type: ignore[assignment]

    replacements = {
        id(linear): _variational_from(
            linear,
            prior=prior,
            init_scale=scale,
            moped_delta=moped_delta,
            prior_at_weights=prior_at_weights,
            estimator=estimator,
            family={"posterior": posterior, "rank": rank, "factors": factors},
        )
        for linear in _select(model, selection)
    }
    if id(model) in replacements:
        return replacements[id(model)]
    # Every slot that holds a chosen module gets its replacement: a module shared between two
    # parents (tied weights) stays shared, as one variational layer.
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter yields a shared module only once.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


@overload
def to_variational(
    model: nn.Linear,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> VariationalLinear: ...


@overload
def to_variational(
    model: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> BayesianConvBase: ...


@overload
def to_variational(
    model: ModuleT,
    *,
    layers: LayerSelection = ...,
    prior: Any = ...,
    init_scale: float | Literal["moped"] = ...,
    moped_delta: float = ...,
    prior_at_weights: bool = ...,
    estimator: Estimator = ...,
    posterior: Posterior = ...,
    rank: int | None = ...,
    factors: str | None = ...,
) -> ModuleT: ...


def to_variational(
    model: nn.Module,
    *,
    layers: LayerSelection = "all",
    prior: Any = None,
    init_scale: float | Literal["moped"] = 1e-3,
    moped_delta: float = 0.1,
    prior_at_weights: bool = False,
    estimator: Estimator = "reparameterization",
    posterior: Posterior = "meanfield",
    rank: int | None = None,
    factors: str | None = None,
) -> nn.Module:
    r"""A deep copy of ``model`` with chosen ``nn.Linear`` and convolution modules made variational.

    Each chosen ``nn.Linear`` (``isinstance``, subclasses included) becomes a
    :class:`~varlin.VariationalLinear` with the same shape, bias, dtype, device and train/eval
    mode, whose posterior means are the deterministic weights (``loc_w = linear.weight.T``,
    ``loc_b = linear.bias``); each ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` likewise becomes a
    :class:`~varlin.VariationalConv1d`/``2d``/``3d`` with the same geometry (kernel size,
    stride, padding and its mode, dilation, groups) whose mean kernel is the weight
    (``loc_w = conv.weight.reshape(out_channels, -1).T``; see :mod:`varlin.conv`). Inside
    :func:`varlin.deterministic`, the copy therefore computes what ``model`` computes. All other
    modules (activations, normalisation, pooling, transposed convolutions, ...) are copied
    unchanged; ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``; nested modules and ``nn.Sequential`` are walked recursively.
        layers: which ``nn.Linear`` and convolution modules to convert: ``"all"``; ``"last"``
            (the last one in module registration order, e.g. a classifier head); a predicate
            ``(name, module) -> bool`` called on every candidate; or an iterable of module
            names as in ``model.named_modules()`` (e.g. ``["body.0", "head"]``). Already
            variational layers are skipped. The ``out_proj`` of ``nn.MultiheadAttention`` is
            never converted, because the attention reads its weight directly.
        prior: a prior factory for every new layer's weights and bias, e.g.
            ``varlin.priors.normal(0.1)``; default standard Normal.
        init_scale: initial posterior standard deviation of every weight and bias (> 0, small so
            that sampled outputs stay close to the original), or ``"moped"`` for
            :math:`\sigma = \max(\delta\,|w|,\ \sigma_{\min})` per weight (Krishnan et al. 2020)
            with :math:`\delta` = ``moped_delta`` and :math:`\sigma_{\min}` =
            :data:`MOPED_MIN_SCALE`.
        moped_delta: :math:`\delta > 0` of the MOPED initialisation.
        prior_at_weights: centre the prior at the deterministic weights (MOPED's empirical
            Bayes): a Normal with ``loc`` the weights (a full-size buffer, in ``state_dict``) and
            the scale of ``prior`` (which must then make a Normal), or 1 without one.
        estimator: gradient estimator of the new layers, ``"reparameterization"``, ``"local"``
            or ``"flipout"`` (as far as ``posterior`` allows it).
        posterior: the variational family of the new layers, ``"meanfield"`` (default),
            ``"lowrank"`` (with ``rank``), ``"matrix_normal"`` (with ``factors``), ``"full"``
            (small layers) or ``"radial"`` (:mod:`varlin.posteriors`). With
            ``init_scale="moped"`` each weight's standard deviation is set and its correlations
            start at (or, for lowrank, near) 0; ``"matrix_normal"`` has no scale per weight and
            refuses MOPED.
        rank: the rank of ``posterior="lowrank"``.
        factors: ``"full"`` or ``"diagonal"`` factors of ``posterior="matrix_normal"``.

    Returns:
        The converted copy (the variational layer itself if ``model`` is an ``nn.Linear`` or a
        convolution). The new layers draw noise from torch's default generator. Forward hooks
        registered on a replaced module are not carried over.

    Raises:
        TypeError: ``model`` is not a module, or an argument has the wrong type.
        ValueError: no module matches ``layers``, a name in ``layers`` is not a module of
            ``model`` or not convertible, or ``init_scale``/``moped_delta`` is out of range.

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))  # trained
        >>> bnn = varlin.to_variational(net, init_scale="moped", prior_at_weights=True)
        >>> with varlin.deterministic(bnn):
        ...     torch.allclose(bnn(x), net(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # Check the arguments on the original before paying for the copy (and read a one-shot
    # iterable of names only once).
    selection = _check_selection(layers)
    _check_init_scale(init_scale)
    return to_variational_(
        copy.deepcopy(model),
        layers=selection,
        prior=prior,
        init_scale=init_scale,
        moped_delta=moped_delta,
        prior_at_weights=prior_at_weights,
        estimator=estimator,
        posterior=posterior,
        rank=rank,
        factors=factors,
    )


def _first_tensor(module: nn.Module) -> Tensor | None:
    for param in module.parameters():
        return param
    for buffer in module.buffers():
        if buffer.is_floating_point():
            return buffer
    return None


LastLayerMethod = Literal["variational", "exact"]


def bayesian_last_layer_(
    feature_extractor: nn.Module,
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    head: nn.Linear | None = None,
    method: LastLayerMethod = "variational",
    data: tuple[Tensor, Tensor] | None = None,
    freeze: bool = True,
    **layer_kwargs: Any,
) -> BayesianLastLayer:
    """:func:`bayesian_last_layer` without the copy: ``feature_extractor`` itself becomes
    ``model[0]`` (frozen in place with ``freeze=True``) and ``head`` is read, not copied.

    Same arguments and result as :func:`bayesian_last_layer`; use it when copying the
    extractor would cost too much memory.
    """
    if not isinstance(feature_extractor, nn.Module):
        raise TypeError(
            f"feature_extractor must be a torch.nn.Module, got {type(feature_extractor).__name__}"
        )
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze must be a bool, got {V.describe(freeze)}")
    method = V.one_of("method", method, ("variational", "exact"))  # type: ignore[assignment]
    inner = next(variational_layers(feature_extractor), None)
    if inner is not None:
        raise ValueError(
            "feature_extractor must be deterministic, but it holds a variational layer "
            f"({type(inner).__name__}); a Bayesian last layer has only the head variational. "
            "To make the last nn.Linear of a network variational, use "
            "varlin.convert.to_variational(model, layers='last')"
        )
    in_features, out_features = _head_shape(head, in_features, out_features)
    if method == "exact" and not freeze:
        raise ValueError(
            "method='exact' needs freeze=True: the head is fitted in closed form on fixed "
            "features, which training the extractor afterwards would invalidate"
        )
    if data is not None and method != "exact":
        raise ValueError(
            "data= fits an exact head (method='exact'); train a variational head with "
            "varlin.fit(model, x, y, ...)"
        )
    reference = head.weight if head is not None else _first_tensor(feature_extractor)
    if reference is not None:
        layer_kwargs.setdefault("device", reference.device)
        layer_kwargs.setdefault("dtype", reference.dtype)
    new_head: nn.Module
    if method == "exact":
        new_head = ExactLinear(in_features, out_features, **layer_kwargs)
    elif head is not None:
        # The trained head's weights become the posterior means, exactly as to_variational
        # converts an nn.Linear (with its defaults; init_scale="moped" for MOPED's scales).
        device, dtype = layer_kwargs.pop("device"), layer_kwargs.pop("dtype")
        new_head = to_variational_(
            copy.deepcopy(head).to(device=device, dtype=dtype), **layer_kwargs
        )
    else:
        new_head = VariationalLinear(in_features, out_features, **layer_kwargs)
    if freeze:
        feature_extractor.requires_grad_(False)
        feature_extractor.eval()
    model = BayesianLastLayer(
        OrderedDict([("features", feature_extractor), ("head", new_head)]), frozen_features=freeze
    )
    if data is not None:
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(f"data must be a pair (x, y) of tensors, got {V.describe(data)}")
        model.fit_head(*data)
    return model


def _head_shape(
    head: nn.Linear | None, in_features: int | None, out_features: int | None
) -> tuple[int, int]:
    """``(in_features, out_features)`` from the arguments, or from ``head`` (and checked)."""
    if head is None:
        if in_features is None or out_features is None:
            raise TypeError(
                "bayesian_last_layer needs in_features and out_features, or a trained head "
                "(head=nn.Linear) to take them from"
            )
        return V.positive_int("in_features", in_features), V.positive_int(
            "out_features", out_features
        )
    if not isinstance(head, nn.Linear) or isinstance(head, BayesianLinearBase):
        raise TypeError(f"head must be a deterministic torch.nn.Linear, got {V.describe(head)}")
    for name, given, actual in (
        ("in_features", in_features, head.in_features),
        ("out_features", out_features, head.out_features),
    ):
        if given is not None and given != actual:
            raise ValueError(f"{name}={given} does not match the head's {name}={actual}")
    return head.in_features, head.out_features


def bayesian_last_layer(
    feature_extractor: nn.Module,
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    head: nn.Linear | None = None,
    method: LastLayerMethod = "variational",
    data: tuple[Tensor, Tensor] | None = None,
    freeze: bool = True,
    **layer_kwargs: Any,
) -> BayesianLastLayer:
    r"""A deterministic feature extractor followed by one Bayesian linear head.

    The Bayesian last layer (e.g. Snoek et al. 2015; Kristiadi, Hein & Hennig 2020): keep a
    trained network's features :math:`h(x)` and put the posterior only on the output layer,
    :math:`y = h(x)\,W + b`. Two heads:

    - ``method="variational"`` (default): a :class:`~varlin.VariationalLinear` head, trained by
      :func:`varlin.fit` on the ELBO; any likelihood, and the extractor can be trained jointly
      (``freeze=False``). Given the trained ``head``, its weights are the posterior means, as
      :func:`to_variational` converts it (small constant scales by default; MOPED's
      :math:`\sigma = \delta|w|` with ``init_scale="moped"``).
    - ``method="exact"``: an :class:`~varlin.conjugate.ExactLinear` head, fitted in closed form
      on the extracted features (``data=(x, y)`` here, or :meth:`BayesianLastLayer.fit_head`
      later): the exact posterior of Bayesian linear regression with an unpenalised intercept
      and its prior and noise precisions chosen by maximising the evidence, one pair per output
      (Gaussian likelihood). No training loop.

    With a Gaussian likelihood the predictive is then Gaussian, mean
    :math:`\mathbb E[h_* W + b]` and variance :math:`\operatorname{Var}[h_* W + b] +
    \sigma^2_{\text{noise}}`, which ``varlin.predict(model, x)`` computes exactly without
    sampling (``method="auto"`` or ``"closed_form"``); the exact head brings its fitted noise
    (used unless a likelihood is given), a variational one takes it from ``likelihood=``.

    The caller's modules are not modified: ``feature_extractor`` (and ``head``) are deep-copied
    (:func:`bayesian_last_layer_` uses them in place instead).

    Args:
        feature_extractor: a deterministic module mapping inputs to ``(N, in_features)``
            features (e.g. a trained MLP without its output layer: ``net[:-1]``).
        in_features: width of the features (taken from ``head`` when given).
        out_features: width of the output (taken from ``head`` when given).
        head: the trained ``nn.Linear`` output layer (e.g. ``net[-1]``), to start a
            variational head from (and to read the shape from).
        method: ``"variational"`` or ``"exact"``.
        data: ``(x, y)`` to fit an exact head on now: inputs of the extractor and targets
            ``(N,)`` or ``(N, out_features)``.
        freeze: set ``requires_grad=False`` on the extractor's parameters (so
            :func:`varlin.fit` trains only the head) and keep it in eval mode, also through
            ``model.train()`` (see :class:`BayesianLastLayer`). With ``freeze=False`` the
            extractor is trained jointly (variational head only); the predictive is still
            closed-form given the features.
        **layer_kwargs: for a new variational head, those of :class:`~varlin.VariationalLinear`
            (``bias``, ``make_weights_prior``, ``make_bias_prior``, ``estimator``,
            ``init_scale``, ``generator``, ``posterior``, ``rank``, ``factors``, ...); from a
            trained ``head``, those of :func:`to_variational` (``prior``, ``init_scale``,
            ``moped_delta``, ``prior_at_weights``, ``estimator``, ``posterior``, ``rank``,
            ``factors``); with ``posterior="full"`` a variational head can hold the exact
            posterior of a Gaussian linear model, and the closed-form predictive includes the
            covariance across outputs; for an exact head, those of
            :class:`~varlin.conjugate.ExactLinear` (``ard``, ``noise_scale``, ``prior_scale``,
            ``max_iter``, ...). ``device`` and ``dtype`` default to those of ``head``, else of
            the extractor's parameters.

    Returns:
        :class:`BayesianLastLayer`, an ``nn.Sequential(feature_extractor, head)``.

    Raises:
        TypeError: ``feature_extractor`` is not a module, ``head`` not an ``nn.Linear``, the
            shape is missing, or a keyword is unknown.
        ValueError: the extractor already holds variational layers (the closed form needs the
            head to be the only one; use :func:`to_variational` with ``layers="last"`` on the
            whole network instead), the shape contradicts ``head``, or ``data`` is given to a
            variational head.

    Example:
        >>> exact = varlin.bayesian_last_layer(net[:-1], head=net[-1], method="exact", data=(x, y))
        >>> pred = varlin.predict(exact, x_test)  # closed form, fitted noise included
        >>> model = varlin.bayesian_last_layer(net[:-1], head=net[-1])  # variational
        >>> varlin.fit(model, x, y, likelihood=lik, epochs=200)
        >>> pred = varlin.predict(model, x_test, likelihood=lik, method="closed_form")
    """
    if not isinstance(feature_extractor, nn.Module):
        raise TypeError(
            f"feature_extractor must be a torch.nn.Module, got {type(feature_extractor).__name__}"
        )
    return bayesian_last_layer_(
        copy.deepcopy(feature_extractor),
        in_features,
        out_features,
        head=head,  # read, never modified: the variational route converts a copy
        method=method,
        data=data,
        freeze=freeze,
        **layer_kwargs,
    )
