"""The MQTT session engine under both the edge SDK and ``fedbus.bus.mqtt_transport``: one aiomqtt 2.x
connection (MQTT 3.1.1, QoS 1) kept alive across broker restarts.

What it does, so that neither caller has to:

* **Reconnect** with jittered exponential backoff, forever once it has connected; the first connect fails
  after ``initial_attempts`` with :class:`ConnectFailed`.
* **Resubscribe** on every reconnect, keeping a *minimal* set of broker filters: a filter covered by another
  one is not sent to the broker (nats-server delivers one copy per overlapping subscription, Mosquitto one
  per client; with no overlap both deliver once). Messages are routed to every local route that matches.
* **Buffer publishes** made while disconnected (bounded by count and bytes; overflow → :class:`BufferFull`)
  and send them, in publish order, before anything new once the connection is back. A publish in flight when
  the connection drops is put back in the buffer (at-least-once, as QoS 1).
* **Birth and will**: messages sent first on every connect (an "online" status) and a last will set on every
  CONNECT (an "offline" status), both rebuilt per connection so their times are fresh.
* **Persistent sessions** (``clean_session=False``, stable client id): messages the broker queued while we
  were offline can arrive before the caller re-adds its routes; up to ``max_orphans`` of them are held and
  handed to the first route that matches.

The link moves bytes on MQTT topics; it knows nothing of envelopes or subjects. One task is owned per link
(the supervisor, cancelled and awaited by :meth:`close`); each connection runs its reader and its set-up in
an ``asyncio.TaskGroup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote, urlsplit

import aiomqtt

from .errors import BufferFull, ConnectFailed, LinkClosed, LinkError, PublishFailed, SubscribeFailed
from .topics import PREFIX, filter_covers, shared_filter, split_shared, topic_matches

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["Deliver", "LinkOptions", "MqttLink", "Route", "Will", "minimal_cover", "parse_url"]

log = logging.getLogger("fedbus.edge.link")

#: Called by the reader, in arrival order, for each message a route matches: ``(topic, payload, retain)``.
#: It must not block; exceptions are logged and swallowed so one bad route cannot stop the reader.
Deliver = Callable[[str, bytes, bool], None]


@dataclass(frozen=True, slots=True)
class Will:
    """A last will: published by the broker when the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkOptions:
    """Connection settings for an :class:`MqttLink`."""

    client_id: str
    """Stable across restarts, so that a persistent session is resumed."""
    clean_session: bool = False
    keepalive: int = 60
    qos: int = 1
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    """For ``mqtts://``: e.g. ``ssl.create_default_context(cafile="ca.pem")`` with the deployment's CA (from
    the creds file); without one the system's CAs are trusted."""
    connect_timeout: float = 5.0
    publish_timeout: float = 10.0
    """How long a QoS 1 publish waits for its PUBACK on a live connection."""
    initial_attempts: int = 3
    backoff_min: float = 0.05
    backoff_max: float = 5.0
    max_buffered: int = 10_000
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_incoming: int = 10_000
    """aiomqtt's incoming queue; the reader drains it without blocking."""
    max_orphans: int = 1_000
    drain_window: int = 32
    """Buffered publishes in flight at once while draining after a reconnect."""


@dataclass(eq=False, slots=True)
class Route:
    """A topic filter and where its messages go. ``group`` is set for shared (``$share/``) filters."""

    topic_filter: str
    deliver: Deliver
    group: str | None = None


@dataclass(slots=True)
class _Outgoing:
    seq: int
    topic: str
    payload: bytes
    retain: bool


class _Lost(Exception):
    """The connection went away (internal: triggers a reconnect)."""


class _CancelWatch:
    """Tells whether the current task was asked to cancel *during* an await that may have swallowed it.

    On Python 3.11, ``asyncio.wait_for`` (which aiomqtt awaits every acknowledgement with) returns the result
    instead of raising when a cancellation and the acknowledgement arrive together (gh-86296), so a loop that
    relies on the cancellation would run on. And ``Task.cancelling()`` alone cannot be trusted there: a 3.11
    TaskGroup whose child fails after the body finished cancels its parent without ``uncancel()``, so the
    count only grows. Hence: compare the count before and after the call.
    """

    __slots__ = ("before", "task")

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.before = self.task.cancelling() if self.task is not None else 0

    def requested(self) -> bool:
        return self.task is not None and self.task.cancelling() > self.before

    def reraise(self) -> None:
        if self.requested():
            raise asyncio.CancelledError


def parse_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """``mqtt://[user:pass@]host[:port]`` (or ``mqtts://``) → ``(host, port, tls, user, password)``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ConnectFailed("an MQTT URL is mqtt://host:port or mqtts://host:port", url=url)
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConnectFailed("invalid port", url=url) from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, tls, user, password


def minimal_cover(filters: Iterable[str]) -> list[str]:
    """The filters (first-seen order, no duplicates) that no *other* filter in the set covers."""
    unique = list(dict.fromkeys(filters))
    return [f for f in unique if not any(g != f and filter_covers(g, f) for g in unique)]


class MqttLink:
    """One MQTT client session (see the module docstring). ``async with`` it, or :meth:`start`/:meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        options: LinkOptions,
        will: Will | Callable[[], Will] | None = None,
        birth: Callable[[], Sequence[tuple[str, bytes, bool]]] | None = None,
    ) -> None:
        self.url = url
        self.options = options
        self._host, self._port, self._tls, user, password = parse_url(url)
        self._username = options.username or user
        self._password = options.password or password
        self._will = will
        self._birth = birth
        self._routes: list[Route] = []
        self._rr = itertools.count()
        self._subscribed: set[str] = set()
        self._sub_lock = asyncio.Lock()
        self._buffer: deque[_Outgoing] = deque()
        self._buffer_bytes = 0
        self._orphans: deque[tuple[str, bytes, bool]] = deque(maxlen=options.max_orphans)
        self._seq = itertools.count()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._lost: asyncio.Future[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._shared_ok: bool | None = None
        self._closed = False
        self.connections = 0
        self.unrouted = 0

    # -- state ------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Connected, resubscribed and done sending what was buffered."""
        return self._ready.is_set()

    @property
    def reconnects(self) -> int:
        """Connections made after the first one."""
        return max(self.connections - 1, 0)

    @property
    def buffered(self) -> int:
        """Publishes waiting for a connection."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosed(f"MQTT link {self.options.client_id} to {self.url} is closed")

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (retrying ``initial_attempts`` times), then keep the connection up in the background."""
        self._check_open()
        if self._task is not None:
            return
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"mqtt-link:{self.options.client_id}")
        try:
            await self._first
        except BaseException:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            raise

    async def close(self, *, timeout: float = 5.0) -> None:
        """Send what can be sent within ``timeout``, DISCONNECT (so no will is published). Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        if self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._buffer:
            log.warning("MQTT link closing with %d undelivered frames", len(self._buffer),
                        extra={"client_id": self.options.client_id, "url": self.url})
        task.cancel()
        # The graceful DISCONNECT waits up to connect_timeout; never wait on it for longer than that.
        _, pending = await asyncio.wait({task}, timeout=self.options.connect_timeout + 1.0)
        if pending:
            log.warning("MQTT link did not stop in time; cancelling again",
                        extra={"client_id": self.options.client_id, "url": self.url})
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("MQTT link ended with an error: %r", task.exception(),
                        extra={"client_id": self.options.client_id, "url": self.url})
        self._ready.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the connection loop ----------------------------------------------------------------------------
    def _new_client(self) -> aiomqtt.Client:
        opts = self.options
        will = self._will() if callable(self._will) else self._will
        client = aiomqtt.Client(
            self._host, self._port, identifier=opts.client_id, protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=opts.clean_session, keepalive=opts.keepalive, timeout=opts.connect_timeout,
            username=self._username, password=self._password,
            will=None if will is None else aiomqtt.Will(will.topic, will.payload, qos=opts.qos,
                                                        retain=will.retain),
            max_queued_incoming_messages=opts.max_incoming,
            tls_context=(opts.tls_context or ssl.create_default_context()) if self._tls else None,
        )
        client.pending_calls_threshold = 100_000  # we bound publishes ourselves; silence aiomqtt's warning
        return client

    def _backoff(self, attempt: int) -> float:
        opts = self.options
        return min(opts.backoff_max, opts.backoff_min * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)

    async def _supervise(self) -> None:
        attempt = 0
        reason = ""
        # Not ``while True``: aiomqtt's graceful exit can raise MqttError *instead of* the CancelledError
        # that close() sent, and that error is caught below, so the closed flag is what ends the loop.
        while not self._closed:
            try:
                async with self._new_client() as client:
                    attempt = 0
                    await self._serve(client)
            except* (aiomqtt.MqttError, _Lost, OSError, LinkError) as group:
                reason = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
            except* Exception as group:  # a bug must not silently end the link: log it and reconnect
                log.error("unexpected error in the MQTT connection loop", exc_info=group,
                          extra={"client_id": self.options.client_id, "url": self.url})
                reason = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
            if self._closed:
                return
            attempt += 1
            first = self._first
            if first is not None and not first.done() and attempt >= self.options.initial_attempts:
                first.set_exception(ConnectFailed(f"cannot connect after {attempt} attempts: {reason}", url=self.url))
                return
            delay = self._backoff(attempt)
            log.warning("MQTT connection lost or refused (%s); retrying in %.2fs", reason, delay,
                        extra={"client_id": self.options.client_id, "url": self.url, "attempt": attempt})
            await asyncio.sleep(delay)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._lost = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(client), name=f"mqtt-reader:{self.options.client_id}")
                await self._setup(client)
        finally:
            self._client = None
            self._ready.clear()
            if not self._lost.done():
                self._lost.set_result(None)

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                self._on_message(message.topic.value, message.payload, message.retain)
        except aiomqtt.MqttError as exc:
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(None)  # wake publishes waiting for a PUBACK that will not come
            raise _Lost(f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)) from exc

    async def _setup(self, client: aiomqtt.Client) -> None:
        async with self._sub_lock:
            desired = minimal_cover(r.topic_filter for r in self._routes)
            stale = [] if self.options.clean_session else [f for f in self._subscribed if f not in desired]
            if desired:
                await self._broker_subscribe(client, desired, strict=False)
            if stale:
                watch = _CancelWatch()
                await client.unsubscribe(stale, timeout=self.options.publish_timeout)
                watch.reraise()
            self._subscribed = set(desired)
        for topic, payload, retain in (self._birth() if self._birth else ()):
            await self._send(_Outgoing(next(self._seq), topic, payload, retain))
        await self._drain_buffer()
        self.connections += 1
        self._ready.set()
        self._update_idle()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        log.info("MQTT connected", extra={"client_id": self.options.client_id, "url": self.url,
                                          "reconnects": self.reconnects})

    async def _broker_subscribe(
        self, client: aiomqtt.Client, filters: list[str], *, strict: bool = True
    ) -> None:
        watch = _CancelWatch()
        codes: Sequence[int | ReasonCode] = await client.subscribe([(f, self.options.qos) for f in filters],
                                       timeout=self.options.publish_timeout)
        watch.reraise()
        for topic_filter, code in zip(filters, codes, strict=False):
            value = code if isinstance(code, int) else code.value
            if value < 0x80:
                continue
            if strict:
                raise SubscribeFailed(topic_filter, value)
            # On a reconnect there is no caller to tell; reconnecting again would not help either.
            log.error("broker refused a subscription on reconnect", extra={
                "client_id": self.options.client_id, "filter": topic_filter, "code": value})

    # -- publishing -------------------------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK; while disconnected, buffer and return at once."""
        self._check_open()
        item = _Outgoing(next(self._seq), topic, bytes(payload), retain)
        if not self._ready.is_set():
            self._enqueue(item)
            return
        try:
            await self._send(item)
        except _Lost:
            self._enqueue(item, force=True)

    def _enqueue(self, item: _Outgoing, *, force: bool = False) -> None:
        opts = self.options
        if not force:
            if len(self._buffer) >= opts.max_buffered:
                raise BufferFull(len(self._buffer), opts.max_buffered)
            if self._buffer_bytes + len(item.payload) > opts.max_buffered_bytes:
                raise BufferFull(self._buffer_bytes + len(item.payload), opts.max_buffered_bytes,
                                 unit="bytes")
        self._buffer.append(item)
        self._buffer_bytes += len(item.payload)
        self._idle.clear()

    async def _send(self, item: _Outgoing) -> None:
        """Publish one message on the current connection; :class:`_Lost` if the connection goes first."""
        client, lost = self._client, self._lost
        if client is None or lost is None or lost.done():
            raise _Lost("not connected")
        self._inflight += 1
        self._idle.clear()
        pub = asyncio.ensure_future(client.publish(item.topic, item.payload, qos=self.options.qos,
                                                   retain=item.retain, timeout=self.options.publish_timeout))

        def on_lost(_: asyncio.Future[None]) -> None:
            pub.cancel()  # aiomqtt would wait for a PUBACK that cannot come until publish_timeout

        lost.add_done_callback(on_lost)
        watch = _CancelWatch()
        try:
            await pub
            watch.reraise()
        except asyncio.CancelledError:
            if lost.done() and not watch.requested():  # cancelled by on_lost, not by our caller
                raise _Lost("connection lost before PUBACK") from None
            raise
        except aiomqtt.MqttCodeError as exc:  # e.g. "the client is not currently connected"
            raise _Lost(str(exc)) from exc
        except aiomqtt.MqttError as exc:
            raise PublishFailed(f"no PUBACK for {item.topic!r} within {self.options.publish_timeout:g}s",
                                topic=item.topic, timeout=self.options.publish_timeout) from exc
        finally:
            lost.remove_done_callback(on_lost)
            self._inflight -= 1
            self._update_idle()

    async def _drain_buffer(self) -> None:
        """Send what was buffered, oldest first, a window at a time; new publishes queue behind it."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self.options.drain_window, len(self._buffer)))]
            self._buffer_bytes -= sum(len(i.payload) for i in batch)
            results = await asyncio.gather(*(self._send(i) for i in batch), return_exceptions=True)
            failed = [item for item, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
            if failed:
                merged = sorted(failed + list(self._buffer), key=lambda i: i.seq)
                self._buffer = deque(merged)
                self._buffer_bytes = sum(len(i.payload) for i in merged)
                raise _Lost(f"{len(failed)} buffered frames not acknowledged")
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._buffer and self._inflight == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every publish so far is acknowledged by the broker (nothing buffered or in flight)."""
        self._check_open()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            raise PublishFailed(f"flush: {len(self._buffer)} frames buffered and {self._inflight} "
                                f"unacknowledged after {timeout:g}s", timeout=timeout) from None

    # -- subscribing and routing ------------------------------------------------------------------------
    async def add_route(self, topic_filter: str, deliver: Deliver) -> Route:
        """Route messages matching ``topic_filter`` to ``deliver``; subscribes at the broker if needed.

        Returns once the broker has acknowledged (when connected); while disconnected the subscription is
        made on reconnect. A refused subscription raises :class:`SubscribeFailed`.
        """
        self._check_open()
        group, _ = split_shared(topic_filter)
        route = Route(topic_filter, deliver, group)
        self._routes.append(route)
        self._replay_orphans(route)
        try:
            await self._sync()
        except BaseException:
            self._routes.remove(route)
            raise
        return route

    async def remove_route(self, route: Route) -> None:
        """Stop routing to ``route``; unsubscribes at the broker when no other route needs the filter."""
        if route not in self._routes:
            return
        self._routes.remove(route)
        if not self._closed:
            await self._sync()

    async def _sync(self) -> None:
        async with self._sub_lock:
            client, lost = self._client, self._lost
            if client is None or lost is None or lost.done():
                return  # the next connection subscribes what is needed then
            desired = minimal_cover(r.topic_filter for r in self._routes)
            new = [f for f in desired if f not in self._subscribed]
            gone = [f for f in self._subscribed if f not in desired]
            try:
                if new:
                    await self._broker_subscribe(client, new)
                    self._subscribed.update(new)
                if gone:
                    watch = _CancelWatch()
                    await client.unsubscribe(gone, timeout=self.options.publish_timeout)
                    self._subscribed.difference_update(gone)
                    watch.reraise()
            except aiomqtt.MqttError as exc:
                if lost.done() or isinstance(exc, aiomqtt.MqttCodeError):
                    return  # connection lost meanwhile; the reconnect resubscribes
                raise LinkError(f"subscription change not acknowledged: {exc}") from exc

    def _on_message(self, topic: str, payload: Any, retain: bool) -> None:
        data = payload if isinstance(payload, bytes) else bytes(payload or b"")
        shared: dict[str, list[Route]] = {}
        matched = False
        for route in self._routes:
            if not topic_matches(route.topic_filter, topic):
                continue
            matched = True
            if route.group is None:
                self._call(route, topic, data, retain)
            else:
                shared.setdefault(route.topic_filter, []).append(route)
        for members in shared.values():  # one member per local group, as the broker does across clients
            self._call(members[next(self._rr) % len(members)], topic, data, retain)
        if not matched:
            self.unrouted += 1
            if not self.options.clean_session:
                self._orphans.append((topic, data, retain))

    @staticmethod
    def _call(route: Route, topic: str, data: bytes, retain: bool) -> None:
        try:
            route.deliver(topic, data, retain)
        except Exception:  # a faulty route must not stop the reader
            log.exception("MQTT route callback failed", extra={"topic": topic, "filter": route.topic_filter})

    def _replay_orphans(self, route: Route) -> None:
        if not self._orphans:
            return
        keep: deque[tuple[str, bytes, bool]] = deque(maxlen=self.options.max_orphans)
        for topic, data, retain in self._orphans:
            if topic_matches(route.topic_filter, topic):
                self._call(route, topic, data, retain)
            else:
                keep.append((topic, data, retain))
        self._orphans = keep

    # -- capabilities -----------------------------------------------------------------------------------
    async def supports_shared_subscriptions(self, *, timeout: float = 1.0) -> bool:
        """Whether the broker delivers ``$share/<group>/<filter>`` subscriptions, found by a round trip once.

        MQTT 3.1.1 cannot say: nats-server's MQTT listener grants such a subscription but never delivers
        to it, Mosquitto delivers. So publish a probe on a fresh topic and see whether it arrives.
        """
        if self._shared_ok is not None:
            return self._shared_ok
        self._check_open()
        try:
            await asyncio.wait_for(self._ready.wait(), self.options.connect_timeout)
        except TimeoutError:
            raise LinkError(f"cannot probe {self.url} for shared subscriptions while disconnected") from None
        topic = f"{PREFIX}/_probe/{os.urandom(6).hex()}"
        arrived = asyncio.get_running_loop().create_future()

        def on_probe(_topic: str, _data: bytes, _retain: bool) -> None:
            if not arrived.done():
                arrived.set_result(None)

        route = await self.add_route(shared_filter("fedbus-probe", topic), on_probe)
        try:
            await self.publish(topic, b"probe")
            try:
                await asyncio.wait_for(arrived, timeout)
                self._shared_ok = True
            except TimeoutError:
                self._shared_ok = False
        finally:
            await self.remove_route(route)
        return self._shared_ok
