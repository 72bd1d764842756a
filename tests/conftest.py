"""Shared test hygiene: every test seeded, float64 on request, failure-rate tolerances.

Statistical tests in this suite derive their tolerance from a stated *failure rate*: the
probability that a correct implementation fails the test on a fresh seed. The seed fixed here
makes a run reproducible; it is not what makes the tests pass.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist
from types import ModuleType

import pytest
import torch

#: Two-sided failure rate of every statistical test in the suite, before Bonferroni.
FAILURE_RATE = 1e-6


@pytest.fixture(autouse=True)
def _seed_torch() -> Iterator[None]:
    """Seed torch's default generator before every test, so every run draws the same numbers."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64() -> Iterator[torch.dtype]:
    """Make float64 the default dtype for a test about math; restore the previous default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test's long loop of tiny ops on one intra-op thread; restore the count after.

    Tensors of a few hundred entries gain nothing from threads, and on an oversubscribed machine
    (CI runners, parallel jobs) the worker threads' synchronisation can make such a loop tens of
    times slower: measured 7 s single-threaded vs 180 s with 2 threads on a loaded 2-core box.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def z_bound(num_checks: int = 1, rate: float = FAILURE_RATE) -> float:
    r"""Normal quantile ``z`` such that ``P(max_k |Z_k| > z) <= rate`` over ``num_checks`` checks.

    Two-sided, Bonferroni over the checks: :math:`z = \Phi^{-1}(1 - \text{rate} / (2m))`.
    """
    if num_checks < 1:
        raise ValueError(f"num_checks must be >= 1, got {num_checks}")
    return NormalDist().inv_cdf(1.0 - rate / (2.0 * num_checks))


def mean_tolerance(variance: torch.Tensor, num_samples: int, num_checks: int) -> torch.Tensor:
    r"""Bound on ``|sample mean - true mean|`` of ``num_samples`` i.i.d. draws of known variance.

    The sample mean of Gaussian draws is exactly :math:`\mathcal N(\mu, \sigma^2/N)`, so
    :math:`|\bar y - \mu| \le z\,\sigma/\sqrt N` fails with probability ``rate / num_checks``.
    """
    return z_bound(num_checks) * torch.sqrt(variance / num_samples)


def variance_tolerance(variance: torch.Tensor, num_samples: int, num_checks: int) -> torch.Tensor:
    r"""Bound on ``|sample variance - true variance|`` of ``num_samples`` Gaussian draws.

    :math:`(N-1)s^2/\sigma^2 \sim \chi^2_{N-1}`, so :math:`\operatorname{sd}(s^2) =
    \sigma^2\sqrt{2/(N-1)}`; by the normal approximation to the chi-square the bound
    :math:`z\,\sigma^2\sqrt{2/(N-1)}` fails with probability ~``rate / num_checks``. (The
    chi-square's skewness :math:`\sqrt{8/(N-1)}` moves the tail quantile by about
    :math:`\text{skew}\,(z^2-1)/6` standard deviations — 0.1 sd at N = 20 000, z = 5.6 — which
    changes the failure rate by a small factor, not its order of magnitude.)
    """
    return z_bound(num_checks) * variance * math.sqrt(2.0 / (num_samples - 1))


def correlation_tolerance(num_samples: int, num_checks: int, kurtosis_factor: float = 1.0) -> float:
    r"""Bound on a sample correlation whose true value is 0.

    For uncorrelated ``a``, ``b`` with mean 0, :math:`\operatorname{Var}(\overline{ab}) =
    E[a^2b^2]/N`. For independent pairs :math:`E[a^2b^2] = E[a^2]E[b^2]`, so the correlation has
    sd :math:`1/\sqrt N`; for uncorrelated but dependent Gaussian marginals, Cauchy-Schwarz gives
    :math:`E[a^2b^2] \le \sqrt{E a^4\,E b^4} = 3\,E[a^2]E[b^2]`: pass ``kurtosis_factor=3``.
    """
    return z_bound(num_checks) * math.sqrt(kurtosis_factor / num_samples)


def sample_correlation(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (elementwise over the other dims)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / torch.sqrt((a * a).sum(dim) * (b * b).sum(dim))


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script (e.g. a benchmark) as module ``name``, registered in ``sys.modules``
    (dataclasses look their module up there); nothing is left registered if it fails."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
