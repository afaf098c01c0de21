"""One contract for the durable stores, run against both backends: in-memory and JetStream on a real
nats-server. Whatever an agent can rely on is asserted here, once, for both."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from fedbus.bus import Bus, Catalogue, Codec, Event, MemoryBroker, MemoryTransport, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.errors import Conflict, IntegrityError, NotFound, StoreError, SubjectError
from fedbus.bus.jetstream import JetStream, JetStreamObjectStore
from fedbus.bus.limits import BucketLimits, LimitExceeded, ObjectLimits, StorageLimits, StreamLimits
from fedbus.bus.memstores import MemoryObjectStore, MemoryStores
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.stores import EventLog, KeyValue, ObjectStore, Stores, open_stores

CAT = Catalogue()
CHUNK = 64 * 1024


@event("ctest", "done", key="job_id", durable=True, catalogue=CAT)
class Done(Event):
    job_id: str
    n: int = 0


@event("ctest", "other", durable=True, catalogue=CAT)
class Other(Event):
    note: str = ""


@event("ctest", "chatter", catalogue=CAT)
class Chatter(Event):
    """Not durable: it has no stream."""

    text: str = ""


@event("cfull", "rec", key="job_id", durable=True, catalogue=CAT)
class Rec(Event):
    """A record that matters: its stream refuses writes when full rather than evict any."""

    job_id: str
    n: int = 0
    pad: str = ""


@event("cold", "line", key="job_id", durable=True, catalogue=CAT)
class Line(Event):
    """A log line: its stream evicts the oldest when full."""

    job_id: str
    n: int = 0


LIMITS = StorageLimits(
    streams={
        "FEDBUS_CFULL": StreamLimits(max_bytes=1 << 20, max_age=3600, max_msg_size=1024, max_msgs=4,
                                     max_msgs_per_subject=2, discard="new", discard_new_per_subject=True),
        "FEDBUS_COLD": StreamLimits(max_bytes=1 << 20, max_age=3600, max_msg_size=1024, max_msgs=3,
                                    discard="old"),
    },
    kv={"ctestlim": BucketLimits(max_bytes=1 << 20, max_value_size=64)},
    objects={"ctestfull": ObjectLimits(max_bytes=CHUNK * 5 // 2, max_chunk_size=CHUNK)},
)


@pytest.fixture(params=["memory", "jetstream"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    codec = Codec(catalogue=CAT)
    if request.param == "memory":
        bus = Bus(MemoryTransport(MemoryBroker()), source="contract", codec=codec)
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        bus = Bus(NatsTransport(server.url), source="contract", codec=codec)
    async with bus:
        opened = await open_stores(bus, chunk_size=CHUNK, limits=LIMITS)
        if isinstance(opened, JetStream):  # the session's server outlives tests: start from an empty stream
            for name in ("FEDBUS_CTEST", "FEDBUS_OBJ_ctest", "KV_ctest", "KV_ctestttl", "FEDBUS_CFULL",
                         "FEDBUS_COLD", "KV_ctestlim", "FEDBUS_OBJ_ctestfull"):
                with contextlib.suppress(Exception):  # absent is fine (nats-py's own NotFoundError)
                    await opened.js.delete_stream(name)
        yield opened


def bus_of(stores: Stores) -> Bus:
    assert isinstance(stores, JetStream | MemoryStores)
    return stores.bus


def test_open_stores_picks_the_backend_from_the_transport(stores: Stores) -> None:
    expected = MemoryStores if bus_of(stores).transport.name == "memory" else JetStream
    assert isinstance(stores, expected)
    assert isinstance(stores.event_log(), EventLog)


# -- event log -----------------------------------------------------------------------------------------
async def test_published_event_is_delivered_once_acked(stores: Stores) -> None:
    log = stores.event_log()
    env = await log.publish(Done(job_id="j1", n=7))
    async with log.consume(Done, durable="worker", ack_wait=5) as consumer:
        d = await consumer.next(timeout=5)
        assert (d.event, d.envelope.id, d.delivered, d.seq) == (Done(job_id="j1", n=7), env.id, 1, 1)
        assert d.subject == Done(job_id="j1").subject()
        await d.ack(confirm=True)
    stats = {s.name: s for s in await stores.streams()}["FEDBUS_CTEST"]
    assert stats.messages == 1
    assert Done.pattern() in stats.subjects and Other.pattern() not in stats.subjects  # only what's in use
    worker = {c.name: c for c in stats.consumers}["worker"]
    assert (worker.pending, worker.ack_pending, worker.delivered_seq, worker.ack_floor) == (0, 0, 1, 1)


async def test_a_retried_envelope_is_stored_once(stores: Stores) -> None:
    log = stores.event_log()
    env = bus_of(stores).envelope(Done(job_id="j2"))
    first = await log.publish_envelope(env)
    again = await log.publish_envelope(env)
    assert not first.duplicate and again.duplicate
    assert again.seq == first.seq and first.stream == "FEDBUS_CTEST"
    stored = [s async for s in log.replay(Done.pattern())]
    assert [s.envelope.id for s in stored if s.envelope] == [env.id]


async def test_unacked_event_is_redelivered_after_ack_wait(stores: Stores) -> None:
    log = stores.event_log()
    env = await log.publish(Done(job_id="j3"))
    async with log.consume(Done, durable="slow", ack_wait=0.5, batch=1) as consumer:
        first = await consumer.next(timeout=5)
        assert first.delivered == 1  # ... and we do not ack: the lease runs out
        second = await consumer.next(timeout=10)
        assert (second.envelope.id, second.delivered) == (env.id, 2)
        await second.ack()


async def test_nak_hands_the_event_back_and_term_stops_it(stores: Stores) -> None:
    log = stores.event_log()
    await log.publish(Done(job_id="j4"))
    async with log.consume(Done, durable="naker", ack_wait=30, batch=1) as consumer:
        d = await consumer.next(timeout=5)
        await d.in_progress()
        await d.nak()
        again = await consumer.next(timeout=10)
        assert (again.envelope.id, again.delivered) == (d.envelope.id, 2)
        await again.term()
        await log.publish(Done(job_id="j5"))
        after = await consumer.next(timeout=10)
        assert after.event.job_id == "j5"  # the termed one never came back
        await after.ack()


async def test_max_deliver_bounds_redeliveries(stores: Stores) -> None:
    log = stores.event_log()
    await log.publish(Done(job_id="poison"))
    async with log.consume(Done, durable="bounded", ack_wait=0.3, max_deliver=2, batch=1) as consumer:
        counts = [(await consumer.next(timeout=10)).delivered for _ in range(2)]
        assert counts == [1, 2]
        with pytest.raises(TimeoutError):
            await consumer.next(timeout=1.5)


async def test_malformed_frame_is_dropped_and_counted_and_the_next_event_arrives(stores: Stores) -> None:
    bus, log = bus_of(stores), stores.event_log()
    await log.ensure(Done)
    # A core publish on a durable subject is captured by the stream, garbage included.
    await bus.transport.publish(Done(job_id="bad").subject(), b"\xc1 not msgpack")
    await bus.transport.flush()
    good = await log.publish(Done(job_id="good"))
    async with log.consume(Done, durable="robust", ack_wait=0.5) as consumer:
        d = await consumer.next(timeout=10)
        assert d.envelope.id == good.id and d.seq == 2
        await d.ack()
        assert consumer.dropped == 1
    assert bus.rejected["MalformedFrame"] == 1
    replayed = [s async for s in log.replay(Done.pattern())]
    assert [s.seq for s in replayed] == [1, 2]
    assert replayed[0].event is None and "MalformedFrame" in (replayed[0].error or "")
    assert replayed[1].event == Done(job_id="good")


async def test_durable_position_survives_closing_the_consumer(stores: Stores) -> None:
    log = stores.event_log()
    envs = await log.publish_many([Done(job_id=f"p{i}", n=i) for i in range(3)])
    async with log.consume(Done, durable="resumer", batch=1) as consumer:
        for _ in range(2):
            await (await consumer.next(timeout=5)).ack()
    async with log.consume(Done, durable="resumer", batch=1) as consumer:
        d = await consumer.next(timeout=5)
        assert d.envelope.id == envs[2].id


async def test_consumer_with_a_key_sees_only_that_key(stores: Stores) -> None:
    log = stores.event_log()
    await log.publish_many([Done(job_id="a", n=1), Done(job_id="b", n=2), Done(job_id="a", n=3)])
    async with log.consume(Done, durable="only-a", key="a") as consumer:
        got = [(await consumer.next(timeout=5)) for _ in range(2)]
        assert [d.event.n for d in got] == [1, 3]


async def test_publish_many_and_replay_from_a_sequence_and_a_time(stores: Stores) -> None:
    log = stores.event_log()
    envs = await log.publish_many([Done(job_id=f"m{i}", n=i) for i in range(300)])
    await log.publish(Other(note="x"))
    everything = [s async for s in log.replay("fedbus.ctest.>")]
    assert len(everything) == 301 and len({s.envelope.id for s in everything if s.envelope}) == 301
    assert {s.envelope.id for s in everything if s.envelope} >= {e.id for e in envs}
    dones = [s async for s in log.replay(Done.pattern(), start_seq=299)]
    assert [s.seq for s in dones] == [299, 300]
    since = everything[-1].time_ns
    assert [s.event async for s in log.replay("fedbus.ctest.>", start_time_ns=since)] == [Other(note="x")]


async def test_replay_of_a_pattern_no_stream_holds_is_not_found(stores: Stores) -> None:
    with pytest.raises(NotFound):
        [s async for s in stores.event_log().replay("fedbus.nowhere.>")]


async def test_only_durable_event_types_have_streams(stores: Stores) -> None:
    with pytest.raises(StoreError):
        await stores.event_log().publish(Chatter(text="hi"))


# -- key-value -----------------------------------------------------------------------------------------
async def test_kv_put_get_and_compare_and_set(stores: Stores) -> None:
    kv = await stores.key_value("ctest")
    assert isinstance(kv, KeyValue)
    r1 = await kv.create("agents.gpu-1", b"idle")
    with pytest.raises(Conflict):
        await kv.create("agents.gpu-1", b"again")
    r2 = await kv.update("agents.gpu-1", b"busy", revision=r1)
    assert r2 > r1
    with pytest.raises(Conflict):
        await kv.update("agents.gpu-1", b"stale writer", revision=r1)
    entry = await kv.get("agents.gpu-1")
    assert (entry.value, entry.revision) == (b"busy", r2)
    r3 = await kv.put("agents.gpu-2", b"idle")
    assert r3 > r2
    assert await kv.keys() == ["agents.gpu-1", "agents.gpu-2"]
    await kv.delete("agents.gpu-1")
    with pytest.raises(NotFound):
        await kv.get("agents.gpu-1")
    assert await kv.keys() == ["agents.gpu-2"]
    assert await kv.create("agents.gpu-1", b"back") > r3  # a deleted key can be created again
    with pytest.raises(SubjectError):
        await kv.put("bad key", b"")


async def test_kv_missing_key_and_empty_bucket(stores: Stores) -> None:
    kv = await stores.key_value("ctest")
    assert await kv.keys() == []
    with pytest.raises(NotFound):
        await kv.get("nobody")
    await kv.delete("nobody")  # not an error


async def test_kv_ttl_bucket_forgets_silent_keys(stores: Stores) -> None:
    kv = await stores.key_value("ctestttl", ttl=1.0)
    await kv.put("alive", b"1")
    assert (await kv.get("alive")).value == b"1"
    for _ in range(100):  # the broker expires entries on its own clock: wait for it, bounded
        if await kv.keys() == []:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await kv.get("alive")


# -- objects -------------------------------------------------------------------------------------------
async def corrupt(store: ObjectStore, name: str) -> None:
    """Make the stored bytes disagree with the recorded sha256 (through the backend's insides)."""
    if isinstance(store, MemoryObjectStore):
        _, chunks = store._objects[name]
        chunks[0] = bytes([chunks[0][0] ^ 1]) + chunks[0][1:]
    else:
        assert isinstance(store, JetStreamObjectStore)
        from fedbus.bus.jetstream import _META_ENCODER

        meta = await store._meta(name)
        assert meta is not None
        forged = msgspec.structs.replace(meta, sha256="0" * 64)
        await store._owner.js.publish(store._meta_subject(name), _META_ENCODER.encode(forged),
                                      headers={"Nats-Rollup": "sub"})


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
async def test_object_round_trip(stores: Stores, size: int) -> None:
    objects = await stores.object_store("ctest")
    data = os.urandom(size)
    info = await objects.put_bytes("model.pt", data)
    assert (info.name, info.size, info.sha256) == ("model.pt", size, hashlib.sha256(data).hexdigest())
    assert info.chunks == -(-size // CHUNK)
    assert await objects.get_bytes("model.pt") == data
    assert await objects.info("model.pt") == info


async def test_put_stream_recuts_any_pieces_and_get_stream_verifies(stores: Stores) -> None:
    objects = await stores.object_store("ctest")
    pieces = [os.urandom(n) for n in (10, CHUNK * 2 + 3, 1, CHUNK - 7, 0, 5000)]

    async def feed() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    info = await objects.put_stream("w/with spaces & unicode é", feed())
    whole = b"".join(pieces)
    assert info.size == len(whole) and info.chunks == -(-len(whole) // CHUNK)
    got = [chunk async for chunk in objects.get_stream("w/with spaces & unicode é")]
    assert all(len(c) <= CHUNK for c in got) and b"".join(got) == whole


async def test_file_round_trip(stores: Stores, tmp_path: Path) -> None:
    objects = await stores.object_store("ctest")
    src, dst = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    dst.parent.mkdir()
    src.write_bytes(os.urandom(5 * CHUNK + 123))
    put = await objects.put_file("weights", src)
    got = await objects.get_file("weights", dst)
    assert got == put and dst.read_bytes() == src.read_bytes()
    assert os.listdir(dst.parent) == ["dst.bin"]  # no temp file left behind


async def test_corrupt_object_raises_and_get_file_leaves_no_file(stores: Stores, tmp_path: Path) -> None:
    objects = await stores.object_store("ctest")
    await objects.put_bytes("blob", os.urandom(2 * CHUNK + 1))
    await corrupt(objects, "blob")
    with pytest.raises(IntegrityError) as caught:
        await objects.get_file("blob", tmp_path / "blob.bin")
    assert caught.value.name == "blob"
    assert os.listdir(tmp_path) == []
    with pytest.raises(IntegrityError):
        await objects.get_bytes("blob")
    with pytest.raises(IntegrityError):
        [c async for c in objects.get_stream("blob")]


async def test_replace_delete_and_list(stores: Stores) -> None:
    objects = await stores.object_store("ctest")
    first = await objects.put_bytes("b", b"one" * 50_000)
    await objects.put_bytes("a", b"A")
    second = await objects.put_bytes("b", b"two")
    assert second.version != first.version
    assert await objects.get_bytes("b") == b"two"
    assert [(i.name, i.size) for i in await objects.list()] == [("a", 1), ("b", 3)]
    await objects.delete("b")
    with pytest.raises(NotFound):
        await objects.info("b")
    with pytest.raises(NotFound):
        await objects.get_bytes("b")
    assert [i.name for i in await objects.list()] == ["a"]
    await objects.delete("b")  # deleting twice is fine


async def test_failed_put_leaves_the_previous_object(stores: Stores) -> None:
    objects = await stores.object_store("ctest")
    await objects.put_bytes("keep", b"old")

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(CHUNK * 2)
        raise OSError("disk went away")

    with pytest.raises(OSError):
        await objects.put_stream("keep", broken())
    assert await objects.get_bytes("keep") == b"old"



# -- limits: the same on both backends ----------------------------------------------------------------------
def retries(stores: Stores) -> int:
    return stores.retries if isinstance(stores, JetStream) else 0


async def test_a_full_discard_new_stream_refuses_new_events_and_keeps_every_stored_one(stores: Stores) -> None:
    log = stores.event_log()
    kept = [await log.publish(Rec(job_id="a", n=i)) for i in range(2)]
    before = retries(stores)  # (the first publish found no stream, created it and went again)
    with pytest.raises(LimitExceeded) as per_subject:  # a flood on one job's subject stops at its limit
        await log.publish(Rec(job_id="a", n=2))
    assert "per subject" in str(per_subject.value) and per_subject.value.store == "FEDBUS_CFULL"
    kept += [await log.publish(Rec(job_id="b", n=i)) for i in range(2)]
    with pytest.raises(LimitExceeded, match="maximum messages exceeded"):  # the stream is full
        await log.publish(Rec(job_id="c"))
    with pytest.raises(LimitExceeded, match="maximum messages exceeded"):  # a batch, with acks in flight
        await log.publish_many([Rec(job_id="d"), Rec(job_id="e")])
    assert retries(stores) == before  # refused at once: a full stream is not a broker coming back
    assert [s.envelope.id for s in [s async for s in log.replay(Rec.pattern())] if s.envelope] == [
        e.id for e in kept]
    stats = {s.name: s for s in await log.streams()}["FEDBUS_CFULL"]
    assert (stats.messages, stats.max_msgs, stats.discard) == (4, 4, "new")


async def test_a_discard_old_stream_evicts_its_oldest_and_consumers_go_on(stores: Stores) -> None:
    log = stores.event_log()
    await log.publish_many([Line(job_id="j", n=i) for i in range(5)])
    assert [s.event.n for s in [s async for s in log.replay(Line.pattern())] if isinstance(s.event, Line)] == [
        2, 3, 4]
    async with log.consume(Line, durable="late") as consumer:
        got = [(await consumer.next(timeout=5)) for _ in range(3)]
        assert [d.event.n for d in got] == [2, 3, 4] and [d.seq for d in got] == [3, 4, 5]
        for d in got:
            await d.ack()
    stats = {s.name: s for s in await log.streams()}["FEDBUS_COLD"]
    assert (stats.messages, stats.first_seq, stats.last_seq, stats.discard) == (3, 3, 5, "old")


async def test_an_event_over_its_streams_max_msg_size_is_refused(stores: Stores) -> None:
    log = stores.event_log()
    await log.ensure(Rec)
    with pytest.raises(LimitExceeded, match="message size"):
        await log.publish(Rec(job_id="big", pad="x" * 2000))
    assert retries(stores) == 0
    await log.publish(Rec(job_id="small"))
    assert [s.event for s in [s async for s in log.replay(Rec.pattern())]] == [Rec(job_id="small")]


async def test_a_core_publish_over_the_limits_is_not_stored(stores: Stores) -> None:
    """What a hostile client does: a big frame on a durable subject without asking for an ack."""
    log = stores.event_log()
    bus = bus_of(stores)
    await log.ensure(Rec)
    junk = bus.envelope(Rec(job_id="junk", pad="x" * 4000))
    await bus.publish_envelope(Rec(job_id="junk").subject(), junk)
    await bus.transport.flush()
    after = await log.publish(Rec(job_id="after"))  # acknowledged: anything sent before it was handled
    assert [s.envelope.id for s in [s async for s in log.replay(Rec.pattern())] if s.envelope] == [after.id]


async def test_kv_refuses_a_value_over_the_buckets_limit(stores: Stores) -> None:
    kv = await stores.key_value("ctestlim")
    await kv.put("k", b"v" * 64)
    with pytest.raises(LimitExceeded):
        await kv.put("k", b"v" * 65)
    with pytest.raises(LimitExceeded):
        await kv.create("other", b"v" * 100)
    assert (await kv.get("k")).value == b"v" * 64 and await kv.keys() == ["k"]


async def test_a_full_object_bucket_refuses_new_objects_and_keeps_the_old(stores: Stores) -> None:
    objects = await stores.object_store("ctestfull")
    first = os.urandom(2 * CHUNK)
    await objects.put_bytes("first", first)
    with pytest.raises(LimitExceeded):
        await objects.put_bytes("second", os.urandom(CHUNK))
    assert await objects.get_bytes("first") == first
    assert [i.name for i in await objects.list()] == ["first"]
