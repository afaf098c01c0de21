"""The broker of ``make demo``: the secure one ``fedbus up`` starts, in a temp dir, with credentials issued on
demand for each stage's components.

::

    with DemoBroker(Path(tmp)) as broker:                 # CA, server certificate, admin; TLS + auth
        asyncio.run(broker.provision())                   # every stream and bucket, as admin
        gpu, = await broker.issue(("gpu-agent", "gpu-1"))   # a credential of that role, known to the broker

Issuing re-renders the broker's users and reloads them (no restart), and publishes the new identities in
the ``fedbus-identities`` bucket, as ``fedbus creds issue`` does against a running ``fedbus up``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Self

from .authority import Authority, provision_broker, sync_identities
from .broker import NatsServer
from .connect import connect
from .creds import IDENTITIES_BUCKET, Credentials
from .errors import ConfigError
from .roles import Role
from .stores import open_stores

__all__ = ["DemoBroker"]


class DemoBroker:
    """A secure nats-server (TLS on NATS and MQTT, only issued users, role permissions) and its authority,
    both in ``data_dir``. ``with`` it to start and stop the server."""

    def __init__(self, data_dir: Path, *, mqtt: bool = True) -> None:
        self.authority = Authority(data_dir)
        # die_with_parent: a demo killed with SIGKILL leaves no nats-server behind.
        self.server: NatsServer = self.authority.server(mqtt_port=0 if mqtt else None, die_with_parent=True)
        self.issued: dict[str, Credentials] = {}

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def mqtt_url(self) -> str | None:
        return self.server.mqtt_url

    @property
    def admin(self) -> Credentials:
        """The admin credential (what the CLI uses through the context ``fedbus up`` saves)."""
        return self.authority.admin_creds()

    def __enter__(self) -> Self:
        self.server.start()
        try:
            self.authority.record(self.server)  # every creds file issued from now on names these URLs
        except BaseException:
            self.server.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.close()

    async def provision(self) -> None:
        """Create every stream and bucket with its limits, as ``fedbus up`` does (only admin may)."""
        await provision_broker(self.authority, self.url)

    async def issue(self, *wanted: tuple[Role | str, str]) -> list[Credentials]:
        """A credential for each ``(role, id)``: the one issued earlier for that id, else a new one that the
        broker and the identities bucket know before this returns."""
        fresh = False
        for role, ident in wanted:
            known = self.issued.get(ident)
            if known is not None:
                if known.role != Role(role):
                    raise ConfigError(f"{ident!r} was issued as a {known.role}, not a {role}", key="id")
                continue
            self.issued[ident] = await asyncio.to_thread(self.authority.issue, role, ident)  # bcrypt: ~0.1 s
            fresh = True
        if fresh:
            await asyncio.to_thread(self.authority.apply)  # re-render the users; the broker reloads them
            async with connect(self.url, source="demo-authority", creds=self.admin, persistent=False) as bus:
                await sync_identities(self.authority, await (await open_stores(bus)).key_value(IDENTITIES_BUCKET))
        return [self.issued[ident] for _, ident in wanted]
