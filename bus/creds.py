"""Credentials: one file holds all a client needs, and the registry of identities only the authority writes.

A creds file (JSON, mode 0600) is issued by ``fedbus creds issue ROLE ID``::

    {"fedbus_creds": 1, "id": "gpu-1", "role": "gpu-agent",
     "servers": {"nats": "tls://127.0.0.1:4222", "mqtt": "mqtts://127.0.0.1:8883"},
     "ca": "-----BEGIN CERTIFICATE-----...", "user": "gpu-1", "password": "<random>",
     "signing_key": "<base64 raw Ed25519 private key>", "expires_ns": 0}

``user``/``password`` log in to NATS and to MQTT alike (the broker keeps only a bcrypt hash). The public half
of ``signing_key`` is recorded, with the role, in the ``fedbus-identities`` KV bucket, which only admin may
write: a verifier learns who signed an event and in which role from there, never from the signer.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._files import write_private
from .errors import ConfigError, NotFound
from .roles import Id, Role, validate_id
from .signing import AgentKey, key_id
from .stores import KeyValue

__all__ = [
    "CREDS_ENV",
    "IDENTITIES_BUCKET",
    "Credentials",
    "Identity",
    "fetch_identity",
    "load_creds",
]

CREDS_ENV: Final = "FEDBUS_CREDS"
IDENTITIES_BUCKET: Final = "fedbus-identities"
_FORMAT: Final = 1


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the identities bucket: who holds which signing key, in which role, until when."""

    id: Id
    role: Role
    public_key: bytes
    expires_ns: int = 0

    @property
    def kid(self) -> str:
        return key_id(self.public_key)

    def expired(self, now_ns: int | None = None) -> bool:
        return bool(self.expires_ns) and (now_ns or time.time_ns()) >= self.expires_ns

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Identity:
        return msgspec.json.decode(data, type=cls)


async def fetch_identity(identities: KeyValue, ident: str) -> Identity | None:
    """The identity registered under ``ident``, or ``None`` if there is none, it is unreadable or expired."""
    try:
        entry = await identities.get(validate_id(ident))
    except (NotFound, ConfigError):
        return None
    try:
        identity = Identity.decode(entry.value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return None if identity.expired() or identity.id != ident else identity


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """A client's credential: its id and role, where the broker is, how to trust it, how to log in and sign."""

    id: str
    role: Role
    user: str
    password: str = field(repr=False)
    signing_seed: bytes = field(repr=False)
    servers: dict[str, str] = field(default_factory=dict)
    ca_pem: str = ""
    expires_ns: int = 0
    path: Path | None = None

    def __post_init__(self) -> None:
        validate_id(self.id, what="credential id")

    @property
    def signing_key(self) -> AgentKey:
        return AgentKey(Ed25519PrivateKey.from_private_bytes(self.signing_seed))

    def identity(self) -> Identity:
        return Identity(id=self.id, role=self.role, public_key=self.signing_key.public_raw,
                        expires_ns=self.expires_ns)

    def expired(self, now_ns: int | None = None) -> bool:
        return bool(self.expires_ns) and (now_ns or time.time_ns()) >= self.expires_ns

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context that trusts only this credential's CA (``None`` without a CA)."""
        if not self.ca_pem:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def to_json(self) -> dict[str, Any]:
        return {
            "fedbus_creds": _FORMAT, "id": self.id, "role": str(self.role), "servers": dict(self.servers),
            "ca": self.ca_pem, "user": self.user, "password": self.password,
            "signing_key": base64.b64encode(self.signing_seed).decode(), "expires_ns": self.expires_ns,
        }

    def dump(self, path: Path) -> Path:
        """Write the creds file, readable by its owner only."""
        return write_private(Path(path), json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: Any, *, source: str = "creds") -> Credentials:
        if not isinstance(data, dict) or data.get("fedbus_creds") != _FORMAT:
            raise ConfigError("not a fedbus creds file (fedbus_creds: 1 missing)", source=source)
        try:
            servers = data.get("servers") or {}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in servers.items()):
                raise ValueError("servers must map names to URLs")
            seed = base64.b64decode(data["signing_key"], validate=True)
            if len(seed) != 32:
                raise ValueError("signing_key is not a 32-byte Ed25519 seed")
            return cls(id=str(data["id"]), role=Role(data["role"]), user=str(data["user"]),
                       password=str(data["password"]), signing_seed=seed, servers=dict(servers),
                       ca_pem=str(data.get("ca") or ""), expires_ns=int(data.get("expires_ns") or 0))
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"bad creds file: {exc}", source=source) from None

    @classmethod
    def load(cls, path: Path) -> Credentials:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read creds file: {exc.strerror or exc}", key="creds",
                              source=str(path)) from None
        except ValueError:
            raise ConfigError("creds file is not JSON", key="creds", source=str(path)) from None
        creds = cls.from_json(data, source=str(path))
        return cls(**{**creds.__dict__, "path": path})


def load_creds(path: str | Path | None = None) -> Credentials | None:
    """The credential at ``path``, else at ``$FEDBUS_CREDS``, else ``None`` (the caller may use a context)."""
    chosen = path or os.environ.get(CREDS_ENV)
    return Credentials.load(Path(chosen)) if chosen else None
