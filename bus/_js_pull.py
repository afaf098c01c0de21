"""Reading an ephemeral JetStream consumer with a window of pull requests in flight.

Used by event replay and by the object store (chunks, and the listing of meta records).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Self

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ._js_errors import mapped
from .errors import FedbusError, StoreError

if TYPE_CHECKING:
    from .jetstream import JetStream

_STATUS = "Status"


def _api_subject(*tokens: str) -> str:
    """A JetStream API subject (``$JS.API...``); these are the broker's, not event subjects."""
    return ".".join(("$JS", "API", *tokens))


def ephemeral(filter_subject: str | None, **policy: Any) -> api.ConsumerConfig:
    """An ack-less, in-memory consumer that the server removes 30 s after its last read."""
    return api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE, filter_subject=filter_subject, inactive_threshold=30.0,
        mem_storage=True, **policy,
    )


class Puller:
    """Reads an ephemeral ack-less consumer with a window of pull requests in flight.

    nats-py's ``fetch`` waits for each batch before asking for the next, which leaves the link idle half the
    time; here the next request is out before the current batch has been consumed. ``pending`` is how many
    messages the consumer had to deliver when it was created: reading exactly that many is "up to the end".
    """

    def __init__(self, owner: JetStream, stream: str, config: api.ConsumerConfig, *, window: int,
                 max_bytes: int, expires: float = 30.0) -> None:
        self._owner = owner
        self._stream = stream
        self._config = config
        self._window = max(window, 1)
        self._batch = max(self._window // 2, 1)
        self._max_bytes = max_bytes
        self._expires = expires
        self._consumer: str | None = None
        self._sub: Any = None
        self.pending = 0

    async def __aenter__(self) -> Self:
        nc = self._owner.nc
        with mapped():
            info = await self._owner.js.add_consumer(self._stream, self._config)
            self._consumer, self.pending = info.name, info.num_pending or 0
            self._inbox = nc.new_inbox()
            self._sub = await nc.subscribe(self._inbox, pending_msgs_limit=self._window * 2 + 8,
                                           pending_bytes_limit=self._window * self._max_bytes * 2 + (1 << 20))
        return self

    async def __aexit__(self, *exc: object) -> None:
        sub, self._sub = self._sub, None
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, FedbusError):
            if sub is not None:
                await sub.unsubscribe()
            if self._consumer is not None:  # best effort: inactive_threshold removes it anyway
                await self._owner.js.delete_consumer(self._stream, self._consumer)

    async def messages(self, count: int) -> AsyncIterator[Msg]:
        """The next ``count`` messages in stream order; raises StoreError if the consumer runs dry first."""
        nc = self._owner.nc
        subject = _api_subject("CONSUMER", "MSG", "NEXT", self._stream, self._consumer or "")
        expires_ns = int(self._expires * 1e9)
        requested = received = 0
        while received < count:
            while requested < count and requested - received <= self._window - self._batch:
                n = min(self._batch, count - requested)
                request = json.dumps({"batch": n, "expires": expires_ns}).encode()
                with mapped():
                    await nc.publish(subject, request, reply=self._inbox)
                requested += n
            try:
                msg = await self._sub.next_msg(timeout=self._expires + 5.0)
            except nats.errors.TimeoutError:
                raise StoreError(f"stream {self._stream} stalled after {received} of {count} messages"
                                 ) from None
            status = msg.headers.get(_STATUS) if msg.headers else None
            if status == "100":  # idle heartbeat
                continue
            if status is not None:
                description = msg.headers.get("Description", "") if msg.headers else ""
                raise StoreError(f"stream {self._stream} ended after {received} of {count} messages "
                                 f"({status} {description})")
            received += 1
            yield msg
