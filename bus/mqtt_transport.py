"""MQTT transport (aiomqtt 2.x, MQTT 3.1.1): for edge devices, on Mosquitto or nats-server's MQTT listener.

Subjects map to topics with :func:`~fedbus.bus.subjects.to_mqtt` (``.``→``/``, ``*``→``+``, ``>``→``#``),
so an MQTT device and a NATS agent meet on the same event through nats-server's gateway. QoS 1, a persistent
session (``clean_session=False``) under a stable ``client_id`` by default, keepalive, an optional last will.

The connection itself (reconnect with backoff, resubscribe, bounded offline buffer, minimal broker filters)
is :class:`fedbus.edge_sdk.link.MqttLink`, shared with the edge SDK; this module adds subjects, bounded
:class:`~fedbus.bus.transport.Subscription` objects and the fedbus error tree.

Capabilities: no native replies (``Bus.request`` uses the envelope's ``reply`` and an inbox subject);
queue groups only where the broker delivers shared subscriptions (``$share/<group>/<filter>``): Mosquitto
does, nats-server's MQTT listener accepts them but never delivers, so a queue subscription there raises
:class:`~fedbus.bus.errors.NotSupported`. Whether the broker does is found by one probe round trip, unless
``shared_subscriptions`` says so.

:meth:`MqttTransport.close` keeps the persistent session (its subscriptions stay on the broker, which queues
QoS 1 messages for it); :meth:`Subscription.unsubscribe` removes a subscription for good.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass

import aiomqtt
import structlog

from fedbus.edge_sdk import errors as edge_errors
from fedbus.edge_sdk.link import LinkOptions, MqttLink, Route, Will

from . import subjects
from .errors import (
    ClosedError,
    ConnectError,
    FedbusError,
    NotSupported,
    PublishTimeout,
    SubjectError,
    TransportError,
    map_exceptions,
)
from .transport import Capabilities, Frame, Subscription, TransportBase

__all__ = ["LastWill", "MqttTransport"]

log = structlog.get_logger("fedbus.bus.mqtt")

_ERRORS: dict[type[BaseException], type[FedbusError]] = {
    edge_errors.ConnectFailed: ConnectError,
    edge_errors.LinkClosed: ClosedError,
    edge_errors.BufferFull: PublishTimeout,
    edge_errors.PublishFailed: PublishTimeout,
    edge_errors.LinkError: TransportError,
    aiomqtt.MqttError: TransportError,
    OSError: ConnectError,
}


@dataclass(frozen=True, slots=True)
class LastWill:
    """Published by the broker on ``subject`` when this client vanishes without disconnecting."""

    subject: str
    payload: bytes
    retain: bool = True

    def __post_init__(self) -> None:
        subjects.validate_subject(self.subject)


class _MqttSubscription(Subscription):
    def __init__(self, transport: MqttTransport, pattern: str, queue: str | None, max_pending: int) -> None:
        super().__init__(pattern, queue=queue, max_pending=max_pending)
        self._transport = transport
        self.route: Route | None = None

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        """Route callback: MQTT ``#`` also matches the parent level, NATS ``>`` does not, so check again."""
        try:
            subject = subjects.from_mqtt(topic)
        except SubjectError:
            log.warning("dropping message on a topic that is no fedbus subject", topic=topic[:200])
            return
        if subjects.matches(self.pattern, subject):
            self.deliver(Frame(subject, payload, None))

    async def unsubscribe(self) -> None:
        route, self.route = self.route, None
        if route is not None:
            await self._transport._remove(self, route)
        self.end()


class MqttTransport(TransportBase):
    """A client of an MQTT 3.1.1 broker at ``url`` (``mqtt://host:port``, ``mqtts://`` for TLS)."""

    name = "mqtt"

    def __init__(
        self,
        url: str = "mqtt://127.0.0.1:1883",
        *,
        client_id: str | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        will: LastWill | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        shared_subscriptions: bool | None = None,
        probe_timeout: float = 1.0,
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
        initial_attempts: int = 3,
        reconnect_min: float = 0.05,
        reconnect_max: float = 5.0,
        max_buffered: int = 10_000,
        max_buffered_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """``client_id`` should be stable (e.g. the agent id) so a persistent session resumes; without
        one a random id is made. ``shared_subscriptions``: ``None`` probes the broker on the first queue
        subscription, ``True``/``False`` trusts the caller."""
        self.url = url
        self.client_id = subjects.validate_token(client_id or f"fedbus-{os.urandom(5).hex()}",
                                                 what="MQTT client id")
        self.capabilities = Capabilities(queue_groups=shared_subscriptions is not False, native_reply=False)
        self._shared = shared_subscriptions
        self._probe_timeout = probe_timeout
        options = LinkOptions(
            client_id=self.client_id, clean_session=clean_session, keepalive=keepalive, username=username,
            password=password, tls_context=tls_context, connect_timeout=connect_timeout, publish_timeout=publish_timeout,
            initial_attempts=initial_attempts, backoff_min=reconnect_min, backoff_max=reconnect_max,
            max_buffered=max_buffered, max_buffered_bytes=max_buffered_bytes,
        )
        link_will = None if will is None else Will(subjects.to_mqtt(will.subject), will.payload, will.retain)
        with map_exceptions(_ERRORS):
            self._link = MqttLink(url, options=options, will=link_will)
        self._subs: list[_MqttSubscription] = []
        self._probe_lock = asyncio.Lock()
        self._connected_once = False

    # -- state ------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    @property
    def buffered(self) -> int:
        """Publishes held while disconnected, sent on reconnect."""
        return self._link.buffered

    def _check_open(self) -> None:
        if self._link.closed:
            raise ClosedError(f"{self.url} ({self.client_id}) is closed")
        if not self._connected_once:
            raise ClosedError(f"{self.url} ({self.client_id}) is not connected")

    # -- Transport --------------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._link.closed:
            raise ClosedError("transport is closed")
        with map_exceptions(_ERRORS):
            await self._link.start()
        self._connected_once = True

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Publish at QoS 1 (waits for the PUBACK); buffered while reconnecting. ``reply`` is not carried:
        MQTT 3.1.1 has no header for it (the Bus puts it in the envelope)."""
        subjects.validate_subject(subject)
        self._check_open()
        with map_exceptions(_ERRORS):
            await self._link.publish(subjects.to_mqtt(subject), data)

    async def subscribe(
        self, pattern: str, *, queue: str | None = None, max_pending: int = 1024
    ) -> Subscription:
        subjects.validate_pattern(pattern)
        self._check_open()
        topic_filter = subjects.to_mqtt(pattern)
        if queue is not None:
            subjects.validate_token(queue, what="queue group")
            await self._require_shared_subscriptions()
            topic_filter = f"$share/{queue}/{topic_filter}"
        sub = _MqttSubscription(self, pattern, queue, max_pending)
        with map_exceptions(_ERRORS):
            sub.route = await self._link.add_route(topic_filter, sub.on_message)
        self._subs.append(sub)
        return sub

    async def _require_shared_subscriptions(self) -> None:
        async with self._probe_lock:
            if self._shared is None:
                with map_exceptions(_ERRORS):
                    self._shared = await self._link.supports_shared_subscriptions(timeout=self._probe_timeout)
                self.capabilities = Capabilities(queue_groups=self._shared, native_reply=False)
        if not self._shared:
            raise NotSupported(
                f"queue groups over MQTT need shared subscriptions ($share/<group>/<filter>), which the "
                f"broker at {self.url} does not deliver (nats-server's MQTT listener grants them but never "
                "delivers); use a NATS transport for queue groups, or an MQTT broker such as Mosquitto")

    async def _remove(self, sub: _MqttSubscription, route: Route) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if not self._link.closed:
            with map_exceptions(_ERRORS):
                await self._link.remove_route(route)

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Frame:
        raise NotSupported("MQTT has no native request/reply; Bus.request uses the envelope's reply field "
                           "and an inbox subscription instead")

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every publish so far has been acknowledged by the broker."""
        self._check_open()
        with map_exceptions(_ERRORS):
            await self._link.flush(timeout)

    async def close(self) -> None:
        """Send what is pending, DISCONNECT (no will), end every subscription. The broker keeps a persistent
        session's subscriptions. Idempotent."""
        if self._link.closed:
            return
        await self._link.close()
        for sub in self._subs:
            sub.route = None
            sub.end()
        self._subs.clear()
