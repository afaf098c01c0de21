"""Pick a transport from a URL, and the small API for scripts.

::

    async with fedbus.bus.connect("nats://127.0.0.1:4222", source="my-script") as bus:
        await bus.publish(Heartbeat(agent_id="my-script"))

    fedbus.bus.publish_sync("mqtt://127.0.0.1:1883", Heartbeat(agent_id="phone-1"))   # quick scripts

URLs: ``nats://host:port`` (``tls://`` with TLS; a cluster as a comma-separated list), ``mqtt://host:port``
(``mqtts://``; nats-server's MQTT listener or Mosquitto), ``memory://name`` (an in-process broker shared by
every transport of that name).

Who and where, in this order: the ``url`` and ``creds`` given; ``FEDBUS_SERVER`` and ``FEDBUS_CREDS``; the
creds file's own server URLs; the context ``fedbus up`` saved (:mod:`fedbus.bus.context`, its admin creds
only for its own broker); last ``nats://127.0.0.1:4222``. A creds file gives the user, password and CA.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from .client import Bus, Security
from .codec import Codec, Envelope
from .context import load_context
from .creds import Credentials, load_creds
from .errors import BusError, ConfigError
from .events import Event
from .memory import MemoryBroker, MemoryTransport
from .permissions import inbox_prefix
from .signing import AgentKey, KeyRing
from .transport import Transport

__all__ = [
    "DEFAULT_URL", "connect", "memory_broker", "publish_sync", "resolve", "resolve_url", "transport_for",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
"""The broker a client talks to when no URL, creds file or ``fedbus up`` context names one (the only copy)."""
_NATS_SCHEMES = frozenset({"nats", "tls"})
_MQTT_SCHEMES = frozenset({"mqtt", "mqtts"})

# In-process brokers by name: "memory://x" means the same broker everywhere in this process.
_memory_brokers: dict[str, MemoryBroker] = {}


def memory_broker(name: str = "default") -> MemoryBroker:
    """The in-process broker that ``memory://<name>`` URLs connect to (created on first use)."""
    broker = _memory_brokers.get(name)
    if broker is None:
        broker = _memory_brokers[name] = MemoryBroker()
    return broker


def resolve(url: str | None = None, creds: Credentials | None = None) -> tuple[str, Credentials | None]:
    """The broker URL and the credential to use (see the module docstring for the order)."""
    creds = creds or load_creds()
    url = url or os.environ.get("FEDBUS_SERVER") or None
    if not url and creds is not None:
        url = creds.servers.get("nats")
    if url is None or creds is None:
        context = load_context()
        if context is not None:
            url = url or context.nats_url
            if creds is None and context.creds and url and context.serves(url):
                creds = Credentials.load(Path(context.creds))
    return (url or DEFAULT_URL), creds


def resolve_url(url: str | None) -> str:
    """The broker URL a client given ``url`` talks to (see :func:`resolve`)."""
    return resolve(url)[0]


def _scheme_and_host(part: str, *, url: str) -> tuple[str, str]:
    split = urlsplit(part)
    try:
        split.port  # noqa: B018 - validates the port number
    except ValueError:
        raise ConfigError(f"invalid port in {part!r}", key="server", source=url) from None
    return split.scheme.lower(), split.hostname or ""


def _tls_context(creds: Credentials | None) -> ssl.SSLContext:
    """Trust the deployment's CA from the creds file; without one, the system's CAs (a public broker)."""
    context = creds.ssl_context() if creds is not None else None
    return context or ssl.create_default_context()


def transport_for(
    url: str | None = None, *, client_id: str | None = None, persistent: bool | None = None,
    creds: Credentials | None = None,
) -> Transport:
    """A new, unconnected transport for ``url``; raises :class:`ConfigError` for anything it cannot serve.

    ``client_id`` names the connection (on MQTT it is the session id, so keep it stable for an agent and
    unique per process). ``persistent=False`` asks MQTT for a clean session that the broker forgets on
    disconnect (inspectors, one-shot publishers); NATS and memory transports have no sessions. Without a
    ``client_id`` the connection gets a random one and, unless told otherwise, a clean session: two processes
    sharing a persistent MQTT session would knock each other off the broker.
    """
    if persistent is None:
        persistent = client_id is not None
    if client_id is None:
        client_id = f"fedbus-{secrets.token_hex(4)}"
    if url is None or not url.startswith("memory://"):
        url, creds = resolve(url, creds)
    url = url.strip()
    parts = [p.strip() for p in url.split(",") if p.strip()]
    if not parts:
        raise ConfigError("empty broker URL", key="server")
    if "://" not in parts[0]:
        raise ConfigError(f"{parts[0]!r} has no scheme (nats://, mqtt:// or memory://)", key="server",
                          source=url)
    first_scheme = parts[0].split("://", 1)[0]
    # Later entries of a server list may leave the scheme out: "nats://a:4222,b:4222".
    parts = [p if "://" in p else f"{first_scheme}://{p}" for p in parts]
    schemes = set()
    for part in parts:
        scheme, host = _scheme_and_host(part, url=url)
        if not host and scheme != "memory":
            raise ConfigError(f"{part!r} has no host", key="server", source=url)
        schemes.add(scheme)
    if len(schemes) > 1:
        raise ConfigError(f"one kind of server per URL list, got {sorted(schemes)}", key="server", source=url)
    scheme = schemes.pop()
    if scheme in _NATS_SCHEMES:
        from .nats_transport import NatsTransport

        return NatsTransport(",".join(parts), client_name=client_id,
                             user=creds.user if creds else None, password=creds.password if creds else None,
                             tls=_tls_context(creds) if scheme == "tls" else None,
                             inbox_prefix=inbox_prefix(creds.id) if creds else None)
    if len(parts) > 1:
        raise ConfigError(f"only nats:// URLs take a server list, not {scheme}://", key="server", source=url)
    if scheme in _MQTT_SCHEMES:
        try:
            from .mqtt_transport import MqttTransport  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConfigError(f"the MQTT transport is not available: {exc}", key="server",
                              source=url) from None
        transport: Transport = MqttTransport(
            parts[0], client_id=client_id, clean_session=not persistent,
            username=creds.user if creds else None, password=creds.password if creds else None,
            tls_context=_tls_context(creds) if scheme == "mqtts" else None)
        return transport
    if scheme == "memory":
        name = urlsplit(parts[0]).netloc or "default"
        return MemoryTransport(memory_broker(name), client_id=client_id)
    raise ConfigError(f"unsupported scheme {scheme!r}: use nats://, mqtt:// or memory://", key="server",
                      source=url)


def connect(
    url: str | None = None,
    *,
    source: str,
    key: AgentKey | None = None,
    keyring: KeyRing | None = None,
    security: Security = Security.VERIFY,
    codec: Codec | None = None,
    client_id: str | None = None,
    persistent: bool = True,
    creds: Credentials | None = None,
) -> Bus:
    """A :class:`Bus` for agent id ``source`` on the broker at ``url``; ``async with`` it to connect.

    Events whose type is declared ``signed`` are signed when ``key`` is given. The connection is named
    ``client_id`` (default: ``source``); see :func:`transport_for` for ``persistent``. With a credential
    (``creds``, ``FEDBUS_CREDS`` or the context's) and no ``key``, events are signed with its key.
    """
    if url is None or not url.startswith("memory://"):
        url, creds = resolve(url, creds)
    if key is None and creds is not None:
        key = creds.signing_key
    transport = transport_for(url, client_id=client_id or source, persistent=persistent, creds=creds)
    return Bus(transport, source=source, key=key, keyring=keyring, security=security, codec=codec)


def publish_sync(
    url: str | None,
    event: Event,
    *,
    source: str = "fedbus-script",
    key: AgentKey | None = None,
    trace: str | None = None,
) -> Envelope:
    """Connect, publish one event, flush and disconnect; returns the envelope sent. For scripts without
    an event loop (inside one, use :func:`connect`)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BusError("publish_sync() cannot run inside an event loop; use `async with connect(...)`")

    async def _publish() -> Envelope:
        async with connect(url, source=source, key=key, client_id=f"{source}-{os.urandom(3).hex()}",
                           persistent=False) as bus:
            env = await bus.publish(event, trace=trace)
            await bus.transport.flush()
            return env

    return asyncio.run(_publish())
