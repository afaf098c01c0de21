"""Hostile frames, as an attacker with a device credential would send them: garbage, decoder bombs, huge frames,
and schema-valid envelopes with hostile values (path traversal, 10 KB strings, NUL, odd unicode, extreme numbers),
signed with the attacker's own key so that they pass every check but the ones that matter."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from fedbus.bus.codec import Codec
from fedbus.bus.events import Event
from fedbus.bus.signing import AgentKey

HOSTILE_STRINGS = [
    "../../../victim", "..", "/etc/passwd", "a" * 10_000, "nul\x00byte", "\u202egnp.exe", "🦜" * 500,
    "x.y.z", "*", ">", "#", "+", "", " ", "\r\nINJECT", "$JS.API.STREAM.DELETE.FEDBUS_JOBS",
]
HOSTILE_NUMBERS: list[Any] = [-1, 0, 2**63 - 1, -(2**63), 2**64 - 1, float("nan"), float("inf"), -0.0, 1e308]


def garbage(rng: random.Random) -> Iterator[bytes]:
    """Frames that are not envelopes at all."""
    yield b""
    yield b"\xc1"  # never used in msgpack
    yield rng.randbytes(rng.randint(1, 4096))
    yield b"\x91" * 20_000 + b"\xc0"  # an array nested 20,000 deep
    yield b"\xdd\xff\xff\xff\xff"  # an array claiming 2^32 - 1 items
    yield b"\xdb\xff\xff\xff\xff" + b"x" * 16  # a str claiming 4 GiB
    yield b"\xdf\xff\xff\xff\xff"  # a map claiming 2^32 - 1 pairs
    yield msgpack.packb({"id": 1, "type": ["not", "a", "str"], "v": "one"})
    yield msgpack.packb([1, 2, 3] * 1000)
    yield b"\xff" * 2 * 1024 * 1024  # 2 MiB of junk


def envelope(codec: Codec, key: AgentKey, event_type: str, data: dict[str, Any], *, source: str) -> bytes:
    """A well-formed, signed envelope of ``event_type`` whose payload is ``data`` as given (no schema check)."""
    from fedbus.bus.catalogue import Heartbeat

    env = codec.envelope(Heartbeat(agent_id="x"), source=source)
    env.type = event_type
    env.data = msgpack.packb(data, use_bin_type=True)
    key.sign(env)
    return codec.pack(env)


def hostile_values(rng: random.Random) -> dict[str, Any]:
    """A payload of every shape: hostile strings and numbers under the field names our events use."""
    fields = ["job_id", "agent_id", "run_id", "client_id", "device_id", "reason", "text", "round", "attempt",
              "seq", "exit_code", "phase", "node_rank", "ok", "capacity", "lines", "params", "to", "kind",
              "status", "instance", "interval_s", "num_examples", "blob", "metrics"]
    out: dict[str, Any] = {}
    for name in rng.sample(fields, rng.randint(1, len(fields))):
        out[name] = rng.choice([rng.choice(HOSTILE_STRINGS), rng.choice(HOSTILE_NUMBERS), None, [], {},
                                {"nested": rng.choice(HOSTILE_STRINGS)}, b"\x00" * rng.randint(0, 512)])
    return out


def valid(cls: type[Event], rng: random.Random, **fields: Any) -> dict[str, Any]:
    """Fields that pass the schema of ``cls`` where they can, hostile everywhere the schema lets them be."""
    text = rng.choice(["a" * 10_000, "nul\x00", "\u202e", "🦜" * 100, "\r\n"])
    out: dict[str, Any] = {"reason": text, "text": text}
    out.update(fields)
    return {k: v for k, v in out.items() if k in cls.__struct_fields__}


FrameMaker = Callable[[random.Random], bytes]


def stream_of_frames(makers: list[tuple[str, FrameMaker]], total: int, *, seed: int = 7) -> Iterator[tuple[str, bytes]]:
    """``total`` (subject, frame) pairs drawn round-robin from ``makers``."""
    rng = random.Random(seed ^ int.from_bytes(os.urandom(2), "big"))
    for i in range(total):
        subject, make = makers[i % len(makers)]
        yield subject, make(rng)
