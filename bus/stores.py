"""Contracts for the durable parts of the bus: event streams, a key-value store, an object store.

Implementations: NATS JetStream (:mod:`fedbus.bus.jetstream`) for deployments and in-memory ones
(:mod:`fedbus.bus.memstores`) for unit tests and single-process simulation. ``tests/test_store_contract.py``
runs one suite against each. Agents never pick one themselves::

    stores = await open_stores(bus)              # JetStream on a NATS bus, memory on a memory bus
    log = stores.event_log()
    await log.publish(JobAccepted(job_id="j1"))  # returns once the broker has stored it
    async with log.consume(JobAccepted, durable="scheduler", ack_wait=30) as deliveries:
        async for d in deliveries:
            ...
            await d.ack()                        # or it is delivered again after ack_wait
    state = await stores.key_value("agents", ttl=30)
    weights = await stores.object_store("models")

Besides the protocols, this module holds what both backends share: the value types they return, key and
bucket validation. :class:`~fedbus.bus.chunked.ChunkedObjectStore` implements the file/bytes/stream variants
of the object store on top of two primitives, so hashing, verification and the temp files live in one place.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, runtime_checkable

from . import subjects
from .codec import Envelope
from .errors import AuthError, CodecError, NotSupported, SubjectError
from .events import Event
from .transport import Frame

if TYPE_CHECKING:
    from .client import Bus

__all__ = [
    "AckableDelivery",
    "ConsumerStats",
    "EventConsumer",
    "EventLog",
    "KeyValue",
    "KvEntry",
    "ObjectInfo",
    "ObjectStore",
    "PublishAck",
    "StoredEvent",
    "Stores",
    "StreamStats",
    "accept_stored",
    "open_stores",
    "patterns_overlap",
    "stored_event",
    "stream_name",
    "validate_bucket",
    "validate_key",
]

E = TypeVar("E", bound=Event)
E_co = TypeVar("E_co", bound=Event, covariant=True)

_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")


def validate_key(key: str) -> str:
    """A key-value key: letters, digits and ``-/_=.``, not starting or ending with ``.`` (as NATS KV)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key.startswith(".") or key.endswith("."):
        raise SubjectError("invalid key (allowed: letters, digits and -/_=., no leading or trailing '.')",
                           subject=str(key))
    return key


def stream_name(domain: str) -> str:
    """The stream holding an event domain's durable events, e.g. ``FEDBUS_JOBS`` (both backends); a type
    listed in :data:`~fedbus.bus.limits.OWN_STREAMS` has its own: use :func:`~fedbus.bus.limits.stream_of`."""
    return "FEDBUS_" + subjects.validate_token(domain, what="event domain").upper()


def validate_bucket(bucket: str) -> str:
    """A bucket name is one subject token: ``[A-Za-z0-9_-]+``."""
    return subjects.validate_token(bucket, what="bucket name")


# -- key-value -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KvEntry:
    """A key's current value and the revision that wrote it."""

    key: str
    value: bytes
    revision: int


@runtime_checkable
class KeyValue(Protocol):
    """Agent state: small values by key, with revisions for compare-and-set.

    Revisions increase with every write to the bucket. A bucket opened with a ``ttl`` forgets entries that
    were not written for that long: liveness is "my key still exists".
    """

    bucket: str

    async def get(self, key: str) -> KvEntry:
        """The current entry; raises :class:`~fedbus.bus.errors.NotFound` (also for a deleted key)."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` unconditionally; returns the new revision."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store only if ``key`` does not exist (or was deleted), else raise ``Conflict``."""
        ...

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        """Compare-and-set: store only if the key's current revision is ``revision``, else ``Conflict``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...

    async def keys(self) -> list[str]:
        """The keys that currently hold a value, sorted."""
        ...


# -- objects -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store recorded about an object when it was put."""

    name: str
    size: int
    sha256: str
    """Hex digest of the whole object, computed while it was streamed in."""
    chunks: int = 0
    chunk_size: int = 0
    time_ns: int = 0
    """When the put completed."""
    version: str = ""
    """Identifies this put of the name: a new put, even of the same bytes, gets a new version."""


@runtime_checkable
class ObjectStore(Protocol):
    """Large blobs (model weights, workspaces), streamed in chunks and verified by sha256.

    Memory stays bounded by a few chunks whatever the object's size. Putting a name again replaces the object
    once the new one is complete; readers never see a half-written object.
    """

    bucket: str
    chunk_size: int

    async def put_stream(self, name: str, chunks: AsyncIterator[bytes]) -> ObjectInfo:
        """Store the bytes of ``chunks`` (any sizes; re-cut to the store's chunk size)."""
        ...

    async def put_file(self, name: str, path: Path) -> ObjectInfo:
        """Store a file, read in chunks off the event loop."""
        ...

    async def put_bytes(self, name: str, data: bytes) -> ObjectInfo: ...

    def get_stream(self, name: str) -> AsyncIterator[bytes]:
        """Chunks of the object; the sha256 is verified at the end (raises IntegrityError on mismatch).

        The chunks are yielded before the digest is known: use :meth:`get_file` or :meth:`get_bytes` when the
        data must not be used unverified. Close the iterator (``contextlib.aclosing``) if you stop early.
        """
        ...

    async def get_file(self, name: str, path: Path) -> ObjectInfo:
        """Write the object to ``path`` via a temporary file beside it, renamed only once verified."""
        ...

    async def get_bytes(self, name: str) -> bytes:
        """The whole object in memory, verified."""
        ...

    async def info(self, name: str) -> ObjectInfo:
        """Raises :class:`~fedbus.bus.errors.NotFound`."""
        ...

    async def delete(self, name: str) -> None: ...

    async def list(self) -> list[ObjectInfo]:
        """Every object in the bucket, sorted by name."""
        ...


# -- durable event streams -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PublishAck:
    """The broker's receipt for a durable publish."""

    stream: str
    seq: int
    duplicate: bool = False
    """The envelope id was already stored (a retry): nothing new was written."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event read back from a stream; ``event`` is ``None`` (and ``error`` says why) for a bad frame."""

    seq: int
    subject: str
    time_ns: int
    """When the stream stored it."""
    data: bytes
    envelope: Envelope | None = None
    event: Event | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    name: str
    pending: int
    """Stored events this consumer has not been sent yet."""
    ack_pending: int
    """Sent, not yet acknowledged (leases held)."""
    redelivered: int
    """Of the leases held, how many are on events delivered more than once."""
    delivered_seq: int
    ack_floor: int
    ack_wait: float
    max_deliver: int


@dataclass(frozen=True, slots=True)
class StreamStats:
    name: str
    subjects: tuple[str, ...]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    replicas: int = 1
    consumers: tuple[ConsumerStats, ...] = field(default=())
    max_bytes: int = -1
    """The stream's limits (-1 or 0: none); see :mod:`fedbus.bus.limits`."""
    max_msgs: int = -1
    max_age: float = 0.0
    max_msg_size: int = -1
    discard: str = "old"


@runtime_checkable
class AckableDelivery(Protocol[E_co]):
    """A delivery from a durable consumer: acknowledge it, or it is redelivered after the ack wait."""

    @property
    def subject(self) -> str: ...

    @property
    def envelope(self) -> Envelope: ...

    @property
    def event(self) -> E_co: ...

    @property
    def delivered(self) -> int:
        """How many times this event has been delivered (1 on the first try)."""
        ...

    @property
    def seq(self) -> int:
        """The event's sequence number in its stream."""
        ...

    async def ack(self, *, confirm: bool = False) -> None:
        """Done: never deliver it again. With ``confirm``, return only once the broker has recorded the ack
        (otherwise the ack is sent and a lost one means one more delivery)."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again, now or after ``delay`` seconds."""
        ...

    async def in_progress(self) -> None:
        """Extend the lease: the ack wait starts again from now."""
        ...

    async def term(self) -> None:
        """Give up on it: never deliver it again (a poison event)."""
        ...


class EventConsumer(Protocol[E_co]):
    """A named durable consumer: ``async with`` it, then ``async for`` its deliveries (or :meth:`next`)."""

    dropped: int
    """Invalid frames acknowledged and dropped (each also counted in ``bus.rejected`` and logged)."""

    async def next(self, timeout: float | None = None) -> AckableDelivery[E_co]:
        """The next valid delivery; raises ``TimeoutError`` after ``timeout`` seconds without one."""
        ...

    def __aiter__(self) -> AsyncIterator[AckableDelivery[E_co]]: ...

    async def close(self) -> None:
        """Stop receiving (the consumer's position survives on the broker). Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class EventLog(Protocol):
    """Durable streams of the event types declared ``durable=True``: one stream per event domain.

    A publish returns once the broker stored the event; the envelope id is the deduplication key, so
    retrying the same envelope never stores it twice. A write the stream's limits refuse (too large, or the
    stream full with ``discard: new``) raises :class:`~fedbus.bus.limits.LimitExceeded` at once. Consumers
    are durable and at-least-once: an event is delivered again until it is acknowledged (``ack_wait`` is the
    lease).
    """

    async def ensure(self, *classes: type[Event]) -> None:
        """Make sure the streams of these durable event types (all in the catalogue if none) exist and store
        them: looked up, and created with their limits or extended only when needed. Raises
        :class:`~fedbus.bus.limits.StoreMissing` where this credential may not create a missing stream."""
        ...

    async def publish(self, event: Event, *, trace: str | None = None) -> Envelope:
        """Publish and wait for the broker's ack; returns the stored envelope."""
        ...

    async def publish_envelope(self, env: Envelope, *, subject: str | None = None) -> PublishAck:
        """(Re)publish an existing envelope; a retry of a stored envelope comes back ``duplicate``. With
        ``subject`` (which a durable type's stream must store), the envelope is stored undecoded there."""
        ...

    async def publish_many(self, events: Iterable[Event], *, trace: str | None = None) -> list[Envelope]:
        """Publish many events with a window of acks in flight; returns once all are stored."""
        ...

    def consume(
        self, cls: type[E], *, durable: str, key: str = "*", ack_wait: float = 30.0, max_deliver: int = -1,
        max_ack_pending: int = 1000, batch: int = 16, on_reject: RejectHook | None = None,
    ) -> EventConsumer[E]:
        """A named durable consumer of ``cls`` events (optionally one ``key``) that survives restarts.
        ``on_reject`` is told of every stored frame that cannot become a ``cls`` event (see :data:`RejectHook`).

        Consumers sharing a ``durable`` name share the work. ``ack_wait`` is the lease on each delivery,
        ``max_deliver`` bounds deliveries of one event (-1: unbounded), ``max_ack_pending`` bounds leases held
        at once, and ``batch`` events are fetched together (their leases start when fetched).
        """
        ...

    def replay(
        self, pattern: str, *, start_seq: int | None = None, start_time_ns: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Stored events matching ``pattern`` from a sequence or a time (default: the start), up to the end
        of the stream as it was when the replay began."""
        ...

    async def streams(self) -> list[StreamStats]:
        """Every stream with its counts and its consumers."""
        ...


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both NATS-style patterns (``*`` one token, ``>`` the rest)."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


def stored_event(bus: Bus, seq: int, subject: str, data: bytes, time_ns: int) -> StoredEvent:
    """A frame read back from a stream, decoded and checked by the bus; a bad one carries its ``error``."""
    env: Envelope | None = None
    try:
        env = bus.codec.unpack(data, subject=subject)
        event = bus.codec.decode(env, subject=subject)
        bus._authenticate(env, event, check_replay=False)
    except (CodecError, AuthError) as exc:
        return StoredEvent(seq, subject, time_ns, data, env, None, f"{type(exc).__name__}: {exc}")
    return StoredEvent(seq, subject, time_ns, data, env, event)


def accept_stored(bus: Bus, subject: str, data: bytes, cls: type[Event] | None) -> Any:
    """Validate a frame read from a stream through the bus (limits, schema, signature; not the replay
    window: redeliveries repeat ids on purpose). ``None`` if rejected, which the bus counted and logged."""
    return bus._accept(Frame(subject, data), cls, check_replay=False)


def accept_stored_or_why(bus: Bus, subject: str, data: bytes, cls: type[Event] | None) -> Any:
    """Like :func:`accept_stored`, but a rejected frame gives the reason, a ``str``."""
    return bus._accept_or_why(Frame(subject, data), cls, check_replay=False)


#: Told about a stored frame a consumer cannot even decode: ``(subject, data, reason, stream_seq)``. It is
#: acknowledged afterwards either way (it can never succeed); a dead-letter writer keeps it.
RejectHook = Callable[[str, bytes, str, int], Awaitable[None]]


# -- choosing a backend --------------------------------------------------------------------------------
class Stores(Protocol):
    """The durable stores of one bus, whichever backend holds them."""

    def event_log(self) -> EventLog: ...

    async def key_value(self, bucket: str, *, ttl: float | None = None) -> KeyValue: ...

    async def object_store(self, bucket: str) -> ObjectStore: ...

    async def streams(self) -> list[StreamStats]: ...


async def open_stores(bus: Bus, **options: Any) -> Stores:
    """JetStream stores for a bus on NATS, in-memory ones (shared per broker) for a bus on a memory transport.

    ``options`` are :class:`~fedbus.bus.jetstream.JetStreamOptions` fields (``replicas``, ``storage``,
    ``chunk_size``, ``limits``...); the memory backend uses ``chunk_size``, ``duplicate_window`` and
    ``limits`` and ignores the rest.
    """
    name = bus.transport.name
    if name == "nats":
        from .jetstream import JetStream

        return await JetStream.open(bus, **options)
    if name == "memory":
        from .memstores import MemoryStores

        return MemoryStores.for_bus(bus, **options)
    raise NotSupported(f"no durable stores over a {name} transport (edge devices publish; the cloud stores)")

