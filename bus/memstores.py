"""In-memory event log, key-value store and object store, with JetStream's semantics and no broker.

For unit tests of pure logic and single-process simulation. State lives in a :class:`MemoryHub` attached to
a :class:`~fedbus.bus.memory.MemoryBroker`, so every bus on the same broker sees the same streams, buckets
and consumers, as agents on one NATS server would. What is kept from JetStream: one stream per event domain,
deduplication by envelope id within a window, durable consumers with leases (``ack_wait``), ``nak`` with a
delay, ``in_progress``, ``max_deliver``, delivery counts; compare-and-set revisions and TTL buckets; objects
in chunks verified by sha256. Core publishes of durable event types are captured by their stream, as
JetStream does. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import subjects
from ._store_base import ConsumerBase, EventLogBase, StoresBase, require_durable
from .client import Bus
from .codec import Envelope, new_id
from .errors import ClosedError, Conflict, NotFound, StoreError
from .events import Event
from .memory import MemoryBroker
from .stores import (
    ChunkedObjectStore,
    ConsumerStats,
    KvEntry,
    ObjectInfo,
    PublishAck,
    StoredEvent,
    StreamStats,
    _Digest,
    accept_stored,
    patterns_overlap,
    stored_event,
    stream_name,
    validate_bucket,
    validate_key,
)
from .transport import Frame, Subscription

__all__ = ["MemoryEventLog", "MemoryHub", "MemoryKV", "MemoryObjectStore", "MemoryStores"]

E = TypeVar("E", bound=Event)

DEFAULT_CHUNK_SIZE = 1024 * 1024


# -- streams -------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Message:
    seq: int
    subject: str
    data: bytes
    time_ns: int


class _Waiters:
    """Futures of tasks waiting for a change; each belongs to its own loop, so a hub outlives any loop."""

    def __init__(self) -> None:
        self._futures: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for future in self._futures:
            if not future.done() and not future.get_loop().is_closed():
                future.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.add(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            self._futures.discard(future)


class _Stream:
    def __init__(self, name: str, *, duplicate_window: float) -> None:
        self.name = name
        self.patterns: list[str] = []
        self.messages: list[_Message] = []
        self.duplicate_window_ns = int(duplicate_window * 1e9)
        self._ids: dict[str, tuple[int, int]] = {}  # envelope id -> (seq, stored at)
        self.changed = _Waiters()
        self.consumers: dict[str, _ConsumerState] = {}

    def append(self, subject: str, data: bytes, *, msg_id: str | None) -> PublishAck:
        now = time.time_ns()
        if msg_id is not None:
            self._forget_ids(now)
            seen = self._ids.get(msg_id)
            if seen is not None:
                return PublishAck(self.name, seen[0], duplicate=True)
        seq = len(self.messages) + 1
        self.messages.append(_Message(seq, subject, bytes(data), now))
        if msg_id is not None:
            self._ids[msg_id] = (seq, now)
        self.changed.notify()
        return PublishAck(self.name, seq)

    def _forget_ids(self, now: int) -> None:
        horizon = now - self.duplicate_window_ns
        while self._ids:
            oldest = next(iter(self._ids))  # dicts keep insertion order: oldest first
            if self._ids[oldest][1] >= horizon:
                return
            del self._ids[oldest]

    def stats(self) -> StreamStats:
        msgs = self.messages
        return StreamStats(
            name=self.name, subjects=tuple(self.patterns), messages=len(msgs),
            bytes=sum(len(m.data) for m in msgs), first_seq=msgs[0].seq if msgs else 0,
            last_seq=msgs[-1].seq if msgs else 0,
            consumers=tuple(c.stats(self) for _, c in sorted(self.consumers.items())),
        )


class _Capture(Subscription):
    """Sits on the memory broker like JetStream's interest in a stream's subjects: stores core publishes."""

    def __init__(self, hub: MemoryHub, stream: _Stream, pattern: str) -> None:
        super().__init__(pattern, max_pending=1)
        self._hub = hub
        self._stream = stream

    def deliver(self, frame: Frame) -> bool:
        if frame is not self._hub.publishing:  # the event log stores its own publishes, with their ids
            self._stream.append(frame.subject, frame.data, msg_id=None)
        return True


@dataclass(slots=True)
class _Lease:
    deadline: float
    count: int


@dataclass
class _ConsumerState:
    """A durable consumer's position and leases; shared by every :class:`_MemoryConsumer` of that name."""

    name: str
    pattern: str
    ack_wait: float
    max_deliver: int
    max_ack_pending: int
    next_index: int = 0
    leases: dict[int, _Lease] = field(default_factory=dict)
    delivered_seq: int = 0

    def take(self, stream: _Stream) -> tuple[_Message, int] | float | None:
        """The next message to deliver and its delivery count, else when the next lease expires."""
        now = time.monotonic()
        for seq in sorted(s for s, lease in self.leases.items() if lease.deadline <= now):
            lease = self.leases[seq]
            if 0 < self.max_deliver <= lease.count:
                del self.leases[seq]  # JetStream stops redelivering; the event stays in the stream
                continue
            lease.count += 1
            lease.deadline = now + self.ack_wait
            return stream.messages[seq - 1], lease.count
        if self.max_ack_pending <= 0 or len(self.leases) < self.max_ack_pending:
            while self.next_index < len(stream.messages):
                msg = stream.messages[self.next_index]
                self.next_index += 1
                if subjects.matches(self.pattern, msg.subject):
                    self.leases[msg.seq] = _Lease(now + self.ack_wait, 1)
                    self.delivered_seq = msg.seq
                    return msg, 1
        return min((lease.deadline for lease in self.leases.values()), default=None)

    def stats(self, stream: _Stream) -> ConsumerStats:
        pending = sum(1 for m in stream.messages[self.next_index:]
                      if subjects.matches(self.pattern, m.subject))
        floor = min(self.leases, default=self.delivered_seq + 1) - 1
        return ConsumerStats(
            name=self.name, pending=pending, ack_pending=len(self.leases),
            redelivered=sum(1 for lease in self.leases.values() if lease.count > 1),
            delivered_seq=self.delivered_seq, ack_floor=max(floor, 0), ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
        )


@dataclass(frozen=True, slots=True)
class _MemoryDelivery(Generic[E]):
    subject: str
    envelope: Envelope
    event: E
    delivered: int
    seq: int
    _state: _ConsumerState
    _stream: _Stream

    def _lease(self) -> _Lease | None:
        return self._state.leases.get(self.seq)

    async def ack(self, *, confirm: bool = False) -> None:
        self._state.leases.pop(self.seq, None)

    async def term(self) -> None:
        self._state.leases.pop(self.seq, None)

    async def nak(self, delay: float | None = None) -> None:
        lease = self._lease()
        if lease is not None:
            lease.deadline = time.monotonic() + (delay or 0.0)
            self._stream.changed.notify()

    async def in_progress(self) -> None:
        lease = self._lease()
        if lease is not None:
            lease.deadline = time.monotonic() + self._state.ack_wait


class _MemoryConsumer(ConsumerBase[_MemoryDelivery[E]]):
    def __init__(self, log_: MemoryEventLog, cls: type[E], state_args: dict[str, Any]) -> None:
        super().__init__()
        self._log = log_
        self._cls = cls
        self._args = state_args
        self._state: _ConsumerState | None = None
        self._stream: _Stream | None = None

    async def _open(self) -> tuple[_ConsumerState, _Stream]:
        if self._closed:
            raise ClosedError("consumer is closed")
        if self._state is None or self._stream is None:
            await self._log.ensure(self._cls)
            stream = self._log.hub.streams[stream_name(self._cls.spec.domain)]
            name = self._args["name"]
            state = stream.consumers.get(name)
            if state is None:
                state = stream.consumers[name] = _ConsumerState(**self._args)
            else:  # like a JetStream consumer update: the position stays, the settings change
                state.pattern, state.ack_wait = self._args["pattern"], self._args["ack_wait"]
                state.max_deliver = self._args["max_deliver"]
                state.max_ack_pending = self._args["max_ack_pending"]
            self._state, self._stream = state, stream
        return self._state, self._stream

    async def next(self, timeout: float | None = None) -> _MemoryDelivery[E]:
        state, stream = await self._open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ClosedError("consumer is closed")
            taken = state.take(stream)
            if isinstance(taken, tuple):
                msg, count = taken
                delivery = accept_stored(self._log.bus, msg.subject, msg.data, self._cls)
                if delivery is None:
                    state.leases.pop(msg.seq, None)  # acknowledged and dropped: never poisons the consumer
                    self.dropped += 1
                    continue
                return _MemoryDelivery(msg.subject, delivery.envelope, delivery.event, count, msg.seq, state,
                                       stream)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no {self._cls.spec.type} event within {timeout:g}s")
            wakes = [t for t in (taken, deadline) if t is not None]
            await stream.changed.wait(max(min(wakes) - now, 0.0) if wakes else None)

    async def _release(self) -> None:
        if self._stream is not None:
            self._stream.changed.notify()


class MemoryEventLog(EventLogBase):
    """:class:`~fedbus.bus.stores.EventLog` in memory, shared by every bus on the same memory broker."""

    def __init__(self, hub: MemoryHub, bus: Bus, *, duplicate_window: float = 120.0) -> None:
        self.hub = hub
        self.bus = bus
        self.duplicate_window = duplicate_window

    async def ensure(self, *classes: type[Event]) -> None:
        """Create (or extend) the streams of these durable event types (all durable ones if none given)."""
        chosen = classes or tuple(c for c in self.bus.codec.catalogue if c.spec.durable)
        for cls in chosen:
            require_durable(cls)
            name = stream_name(cls.spec.domain)
            stream = self.hub.streams.get(name)
            if stream is None:
                stream = self.hub.streams[name] = _Stream(name, duplicate_window=self.duplicate_window)
            pattern = cls.pattern()
            if pattern not in stream.patterns:
                stream.patterns.append(pattern)
                self.hub.broker.attach(_Capture(self.hub, stream, pattern))

    async def publish_many(self, events: Iterable[Event], *, trace: str | None = None) -> list[Envelope]:
        """Publish many events; returns their envelopes once all are stored."""
        return [await self.publish(event, trace=trace) for event in events]

    async def _publish(self, event: Event, env: Envelope) -> PublishAck:
        await self.ensure(type(event))
        subject = event.subject()
        frame = Frame(subject, self.bus.codec.pack(env))
        ack = self.hub.streams[stream_name(event.spec.domain)].append(subject, frame.data, msg_id=env.id)
        self.hub.publishing = frame
        try:
            self.hub.broker.route(frame)
        finally:
            self.hub.publishing = None
        await asyncio.sleep(0)
        return ack

    def consume(
        self, cls: type[E], *, durable: str, key: str = "*", ack_wait: float = 30.0, max_deliver: int = -1,
        max_ack_pending: int = 1000, batch: int = 1,
    ) -> _MemoryConsumer[E]:
        """A durable consumer; several with the same ``durable`` name share the work. (``batch`` is accepted
        for parity with JetStream; memory deliveries are taken one at a time, leased when taken.)"""
        subjects.validate_token(durable, what="consumer name")
        args = {"name": durable, "pattern": cls.pattern(key), "ack_wait": ack_wait,
                "max_deliver": max_deliver, "max_ack_pending": max_ack_pending}
        return _MemoryConsumer(self, cls, args)

    async def replay(
        self, pattern: str, *, start_seq: int | None = None, start_time_ns: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Stored events matching ``pattern``, stream by stream, up to each stream's end at the start."""
        subjects.validate_pattern(pattern)
        chosen = [s for _, s in sorted(self.hub.streams.items())
                  if any(patterns_overlap(pattern, p) for p in s.patterns)]
        if not chosen:
            raise NotFound(f"no stream stores {pattern!r}")
        for stream in chosen:
            end = len(stream.messages)
            for msg in stream.messages[max((start_seq or 1) - 1, 0):end]:
                if start_time_ns is not None and msg.time_ns < start_time_ns:
                    continue
                if subjects.matches(pattern, msg.subject):
                    yield stored_event(self.bus, msg.seq, msg.subject, msg.data, msg.time_ns)

    async def streams(self) -> list[StreamStats]:
        """Every stream with its counts and consumers."""
        return [s.stats() for _, s in sorted(self.hub.streams.items())]


# -- key-value -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _KvValue:
    value: bytes
    revision: int
    written: float


class _KvBucket:
    def __init__(self, ttl: float | None) -> None:
        self.ttl = ttl
        self.entries: dict[str, _KvValue] = {}
        self.revision = 0

    def live(self, key: str) -> _KvValue | None:
        entry = self.entries.get(key)
        if entry is not None and self.ttl is not None and time.monotonic() - entry.written > self.ttl:
            del self.entries[key]
            return None
        return entry

    def write(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = _KvValue(bytes(value), self.revision, time.monotonic())
        return self.revision


class MemoryKV:
    """:class:`~fedbus.bus.stores.KeyValue` in memory; revisions count writes to the bucket."""

    def __init__(self, bucket: str, state: _KvBucket) -> None:
        self.bucket = bucket
        self._b = state

    async def get(self, key: str) -> KvEntry:
        entry = self._b.live(validate_key(key))
        if entry is None:
            raise NotFound(f"no key {key!r} in bucket {self.bucket!r}")
        return KvEntry(key, entry.value, entry.revision)

    async def put(self, key: str, value: bytes) -> int:
        return self._b.write(validate_key(key), value)

    async def create(self, key: str, value: bytes) -> int:
        if self._b.live(validate_key(key)) is not None:
            raise Conflict("key exists", key=key)
        return self._b.write(key, value)

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        entry = self._b.live(validate_key(key))
        if entry is None or entry.revision != revision:
            raise Conflict(f"revision is {entry.revision if entry else 'none'}, not {revision}", key=key,
                           expected=revision)
        return self._b.write(key, value)

    async def delete(self, key: str) -> None:
        if self._b.entries.pop(validate_key(key), None) is not None:
            self._b.revision += 1  # a delete is a write, as JetStream's delete marker

    async def keys(self) -> list[str]:
        return sorted(k for k in list(self._b.entries) if self._b.live(k) is not None)


# -- objects -------------------------------------------------------------------------------------------
class MemoryObjectStore(ChunkedObjectStore):
    """:class:`~fedbus.bus.stores.ObjectStore` in memory (chunks kept as stored, verified on read)."""

    def __init__(self, bucket: str, state: dict[str, tuple[ObjectInfo, list[bytes]]], *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.bucket = bucket
        self.chunk_size = chunk_size
        self._objects = state

    async def _store(self, name: str, pieces: AsyncIterator[bytes], digest: _Digest) -> ObjectInfo:
        chunks = [bytes(piece) async for piece in pieces]
        info = ObjectInfo(name=name, size=digest.size, sha256=digest.hexdigest(), chunks=len(chunks),
                          chunk_size=self.chunk_size, time_ns=time.time_ns(), version=new_id())
        self._objects[name] = (info, chunks)  # replaced whole, once complete
        return info

    async def _load(self, info: ObjectInfo) -> AsyncGenerator[bytes, None]:
        current = self._objects.get(info.name)
        if current is None or current[0].version != info.version:
            raise NotFound(f"object {info.name!r} was replaced or deleted while being read")
        for chunk in current[1]:
            yield chunk
            await asyncio.sleep(0)

    async def info(self, name: str) -> ObjectInfo:
        found = self._objects.get(name)
        if found is None:
            raise NotFound(f"no object {name!r} in bucket {self.bucket!r}")
        return found[0]

    async def delete(self, name: str) -> None:
        self._objects.pop(name, None)

    async def list(self) -> list[ObjectInfo]:
        return [info for _, (info, _) in sorted(self._objects.items())]


# -- the hub and the factory ---------------------------------------------------------------------------
class MemoryHub:
    """Everything the memory stores hold for one memory broker."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = weakref.ref(broker)
        self.streams: dict[str, _Stream] = {}
        self.buckets: dict[str, _KvBucket] = {}
        self.objects: dict[str, dict[str, tuple[ObjectInfo, list[bytes]]]] = {}
        self.publishing: Frame | None = None

    @property
    def broker(self) -> MemoryBroker:
        broker = self._broker()
        if broker is None:
            raise ClosedError("the memory broker is gone")
        return broker


_HUBS: weakref.WeakKeyDictionary[MemoryBroker, MemoryHub] = weakref.WeakKeyDictionary()


def hub_for(broker: MemoryBroker) -> MemoryHub:
    """The hub of a memory broker (created on first use, gone with the broker)."""
    hub = _HUBS.get(broker)
    if hub is None:
        hub = _HUBS[broker] = MemoryHub(broker)
    return hub


class MemoryStores(StoresBase):
    """The memory backend of :func:`~fedbus.bus.stores.open_stores`."""

    def __init__(self, hub: MemoryHub, bus: Bus, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 duplicate_window: float = 120.0) -> None:
        self.hub = hub
        self.bus = bus
        self.chunk_size = chunk_size
        self._log = MemoryEventLog(hub, bus, duplicate_window=duplicate_window)

    @classmethod
    def for_bus(cls, bus: Bus, *, chunk_size: int = DEFAULT_CHUNK_SIZE, duplicate_window: float = 120.0,
                **_jetstream_only: Any) -> MemoryStores:
        """The stores of the bus's memory broker. Options that only mean something on JetStream (replicas,
        storage, timeouts, windows) are accepted and ignored, so one call site serves both backends."""
        broker = getattr(bus.transport, "broker", None)
        if not isinstance(broker, MemoryBroker):
            raise StoreError("memory stores need a bus on a MemoryTransport")
        return cls(hub_for(broker), bus, chunk_size=chunk_size, duplicate_window=duplicate_window)

    def event_log(self) -> MemoryEventLog:
        return self._log

    async def key_value(self, bucket: str, *, ttl: float | None = None) -> MemoryKV:
        """A bucket; with ``ttl``, entries not written for ``ttl`` seconds disappear."""
        validate_bucket(bucket)
        state = self.hub.buckets.get(bucket)
        if state is None:
            state = self.hub.buckets[bucket] = _KvBucket(ttl)
        return MemoryKV(bucket, state)

    async def object_store(self, bucket: str) -> MemoryObjectStore:
        """A bucket of objects, kept in chunks of :attr:`chunk_size`."""
        validate_bucket(bucket)
        return MemoryObjectStore(bucket, self.hub.objects.setdefault(bucket, {}), chunk_size=self.chunk_size)

    async def streams(self) -> list[StreamStats]:
        return await self._log.streams()
