"""How the inspector shows a frame: a JSON-able record (``--json``) or one readable coloured line.

Every frame gets a record, whatever it holds: a known event is decoded and validated against its class, an
unknown type is decoded without a schema (within the codec's limits), and bytes that are not a fedbus envelope
become ``{"subject": ..., "error": ..., "bytes": N}``. Rendering never raises on bad input.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich.text import Text

from .codec import Codec, Envelope
from .errors import CodecError, UnknownEventType

__all__ = ["MAX_INLINE_BYTES", "event_record", "format_time", "frame_record", "human_line", "json_line"]

MAX_INLINE_BYTES = 64
"""Byte strings up to this size are shown as base64; longer ones as ``<N bytes>``."""


def format_time(time_ns: int) -> str:
    """ISO-8601 in UTC with microseconds, e.g. ``2025-01-31T12:00:00.123456+00:00``."""
    return datetime.fromtimestamp(time_ns / 1e9, tz=UTC).isoformat(timespec="microseconds")


def _plain(obj: Any) -> Any:
    """JSON-able copy of decoded data: bytes as base64 (short) or a size summary, keys as strings."""
    if isinstance(obj, bytes | bytearray | memoryview):
        raw = bytes(obj)
        return base64.b64encode(raw).decode() if len(raw) <= MAX_INLINE_BYTES else f"<{len(raw)} bytes>"
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def event_record(subject: str, env: Envelope, codec: Codec) -> dict[str, Any]:
    """The record of a well-formed envelope: its typed payload, or its schema-less one with a note why."""
    record: dict[str, Any] = {
        "subject": subject, "type": env.type, "v": env.v, "id": env.id, "source": env.src,
        "time": format_time(env.time), "trace": env.trace, "signed": env.sig is not None,
    }
    if env.kid is not None:
        record["kid"] = env.kid
    if env.reply is not None:
        record["reply"] = env.reply
    try:
        event = codec.decode(env, subject=subject)
        record["data"] = _plain(msgspec.to_builtins(event, builtin_types=(bytes,), enc_hook=str))
        return record
    except UnknownEventType:
        record["known"] = False
    except CodecError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    try:
        record["data"] = _plain(codec.decode_untyped(env.data))
    except CodecError as exc:
        record.setdefault("error", f"{type(exc).__name__}: {exc}")
        record["data"] = f"<{len(env.data)} bytes>"
    return record


def frame_record(subject: str, data: bytes, codec: Codec) -> dict[str, Any]:
    """The record of any frame; undecodable ones become ``{"subject", "error", "bytes"}``."""
    try:
        env = codec.unpack(data, subject=subject)
    except CodecError as exc:
        return {"subject": subject, "error": f"{type(exc).__name__}: {exc}", "bytes": len(data)}
    return event_record(subject, env, codec)


def json_line(record: dict[str, Any]) -> str:
    """One compact JSON line."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def _summary(data: Any, limit: int = 160) -> str:
    if isinstance(data, dict):
        text = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in data.items())
    else:
        text = json.dumps(data, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_line(record: dict[str, Any]) -> Text:
    """One readable coloured line for a terminal."""
    line = Text(no_wrap=False)
    if "type" not in record:  # undecodable frame
        line.append("undecodable ", style="bold red")
        line.append(record["subject"], style="cyan")
        line.append(f"  {record['bytes']} bytes  ", style="dim")
        line.append(record["error"], style="red")
        return line
    line.append(record["time"][11:23], style="dim")
    line.append(" ")
    line.append(record["type"], style="bold magenta" if record.get("known", True) else "magenta")
    line.append(f" v{record['v']}" if record["v"] != 1 else "", style="magenta")
    line.append("  ")
    line.append(record["subject"], style="cyan")
    line.append("  from ", style="dim")
    line.append(record["source"], style="green")
    if record["signed"]:
        line.append("  signed", style="yellow")
    if record.get("trace"):
        line.append(f"  trace={record['trace']}", style="dim")
    if record.get("known") is False:
        line.append("  (unknown type)", style="dim")
    if "error" in record:
        line.append(f"  {record['error']}", style="red")
    line.append("  ")
    line.append(_summary(record.get("data")))
    return line
