"""nats-py errors at the JetStream stores' edge: translated into the fedbus error tree, or retried.

Every nats-py call of the JetStream stores runs inside :func:`mapped` or has its error passed through
:func:`translate`; :func:`retriable` says which errors mean the broker is (re)starting or electing a leader.
A write refused by a stream's limits is a :class:`~fedbus.bus.limits.LimitExceeded`, never retried (the
broker answers it with a 503, like an election). A request the credential may not send gets no reply at all,
only an asynchronous ``-ERR``: :func:`guarded` watches for that error and fails at once instead of waiting
for the timeout, and :func:`denied` tells a timed-out call that was refused from one that was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import nats.errors
import nats.js.errors

from .errors import (
    ClosedError,
    ConnectError,
    FedbusError,
    NotFound,
    PublishTimeout,
    StoreError,
    TransportError,
    map_exceptions,
)
from .limits import LimitExceeded

T = TypeVar("T")

# Most specific first: map_exceptions takes the first match.
_ERRORS: dict[type[BaseException], type[FedbusError]] = {
    nats.js.errors.NotFoundError: NotFound,
    nats.js.errors.NoStreamResponseError: StoreError,
    nats.js.errors.ServiceUnavailableError: StoreError,
    nats.js.errors.Error: StoreError,
    nats.errors.TimeoutError: PublishTimeout,
    nats.errors.ConnectionClosedError: ClosedError,
    nats.errors.ConnectionDrainingError: ClosedError,
    nats.errors.OutboundBufferLimitError: PublishTimeout,
    nats.errors.Error: TransportError,
    TimeoutError: PublishTimeout,
    OSError: ConnectError,
}

#: JetStream error codes of writes refused by a stream's limits: the message is too large (10054), or the
#: stream is full and discards new messages (10077: "maximum bytes/messages/messages per subject exceeded").
LIMIT_CODES = frozenset({10054, 10077})
#: The server cannot reserve a stream's ``max_bytes`` (file storage 10047, memory 10028, a cluster 10023).
NO_ROOM_CODES = frozenset({10047, 10028, 10023})
_PERMISSIONS = "permissions violation"


class PermissionDenied(StoreError):
    """The broker refused a request of this credential (a permissions violation on ``subject``)."""

    def __init__(self, subject: str, what: str) -> None:
        super().__init__(f"not permitted to {what} ({subject})")
        self.subject = subject


@contextlib.contextmanager
def mapped(store: str = "the stream") -> Iterator[None]:
    """A context in which nats-py errors are raised as their fedbus counterparts (a write refused by the
    limits of ``store`` as :class:`LimitExceeded`)."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except FedbusError:
        raise
    except Exception as exc:
        raise translate(exc, store=store) from exc


def limit_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused by a stream's limits."""
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in LIMIT_CODES


def retriable(exc: BaseException) -> bool:
    """Errors that mean "the broker is (re)starting or electing a leader": try again with the same ids."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in LIMIT_CODES:
            return False
        return exc.code in (None, 503) or isinstance(exc, nats.js.errors.ServiceUnavailableError)
    return isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.TimeoutError | TimeoutError
                      | nats.errors.NoRespondersError | nats.errors.OutboundBufferLimitError
                      | nats.errors.ConnectionReconnectingError)


def translate(exc: BaseException, *, store: str = "the stream") -> BaseException:
    """What :func:`mapped` makes of ``exc`` (for raising ``from exc`` in an ``except`` clause); a write
    refused by limits becomes :class:`LimitExceeded` naming ``store``."""
    if limit_refusal(exc):
        assert isinstance(exc, nats.js.errors.APIError)
        return LimitExceeded(store, exc.description or f"error {exc.err_code}")
    try:
        with map_exceptions(_ERRORS):
            raise exc
    except BaseException as mapped_exc:  # noqa: BLE001 - we return what map_exceptions made of it
        return mapped_exc


def denied(nc: Any, subject: str, *, since: object = None) -> bool:
    """Whether the server has reported a permissions violation for ``subject`` (or a subject below it, token
    by token) on ``nc`` after ``since`` (the ``nc.last_error`` seen before the call)."""
    err = getattr(nc, "last_error", None)
    if err is None or err is since:
        return False
    text, subject = str(err).lower(), subject.lower()
    return _PERMISSIONS in text and (f'"{subject}"' in text or f'"{subject}.' in text)


async def guarded(nc: Any, call: Awaitable[T], *, subject: str, what: str, poll: float = 0.02) -> T:
    """Await ``call`` (a request on ``subject``); raise :class:`PermissionDenied` as soon as the server reports
    that this credential may not send it, rather than after the request's timeout."""
    before = getattr(nc, "last_error", None)
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                try:
                    return task.result()
                except (nats.errors.TimeoutError, TimeoutError):
                    if denied(nc, subject, since=before):
                        raise PermissionDenied(subject, what) from None
                    raise
            if denied(nc, subject, since=before):
                raise PermissionDenied(subject, what)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
