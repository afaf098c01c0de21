"""The one interface every transport implements: it moves bytes, never events.

Implementations: :class:`~fedbus.bus.memory.MemoryTransport` (one process, tests and simulation),
:class:`~fedbus.bus.nats_transport.NatsTransport` (cloud, core NATS) and :class:`~fedbus.bus.mqtt_transport.MqttTransport`
(edge devices; Mosquitto or nats-server's MQTT listener). ``tests/test_transport_contract.py`` runs one suite
against all of them on real servers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Protocol, Self, runtime_checkable

import structlog

from .errors import ClosedError

__all__ = ["Capabilities", "Frame", "Subscription", "Transport", "TransportBase"]

log = structlog.get_logger("fedbus.bus")


class Frame(NamedTuple):
    """Bytes received on a subject; ``reply`` is the transport-level reply subject, if any.

    A named tuple: immutable, and built ~3x faster than a frozen dataclass (one per received message)."""

    subject: str
    data: bytes
    reply: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What a transport can do beyond publish/subscribe."""

    queue_groups: bool = True
    native_reply: bool = True
    """Replies travel on a transport-level reply subject (NATS). Otherwise the envelope's ``reply`` is used."""


class Subscription:
    """A bounded stream of frames for one pattern. Iterate with ``async for``; close with :meth:`unsubscribe`.

    A subscriber that falls ``max_pending`` frames behind is a *slow consumer*: further frames are dropped
    (core delivery is at-most-once; durable streams redeliver), counted in :attr:`dropped` and logged, so a
    slow reader can never eat the process's memory or block other subscribers.
    """

    def __init__(self, pattern: str, *, queue: str | None = None, max_pending: int = 1024) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.pattern = pattern
        self.queue_group = queue
        self.max_pending = max_pending
        self.dropped = 0
        self.delivered = 0
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    # -- called by transports ---------------------------------------------------------------------------
    def deliver(self, frame: Frame) -> bool:
        """Hand a frame to the reader without blocking; ``False`` (and counted) when it had to be dropped."""
        if self._closed:
            return False
        if len(self._frames) >= self.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("slow consumer: dropping frames", pattern=self.pattern, dropped=self.dropped,
                            max_pending=self.max_pending)
            return False
        self._frames.append(frame)
        self._wake()
        return True

    def end(self) -> None:
        """Mark the stream finished: the reader sees the frames already queued, then the iteration stops."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- called by readers ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        return len(self._frames)

    async def next(self, timeout: float | None = None) -> Frame:
        """The next frame; raises :class:`ClosedError` once the subscription has ended and is empty, and
        ``TimeoutError`` when ``timeout`` passes first."""
        while not self._frames:
            if self._closed:
                raise ClosedError(f"subscription {self.pattern!r} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        self.delivered += 1
        return self._frames.popleft()

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        """Stop receiving; idempotent. Transports extend this to tell the broker."""
        self.end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()


class TransportBase:
    """What every transport implementation shares: ``async with`` connects, and closes on the way out."""

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@runtime_checkable
class Transport(Protocol):
    """Moves bytes between subjects. Agents use :class:`~fedbus.bus.Bus`, which wraps a transport."""

    name: str
    url: str
    capabilities: Capabilities

    async def connect(self) -> None:
        """Connect to the broker; raises :class:`~fedbus.bus.errors.ConnectError`."""
        ...

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Publish ``data`` on a concrete subject. Buffered while reconnecting."""
        ...

    async def subscribe(
        self, pattern: str, *, queue: str | None = None, max_pending: int = 1024
    ) -> Subscription:
        """Subscribe to a pattern (``*``/``>`` wildcards); with ``queue``, share the load within the group."""
        ...

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Frame:
        """Publish and wait for the first reply (transports with ``native_reply`` only)."""
        ...

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far has reached the broker."""
        ...

    async def close(self) -> None:
        """Drain subscriptions, flush, disconnect. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
