"""Argument checks with one message format: the argument, its value (or shape and dtype), the rule.

Checks on shapes, dtypes and Python scalars are always on: they cost nothing. Checks that read
tensor *values* (finiteness of an input batch) force a device sync, so they run only inside
:func:`validation`, the switch modelled on torch's
``Distribution.set_default_validate_args`` but scoped with a context variable instead of a
process-wide flag.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.distributions import constraints

__all__ = ["validation", "is_validating"]

_VALIDATE: contextvars.ContextVar[bool] = contextvars.ContextVar("varlin_validate", default=False)


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Turn value checks (non-finite inputs, targets) on or off inside a ``with`` block.

    Shape, dtype and hyper-parameter checks are always on. The value checks need a device sync,
    so they are off by default and cost nothing then.

    Example:
        >>> with varlin.validation():
        ...     y, kl = layer(x)  # raises ValueError if x holds NaN or inf
    """
    token = _VALIDATE.set(bool(enabled))
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def is_validating() -> bool:
    """Whether value checks are on in the current context (see :func:`validation`).

    Always ``False`` while ``torch.compile`` traces: dynamo cannot trace ``ContextVar.get``
    (a graph break in every layer), and the value checks force a device sync anyway. Also
    ``False`` under ``torch.func`` transforms (``vmap`` over stacked models): a value check is
    data-dependent control flow, which they cannot run.
    """
    if _is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return _VALIDATE.get()


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling()) if is_compiling is not None else False


def describe(value: Any) -> str:
    """Short description of a value for an error message."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"tensor({value.item()!r}, dtype={value.dtype})"
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    # One line: the repr of an array or a module spans several.
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {describe(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def real(name: str, value: Any, *, min_value: float | None = None, strict: bool = False) -> float:
    """A finite Python real, optionally bounded below (``> min`` if strict else ``>= min``)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None:
        if strict and value <= min_value:
            raise ValueError(f"{name} must be > {min_value}, got {value}")
        if not strict and value < min_value:
            raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def one_of(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {describe(value)}")
    return value


def generator(name: str, value: Any) -> torch.Generator | None:
    """``value`` if it is a :class:`torch.Generator` or ``None``, else a one-line TypeError."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {describe(value)}")
    return value


def floating_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype, got {describe(value)}; "
            f"convert it with {name}.float()"
        )
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN or inf; a device sync, so call it only when validating."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"{name} must be finite, got {describe(value)} with {bad} non-finite entries"
        )


def last_dim(name: str, value: torch.Tensor, size: int, what: str) -> None:
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(
            f"{name} must have last dimension {what}={size}, got shape {tuple(value.shape)}"
        )


def unknown_kwargs(owner: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(f"{owner} got unexpected keyword argument(s): {names}")


def integer(name: str, value: Any) -> int:
    """A Python integer of any sign (a seed); ``bool`` and floats such as ``1.5`` are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {describe(value)}")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """A ``bool`` flag; a truthy string such as ``"no"`` must not switch a flag on."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def floating_dtype(name: str, value: Any) -> torch.dtype | None:
    """``None`` or a real floating-point ``torch.dtype`` (parameters must be differentiable)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(
            f"{name} must be a torch.dtype such as torch.float32, got {describe(value)}"
        )
    if not value.is_floating_point:
        raise TypeError(
            f"{name} must be a real floating-point dtype (torch.float16, torch.bfloat16, "
            f"torch.float32 or torch.float64), got {value}"
        )
    return value


def same_dtype(name: str, value: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise if ``value`` and the layer's parameters ``reference`` differ in dtype.

    Under autocast on ``value``'s device the mismatch is legal: autocast casts both.
    """
    if value.dtype == reference.dtype:
        return
    device_type = value.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return
    raise TypeError(
        f"{name} has dtype {value.dtype} but the layer's parameters are {reference.dtype}; "
        f"convert one of them ({name}.to({reference.dtype}) or layer.to({value.dtype}))"
    )


def survives_cast(name: str, value: float, dtype: torch.dtype, *, positive: bool = True) -> None:
    """Raise if the finite ``value`` overflows ``dtype``, or if a ``positive`` one becomes 0.

    A scale of ``1e-50`` is a legal positive float but 0 in float32: the KL becomes inf or NaN.
    A location that rounds to 0 is harmless (``positive=False``).
    """
    stored = float(torch.tensor(value, dtype=dtype))
    if math.isfinite(stored) and (stored != 0.0 or value == 0.0 or not positive):
        return
    finfo = torch.finfo(dtype)
    raise ValueError(
        f"{name}={value:g} is not representable in {dtype} (it becomes {stored:g}); use a "
        f"magnitude between {finfo.tiny:g} and {finfo.max:g}, or a wider dtype"
    )


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """A tensor held by a distribution (nested distributions searched too), or ``None``."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, torch.distributions.Distribution):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _holds_every_real(distribution: Any) -> bool:
    """Whether the distribution's support accepts every real number, judged by what it is.

    The support is probed, not matched by class: a ``MixtureSameFamily`` of Normals, a
    ``TransformedDistribution`` under an affine map or any user constraint qualifies when its
    ``check`` holds at zero, at +-1, at +-the smallest normal number and at +-the largest
    finite number of the distribution's dtype. A discrete or an event-shaped support does not.
    """
    support = getattr(distribution, "support", None)
    if support is constraints.real:
        return True
    if not isinstance(support, constraints.Constraint):
        return False
    try:
        if support.is_discrete or support.event_dim != 0:
            return False
        like = _first_tensor(distribution)
        floating = like is not None and like.is_floating_point()
        dtype = like.dtype if like is not None and floating else torch.get_default_dtype()
        finfo = torch.finfo(dtype)
        values = [0.0, 1.0, -1.0, finfo.tiny, -finfo.tiny, finfo.max, -finfo.max]
        probe = torch.tensor(values, dtype=dtype, device=getattr(like, "device", None))
        # One probe per row, broadcast against the constraint's own (batch-shaped) bounds.
        batch_dims = len(getattr(distribution, "batch_shape", ()))
        return bool(support.check(probe.reshape(-1, *[1] * batch_dims)).all())
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False  # a dependent or otherwise uncheckable support: not known to be real


def real_support(name: str, distribution: Any) -> None:
    """Raise if an elementwise prior's support is not the whole real line.

    The posterior is a Normal, supported on all reals: against a prior on a smaller support
    (Gamma, Categorical, Uniform) the KL is infinite or undefined.
    """
    if _holds_every_real(distribution):
        return
    support = getattr(distribution, "support", None)
    raise ValueError(
        f"{name} must return a distribution supported on the real line (the posterior is a "
        f"Normal), got {type(distribution).__name__} with support {support}"
    )


_WEIGHTS_ONLY_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def weights_only_safe(name: str, value: Any) -> None:
    """Raise ``TypeError`` if ``value`` holds what ``torch.load(weights_only=True)`` refuses.

    Allowed: tensors, ``torch.Size``, ``torch.dtype``, ``torch.device``, Python scalars (exact
    types: a ``numpy.float64`` is a ``float`` subclass that the loader refuses), and dicts,
    lists, tuples and sets of them. Checked before a write, so a bad state never replaces a good
    checkpoint.
    """
    if type(value) in _WEIGHTS_ONLY_SCALARS or isinstance(
        value, (torch.Tensor, torch.Size, torch.dtype, torch.device)
    ):
        return
    if isinstance(value, dict) and type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            weights_only_safe(f"{name} key {key!r}", key)
            weights_only_safe(f"{name}[{key!r}]", item)
        return
    if type(value) in (list, tuple, set):
        for index, item in enumerate(value):
            weights_only_safe(f"{name}[{index}]", item)
        return
    raise TypeError(
        f"{name} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store tensors, Python numbers, strings and "
        "dicts/lists of them"
    )


# -- command-line argument types (argparse ``type=`` callables) --------------------------------
def arg_positive_int(text: str) -> int:
    """``argparse`` type: a positive integer, with the rule in the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def arg_positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0, with the rule in the message."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
