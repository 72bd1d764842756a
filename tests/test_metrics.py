"""Tests for varlin.metrics: closed forms, second routes, calibrated statistical checks, errors.

Math tests run in float64. Statistical tests draw from a fixed-seed generator and derive their
tolerance from a stated failure rate (the probability that a correct implementation fails on a
fresh seed), so the seed is not what makes them pass.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

from varlin.metrics import (
    CalibrationCurve,
    Interval,
    accuracy,
    brier_score,
    calibration_curve,
    categorical_nll,
    expected_calibration_error,
    gaussian_crps,
    gaussian_interval,
    gaussian_nll,
    interval_coverage,
    mixture_nll,
    mutual_information,
    predictive_entropy,
    rmse,
    sample_crps,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_sided_z(failure_rate: float) -> float:
    """Normal quantile z with P(|Z| > z) = failure_rate."""
    return NormalDist().inv_cdf(1.0 - failure_rate / 2.0)


def _gaussian_batch(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64):
    g = _gen(seed)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    var = torch.rand(shape, generator=g, dtype=dtype) * 2.0 + 0.1
    target = torch.randn(shape, generator=g, dtype=dtype) * 2.0
    return mean, var, target


# ---------------------------------------------------------------------------------------------
# gaussian_nll / mixture_nll


@pytest.mark.parametrize("shape", [(), (7,), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gaussian_nll_matches_normal_log_prob(shape, dtype):
    mean, var, target = _gaussian_batch(shape, seed=0, dtype=dtype)
    expected = -Normal(mean, var.sqrt()).log_prob(target)
    tol = 1e-12 if dtype == F64 else 1e-5
    none = gaussian_nll(mean, var, target, reduction="none")
    assert none.shape == mean.shape and none.dtype == dtype
    torch.testing.assert_close(none, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(gaussian_nll(mean, var, target), expected.mean(), atol=tol, rtol=tol)
    torch.testing.assert_close(
        gaussian_nll(mean, var, target, reduction="sum"), expected.sum(), atol=tol, rtol=tol
    )


def test_gaussian_nll_standard_normal_at_mean():
    value = gaussian_nll(
        torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    )
    assert value.item() == pytest.approx(0.5 * math.log(2 * math.pi), rel=1e-15)


def test_mixture_nll_single_component_equals_gaussian_nll():
    mean, var, target = _gaussian_batch((5, 3), seed=1)
    got = mixture_nll(mean.unsqueeze(0), var.unsqueeze(0), target, reduction="none")
    torch.testing.assert_close(got, gaussian_nll(mean, var, target, reduction="none"))


def test_mixture_nll_identical_components_equals_gaussian_nll():
    mean, var, target = _gaussian_batch((6,), seed=2)
    means, vars_ = mean.expand(9, 6), var.expand(9, 6)
    torch.testing.assert_close(
        mixture_nll(means, vars_, target, reduction="none"),
        gaussian_nll(mean, var, target, reduction="none"),
        atol=1e-12,
        rtol=1e-12,
    )


def test_mixture_nll_matches_naive_density_average_and_mixture_same_family():
    g = _gen(3)
    num_samples, n = 8, 10
    means = torch.randn(num_samples, n, generator=g, dtype=F64)
    vars_ = torch.rand(num_samples, n, generator=g, dtype=F64) + 0.2
    target = torch.randn(n, generator=g, dtype=F64)
    got = mixture_nll(means, vars_, target, reduction="none")
    # Route 1: average the densities directly (fine at these moderate values).
    density = torch.exp(-0.5 * (target - means) ** 2 / vars_) / torch.sqrt(2 * math.pi * vars_)
    torch.testing.assert_close(got, -torch.log(density.mean(0)), atol=1e-12, rtol=1e-12)
    # Route 2: torch's own equally weighted mixture.
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(n, num_samples, dtype=F64)),
        Normal(means.T, vars_.T.sqrt()),
    )
    torch.testing.assert_close(got, -mixture.log_prob(target), atol=1e-12, rtol=1e-12)
    # Jensen: min_s NLL_s <= mixture NLL <= mean_s NLL_s.
    per_component = gaussian_nll(means, vars_, target.expand(num_samples, n), reduction="none")
    assert torch.all(got >= per_component.min(0).values - 1e-12)
    assert torch.all(got <= per_component.mean(0) + 1e-12)


def test_mixture_nll_is_finite_for_far_out_targets_in_float32():
    # Each component density is exp(-~5e5): 0 in float32 (and float64), so a naive average
    # gives -log 0 = inf. The logsumexp route must stay finite and match the float64 answer.
    means = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    vars_ = torch.ones(4, 1)
    target = torch.tensor([1000.0])
    got = mixture_nll(means, vars_, target)
    assert torch.isfinite(got)
    expected = -MixtureSameFamily(
        Categorical(logits=torch.zeros(4, dtype=F64)), Normal(means.double().squeeze(1), 1.0)
    ).log_prob(target.double())
    torch.testing.assert_close(got.double(), expected.squeeze(), rtol=1e-6, atol=0.0)
    naive = -torch.log(Normal(means, 1.0).log_prob(target).exp().mean(0))
    assert torch.isinf(naive).all()  # the test really exercises the underflow


# ---------------------------------------------------------------------------------------------
# rmse, intervals, coverage


def test_rmse_hand_example():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    target = torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=F64)
    # squared errors 0, 4, 0, 16 -> mean 5
    assert rmse(pred, target).item() == pytest.approx(math.sqrt(5.0), rel=1e-15)
    assert rmse(pred, pred).item() == 0.0


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_gaussian_interval_matches_normal_icdf(level):
    mean, var, _ = _gaussian_batch((11,), seed=4)
    interval = gaussian_interval(mean, var, level)
    assert isinstance(interval, Interval)
    dist = Normal(mean, var.sqrt())
    tail = torch.full_like(mean, (1 - level) / 2)
    torch.testing.assert_close(interval.lower, dist.icdf(tail))
    torch.testing.assert_close(interval.upper, dist.icdf(1 - tail))
    # The interval holds `level` of the mass.
    mass = dist.cdf(interval.upper) - dist.cdf(interval.lower)
    torch.testing.assert_close(mass, torch.full_like(mass, level), atol=1e-12, rtol=0.0)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_coverage_of_exact_gaussian_intervals_is_level(level):
    # n independent indicators with success probability `level`: the coverage has standard
    # deviation sqrt(level (1 - level) / n). Failure rate 1e-6 per case -> z = 4.89.
    n = 200_000
    g = _gen(5)
    mean = torch.randn(n, generator=g, dtype=F64) * 3.0
    var = torch.rand(n, generator=g, dtype=F64) * 4.0 + 0.01
    target = mean + var.sqrt() * torch.randn(n, generator=g, dtype=F64)
    lower, upper = gaussian_interval(mean, var, level)
    coverage = interval_coverage(lower, upper, target)
    tol = _two_sided_z(1e-6) * math.sqrt(level * (1 - level) / n)
    assert abs(coverage.item() - level) < tol


def test_interval_coverage_hand_example_is_closed_at_both_ends():
    lower = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    upper = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    target = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.1])
    assert interval_coverage(lower, upper, target).item() == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------------------
# CRPS


def test_gaussian_crps_standard_normal_at_mean():
    value = gaussian_crps(
        torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    )
    expected = 2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi)  # 0.2336949...
    assert value.item() == pytest.approx(expected, rel=1e-14)


def test_gaussian_crps_matches_integral_definition():
    # CRPS(F, y) = int (F(x) - 1{x >= y})^2 dx, by the trapezoid rule on a fine grid.
    mean, var, target = _gaussian_batch((5,), seed=6)
    got = gaussian_crps(mean, var, target, reduction="none")
    x = torch.linspace(-30.0, 30.0, 600_001, dtype=F64).unsqueeze(1)
    integrand = (Normal(mean, var.sqrt()).cdf(x) - (x >= target).to(F64)) ** 2
    expected = torch.trapezoid(integrand, x.squeeze(1), dim=0)
    # The jump at y costs at most one grid step (1e-4) of the integrand (<= 1) in the trapezoid.
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0.0)


def test_gaussian_crps_point_mass_limit_is_absolute_error():
    mean = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=F64)
    target = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=F64)
    var = torch.full_like(mean, 1e-20)  # std 1e-10
    got = gaussian_crps(mean, var, target, reduction="none")
    torch.testing.assert_close(got, (target - mean).abs(), atol=1e-9, rtol=0.0)


def test_sample_crps_matches_pairwise_energy_form():
    g = _gen(7)
    samples = torch.randn(13, 4, 3, generator=g, dtype=F64)
    target = torch.randn(4, 3, generator=g, dtype=F64)
    num = samples.shape[0]
    abs_error = (samples - target).abs().mean(0)
    pairs = (samples.unsqueeze(0) - samples.unsqueeze(1)).abs().sum((0, 1))
    torch.testing.assert_close(
        sample_crps(samples, target, reduction="none"), abs_error - 0.5 * pairs / num**2
    )
    torch.testing.assert_close(
        sample_crps(samples, target, unbiased=True, reduction="none"),
        abs_error - 0.5 * pairs / (num * (num - 1)),
    )


def test_sample_crps_single_sample_is_absolute_error():
    samples = torch.tensor([[1.0, -2.0]], dtype=F64)
    target = torch.tensor([0.25, 1.0], dtype=F64)
    torch.testing.assert_close(
        sample_crps(samples, target, reduction="none"), torch.tensor([0.75, 3.0], dtype=F64)
    )


def test_sample_crps_converges_to_gaussian_closed_form():
    # The fair (unbiased) sample CRPS is a U-statistic with kernel
    # h(x, x') = (|x - y| + |x' - y| - |x - x'|) / 2; its variance is ~ 4 zeta_1 / S with
    # zeta_1 = Var(f(X)) / 4, f(x) = |x - y| - E|x - X'|. f is 2-Lipschitz, so by the Gaussian
    # Poincare inequality Var f(X) <= 4 sigma^2: sd <= 2 sigma / sqrt(S). A factor 1.1 covers the
    # O(1/S^2) term. Failure rate 1e-6 over all K elements (union bound).
    num_samples = 200_000
    mean = torch.tensor([0.0, 1.0, -3.0, 0.5, 2.0, 0.0], dtype=F64)
    var = torch.tensor([1.0, 0.25, 4.0, 2.0, 0.5, 3.0], dtype=F64)
    target = torch.tensor([0.0, 2.0, -1.0, 5.0, 1.5, -4.0], dtype=F64)
    g = _gen(8)
    samples = mean + var.sqrt() * torch.randn(num_samples, mean.numel(), generator=g, dtype=F64)
    got = sample_crps(samples, target, unbiased=True, reduction="none")
    expected = gaussian_crps(mean, var, target, reduction="none")
    z = _two_sided_z(1e-6 / mean.numel())
    tol = 1.1 * z * 2.0 * var.sqrt() / math.sqrt(num_samples)
    assert torch.all((got - expected).abs() < tol), (got - expected, tol)
    # The default (empirical-distribution) form sits above the fair one by E|X-X'|/(2S) only.
    biased = sample_crps(samples, target, reduction="none")
    assert torch.all(biased >= got)
    assert torch.all(biased - got < 2.0 * var.sqrt() / num_samples)


# ---------------------------------------------------------------------------------------------
# Classification: accuracy, Brier, NLL


def test_accuracy_hand_example_and_binary_form():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2, 2, 0])
    assert accuracy(probs, target).item() == pytest.approx(0.75)  # tie -> class 0
    p1 = torch.tensor([0.9, 0.2, 0.5, 0.6])
    assert accuracy(p1, torch.tensor([1, 0, 1, 0])).item() == pytest.approx(0.5)  # 0.5 -> class 0


def test_brier_score_hand_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=F64)
    target = torch.tensor([0, 2])
    # (0.3^2 + 0.2^2 + 0.1^2) = 0.14 and (0.1^2 + 0.8^2 + 0.9^2) = 1.46
    torch.testing.assert_close(
        brier_score(probs, target, reduction="none"), torch.tensor([0.14, 1.46], dtype=F64)
    )
    assert brier_score(probs, target).item() == pytest.approx(0.8, rel=1e-14)
    one_hot = torch.nn.functional.one_hot(target, 3).to(F64)
    assert brier_score(one_hot, target).item() == 0.0


def test_brier_score_binary_forms_agree():
    p1 = torch.tensor([0.9, 0.2, 0.5, 0.0], dtype=F64)
    target = torch.tensor([1, 1, 0, 0])
    two_column = torch.stack([1 - p1, p1], dim=1)
    expected = 2.0 * (p1 - target.to(F64)) ** 2
    torch.testing.assert_close(brier_score(p1, target, reduction="none"), expected)
    torch.testing.assert_close(brier_score(two_column, target, reduction="none"), expected)
    torch.testing.assert_close(brier_score(p1, target.bool()), expected.mean())


def test_categorical_nll_matches_categorical_log_prob_and_stays_finite():
    g = _gen(9)
    probs = torch.softmax(torch.randn(20, 5, generator=g, dtype=F64), dim=-1)
    target = torch.randint(0, 5, (20,), generator=g)
    torch.testing.assert_close(
        categorical_nll(probs, target, reduction="none"), -Categorical(probs).log_prob(target)
    )
    zero = torch.tensor([[1.0, 0.0]], requires_grad=True)
    value = categorical_nll(zero, torch.tensor([1]))
    assert torch.isfinite(value)
    value.backward()
    assert zero.grad is not None and torch.isfinite(zero.grad).all()
    torch.testing.assert_close(
        categorical_nll(torch.tensor([0.25], dtype=F64), torch.tensor([1])),
        torch.tensor(math.log(4.0), dtype=F64),
    )


# ---------------------------------------------------------------------------------------------
# Calibration


def _ece_by_loop(probs: torch.Tensor, target: torch.Tensor, num_bins: int) -> float:
    confidence, predicted = probs.max(dim=1)
    total = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        in_bin = [
            i
            for i in range(len(target))
            if (low < confidence[i].item() <= high) or (b == 0 and confidence[i].item() == 0.0)
        ]
        if in_bin:
            acc = sum(float(predicted[i] == target[i]) for i in in_bin) / len(in_bin)
            conf = sum(confidence[i].item() for i in in_bin) / len(in_bin)
            total += len(in_bin) / len(target) * abs(acc - conf)
    return total


def test_ece_is_zero_for_a_perfectly_calibrated_construction():
    rows = (
        [([0.8, 0.1, 0.1], 0)] * 8  # confidence 0.8: 8 of 10 correct
        + [([0.8, 0.1, 0.1], 1)] * 2
        + [([0.25, 0.5, 0.25], 1)] * 2  # confidence 0.5: 2 of 4 correct
        + [([0.25, 0.5, 0.25], 2)] * 2
        + [([0.0, 0.0, 1.0], 2)] * 3  # confidence 1: all correct
    )
    probs = torch.tensor([r[0] for r in rows], dtype=F64)
    target = torch.tensor([r[1] for r in rows])
    for num_bins in (1, 10, 15):
        assert expected_calibration_error(probs, target, num_bins=num_bins).item() < 1e-12


def test_ece_hand_example():
    # Binary, confidences 0.95, 0.95, 0.65, 0.65 with correctness 1, 0, 1, 1:
    # bin of 0.95: |0.5 - 0.95| = 0.45; bin of 0.65: |1 - 0.65| = 0.35; ECE = (0.45 + 0.35) / 2.
    p1 = torch.tensor([0.95, 0.95, 0.35, 0.65], dtype=F64)
    target = torch.tensor([1, 0, 0, 1])
    assert expected_calibration_error(p1, target, num_bins=10).item() == pytest.approx(0.4)
    # One bin: |acc - mean confidence| = |0.75 - 0.8|.
    assert expected_calibration_error(p1, target, num_bins=1).item() == pytest.approx(0.05)


@pytest.mark.parametrize("num_bins", [1, 4, 15])
def test_ece_matches_explicit_loop(num_bins):
    g = _gen(10)
    probs = torch.softmax(2.0 * torch.randn(200, 4, generator=g, dtype=F64), dim=-1)
    target = torch.randint(0, 4, (200,), generator=g)
    got = expected_calibration_error(probs, target, num_bins=num_bins).item()
    assert got == pytest.approx(_ece_by_loop(probs, target, num_bins), abs=1e-12)


def test_calibration_curve_hand_example():
    p1 = torch.tensor([0.95, 0.95, 0.35, 0.65, 0.5], dtype=F64)  # confidences .95 .95 .65 .65 .5
    target = torch.tensor([1, 0, 0, 1, 1])  # the 0.5 tie predicts class 0: wrong
    curve = calibration_curve(p1, target, num_bins=10)
    assert isinstance(curve, CalibrationCurve)
    assert curve.bin_count.tolist() == [0, 0, 0, 0, 1, 0, 2, 0, 0, 2]
    assert curve.bin_count.dtype == torch.int64
    assert curve.bin_confidence[4].item() == pytest.approx(0.5)  # 0.5 is in (0.4, 0.5]
    assert curve.bin_accuracy[4].item() == 0.0
    assert curve.bin_confidence[6].item() == pytest.approx(0.65)
    assert curve.bin_accuracy[6].item() == 1.0
    assert curve.bin_confidence[9].item() == pytest.approx(0.95)
    assert curve.bin_accuracy[9].item() == 0.5
    empty = curve.bin_count == 0
    assert torch.isnan(curve.bin_confidence[empty]).all()
    assert torch.isnan(curve.bin_accuracy[empty]).all()


# ---------------------------------------------------------------------------------------------
# Entropy and mutual information


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_entropy_of_uniform_is_log_num_classes(num_classes):
    probs = torch.full((4, num_classes), 1.0 / num_classes, dtype=F64)
    torch.testing.assert_close(
        predictive_entropy(probs, reduction="none"),
        torch.full((4,), math.log(num_classes), dtype=F64),
    )


def test_entropy_matches_categorical_and_is_stable_at_zero():
    g = _gen(11)
    probs = torch.softmax(torch.randn(3, 6, 5, generator=g, dtype=F64), dim=-1)
    torch.testing.assert_close(
        predictive_entropy(probs, reduction="none"), Categorical(probs).entropy()
    )
    one_hot = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64, requires_grad=True)
    value = predictive_entropy(one_hot)
    assert value.item() == 0.0
    value.backward()
    assert one_hot.grad is not None and torch.isfinite(one_hot.grad).all()


def test_mutual_information_zero_when_samples_agree():
    g = _gen(12)
    probs = torch.softmax(torch.randn(7, 4, generator=g, dtype=F64), dim=-1)
    samples = probs.expand(5, 7, 4)
    mi = mutual_information(samples, reduction="none")
    assert mi.shape == (7,)
    assert torch.all(mi.abs() < 1e-12)
    one_hot = torch.tensor([[[0.0, 1.0]]], dtype=F64).expand(3, 1, 2)
    assert mutual_information(one_hot).item() == 0.0


def test_mutual_information_hand_value_and_kl_route():
    # Two confident samples that disagree: H[mean] = log 2, mean H = 0.
    samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=F64)
    assert mutual_information(samples).item() == pytest.approx(math.log(2.0), rel=1e-15)
    # Second route: MI = (1/S) sum_s KL(p_s || mean_s p_s); positive when samples differ.
    g = _gen(13)
    samples = torch.softmax(torch.randn(6, 9, 3, generator=g, dtype=F64), dim=-1)
    mean = Categorical(samples.mean(0))
    expected = torch.stack([kl_divergence(Categorical(s), mean) for s in samples]).mean(0)
    mi = mutual_information(samples, reduction="none")
    torch.testing.assert_close(mi, expected)
    assert torch.all(mi > 0)
    assert torch.all(mi <= predictive_entropy(samples.mean(0), reduction="none"))


# ---------------------------------------------------------------------------------------------
# Validation errors name the argument, what it got and the rule


def _ok() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(5), torch.ones(5), torch.zeros(5)


PROBS = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
LABELS = torch.tensor([0, 1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: gaussian_nll(torch.zeros(5), torch.ones(5), torch.zeros(4)),
            r"target must have the shape of mean \(5,\), got \(4,\)",
        ),
        (
            lambda: gaussian_nll(torch.zeros(5), torch.ones(3), torch.zeros(5)),
            r"var must have the shape of mean \(5,\), got \(3,\)",
        ),
        (
            lambda: gaussian_nll(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2)),
            r"var must be > 0 everywhere, got 1 entries",
        ),
        (
            lambda: gaussian_nll(torch.zeros(1), torch.tensor([float("nan")]), torch.zeros(1)),
            r"var must be > 0",
        ),
        (lambda: gaussian_nll(*_ok(), reduction="avg"), r"reduction must be one of .*'avg'"),
        (
            lambda: gaussian_nll(torch.zeros(0), torch.ones(0), torch.zeros(0)),
            r"mean must have at least one element",
        ),
        (lambda: gaussian_nll([0.0], torch.ones(1), torch.zeros(1)), r"mean must be a torch"),
        (
            lambda: gaussian_nll(torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.long)),
            r"target must have a floating dtype, got torch.int64",
        ),
        (
            lambda: mixture_nll(torch.zeros(3, 5), torch.ones(3, 5), torch.zeros(3)),
            r"target must have the batch shape of means .*\(5,\), got \(3,\)",
        ),
        (
            lambda: mixture_nll(torch.zeros(3, 5), torch.ones(3, 4), torch.zeros(5)),
            r"vars must have the shape of means \(3, 5\), got \(3, 4\)",
        ),
        (
            lambda: mixture_nll(torch.zeros(3, 2), -torch.ones(3, 2), torch.zeros(2)),
            r"vars must be > 0",
        ),
        (lambda: mixture_nll(torch.zeros(()), torch.ones(()), torch.zeros(())), r"means must"),
        (lambda: rmse(torch.zeros(3), torch.zeros(2)), r"target must have the shape of pred"),
        (
            lambda: interval_coverage(torch.zeros(3), torch.ones(3), torch.zeros(2)),
            r"target must have the shape of lower \(3,\), got \(2,\)",
        ),
        (
            lambda: interval_coverage(torch.ones(2), torch.zeros(2), torch.zeros(2)),
            r"upper must be >= lower",
        ),
        (lambda: gaussian_interval(*_ok()[:2], level=1.0), r"level must be .*\(0, 1\), got 1.0"),
        (lambda: gaussian_interval(*_ok()[:2], level=0), r"level must be .*got 0"),
        (lambda: gaussian_interval(*_ok()[:2], level=True), r"level must be"),
        (lambda: gaussian_crps(torch.zeros(5), torch.zeros(5), torch.zeros(5)), r"var must be > 0"),
        (
            lambda: sample_crps(torch.zeros(10, 3), torch.zeros(4)),
            r"target must have the batch shape of samples .*got \(4,\)",
        ),
        (
            lambda: sample_crps(torch.zeros(1, 3), torch.zeros(3), unbiased=True),
            r"samples must hold S >= 2",
        ),
        (
            lambda: brier_score(torch.tensor([[0.5, 0.6]]), torch.tensor([0])),
            r"probs must sum to 1 along the class dim .*0.0001, got a maximum deviation of 0.1",
        ),
        (
            lambda: brier_score(torch.tensor([[1.5, -0.5]]), torch.tensor([0])),
            r"probs must lie in \[0, 1\], got min -0.5",
        ),
        (lambda: accuracy(torch.tensor([1.2]), torch.tensor([1])), r"probs of shape \(N,\)"),
        (
            lambda: accuracy(PROBS, torch.tensor([0, 1, 1])),
            r"target must have shape \(N,\) = \(2,\) to match probs \(2, 2\), got \(3,\)",
        ),
        (
            lambda: accuracy(PROBS, torch.tensor([0, 2])),
            r"target must hold class indices in \[0, 2\), got min 0 and max 2",
        ),
        (lambda: accuracy(PROBS, torch.tensor([0.0, 1.0])), r"target must hold integer class"),
        (lambda: accuracy(torch.ones(2, 1, 1), LABELS), r"probs must have shape \(N, C\)"),
        (lambda: categorical_nll(PROBS, LABELS, reduction="max"), r"reduction must be one of"),
        (
            lambda: expected_calibration_error(PROBS, LABELS, num_bins=0),
            r"num_bins must be an integer >= 1, got 0",
        ),
        (
            lambda: calibration_curve(PROBS, LABELS, num_bins=2.5),
            r"num_bins must be an integer >= 1, got 2.5",
        ),
        (
            lambda: predictive_entropy(torch.tensor([0.3, 0.3])),
            r"probs must sum to 1 along the class dim",
        ),
        (
            lambda: mutual_information(torch.tensor([0.5, 0.5])),
            r"prob_samples must have at least 2 dims .*got shape \(2,\)",
        ),
        (
            lambda: mutual_information(torch.tensor([[0.5, 0.4]])),
            r"prob_samples must sum to 1",
        ),
    ],
)
def test_errors_name_the_argument_and_the_rule(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_probs_within_tolerance_are_accepted():
    probs = torch.tensor([[0.5, 0.5 + 5e-5]], dtype=F64)
    assert predictive_entropy(probs).isfinite()
    assert accuracy(probs, torch.tensor([1])).item() == 1.0


def test_metrics_are_differentiable():
    mean, var, target = _gaussian_batch((4,), seed=14)
    mean.requires_grad_(True)
    var.requires_grad_(True)
    for metric in (gaussian_nll, gaussian_crps):
        assert torch.autograd.gradcheck(lambda m, v, f=metric: f(m, v, target), (mean, var))
    means = mean.detach().expand(3, 4).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda m: mixture_nll(m, var.detach().expand(3, 4), target), (means,)
    )
    # dCRPS/dm = 1 - 2 Phi(z), the closed form of the derivative.
    (grad,) = torch.autograd.grad(gaussian_crps(mean, var, target, reduction="sum"), mean)
    z = (target - mean.detach()) / var.detach().sqrt()
    torch.testing.assert_close(grad, 1.0 - 2.0 * Normal(0.0, 1.0).cdf(z).to(F64))
