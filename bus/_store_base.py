"""What the two store backends (:mod:`~fedbus.bus.jetstream`, :mod:`~fedbus.bus.memstores`) share word for word.

The lifecycle of a durable consumer (``async with``, ``async for``, idempotent ``close``), the two publish entry
points of an event log, the durable-type check, and the ``close``/``async with`` of the stores object. What
differs between the backends (fetching, storing, releasing) stays in each backend as one abstract method.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from . import subjects
from .errors import ClosedError, StoreError
from .events import Event

if TYPE_CHECKING:
    from .client import Bus
    from .codec import Envelope
    from .stores import PublishAck

D = TypeVar("D")


def require_durable(cls: type[Event]) -> None:
    """Raise :class:`StoreError` unless ``cls`` is declared ``durable=True`` (only those have a stream)."""
    if not cls.spec.durable:
        raise StoreError(f"{cls.spec.type} is not declared durable=True; it has no stream")


class ConsumerBase(abc.ABC, Generic[D]):
    """A durable consumer's lifecycle: ``async with`` opens it, ``async for`` reads until it is closed."""

    def __init__(self) -> None:
        self._closed = False
        self.dropped = 0
        """Invalid frames acknowledged and dropped."""

    @abc.abstractmethod
    async def _open(self) -> object:
        """Bind to the broker's consumer (once); raises :class:`ClosedError` once closed."""

    @abc.abstractmethod
    async def next(self, timeout: float | None = None) -> D:
        """The next valid delivery; ``TimeoutError`` after ``timeout`` seconds without one."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Let go of what :meth:`_open` took and wake a task waiting in :meth:`next`; called once."""

    def __aiter__(self) -> AsyncIterator[D]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[D]:
        while not self._closed:
            try:
                yield await self.next()
            except ClosedError:
                return

    async def close(self) -> None:
        """Stop fetching; unacknowledged deliveries come back after their ack wait. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._release()

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class EventLogBase(abc.ABC):
    """The publish entry points of an event log, on top of the backend's ``_publish_frame``."""

    bus: Bus

    @abc.abstractmethod
    async def _publish_frame(self, cls: type[Event], subject: str, frame: bytes, msg_id: str) -> PublishAck:
        """Store ``frame`` (of a ``cls`` event, or a raw frame on its subject) once, however often it is sent."""

    async def _publish(self, event: Event, env: Envelope) -> PublishAck:
        return await self._publish_frame(type(event), event.subject(), self.bus.codec.pack(env), env.id)

    def _durable_for(self, subject: str) -> type[Event]:
        """The durable event type whose stream stores ``subject``; :class:`StoreError` if none does."""
        subjects.validate_subject(subject)
        for cls in self.bus.codec.catalogue:
            if cls.spec.durable and subjects.matches(cls.pattern(), subject):
                return cls
        raise StoreError(f"no durable event type is published on {subject!r}: no stream stores it")

    async def publish(self, event: Event, *, trace: str | None = None) -> Envelope:
        """Publish and wait until the event is stored; returns its envelope."""
        env = self.bus.envelope(event, trace=trace)
        await self._publish(event, env)
        return env

    async def publish_envelope(self, env: Envelope, *, subject: str | None = None) -> PublishAck:
        """(Re)publish an existing envelope; a retry of a stored one comes back ``duplicate=True``.

        With ``subject``, the envelope is stored as it is on that subject (which a durable type's stream must
        store), without being decoded: how ``fedbus publish`` stores raw JSON on a durable subject."""
        if subject is None:
            return await self._publish(self.bus.codec.decode(env), env)
        return await self._publish_frame(self._durable_for(subject), subject, self.bus.codec.pack(env), env.id)


class StoresBase:
    """``close`` and ``async with`` for a backend's stores object, which owns nothing to release."""

    async def close(self) -> None:
        """Nothing of its own to release (the bus owns the connection); here so both backends close alike."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
