"""``EdgeClient``: a phone or Raspberry Pi on the fedbus, over MQTT, with only aiomqtt and msgpack.

::

    async with EdgeClient(device_id="pi-7", url="mqtt://broker:1883") as edge:
        await edge.log_metrics({"temp_c": 41.5, "load": 0.3}, step=12)     # batched into edge.metrics
        await edge.publish("jobs.progress", {"job_id": "j1", "pct": 40}, key="j1")
        async with edge.subscribe("jobs.offer") as offers:
            async for event_type, data, envelope in offers:
                ...
        reply = await edge.request("bus.ping", {"agent_id": "gpu-1"}, key="gpu-1")

On every connect the device publishes a retained ``edge.status`` (``online: true``) on
``fedbus/edge/status/<device_id>``, and sets a retained ``online: false`` last will there, so any NATS agent
subscribed to ``EdgeStatus`` sees the device come and go. Persistent session, QoS 1, stable client id
(``fedbus-edge-<device_id>``), keepalive 60 s: see ``docs/edge.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from . import signing, topics
from .creds import DeviceCreds
from .envelope import FrameLimits, decode_data, make_envelope, pack, unpack
from .errors import (
    EdgeError,
    FrameError,
    LinkClosed,
    MalformedFrame,
    RequestTimeout,
    SignatureError,
    TopicError,
)
from .link import LinkOptions, MqttLink, Route, Will
from .subscription import EdgeSubscription, PendingSubscription, Received
from .telemetry import METRICS_TYPE, MetricsBatcher

__all__ = ["SDK_VERSION", "STATUS_TYPE", "EdgeClient"]

log = logging.getLogger("fedbus.edge")

SDK_VERSION = "fedbus-edge/0.1.0"
STATUS_TYPE = "edge.status"


class EdgeClient:
    """A device's connection to the fedbus over MQTT. ``async with`` it; see the module docstring."""

    def __init__(
        self,
        *,
        device_id: str,
        url: str = "mqtt://127.0.0.1:1883",
        client_id: str | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        info: Mapping[str, str | int | float | bool | None] | None = None,
        batch_points: int = 100,
        batch_interval: float = 10.0,
        signing_seed: bytes | None = None,
        trusted_keys: Mapping[str, bytes] | None = None,
        require_signatures: bool = False,
        limits: FrameLimits | None = None,
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
        initial_attempts: int = 3,
        reconnect_min: float = 0.1,
        reconnect_max: float = 30.0,
        max_buffered: int = 10_000,
    ) -> None:
        """``signing_seed`` (32 bytes) signs every event but the status; ``trusted_keys`` (kid → raw public
        key) verifies incoming signed events, and with ``require_signatures`` unsigned ones are dropped.
        Both need ``cryptography``."""
        self.device_id = topics.validate_token(device_id, what="device id")
        self.url = url
        self.limits = limits or FrameLimits()
        self.info = dict(info or {})
        self.rejected: Counter[str] = Counter()
        self._signer = signing.Signer(signing_seed) if signing_seed is not None else None
        self._verifier = signing.Verifier(trusted_keys) if trusted_keys is not None else None
        self._require_signatures = require_signatures
        if require_signatures and self._verifier is None:
            raise EdgeError("require_signatures needs trusted_keys")
        self._status_topic = topics.event_topic(STATUS_TYPE, self.device_id)
        self._batcher = MetricsBatcher(self.device_id, max_points=batch_points, max_age_s=batch_interval)
        self._batch_interval = batch_interval
        self._metrics_lock = asyncio.Lock()
        options = LinkOptions(
            client_id=topics.validate_token(client_id or f"fedbus-edge-{self.device_id}", what="client id"),
            clean_session=clean_session, keepalive=keepalive, username=username, password=password,
            tls_context=tls_context, connect_timeout=connect_timeout, publish_timeout=publish_timeout,
            initial_attempts=initial_attempts, backoff_min=reconnect_min, backoff_max=reconnect_max,
            max_buffered=max_buffered,
        )
        self._link = MqttLink(url, options=options, will=self._offline_will, birth=self._birth)
        self._subs: list[EdgeSubscription] = []
        self._inbox_prefix = f"{topics.PREFIX}._inbox.{self.device_id}-{os.urandom(4).hex()}"
        self._inbox_route: Route | None = None
        self._inbox_seq = itertools.count()
        self._waiters: dict[str, asyncio.Future[Received]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_creds(cls, creds: DeviceCreds | str | Path, **options: Any) -> EdgeClient:
        """A client that logs in, verifies the broker and signs as the creds file says (``fedbus creds issue
        device ID``); ``options`` are the other keyword arguments."""
        if not isinstance(creds, DeviceCreds):
            creds = DeviceCreds.load(creds)
        return cls(device_id=creds.id, url=creds.mqtt_url, username=creds.user, password=creds.password,
                   tls_context=creds.tls_context(), signing_seed=creds.signing_seed, **options)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    @property
    def status_topic(self) -> str:
        """``fedbus/edge/status/<device_id>``: retained online/offline status."""
        return self._status_topic

    @property
    def public_key(self) -> bytes | None:
        """The raw Ed25519 public key agents must trust to verify this device (when signing)."""
        return self._signer.public_raw if self._signer else None

    # -- lifecycle --------------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect (raises :class:`~fedbus.edge_sdk.errors.ConnectFailed`) and start the telemetry timer."""
        if self._closed:
            raise LinkClosed("edge client is closed")
        await self._link.start()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name=f"edge-metrics:{self.device_id}")

    async def close(self) -> None:
        """Send pending telemetry and an ``offline`` status, then disconnect cleanly. Idempotent."""
        if self._closed:
            return
        self._closed = True
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if not self._link.closed and self._link.connected:
            with contextlib.suppress(EdgeError):
                await self.flush_metrics()
                await self._link.publish(self._status_topic, self._status_frame(online=False), retain=True)
        await self._link.close()
        for sub in self._subs:
            sub.end()
        self._subs.clear()
        for future in self._waiters.values():
            future.cancel()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- status -----------------------------------------------------------------------------------------
    def _status_frame(self, *, online: bool) -> bytes:
        data = {"device_id": self.device_id, "online": online, "sdk": SDK_VERSION, "info": self.info}
        return pack(make_envelope(STATUS_TYPE, data, source=self.device_id))

    def _birth(self) -> list[tuple[str, bytes, bool]]:
        return [(self._status_topic, self._status_frame(online=True), True)]

    def _offline_will(self) -> Will:
        return Will(self._status_topic, self._status_frame(online=False), retain=True)

    # -- publishing -------------------------------------------------------------------------------------
    def envelope(self, event_type: str, data: Mapping[str, Any], *, version: int = 1,
                 trace: str | None = None, reply: str | None = None) -> dict[str, Any]:
        """A new envelope from this device (signed when the client has a key)."""
        env = make_envelope(event_type, data, source=self.device_id, version=version, trace=trace,
                            reply=reply)
        if self._signer is not None:
            self._signer.sign(env)
        return env

    async def publish(self, event_type: str, data: Mapping[str, Any], *, key: str | None = None,
                      version: int = 1, trace: str | None = None) -> dict[str, Any]:
        """Publish an event of ``event_type`` (``"<domain>.<name>"``) with payload fields ``data``.

        ``key`` is the value of the event's subject key field (e.g. a job id), when its type has one.
        Returns the envelope sent; its ``id`` is the idempotency key receivers deduplicate on.
        """
        topic = topics.event_topic(event_type, key)
        env = self.envelope(event_type, data, version=version, trace=trace)
        await self._send(topic, env)
        return env

    async def publish_envelope(self, env: dict[str, Any], *, key: str | None = None) -> None:
        """Publish an existing envelope unchanged on its type's topic (store-and-forward, relays)."""
        await self._send(topics.event_topic(env["type"], key), env)

    async def _send(self, topic: str, env: dict[str, Any]) -> None:
        if self._closed:
            raise LinkClosed("edge client is closed")
        await self._link.publish(topic, pack(env))

    # -- telemetry --------------------------------------------------------------------------------------
    async def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        """Buffer one point per metric; a batch goes out every ``batch_points`` points or ``batch_interval``
        seconds, whichever comes first."""
        if self._closed:
            raise LinkClosed("edge client is closed")
        self._batcher.add(metrics, step=step)
        if len(self._batcher) >= self._batcher.max_points:
            await self._flush_batches(full_only=True)

    async def flush_metrics(self) -> None:
        """Send every buffered point now."""
        await self._flush_batches(full_only=False)

    async def _flush_batches(self, *, full_only: bool) -> None:
        async with self._metrics_lock:
            while len(self._batcher) and (not full_only or len(self._batcher) >= self._batcher.max_points):
                batch = self._batcher.take()
                assert batch is not None
                await self._send(topics.event_topic(METRICS_TYPE, self.device_id),
                                 self.envelope(METRICS_TYPE, batch))

    async def _tick(self) -> None:
        # The flag, not only cancellation, ends the loop: see link._CancelWatch.
        while not self._closed:
            await asyncio.sleep(self._batch_interval / 4)
            if self._batcher.due():
                try:
                    await self.flush_metrics()
                except EdgeError as exc:  # e.g. offline buffer full: the points are lost, say so
                    log.warning("telemetry batch not sent: %s", exc, extra={"device_id": self.device_id})

    # -- receiving --------------------------------------------------------------------------------------
    def subscribe(self, event_type: str, *, key: str | None = "*", version: int | None = None,
                  max_pending: int = 256) -> PendingSubscription:
        """Events of ``event_type``: ``key="*"`` any key, a value one key, ``None`` for unkeyed types.

        Use as ``async with edge.subscribe(...) as sub`` (or ``sub = await edge.subscribe(...)``).
        """
        topic_filter = topics.event_filter(event_type, key)
        sub = EdgeSubscription(event_type, topic_filter, version=version, max_pending=max_pending,
                               accept=self._accept, remove_route=self._link.remove_route)
        return PendingSubscription(self._open, sub)

    async def _open(self, sub: EdgeSubscription) -> EdgeSubscription:
        if self._closed:
            raise LinkClosed("edge client is closed")
        sub.attach(await self._link.add_route(sub.topic_filter, sub.on_message))
        self._subs.append(sub)
        return sub

    def _accept(
        self, topic: str, payload: bytes, event_type: str | None, version: int | None
    ) -> Received | None:
        """Decode and check one frame; ``None`` (counted and logged) when it must be dropped."""
        try:
            env = unpack(payload, limits=self.limits, topic=topic)
            if event_type is not None and env["type"] != event_type:
                raise MalformedFrame(f"expected {event_type}, got {env['type']}", field="type", topic=topic)
            if version is not None and env["v"] != version:
                raise MalformedFrame(f"expected version {version}, got {env['v']}", field="v", topic=topic)
            self._authenticate(env)
            data = decode_data(env, limits=self.limits, topic=topic)
        except (FrameError, SignatureError) as exc:
            self.rejected[type(exc).__name__] += 1
            log.warning("frame rejected: %s", exc, extra={"topic": topic, "bytes": len(payload),
                                                          "reason": type(exc).__name__})
            return None
        return Received(env["type"], data, env)

    def _authenticate(self, env: dict[str, Any]) -> None:
        if self._verifier is None:
            return
        if env["sig"] is None:
            if self._require_signatures:
                raise SignatureError(f"unsigned {env['type']} event", event_id=env["id"])
            return
        self._verifier.verify(env)

    # -- request / reply --------------------------------------------------------------------------------
    async def request(self, event_type: str, data: Mapping[str, Any], *, key: str | None = None,
                      version: int = 1, timeout: float = 10.0) -> Received:
        """Publish an event whose envelope asks for a reply on this device's inbox; wait for the reply."""
        await self._ensure_inbox()
        reply_to = f"{self._inbox_prefix}.{next(self._inbox_seq)}"
        future: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        self._waiters[reply_to] = future
        try:
            env = self.envelope(event_type, data, version=version, reply=reply_to)
            await self._send(topics.event_topic(event_type, key), env)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimeout(event_type, timeout) from None
        finally:
            self._waiters.pop(reply_to, None)

    async def respond(self, to: Received, event_type: str, data: Mapping[str, Any], *,
                      version: int = 1) -> dict[str, Any]:
        """Answer a request received on a subscription; the reply keeps the request's trace id."""
        reply = to.envelope.get("reply")
        if not reply:
            raise EdgeError(f"{to.type} event {to.envelope.get('id')} asked for no reply")
        env = self.envelope(event_type, data, version=version,
                            trace=to.envelope.get("trace") or to.envelope.get("id"))
        await self._send(topics.subject_to_topic(reply), env)
        return env

    async def _ensure_inbox(self) -> None:
        if self._inbox_route is None:
            inbox_filter = topics.subject_to_topic(self._inbox_prefix) + "/+"
            self._inbox_route = await self._link.add_route(inbox_filter, self._on_reply)

    def _on_reply(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            subject = topics.topic_to_subject(topic)
        except TopicError:
            return
        future = self._waiters.get(subject)
        received = self._accept(topic, payload, None, None)
        if future is not None and received is not None and not future.done():
            future.set_result(received)
