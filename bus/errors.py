"""The one error tree of fedbus.

Every error a fedbus API raises is a ``FedbusError``; backend exceptions (nats-py, aiomqtt, OS errors) are
translated at the transport edge by :func:`map_exceptions`, so callers never catch a library's own types::

    FedbusError
    ├── ConfigError                 bad configuration or input file (names the key)
    ├── BusError
    │   ├── TransportError
    │   │   ├── ConnectError        broker unreachable / connection lost for good
    │   │   ├── PublishTimeout      a publish or flush did not complete in time
    │   │   ├── RequestTimeout      no reply before the deadline
    │   │   ├── NoResponders        nobody listens on a request subject
    │   │   ├── NotSupported        the transport cannot do this (e.g. queue groups on an MQTT gateway)
    │   │   └── ClosedError         the transport or subscription is closed
    │   ├── SubjectError            an invalid subject, pattern or subject token
    │   ├── CodecError              a frame that cannot become an event
    │   │   ├── FrameTooLarge       over the size limit, rejected before decoding
    │   │   ├── MalformedFrame      not a valid envelope
    │   │   ├── UnknownEventType    well-formed, but the type is not in the catalogue
    │   │   └── SchemaError         the payload does not match its event class (names the field)
    │   ├── AuthError
    │   │   ├── UnsignedEvent       strict mode and no signature
    │   │   ├── UnknownKey          signed by a key that is not trusted
    │   │   ├── BadSignature        the signature does not verify (forged or altered)
    │   │   └── ReplayedEvent       seen before, or outside the replay window
    │   └── StoreError
    │       ├── NotFound            no such key / object / stream
    │       ├── Conflict            compare-and-set lost: the key exists, or its revision moved on
    │       └── IntegrityError      an object's bytes do not match its sha256
    └── ...                         packages add their own subclasses (JobError, RoundError, ...)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "AuthError",
    "BadSignature",
    "BusError",
    "ClosedError",
    "CodecError",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "FedbusError",
    "FrameTooLarge",
    "IntegrityError",
    "MalformedFrame",
    "NoResponders",
    "NotFound",
    "NotSupported",
    "PublishTimeout",
    "ReplayedEvent",
    "RequestTimeout",
    "SchemaError",
    "StoreError",
    "SubjectError",
    "TransportError",
    "UnknownEventType",
    "UnknownKey",
    "UnsignedEvent",
    "map_exceptions",
]


class FedbusError(Exception):
    """Base of every fedbus error."""


class ConfigError(FedbusError):
    """Invalid configuration; ``key`` names the offending setting when known."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        where = " in ".join(p for p in (f"'{key}'" if key else "", source or "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.key = key
        self.source = source


class BusError(FedbusError):
    """Anything that goes wrong moving events."""


class TransportError(BusError):
    """The transport failed to move bytes."""


class ConnectError(TransportError):
    """The broker could not be reached, or (``refused``) it refused the credentials or the certificate."""

    def __init__(self, message: str, *, url: str | None = None, refused: bool = False) -> None:
        super().__init__(f"{message} ({url})" if url else message)
        self.url = url
        self.refused = refused


class PublishTimeout(TransportError):
    """A publish or flush did not complete in time."""


class RequestTimeout(TransportError):
    """A request got no reply before its deadline."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on {subject!r} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class NoResponders(TransportError):
    """A request was sent to a subject nobody listens on."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders on {subject!r}")
        self.subject = subject


class NotSupported(TransportError):
    """The transport cannot do what was asked."""


class ClosedError(TransportError):
    """The transport, bus or subscription was already closed."""


class SubjectError(BusError, ValueError):
    """An invalid subject, subscription pattern or subject token."""

    def __init__(self, message: str, *, subject: str) -> None:
        super().__init__(f"{message}: {subject!r}")
        self.subject = subject


class CodecError(BusError, ValueError):
    """A frame could not be turned into an event (or an event into a frame)."""

    def __init__(self, message: str, *, subject: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject
        self.source = source


class FrameTooLarge(CodecError):
    """A frame over the size limit; rejected before any decoding."""

    def __init__(self, size: int, limit: int, *, subject: str | None = None) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", subject=subject)
        self.size = size
        self.limit = limit


class MalformedFrame(CodecError):
    """Bytes that are not a valid fedbus envelope."""


class UnknownEventType(CodecError):
    """A well-formed envelope whose type (or version) is not in the catalogue."""

    def __init__(self, event_type: str, version: int, *, subject: str | None = None) -> None:
        super().__init__(f"unknown event type {event_type!r} v{version}", subject=subject)
        self.event_type = event_type
        self.version = version


class SchemaError(CodecError):
    """The payload does not match its event class; ``field`` names the offending field when known."""

    def __init__(
        self, message: str, *, event_type: str, field: str | None = None, subject: str | None = None
    ) -> None:
        super().__init__(f"{event_type}: {message}", subject=subject)
        self.event_type = event_type
        self.field = field


class AuthError(BusError):
    """An event failed authentication."""

    def __init__(self, message: str, *, event_id: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.source = source


class UnsignedEvent(AuthError):
    """Strict mode received an event without a signature."""


class UnknownKey(AuthError):
    """The event is signed by a key id that is not trusted."""


class BadSignature(AuthError):
    """The signature does not verify: the event was forged or altered."""


class ReplayedEvent(AuthError):
    """The event id was seen before, or its time is outside the replay window."""


class StoreError(BusError):
    """A key-value, object or stream store operation failed."""


class NotFound(StoreError, KeyError):
    """No such key, object or stream."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class Conflict(StoreError):
    """A compare-and-set lost: ``create`` of an existing key, or ``update`` from a stale revision."""

    def __init__(self, message: str, *, key: str, expected: int | None = None) -> None:
        super().__init__(f"{key!r}: {message}")
        self.key = key
        self.expected = expected


class IntegrityError(StoreError):
    """An object's bytes do not match the sha256 (or size) recorded when it was stored."""

    def __init__(self, name: str, *, expected: str, actual: str) -> None:
        super().__init__(f"object {name!r} is corrupt: expected {expected}, read {actual}")
        self.name = name
        self.expected = expected
        self.actual = actual


@contextmanager
def map_exceptions(mapping: dict[type[BaseException], type[FedbusError]]) -> Iterator[None]:
    """Translate backend exceptions into fedbus errors at a transport's edge.

    ``mapping`` maps a backend exception type to the fedbus error raised in its place (the original is kept
    as ``__cause__``). ``asyncio.CancelledError`` always passes through untouched.
    """
    try:
        yield
    except asyncio.CancelledError:
        raise
    except FedbusError:
        raise
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(f"{type(exc).__name__}: {exc}") from exc
        raise
