"""In-memory event log, key-value store and object store, with JetStream's semantics and no broker.

For unit tests of pure logic and single-process simulation. State lives in a :class:`MemoryHub` attached to
a :class:`~fedbus.bus.memory.MemoryBroker`, so every bus on the same broker sees the same streams, buckets
and consumers, as agents on one NATS server would. What is kept from JetStream: one stream per event domain,
deduplication by envelope id within a window, durable consumers with leases (``ack_wait``), ``nak`` with a
delay, ``in_progress``, ``max_deliver``, delivery counts (all in :mod:`._mem_events`); compare-and-set
revisions and TTL buckets; objects in chunks verified by sha256; the :class:`~fedbus.bus.limits.StorageLimits`
of streams (size, count, bytes, age, discard policy), of KV buckets (value size, bytes) and of object buckets
(bytes, chunk size). Core publishes of durable event types are captured by their stream, as JetStream does.
Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from ._mem_events import MemoryEventLog, _Stream
from ._store_base import StoresBase
from .chunked import ChunkedObjectStore, _Digest
from .client import Bus
from .codec import new_id
from .errors import ClosedError, Conflict, NotFound, StoreError
from .limits import BucketLimits, LimitExceeded, ObjectLimits, StorageLimits
from .memory import MemoryBroker
from .stores import KvEntry, ObjectInfo, StreamStats, validate_bucket, validate_key
from .transport import Frame

__all__ = ["MemoryEventLog", "MemoryHub", "MemoryKV", "MemoryObjectStore", "MemoryStores"]

DEFAULT_CHUNK_SIZE = 1024 * 1024


# -- key-value -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _KvValue:
    value: bytes
    revision: int
    written: float


class _KvBucket:
    def __init__(self, name: str, ttl: float | None, limits: BucketLimits) -> None:
        self.name = f"bucket {name!r}"
        self.ttl = ttl
        self.limits = limits
        self.entries: dict[str, _KvValue] = {}
        self.revision = 0
        self.bytes = 0

    def live(self, key: str) -> _KvValue | None:
        entry = self.entries.get(key)
        if entry is not None and self.ttl is not None and time.monotonic() - entry.written > self.ttl:
            self.remove(key)
            return None
        return entry

    def write(self, key: str, value: bytes) -> int:
        """Store ``value`` under the bucket's limits: a value too large, or a new key in a full bucket, is
        refused (overwriting a key frees its old value first)."""
        if len(value) > self.limits.max_value_size:
            raise LimitExceeded(self.name, "message size exceeds maximum allowed", size=len(value),
                                limit=self.limits.max_value_size)
        old = self.live(key)
        if self.bytes - (len(old.value) if old else 0) + len(value) > self.limits.max_bytes:
            raise LimitExceeded(self.name, "maximum bytes exceeded")
        self.remove(key)
        self.revision += 1
        self.entries[key] = _KvValue(bytes(value), self.revision, time.monotonic())
        self.bytes += len(value)
        return self.revision

    def remove(self, key: str) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= len(entry.value)
        return True


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
        if self._b.remove(validate_key(key)):
            self._b.revision += 1  # a delete is a write, as JetStream's delete marker

    async def keys(self) -> list[str]:
        return sorted(k for k in list(self._b.entries) if self._b.live(k) is not None)


# -- objects -------------------------------------------------------------------------------------------
class MemoryObjectStore(ChunkedObjectStore):
    """:class:`~fedbus.bus.stores.ObjectStore` in memory (chunks kept as stored, verified on read)."""

    def __init__(self, bucket: str, state: dict[str, tuple[ObjectInfo, list[bytes]]], *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, limits: ObjectLimits | None = None) -> None:
        self.bucket = bucket
        self.limits = limits or ObjectLimits(max_bytes=1 << 62)
        self.chunk_size = min(chunk_size, self.limits.max_chunk_size)
        self._objects = state

    async def _store(self, name: str, pieces: AsyncIterator[bytes], digest: _Digest) -> ObjectInfo:
        chunks = []
        others = sum(info.size for key, (info, _) in self._objects.items() if key != name)
        async for piece in pieces:  # a full bucket refuses new objects (discard new): nothing is evicted
            if others + digest.size > self.limits.max_bytes:
                raise LimitExceeded(f"object bucket {self.bucket!r}", "maximum bytes exceeded")
            chunks.append(bytes(piece))
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
    """Everything the memory stores hold for one memory broker, and the limits new streams and buckets get."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = weakref.ref(broker)
        self.limits = StorageLimits()
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
                 duplicate_window: float = 120.0, limits: StorageLimits | None = None) -> None:
        self.hub = hub
        self.bus = bus
        self.chunk_size = chunk_size
        if limits is not None:  # for the streams and buckets created from now on, as on JetStream
            hub.limits = limits
        self._log = MemoryEventLog(hub, bus, duplicate_window=duplicate_window)

    @classmethod
    def for_bus(cls, bus: Bus, *, chunk_size: int = DEFAULT_CHUNK_SIZE, duplicate_window: float = 120.0,
                limits: StorageLimits | None = None, **_jetstream_only: Any) -> MemoryStores:
        """The stores of the bus's memory broker. Options that only mean something on JetStream (replicas,
        storage, timeouts, windows) are accepted and ignored, so one call site serves both backends."""
        broker = getattr(bus.transport, "broker", None)
        if not isinstance(broker, MemoryBroker):
            raise StoreError("memory stores need a bus on a MemoryTransport")
        return cls(hub_for(broker), bus, chunk_size=chunk_size, duplicate_window=duplicate_window,
                   limits=limits)

    def event_log(self) -> MemoryEventLog:
        return self._log

    async def key_value(self, bucket: str, *, ttl: float | None = None) -> MemoryKV:
        """A bucket; with ``ttl`` (else the limits' ttl), entries not written for that long disappear."""
        validate_bucket(bucket)
        state = self.hub.buckets.get(bucket)
        if state is None:
            limits = self.hub.limits.bucket(bucket)
            state = self.hub.buckets[bucket] = _KvBucket(bucket, ttl if ttl is not None else limits.ttl or None,
                                                         limits)
        return MemoryKV(bucket, state)

    async def object_store(self, bucket: str) -> MemoryObjectStore:
        """A bucket of objects, kept in chunks of :attr:`chunk_size` (at most the bucket's max chunk size)."""
        validate_bucket(bucket)
        return MemoryObjectStore(bucket, self.hub.objects.setdefault(bucket, {}), chunk_size=self.chunk_size,
                                 limits=self.hub.limits.object_bucket(bucket))

    async def streams(self) -> list[StreamStats]:
        return await self._log.streams()
