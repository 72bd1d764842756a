r"""Priors: any torch distribution, held as module buffers; factories for the seed's callables.

The seed builds priors with factory callables, ``make_weights_prior(in_features, out_features)``
and ``make_bias_prior(out_features)``, returning a :class:`torch.distributions.Distribution`.
:class:`Prior` keeps every tensor of the returned distribution (nested ones included) as a
*buffer*, so the prior follows ``.to()``, ``.double()``, ``.half()`` and ``state_dict()``, and
rebuilds the distribution from those buffers when called.

Factories in this module (:func:`normal`, :func:`laplace`, :func:`scale_mixture`) make priors
whose parameters are scalars broadcast over the weights: a default-prior layer stores two
numbers, not two more weight-sized tensors.

A prior is data, and its ``state_dict`` says which prior it is: beside the tensors it holds the
family (the distribution's class, nested ones included, and its tensors' names) as the
module's extra state. Loading restores exactly the saved prior when the family matches, its
tensors' shapes included (a weight-sized prior loads into a layer built with a scalar one, and
back), and refuses with one line naming the prior when it does not: a Laplace prior's ``loc``
and ``scale`` never load silently into a Normal's. A state without the family (written before
it was recorded) loads as before, into the layer's own family.

**Learned priors** (empirical Bayes, as in Wu et al. 2019): ``normal(learn_scale=True)``,
``laplace(learn_scale=True)`` or :func:`learned` around any factory whose distribution has a
``scale`` make the prior's scale a *parameter*, one per layer (or one per output unit with
``per_output=True``), stored unconstrained as ``raw_scale`` (:math:`s = \operatorname{softplus}
(\rho)`) and learned by the same ELBO as the posterior: the KL's gradient reaches it. For a
fixed posterior :math:`q` and a Normal prior :math:`\mathcal N(m, s^2)`, the KL is smallest at

.. math:: s^2 = \frac1n\sum_{i}\big((\mu_i - m)^2 + \sigma_i^2\big),

the mean over the :math:`n` weights the scale covers; maximised jointly with :math:`q`, the
ELBO's optimum over the scale is the evidence-maximising (type-II maximum likelihood) one when
the family can represent the exact posterior. The family recorded in the ``state_dict`` is the
distribution's (``Normal(loc, scale)``) whether its scale is learned or fixed; a state written
with a fixed scale loads into a learned one (its ``raw_scale`` set to match) and back.

References:
    A. Wu, S. Nowozin, E. Meeds, R. E. Turner, J. M. Hernández-Lobato, A. L. Gaunt.
    Deterministic variational inference for robust Bayesian neural networks. ICLR 2019.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Laplace, Normal, constraints

from . import _validation as V
from .functional import inverse_softplus, positive_scale

__all__ = [
    "Prior",
    "ScaleMixtureNormal",
    "PriorFactory",
    "normal",
    "laplace",
    "scale_mixture",
    "learned",
    "learned_priors",
    "learned_scales",
    "learn_mode",
]

#: The distribution tensor a learned prior learns, and the prefix of its unconstrained parameter.
LEARNED = "scale"
_RAW = "raw_"

_SEP = "__"  # buffer names cannot hold "."; nested attributes are joined with this


def _tensor_slots(obj: Distribution, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """(buffer name, tensor) for every tensor reachable in ``obj.__dict__``, nested included."""
    for key, value in vars(obj).items():
        if isinstance(value, Tensor):
            yield prefix + key.lstrip("_"), value
        elif isinstance(value, Distribution):
            yield from _tensor_slots(value, prefix + key + _SEP)


def _strip(obj: Distribution) -> Distribution:
    """A shallow copy of ``obj`` with every tensor (nested ones too) replaced by ``None``."""
    new = copy.copy(obj)
    for key, value in vars(obj).items():
        if isinstance(value, Tensor):
            new.__dict__[key] = None
        elif isinstance(value, Distribution):
            new.__dict__[key] = _strip(value)
    return new


def _class_tree(obj: Distribution) -> str:
    """``module.Class`` of ``obj``, with the classes of nested distributions in brackets."""
    nested = [_class_tree(v) for v in vars(obj).values() if isinstance(v, Distribution)]
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return f"{name}[{', '.join(nested)}]" if nested else name


def _short(family: str) -> str:
    """A family without module paths, for messages: ``Laplace(loc, scale)``."""
    return re.sub(r"\b(?:\w+\.)+(?=\w)", "", family)


def _decode_family(saved: Any) -> str:
    """The family recorded in a state (see :meth:`Prior.get_extra_state`)."""
    if isinstance(saved, Tensor) and saved.dim() == 1 and not saved.is_complex():
        codes = saved.detach().cpu().double().tolist()
        if all(c.is_integer() and 0 <= c < 256 for c in codes):
            with contextlib.suppress(UnicodeDecodeError):
                return bytes(int(c) for c in codes).decode()
    return f"<unreadable: {type(saved).__name__}>"


class ScaleMixtureNormal(Distribution):
    r"""Blundell et al. (2015) scale-mixture prior, elementwise:

    .. math::
        p(w) = \pi\,\mathcal N(w; 0, \sigma_1^2) + (1-\pi)\,\mathcal N(w; 0, \sigma_2^2).

    A heavy-tailed, spike-and-slab-like prior with no closed-form KL against a Normal; varlin's KL
    falls back to its Monte Carlo estimate for it.

    Args:
        mixing: weight :math:`\pi` of the first component, in (0, 1).
        scale1, scale2: the components' standard deviations (> 0).
    """

    arg_constraints = {
        "mixing": constraints.unit_interval,
        "scale1": constraints.positive,
        "scale2": constraints.positive,
    }
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        mixing: Tensor | float,
        scale1: Tensor | float,
        scale2: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        self.mixing, self.scale1, self.scale2 = torch.distributions.utils.broadcast_all(
            mixing, scale1, scale2
        )
        super().__init__(self.mixing.shape, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> ScaleMixtureNormal:
        shape = torch.Size(batch_shape)
        return ScaleMixtureNormal(
            self.mixing.expand(shape),
            self.scale1.expand(shape),
            self.scale2.expand(shape),
            validate_args=False,  # validating reads values: a host sync per KL on the GPU
        )

    @property
    def mean(self) -> Tensor:
        return torch.zeros_like(self.mixing)

    @property
    def variance(self) -> Tensor:
        return self.mixing * self.scale1**2 + (1 - self.mixing) * self.scale2**2

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # Written out rather than through Normal(0.0, scale): a Python 0.0 becomes a new device
        # tensor on every call, a host-to-device copy (a sync) on the GPU.
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        lp1 = -0.5 * (value / self.scale1) ** 2 - torch.log(self.scale1) - half_log_2pi
        lp2 = -0.5 * (value / self.scale2) ** 2 - torch.log(self.scale2) - half_log_2pi
        return torch.logaddexp(torch.log(self.mixing) + lp1, torch.log1p(-self.mixing) + lp2)

    def sample(self, sample_shape: Any = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            pick = torch.bernoulli(self.mixing.expand(shape))
            scale = torch.where(pick.bool(), self.scale1.expand(shape), self.scale2.expand(shape))
            return torch.randn(shape, dtype=scale.dtype, device=scale.device) * scale


class Prior(nn.Module):
    r"""Holds a distribution's tensors as buffers and rebuilds the distribution on call.

    Args:
        distribution: any :class:`torch.distributions.Distribution` with an empty event shape
            (an elementwise prior); its batch shape must broadcast to ``shape``.
        shape: the shape of the parameter tensor the prior is over.
        name: the argument name used in error messages.
        learn_scale: learn the distribution's ``scale`` (empirical Bayes): ``False`` (a
            buffer, fixed), ``"layer"`` (one learned scale) or ``"output"`` (one per output
            unit, the last dimension of ``shape``). The learned scale is the parameter
            ``raw_scale``, :math:`s = \operatorname{softplus}(\rho)`, started at the
            distribution's own scale, which must then be the same across what it covers.

    Calling the module returns the distribution expanded to ``shape`` (a view, no copy).
    """

    def __init__(
        self,
        distribution: Any,
        shape: tuple[int, ...],
        *,
        name: str = "prior",
        learn_scale: Literal[False, "layer", "output"] = False,
    ) -> None:
        super().__init__()
        if not isinstance(distribution, Distribution):
            raise TypeError(
                f"{name} must return a torch.distributions.Distribution, got "
                f"{type(distribution).__name__}"
            )
        if distribution.event_shape != torch.Size():
            raise ValueError(
                f"{name} must return an elementwise distribution (event_shape ()), got "
                f"{type(distribution).__name__} with event_shape "
                f"{tuple(distribution.event_shape)}"
            )
        batch = tuple(distribution.batch_shape)
        try:
            broadcast = tuple(torch.broadcast_shapes(batch, shape))
        except RuntimeError:
            broadcast = None
        if broadcast != tuple(shape):
            raise ValueError(
                f"{name} must return a distribution whose batch_shape broadcasts to "
                f"{tuple(shape)}, got batch_shape {batch}"
            )
        self.shape = tuple(shape)
        slots = dict(_tensor_slots(distribution))
        #: The distribution's tensor names, in order: buffers, or learned (``raw_`` parameters).
        self._slots = tuple(slots)
        self._learned: tuple[str, ...] = ()
        self.learned_shape: tuple[int, ...] | None = None
        if learn_scale is not False:
            self.learned_shape = self._learned_shape(learn_scale, name)
            start = self._check_learnable(distribution, slots, name)
            self._learned = (LEARNED,)
            self.register_parameter(_RAW + LEARNED, nn.Parameter(start))
        for slot_name, tensor in slots.items():
            if slot_name not in self._learned:
                self.register_buffer(slot_name, tensor.detach().clone())
        # The template keeps the distribution's structure only; its tensors live in the buffers.
        self._template = _strip(distribution)

    def _learned_shape(self, learn_scale: Any, name: str) -> tuple[int, ...]:
        if learn_scale == "layer":
            return ()
        if learn_scale == "output" and self.shape:
            return self.shape[-1:]
        raise ValueError(
            f"learn_scale of {name} must be False, 'layer' or 'output' (with a parameter of at "
            f"least one dimension), got {V.describe(learn_scale)} for shape {self.shape}"
        )

    def _check_learnable(
        self, distribution: Distribution, slots: dict[str, Tensor], name: str
    ) -> Tensor:
        """The unconstrained start of the learned scale; one-line errors for what cannot be."""
        family = f"{type(distribution).__name__}({', '.join(slots)})"
        if LEARNED not in slots:
            raise ValueError(
                f"{name}: a learned prior scale (learn_scale) needs a prior family with a "
                f"'{LEARNED}' parameter, and {family} has none; learn a Normal's or a Laplace's "
                "scale, or keep this prior fixed"
            )
        scale = slots[LEARNED]
        if not scale.is_floating_point():
            raise TypeError(f"{name}: a learned prior scale must be floating, got {scale.dtype}")
        assert self.learned_shape is not None
        start = _common_value(scale, self.shape, self.learned_shape)
        if start is None:
            where = "one per layer" if not self.learned_shape else "one per output unit"
            raise ValueError(
                f"{name}: a learned prior scale is {where}, so the starting {family} must have "
                f"the same scale across the weights it covers, got a {tuple(scale.shape)} scale "
                "that varies"
            )
        if not bool((start > 0).all()) or not bool(torch.isfinite(start).all()):
            raise ValueError(f"{name}: a learned prior scale must start finite and > 0")
        raw = inverse_softplus(start.detach().double()).to(scale.dtype)
        return raw.clone()

    @property
    def learns_scale(self) -> bool:
        """Whether the scale is learned (a parameter) rather than fixed (a buffer)."""
        return bool(self._learned)

    def tensor(self, slot: str) -> Tensor:
        r"""The distribution's tensor ``slot`` (``"loc"``, ``"scale"``, ...): its buffer, or for a
        learned scale :math:`\operatorname{softplus}(\rho)`, differentiable in ``raw_scale``."""
        if slot in self._learned:
            # getattr, not get_parameter: under torch.func.functional_call (fit_ensemble) the
            # parameter is swapped for a plain tensor.
            return positive_scale(getattr(self, _RAW + slot))
        buffer = self._buffers[slot]  # per step: not get_buffer's walk of a dotted path
        assert buffer is not None
        return buffer

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the distribution by name, a learned one constrained (:meth:`tensor`)."""
        return {slot: self.tensor(slot) for slot in self._slots}

    @property
    def distribution_type(self) -> type[Distribution]:
        return type(self._template)

    def check_like(self, reference: Tensor, *, name: str) -> None:
        """Raise if a floating buffer (or learned parameter) differs from ``reference`` in device
        or dtype."""
        for buffer_name, buffer in [*self.named_buffers(), *self.named_parameters()]:
            if not buffer.is_floating_point():
                continue
            if buffer.device != reference.device or buffer.dtype != reference.dtype:
                raise ValueError(
                    f"{name} returned a {type(self._template).__name__} whose {buffer_name} is "
                    f"{buffer.dtype} on {buffer.device}, but the layer's parameters are "
                    f"{reference.dtype} on {reference.device}; build the prior's tensors with "
                    "the layer's dtype and device"
                )

    def _rebuild(
        self, obj: Distribution, prefix: str, tensors: Mapping[str, Tensor | None]
    ) -> Distribution:
        new = copy.copy(obj)
        for key, value in vars(obj).items():
            buffer_name = prefix + key.lstrip("_")
            if value is None and buffer_name in tensors:
                new.__dict__[key] = tensors[buffer_name]
            elif isinstance(value, Distribution):
                new.__dict__[key] = self._rebuild(value, prefix + key + _SEP, tensors)
        return new

    def forward(self) -> Distribution:
        dist = self._rebuild(self._template, "", self.tensors())
        if tuple(dist.batch_shape) != self.shape:
            dist = dist.expand(self.shape)
        return dist

    # -- state: the family travels with the tensors -----------------------------------------
    @property
    def family(self) -> str:
        """The prior's family: its distribution classes (nested ones too) and tensor names.

        For example ``torch.distributions.laplace.Laplace(loc, scale)``; two priors with the
        same family differ only in their tensors' values and shapes.
        """
        return f"{_class_tree(self._template)}({', '.join(self._slots)})"

    def get_extra_state(self) -> Tensor:
        # The family as its UTF-8 bytes in a tensor of the buffers' dtype and device (bytes
        # are exact in every floating dtype): the state_dict stays all floating tensors that
        # follow .to(), .double() and .half() like the rest, for code mapping .clone() or
        # .to() over it, and torch.load(weights_only=True).
        held = [*self._buffers.values(), *self._parameters.values()]
        like = next((b for b in held if b is not None), None)
        floating = like is not None and like.is_floating_point()
        return torch.tensor(
            list(self.family.encode()),
            dtype=like.dtype if like is not None and floating else torch.float32,
            device=None if like is None else like.device,
        )

    def set_extra_state(self, state: Any) -> None:
        # Checked (and the buffers' shapes adopted) in _load_from_state_dict, before any copy.
        pass

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "_extra_state"
        where = prefix.rstrip(".") or "prior"
        saved = state_dict.get(key)
        if saved is not None:
            family = _decode_family(saved)
            if family != self.family:
                raise RuntimeError(
                    f"cannot load {where}: the state holds a {_short(family)} prior, this "
                    f"module's is {_short(self.family)}; build it with the saved prior to load "
                    "this state"
                )
        state_dict = self._translate_scale(state_dict, prefix, where)
        adopted = self._adopt_shapes(state_dict, prefix, where)
        if adopted:
            state_dict = {**state_dict, **{prefix + k: v for k, v in adopted.items()}}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if saved is None and key in missing_keys:
            missing_keys.remove(key)  # a state written before the family was recorded

    def _adopt_shapes(
        self, state_dict: dict[str, Any], prefix: str, where: str
    ) -> dict[str, Tensor]:
        """Resize buffers to hold the saved tensors whose shapes differ, so they load exactly.

        A weight-sized prior (MOPED, ``prior_at_weights=True``) loads into a layer built with a
        scalar prior and back: the buffer takes the broadcast of both shapes, which holds the
        saved tensor exactly (a scalar is broadcast: the same prior, elementwise). Returns the
        saved tensors so broadcast; refuses if they do not make a prior over ``shape``.
        """
        saved = {
            name: state_dict[prefix + name]
            for name, buffer in self._buffers.items()
            if buffer is not None
            and isinstance(state_dict.get(prefix + name), Tensor)
            and state_dict[prefix + name].shape != buffer.shape
        }
        if not saved:
            return {}
        adopted: dict[str, Tensor] = {}
        try:
            for name, tensor in saved.items():
                buffer = self._buffers[name]
                assert buffer is not None
                shape = torch.broadcast_shapes(tensor.shape, buffer.shape)
                adopted[name] = tensor.to(buffer).expand(shape).clone()
            dist = self._rebuild(self._template, "", {**self.tensors(), **adopted})
            if tuple(dist.batch_shape) != self.shape:
                dist = dist.expand(self.shape)
        except (RuntimeError, ValueError):
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in saved.items())
            raise RuntimeError(
                f"cannot load {where}: the saved {_short(self.family)} prior's tensors ({shapes}) "
                f"do not make a prior over shape {self.shape}"
            ) from None
        for name, tensor in adopted.items():
            self._buffers[name] = torch.empty_like(tensor)
        return adopted

    def _translate_scale(
        self, state_dict: dict[str, Any], prefix: str, where: str
    ) -> dict[str, Any]:
        """A state with a fixed ``scale`` for a learned one (``raw_scale``), or back.

        A checkpoint written with a fixed prior loads into a learned one, which starts from the
        saved scale (it must be the same across what the learned scale covers), and a learned
        prior's state into a fixed one, which takes the learned value.
        """
        fixed = [s for s in self._slots if s not in self._learned]
        new = dict(state_dict)
        for slot in self._learned:
            key, raw_key = prefix + slot, prefix + _RAW + slot
            param = self.get_parameter(_RAW + slot)
            saved = new.get(raw_key)
            if isinstance(saved, Tensor) and saved.shape != param.shape:
                raise RuntimeError(
                    f"cannot load {where}: the saved learned {slot} has shape "
                    f"{tuple(saved.shape)}, this prior's has shape {tuple(param.shape)} (one "
                    "per layer is (), one per output unit is (out,)); build it with the same "
                    "per_output"
                )
            if raw_key in new or not isinstance(new.get(key), Tensor):
                continue
            assert self.learned_shape is not None
            start = _common_value(new.pop(key), self.shape, self.learned_shape)
            if start is None:
                raise RuntimeError(
                    f"cannot load {where}: the saved fixed {slot} (shape "
                    f"{tuple(state_dict[key].shape)}) is not one value across the weights that "
                    "this prior's learned scale covers; load it into a fixed prior"
                )
            new[raw_key] = inverse_softplus(start.double()).to(param.dtype)
        for slot in fixed:
            key, raw_key = prefix + slot, prefix + _RAW + slot
            if key not in new and isinstance(new.get(raw_key), Tensor):
                new[key] = positive_scale(new.pop(raw_key).double())
        return new

    def extra_repr(self) -> str:
        def show(name: str, value: Tensor) -> str:
            learned = " learned" if name in self._learned else ""
            if value.numel() == 1:
                return f"{name}={value.item():g}{learned}"
            return f"{name}={tuple(value.shape)}{learned}"

        params = ", ".join(show(k, v.detach()) for k, v in self.tensors().items())
        return f"{type(self._template).__name__}({params}), shape={self.shape}"


def _common_value(tensor: Tensor, shape: tuple[int, ...], target: tuple[int, ...]) -> Tensor | None:
    """``tensor`` (broadcast over ``shape``) reduced to ``target`` (a trailing part of
    ``shape``), if it is the same across the dimensions reduced; else ``None``."""
    try:
        full = tensor.detach().expand(shape)
    except RuntimeError:
        return None
    flat = full.reshape(-1, *target)
    first = flat[0]
    if not bool((flat == first).all()):
        return None
    return first.clone()


PriorFactory = Callable[..., Distribution]


LearnScale = Literal[False, "layer", "output"]


def _learn_mode(learn_scale: Any, per_output: Any) -> LearnScale:
    """``Prior``'s ``learn_scale`` from the factories' two flags, checked."""
    learn_scale = V.boolean("learn_scale", learn_scale)
    per_output = V.boolean("per_output", per_output)
    if per_output and not learn_scale:
        raise ValueError(
            "per_output=True needs learn_scale=True: it asks for one learned scale per output "
            "unit (a fixed scale is one number)"
        )
    if not learn_scale:
        return False
    return "output" if per_output else "layer"


class _ScalarFactory:
    """A picklable factory ``(*shape, device=None, dtype=None) -> Distribution`` of scalars.

    ``learn``: whether :func:`build` makes the scale a learned parameter (see :class:`Prior`).
    """

    def __init__(
        self, kind: type[Distribution], *, learn: LearnScale = False, **params: float
    ) -> None:
        self.kind = kind
        self.params = params
        self.learn: LearnScale = learn

    def __call__(
        self,
        *shape: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Distribution:
        dtype = dtype or torch.get_default_dtype()
        for key, value in self.params.items():
            V.survives_cast(key, value, dtype, positive=key != "loc")  # scales, mixing: > 0
        tensors = {k: torch.tensor(v, device=device, dtype=dtype) for k, v in self.params.items()}
        return self.kind(**tensors, validate_args=False)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        if self.learn:
            args += ", learn_scale=True" + (", per_output=True" if self.learn == "output" else "")
        return f"{self.kind.__name__}({args})"


class _Learned:
    """A user's prior factory whose distribution's ``scale`` :func:`build` learns (picklable
    when the wrapped factory is)."""

    def __init__(self, factory: Any, learn: LearnScale) -> None:
        self.factory = factory
        self.learn: LearnScale = learn

    def __call__(self, *shape: int) -> Distribution:
        return self.factory(*shape)

    def __repr__(self) -> str:
        per_output = ", per_output=True" if self.learn == "output" else ""
        return f"learned({self.factory!r}{per_output})"


def normal(
    scale: float = 1.0, loc: float = 0.0, *, learn_scale: bool = False, per_output: bool = False
) -> PriorFactory:
    """Factory of an elementwise :math:`\\mathcal N(loc, scale^2)` prior (the default, N(0, 1)).

    Args:
        scale: the standard deviation (> 0); with ``learn_scale``, where learning starts.
        loc: the mean.
        learn_scale: learn the scale by the ELBO (empirical Bayes): one scale per layer's
            weights (and one for its bias), stored as the prior's parameter ``raw_scale``.
        per_output: with ``learn_scale``, one learned scale per output unit (column of the
            ``(in_features, out_features)`` weights) instead of one per layer.
    """
    scale = V.real("scale", scale, min_value=0.0, strict=True)
    loc = V.real("loc", loc)
    return _ScalarFactory(Normal, learn=_learn_mode(learn_scale, per_output), loc=loc, scale=scale)


def laplace(
    scale: float = 1.0, loc: float = 0.0, *, learn_scale: bool = False, per_output: bool = False
) -> PriorFactory:
    """Factory of an elementwise Laplace prior (sparsity-inducing; closed-form KL vs Normal).

    ``learn_scale`` and ``per_output`` as for :func:`normal`.
    """
    scale = V.real("scale", scale, min_value=0.0, strict=True)
    loc = V.real("loc", loc)
    return _ScalarFactory(Laplace, learn=_learn_mode(learn_scale, per_output), loc=loc, scale=scale)


def scale_mixture(
    mixing: float = 0.5, scale1: float = 1.0, scale2: float = math.exp(-6)
) -> PriorFactory:
    """Factory of Blundell et al.'s (2015) :class:`ScaleMixtureNormal` prior."""
    mixing = V.real("mixing", mixing)
    if not 0.0 < mixing < 1.0:
        raise ValueError(f"mixing must be in (0, 1), got {mixing}")
    scale1 = V.real("scale1", scale1, min_value=0.0, strict=True)
    scale2 = V.real("scale2", scale2, min_value=0.0, strict=True)
    return _ScalarFactory(ScaleMixtureNormal, mixing=mixing, scale1=scale1, scale2=scale2)


def learned(factory: Any, *, per_output: bool = False) -> PriorFactory:
    """The prior factory ``factory`` with its distribution's ``scale`` learned (empirical Bayes).

    For any factory whose distribution has a ``scale`` tensor (Normal, Laplace, StudentT,
    Cauchy, ...), the same scale across the weights it covers; ``learned(normal(0.5))`` is
    ``normal(0.5, learn_scale=True)``. A family without a ``scale`` (the scale mixture, whose
    scales are ``scale1`` and ``scale2``) is refused when a layer builds the prior.

    Args:
        factory: a prior factory (varlin's, or a callable of the parameter's shape).
        per_output: one learned scale per output unit instead of one per layer.
    """
    if not callable(factory):
        raise TypeError(
            f"factory must be a prior factory (shape -> Distribution), got {V.describe(factory)}"
        )
    learn = _learn_mode(True, per_output)
    if isinstance(factory, _ScalarFactory):
        return _ScalarFactory(factory.kind, learn=learn, **factory.params)
    if isinstance(factory, _Learned):
        return _Learned(factory.factory, learn)
    return _Learned(factory, learn)


def learn_mode(factory: Any) -> LearnScale:
    """How a factory's prior scale is learned: ``False``, ``"layer"`` or ``"output"``."""
    return factory.learn if isinstance(factory, (_ScalarFactory, _Learned)) else False


def learned_priors(model: nn.Module) -> Iterator[tuple[str, Prior]]:
    """``(name, prior)`` for every prior of ``model`` whose scale is learned, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, Prior) and module.learns_scale:
            yield name, module


def learned_scales(model: nn.Module) -> dict[str, float]:
    """The current learned prior scales of ``model``, by prior name (as :func:`learned_priors`).

    One number per prior: the scale, or with ``per_output=True`` the mean of the outputs'
    scales. :func:`varlin.fit` records them every epoch in its history as
    ``"prior_scale.<name>"`` (e.g. ``history["prior_scale.0.w_prior"]``).
    """
    with torch.no_grad():
        return {
            name: float(prior.tensor(LEARNED).double().mean())
            for name, prior in learned_priors(model)
        }


def build(factory: Any, shape: tuple[int, ...], *, name: str, device: Any, dtype: Any) -> Prior:
    """Call a prior factory with the seed's signature and wrap the result as a :class:`Prior`.

    varlin's own factories are also told the layer's device and dtype; a user's callable gets
    only the shape, as in the seed, and must build its tensors to match the layer.
    """
    if not callable(factory):
        raise TypeError(
            f"{name} must be callable (shape -> Distribution), got {V.describe(factory)}"
        )
    learn = learn_mode(factory)
    if isinstance(factory, _Learned):
        factory = factory.factory
    if isinstance(factory, _ScalarFactory):
        dist = factory(*shape, device=device, dtype=dtype)
    else:
        try:
            dist = factory(*shape)
        except TypeError as exc:
            raise TypeError(
                f"calling {name}(*{shape}) raised TypeError: {exc}; a prior factory takes the "
                "parameter's shape as positional arguments, e.g. (in_features, out_features)"
            ) from exc
    prior = Prior(dist, shape, name=name, learn_scale=learn)
    V.real_support(name, dist)  # a weight prior: Prior itself holds any distribution
    return prior
