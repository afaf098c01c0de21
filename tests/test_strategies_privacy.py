"""The RDP accountant against closed forms and an independent numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedbus.aggregator.errors import PrivacyError
from fedbus.aggregator.privacy import RdpAccountant, epsilon_from_rdp, rdp_sampled_gaussian


def _rdp_by_integration(q: float, sigma: float, alpha: float) -> float:
    """D_α(μ₁‖μ₀) with μ₀ = N(0, σ²), μ₁ = (1−q)·N(0, σ²) + q·N(1, σ²), by quadrature."""
    z = np.linspace(-40 * sigma, 40 * sigma + 1, 400_001)
    log_mu0 = -z * z / (2 * sigma**2)
    ratio = (1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))  # μ₁/μ₀
    integrand = np.exp(log_mu0 - 0.5 * math.log(2 * math.pi * sigma**2)) * ratio**alpha
    return math.log(np.trapezoid(integrand, z)) / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.0), (0.1, 1.5), (0.3, 4.0)])
@pytest.mark.parametrize("alpha", [2, 5, 12])
def test_sampled_gaussian_rdp_matches_numerical_integration(q: float, sigma: float, alpha: int) -> None:
    (ours,) = rdp_sampled_gaussian(q, sigma, (alpha,))
    assert ours == pytest.approx(_rdp_by_integration(q, sigma, alpha), rel=1e-4)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 0.8), (0.1, 0.5), (0.1, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.7])
def test_fractional_orders_bound_the_integrated_divergence(q: float, sigma: float, alpha: float) -> None:
    """The fractional-order series (absolute binomial terms) is an upper bound: close to the divergence
    where it converges, +∞ (an order the accountant then never picks) where it does not."""
    (ours,) = rdp_sampled_gaussian(q, sigma, (alpha,))
    exact = _rdp_by_integration(q, sigma, alpha)
    assert ours >= exact * (1 - 1e-6), (ours, exact)
    assert math.isinf(ours) or ours <= exact * 1.1, (ours, exact)
    if alpha > 4:
        assert ours <= exact * 1.002, (ours, exact)


def test_plain_gaussian_is_alpha_over_two_sigma_squared() -> None:
    orders = (2, 3, 10, 64)
    np.testing.assert_allclose(rdp_sampled_gaussian(1.0, 2.0, orders), [a / 8 for a in orders])


def test_epsilon_composes_and_grows_with_rounds() -> None:
    acc = RdpAccountant()
    assert acc.epsilon(1e-5) == 0.0
    eps = []
    for _ in range(3):
        acc.step(q=0.1, sigma=1.0, count=50)
        eps.append(acc.epsilon(1e-5))
    assert eps[0] < eps[1] < eps[2]
    one_shot = RdpAccountant()
    one_shot.step(q=0.1, sigma=1.0, count=150)
    assert one_shot.epsilon(1e-5) == pytest.approx(eps[-1])
    more_noise = RdpAccountant()
    more_noise.step(q=0.1, sigma=2.0, count=150)
    assert more_noise.epsilon(1e-5) < eps[-1]


def test_conversion_is_no_worse_than_the_classic_bound() -> None:
    orders = tuple(range(2, 64))
    rdp = 100 * rdp_sampled_gaussian(0.05, 1.2, orders)
    ours, _ = epsilon_from_rdp(rdp, 1e-5, orders)
    classic = min(r + math.log(1e5) / (a - 1) for r, a in zip(rdp, orders, strict=True))
    assert 0 < ours <= classic


def test_invalid_parameters_raise() -> None:
    with pytest.raises(PrivacyError):
        rdp_sampled_gaussian(0.0, 1.0)
    with pytest.raises(PrivacyError):
        rdp_sampled_gaussian(0.5, -1.0)
    assert np.isinf(rdp_sampled_gaussian(0.5, 0.0)).all()  # no noise: no privacy, said so
    with pytest.raises(PrivacyError):
        epsilon_from_rdp(np.zeros(3), 1.5, (2, 3, 4))
