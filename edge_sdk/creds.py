"""Read a fedbus creds file on a device: only ``json`` and ``ssl`` from the standard library.

The file is what ``fedbus creds issue device ID`` writes (format: ``docs/edge.md``). A device logs in to the
MQTT listener with its ``user`` and ``password``, verifies the broker with the ``ca`` certificate, and signs
with ``signing_key``::

    creds = DeviceCreds.load("pi-7.creds")
    async with EdgeClient.from_creds(creds) as edge:
        ...
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeError

__all__ = ["DeviceCreds"]


@dataclass(frozen=True, kw_only=True)
class DeviceCreds:
    """What a device needs from its creds file."""

    id: str
    role: str
    user: str
    password: str = field(repr=False)
    mqtt_url: str
    ca_pem: str = ""
    signing_seed: bytes | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> DeviceCreds:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise EdgeError(f"cannot read creds file {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("fedbus_creds") != 1:
            raise EdgeError(f"{path} is not a fedbus creds file")
        try:
            servers = data.get("servers") or {}
            url = servers.get("mqtt")
            if not url:
                raise EdgeError(f"{path} names no MQTT server (was the broker started with --no-mqtt?)")
            seed = base64.b64decode(data["signing_key"]) if data.get("signing_key") else None
            return cls(id=str(data["id"]), role=str(data["role"]), user=str(data["user"]),
                       password=str(data["password"]), mqtt_url=str(url), ca_pem=str(data.get("ca") or ""),
                       signing_seed=seed)
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeError(f"bad creds file {path}: {exc}") from None

    def tls_context(self) -> ssl.SSLContext | None:
        """A TLS context that trusts only the deployment's CA (``None`` when the file carries none)."""
        if not self.ca_pem:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
