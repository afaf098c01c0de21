"""Ed25519 signatures on events: per-agent keys, a trusted-keys ring, verification with a replay window.

Signing costs ~35 µs and verifying ~120 µs per event on one core, so only event types declared
``signed=True`` (job awards, model updates, anything that moves work or weights) are signed by default;
telemetry and heartbeats are not. See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .codec import Envelope, signing_bytes
from .errors import BadSignature, ConfigError, ReplayedEvent, UnknownKey, UnsignedEvent

__all__ = ["AgentKey", "KeyRing", "ReplayGuard", "key_id"]


def key_id(public_raw: bytes) -> str:
    """A short stable id for a public key: 16 hex characters of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class AgentKey:
    """An agent's Ed25519 signing key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.kid = key_id(self.public_raw)

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> AgentKey:
        """Load the key at ``path``, or create it there (mode 0600) on an agent's first start."""
        path = Path(path)
        if path.exists():
            try:
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as exc:
                raise ConfigError(f"not a PEM private key: {exc}", source=str(path)) from None
            if not isinstance(private, Ed25519PrivateKey):
                raise ConfigError("not an Ed25519 key", source=str(path))
            return cls(private)
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key

    def sign(self, env: Envelope) -> None:
        """Set ``env.kid`` and ``env.sig`` (the signature covers the kid)."""
        env.kid = self.kid
        env.sig = self._private.sign(signing_bytes(env))


class KeyRing:
    """The public keys this process trusts, by key id."""

    def __init__(self, keys: dict[str, bytes] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for raw in (keys or {}).values():
            self.trust(raw)

    def trust(self, public_raw: bytes) -> str:
        """Trust a raw 32-byte public key; returns its key id."""
        kid = key_id(public_raw)
        self._keys[kid] = Ed25519PublicKey.from_public_bytes(public_raw)
        return kid

    def revoke(self, kid: str) -> None:
        self._keys.pop(kid, None)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a JSON file ``{"<kid>": "<base64 raw public key>", ...}``."""
        try:
            data = json.loads(Path(path).read_text())
            return cls({kid: base64.b64decode(value) for kid, value in data.items()})
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"unreadable trusted-keys file: {exc}", source=str(path)) from None

    def dump(self, path: Path) -> None:
        raw = {kid: base64.b64encode(k.public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)).decode()
               for kid, k in self._keys.items()}
        Path(path).write_text(json.dumps(raw, indent=2, sort_keys=True))

    def verify(self, env: Envelope) -> None:
        """Raise unless ``env`` carries a valid signature by a trusted key."""
        if env.sig is None or env.kid is None:
            raise UnsignedEvent(f"unsigned {env.type} event", event_id=env.id, source=env.src)
        public = self._keys.get(env.kid)
        if public is None:
            raise UnknownKey(f"{env.type} signed by untrusted key {env.kid}", event_id=env.id, source=env.src)
        try:
            public.verify(env.sig, signing_bytes(env))
        except InvalidSignature:
            raise BadSignature(f"forged or altered {env.type} event", event_id=env.id, source=env.src) from None


class ReplayGuard:
    """Rejects an event id seen before, or an event whose time is outside ``±window_s`` of now.

    Memory is bounded: ids older than the window are forgotten (their time alone rejects them), and at most
    ``max_ids`` are kept.
    """

    def __init__(self, *, window_s: float = 300.0, max_ids: int = 200_000) -> None:
        self.window_ns = int(window_s * 1e9)
        self.max_ids = max_ids
        self._seen: OrderedDict[str, int] = OrderedDict()

    def check(self, env: Envelope, *, now_ns: int | None = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        if abs(now - env.time) > self.window_ns:
            raise ReplayedEvent(f"{env.type} event time is outside the replay window", event_id=env.id,
                                source=env.src)
        if env.id in self._seen:
            raise ReplayedEvent(f"{env.type} event {env.id} was already received", event_id=env.id,
                                source=env.src)
        self._seen[env.id] = env.time
        horizon = now - self.window_ns
        while self._seen and (len(self._seen) > self.max_ids or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)
