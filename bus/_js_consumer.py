"""A durable JetStream pull consumer of one event type, and its deliveries (ack, nak, lease renewal)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from ._js_errors import guarded, mapped, retriable, translate
from ._store_base import ConsumerBase
from .codec import Envelope
from .errors import ClosedError
from .events import Event
from .limits import stream_of
from .stores import RejectHook, accept_stored_or_why

if TYPE_CHECKING:
    from ._js_events import JetStreamEventLog

log = structlog.get_logger("fedbus.bus.jetstream")
E = TypeVar("E", bound=Event)


def stored_ns(msg: Msg) -> int:
    """When the stream stored ``msg``, in ns: from its ack subject (nats-py's datetime keeps only µs)."""
    tokens = (msg.reply or "").split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>, or with domain and account
    # hash after ACK (and maybe a trailing token) in the v2 form.
    index = 7 if len(tokens) == 9 else 9
    try:
        return int(tokens[index])
    except (IndexError, ValueError):
        return 0


@dataclass(frozen=True, slots=True)
class _JsDelivery(Generic[E]):
    subject: str
    envelope: Envelope
    event: E
    delivered: int
    seq: int
    time_ns: int
    _msg: Msg = field(repr=False)

    async def ack(self, *, confirm: bool = False) -> None:
        with mapped(), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            if confirm:
                await self._msg.ack_sync(timeout=5.0)
            else:
                await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        with mapped(), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        with mapped():
            await self._msg.in_progress()

    async def term(self) -> None:
        with mapped(), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.term()


class JetStreamConsumer(ConsumerBase[_JsDelivery[E]]):
    """A durable pull consumer of one event type. ``async with`` it; ``async for`` or :meth:`next`."""

    def __init__(
        self, log_: JetStreamEventLog, cls: type[E], config: api.ConsumerConfig, *, batch: int,
        on_reject: RejectHook | None = None,
    ) -> None:
        super().__init__()
        self._log = log_
        self._cls = cls
        self._config = config
        self._batch = batch
        self._on_reject = on_reject
        self._stream = stream_of(cls)
        self._psub: JetStreamContext.PullSubscription | None = None
        self._buffer: deque[Msg] = deque()

    @property
    def name(self) -> str:
        return self._config.durable_name or ""

    async def _open(self) -> JetStreamContext.PullSubscription:
        if self._closed:
            raise ClosedError(f"consumer {self.name} is closed")
        if self._psub is None:
            owner = self._log.owner
            await self._log.ensure(self._cls)
            api_subject = f"$JS.API.CONSUMER.CREATE.{self._stream}.{self.name}"
            await owner.retrying("create consumer", lambda t: guarded(
                owner.nc, owner.js.add_consumer(self._stream, self._config, timeout=t), subject=api_subject,
                what=f"create consumer {self.name} on {self._stream}"))
            with mapped():
                self._psub = await owner.js.pull_subscribe_bind(durable=self.name, stream=self._stream)
        return self._psub

    async def next(self, timeout: float | None = None) -> _JsDelivery[E]:
        """The next valid delivery; ``TimeoutError`` after ``timeout`` seconds without one."""
        psub = await self._open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            while self._buffer:
                delivery = await self._accept(self._buffer.popleft())
                if delivery is not None:
                    return delivery
            if self._closed:
                raise ClosedError(f"consumer {self.name} is closed")
            remaining = 5.0 if deadline is None else deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {self._cls.spec.type} event within {timeout:g}s")
            try:
                self._buffer.extend(await psub.fetch(self._batch, timeout=max(min(remaining, 5.0), 0.05)))
            except nats.errors.TimeoutError:
                continue  # nothing yet; or the broker is away and nats-py is reconnecting
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:  # closed by another task while this one was fetching
                    raise ClosedError(f"consumer {self.name} is closed") from exc
                if not retriable(exc):
                    raise translate(exc) from exc
                log.debug("fetch failed; retrying", consumer=self.name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    async def _accept(self, msg: Msg) -> _JsDelivery[E] | None:
        delivery = accept_stored_or_why(self._log.owner.bus, msg.subject, msg.data, self._cls)
        if isinstance(delivery, str):
            self.dropped += 1
            if self._on_reject is not None:  # kept (a dead letter) before it is acknowledged
                await self._on_reject(msg.subject, msg.data, delivery, msg.metadata.sequence.stream)
            with mapped(), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await msg.ack()  # acknowledged and dropped: a bad frame never comes back
            return None
        meta = msg.metadata
        return _JsDelivery(msg.subject, delivery.envelope, delivery.event, meta.num_delivered,
                           meta.sequence.stream, stored_ns(msg), msg)

    async def _release(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            with contextlib.suppress(nats.errors.Error, ValueError):
                await psub.unsubscribe()
