"""The bus inspector's loops: ``tail`` (every frame on a pattern), ``stats`` (rates per subject) and
``replay`` (a durable stream read back from a sequence or a time).

``tail`` and ``stats`` read raw frames from a :class:`~fedbus.bus.transport.Transport` subscription rather
than through a :class:`~fedbus.bus.client.Bus`, so that frames a bus would reject are shown too. Output goes
to callbacks or iterators; rendering is the command line's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from . import subjects
from .client import Bus
from .codec import Codec
from .errors import ClosedError, ConfigError, NotFound, SubjectError
from .render import format_time, frame_record
from .stores import StoredEvent
from .transport import Transport

__all__ = ["Snapshot", "SubjectRate", "replay", "stats", "tail"]


async def tail(
    transport: Transport,
    pattern: str,
    *,
    emit: Callable[[dict[str, Any]], None],
    codec: Codec | None = None,
    count: int | None = None,
    timeout: float | None = None,
    on_ready: Callable[[], None] | None = None,
    max_pending: int = 4096,
) -> int:
    """Emit a record for each frame on ``pattern`` until ``count`` frames or ``timeout`` seconds; returns
    how many were emitted. ``on_ready`` runs once the subscription is in place."""
    codec = codec or Codec()
    subjects.validate_pattern(pattern)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    shown = 0
    async with await transport.subscribe(pattern, max_pending=max_pending) as sub:
        if on_ready is not None:
            on_ready()
        while count is None or shown < count:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                frame = await sub.next(remaining)
            except (TimeoutError, ClosedError):
                break
            emit(frame_record(frame.subject, frame.data, codec))
            shown += 1
    return shown


@dataclass(frozen=True, slots=True)
class SubjectRate:
    subject: str
    msgs: int
    bytes: int
    msg_per_s: float
    bytes_per_s: float
    total_msgs: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Traffic seen during one interval, per subject (busiest first), and in total."""

    time_ns: int
    interval_s: float
    subjects: tuple[SubjectRate, ...]
    dropped: int

    @property
    def msgs(self) -> int:
        return sum(s.msgs for s in self.subjects)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.subjects)

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": format_time(self.time_ns),
            "interval_s": round(self.interval_s, 3),
            "msgs": self.msgs,
            "bytes": self.bytes,
            "msg_per_s": round(self.msgs / self.interval_s, 2),
            "bytes_per_s": round(self.bytes / self.interval_s, 1),
            "dropped": self.dropped,
            "subjects": [
                {"subject": s.subject, "msgs": s.msgs, "bytes": s.bytes, "msg_per_s": round(s.msg_per_s, 2),
                 "bytes_per_s": round(s.bytes_per_s, 1), "total_msgs": s.total_msgs,
                 "total_bytes": s.total_bytes}
                for s in self.subjects
            ],
        }


@dataclass
class _Counters:
    window: dict[str, list[int]] = field(default_factory=dict)
    total: dict[str, list[int]] = field(default_factory=dict)

    def add(self, subject: str, size: int) -> None:
        for table in (self.window, self.total):
            cell = table.setdefault(subject, [0, 0])
            cell[0] += 1
            cell[1] += size

    def snapshot(self, elapsed: float, dropped: int) -> Snapshot:
        elapsed = max(elapsed, 1e-9)
        rates = tuple(sorted(
            (SubjectRate(subject, m, b, m / elapsed, b / elapsed, *self.total[subject])
             for subject, (m, b) in self.window.items()),
            key=lambda r: (-r.msgs, r.subject),
        ))
        self.window = {}
        return Snapshot(time.time_ns(), elapsed, rates, dropped)


async def stats(
    transport: Transport,
    pattern: str,
    *,
    emit: Callable[[Snapshot], None],
    interval: float = 1.0,
    count: int | None = None,
    on_ready: Callable[[], None] | None = None,
    max_pending: int = 65536,
) -> int:
    """Emit a :class:`Snapshot` of message and byte rates per subject every ``interval`` seconds, ``count``
    times (forever when ``None``); returns the number of snapshots."""
    subjects.validate_pattern(pattern)
    counters = _Counters()
    loop = asyncio.get_running_loop()
    sub = await transport.subscribe(pattern, max_pending=max_pending)

    async def count_frames() -> None:
        async for frame in sub:
            counters.add(frame.subject, len(frame.data))

    emitted = 0
    async with asyncio.TaskGroup() as tg:
        tg.create_task(count_frames())
        try:
            if on_ready is not None:
                on_ready()
            started = last = loop.time()
            while count is None or emitted < count:
                await asyncio.sleep(max(started + (emitted + 1) * interval - loop.time(), 0))
                await asyncio.sleep(0)  # let the counter take what is already queued
                now = loop.time()
                emit(counters.snapshot(now - last, sub.dropped))
                last = now
                emitted += 1
        finally:
            await sub.unsubscribe()
    return emitted


async def _stream_patterns(bus: Bus, target: str) -> list[str]:
    """The subject patterns to replay for a stream name or a subject pattern."""
    from .jetstream import JetStream

    if "." in target or target in ("*", ">"):
        return [subjects.validate_pattern(target)]
    for stream in await JetStream(bus).streams():
        if stream.name == target:
            try:
                return [subjects.validate_pattern(s) for s in stream.subjects]
            except SubjectError:
                raise ConfigError(f"stream {target!r} holds no fedbus events ({', '.join(stream.subjects)})",
                                  key="stream") from None
    raise NotFound(f"no stream named {target!r}")


async def replay(
    bus: Bus, target: str, *, start_seq: int | None = None, start_time_ns: int | None = None
) -> AsyncGenerator[StoredEvent, None]:
    """Stored events of a stream (by name) or of a subject pattern, from a sequence or a time (default: the
    start) up to the end, in stream order. ``bus`` must be on NATS; close the iterator when done early."""
    from .jetstream import JetStream

    log = JetStream(bus).event_log()
    patterns = await _stream_patterns(bus, target)
    async with contextlib.AsyncExitStack() as stack:
        # A stream of several event types: one reader per type, merged back into stream order.
        readers = []
        for pattern in patterns:
            reader = log.replay(pattern, start_seq=start_seq, start_time_ns=start_time_ns)
            readers.append(await stack.enter_async_context(
                contextlib.aclosing(cast(AsyncGenerator[StoredEvent, None], reader))))
        heads: dict[int, StoredEvent] = {}
        for i, reader in enumerate(readers):
            if (first := await anext(reader, None)) is not None:
                heads[i] = first
        while heads:
            i = min(heads, key=lambda k: heads[k].seq)
            yield heads[i]
            if (following := await anext(readers[i], None)) is None:
                del heads[i]
            else:
                heads[i] = following
