"""The in-memory event log: streams with JetStream's limits, durable consumers with leases, replay.

One :class:`_Stream` per stream name, shared by every bus on the same memory broker through the
:class:`~fedbus.bus.memstores.MemoryHub`. A stream keeps JetStream's rules where they are cheap: deduplication
by envelope id within a window; ``max_msg_size``, ``max_msgs``, ``max_bytes``, ``max_msgs_per_subject`` and
``max_age`` with the stream's discard policy (``new`` refuses the write with
:class:`~fedbus.bus.limits.LimitExceeded`, ``old`` evicts the oldest); sequences never reused, gaps where
messages were evicted.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import subjects
from ._store_base import ConsumerBase, EventLogBase, require_durable
from .codec import Envelope
from .errors import ClosedError, NotFound
from .events import Event
from .limits import LimitExceeded, StreamLimits, durable_streams, stream_of
from .stores import (
    ConsumerStats,
    PublishAck,
    RejectHook,
    StoredEvent,
    StreamStats,
    accept_stored_or_why,
    patterns_overlap,
    stored_event,
)
from .transport import Frame, Subscription

if TYPE_CHECKING:
    from .client import Bus
    from .memstores import MemoryHub

E = TypeVar("E", bound=Event)


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
    """A stream's messages by sequence (in order, with gaps where limits evicted some) and its limits."""

    def __init__(self, name: str, *, duplicate_window: float, limits: StreamLimits, max_frame: int) -> None:
        self.name = name
        self.patterns: list[str] = []
        self.limits = limits
        self.max_msg_size = min(limits.max_msg_size, max_frame)
        self._by_seq: dict[int, _Message] = {}
        self._seqs: list[int] = []  # sorted: the sequences held
        self._per_subject: dict[str, int] = {}
        self.bytes = 0
        self.last_seq = 0
        self.duplicate_window_ns = int(duplicate_window * 1e9)
        self._ids: dict[str, tuple[int, int]] = {}  # envelope id -> (seq, stored at)
        self.changed = _Waiters()
        self.consumers: dict[str, _ConsumerState] = {}

    # -- reading ----------------------------------------------------------------------------------------
    def get(self, seq: int) -> _Message | None:
        return self._by_seq.get(seq)

    def after(self, seq: int) -> Iterable[_Message]:
        """Messages with a sequence ≥ ``seq``, in order (a snapshot: safe while appending)."""
        start = bisect.bisect_left(self._seqs, seq)
        return [self._by_seq[s] for s in self._seqs[start:]]

    # -- writing ----------------------------------------------------------------------------------------
    def append(self, subject: str, data: bytes, *, msg_id: str | None) -> PublishAck:
        """Store a frame under the stream's limits; :class:`LimitExceeded` when they refuse it."""
        now = time.time_ns()
        if msg_id is not None:
            self._forget_ids(now)
            seen = self._ids.get(msg_id)
            if seen is not None:
                return PublishAck(self.name, seen[0], duplicate=True)
        if len(data) > self.max_msg_size:
            raise LimitExceeded(self.name, "message size exceeds maximum allowed", size=len(data),
                                limit=self.max_msg_size)
        self._expire(now)
        self._make_room(subject, len(data))
        self.last_seq += 1
        seq = self.last_seq
        self._by_seq[seq] = _Message(seq, subject, bytes(data), now)
        self._seqs.append(seq)
        self._per_subject[subject] = self._per_subject.get(subject, 0) + 1
        self.bytes += len(data)
        if msg_id is not None:
            self._ids[msg_id] = (seq, now)
        self.changed.notify()
        return PublishAck(self.name, seq)

    def _make_room(self, subject: str, size: int) -> None:
        lim = self.limits
        if 0 < lim.max_msgs_per_subject <= self._per_subject.get(subject, 0):
            if lim.discard_new_per_subject:
                raise LimitExceeded(self.name, "maximum messages per subject exceeded")
            self._remove(next(s for s in self._seqs if self._by_seq[s].subject == subject))
        new = lim.discard == "new"
        while self._seqs and ((0 < lim.max_msgs <= len(self._seqs)) or self.bytes + size > lim.max_bytes):
            if new:
                what = "messages" if 0 < lim.max_msgs <= len(self._seqs) else "bytes"
                raise LimitExceeded(self.name, f"maximum {what} exceeded")
            self._remove(self._seqs[0])
        if size > lim.max_bytes:
            raise LimitExceeded(self.name, "maximum bytes exceeded", size=size, limit=lim.max_bytes)

    def _expire(self, now: int) -> None:
        if self.limits.max_age <= 0:
            return
        horizon = now - int(self.limits.max_age * 1e9)
        while self._seqs and self._by_seq[self._seqs[0]].time_ns < horizon:
            self._remove(self._seqs[0])

    def _remove(self, seq: int) -> None:
        msg = self._by_seq.pop(seq)
        self._seqs.pop(bisect.bisect_left(self._seqs, seq))
        self.bytes -= len(msg.data)
        left = self._per_subject[msg.subject] - 1
        if left:
            self._per_subject[msg.subject] = left
        else:
            del self._per_subject[msg.subject]

    def _forget_ids(self, now: int) -> None:
        horizon = now - self.duplicate_window_ns
        while self._ids:
            oldest = next(iter(self._ids))  # dicts keep insertion order: oldest first
            if self._ids[oldest][1] >= horizon:
                return
            del self._ids[oldest]

    def stats(self) -> StreamStats:
        lim = self.limits
        return StreamStats(
            name=self.name, subjects=tuple(self.patterns), messages=len(self._seqs), bytes=self.bytes,
            first_seq=self._seqs[0] if self._seqs else 0, last_seq=self.last_seq,
            consumers=tuple(c.stats(self) for _, c in sorted(self.consumers.items())),
            max_bytes=lim.max_bytes, max_msgs=lim.max_msgs, max_age=lim.max_age, max_msg_size=self.max_msg_size,
            discard=lim.discard,
        )


class _Capture(Subscription):
    """Sits on the memory broker like JetStream's interest in a stream's subjects: stores core publishes
    (silently dropping what the limits refuse, as JetStream does for a publish that asks for no ack)."""

    def __init__(self, hub: MemoryHub, stream: _Stream, pattern: str) -> None:
        super().__init__(pattern, max_pending=1)
        self._hub = hub
        self._stream = stream

    def deliver(self, frame: Frame) -> bool:
        if frame is not self._hub.publishing:  # the event log stores its own publishes, with their ids
            try:
                self._stream.append(frame.subject, frame.data, msg_id=None)
            except LimitExceeded:
                pass
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
    next_seq: int = 1
    leases: dict[int, _Lease] = field(default_factory=dict)
    delivered_seq: int = 0

    def take(self, stream: _Stream) -> tuple[_Message, int] | float | None:
        """The next message to deliver and its delivery count, else when the next lease expires."""
        now = time.monotonic()
        for seq in sorted(s for s, lease in self.leases.items() if lease.deadline <= now):
            lease = self.leases[seq]
            msg = stream.get(seq)
            if msg is None or 0 < self.max_deliver <= lease.count:
                del self.leases[seq]  # evicted by the limits, or JetStream stops redelivering
                continue
            lease.count += 1
            lease.deadline = now + self.ack_wait
            return msg, lease.count
        if self.max_ack_pending <= 0 or len(self.leases) < self.max_ack_pending:
            for msg in stream.after(self.next_seq):
                self.next_seq = msg.seq + 1
                if subjects.matches(self.pattern, msg.subject):
                    self.leases[msg.seq] = _Lease(now + self.ack_wait, 1)
                    self.delivered_seq = msg.seq
                    return msg, 1
            self.next_seq = max(self.next_seq, stream.last_seq + 1)
        return min((lease.deadline for lease in self.leases.values()), default=None)

    def stats(self, stream: _Stream) -> ConsumerStats:
        pending = sum(1 for m in stream.after(self.next_seq) if subjects.matches(self.pattern, m.subject))
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
    def __init__(self, log_: MemoryEventLog, cls: type[E], state_args: dict[str, Any],
                 on_reject: RejectHook | None = None) -> None:
        super().__init__()
        self._log = log_
        self._cls = cls
        self._args = state_args
        self._on_reject = on_reject
        self._state: _ConsumerState | None = None
        self._stream: _Stream | None = None

    async def _open(self) -> tuple[_ConsumerState, _Stream]:
        if self._closed:
            raise ClosedError("consumer is closed")
        if self._state is None or self._stream is None:
            await self._log.ensure(self._cls)
            stream = self._log.hub.streams[stream_of(self._cls)]
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
                delivery = accept_stored_or_why(self._log.bus, msg.subject, msg.data, self._cls)
                if isinstance(delivery, str):
                    if self._on_reject is not None:  # kept (a dead letter) before it is dropped
                        await self._on_reject(msg.subject, msg.data, delivery, msg.seq)
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
        """Create (or extend) the streams of these durable event types (all durable ones if none given),
        with the hub's limits."""
        chosen = classes or tuple(c for c in self.bus.codec.catalogue if c.spec.durable)
        for cls in chosen:
            require_durable(cls)
        for name, patterns in durable_streams(chosen).items():
            stream = self.hub.streams.get(name)
            if stream is None:
                stream = self.hub.streams[name] = _Stream(
                    name, duplicate_window=self.duplicate_window, limits=self.hub.limits.stream(name),
                    max_frame=self.bus.codec.limits.max_frame_bytes)
            for pattern in patterns:
                if pattern not in stream.patterns:
                    stream.patterns.append(pattern)
                    self.hub.broker.attach(_Capture(self.hub, stream, pattern))

    async def publish_many(self, events: Iterable[Event], *, trace: str | None = None) -> list[Envelope]:
        """Publish many events; returns their envelopes once all are stored."""
        return [await self.publish(event, trace=trace) for event in events]

    async def _publish_frame(self, cls: type[Event], subject: str, frame: bytes, msg_id: str) -> PublishAck:
        await self.ensure(cls)
        ack = self.hub.streams[stream_of(cls)].append(subject, frame, msg_id=msg_id)
        out = Frame(subject, frame)
        self.hub.publishing = out
        try:
            self.hub.broker.route(out)
        finally:
            self.hub.publishing = None
        await asyncio.sleep(0)
        return ack

    def consume(
        self, cls: type[E], *, durable: str, key: str = "*", ack_wait: float = 30.0, max_deliver: int = -1,
        max_ack_pending: int = 1000, batch: int = 1, on_reject: RejectHook | None = None,
    ) -> _MemoryConsumer[E]:
        """A durable consumer; several with the same ``durable`` name share the work. (``batch`` is accepted
        for parity with JetStream; memory deliveries are taken one at a time, leased when taken.)"""
        subjects.validate_token(durable, what="consumer name")
        args = {"name": durable, "pattern": cls.pattern(key), "ack_wait": ack_wait,
                "max_deliver": max_deliver, "max_ack_pending": max_ack_pending}
        return _MemoryConsumer(self, cls, args, on_reject)

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
            for msg in stream.after(max(start_seq or 1, 1)):  # a snapshot: up to the end as of now
                if start_time_ns is not None and msg.time_ns < start_time_ns:
                    continue
                if subjects.matches(pattern, msg.subject):
                    yield stored_event(self.bus, msg.seq, msg.subject, msg.data, msg.time_ns)

    async def streams(self) -> list[StreamStats]:
        """Every stream with its counts and consumers."""
        return [s.stats() for _, s in sorted(self.hub.streams.items())]
