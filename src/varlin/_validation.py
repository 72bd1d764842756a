"""Argument checks with one message format: the argument, its value (or shape and dtype), the rule.

Checks on shapes, dtypes and Python scalars are always on: they cost nothing. Checks that read
tensor *values* (finiteness of an input batch) force a device sync, so they run only inside
:func:`validation`, the switch modelled on torch's
``Distribution.set_default_validate_args`` but scoped with a context variable instead of a
process-wide flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch

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
    """Whether value checks are on in the current context (see :func:`validation`)."""
    return _VALIDATE.get()


def describe(value: Any) -> str:
    """Short description of a value for an error message."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"tensor({value.item()!r}, dtype={value.dtype})"
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
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
