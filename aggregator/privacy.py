"""Central differential privacy for federated averaging, and an RDP privacy accountant.

**Mechanism** (DP-FedAvg, McMahan et al. 2018): every client delta is clipped to L2 norm ``C``; the server
averages with uniform weights over a fixed denominator ``m`` (the number of clients sampled per round) and
adds Gaussian noise ``N(0, (σ·C/m)²)`` to every coordinate. One round is then the *sampled Gaussian
mechanism* with sampling rate ``q = m / population`` and noise multiplier ``σ``, at the level of a client
(user-level DP).

**Accountant**: the Rényi DP of the sampled Gaussian mechanism at integer orders α (Mironov, Talwar & Zhang
2019, section 3.3)::

    A_α = Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k²−k) / (2σ²))      ε_RDP(α) = log(A_α) / (α − 1)

composed over rounds by addition, and converted to (ε, δ) with the bound of Canonne, Kamath & Steinke
(2020) / Balle et al. (2020): ``ε = ε_RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1)``, minimised over α.
With ``q = 1`` this is exactly the plain Gaussian mechanism (``α / 2σ²``). Only integer orders 2…256 are used,
so the reported ε is a valid upper bound, slightly looser (a few percent) than with fractional orders.

The noise comes from numpy's PCG64, seeded per round when a seed is given (reproducible runs, exact resume)
and from the OS otherwise. PCG64 is not a cryptographic generator and floating-point Gaussian sampling has
known side channels (Mironov 2012): a deployment that needs formal guarantees against a strong adversary
should swap in a secure discrete Gaussian sampler here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .errors import PrivacyError

__all__ = ["DEFAULT_ORDERS", "CentralDp", "RdpAccountant", "epsilon_from_rdp", "rdp_sampled_gaussian"]

DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 64), 80, 96, 128, 160, 192, 256)


def rdp_sampled_gaussian(
    q: float, sigma: float, orders: tuple[int, ...] = DEFAULT_ORDERS
) -> npt.NDArray[np.float64]:
    """RDP ε(α) of one application of the sampled Gaussian mechanism, for each integer order."""
    if not 0.0 < q <= 1.0:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {q}")
    if sigma <= 0:
        raise PrivacyError(f"noise multiplier must be > 0, got {sigma}")
    out = np.empty(len(orders))
    for i, alpha in enumerate(orders):
        if int(alpha) != alpha or alpha < 2:
            raise PrivacyError(f"orders must be integers >= 2, got {alpha}")
        if q == 1.0:
            out[i] = alpha / (2 * sigma**2)
            continue
        k = np.arange(alpha + 1, dtype=np.float64)
        log_binom = math.lgamma(alpha + 1) - np.array(
            [math.lgamma(j + 1) + math.lgamma(alpha - j + 1) for j in range(alpha + 1)]
        )
        log_terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
        top = log_terms.max()
        log_a = top + math.log(np.exp(log_terms - top).sum())
        out[i] = log_a / (alpha - 1)
    return out


def epsilon_from_rdp(
    rdp: npt.NDArray[np.float64], delta: float, orders: tuple[int, ...] = DEFAULT_ORDERS
) -> tuple[float, int]:
    """(ε, best order) for a composed RDP curve at a given δ."""
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, np.float64)
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    best = int(np.nanargmin(eps))
    return max(float(eps[best]), 0.0), int(orders[best])


@dataclass
class RdpAccountant:
    """Adds up the RDP of every round; :meth:`epsilon` converts the total to (ε, δ)."""

    orders: tuple[int, ...] = DEFAULT_ORDERS
    rdp: npt.NDArray[np.float64] = field(default=None)  # type: ignore[assignment]
    steps: int = 0

    def __post_init__(self) -> None:
        if self.rdp is None:
            self.rdp = np.zeros(len(self.orders))

    def step(self, *, q: float, sigma: float, count: int = 1) -> None:
        """Account for ``count`` rounds at sampling rate ``q`` and noise multiplier ``sigma``."""
        self.rdp = self.rdp + count * rdp_sampled_gaussian(q, sigma, self.orders)
        self.steps += count

    def epsilon(self, delta: float) -> float:
        """The ε spent so far at ``delta`` (0 before any round)."""
        if self.steps == 0:
            return 0.0
        return epsilon_from_rdp(self.rdp, delta, self.orders)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDp:
    """Settings of the central Gaussian mechanism (see the module docstring)."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    expected_clients: int = 10
    """The fixed denominator m: clients sampled per round."""
    population: int = 10
    """Clients available to sample from; q = expected_clients / population."""
    delta: float = 1e-5
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise PrivacyError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 1 <= self.expected_clients <= self.population:
            raise PrivacyError(
                f"need 1 <= expected_clients ({self.expected_clients}) <= population ({self.population})"
            )
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def sampling_rate(self) -> float:
        return self.expected_clients / self.population

    def privatize(self, clipped_sum: npt.NDArray[np.float32], *, round: int) -> npt.NDArray[np.float32]:
        """``clipped_sum / m + N(0, (σC/m)²)``: the noisy mean of clipped deltas."""
        m = np.float32(self.expected_clients)
        out = clipped_sum / m
        if self.noise_multiplier > 0:
            rng = np.random.default_rng(None if self.seed is None else [self.seed, round])
            std = self.noise_multiplier * self.clip_norm / self.expected_clients
            out += rng.standard_normal(out.size, dtype=np.float32) * np.float32(std)
        return out
