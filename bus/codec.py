"""The wire format: a MessagePack envelope around a MessagePack payload. No I/O here.

Envelope (a msgpack map; decodable with plain ``msgpack.unpackb``, see ``tests/vectors``)::

    id     str   26-char ULID: unique and sortable by time
    type   str   "<domain>.<name>", e.g. "jobs.offer"
    v      int   schema version of the payload
    src    str   id of the agent that published it
    time   int   nanoseconds since the Unix epoch
    data   bin   the payload, itself msgpack (a map of the event's fields)
    trace  str?  correlation / trace id, carried across a flow
    reply  str?  subject to answer on (request/reply over transports without native replies)
    sig    bin?  Ed25519 signature over the signing bytes (see :func:`signing_bytes`)
    kid    str?  id of the key that made ``sig``

The payload travels as bytes so that a signature covers exactly what was sent, unknown event types pass
through inspectors untouched, and a subscriber rejects a frame by its envelope without decoding the payload.
Limits are checked before anything is decoded.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from .errors import CodecError, FrameTooLarge, MalformedFrame, SchemaError
from .events import CATALOGUE, Catalogue, Event

__all__ = ["Codec", "Envelope", "Limits", "field_of", "new_id", "signing_bytes"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits → 2 characters
_COUNTER_MAX = (1 << 20) - 1


class _UlidSource:
    """Monotonic ULIDs: 48 bits of milliseconds, then 80 bits: 60 random per millisecond and a 20-bit counter.

    The 24-character prefix is built once per millisecond; each id then costs one counter step (this sits on
    every publish). Ids made in one process sort in creation order; across processes, by millisecond.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._prefix = ""
        self._counter = 0

    def _new_prefix(self, ms: int) -> None:
        chars = []
        value = ms
        for _ in range(10):
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        rand = int.from_bytes(os.urandom(8), "big") >> 4  # 60 bits = 12 characters
        p = _PAIRS
        self._prefix = ("".join(reversed(chars)) + p[rand >> 50] + p[(rand >> 40) & 1023]
                        + p[(rand >> 30) & 1023] + p[(rand >> 20) & 1023] + p[(rand >> 10) & 1023]
                        + p[rand & 1023])
        self._last_ms = ms
        self._counter = 0

    def __call__(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                self._new_prefix(ms)
            elif self._counter < _COUNTER_MAX:  # same millisecond, or the clock stepped back
                self._counter += 1
            else:  # a million ids in one millisecond: borrow the next one to stay sorted
                self._new_prefix(self._last_ms + 1)
            c = self._counter
            return self._prefix + _PAIRS[c >> 10] + _PAIRS[c & 1023]


new_id = _UlidSource()
new_id.__doc__ = "A new 26-character ULID: unique, and sorts by creation time."


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The wire envelope around every event payload."""

    id: str
    type: str
    v: int
    src: str
    time: int
    data: bytes
    trace: str | None = None
    reply: str | None = None
    sig: bytes | None = None
    kid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds checked on every incoming frame, before and while decoding."""

    max_frame_bytes: int = 1024 * 1024
    """Larger frames are rejected unread. Large blobs go through the object store, never one event."""
    max_depth: int = 32
    """Nesting depth for schema-less decoding (inspector, unknown types); typed payloads are bounded by type."""
    max_container_len: int = 100_000
    """Elements in one array or map, and bytes in one string, for schema-less decoding."""


def signing_bytes(env: Envelope) -> bytes:
    """The bytes a signature covers: every envelope field except ``sig`` itself (``kid`` included)."""
    return _SIGN_ENCODER.encode((env.id, env.type, env.v, env.src, env.time, env.trace, env.reply, env.kid,
                                 env.data))


_SIGN_ENCODER = msgspec.msgpack.Encoder()


class Codec:
    """Encodes events into frames and decodes frames into events, enforcing :class:`Limits`."""

    def __init__(self, *, catalogue: Catalogue | None = None, limits: Limits | None = None) -> None:
        self.catalogue = CATALOGUE if catalogue is None else catalogue
        self.limits = limits or Limits()
        self._encoder = msgspec.msgpack.Encoder()
        self._envelope_decoder = msgspec.msgpack.Decoder(Envelope)
        self._decoders: dict[type[Event], msgspec.msgpack.Decoder[Any]] = {}

    # -- outgoing ---------------------------------------------------------------------------------------
    def envelope(
        self,
        event: Event,
        *,
        source: str,
        trace: str | None = None,
        reply: str | None = None,
        event_id: str | None = None,
        time_ns: int | None = None,
    ) -> Envelope:
        """Wrap ``event`` in a new (unsigned) envelope."""
        spec = event.spec
        return Envelope(
            id=event_id or new_id(),
            type=spec.type,
            v=spec.version,
            src=source,
            time=time.time_ns() if time_ns is None else time_ns,
            data=self._encoder.encode(event),
            trace=trace,
            reply=reply,
        )

    def pack(self, env: Envelope) -> bytes:
        """The frame for an envelope."""
        frame = self._encoder.encode(env)
        if len(frame) > self.limits.max_frame_bytes:
            raise FrameTooLarge(len(frame), self.limits.max_frame_bytes)
        return frame

    # -- incoming ---------------------------------------------------------------------------------------
    def unpack(self, frame: bytes, *, subject: str | None = None) -> Envelope:
        """Check a frame against the limits and decode its envelope (not its payload)."""
        if len(frame) > self.limits.max_frame_bytes:
            raise FrameTooLarge(len(frame), self.limits.max_frame_bytes, subject=subject)
        try:
            return self._envelope_decoder.decode(frame)
        except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a str
            raise MalformedFrame(f"not a fedbus envelope: {exc}", subject=subject) from None

    def decode(self, env: Envelope, *, subject: str | None = None) -> Event:
        """Decode and validate an envelope's payload into its event class."""
        cls = self.catalogue.lookup(env.type, env.v, subject=subject)
        decoder = self._decoders.get(cls)
        if decoder is None:
            decoder = self._decoders[cls] = msgspec.msgpack.Decoder(cls)
        try:
            return decoder.decode(env.data)
        except msgspec.ValidationError as exc:
            raise SchemaError(str(exc), event_type=env.type, field=field_of(exc), subject=subject) from None
        except (msgspec.MsgspecError, ValueError) as exc:
            raise SchemaError(f"payload is not valid msgpack: {exc}", event_type=env.type, subject=subject) from None

    def decode_untyped(self, data: bytes) -> Any:
        """Decode msgpack without a schema (inspector, unknown types), within the container/depth limits."""
        lim = self.limits
        try:
            obj = msgpack.unpackb(
                data, raw=False, strict_map_key=False, max_str_len=lim.max_container_len,
                max_bin_len=lim.max_frame_bytes, max_array_len=lim.max_container_len,
                max_map_len=lim.max_container_len, max_ext_len=lim.max_container_len,
            )
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise MalformedFrame(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
        _check_depth(obj, lim.max_depth)
        return obj


_NAMED_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`")
_AT = re.compile(r" - at `(?:key` in `)?\$\.?([^`]*)`$")


def field_of(error: msgspec.ValidationError | str) -> str | None:
    """The field a msgspec validation error is about, as a path from the top of the object; ``None`` when
    the whole value is wrong.

    ``Expected `int`, got `str` - at `$.gpus` `` → ``gpus``; ``... - at `$.lines[0].text` `` →
    ``lines[0].text``; ``Object missing required field `price` - at `$.capacity` `` → ``capacity.price``.
    Every place that turns a ``msgspec.ValidationError`` into a fedbus error names the field with this.
    """
    message = str(error)
    at = _AT.search(message)
    path = at.group(1) if at else ""
    named = _NAMED_FIELD.match(message)
    if named:
        return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


def _check_depth(obj: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                raise CodecError(f"nesting deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
