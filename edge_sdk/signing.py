"""Optional Ed25519 signatures, compatible with ``fedbus.bus.signing``. Needs ``cryptography``, imported only
when a :class:`Signer` or :class:`Verifier` is made; without it the SDK works unsigned.

Key ids are the first 16 hex characters of the sha256 of the raw public key, as fedbus computes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from .envelope import signing_bytes
from .errors import EdgeError, SignatureError

__all__ = ["Signer", "Verifier", "available", "key_id"]


def available() -> bool:
    """Whether Ed25519 signing is available (``cryptography`` is importable)."""
    try:
        _crypto()
    except EdgeError:
        return False
    return True


def _crypto() -> Any:
    """The ``cryptography`` pieces, imported on first use so that unsigned devices never load them."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeError("signing needs the 'cryptography' package, which is not installed") from None
    return InvalidSignature, serialization, ed25519


def key_id(public_raw: bytes) -> str:
    """A short stable id for a public key: 16 hex characters of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class Signer:
    """Signs envelopes with a device's Ed25519 key, given as its 32-byte private seed."""

    def __init__(self, seed: bytes) -> None:
        _, serialization, ed25519 = _crypto()
        if len(seed) != 32:
            raise EdgeError(f"an Ed25519 private seed is 32 bytes, got {len(seed)}")
        self._private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self.public_raw: bytes = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.kid = key_id(self.public_raw)

    def sign(self, env: dict[str, Any]) -> dict[str, Any]:
        """Set ``env["kid"]`` and ``env["sig"]`` (the signature covers the kid); returns ``env``."""
        env["kid"] = self.kid
        env["sig"] = self._private.sign(signing_bytes(env))
        return env


class Verifier:
    """Verifies envelopes against trusted raw public keys."""

    def __init__(self, trusted: Mapping[str, bytes] | None = None) -> None:
        self._invalid, _, self._ed25519 = _crypto()
        self._keys: dict[str, Any] = {}
        for public_raw in (trusted or {}).values():
            self.trust(public_raw)

    def trust(self, public_raw: bytes) -> str:
        """Trust a raw 32-byte public key; returns its key id."""
        kid = key_id(public_raw)
        self._keys[kid] = self._ed25519.Ed25519PublicKey.from_public_bytes(public_raw)
        return kid

    def verify(self, env: Mapping[str, Any]) -> None:
        """Raise :class:`SignatureError` unless ``env`` is signed by a trusted key and verifies."""
        sig, kid = env.get("sig"), env.get("kid")
        if sig is None or kid is None:
            raise SignatureError(f"unsigned {env.get('type')} event", event_id=env.get("id"))
        public = self._keys.get(kid)
        if public is None:
            raise SignatureError(f"{env.get('type')} signed by untrusted key {kid}", kid=kid,
                                 event_id=env.get("id"))
        try:
            public.verify(sig, signing_bytes(env))
        except self._invalid:
            raise SignatureError(f"forged or altered {env.get('type')} event", kid=kid,
                                 event_id=env.get("id")) from None
