"""The edge SDK's error tree. It stands alone: the SDK never imports ``fedbus.bus``.

::

    EdgeError
    ├── TopicError (ValueError)     an invalid event type, key, topic or subject (``value`` names it)
    ├── LinkError                   the MQTT connection failed to move bytes
    │   ├── ConnectFailed           the broker could not be reached (``url``)
    │   ├── LinkClosed              the client was closed
    │   ├── BufferFull              offline buffer full while disconnected (``size``, ``limit``)
    │   ├── PublishFailed           the broker did not acknowledge in time (``topic``, ``timeout``)
    │   ├── SubscribeFailed         the broker refused a subscription (``topic_filter``, ``code``)
    │   └── RequestTimeout          no reply before the deadline (``event_type``, ``timeout``)
    ├── FrameError (ValueError)     an incoming frame that cannot become an event
    │   ├── FrameTooLarge           over the size limit, rejected unread (``size``, ``limit``)
    │   └── MalformedFrame          not a valid fedbus envelope (``field`` names the bad field)
    └── SignatureError              a signature is missing, unknown or does not verify (``kid``)

``fedbus.bus.mqtt_transport`` maps these into the fedbus tree (``LinkClosed`` → ``ClosedError``, ...).
"""

from __future__ import annotations

__all__ = [
    "BufferFull",
    "ConnectFailed",
    "EdgeError",
    "FrameError",
    "FrameTooLarge",
    "LinkClosed",
    "LinkError",
    "MalformedFrame",
    "PublishFailed",
    "RequestTimeout",
    "SignatureError",
    "SubscribeFailed",
    "TopicError",
]


class EdgeError(Exception):
    """Base of every edge SDK error."""


class TopicError(EdgeError, ValueError):
    """An invalid event type, key, topic, filter or subject."""

    def __init__(self, message: str, *, value: str) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


class LinkError(EdgeError):
    """The MQTT connection failed to move bytes."""


class ConnectFailed(LinkError):
    """The broker could not be reached."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(f"{message} ({url})")
        self.url = url


class LinkClosed(LinkError):
    """The link or client was already closed."""


class BufferFull(LinkError):
    """A publish while disconnected found the offline buffer full."""

    def __init__(self, size: int, limit: int, *, unit: str = "frames") -> None:
        super().__init__(f"offline buffer full: {size} {unit} buffered, limit {limit}")
        self.size = size
        self.limit = limit


class PublishFailed(LinkError):
    """The broker did not acknowledge a QoS 1 publish (or a flush did not finish) in time."""

    def __init__(self, message: str, *, topic: str | None = None, timeout: float | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.timeout = timeout


class SubscribeFailed(LinkError):
    """The broker refused a subscription (SUBACK failure code)."""

    def __init__(self, topic_filter: str, code: int) -> None:
        super().__init__(f"broker refused subscription {topic_filter!r} (code {code:#x})")
        self.topic_filter = topic_filter
        self.code = code


class RequestTimeout(LinkError):
    """No reply to a request before its deadline."""

    def __init__(self, event_type: str, timeout: float) -> None:
        super().__init__(f"no reply to {event_type!r} within {timeout:g}s")
        self.event_type = event_type
        self.timeout = timeout


class FrameError(EdgeError, ValueError):
    """An incoming frame could not be turned into an event."""

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


class FrameTooLarge(FrameError):
    """A frame over the size limit; rejected before any decoding."""

    def __init__(self, size: int, limit: int, *, topic: str | None = None) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", topic=topic)
        self.size = size
        self.limit = limit


class MalformedFrame(FrameError):
    """Bytes that are not a valid fedbus envelope; ``field`` names the offending field when known."""

    def __init__(self, message: str, *, field: str | None = None, topic: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message, topic=topic)
        self.field = field


class SignatureError(EdgeError):
    """A signature is required but missing, made by an untrusted key, or does not verify."""

    def __init__(self, message: str, *, kid: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.kid = kid
        self.event_id = event_id
