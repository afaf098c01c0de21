"""Contracts for the durable parts of the bus: event streams, a key-value store, an object store.

Implementations: NATS JetStream (:mod:`fedbus.bus.jetstream`) for deployments and in-memory ones
(:mod:`fedbus.bus.memstores`) for unit tests and single-process simulation. ``tests/test_store_contract.py``
runs one suite against each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from .codec import Envelope
from .events import Event

__all__ = [
    "AckableDelivery",
    "EventLog",
    "KeyValue",
    "KvEntry",
    "ObjectInfo",
    "ObjectStore",
]

E = TypeVar("E", bound=Event)


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    value: bytes
    revision: int


@runtime_checkable
class KeyValue(Protocol):
    """Agent state: small values by key, with revisions for compare-and-set."""

    async def get(self, key: str) -> KvEntry:
        """The current entry; raises :class:`~fedbus.bus.errors.NotFound`."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value``; returns the new revision."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store only if ``key`` does not exist; raises :class:`~fedbus.bus.errors.StoreError` otherwise."""
        ...

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        """Compare-and-set: store only if the current revision is ``revision``."""
        ...

    async def delete(self, key: str) -> None: ...

    async def keys(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    sha256: str
    chunks: int = 0


@runtime_checkable
class ObjectStore(Protocol):
    """Large blobs (model weights, workspaces), streamed in chunks and verified by sha256."""

    async def put_stream(self, name: str, chunks: AsyncIterator[bytes]) -> ObjectInfo: ...

    async def put_file(self, name: str, path: Path) -> ObjectInfo: ...

    async def put_bytes(self, name: str, data: bytes) -> ObjectInfo: ...

    def get_stream(self, name: str) -> AsyncIterator[bytes]:
        """Chunks of the object; the sha256 is verified at the end (raises IntegrityError on mismatch)."""
        ...

    async def get_file(self, name: str, path: Path) -> ObjectInfo:
        """Write the object to ``path`` (via a temporary file, renamed once verified)."""
        ...

    async def get_bytes(self, name: str) -> bytes: ...

    async def info(self, name: str) -> ObjectInfo: ...

    async def delete(self, name: str) -> None: ...

    async def list(self) -> list[ObjectInfo]: ...


class AckableDelivery(Protocol[E]):
    """A delivery from a durable consumer: acknowledge it, or it is redelivered after the ack wait."""

    subject: str
    envelope: Envelope
    event: E
    delivered: int
    """How many times this event has been delivered (1 on the first try)."""

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None:
        """Extend the ack deadline (a lease renewal)."""
        ...


@runtime_checkable
class EventLog(Protocol):
    """Durable event streams for event types declared ``durable=True``; deduplicated by event id."""

    async def ensure(self, *classes: type[Event]) -> None:
        """Create (or update) the streams that hold these event types."""
        ...

    async def publish(self, event: Event, *, trace: str | None = None) -> Envelope:
        """Publish and wait for the broker's ack; a retry with the same envelope id is not stored twice."""
        ...

    def consume(self, cls: type[E], *, durable: str, key: str = "*", ack_wait: float = 30.0,
                max_deliver: int = -1) -> AsyncIterator[Any]:
        """Deliveries (with ack/nak/in_progress) for a named durable consumer that survives restarts."""
        ...

    def replay(self, pattern: str, *, start_seq: int | None = None, start_time: float | None = None
               ) -> AsyncIterator[Any]:
        """Re-read stored events from a sequence or a time, then stop at the current end."""
        ...
