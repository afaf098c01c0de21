"""The JetStream event log: one stream per event domain, acknowledged publishes, durable consumers, replay.

A stream ``FEDBUS_<DOMAIN>`` holds exactly the event types of that domain declared ``durable=True`` (subjects
from ``Event.pattern()``). A publish carries ``Nats-Msg-Id`` = envelope id and returns once the broker stored
it; it is retried with the same id across a broker restart, and the stream's duplicate window makes the retry
a no-op. :meth:`JetStreamEventLog.publish_many` keeps a window of acks in flight instead of awaiting each.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from . import subjects
from ._js_consumer import JetStreamConsumer, stored_ns
from ._js_errors import mapped, retriable, translate
from ._js_pull import Puller, ephemeral
from ._store_base import EventLogBase, require_durable
from .codec import Envelope
from .errors import ConfigError, NotFound, PublishTimeout, StoreError, TransportError
from .events import Event
from .stores import ConsumerStats, PublishAck, StoredEvent, StreamStats, patterns_overlap, stored_event, stream_name

if TYPE_CHECKING:
    from .jetstream import JetStream

log = structlog.get_logger("fedbus.bus.jetstream")
E = TypeVar("E", bound=Event)

_MSG_ID = "Nats-Msg-Id"


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
            out.append(StreamStats(
                name=name, subjects=tuple(info.config.subjects or ()), messages=state.messages,
                bytes=state.bytes, first_seq=state.first_seq, last_seq=state.last_seq,
                replicas=info.config.num_replicas or 1, consumers=consumers,
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

    # -- streams ----------------------------------------------------------------------------------------
    async def ensure(self, *classes: type[Event]) -> None:
        """Create (or extend) the streams of these durable event types (all durable ones if none given)."""
        chosen = classes or tuple(c for c in self.bus.codec.catalogue if c.spec.durable)
        by_stream: dict[str, set[str]] = {}
        for cls in chosen:
            require_durable(cls)
            by_stream.setdefault(stream_name(cls.spec.domain), set()).add(cls.pattern())
        for name, patterns in by_stream.items():
            await self.owner.retrying("ensure stream", functools.partial(self._ensure_stream, name, patterns))
        self._ensured.update(chosen)

    async def _ensure_stream(self, name: str, patterns: set[str], _timeout: float) -> None:
        js, opts = self.owner.js, self.owner.options
        for _ in range(5):  # another agent may be extending the same stream: re-read and merge
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                config = api.StreamConfig(
                    name=name, subjects=sorted(patterns), storage=opts.storage_type,
                    num_replicas=opts.replicas,
                    duplicate_window=opts.duplicate_window, max_age=opts.max_age,
                    max_msg_size=self.bus.codec.limits.max_frame_bytes, discard=api.DiscardPolicy.OLD,
                    retention=api.RetentionPolicy.LIMITS,
                )
                try:
                    await js.add_stream(config)
                    return
                except nats.js.errors.BadRequestError:
                    continue  # created meanwhile, with other subjects: merge on the next pass
            have = set(info.config.subjects or ())
            if patterns <= have:
                return
            info.config.subjects = sorted(have | patterns)
            await js.update_stream(info.config)
        raise StoreError(f"could not extend stream {name} with {sorted(patterns)}")

    # -- publishing (publish and publish_envelope: EventLogBase) ----------------------------------------
    async def _publish(self, event: Event, env: Envelope) -> PublishAck:
        cls = type(event)
        if cls not in self._ensured:
            await self.ensure(cls)
        subject, frame = event.subject(), self.bus.codec.pack(env)

        async def attempt(timeout: float) -> api.PubAck:
            if cls not in self._ensured:  # the stream vanished (deleted, or a broker without its data)
                await self._ensure_stream(stream_name(cls.spec.domain), {cls.pattern()}, timeout)
                self._ensured.add(cls)
            try:
                return await self.owner.js.publish(subject, frame, timeout=timeout, headers={_MSG_ID: env.id})
            except nats.js.errors.NoStreamResponseError:
                self._ensured.discard(cls)
                raise

        ack = await self.owner.retrying("publish", attempt)
        return PublishAck(ack.stream, ack.seq, bool(ack.duplicate))

    async def publish_many(self, events: Iterable[Event], *, trace: str | None = None) -> list[Envelope]:
        """Publish many events with up to ``publish_window`` acks in flight; returns once all are stored.

        Events that the broker did not acknowledge (a restart mid-batch) are sent again with the same ids, so
        none is lost or stored twice; their order in the stream may then differ from the order given.
        """
        items = [(event, self.bus.envelope(event, trace=trace)) for event in events]
        classes = {type(event) for event, _ in items}
        frames = [(event.subject(), self.bus.codec.pack(env), env.id) for event, env in items]
        await self._publish_frames(frames, classes)
        return [env for _, env in items]

    async def _publish_frames(
        self, frames: list[tuple[str, bytes, str]], classes: set[type[Event]]
    ) -> list[PublishAck]:
        loop = asyncio.get_running_loop()
        acks: list[PublishAck | None] = [None] * len(frames)
        todo = list(range(len(frames)))
        last_progress = loop.time()
        delay = 0.05
        while todo:
            before = len(todo)
            if classes - self._ensured:  # first round, or a stream vanished in the last one
                await self.ensure(*classes)
            todo = await self._publish_round(frames, todo, acks)
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

    async def _publish_round(self, frames: list[tuple[str, bytes, str]], todo: list[int],
                             acks: list[PublishAck | None]) -> list[int]:
        """One pass over ``todo`` with a window of acks in flight; returns the indices to send again."""
        js, opts = self.owner.js, self.owner.options
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
                        self._ensured.clear()  # re-created before the next round
                else:
                    for other in in_flight:
                        other.cancel()
                    raise translate(exc) from exc

        for position, index in enumerate(todo):
            while len(in_flight) >= opts.publish_window and not stalled:
                await settle()
            if stalled:
                retry.extend(todo[position:])
                break
            subject, frame, msg_id = frames[index]
            try:
                in_flight[await js.publish_async(subject, frame, headers={_MSG_ID: msg_id})] = index
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
        max_ack_pending: int = 1000, batch: int = 16,
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
        return JetStreamConsumer(self, cls, config, batch=max(batch, 1))

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
