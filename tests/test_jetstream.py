"""JetStream durability against a real nats-server that is restarted and killed under load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgpack
import msgspec
import pytest

from fedbus.bus import AgentKey, Bus, Catalogue, Codec, Event, Security, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.jetstream import _META_ENCODER, JetStream, JetStreamEventLog, _Meta
from fedbus.bus.nats_transport import NatsTransport

CAT = Catalogue()


@event("jstest", "step", key="job_id", durable=True, catalogue=CAT)
class Step(Event):
    job_id: str
    n: int


@event("jstest", "order", key="job_id", durable=True, signed=True, catalogue=CAT)
class Order(Event):
    """Durable and signed: strict buses require a trusted signature."""

    job_id: str


@pytest.fixture
async def js(fresh_nats: NatsServer) -> AsyncIterator[JetStream]:
    transport = NatsTransport(fresh_nats.url, reconnect_wait=0.05)
    async with Bus(transport, source="producer", codec=Codec(catalogue=CAT)) as bus:
        # Short API timeouts so a publish lost in a restart is retried quickly (with the same id).
        yield await JetStream.open(bus, api_timeout=1.0, publish_timeout=30.0, publish_window=64)


async def stored_ids(log: JetStreamEventLog, pattern: str) -> list[str]:
    return [s.envelope.id async for s in log.replay(pattern) if s.envelope is not None]


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_no_acknowledged_event_is_lost_or_doubled_across_a_broker_restart(
    js: JetStream, fresh_nats: NatsServer, how: str
) -> None:
    log = js.event_log()
    await log.ensure(Step)
    acked: list[str] = []
    halfway = asyncio.Event()

    async def one_by_one() -> None:
        for n in range(150):
            acked.append((await log.publish(Step(job_id="single", n=n))).id)
            if n == 40:
                halfway.set()

    async def in_batches() -> None:
        for b in range(6):
            envs = await log.publish_many([Step(job_id="batch", n=b * 50 + i) for i in range(50)])
            acked.extend(env.id for env in envs)

    async def bounce() -> None:
        await halfway.wait()
        if how == "restart":
            await asyncio.to_thread(fresh_nats.restart)  # SIGTERM, then start on the same ports and data
        else:
            await asyncio.to_thread(fresh_nats.kill)  # SIGKILL, as a crash
            await asyncio.to_thread(fresh_nats.start)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(one_by_one())
        tg.create_task(in_batches())
        tg.create_task(bounce())

    assert isinstance(js.bus.transport, NatsTransport) and js.bus.transport.reconnects >= 1
    stored = await stored_ids(log, Step.pattern())
    assert len(acked) == 450 == len(set(acked))
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == set(acked), "an acknowledged event is missing"


async def test_retried_envelope_is_not_stored_twice_even_after_a_restart(
    js: JetStream, fresh_nats: NatsServer
) -> None:
    log = js.event_log()
    env = js.bus.envelope(Step(job_id="dedup", n=1))
    first = await log.publish_envelope(env)
    await asyncio.to_thread(fresh_nats.restart)
    again = await log.publish_envelope(env)
    assert again.duplicate and again.seq == first.seq
    assert await stored_ids(log, Step.pattern()) == [env.id]


async def test_unacked_event_comes_back_after_ack_wait_across_a_restart(
    js: JetStream, fresh_nats: NatsServer
) -> None:
    log = js.event_log()
    env = await log.publish(Step(job_id="lease", n=1))
    async with log.consume(Step, durable="leaser", ack_wait=1.0, batch=1) as consumer:
        first = await consumer.next(timeout=5)
        assert first.envelope.id == env.id and first.delivered == 1
        await asyncio.to_thread(fresh_nats.restart)  # the consumer and its pending lease are on disk
        second = await consumer.next(timeout=20)
        assert second.envelope.id == env.id and second.delivered >= 2
        await second.ack()


async def test_bad_frames_in_a_stream_are_dropped_counted_and_never_block(fresh_nats: NatsServer) -> None:
    key, forger = AgentKey.generate(), AgentKey.generate()
    codec = Codec(catalogue=CAT)
    async with Bus(NatsTransport(fresh_nats.url), source="worker", codec=codec, key=key,
                   security=Security.STRICT) as bus:
        js = await JetStream.open(bus, api_timeout=2.0)
        log = js.event_log()
        await log.ensure(Order)
        subject = Order(job_id="x").subject()
        # 1. garbage, 2. a well-formed envelope whose signature is by an untrusted key, 3. altered after
        # signing, 4. unsigned in strict mode; then one good, signed event.
        await bus.transport.publish(subject, b"\x93\x01\x02")
        untrusted = codec.envelope(Order(job_id="x"), source="mallory")
        forger.sign(untrusted)
        await bus.transport.publish(subject, codec.pack(untrusted))
        altered = bus.envelope(Order(job_id="x"))
        altered.data = codec.envelope(Order(job_id="y"), source="worker").data
        await bus.transport.publish(subject, codec.pack(altered))
        await bus.transport.publish(subject, codec.pack(codec.envelope(Order(job_id="x"), source="worker")))
        good = await log.publish(Order(job_id="x"))

        async with log.consume(Order, durable="orders", ack_wait=30, batch=2) as consumer:
            d = await consumer.next(timeout=10)
            assert d.envelope.id == good.id and d.seq == 5
            assert consumer.dropped == 4
            await d.ack(confirm=True)  # acks go in order: the bad frames' acks are recorded before it
        assert bus.rejected == {"MalformedFrame": 1, "UnknownKey": 1, "BadSignature": 1, "UnsignedEvent": 1}
        orders = {c.name: c for s in await js.streams() for c in s.consumers}["orders"]
        assert (orders.pending, orders.ack_pending, orders.ack_floor) == (0, 0, 5)


async def test_a_redelivered_signed_event_is_not_mistaken_for_a_replay(fresh_nats: NatsServer) -> None:
    async with Bus(NatsTransport(fresh_nats.url), source="worker", codec=Codec(catalogue=CAT),
                   key=AgentKey.generate(), security=Security.STRICT) as bus:
        log = (await JetStream.open(bus, api_timeout=2.0)).event_log()
        good = await log.publish(Order(job_id="x"))
        async with log.consume(Order, durable="orders", ack_wait=1.0, batch=1) as consumer:
            first = await consumer.next(timeout=10)
            assert first.envelope.id == good.id and first.envelope.sig is not None
            # Not acked: the stream delivers the same envelope id again, on purpose. The bus still checks the
            # signature but not the replay window (the stream's dedup stands in for it).
            again = await consumer.next(timeout=10)
            assert again.envelope.id == good.id and again.delivered >= 2
            await again.ack()
        assert not bus.rejected


async def test_replay_reads_up_to_the_end_as_of_its_start(js: JetStream) -> None:
    log = js.event_log()
    await log.publish_many([Step(job_id="r", n=i) for i in range(20)])
    seen = []
    async for stored in log.replay(Step.pattern()):
        seen.append(stored.seq)
        if stored.seq == 1:  # events stored after the replay began are not part of it
            await log.publish(Step(job_id="r", n=99))
    assert seen == list(range(1, 21))


async def test_streams_lists_streams_and_consumers(js: JetStream) -> None:
    log = js.event_log()
    await log.publish(Step(job_id="s", n=1))
    async with log.consume(Step, durable="lister") as consumer:
        await (await consumer.next(timeout=5)).ack()
    await js.key_value("jstestkv")
    stats = {s.name: s for s in await js.streams()}
    assert stats["FEDBUS_JSTEST"].messages == 1 and stats["FEDBUS_JSTEST"].subjects == (Step.pattern(),)
    assert [c.name for c in stats["FEDBUS_JSTEST"].consumers] == ["lister"]
    assert "KV_jstestkv" in stats


def test_meta_records_decode_with_plain_msgpack() -> None:
    """The object meta record is msgpack a non-Python reader can decode (an edge device, a Go tool)."""
    meta = _Meta("m", 3, "ab" * 32, 1, 1024, 5, "V1")
    assert msgpack.unpackb(_META_ENCODER.encode(meta)) == msgspec.structs.asdict(meta)


async def test_a_deleted_stream_is_recreated_by_the_next_publish(js: JetStream) -> None:
    log = js.event_log()
    await log.publish(Step(job_id="gone", n=1))
    await js.js.delete_stream("FEDBUS_JSTEST")  # an operator cleaning up, or a broker without its data
    env = await log.publish(Step(job_id="gone", n=2))
    await js.js.delete_stream("FEDBUS_JSTEST")
    envs = await log.publish_many([Step(job_id="gone", n=3)])
    assert await stored_ids(log, Step.pattern()) == [envs[0].id] and env.id != envs[0].id
