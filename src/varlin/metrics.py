"""Evaluation metrics for probabilistic regression and classification.

Pure functions on tensors: they take predictions (a Gaussian's mean and **variance**, Monte Carlo
samples, or class probabilities) and targets, and return a 0-dim tensor (or, with
``reduction="none"``, one value per example, or a small named tuple). They hold no state, draw no
random numbers and keep the autograd graph, so a metric can also serve as a training signal.

Conventions:

* Gaussian predictions are given by their **variance** ``var``, never the standard deviation, in
  every function of this module (as ``torch.nn.GaussianNLLLoss``).
* Class probabilities have the class dim last, ``(N, C)``; the binary case may also be given as
  ``(N,)`` holding :math:`P(y = 1)`, read as ``(N, 2) = [1 - p, p]``. Targets are integer class
  indices of shape ``(N,)``.
* Logarithms are natural: NLLs and entropies are in nats.
* Inputs are validated (shapes, dtypes, ``var > 0``, probabilities on the simplex); a bad input
  raises ``ValueError`` (``TypeError`` for a wrong type) that names the argument, what it got and
  the rule. The value checks read the data back to the host, which is a device sync on a GPU.

References:
    Gneiting, T. and Raftery, A. E. (2007). Strictly proper scoring rules, prediction, and
    estimation. JASA 102(477). (CRPS, its energy form and Gaussian closed form.)
    Brier, G. W. (1950). Verification of forecasts expressed in terms of probability.
    Monthly Weather Review 78(1).
    Guo, C., Pleiss, G., Sun, Y. and Weinberger, K. Q. (2017). On calibration of modern neural
    networks. ICML. (Expected calibration error, reliability diagrams.)
    Hernandez-Lobato, J. M. and Adams, R. (2015). Probabilistic backpropagation for scalable
    learning of Bayesian neural networks. ICML. (UCI protocol: test log-likelihood, RMSE.)
    Houlsby, N., Huszar, F., Ghahramani, Z. and Lengyel, M. (2011). Bayesian active learning for
    classification and preference learning. arXiv:1112.5745. (Mutual information, BALD.)
"""

from __future__ import annotations

import math
import numbers
from statistics import NormalDist
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CalibrationCurve",
    "Interval",
    "Reduction",
    "accuracy",
    "brier_score",
    "calibration_curve",
    "categorical_nll",
    "expected_calibration_error",
    "gaussian_crps",
    "gaussian_interval",
    "gaussian_nll",
    "interval_coverage",
    "mixture_nll",
    "mutual_information",
    "predictive_entropy",
    "rmse",
    "sample_crps",
]

Reduction = Literal["mean", "sum", "none"]

_REDUCTIONS = ("mean", "sum", "none")
_LOG_2PI = math.log(2.0 * math.pi)
_PROBS_ATOL = 1e-4


class Interval(NamedTuple):
    """A central prediction interval ``[lower, upper]``, elementwise."""

    lower: Tensor
    upper: Tensor


class CalibrationCurve(NamedTuple):
    """Per-bin statistics of a reliability diagram.

    The bins are the equal-width intervals :math:`(\\tfrac{b}{B}, \\tfrac{b+1}{B}]` of the
    top-label confidence, the first one closed at 0; their edges are
    ``torch.linspace(0, 1, B + 1)``. A bin with no example has count 0 and NaN confidence and
    accuracy (matplotlib skips NaN points).

    Attributes:
        bin_confidence: ``(B,)`` mean top-label confidence of the examples in each bin.
        bin_accuracy: ``(B,)`` fraction of those examples whose top label is correct.
        bin_count: ``(B,)`` number of examples in each bin (``torch.int64``).
    """

    bin_confidence: Tensor
    bin_accuracy: Tensor
    bin_count: Tensor


# --------------------------------------------------------------------------------------------
# Validation helpers (private; this module stays standalone on purpose).


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_floating(name: str, t: object) -> Tensor:
    t = _check_tensor(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    return t


def _check_same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {_shape(ref)}, got {_shape(t)}")


def _check_nonempty(name: str, t: Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {_shape(t)}")


def _check_positive(name: str, t: Tensor) -> None:
    # `not (t > 0).all()` also catches NaN.
    bad = ~(t > 0)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be > 0 everywhere, got {int(bad.sum())} entries <= 0 or NaN "
            f"(min {t.detach().min().item():.6g})"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(values: Tensor, reduction: str, name: str) -> Tensor:
    if reduction == "mean":
        _check_nonempty(name, values)
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_num_bins(num_bins: object) -> int:
    if (
        isinstance(num_bins, bool)
        or not isinstance(num_bins, numbers.Integral)
        or int(num_bins) < 1
    ):
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    return int(num_bins)


def _check_simplex(name: str, probs: Tensor) -> None:
    """Raise unless ``probs`` lies in [0, 1] and sums to 1 along the last dim (within 1e-4)."""
    if probs.numel() == 0:
        return
    low, high = probs.detach().min().item(), probs.detach().max().item()
    if not (low >= 0.0 and high <= 1.0):  # written so that NaN fails too
        raise ValueError(f"{name} must lie in [0, 1], got min {low:.6g} and max {high:.6g}")
    deviation = (probs.detach().sum(dim=-1) - 1.0).abs().max().item()
    if not deviation <= _PROBS_ATOL:
        raise ValueError(
            f"{name} must sum to 1 along the class dim (last) within {_PROBS_ATOL:g}, "
            f"got a maximum deviation of {deviation:.6g}"
        )


def _check_probs(name: str, probs: object, *, min_ndim: int) -> Tensor:
    probs = _check_floating(name, probs)
    if probs.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dims (class dim last), got shape {_shape(probs)}"
        )
    if probs.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one class, got shape {_shape(probs)}")
    _check_simplex(name, probs)
    return probs


def _class_probs_and_target(probs: object, target: object) -> tuple[Tensor, Tensor]:
    """Validate ``(probs, target)`` of a classifier and return probs as ``(N, C)``, target long.

    ``probs`` of shape ``(N,)`` is read as binary :math:`P(y = 1)` and expanded to
    ``(N, 2) = [1 - p, p]``.
    """
    probs = _check_floating("probs", probs)
    target = _check_tensor("target", target)
    if probs.ndim == 1:
        if probs.numel() > 0:
            low, high = probs.detach().min().item(), probs.detach().max().item()
            if not (low >= 0.0 and high <= 1.0):
                raise ValueError(
                    f"probs of shape (N,) are binary P(y = 1) and must lie in [0, 1], "
                    f"got min {low:.6g} and max {high:.6g}"
                )
        probs = torch.stack([1.0 - probs, probs], dim=-1)
    elif probs.ndim == 2:
        if probs.shape[1] < 1:
            raise ValueError(f"probs must have at least one class, got shape {_shape(probs)}")
        _check_simplex("probs", probs)
    else:
        raise ValueError(
            f"probs must have shape (N, C), or (N,) for binary P(y = 1), got {_shape(probs)}"
        )
    if target.shape != probs.shape[:1]:
        raise ValueError(
            f"target must have shape (N,) = {tuple(probs.shape[:1])} to match probs "
            f"{_shape(probs)}, got {_shape(target)}"
        )
    if target.dtype == torch.bool:
        target = target.long()
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    num_classes = probs.shape[1]
    if target.numel() > 0:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"target must hold class indices in [0, {num_classes}), "
                f"got min {low} and max {high}"
            )
    return probs, target.long()


def _xlogx(p: Tensor) -> Tensor:
    # p * log(p) with 0 log 0 = 0 and a finite gradient at p = 0 (xlogy's is NaN there).
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


# --------------------------------------------------------------------------------------------
# Regression


def gaussian_nll(
    mean: Tensor, var: Tensor, target: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """Negative log density of ``target`` under :math:`\\mathcal{N}(\\text{mean}, \\text{var})`.

    The full density, constant included, so values are comparable across papers (UCI test
    log-likelihood is ``-gaussian_nll``):

    .. math::
        \\operatorname{NLL} = \\tfrac12 \\log(2\\pi v) + \\frac{(y - m)^2}{2 v}.

    Args:
        mean: predictive mean :math:`m`.
        var: predictive **variance** :math:`v` (not the standard deviation); must be > 0.
        target: observed :math:`y`.
        reduction: ``"mean"`` or ``"sum"`` over all elements, or ``"none"``.

    Shape:
        ``mean``, ``var`` and ``target``: the same shape ``(*)``. Output: ``()``, or ``(*)`` for
        ``reduction="none"``.

    Returns:
        The NLL in nats.

    Example:
        >>> gaussian_nll(torch.zeros(3), torch.ones(3), torch.zeros(3))
        tensor(0.9189)
    """
    mean = _check_floating("mean", mean)
    var = _check_floating("var", var)
    target = _check_floating("target", target)
    _check_same_shape("var", var, "mean", mean)
    _check_same_shape("target", target, "mean", mean)
    _check_reduction(reduction)
    _check_positive("var", var)
    nll = 0.5 * (_LOG_2PI + torch.log(var) + (target - mean).square() / var)
    return _reduce(nll, reduction, "mean")


def mixture_nll(
    means: Tensor, vars: Tensor, target: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """NLL of ``target`` under an equally weighted mixture of ``S`` Gaussians.

    This is the Monte Carlo predictive log-likelihood of the UCI benchmark (Hernandez-Lobato and
    Adams, 2015): each of the ``S`` posterior samples predicts :math:`\\mathcal{N}(m_s, v_s)`
    and the predictive density is their average,

    .. math::
        \\operatorname{NLL} = -\\log \\frac1S \\sum_{s=1}^S \\mathcal{N}(y; m_s, v_s)
        = \\log S - \\operatorname{logsumexp}_s \\log \\mathcal{N}(y; m_s, v_s).

    Computed with ``logsumexp``, so it stays finite for targets far from every component, where
    each density underflows to 0.

    Args:
        means: component means :math:`m_s`, one per sample along the leading dim.
        vars: component **variances** :math:`v_s`; must be > 0.
        target: observed :math:`y`.
        reduction: ``"mean"`` or ``"sum"`` over the batch elements, or ``"none"``.

    Shape:
        ``means`` and ``vars``: ``(S, *)`` with ``S >= 1``; ``target``: ``(*)``. Output: ``()``,
        or ``(*)`` for ``reduction="none"``.

    Returns:
        The NLL in nats.

    Example:
        >>> mixture_nll(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3))
        tensor(0.9189)
    """
    means = _check_floating("means", means)
    vars = _check_floating("vars", vars)
    target = _check_floating("target", target)
    if means.ndim < 1 or means.shape[0] < 1:
        raise ValueError(
            f"means must have a leading sample dim of size S >= 1, (S, *batch), "
            f"got shape {_shape(means)}"
        )
    _check_same_shape("vars", vars, "means", means)
    if target.shape != means.shape[1:]:
        raise ValueError(
            f"target must have the batch shape of means (S, *batch) = {_shape(means)}, "
            f"i.e. {tuple(means.shape[1:])}, got {_shape(target)}"
        )
    _check_reduction(reduction)
    _check_positive("vars", vars)
    log_prob = -0.5 * (_LOG_2PI + torch.log(vars) + (target - means).square() / vars)
    nll = math.log(means.shape[0]) - torch.logsumexp(log_prob, dim=0)
    return _reduce(nll, reduction, "target")


def rmse(pred: Tensor, target: Tensor) -> Tensor:
    """Root mean squared error over all elements.

    .. math::
        \\operatorname{RMSE} = \\sqrt{\\tfrac1n \\textstyle\\sum_i (\\hat y_i - y_i)^2}.

    Args:
        pred: point predictions :math:`\\hat y` (e.g. the predictive mean).
        target: observed :math:`y`.

    Shape:
        ``pred`` and ``target``: the same shape ``(*)``, at least one element. Output: ``()``.

    Returns:
        The RMSE, in the units of ``target``.
    """
    pred = _check_floating("pred", pred)
    target = _check_floating("target", target)
    _check_same_shape("target", target, "pred", pred)
    _check_nonempty("pred", pred)
    return (pred - target).square().mean().sqrt()


def interval_coverage(lower: Tensor, upper: Tensor, target: Tensor) -> Tensor:
    """Fraction of targets inside their interval ``[lower, upper]`` (closed at both ends).

    Args:
        lower: lower interval bounds.
        upper: upper interval bounds; must be ``>= lower``.
        target: observed values.

    Shape:
        ``lower``, ``upper`` and ``target``: the same shape ``(*)``, at least one element.
        Output: ``()``.

    Returns:
        The empirical coverage in [0, 1], in the dtype of ``target``. For a calibrated
        ``level`` interval (see :func:`gaussian_interval`) it is close to ``level``.
    """
    lower = _check_floating("lower", lower)
    upper = _check_floating("upper", upper)
    target = _check_floating("target", target)
    _check_same_shape("upper", upper, "lower", lower)
    _check_same_shape("target", target, "lower", lower)
    _check_nonempty("target", target)
    crossed = upper < lower
    if bool(crossed.any()):
        raise ValueError(
            f"upper must be >= lower everywhere, got {int(crossed.sum())} entries with "
            f"upper < lower"
        )
    inside = (lower <= target) & (target <= upper)
    return inside.to(target.dtype).mean()


def gaussian_interval(mean: Tensor, var: Tensor, level: float = 0.9) -> Interval:
    """Central ``level`` interval of :math:`\\mathcal{N}(\\text{mean}, \\text{var})`.

    .. math::
        [\\,m - z \\sqrt{v},\\; m + z \\sqrt{v}\\,], \\qquad z = \\Phi^{-1}\\big(\\tfrac{1 +
        \\text{level}}{2}\\big),

    with :math:`\\Phi^{-1}` the standard Normal quantile (``z = 1.645`` for ``level=0.9``).

    Args:
        mean: predictive mean :math:`m`.
        var: predictive **variance** :math:`v`; must be > 0.
        level: probability mass inside the interval, in (0, 1).

    Shape:
        ``mean`` and ``var``: the same shape ``(*)``. Output: two tensors of shape ``(*)``.

    Returns:
        ``Interval(lower, upper)``.
    """
    mean = _check_floating("mean", mean)
    var = _check_floating("var", var)
    _check_same_shape("var", var, "mean", mean)
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Real)
        or not 0.0 < float(level) < 1.0
    ):
        raise ValueError(f"level must be a number in the open interval (0, 1), got {level!r}")
    _check_positive("var", var)
    z = NormalDist().inv_cdf(0.5 * (1.0 + float(level)))
    half_width = z * var.sqrt()
    return Interval(mean - half_width, mean + half_width)


def gaussian_crps(
    mean: Tensor, var: Tensor, target: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """Continuous ranked probability score of :math:`\\mathcal{N}(\\text{mean}, \\text{var})`.

    Closed form (Gneiting and Raftery, 2007), with :math:`\\sigma = \\sqrt{v}` and
    :math:`z = (y - m)/\\sigma`:

    .. math::
        \\operatorname{CRPS} = \\sigma \\Big[ z\\,\\big(2\\Phi(z) - 1\\big) + 2\\varphi(z)
        - \\frac{1}{\\sqrt\\pi} \\Big].

    Lower is better; it has the units of ``target`` and tends to :math:`|y - m|` as
    :math:`v \\to 0`.

    Args:
        mean: predictive mean :math:`m`.
        var: predictive **variance** :math:`v` (as in :func:`gaussian_nll`); must be > 0.
        target: observed :math:`y`.
        reduction: ``"mean"`` or ``"sum"`` over all elements, or ``"none"``.

    Shape:
        ``mean``, ``var`` and ``target``: the same shape ``(*)``. Output: ``()``, or ``(*)`` for
        ``reduction="none"``.

    Returns:
        The CRPS.
    """
    mean = _check_floating("mean", mean)
    var = _check_floating("var", var)
    target = _check_floating("target", target)
    _check_same_shape("var", var, "mean", mean)
    _check_same_shape("target", target, "mean", mean)
    _check_reduction(reduction)
    _check_positive("var", var)
    std = var.sqrt()
    z = (target - mean) / std
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2.0 * math.pi)
    crps = std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))
    return _reduce(crps, reduction, "mean")


def sample_crps(
    samples: Tensor,
    target: Tensor,
    *,
    unbiased: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """CRPS of a predictive distribution given by samples, in its energy form.

    With samples :math:`x_1, \\dots, x_S` (Gneiting and Raftery, 2007, eq. 21):

    .. math::
        \\operatorname{CRPS} = \\frac1S \\sum_i |x_i - y|
        - \\frac{1}{2 D} \\sum_{i, j} |x_i - x_j|,

    with :math:`D = S^2` by default, the exact CRPS of the empirical distribution of the samples
    (e.g. an ensemble). As an estimate of the CRPS of the distribution the samples come from
    it is biased upward by :math:`\\mathbb{E}|X - X'| / (2S)`; ``unbiased=True`` uses
    :math:`D = S(S - 1)` (the "fair" CRPS), which removes that bias (needs ``S >= 2``).

    The pair sum is computed in :math:`O(S \\log S)` from the sorted samples,
    :math:`\\sum_{i,j} |x_i - x_j| = 2 \\sum_k (2k - S - 1)\\, x_{(k)}`.

    Args:
        samples: draws from the predictive distribution along the leading dim.
        target: observed :math:`y`.
        unbiased: use :math:`S(S-1)` instead of :math:`S^2` in the pair term.
        reduction: ``"mean"`` or ``"sum"`` over the batch elements, or ``"none"``.

    Shape:
        ``samples``: ``(S, *)``; ``target``: ``(*)``. Output: ``()``, or ``(*)`` for
        ``reduction="none"``.

    Returns:
        The CRPS.
    """
    samples = _check_floating("samples", samples)
    target = _check_floating("target", target)
    if samples.ndim < 1 or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have a leading sample dim of size S >= 1, (S, *batch), "
            f"got shape {_shape(samples)}"
        )
    if target.shape != samples.shape[1:]:
        raise ValueError(
            f"target must have the batch shape of samples (S, *batch) = {_shape(samples)}, "
            f"i.e. {tuple(samples.shape[1:])}, got {_shape(target)}"
        )
    num_samples = samples.shape[0]
    if unbiased and num_samples < 2:
        raise ValueError(
            f"samples must hold S >= 2 draws for unbiased=True, got shape {_shape(samples)}"
        )
    _check_reduction(reduction)
    abs_error = (samples - target).abs().mean(dim=0)
    sorted_samples = samples.sort(dim=0).values
    rank = torch.arange(1, num_samples + 1, dtype=samples.dtype, device=samples.device)
    weight = (2.0 * rank - num_samples - 1.0).reshape((num_samples,) + (1,) * target.ndim)
    pair_sum = 2.0 * (weight * sorted_samples).sum(dim=0)
    denominator = num_samples * (num_samples - 1) if unbiased else num_samples**2
    crps = abs_error - 0.5 * pair_sum / denominator
    return _reduce(crps, reduction, "target")


# --------------------------------------------------------------------------------------------
# Classification


def accuracy(probs: Tensor, target: Tensor) -> Tensor:
    """Fraction of examples whose most probable class is the target.

    Ties go to the lowest class index (``argmax``); for binary ``(N,)`` input this predicts
    class 1 only when :math:`p > 0.5`.

    Args:
        probs: class probabilities, ``(N, C)``, or ``(N,)`` for binary :math:`P(y = 1)`.
        target: class indices.

    Shape:
        ``probs``: ``(N, C)`` or ``(N,)``; ``target``: ``(N,)``, ``N >= 1``. Output: ``()``.

    Returns:
        The accuracy in [0, 1], in the dtype of ``probs``.
    """
    probs, target = _class_probs_and_target(probs, target)
    _check_nonempty("target", target)
    return (probs.argmax(dim=-1) == target).to(probs.dtype).mean()


def brier_score(probs: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Multi-class Brier score (Brier, 1950): squared error to the one-hot target.

    .. math::
        \\operatorname{BS} = \\frac1N \\sum_{n=1}^N \\sum_{c=1}^C (p_{nc} - [y_n = c])^2
        \\in [0, 2].

    Binary ``(N,)`` input is read as ``(N, 2) = [1 - p, p]``, so it scores the same as the
    two-column form: :math:`2 (p - y)^2` per example, twice the one-column binary Brier score
    (``sklearn.metrics.brier_score_loss``).

    Args:
        probs: class probabilities, ``(N, C)``, or ``(N,)`` for binary :math:`P(y = 1)`.
        target: class indices.
        reduction: ``"mean"`` or ``"sum"`` over examples, or ``"none"``.

    Shape:
        ``probs``: ``(N, C)`` or ``(N,)``; ``target``: ``(N,)``. Output: ``()``, or ``(N,)`` for
        ``reduction="none"``.

    Returns:
        The Brier score.
    """
    probs, target = _class_probs_and_target(probs, target)
    _check_reduction(reduction)
    one_hot = torch.zeros_like(probs).scatter_(-1, target.unsqueeze(-1), 1.0)
    per_example = (probs - one_hot).square().sum(dim=-1)
    return _reduce(per_example, reduction, "target")


def categorical_nll(probs: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Negative log probability of the target class, :math:`-\\log p_{n, y_n}`, in nats.

    The probability is clamped below at the dtype's smallest normal number, so a zero
    probability gives a large finite value (about 87 in float32, 708 in float64), not ``inf``.

    Args:
        probs: class probabilities (e.g. the MC-averaged predictive), ``(N, C)``, or ``(N,)``
            for binary :math:`P(y = 1)`.
        target: class indices.
        reduction: ``"mean"`` or ``"sum"`` over examples, or ``"none"``.

    Shape:
        ``probs``: ``(N, C)`` or ``(N,)``; ``target``: ``(N,)``. Output: ``()``, or ``(N,)`` for
        ``reduction="none"``.

    Returns:
        The NLL in nats.
    """
    probs, target = _class_probs_and_target(probs, target)
    _check_reduction(reduction)
    picked = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    nll = -torch.log(picked.clamp_min(torch.finfo(probs.dtype).tiny))
    return _reduce(nll, reduction, "target")


def _bin_statistics(probs: Tensor, target: Tensor, num_bins: int) -> CalibrationCurve:
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == target).to(probs.dtype)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=probs.dtype, device=probs.device)
    # right=False gives bins (e_b, e_{b+1}]; confidence 0 falls into the first bin.
    index = torch.bucketize(confidence.detach(), edges[1:-1], right=False)
    count = torch.bincount(index, minlength=num_bins)
    zeros = torch.zeros(num_bins, dtype=probs.dtype, device=probs.device)
    confidence_sum = zeros.index_add(0, index, confidence)
    correct_sum = zeros.index_add(0, index, correct)
    denominator = count.to(probs.dtype)  # 0/0 = NaN marks the empty bins
    return CalibrationCurve(confidence_sum / denominator, correct_sum / denominator, count)


def calibration_curve(probs: Tensor, target: Tensor, *, num_bins: int = 10) -> CalibrationCurve:
    """Reliability diagram statistics: accuracy against top-label confidence, per bin.

    The top-label confidence of an example is :math:`\\max_c p_{nc}`; examples are binned by it
    into ``num_bins`` equal-width bins :math:`(\\tfrac{b}{B}, \\tfrac{b+1}{B}]` (edges
    ``torch.linspace(0, 1, num_bins + 1)``). A calibrated classifier has ``bin_accuracy`` close
    to ``bin_confidence`` (Guo et al., 2017).

    Args:
        probs: class probabilities, ``(N, C)``, or ``(N,)`` for binary :math:`P(y = 1)`.
        target: class indices.
        num_bins: number of bins ``B >= 1``.

    Shape:
        ``probs``: ``(N, C)`` or ``(N,)``; ``target``: ``(N,)``. Output: three tensors of shape
        ``(B,)``.

    Returns:
        ``CalibrationCurve(bin_confidence, bin_accuracy, bin_count)``; empty bins have count 0
        and NaN confidence and accuracy.
    """
    num_bins = _check_num_bins(num_bins)
    probs, target = _class_probs_and_target(probs, target)
    return _bin_statistics(probs, target, num_bins)


def expected_calibration_error(probs: Tensor, target: Tensor, *, num_bins: int = 15) -> Tensor:
    """Expected calibration error of the top label, with equal-width bins (Guo et al., 2017).

    .. math::
        \\operatorname{ECE} = \\sum_{b=1}^B \\frac{n_b}{N}
        \\big|\\operatorname{acc}(b) - \\operatorname{conf}(b)\\big|,

    with the bins of :func:`calibration_curve`; empty bins contribute 0.

    Args:
        probs: class probabilities, ``(N, C)``, or ``(N,)`` for binary :math:`P(y = 1)`.
        target: class indices.
        num_bins: number of bins ``B >= 1`` (15 as in Guo et al.).

    Shape:
        ``probs``: ``(N, C)`` or ``(N,)``; ``target``: ``(N,)``, ``N >= 1``. Output: ``()``.

    Returns:
        The ECE in [0, 1].
    """
    num_bins = _check_num_bins(num_bins)
    probs, target = _class_probs_and_target(probs, target)
    _check_nonempty("target", target)
    curve = _bin_statistics(probs, target, num_bins)
    gap = torch.where(
        curve.bin_count > 0,
        (curve.bin_accuracy - curve.bin_confidence).abs(),
        torch.zeros_like(curve.bin_confidence),
    )
    weight = curve.bin_count.to(probs.dtype) / target.numel()
    return (weight * gap).sum()


def predictive_entropy(probs: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Entropy of a categorical distribution, :math:`-\\sum_c p_c \\log p_c`, in nats.

    Total predictive uncertainty when ``probs`` is the MC-averaged predictive. Uses
    :math:`0 \\log 0 = 0`, with a finite gradient at zero probabilities.

    Args:
        probs: class probabilities, class dim last.
        reduction: ``"mean"`` or ``"sum"`` over the batch elements, or ``"none"``.

    Shape:
        ``probs``: ``(*, C)``. Output: ``()``, or ``(*)`` for ``reduction="none"``.

    Returns:
        The entropy, in :math:`[0, \\log C]`.
    """
    probs = _check_probs("probs", probs, min_ndim=1)
    _check_reduction(reduction)
    entropy = -_xlogx(probs).sum(dim=-1)
    return _reduce(entropy, reduction, "probs")


def mutual_information(prob_samples: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Mutual information between the label and the weights, from ``S`` posterior samples.

    The epistemic part of the predictive entropy (the BALD score, Houlsby et al., 2011):

    .. math::
        \\operatorname{MI} = H\\Big[\\frac1S \\sum_s p^{(s)}\\Big]
        - \\frac1S \\sum_s H\\big[p^{(s)}\\big] \\;\\ge 0,

    in nats. It is 0 when all samples agree. Rounding can make the difference slightly negative;
    it is clamped at 0.

    Args:
        prob_samples: class probabilities of each posterior sample, sample dim first, class
            dim last.
        reduction: ``"mean"`` or ``"sum"`` over the batch elements, or ``"none"``.

    Shape:
        ``prob_samples``: ``(S, *, C)``, e.g. ``(S, N, C)``. Output: ``()``, or ``(*)`` for
        ``reduction="none"``.

    Returns:
        The mutual information, in :math:`[0, \\log C]`.
    """
    prob_samples = _check_probs("prob_samples", prob_samples, min_ndim=2)
    if prob_samples.shape[0] < 1:
        raise ValueError(
            f"prob_samples must have a leading sample dim of size S >= 1, "
            f"got shape {_shape(prob_samples)}"
        )
    _check_reduction(reduction)
    entropy_of_mean = -_xlogx(prob_samples.mean(dim=0)).sum(dim=-1)
    mean_entropy = -_xlogx(prob_samples).sum(dim=-1).mean(dim=0)
    mi = (entropy_of_mean - mean_entropy).clamp_min(0.0)
    return _reduce(mi, reduction, "prob_samples")
