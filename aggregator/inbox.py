"""Several typed subscriptions read into one bounded queue, so an agent's loop can ``match`` on whatever
arrives next and wake up on its own deadlines. The reader tasks live in the inbox's ``TaskGroup``."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self

from fedbus.bus.client import Bus, Delivery, EventSubscription
from fedbus.bus.events import Event

__all__ = ["Inbox"]


class Inbox:
    """``async with Inbox(bus) as inbox``, then ``await inbox.add(ModelUpdate, key=run_id)`` and
    ``d = await inbox.next(1.0)``.

    A full queue makes the readers wait; each subscription's own bounded buffer then drops (and counts) what
    a too-slow agent cannot take, so memory stays bounded.
    """

    def __init__(self, bus: Bus, *, max_pending: int = 4096) -> None:
        self.bus = bus
        self.max_pending = max_pending
        self._queue: asyncio.Queue[Delivery[Any]] = asyncio.Queue(maxsize=max_pending)
        self._subs: list[EventSubscription[Any]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._closed = False

    async def add(self, cls: type[Event], *, key: str = "*") -> None:
        """Start receiving events of ``cls`` (optionally only one subject key)."""
        if self._tg is None:
            raise RuntimeError("use `async with Inbox(...)` before add()")
        sub = await self.bus.subscribe(cls, key=key, max_pending=self.max_pending)
        self._subs.append(sub)
        self._readers.append(self._tg.create_task(self._read(sub), name=f"inbox:{sub.pattern}"))

    async def _read(self, sub: EventSubscription[Any]) -> None:
        async for delivery in sub:
            await self._queue.put(delivery)

    async def next(self, timeout: float | None = None) -> Delivery[Any] | None:
        """The next delivery, or ``None`` once ``timeout`` seconds pass without one."""
        if timeout is not None and timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    @property
    def dropped(self) -> int:
        """Events dropped because this agent fell behind."""
        return sum(s.dropped for s in self._subs)

    async def close(self) -> None:
        """Unsubscribe everything and stop the readers (one may be waiting on a full queue). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            await sub.unsubscribe()
        for task in self._readers:
            task.cancel()

    async def __aenter__(self) -> Self:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.close())
        assert self._tg is not None
        await self._tg.__aexit__(exc_type, exc, tb)
