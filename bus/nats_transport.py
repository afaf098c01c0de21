"""Core NATS transport (nats-py): at-most-once pub/sub, queue groups, native request/reply.

Reconnects forever with jittered backoff; publishes made while the broker is away are buffered (up to
``reconnect_buffer_bytes``) and sent on reconnect. Every nats-py error is translated into the fedbus error tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from . import subjects
from .errors import (
    ClosedError,
    ConnectError,
    FedbusError,
    FrameTooLarge,
    NoResponders,
    PublishTimeout,
    RequestTimeout,
    SubjectError,
    map_exceptions,
)
from .transport import Capabilities, Frame, Subscription, TransportBase

__all__ = ["NatsTransport"]

log = structlog.get_logger("fedbus.bus.nats")

_ERRORS: dict[type[BaseException], type[FedbusError]] = {
    nats.errors.ConnectionClosedError: ClosedError,
    nats.errors.ConnectionDrainingError: ClosedError,
    nats.errors.NoServersError: ConnectError,
    nats.errors.OutboundBufferLimitError: PublishTimeout,
    nats.errors.FlushTimeoutError: PublishTimeout,
    nats.errors.TimeoutError: PublishTimeout,
    OSError: ConnectError,
}


class _NatsSubscription(Subscription):
    def __init__(self, pattern: str, queue: str | None, max_pending: int, owner: set[_NatsSubscription]) -> None:
        super().__init__(pattern, queue=queue, max_pending=max_pending)
        self.nats_sub: NatsSubscription | None = None
        self._owner = owner

    async def unsubscribe(self) -> None:
        self._owner.discard(self)
        nats_sub, self.nats_sub = self.nats_sub, None
        if nats_sub is not None:
            try:
                await nats_sub.unsubscribe()
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                pass  # already gone with the connection
        self.end()


class _QuietTlsClose(logging.Filter):
    """nats-py's protocol returns True from ``eof_received`` and asyncio warns about it on every TLS close."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsClose())


_REFUSALS_BEFORE_GIVING_UP = 3


def _refused(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


class NatsTransport(TransportBase):
    """A connection to one NATS server or cluster (``url`` may list several, comma-separated)."""

    name = "nats"
    capabilities = Capabilities(queue_groups=True, native_reply=True)

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        client_name: str = "fedbus",
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        max_reconnect_attempts: int = -1,
        reconnect_buffer_bytes: int = 64 * 1024 * 1024,
        initial_attempts: int = 3,
        user: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        inbox_prefix: str | None = None,
    ) -> None:
        """``user``/``password`` log in; ``tls`` (a context trusting the deployment's CA) for ``tls://``
        servers; ``inbox_prefix`` is where replies come back (``_INBOX.<id>``: the permissions let nobody
        else read below it)."""
        self.url = url
        self.client_name = client_name
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        self._options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": reconnect_wait,
            "max_reconnect_attempts": max_reconnect_attempts,
            "pending_size": reconnect_buffer_bytes,
        }
        if user is not None:
            self._options.update(user=user, password=password or "")
        if tls is not None:
            self._options["tls"] = tls
        if inbox_prefix is not None:
            self._options["inbox_prefix"] = inbox_prefix
        self._initial_attempts = initial_attempts
        self._nc: NatsClient | None = None
        self._connect_error: BaseException | None = None
        self._auth_failures = 0
        self._closer: asyncio.Task[None] | None = None
        self.refused = asyncio.Event()
        """Set when the broker stops accepting these credentials (revoked, expired) after the first connect;
        :attr:`refusal` says why. The connection is closed then: retrying would never succeed."""
        self.refusal: ConnectError | None = None
        self._refused_event = asyncio.Event()
        self._subs: set[_NatsSubscription] = set()
        self._closed = False
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()

    @property
    def nc(self) -> NatsClient:
        """The nats-py client, for the JetStream layer in this package. Agents never touch it."""
        if self._nc is None or self._closed:
            raise ClosedError(f"{self.url} is {'closed' if self._closed else 'not connected'}")
        return self._nc

    async def connect(self) -> None:
        if self._closed:
            raise ClosedError("transport is closed")
        if self._nc is not None:
            return
        # nats-py retries an unreachable server forever when reconnecting is allowed, so the first connection
        # is probed here: a user who mistyped the URL gets a ConnectError, not a hang.
        last: BaseException | None = None
        for attempt in range(self._initial_attempts):
            if await self._any_server_reachable():
                try:
                    self._nc = await self._connect_once()
                    self.connected.set()
                    return
                except (TimeoutError, nats.errors.Error, OSError) as failure:
                    exc = self._connect_error or failure  # nats-py reports TLS and auth failures to error_cb
                    if _refused(exc):
                        raise ConnectError("the broker refused these credentials (authorization violation): "
                                           "check --creds / FEDBUS_CREDS, or whether it was revoked",
                                           url=self.url, refused=True) from None
                    if isinstance(exc, ssl.SSLCertVerificationError):
                        raise ConnectError(f"the broker's TLS certificate is not trusted: {exc.verify_message}; "
                                           "use the creds file the broker's authority issued", url=self.url,
                                           refused=True) from None
                    last = exc
            else:
                last = OSError("connection refused or timed out")
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        raise ConnectError(f"cannot reach NATS: {last}", url=self.url)

    async def _connect_once(self) -> NatsClient:
        """One nats-py connect; a refused login or an untrusted certificate ends it at once (nats-py would
        otherwise retry them until the timeout)."""
        self._connect_error = None
        self._refused_event = asyncio.Event()
        connecting = asyncio.ensure_future(nats.connect(
            servers=self._servers, name=self.client_name, allow_reconnect=True,
            error_cb=self._on_error, disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect, **self._options,
        ))
        refused = asyncio.ensure_future(self._refused_event.wait())
        try:
            done, _ = await asyncio.wait({connecting, refused}, timeout=self._options["connect_timeout"] * 2 + 5,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if connecting in done:
            return connecting.result()
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        raise self._connect_error or TimeoutError()

    async def _any_server_reachable(self) -> bool:
        for server in self._servers:
            url = urlsplit(server if "://" in server else f"nats://{server}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 4222),
                    self._options["connect_timeout"])
            except (TimeoutError, OSError):
                continue
            writer.close()
            return True
        return False

    # nats-py calls these; they must never raise (a raising callback stops reconnection, nats.py #204).
    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None and (_refused(exc) or isinstance(exc, ssl.SSLError)):
            self._connect_error = exc
            self._refused_event.set()
        elif self._nc is not None and _refused(exc) and not self.refused.is_set():
            self._auth_failures += 1
            if self._auth_failures >= _REFUSALS_BEFORE_GIVING_UP:
                self.refusal = ConnectError("the broker no longer accepts these credentials (revoked or expired)",
                                            url=self.url, refused=True)
                self.refused.set()
                log.error("credentials refused by the broker; giving up", url=self.url)
                self._closer = asyncio.get_running_loop().create_task(self._nc.close())
                return
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.warning("slow consumer", subject=getattr(exc, "subject", None))
        else:
            # A refused publish or subscription also reaches its caller as an error; log it quietly here.
            level = log.info if "permissions violation" in str(exc).lower() else log.warning
            level("nats error", error=f"{type(exc).__name__}: {exc}", url=self.url)

    async def _on_disconnect(self) -> None:
        self.connected.clear()
        self.disconnected.set()
        if not self._closed:
            log.warning("disconnected; buffering publishes until reconnect", url=self.url)

    async def _on_reconnect(self) -> None:
        self._auth_failures = 0
        self.reconnects += 1
        self.disconnected.clear()
        self.connected.set()
        log.info("reconnected", url=self._nc.connected_url.netloc if self._nc and self._nc.connected_url
                 else self.url, reconnects=self.reconnects)

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        # The hot path: no context managers, the subject check is cached.
        subjects.validate_subject(subject)
        nc = self._nc
        if nc is None or self._closed:
            raise ClosedError(f"{self.url} is {'closed' if self._closed else 'not connected'}")
        if len(data) > nc.max_payload:
            raise FrameTooLarge(len(data), nc.max_payload, subject=subject)
        try:
            await nc.publish(subject, data, reply=reply or "")
        except (nats.errors.Error, OSError):
            with map_exceptions(_ERRORS):
                raise

    async def subscribe(
        self, pattern: str, *, queue: str | None = None, max_pending: int = 1024
    ) -> Subscription:
        subjects.validate_pattern(pattern)
        if queue is not None:
            subjects.validate_token(queue, what="queue group")
        sub = _NatsSubscription(pattern, queue, max_pending, self._subs)

        async def on_msg(msg: Msg) -> None:
            sub.deliver(Frame(msg.subject, msg.data, msg.reply or None))

        with map_exceptions(_ERRORS):
            sub.nats_sub = await self.nc.subscribe(
                pattern, queue=queue or "", cb=on_msg, pending_msgs_limit=max(max_pending, 1024) * 4,
            )
            # Once subscribe returns, the server knows the interest: a publish from any client now arrives.
            await self.nc.flush()
        self._subs.add(sub)
        return sub

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> Frame:
        subjects.validate_subject(subject)
        try:
            msg = await self.nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(subject, timeout) from None
        except nats.errors.BadSubjectError as exc:
            raise SubjectError(str(exc), subject=subject) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise ClosedError(str(exc)) from None
        return Frame(msg.subject, msg.data, None)

    async def flush(self, timeout: float = 5.0) -> None:
        with map_exceptions(_ERRORS):
            # nats-py annotates `timeout: int` but only hands it to asyncio.wait_for: fractions work.
            await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Drain (deliver what the server already sent us, flush what we published), then disconnect."""
        if self._closed:
            return
        nc, self._nc = self._nc, None
        self._closed = True
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5.0)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("drain incomplete; closing", error=str(exc))
            finally:
                if not nc.is_closed:
                    await nc.close()
        for sub in list(self._subs):
            sub.end()
        self._subs.clear()
