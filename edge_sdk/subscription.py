"""Subscriptions of the edge SDK: bounded queues of frames on one topic filter, decoded and checked on read.

:meth:`EdgeClient.subscribe <fedbus.edge_sdk.client.EdgeClient.subscribe>` makes them; the client gives each one
how to check a frame (``accept``) and how to leave the link (``remove_route``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, Self

from .errors import LinkClosed
from .link import Route

__all__ = ["EdgeSubscription", "PendingSubscription", "Received"]

log = logging.getLogger("fedbus.edge")


class _End(enum.Enum):
    """The marker a subscription's queue ends with."""

    END = enum.auto()


_END = _End.END


class Received(NamedTuple):
    """One incoming event: ``(type, data, envelope)``; ``data`` is the payload's fields as a dict."""

    type: str
    data: dict[str, Any]
    envelope: dict[str, Any]


#: Checks one frame of a subscription: ``(topic, payload, event_type, version)`` → the event, or ``None``.
Accept = Callable[[str, bytes, str, "int | None"], "Received | None"]


class EdgeSubscription:
    """Events of one type on one topic filter, decoded and checked. ``async for type, data, env in sub``.

    Bounded: a reader that falls ``max_pending`` frames behind loses the newest ones (counted in
    :attr:`dropped`). Invalid frames are skipped and counted in :attr:`EdgeClient.rejected`.
    """

    def __init__(self, event_type: str, topic_filter: str, *, version: int | None, max_pending: int,
                 accept: Accept, remove_route: Callable[[Route], Awaitable[None]]) -> None:
        self.event_type = event_type
        self.topic_filter = topic_filter
        self.version = version
        self.dropped = 0
        self._accept = accept
        self._remove_route = remove_route
        self._queue: asyncio.Queue[tuple[str, bytes] | _End] = asyncio.Queue(maxsize=max_pending)
        self._route: Route | None = None
        self._ended = False

    def attach(self, route: Route) -> None:
        """The link's route that feeds :meth:`on_message` (removed again by :meth:`unsubscribe`)."""
        self._route = route

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        """The link's callback for one frame on the filter: queued, or dropped and counted when full."""
        if self._ended:
            return
        try:
            self._queue.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("slow subscriber: dropping frames",
                            extra={"filter": self.topic_filter, "dropped": self.dropped})

    def end(self) -> None:
        """No more frames: readers get :class:`LinkClosed` once the queue is drained. Idempotent."""
        if self._ended:
            return
        self._ended = True
        while True:
            try:
                self._queue.put_nowait(_END)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()

    async def next(self, timeout: float | None = None) -> Received:
        """The next valid event; raises :class:`LinkClosed` once the subscription has ended."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 1e-6)
            item = await asyncio.wait_for(self._queue.get(), remaining)
            if isinstance(item, _End):
                self._queue.put_nowait(_END)
                raise LinkClosed(f"subscription {self.topic_filter!r} has ended")
            topic, payload = item
            received = self._accept(topic, payload, self.event_type, self.version)
            if received is not None:
                return received

    def __aiter__(self) -> AsyncIterator[Received]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Received]:
        while True:
            try:
                yield await self.next()
            except LinkClosed:
                return

    async def unsubscribe(self) -> None:
        """Stop receiving; idempotent."""
        route, self._route = self._route, None
        if route is not None:
            await self._remove_route(route)
        self.end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()


class PendingSubscription:
    """What :meth:`EdgeClient.subscribe` returns: await it, or use it as an async context manager."""

    def __init__(self, open_: Callable[[EdgeSubscription], Awaitable[EdgeSubscription]],
                 sub: EdgeSubscription) -> None:
        self._open = open_
        self._sub = sub

    def __await__(self) -> Any:
        return self._open(self._sub).__await__()

    async def __aenter__(self) -> EdgeSubscription:
        return await self._open(self._sub)

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()
