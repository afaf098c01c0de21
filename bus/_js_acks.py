"""Asynchronous JetStream publishes whose acks, and refusals, come back as futures.

nats-py's ``publish_async`` raises a refused publish's error (a full stream, a message too large) inside its
reply callback instead of setting it on the future, so the caller waits for a timeout and takes a refusal
for a broker that went away (nats-py 2.16). Here one inbox subscription of ours receives every ack of a
connection's async publishes and resolves each future with the ack, or with the error the broker gave.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ._js_errors import mapped

_STATUS = "Status"
_NO_RESPONDERS = "503"


def _api_error(err: dict[str, Any]) -> nats.js.errors.APIError:
    """The nats-py error of an error response (its ``from_error`` raises it; we want it as a value)."""
    try:
        nats.js.errors.APIError.from_error(err)
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError(**err)  # pragma: no cover - from_error always raises


class AckInbox:
    """Publishes with a reply subject under one inbox of ours; :meth:`publish` returns the ack's future."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix: str | None = None
        self._sub: Any = None
        self._futures: dict[str, asyncio.Future[api.PubAck]] = {}
        self._tokens = itertools.count()
        self._lock = asyncio.Lock()

    async def _start(self) -> str:
        async with self._lock:
            if self._prefix is None:
                prefix = self._nc.new_inbox()
                with mapped():
                    self._sub = await self._nc.subscribe(f"{prefix}.*", cb=self._on_ack)
                self._prefix = prefix
        return self._prefix

    async def publish(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None
                      ) -> asyncio.Future[api.PubAck]:
        """Send one message to its stream; the future resolves with the ack or the broker's error
        (``NoStreamResponseError`` when no stream stores ``subject``)."""
        prefix = self._prefix or await self._start()
        token = str(next(self._tokens))
        future: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _f: self._futures.pop(token, None))
        try:
            with mapped():
                await self._nc.publish(subject, data, reply=f"{prefix}.{token}", headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    async def _on_ack(self, msg: Msg) -> None:
        future = self._futures.get(msg.subject.rsplit(".", 1)[-1])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            future.set_exception(nats.js.errors.APIError(description="unreadable ack"))
            return
        if "error" in resp:
            future.set_exception(_api_error(resp["error"]))
        else:
            future.set_result(api.PubAck.from_response(resp))

    async def close(self) -> None:
        """Stop listening; futures still pending are cancelled. Idempotent."""
        sub, self._sub = self._sub, None
        self._prefix = None
        for future in list(self._futures.values()):
            future.cancel()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, ValueError):
                pass
