"""Shamir secret sharing of 32-byte secrets over the prime field GF(2⁵²¹ − 1).

A secret (a mask seed or a private key, 32 bytes = 256 bits) is the constant term of a random polynomial of
degree ``threshold − 1``; the share for holder ``x`` (1, 2, …) is the polynomial's value at ``x``. Any
``threshold`` shares give the secret back by Lagrange interpolation at 0; fewer reveal nothing about it.
The Mersenne prime 2⁵²¹ − 1 is larger than any 256-bit secret, so one field element holds a whole secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from .errors import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, *, holders: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` per holder index (distinct integers >= 1); any ``threshold`` of them recombine."""
    if len(secret) > 64:
        raise SecAggError(f"secret of {len(secret)} bytes is too long for one field element")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"threshold {threshold} must be between 1 and the {len(holders)} holders")
    if len(set(holders)) != len(holders) or min(holders) < 1:
        raise SecAggError("holder indices must be distinct and >= 1")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in holders:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int, length: int = 32) -> bytes:
    """The secret from at least ``threshold`` shares (holder index → share); extra shares are ignored."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares are fewer than the threshold {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi_bytes) in enumerate(points):
        yi = int.from_bytes(yi_bytes, "big")
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise SecAggError("shares do not recombine into a valid secret (corrupted or mismatched)")
    return secret.to_bytes(length, "big")
