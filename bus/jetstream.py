"""Durable event streams, key-value buckets and object stores on NATS JetStream.

With the NATS transport, the only code that talks to nats-py; every nats-py error is translated into the
fedbus error tree (:mod:`._js_errors`). Three stores, one owner::

    js = await JetStream.open(bus, replicas=3)       # or: stores = await open_stores(bus)
    log = js.event_log()                             # durable events: one stream per event domain
    kv = await js.key_value("agents", ttl=30)        # compare-and-set state, liveness by TTL
    objects = await js.object_store("models")        # chunked blobs, sha256-verified

This module holds the owner (:class:`JetStream`: the JetStream context, the options, the retry loop every
store uses) and re-exports the stores, which live in private modules, one job each:

- :mod:`._js_events` — the event log: streams, ``publish``/``publish_many``, replay, stream statistics;
- :mod:`._js_consumer` — durable pull consumers with explicit acks: ``ack_wait`` is the lease,
  ``in_progress()`` renews it, ``nak(delay)`` hands the event back, ``max_deliver`` bounds retries. Every
  delivered frame is checked by the bus (limits, schema, signature); a bad one is acknowledged and dropped
  with a log line and a count, so it can never poison a consumer;
- :mod:`._js_kv` — key-value buckets; :mod:`._js_objects` — the chunked object store;
- :mod:`._js_pull` — windowed reads of ephemeral consumers (replay, object chunks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog
from nats.js import api
from nats.js.client import JetStreamContext

from ._js_acks import AckInbox
from ._js_consumer import JetStreamConsumer
from ._js_errors import PermissionDenied, denied, retriable, translate
from ._js_events import JetStreamEventLog, stream_stats
from ._js_kv import JetStreamKV, open_bucket
from ._js_objects import _META_ENCODER, JetStreamObjectStore, _Meta  # noqa: F401  (tests forge meta records)
from ._js_provision import provision
from ._store_base import StoresBase
from .client import Bus
from .errors import ConfigError
from .events import Event
from .limits import StorageLimits
from .stores import StreamStats

__all__ = [
    "JetStream",
    "JetStreamConsumer",
    "JetStreamEventLog",
    "JetStreamKV",
    "JetStreamObjectStore",
    "JetStreamOptions",
    "provision",
]

log = structlog.get_logger("fedbus.bus.jetstream")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class JetStreamOptions:
    """How the JetStream stores create streams and talk to the broker."""

    replicas: int = 1
    """Copies of every stream (1, or up to 5 on a cluster)."""
    storage: Literal["file", "memory"] = "file"
    duplicate_window: float = 120.0
    """Seconds during which a re-published envelope id is recognised and not stored again (at most a
    stream's ``max_age``)."""
    limits: StorageLimits = field(default_factory=StorageLimits)
    """Limits of the streams and buckets these stores create when missing (``fedbus up`` provisions them
    all from its limits file; other processes only create what is missing, in insecure mode)."""
    api_timeout: float = 5.0
    """One API call or one publish ack."""
    publish_timeout: float = 30.0
    """How long a publish keeps retrying without progress (a broker restart, a leader election)."""
    publish_window: int = 256
    """Acks in flight in :meth:`JetStreamEventLog.publish_many`."""
    chunk_size: int = 1024 * 1024
    """Object chunk size (capped by the server's max_payload)."""
    chunk_window: int = 16
    """Object chunks in flight, each way: memory is about ``chunk_size × chunk_window``."""

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:
            raise ConfigError("replicas must be 1 to 5", key="replicas")
        if self.storage not in ("file", "memory"):
            raise ConfigError("storage must be 'file' or 'memory'", key="storage")
        for key in ("publish_window", "chunk_size", "chunk_window"):
            if getattr(self, key) < 1:
                raise ConfigError("must be at least 1", key=key)

    @property
    def storage_type(self) -> api.StorageType:
        return api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY


class JetStream(StoresBase):
    """The JetStream stores of one bus (on a :class:`~fedbus.bus.nats_transport.NatsTransport`)."""

    def __init__(self, bus: Bus, options: JetStreamOptions | None = None) -> None:
        if bus.transport.name != "nats" or not hasattr(bus.transport, "nc"):
            raise ConfigError(f"JetStream needs a bus on NATS, not {bus.transport.url}", key="server")
        self.bus = bus
        self.options = options or JetStreamOptions()
        self.nc = bus.transport.nc
        # nats-py's own async-publish limit sits above ours, so our windows decide.
        self.js: JetStreamContext = self.nc.jetstream(
            timeout=self.options.api_timeout,
            publish_async_max_pending=2 * max(self.options.publish_window, self.options.chunk_window),
        )
        self.acks = AckInbox(self.nc)
        """Where the acks of windowed publishes (``publish_many``, object chunks) come back."""
        self._log: JetStreamEventLog | None = None
        self.retries = 0
        """Calls and events sent again because the broker did not answer (restarts, elections)."""

    @classmethod
    async def open(cls, bus: Bus, **options: Any) -> JetStream:
        """JetStream stores for ``bus``; ``options`` are :class:`JetStreamOptions` fields."""
        return cls(bus, JetStreamOptions(**options))

    def event_log(self) -> JetStreamEventLog:
        """The durable event log (one per :class:`JetStream`)."""
        if self._log is None:
            self._log = JetStreamEventLog(self)
        return self._log

    async def key_value(self, bucket: str, *, ttl: float | None = None, history: int = 1) -> JetStreamKV:
        """A bucket, created if needed; with ``ttl``, entries not written for ``ttl`` seconds expire."""
        return await open_bucket(self, bucket, ttl=ttl, history=history)

    async def object_store(self, bucket: str) -> JetStreamObjectStore:
        """A bucket of chunked, sha256-verified objects, created if needed."""
        store = JetStreamObjectStore(self, bucket)
        await store.ensure()
        return store

    async def streams(self) -> list[StreamStats]:
        """Every stream on the account (events, buckets, objects) with its consumers, sorted by name."""
        return await stream_stats(self.js)

    async def close(self) -> None:
        """Stop listening for acks (the bus owns the connection). Idempotent."""
        await self.acks.close()

    async def provision(self, limits: StorageLimits | None = None, *,
                        events: Iterable[type[Event]] | None = None) -> list[str]:
        """Create or update every stream and bucket the project uses with ``limits`` (admin; see
        :func:`~._js_provision.provision`); one line per stream saying what was done."""
        return await provision(self, limits, events=events)

    # -- shared plumbing --------------------------------------------------------------------------------
    async def retrying(self, what: str, call: Callable[[float], Awaitable[T]], *, store: str = "the stream",
                       subject: str | None = None) -> T:
        """Run ``call(timeout)`` until it succeeds, retrying errors that mean the broker is coming back,
        for up to ``publish_timeout`` seconds; other errors (and the last one) are translated and raised.

        With ``subject`` (a publish), a timeout the server explains as a permissions violation on it is
        raised at once as :class:`~._js_errors.PermissionDenied` instead of being retried; a write refused
        by the limits of ``store`` is a :class:`~fedbus.bus.limits.LimitExceeded`, never retried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        delay = 0.05
        before = self.nc.last_error
        while True:
            timeout = max(min(self.options.api_timeout, deadline - loop.time()), 0.1)
            try:
                return await call(timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if subject is not None and denied(self.nc, subject, since=before):
                    raise PermissionDenied(subject, f"publish on {subject}") from exc
                if not retriable(exc) or loop.time() + delay >= deadline:
                    raise translate(exc, store=store) from exc
                self.retries += 1
                log.debug("retrying", what=what, error=f"{type(exc).__name__}: {exc}", delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
