"""The :class:`Bus`: typed events over any :class:`~fedbus.bus.transport.Transport`.

::

    async with Bus(NatsTransport(url), source="gpu-1") as bus:
        await bus.publish(Heartbeat(agent_id="gpu-1", free_gpus=2))
        async with await bus.subscribe(JobOffer) as offers:
            async for d in offers:          # d.event is a JobOffer, d.envelope its envelope
                ...

Incoming frames are checked (size, envelope, schema, signature, replay) before a subscriber sees them; a
frame that fails is dropped, counted in :attr:`Bus.rejected` and logged with its subject and source. A bad
frame never raises inside a subscriber's loop and never blocks other subscribers.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, overload

import structlog

from . import subjects
from .codec import Codec, Envelope
from .errors import AuthError, BusError, ClosedError, CodecError, RequestTimeout, UnsignedEvent
from .events import Event
from .signing import AgentKey, KeyRing, ReplayGuard
from .transport import Frame, Subscription, Transport

__all__ = ["Bus", "Delivery", "EventSubscription", "Security"]

log = structlog.get_logger("fedbus.bus")
E = TypeVar("E", bound=Event)


class Security(enum.Enum):
    """How a bus treats signatures on incoming events."""

    OFF = "off"
    """No checks (trusted single-process runs, benchmarks)."""
    VERIFY = "verify"
    """Signatures that are present must verify; unsigned events are accepted."""
    STRICT = "strict"
    """Additionally, event types declared ``signed`` must be signed by a trusted key and not replayed."""


@dataclass(slots=True)  # not frozen: frozen dataclasses construct ~3x slower, and this is on every receive
class Delivery(Generic[E]):
    """One received event with its envelope and where it came from (treat as read-only)."""

    subject: str
    envelope: Envelope
    event: E
    reply: str | None = None

    @property
    def source(self) -> str:
        return self.envelope.src


class EventSubscription(Generic[E]):
    """Decoded, validated events for one pattern. ``async for`` yields :class:`Delivery` objects."""

    def __init__(self, bus: Bus, sub: Subscription, cls: type[E] | None) -> None:
        self._bus = bus
        self._sub = sub
        self._cls = cls

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def dropped(self) -> int:
        """Frames dropped because this subscriber was too slow."""
        return self._sub.dropped

    async def next(self, timeout: float | None = None) -> Delivery[E]:
        """The next valid event; invalid frames are skipped (and counted on the bus)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 1e-6)
            frame = await self._sub.next(remaining)
            delivery = self._bus._accept(frame, self._cls)
            if delivery is not None:
                return delivery

    def __aiter__(self) -> AsyncIterator[Delivery[E]]:
        return self

    async def __anext__(self) -> Delivery[E]:
        while True:
            try:
                frame = await self._sub.next()
            except ClosedError:
                raise StopAsyncIteration from None
            delivery = self._bus._accept(frame, self._cls)
            if delivery is not None:
                return delivery

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()


class Bus:
    """Publishes and receives typed events through a transport. One per agent; ``async with`` it."""

    def __init__(
        self,
        transport: Transport,
        *,
        source: str,
        codec: Codec | None = None,
        key: AgentKey | None = None,
        keyring: KeyRing | None = None,
        security: Security = Security.VERIFY,
        sign_all: bool = False,
        replay: ReplayGuard | None = None,
    ) -> None:
        self.transport = transport
        self.source = subjects.validate_token(source, what="agent id")
        self.codec = codec or Codec()
        self.key = key
        self.keyring = keyring if keyring is not None else KeyRing()
        if key is not None:
            self.keyring.trust(key.public_raw)  # an agent trusts itself
        self.security = security
        self.sign_all = sign_all
        self.replay = replay or ReplayGuard()
        self.rejected: Counter[str] = Counter()
        self._inbox_prefix = f"fedbus._inbox.{self.source}-{os.urandom(4).hex()}"
        self._inbox_seq = itertools.count()
        self._inbox_waiters: dict[str, asyncio.Future[Delivery[Any]]] = {}
        self._inbox_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------------
    async def connect(self) -> None:
        await self.transport.connect()

    async def close(self) -> None:
        """Stop the inbox, drain and close the transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._inbox_task is not None:
            self._inbox_task.cancel()
            await asyncio.gather(self._inbox_task, return_exceptions=True)
        for fut in self._inbox_waiters.values():
            fut.cancel()
        await self.transport.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- publishing -------------------------------------------------------------------------------------
    def envelope(self, event: Event, *, trace: str | None = None, reply: str | None = None) -> Envelope:
        """A new envelope for ``event`` from this bus's agent, signed when the policy says so."""
        env = self.codec.envelope(event, source=self.source, trace=trace, reply=reply)
        if self.key is not None and (self.sign_all or event.spec.signed):
            self.key.sign(env)
        return env

    async def publish(self, event: Event, *, trace: str | None = None) -> Envelope:
        """Publish ``event`` on its subject; returns the envelope that was sent."""
        env = self.envelope(event, trace=trace)
        await self.transport.publish(event.subject(), self.codec.pack(env))
        return env

    async def publish_envelope(self, subject: str, env: Envelope, *, reply: str | None = None) -> None:
        """Publish an existing envelope unchanged (forwarding, replay tools)."""
        await self.transport.publish(subject, self.codec.pack(env), reply=reply)

    # -- receiving --------------------------------------------------------------------------------------
    @overload
    async def subscribe(
        self, what: type[E], *, key: str = "*", queue: str | None = None, max_pending: int = 1024
    ) -> EventSubscription[E]: ...

    @overload
    async def subscribe(
        self, what: str, *, key: str = "*", queue: str | None = None, max_pending: int = 1024
    ) -> EventSubscription[Event]: ...

    async def subscribe(
        self, what: type[E] | str, *, key: str = "*", queue: str | None = None, max_pending: int = 1024
    ) -> EventSubscription[Any]:
        """Subscribe to an event class (optionally one ``key``), or to a raw pattern of any event types."""
        if isinstance(what, str):
            pattern, cls = subjects.validate_pattern(what), None
        else:
            pattern, cls = what.pattern(key), what
        sub = await self.transport.subscribe(pattern, queue=queue, max_pending=max_pending)
        return EventSubscription(self, sub, cls)

    def _accept(
        self, frame: Frame, cls: type[Event] | None, *, check_replay: bool = True
    ) -> Delivery[Any] | None:
        """Turn a frame into a delivery, or drop it with a count and a log line.

        ``check_replay=False`` is for events read back from a durable stream: a redelivery or a replay repeats
        an event id on purpose (the stream deduplicates by id); signatures are still verified.
        """
        delivery = self._accept_or_why(frame, cls, check_replay=check_replay)
        return None if isinstance(delivery, str) else delivery

    def _accept_or_why(
        self, frame: Frame, cls: type[Event] | None, *, check_replay: bool = True
    ) -> Delivery[Any] | str:
        """Like :meth:`_accept`, but a rejected frame gives the reason (``"<ErrorName>: <message>"``)."""
        env: Envelope | None = None
        try:
            env = self.codec.unpack(frame.data, subject=frame.subject)
            event = self.codec.decode(env, subject=frame.subject)
            if cls is not None and type(event) is not cls:
                raise CodecError(f"expected {cls.spec.type}, got {env.type}", subject=frame.subject)
            self._authenticate(env, event, check_replay=check_replay)
        except (CodecError, AuthError) as exc:
            self.rejected[type(exc).__name__] += 1
            log.warning("event rejected", reason=type(exc).__name__, error=str(exc), subject=frame.subject,
                        source=env.src if env is not None else None, bytes=len(frame.data))
            return f"{type(exc).__name__}: {exc}"
        return Delivery(frame.subject, env, event, frame.reply or env.reply)

    def _authenticate(self, env: Envelope, event: Event, *, check_replay: bool = True) -> None:
        if self.security is Security.OFF:
            return
        if env.sig is None:
            if self.security is Security.STRICT and event.spec.signed:
                raise UnsignedEvent(f"unsigned {env.type} event in strict mode", event_id=env.id,
                                    source=env.src)
            return
        self.keyring.verify(env)
        if check_replay:
            self.replay.check(env)

    # -- request / reply --------------------------------------------------------------------------------
    async def request(self, event: Event, *, timeout: float = 5.0, trace: str | None = None) -> Delivery[Any]:
        """Publish ``event`` and wait for the first valid reply event."""
        subject = event.subject()
        if self.transport.capabilities.native_reply:
            env = self.envelope(event, trace=trace)
            frame = await self.transport.request(subject, self.codec.pack(env), timeout=timeout)
            delivery = self._accept(frame, None)
            if delivery is None:
                raise BusError(f"invalid reply to {env.type} on {subject!r} (see the log)")
            return delivery
        await self._ensure_inbox()
        reply_to = f"{self._inbox_prefix}.{next(self._inbox_seq)}"
        future: asyncio.Future[Delivery[Any]] = asyncio.get_running_loop().create_future()
        self._inbox_waiters[reply_to] = future
        try:
            await self.transport.publish(subject, self.codec.pack(self.envelope(event, trace=trace,
                                                                                reply=reply_to)))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimeout(subject, timeout) from None
        finally:
            self._inbox_waiters.pop(reply_to, None)

    async def respond(self, to: Delivery[Any], event: Event) -> None:
        """Answer a request delivery; the reply keeps the request's trace id."""
        if to.reply is None:
            raise BusError(f"{to.envelope.type} event {to.envelope.id} asked for no reply")
        env = self.envelope(event, trace=to.envelope.trace or to.envelope.id)
        await self.transport.publish(to.reply, self.codec.pack(env))

    async def _ensure_inbox(self) -> None:
        if self._inbox_task is not None:
            return
        sub = await self.transport.subscribe(f"{self._inbox_prefix}.*", max_pending=256)
        self._inbox_task = asyncio.get_running_loop().create_task(self._read_inbox(sub))

    async def _read_inbox(self, sub: Subscription) -> None:
        async with sub:
            async for frame in sub:
                future = self._inbox_waiters.get(frame.subject)
                delivery = self._accept(frame, None)
                if future is not None and delivery is not None and not future.done():
                    future.set_result(delivery)
