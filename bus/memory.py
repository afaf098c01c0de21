"""An in-process transport: many :class:`MemoryTransport` clients on one :class:`MemoryBroker`.

Same semantics as core NATS (wildcards, queue groups, request/reply, no responders), no sockets. Used by unit
tests of pure logic and by ``--simulate`` runs, where all agents share one process.
"""

from __future__ import annotations

import asyncio
import itertools

from . import subjects
from .errors import ClosedError, NoResponders, RequestTimeout
from .transport import Capabilities, Frame, Subscription, TransportBase

__all__ = ["MemoryBroker", "MemoryTransport"]


class MemoryBroker:
    """Routes frames between the in-memory transports attached to it."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._rr = itertools.count()

    def attach(self, sub: Subscription) -> None:
        self._subs.append(sub)

    def detach(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def route(self, frame: Frame) -> int:
        """Deliver to every matching plain subscription and to one member of each matching queue group."""
        delivered = 0
        groups: dict[str, list[Subscription]] = {}
        for sub in self._subs:
            if not subjects.matches(sub.pattern, frame.subject):
                continue
            if sub.queue_group is None:
                delivered += sub.deliver(frame)
            else:
                groups.setdefault(f"{sub.queue_group}\x00{sub.pattern}", []).append(sub)
        for members in groups.values():
            delivered += members[next(self._rr) % len(members)].deliver(frame)
        return delivered

    def interest(self, subject: str) -> bool:
        return any(subjects.matches(s.pattern, subject) for s in self._subs)


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, pattern: str, queue: str | None, max_pending: int,
                 owner: set[_MemorySubscription]) -> None:
        super().__init__(pattern, queue=queue, max_pending=max_pending)
        self._broker = broker
        self._owner = owner

    async def unsubscribe(self) -> None:
        self._broker.detach(self)
        self._owner.discard(self)
        self.end()


class _ReplyInbox(_MemorySubscription):
    """One subscription (``<prefix>.*``) for all of a transport's requests: each reply resolves the future of
    the request whose inbox it names, so a request costs no subscription of its own."""

    def __init__(self, broker: MemoryBroker, prefix: str, owner: set[_MemorySubscription]) -> None:
        super().__init__(broker, f"{prefix}.*", None, 1, owner)
        self.prefix = prefix
        self.waiting: dict[str, asyncio.Future[Frame]] = {}

    def deliver(self, frame: Frame) -> bool:
        future = self.waiting.pop(frame.subject, None)
        if future is None or future.done():
            return False  # a late or second reply: nobody waits for it
        future.set_result(frame)
        return True

    def end(self) -> None:
        super().end()
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ClosedError(f"subscription {self.pattern!r} is closed"))


class MemoryTransport(TransportBase):
    """A client of a :class:`MemoryBroker`."""

    name = "memory"
    capabilities = Capabilities(queue_groups=True, native_reply=True)

    def __init__(self, broker: MemoryBroker, *, client_id: str = "memory") -> None:
        self.broker = broker
        self.url = f"memory://{client_id}"
        self._subs: set[_MemorySubscription] = set()
        self._inbox = itertools.count()
        self._replies: _ReplyInbox | None = None
        self._connected = False
        self._closed = False

    async def connect(self) -> None:
        if self._closed:
            raise ClosedError("transport is closed")
        self._connected = True

    def _check_open(self) -> None:
        if self._closed or not self._connected:
            raise ClosedError(f"{self.url} is {'closed' if self._closed else 'not connected'}")

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        self._check_open()
        subjects.validate_subject(subject)
        self.broker.route(Frame(subject, bytes(data), reply))
        await asyncio.sleep(0)  # let readers run, as a socket write would

    async def subscribe(
        self, pattern: str, *, queue: str | None = None, max_pending: int = 1024
    ) -> Subscription:
        self._check_open()
        subjects.validate_pattern(pattern)
        sub = _MemorySubscription(self.broker, pattern, queue, max_pending, self._subs)
        self.broker.attach(sub)
        self._subs.add(sub)
        return sub

    def _reply_inbox(self) -> _ReplyInbox:
        if self._replies is None or self._replies.closed:
            self._replies = _ReplyInbox(self.broker, f"_INBOX.{id(self)}", self._subs)
            self.broker.attach(self._replies)
            self._subs.add(self._replies)
        return self._replies

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Frame:
        self._check_open()
        subjects.validate_subject(subject)
        if not self.broker.interest(subject):
            raise NoResponders(subject)
        replies = self._reply_inbox()
        inbox = f"{replies.prefix}.{next(self._inbox)}"
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        replies.waiting[inbox] = future
        try:
            await self.publish(subject, data, reply=inbox)
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise RequestTimeout(subject, timeout) from None
        finally:
            replies.waiting.pop(inbox, None)

    async def flush(self, timeout: float = 5.0) -> None:
        self._check_open()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.unsubscribe()
        self._subs.clear()
        self._replies = None
