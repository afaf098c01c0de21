"""The JetStream event log: one stream per event domain, acknowledged publishes, durable consumers, replay.

A stream ``FEDBUS_<DOMAIN>`` holds exactly the event types of that domain declared ``durable=True`` (subjects
from ``Event.pattern()``), except the types with a stream of their own (:data:`fedbus.bus.limits.OWN_STREAMS`).
A publish carries ``Nats-Msg-Id`` = envelope id and returns once the broker stored it; it is retried with the
same id across a broker restart, and the stream's duplicate window makes the retry a no-op. A publish assumes
its stream exists (a publisher may not be allowed to look streams up); only when no stream answers is the
stream ensured: looked up, and created with its limits when this credential may (see :mod:`._js_provision`).
:meth:`JetStreamEventLog.publish_many` keeps a window of acks in flight instead of awaiting each (its acks
come back through :class:`~._js_acks.AckInbox`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from . import subjects
from ._js_consumer import JetStreamConsumer, stored_ns
from ._js_errors import mapped, retriable, translate
from ._js_provision import ensure_event_stream
from ._js_pull import Puller, ephemeral
from ._store_base import EventLogBase, require_durable
from .codec import Envelope
from .errors import ConfigError, NotFound, PublishTimeout, StoreError, TransportError
from .events import Event
from .limits import durable_streams, stream_of
from .stores import ConsumerStats, PublishAck, RejectHook, StoredEvent, StreamStats, patterns_overlap, stored_event

if TYPE_CHECKING:
    from .jetstream import JetStream

log = structlog.get_logger("fedbus.bus.jetstream")
E = TypeVar("E", bound=Event)

_MSG_ID = "Nats-Msg-Id"


class _Out(NamedTuple):
    """A frame to store: its event type (which says its stream), subject, bytes and deduplication id."""

    cls: type[Event]
    subject: str
    data: bytes
    msg_id: str


def _within(inner: str, outer: str) -> bool:
    """Whether every subject matching pattern ``inner`` also matches pattern ``outer``."""
    ti, to = inner.split("."), outer.split(".")
    for i, o in enumerate(to):
        if o == ">":
            return len(ti) > i
        if i >= len(ti) or ti[i] == ">" or (o != "*" and ti[i] != o):
            return False
    return len(ti) == len(to)


def _rfc3339_ns(time_ns: int) -> str:
    seconds, fraction = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:09d}Z"


async def stream_stats(js: JetStreamContext) -> list[StreamStats]:
    """Every stream on the account (events, buckets, objects) with its consumers, sorted by name."""
    out = []
    with mapped():
        for info in await js.streams_info():
            name = info.config.name or "?"
            consumers = tuple(_consumer_stats(c) for c in sorted(
                await js.consumers_info(name), key=lambda c: c.name))
            state = info.state
            config = info.config
            out.append(StreamStats(
                name=name, subjects=tuple(config.subjects or ()), messages=state.messages,
                bytes=state.bytes, first_seq=state.first_seq, last_seq=state.last_seq,
                replicas=config.num_replicas or 1, consumers=consumers,
                max_bytes=config.max_bytes if config.max_bytes is not None else -1,
                max_msgs=config.max_msgs if config.max_msgs is not None else -1, max_age=config.max_age or 0.0,
                max_msg_size=config.max_msg_size if config.max_msg_size is not None else -1,
                discard=str(getattr(config.discard, "value", config.discard) or "old"),
            ))
    return sorted(out, key=lambda s: s.name)


def _consumer_stats(c: api.ConsumerInfo) -> ConsumerStats:
    return ConsumerStats(
        name=c.name, pending=c.num_pending or 0, ack_pending=c.num_ack_pending or 0,
        redelivered=c.num_redelivered or 0, delivered_seq=c.delivered.stream_seq if c.delivered else 0,
        ack_floor=c.ack_floor.stream_seq if c.ack_floor else 0, ack_wait=c.config.ack_wait or 0.0,
        max_deliver=c.config.max_deliver if c.config.max_deliver is not None else -1,
    )


class JetStreamEventLog(EventLogBase):
    """:class:`~fedbus.bus.stores.EventLog` on JetStream: one stream per event domain."""

    def __init__(self, owner: JetStream) -> None:
        self.owner = owner
        self.bus = owner.bus
        self._ensured: set[type[Event]] = set()
        self._missing: set[type[Event]] = set()
        """Types whose stream did not answer a publish: ensured before the next try."""

    # -- streams ----------------------------------------------------------------------------------------
    async def ensure(self, *classes: type[Event]) -> None:
        """Make sure the streams of these durable event types (all durable ones if none given) exist and
        store them: looked up first, created with their limits or extended only when needed. Raises
        :class:`~fedbus.bus.limits.StoreMissing` when a stream is missing and this credential may not
        create it (only ``fedbus up`` does, in secure mode)."""
        chosen = classes or tuple(c for c in self.bus.codec.catalogue if c.spec.durable)
        for cls in chosen:
            require_durable(cls)
        for name, patterns in durable_streams(chosen).items():
            await self.owner.retrying("ensure stream", functools.partial(self._ensure_stream, name, set(patterns)))
        self._ensured.update(chosen)
        self._missing.difference_update(chosen)

    async def _ensure_stream(self, name: str, patterns: set[str], _timeout: float) -> None:
        await ensure_event_stream(self.owner, name, patterns)

    # -- publishing (publish and publish_envelope: EventLogBase) ----------------------------------------
    async def _publish_frame(self, cls: type[Event], subject: str, frame: bytes, msg_id: str) -> PublishAck:
        """Store ``frame`` once and wait for the ack. The stream is assumed to exist (no lookup, which a
        publisher may not be permitted); when the broker says there is none, it is ensured, then the frame
        sent again with the same id."""
        require_durable(cls)
        store = stream_of(cls)

        async def attempt(timeout: float) -> api.PubAck:
            if cls in self._missing:  # no stream answered the last try (new, deleted, or not extended yet)
                await ensure_event_stream(self.owner, store, {cls.pattern()})
                self._missing.discard(cls)
                self._ensured.add(cls)
            try:
                return await self.owner.js.publish(subject, frame, timeout=timeout, headers={_MSG_ID: msg_id})
            except nats.js.errors.NoStreamResponseError:
                self._missing.add(cls)
                raise

        ack = await self.owner.retrying("publish", attempt, store=store, subject=subject)
        return PublishAck(ack.stream, ack.seq, bool(ack.duplicate))

    async def publish_many(self, events: Iterable[Event], *, trace: str | None = None) -> list[Envelope]:
        """Publish many events with up to ``publish_window`` acks in flight; returns once all are stored.

        Events that the broker did not acknowledge (a restart mid-batch) are sent again with the same ids, so
        none is lost or stored twice; their order in the stream may then differ from the order given.
        """
        items = [(event, self.bus.envelope(event, trace=trace)) for event in events]
        classes = {type(event) for event, _ in items}
        for cls in classes:
            require_durable(cls)
        frames = [_Out(type(event), event.subject(), self.bus.codec.pack(env), env.id) for event, env in items]
        await self._publish_frames(frames, classes)
        return [env for _, env in items]

    async def _publish_frames(self, frames: list[_Out], classes: set[type[Event]]) -> list[PublishAck]:
        loop = asyncio.get_running_loop()
        acks: list[PublishAck | None] = [None] * len(frames)
        todo = list(range(len(frames)))
        last_progress = loop.time()
        delay = 0.05
        while todo:
            before = len(todo)
            if self._missing & classes:  # a stream did not answer in the last round
                await self.ensure(*(self._missing & classes))
            todo = sorted(await self._publish_round(frames, todo, acks))  # retried in the order given
            if not todo:
                break
            now = loop.time()
            if len(todo) < before:
                last_progress, delay = now, 0.05
            elif now - last_progress > self.owner.options.publish_timeout:
                raise PublishTimeout(f"{len(todo)} of {len(frames)} events not acknowledged within "
                                     f"{self.owner.options.publish_timeout:g}s")
            self.owner.retries += len(todo)
            log.debug("re-publishing unacknowledged events", count=len(todo))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return [ack for ack in acks if ack is not None]

    async def _publish_round(self, frames: list[_Out], todo: list[int],
                             acks: list[PublishAck | None]) -> list[int]:
        """One pass over ``todo`` with a window of acks in flight; returns the indices to send again."""
        inbox, opts = self.owner.acks, self.owner.options
        in_flight: dict[asyncio.Future[api.PubAck], int] = {}
        retry: list[int] = []
        stalled = False

        async def settle() -> None:
            nonlocal stalled
            done, _ = await asyncio.wait(in_flight, timeout=opts.api_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:  # nothing acknowledged for api_timeout: the broker is away
                stalled = True
                for future, index in in_flight.items():
                    future.cancel()
                    retry.append(index)
                in_flight.clear()
                return
            for future in done:
                index = in_flight.pop(future)
                exc = future.exception()
                if exc is None:
                    ack = future.result()
                    acks[index] = PublishAck(ack.stream, ack.seq, bool(ack.duplicate))
                elif retriable(exc):
                    retry.append(index)
                    if isinstance(exc, nats.js.errors.NoStreamResponseError):
                        self._missing.add(frames[index].cls)  # ensured before the next round
                else:
                    for other in in_flight:
                        other.cancel()
                    raise translate(exc, store=stream_of(frames[index].cls)) from exc

        for position, index in enumerate(todo):
            while len(in_flight) >= opts.publish_window and not stalled:
                await settle()
            if stalled:
                retry.extend(todo[position:])
                break
            out = frames[index]
            try:
                in_flight[await inbox.publish(out.subject, out.data, headers={_MSG_ID: out.msg_id})] = index
            except Exception as exc:
                if not retriable(exc):
                    raise translate(exc) from exc
                retry.extend(todo[position:])
                break
        while in_flight:
            await settle()
        return retry

    # -- consuming --------------------------------------------------------------------------------------
    def consume(
        self, cls: type[E], *, durable: str, key: str = "*", ack_wait: float = 30.0, max_deliver: int = -1,
        max_ack_pending: int = 1000, batch: int = 16, on_reject: RejectHook | None = None,
    ) -> JetStreamConsumer[E]:
        """A durable pull consumer of ``cls`` events; several processes with the same ``durable`` name share
        the work. ``batch`` events are fetched at a time (their leases start when fetched)."""
        subjects.validate_token(durable, what="consumer name")
        require_durable(cls)
        config = api.ConsumerConfig(
            name=durable, durable_name=durable, filter_subject=cls.pattern(key),
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver,
            max_ack_pending=max_ack_pending, deliver_policy=api.DeliverPolicy.ALL,
        )
        return JetStreamConsumer(self, cls, config, batch=max(batch, 1), on_reject=on_reject)

    # -- reading back -----------------------------------------------------------------------------------
    async def replay(
        self, pattern: str, *, start_seq: int | None = None, start_time_ns: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Stored events matching ``pattern`` from a sequence or a time (default: the start), stream by
        stream, up to each stream's end as it was when its replay began. Bad frames come with ``error``."""
        subjects.validate_pattern(pattern)
        if start_seq is not None and start_time_ns is not None:
            raise ConfigError("give a start sequence or a start time, not both", key="start")
        if start_seq is not None:
            policy: dict[str, Any] = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                                      "opt_start_seq": max(start_seq, 1)}
        elif start_time_ns is not None:
            policy = {"deliver_policy": api.DeliverPolicy.BY_START_TIME,
                      "opt_start_time": _rfc3339_ns(start_time_ns)}
        else:
            policy = {"deliver_policy": api.DeliverPolicy.ALL}
        infos = await self.owner.retrying("list streams", lambda _timeout: self.owner.js.streams_info())
        chosen = sorted((i.config.name or "", list(i.config.subjects or ())) for i in infos
                        if any(patterns_overlap(pattern, s) for s in (i.config.subjects or ())))
        if not chosen:
            raise NotFound(f"no stream stores {pattern!r}")
        for stream, stream_subjects in chosen:
            # The server filters when the pattern lies within the stream's subjects; otherwise we do.
            inside = any(_within(pattern, s) for s in stream_subjects)
            async for msg in self._read_stream(stream, pattern if inside else None, policy):
                if not subjects.matches(pattern, msg.subject):
                    continue
                yield stored_event(self.bus, msg.metadata.sequence.stream, msg.subject, msg.data,
                                   stored_ns(msg))

    async def _read_stream(
        self, stream: str, filter_subject: str | None, policy: dict[str, Any]
    ) -> AsyncIterator[Msg]:
        """A stream's messages up to its end as it was when the read began. When the stream's leader moves
        mid-read (a node died), the read resumes after the last message it got, for up to
        ``publish_timeout`` seconds, instead of failing the caller."""
        loop = asyncio.get_running_loop()
        remaining: int | None = None
        next_seq: int | None = None
        deadline = loop.time() + self.owner.options.publish_timeout
        delay = 0.05
        while remaining is None or remaining > 0:
            if next_seq is not None:
                policy = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": next_seq}
            try:
                async with Puller(self.owner, stream, ephemeral(filter_subject, **policy), window=128,
                                  max_bytes=self.bus.codec.limits.max_frame_bytes) as puller:
                    if remaining is None:
                        remaining = puller.pending
                    async for msg in puller.messages(min(remaining, puller.pending)):
                        remaining -= 1
                        next_seq = msg.metadata.sequence.stream + 1
                        yield msg
                    if puller.pending < remaining:  # the stream shrank (limits, purge): nothing more to read
                        return
            except NotFound:
                raise
            except (StoreError, TransportError) as exc:
                if loop.time() + delay >= deadline:
                    raise
                log.info("replay interrupted; resuming", stream=stream, next_seq=next_seq, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def streams(self) -> list[StreamStats]:
        """Every stream with its counts and consumers."""
        return await self.owner.streams()
