"""nats-py errors at the JetStream stores' edge: translated into the fedbus error tree, or retried.

Every nats-py call of the JetStream stores runs inside :func:`mapped` or has its error passed through
:func:`translate`; :func:`retriable` says which errors mean the broker is (re)starting or electing a leader.
"""

from __future__ import annotations

import contextlib

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


def mapped() -> contextlib.AbstractContextManager[None]:
    """A context in which nats-py errors are raised as their fedbus counterparts."""
    return map_exceptions(_ERRORS)


def retriable(exc: BaseException) -> bool:
    """Errors that mean "the broker is (re)starting or electing a leader": try again with the same ids."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code in (None, 503) or isinstance(exc, nats.js.errors.ServiceUnavailableError)
    return isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.TimeoutError | TimeoutError
                      | nats.errors.NoRespondersError | nats.errors.OutboundBufferLimitError
                      | nats.errors.ConnectionReconnectingError)


def translate(exc: BaseException) -> BaseException:
    """What :func:`mapped` makes of ``exc`` (for raising ``from exc`` in an ``except`` clause)."""
    try:
        with mapped():
            raise exc
    except BaseException as mapped_exc:  # we return what map_exceptions made of it
        return mapped_exc
