"""fedbus envelopes with plain ``msgpack``: the same bytes as ``fedbus.bus.codec``, no msgspec. No I/O here.

An envelope is a msgpack map, keys in this order, optional keys left out when empty::

    id     str   26-char ULID: unique, sorts by time; also the idempotency key of the event
    type   str   "<domain>.<name>"
    v      int   schema version of the payload
    src    str   id of the device or agent that published it
    time   int   nanoseconds since the Unix epoch
    data   bin   the payload: msgpack of a map of the event's fields
    trace  str?  correlation id
    reply  str?  subject to answer on
    sig    bin?  Ed25519 signature over :func:`signing_bytes`
    kid    str?  id of the signing key

``tests/vectors`` holds frames produced by fedbus's typed codec that this module must decode, and proves the
reverse. Incoming frames are checked against :class:`FrameLimits` before and while decoding: an edge device
receives untrusted input too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import FrameTooLarge, MalformedFrame

__all__ = ["FrameLimits", "decode_data", "make_envelope", "new_id", "pack", "signing_bytes", "unpack"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class _UlidSource:
    """Monotonic ULIDs: 48 bits of milliseconds then 80 random bits, incremented within one millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
                self._last_rand = (self._last_rand + 1) & ((1 << 80) - 1)
            else:
                self._last_ms = ms
                self._last_rand = int.from_bytes(os.urandom(10), "big") >> 1
            value = (ms << 80) | self._last_rand
        chars = []
        for _ in range(26):
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        return "".join(reversed(chars))


new_id = _UlidSource()
new_id.__doc__ = "A new 26-character ULID: unique, and sorts by creation time."


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameLimits:
    """Bounds on incoming frames (the same defaults as ``fedbus.bus.codec.Limits``)."""

    max_frame_bytes: int = 1024 * 1024
    """Larger frames are rejected unread."""
    max_depth: int = 32
    """Nesting depth of a payload."""
    max_container_len: int = 100_000
    """Elements in one array or map, and characters in one string."""


_REQUIRED: tuple[tuple[str, type], ...] = (
    ("id", str), ("type", str), ("v", int), ("src", str), ("time", int), ("data", bytes),
)
_OPTIONAL: tuple[tuple[str, type], ...] = (("trace", str), ("reply", str), ("sig", bytes), ("kid", str))


def make_envelope(
    event_type: str,
    data: Mapping[str, Any],
    *,
    source: str,
    version: int = 1,
    trace: str | None = None,
    reply: str | None = None,
    event_id: str | None = None,
    time_ns: int | None = None,
) -> dict[str, Any]:
    """A new unsigned envelope (a dict in wire order) around ``data``, a map of the event's fields."""
    return {
        "id": event_id or new_id(),
        "type": event_type,
        "v": version,
        "src": source,
        "time": time.time_ns() if time_ns is None else time_ns,
        "data": msgpack.packb(dict(data), use_bin_type=True),
        "trace": trace,
        "reply": reply,
        "sig": None,
        "kid": None,
    }


def pack(env: Mapping[str, Any]) -> bytes:
    """The frame for an envelope: wire key order, optional keys with no value left out."""
    ordered = {name: env[name] for name, _ in _REQUIRED}
    for name, _ in _OPTIONAL:
        if env.get(name) is not None:
            ordered[name] = env[name]
    return msgpack.packb(ordered, use_bin_type=True)


def signing_bytes(env: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every field but ``sig`` (``kid`` included), as ``fedbus.bus.codec``."""
    return msgpack.packb(
        [env["id"], env["type"], env["v"], env["src"], env["time"], env.get("trace"), env.get("reply"),
         env.get("kid"), env["data"]],
        use_bin_type=True,
    )


def _unpackb(data: bytes, limits: FrameLimits, *, topic: str | None, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_str_len=limits.max_container_len, max_bin_len=limits.max_frame_bytes,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
            max_ext_len=limits.max_container_len,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedFrame(f"undecodable {what}: {type(exc).__name__}: {exc}", topic=topic) from None


def unpack(frame: bytes, *, limits: FrameLimits | None = None, topic: str | None = None) -> dict[str, Any]:
    """Check a frame against the limits and decode its envelope (not its payload) into a dict."""
    limits = limits or FrameLimits()
    if len(frame) > limits.max_frame_bytes:
        raise FrameTooLarge(len(frame), limits.max_frame_bytes, topic=topic)
    obj = _unpackb(frame, limits, topic=topic, what="envelope")
    if not isinstance(obj, dict):
        raise MalformedFrame(f"an envelope is a map, not {type(obj).__name__}", topic=topic)
    env: dict[str, Any] = {}
    for name, kind in _REQUIRED:
        if name not in obj:
            raise MalformedFrame("missing", field=name, topic=topic)
        env[name] = _typed(obj[name], kind, name, topic)
    for name, kind in _OPTIONAL:
        value = obj.get(name)
        env[name] = None if value is None else _typed(value, kind, name, topic)
    return env


def _typed(value: Any, kind: type, name: str, topic: str | None) -> Any:
    # bool is an int in Python but not in msgpack (nor in fedbus's typed codec).
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedFrame(f"expected {kind.__name__}, got {type(value).__name__}", field=name, topic=topic)
    return value


def decode_data(env: Mapping[str, Any], *, limits: FrameLimits | None = None,
                topic: str | None = None) -> dict[str, Any]:
    """Decode an envelope's payload into a dict of the event's fields, within the limits."""
    limits = limits or FrameLimits()
    obj = _unpackb(env["data"], limits, topic=topic, what="payload")
    if not isinstance(obj, dict):
        raise MalformedFrame(f"a payload is a map, not {type(obj).__name__}", field="data", topic=topic)
    _check_depth(obj, limits.max_depth, topic)
    return obj


def _check_depth(obj: Any, limit: int, topic: str | None) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise MalformedFrame(f"nesting deeper than {limit} levels", field="data", topic=topic)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
