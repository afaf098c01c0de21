"""Ed25519 signatures, trusted keys, replay protection, and the Bus's strict mode."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fedbus.bus import (
    AgentKey,
    Bus,
    Catalogue,
    Codec,
    Event,
    KeyRing,
    MemoryBroker,
    MemoryTransport,
    ReplayGuard,
    Security,
    event,
)
from fedbus.bus.errors import BadSignature, ConfigError, ReplayedEvent, UnknownKey, UnsignedEvent

CAT = Catalogue()


@event("test", "award", key="job_id", signed=True, catalogue=CAT)
class Award(Event):
    job_id: str
    agent: str


@event("test", "note", catalogue=CAT)
class Note(Event):
    text: str


def _env(key: AgentKey | None = None, **kw: object):
    codec = Codec(catalogue=CAT)
    env = codec.envelope(Award(job_id="J1", agent="gpu-1"), source="sched", **kw)  # type: ignore[arg-type]
    if key is not None:
        key.sign(env)
    return env


def test_sign_and_verify() -> None:
    key = AgentKey.generate()
    ring = KeyRing({key.kid: key.public_raw})
    env = _env(key)
    ring.verify(env)
    assert env.kid == key.kid and env.sig is not None and len(env.sig) == 64


@pytest.mark.parametrize("field,value", [("data", b"\x80"), ("src", "mallory"), ("time", 1), ("id", "X" * 26),
                                         ("type", "test.other"), ("reply", "fedbus.x")])
def test_any_altered_field_breaks_the_signature(field: str, value: object) -> None:
    key = AgentKey.generate()
    env = _env(key)
    setattr(env, field, value)
    with pytest.raises(BadSignature):
        KeyRing({key.kid: key.public_raw}).verify(env)


def test_unknown_key_and_unsigned() -> None:
    env = _env(AgentKey.generate())
    with pytest.raises(UnknownKey):
        KeyRing().verify(env)
    with pytest.raises(UnsignedEvent):
        KeyRing().verify(_env())


def test_key_swap_is_forgery() -> None:
    """Re-labelling a signature with a trusted key id does not make it valid."""
    trusted, mallory = AgentKey.generate(), AgentKey.generate()
    env = _env(mallory)
    env.kid = trusted.kid
    with pytest.raises(BadSignature):
        KeyRing({trusted.kid: trusted.public_raw}).verify(env)


def test_replay_guard() -> None:
    guard = ReplayGuard(window_s=60)
    env = _env(AgentKey.generate())
    guard.check(env)
    with pytest.raises(ReplayedEvent, match="already"):
        guard.check(env)
    old = _env(AgentKey.generate(), time_ns=time.time_ns() - 120 * 10**9)
    with pytest.raises(ReplayedEvent, match="window"):
        guard.check(old)


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window_s=60, max_ids=100)
    for _ in range(1000):
        guard.check(_env())
    assert len(guard._seen) <= 100


def test_key_persisted_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent.key"
    first = AgentKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AgentKey.load_or_create(path).kid == first.kid
    path.write_text("not a key")
    with pytest.raises(ConfigError):
        AgentKey.load_or_create(path)


def test_keyring_file_round_trip(tmp_path: Path) -> None:
    key = AgentKey.generate()
    ring = KeyRing({key.kid: key.public_raw})
    ring.dump(tmp_path / "keys.json")
    assert key.kid in KeyRing.load(tmp_path / "keys.json")
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(ConfigError):
        KeyRing.load(tmp_path / "bad.json")


async def test_strict_bus_drops_forged_unsigned_and_replayed_events() -> None:
    broker = MemoryBroker()
    sched_key, mallory_key = AgentKey.generate(), AgentKey.generate()
    codec = Codec(catalogue=CAT)
    ring = KeyRing({sched_key.kid: sched_key.public_raw})
    async with (
        Bus(MemoryTransport(broker), source="sched", key=sched_key, codec=codec) as sched,
        Bus(MemoryTransport(broker), source="mallory", key=mallory_key, codec=codec) as mallory,
        Bus(MemoryTransport(broker), source="gpu-1", keyring=ring, security=Security.STRICT, codec=codec) as gpu,
    ):
        awards = await gpu.subscribe(Award)
        notes = await gpu.subscribe(Note)
        genuine = await sched.publish(Award(job_id="J1", agent="gpu-1"))
        await mallory.publish(Award(job_id="J2", agent="mallory"))                 # unknown key
        unsigned = codec.envelope(Award(job_id="J3", agent="x"), source="sched")  # no signature
        await mallory.publish_envelope("fedbus.test.award.J3", unsigned)
        await mallory.publish_envelope("fedbus.test.award.J1", genuine)           # replay
        forged = codec.envelope(Award(job_id="J4", agent="mallory"), source="sched")
        forged.kid, forged.sig = genuine.kid, genuine.sig                          # stolen signature
        await mallory.publish_envelope("fedbus.test.award.J4", forged)
        await sched.publish(Award(job_id="J5", agent="gpu-1"))
        await mallory.publish(Note(text="unsigned notes are fine"))

        first = await awards.next(1)
        second = await awards.next(1)
        assert [first.event.job_id, second.event.job_id] == ["J1", "J5"]
        assert (await notes.next(1)).event.text == "unsigned notes are fine"
        with pytest.raises(asyncio.TimeoutError):
            await awards.next(0.05)
        assert gpu.rejected == {"UnknownKey": 1, "UnsignedEvent": 1, "ReplayedEvent": 1, "BadSignature": 1}
