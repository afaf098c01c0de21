"""The authority of one deployment: it issues, lists and revokes credentials, and writes the broker's users.

It lives in ``<data dir>/auth/`` beside the broker ``fedbus up`` runs::

    auth/ca.pem, ca.key            the CA (pki.py); ca.key never leaves this directory
    auth/server.pem, server.key    the broker's TLS certificate
    auth/registry.json             every credential issued: role, bcrypt hash of its password, public key, expiry
    auth/users.conf                the nats-server ``authorization`` block generated from the registry + catalogue
    auth/servers.json              the URLs the broker bound, written into every creds file issued

The broker keeps only bcrypt hashes; the passwords and signing keys exist only in the creds files. Revoking
rewrites ``users.conf`` and signals the broker to reload it: the revoked user's connections are closed and it
cannot log in again, without a restart. Expired credentials are dropped the same way (``fedbus up`` re-renders
on a timer). Why server configuration and not NATS JWTs: see ``docs/security.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import bcrypt
import structlog

from ._files import write_private
from .broker import NatsServer
from .catalogue_cli import load_events
from .creds import Credentials, Identity
from .errors import ConfigError, Conflict, FedbusError, NotFound
from .events import Event
from .permissions import grants_for, render_permissions
from .pki import Pki
from .roles import Role, validate_id
from .stores import KeyValue

__all__ = ["ADMIN_ID", "Authority", "IssuedCredential", "provision_broker", "sync_identities"]

log = structlog.get_logger("fedbus.authority")

ADMIN_ID: Final = "admin"
_BCRYPT_COST: Final = 10


@dataclass(frozen=True, kw_only=True)
class IssuedCredential:
    """A registry entry: what the authority remembers of a credential (no secret)."""

    id: str
    role: Role
    password_hash: str
    public_key: bytes
    issued_ns: int
    expires_ns: int = 0
    revoked_ns: int = 0

    @property
    def state(self) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_ns:
            return "revoked"
        return "expired" if self.expires_ns and time.time_ns() >= self.expires_ns else "active"

    @property
    def active(self) -> bool:
        return self.state == "active"

    def identity(self) -> Identity:
        return Identity(id=self.id, role=self.role, public_key=self.public_key, expires_ns=self.expires_ns)

    def to_json(self) -> dict[str, Any]:
        return {"role": str(self.role), "password_hash": self.password_hash, "public_key": self.public_key.hex(),
                "issued_ns": self.issued_ns, "expires_ns": self.expires_ns, "revoked_ns": self.revoked_ns}

    @classmethod
    def from_json(cls, ident: str, data: dict[str, Any]) -> IssuedCredential:
        return cls(id=ident, role=Role(data["role"]), password_hash=data["password_hash"],
                   public_key=bytes.fromhex(data["public_key"]), issued_ns=int(data["issued_ns"]),
                   expires_ns=int(data.get("expires_ns", 0)), revoked_ns=int(data.get("revoked_ns", 0)))


class Authority:
    """Credentials and broker users for the deployment whose data dir is ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "auth"
        self.pki = Pki(self.dir)

    # -- files --------------------------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.dir / "registry.json"

    @property
    def users_conf(self) -> Path:
        return self.dir / "users.conf"

    @property
    def servers_path(self) -> Path:
        return self.dir / "servers.json"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "nats-server.pid"

    @property
    def exists(self) -> bool:
        return self.registry_path.exists()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".registry.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> dict[str, IssuedCredential]:
        if not self.registry_path.exists():
            return {}
        try:
            data = json.loads(self.registry_path.read_text())
            return {ident: IssuedCredential.from_json(ident, entry) for ident, entry in data["credentials"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"unreadable credential registry: {exc}", source=str(self.registry_path)) from None

    def _write(self, entries: dict[str, IssuedCredential]) -> None:
        data = {"format": 1, "credentials": {i: e.to_json() for i, e in sorted(entries.items())}}
        write_private(self.registry_path, json.dumps(data, indent=1))

    # -- set-up -------------------------------------------------------------------------------------------
    def init(self, *, host: str = "127.0.0.1", names: Iterable[str] = ()) -> bool:
        """Make the CA, the server certificate and the admin credential when missing; idempotent.
        Returns whether this was the first start."""
        from .pki import server_names

        first = not self.exists
        self.pki.ensure([*server_names(host), *names])
        with self._locked():
            if ADMIN_ID not in self._read():
                self._issue_locked(Role.ADMIN, ADMIN_ID, expires_ns=0, replace=False)
        return first

    def set_servers(self, servers: dict[str, str]) -> None:
        write_private(self.servers_path, json.dumps(servers))

    def record(self, server: NatsServer, *, advertise: str | None = None) -> None:
        """Remember where ``server`` listens: every creds file issued from now on names it (by the name
        ``advertise`` when clients reach it by another name than this machine's loopback)."""
        urls = {k: v for k, v in (("nats", server.url), ("mqtt", server.mqtt_url)) if v}
        if advertise:
            urls = {k: v.replace(f"://{server.client_host}:", f"://{advertise}:", 1) for k, v in urls.items()}
        self.set_servers(urls)
        write_private(self.dir / "monitor.url", server.monitor_url)

    def servers(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.servers_path.read_text()))
        except (OSError, ValueError):
            return {}

    # -- credentials ----------------------------------------------------------------------------------------
    def issue(self, role: Role | str, ident: str, *, expires_s: float | None = None,
              replace: bool = False) -> Credentials:
        """A new credential for ``ident`` in ``role``; :class:`Conflict` if the id is taken (unless
        ``replace``: the old one stops working at the next render)."""
        validate_id(ident, what="credential id")
        expires_ns = time.time_ns() + int(expires_s * 1e9) if expires_s else 0
        with self._locked():
            return self._issue_locked(Role(role), ident, expires_ns=expires_ns, replace=replace)

    def _issue_locked(self, role: Role, ident: str, *, expires_ns: int, replace: bool) -> Credentials:
        entries = self._read()
        old = entries.get(ident)
        if old is not None and old.active and not replace:
            raise Conflict(f"a credential with this id exists ({old.role}); revoke it first or pass --replace",
                           key=ident)
        password = secrets.token_urlsafe(32)
        seed = os.urandom(32)
        creds = Credentials(id=ident, role=role, user=ident, password=password, signing_seed=seed,
                            servers=self.servers(), ca_pem=self.pki.ca_pem() if self.pki.ca_cert.exists() else "",
                            expires_ns=expires_ns)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_COST)).decode()
        entries[ident] = IssuedCredential(id=ident, role=role, password_hash=hashed,
                                          public_key=creds.signing_key.public_raw, issued_ns=time.time_ns(),
                                          expires_ns=expires_ns)
        self._write(entries)
        if ident == ADMIN_ID:
            creds.dump(self.admin_creds_path)
        log.info("issued credential", id=ident, role=str(role))
        return creds

    @property
    def admin_creds_path(self) -> Path:
        return self.dir / "admin.creds"

    def admin_creds(self) -> Credentials:
        creds = Credentials.load(self.admin_creds_path)
        servers = self.servers()
        if servers and servers != creds.servers:  # the broker moved: keep the admin file current
            creds = Credentials(**{**creds.__dict__, "servers": servers, "path": None})
            creds.dump(self.admin_creds_path)
        return creds

    def revoke(self, ident: str) -> IssuedCredential:
        """Revoke ``ident``; effective once the broker reloads (:meth:`apply`)."""
        validate_id(ident, what="credential id")
        if ident == ADMIN_ID:
            raise ConfigError("the admin credential cannot be revoked (delete the data dir to start afresh)",
                              key="id")
        with self._locked():
            entries = self._read()
            entry = entries.get(ident)
            if entry is None:
                raise NotFound(f"no credential {ident!r}")
            entries[ident] = revoked = IssuedCredential(**{**entry.__dict__, "revoked_ns": time.time_ns()})
            self._write(entries)
        log.info("revoked credential", id=ident)
        return revoked

    def credentials(self) -> list[IssuedCredential]:
        return sorted(self._read().values(), key=lambda e: (e.role, e.id))

    def identities(self) -> list[Identity]:
        """The identities of every active credential, for the ``fedbus-identities`` bucket."""
        return [e.identity() for e in self._read().values() if e.active]

    # -- the broker -----------------------------------------------------------------------------------------
    def render(self, events: Iterable[type[Event]] | None = None) -> bool:
        """Write ``users.conf`` for the active credentials; returns whether it changed. ``events``: every
        event type the permissions are generated from (default: all, loaded from the entry points)."""
        events = list(load_events() if events is None else events)
        blocks = []
        for entry in self.credentials():
            if not entry.active:
                continue
            perms = render_permissions(grants_for(entry.role, entry.id, events))
            blocks.append(f'    {{\n      user: "{entry.id}"\n      password: "{entry.password_hash}"\n'
                          f"{perms}    }}\n")
        text = "authorization {\n  timeout: 5\n  users: [\n" + "".join(blocks) + "  ]\n}\n"
        if self.users_conf.exists() and self.users_conf.read_text() == text:
            return False
        write_private(self.users_conf, text)
        return True

    def reload_broker(self, *, timeout: float = 10.0) -> bool:
        """Ask the running broker to reload its configuration and wait until it has (its monitoring port
        reports a new configuration digest); ``False`` if none is running."""
        before = self._config_digest()
        try:
            pid = int(self.pid_path.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            return False
        if before is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self._config_digest()
            if now is not None and now != before:
                return True
            time.sleep(0.02)
        raise ConfigError(f"the broker did not reload its users within {timeout:g}s; see its log",
                          source=str(self.data_dir))

    def _config_digest(self) -> str | None:
        try:
            url = (self.dir / "monitor.url").read_text().strip()
            with urllib.request.urlopen(f"{url}/varz", timeout=2) as response:
                return str(json.load(response).get("config_digest") or "")
        except (OSError, ValueError):
            return None

    def server(self, events: Iterable[type[Event]] | None = None, **options: Any) -> NatsServer:
        """A (not yet started) nats-server for this authority: TLS on NATS and MQTT, only its users, each
        with the permissions of its role. ``options`` are :class:`NatsServer` fields."""
        self.init(host=options.get("host", "127.0.0.1"))
        self.render(events)
        return NatsServer(data_dir=self.data_dir, auth_include="auth/users.conf", tls_cert=self.pki.server_cert,
                          tls_key=self.pki.server_key, pid_file=self.pid_path, **options)

    def apply(self, events: Iterable[type[Event]] | None = None) -> bool:
        """Render and, when the users changed, reload the broker. Returns whether a reload was sent."""
        return self.render(events) and self.reload_broker()


async def provision_broker(authority: Authority, url: str) -> None:
    """As admin on the broker at ``url``: create every stream and bucket with its limits, and make the
    identities bucket hold the active credentials' identities."""
    from .connect import connect
    from .creds import IDENTITIES_BUCKET
    from .limits import provision
    from .stores import open_stores

    async with connect(url, source="fedbus-up", creds=authority.admin_creds(), persistent=False) as bus:
        stores = await open_stores(bus)
        await provision(stores)
        await sync_identities(authority, await stores.key_value(IDENTITIES_BUCKET))


async def sync_identities(authority: Authority, bucket: KeyValue) -> None:
    """Make ``bucket`` (the identities bucket) hold exactly the active credentials' identities."""
    active = {i.id: i for i in authority.identities()}
    for ident, identity in active.items():
        with contextlib.suppress(FedbusError):
            if (await bucket.get(ident)).value == identity.encode():
                continue
        await bucket.put(ident, identity.encode())
    for ident in await bucket.keys():
        if ident not in active:
            await bucket.delete(ident)
