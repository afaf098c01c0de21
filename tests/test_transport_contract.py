"""ONE contract suite for every transport: in-memory, NATS (real nats-server), MQTT on nats-server's MQTT
listener, and MQTT on a real Mosquitto (generated only where the ``mosquitto`` binary exists).

Each test uses subjects under a fresh prefix, so persistent MQTT sessions left by earlier tests never match.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from conftest import MOSQUITTO

from fedbus.bus import Bus, Event, MemoryBroker, MemoryTransport, Transport, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.errors import ClosedError, NotSupported, SubjectError
from fedbus.bus.mqtt_transport import MqttTransport
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.transport import Subscription

KINDS = ["memory", "nats", "nats-mqtt", *(["mosquitto"] if MOSQUITTO else [])]


@event("ctest", "ask", key="agent_id")
class Ask(Event):
    agent_id: str
    n: int


@event("ctest", "answer", key="agent_id")
class Answer(Event):
    agent_id: str
    n: int


@dataclass
class Kind:
    """How to make connected transports of one kind; they are closed when the test ends."""

    name: str
    queue_groups: bool
    factory: Callable[[str], Transport]
    opened: list[Transport] = field(default_factory=list)

    async def make(self) -> Transport:
        transport = self.factory(f"ct-{os.urandom(4).hex()}")
        await transport.connect()
        self.opened.append(transport)
        return transport


@pytest.fixture(params=KINDS)
async def kind(request: pytest.FixtureRequest) -> AsyncIterator[Kind]:
    name = request.param
    factory: Callable[[str], Transport]
    if name == "memory":
        broker = MemoryBroker()
        factory = lambda cid: MemoryTransport(broker, client_id=cid)
    elif name == "nats":
        url = request.getfixturevalue("nats_server").url
        factory = lambda cid: NatsTransport(url, client_name=cid)
    elif name == "nats-mqtt":
        url = request.getfixturevalue("nats_server").mqtt_url
        factory = lambda cid: MqttTransport(url, client_id=cid)
    else:
        url = request.getfixturevalue("mosquitto").url
        factory = lambda cid: MqttTransport(url, client_id=cid)
    k = Kind(name, queue_groups=name != "nats-mqtt", factory=factory)
    yield k
    for transport in k.opened:
        await transport.close()


@pytest.fixture
def prefix() -> str:
    return f"fedbus.ct{os.urandom(4).hex()}"


async def eventually(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (checked as the loop runs), or fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def read_until(sub: Subscription, last: bytes, *, timeout: float = 5.0) -> list[tuple[str, bytes]]:
    got = []
    while True:
        frame = await sub.next(timeout)
        got.append((frame.subject, frame.data))
        if frame.data == last:
            return got


async def test_publish_subscribe(kind: Kind, prefix: str) -> None:
    a, b = await kind.make(), await kind.make()
    sub = await b.subscribe(f"{prefix}.greet")
    for i in range(3):
        await a.publish(f"{prefix}.greet", b"hi%d" % i)
    frames = [await sub.next(5) for _ in range(3)]
    assert [(f.subject, f.data) for f in frames] == [(f"{prefix}.greet", b"hi%d" % i) for i in range(3)]


async def test_wildcards(kind: Kind, prefix: str) -> None:
    a, b = await kind.make(), await kind.make()
    one = await b.subscribe(f"{prefix}.*.x")
    rest = await b.subscribe(f"{prefix}.>")
    for subject in (f"{prefix}.a.x", f"{prefix}.a.y", f"{prefix}.b.x.z", prefix, f"{prefix}.end.x"):
        await a.publish(subject, subject.encode())
    end = f"{prefix}.end.x".encode()
    assert [s for s, _ in await read_until(one, end)] == [f"{prefix}.a.x", f"{prefix}.end.x"]
    # '>' needs at least one more token: the bare prefix is not delivered (MQTT's '#' would match it).
    assert [s for s, _ in await read_until(rest, end)] == [
        f"{prefix}.a.x", f"{prefix}.a.y", f"{prefix}.b.x.z", f"{prefix}.end.x"]


async def test_multiple_subscribers(kind: Kind, prefix: str) -> None:
    a, b, c = await kind.make(), await kind.make(), await kind.make()
    subs = [await b.subscribe(f"{prefix}.m"), await b.subscribe(f"{prefix}.*"),
            await c.subscribe(f"{prefix}.m")]
    for i in range(5):
        await a.publish(f"{prefix}.m", b"%d" % i)
    for sub in subs:
        assert [(await sub.next(5)).data for _ in range(5)] == [b"%d" % i for i in range(5)]


async def test_queue_groups_share_the_load_or_are_not_supported(kind: Kind, prefix: str) -> None:
    pub, w1, w2 = await kind.make(), await kind.make(), await kind.make()
    subject = f"{prefix}.work"
    if not kind.queue_groups:
        with pytest.raises(NotSupported, match="shared subscriptions"):
            await w1.subscribe(subject, queue="workers")
        assert w1.capabilities.queue_groups is False
        return
    members = [await w1.subscribe(subject, queue="workers"), await w2.subscribe(subject, queue="workers")]
    watcher = await pub.subscribe(subject)  # a plain subscriber still sees everything
    n = 20
    for i in range(n):
        await pub.publish(subject, b"%d" % i)
    assert [(await watcher.next(5)).data for _ in range(n)] == [b"%d" % i for i in range(n)]
    got: list[list[bytes]] = [[], []]
    done = asyncio.Event()

    async def drain(i: int) -> None:
        async for frame in members[i]:
            got[i].append(frame.data)
            if len(got[0]) + len(got[1]) >= n:
                done.set()

    async with asyncio.TaskGroup() as tg:
        readers = [tg.create_task(drain(0)), tg.create_task(drain(1))]
        await asyncio.wait_for(done.wait(), 10)
        for reader in readers:
            reader.cancel()
    assert sorted(got[0] + got[1]) == sorted(b"%d" % i for i in range(n))  # each message exactly once
    assert got[0] and got[1], f"load not shared: {len(got[0])} / {len(got[1])}"


async def test_request_reply_at_bus_level(kind: Kind, prefix: str) -> None:
    agent = f"resp-{os.urandom(3).hex()}"
    async with Bus(await kind.make(), source=agent) as responder, \
            Bus(await kind.make(), source="asker") as asker:
        asks = await responder.subscribe(Ask, key=agent)

        async def serve() -> None:
            async for d in asks:
                await responder.respond(d, Answer(agent_id=agent, n=d.event.n * 2))

        async with asyncio.TaskGroup() as tg:
            server = tg.create_task(serve())
            first = await asker.request(Ask(agent_id=agent, n=21), timeout=5, trace="trace-1")
            second = await asker.request(Ask(agent_id=agent, n=5), timeout=5)
            server.cancel()
    assert first.event == Answer(agent_id=agent, n=42)
    assert first.envelope.trace == "trace-1" and first.source == agent
    assert second.event.n == 10


async def test_unsubscribe(kind: Kind, prefix: str) -> None:
    a, b = await kind.make(), await kind.make()
    subject = f"{prefix}.u"
    keep, gone = await b.subscribe(subject), await b.subscribe(subject)
    await a.publish(subject, b"1")
    assert (await keep.next(5)).data == b"1" and (await gone.next(5)).data == b"1"
    await gone.unsubscribe()
    await gone.unsubscribe()  # idempotent
    await a.publish(subject, b"2")
    assert (await keep.next(5)).data == b"2"
    assert [f async for f in gone] == []
    with pytest.raises(ClosedError):
        await gone.next(1)


async def test_close_is_idempotent_and_later_use_raises(kind: Kind, prefix: str) -> None:
    t = await kind.make()
    sub = await t.subscribe(f"{prefix}.c")
    await t.close()
    await t.close()
    with pytest.raises(ClosedError):
        await t.publish(f"{prefix}.c", b"x")
    with pytest.raises(ClosedError):
        await t.subscribe(f"{prefix}.c")
    assert [f async for f in sub] == []  # the subscription ended with the transport


@pytest.mark.parametrize("bad", ["", "a b", "fedbus.x.*", "fedbus.>", "fedbus..x", "fedbus.x\r\n",
                                 "fedbus/x"])
async def test_invalid_publish_subject(kind: Kind, bad: str) -> None:
    t = await kind.make()
    with pytest.raises(SubjectError):
        await t.publish(bad, b"x")


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a b.*", "a/#"])
async def test_invalid_subscribe_pattern(kind: Kind, bad: str) -> None:
    t = await kind.make()
    with pytest.raises(SubjectError):
        await t.subscribe(bad)


async def test_slow_consumer_drops_are_counted(kind: Kind, prefix: str) -> None:
    a, b = await kind.make(), await kind.make()
    subject = f"{prefix}.slow"
    slow = await b.subscribe(subject, max_pending=4)
    fast = await b.subscribe(subject, max_pending=100)
    for i in range(20):
        await a.publish(subject, b"%d" % i)
    assert [(await fast.next(5)).data for _ in range(20)] == [b"%d" % i for i in range(20)]
    await eventually(lambda: slow.pending + slow.dropped == 20)
    assert slow.dropped == 16
    assert [(await slow.next(1)).data for _ in range(4)] == [b"0", b"1", b"2", b"3"]  # the newest are dropped


async def test_bad_frames_do_not_stop_the_subscriber(kind: Kind, prefix: str) -> None:
    raw = await kind.make()
    async with Bus(await kind.make(), source="victim") as bus:
        sub = await bus.subscribe(Ask, key="victim")
        subject = Ask(agent_id="victim", n=0).subject()
        await raw.publish(subject, b"\xc1 not msgpack")
        bad_schema = bus.codec.envelope(Answer(agent_id="victim", n=1), source="x")
        bad_schema.type = Ask.spec.type  # a well-formed Ask envelope whose payload lacks "n"
        bad_schema.data = b"\x81\xa8agent_id\xa6victim"
        await raw.publish(subject, bus.codec.pack(bad_schema))
        good = bus.codec.envelope(Ask(agent_id="victim", n=7), source="x")
        await raw.publish(subject, bus.codec.pack(good))
        d = await sub.next(5)
    assert d.event == Ask(agent_id="victim", n=7)
    assert bus.rejected == {"MalformedFrame": 1, "SchemaError": 1}


async def test_frame_order_per_publisher(kind: Kind, prefix: str) -> None:
    p1, p2, b = await kind.make(), await kind.make(), await kind.make()
    subject = f"{prefix}.order"
    sub = await b.subscribe(subject, max_pending=1000)
    n = 100

    async def run(pub: Transport, name: bytes) -> None:
        for i in range(n):
            await pub.publish(subject, name + b"%d" % i)
        await pub.flush()

    await asyncio.gather(run(p1, b"a"), run(p2, b"b"))
    got = [(await sub.next(5)).data for _ in range(2 * n)]
    for name in (b"a", b"b"):
        assert [int(x[1:]) for x in got if x[:1] == name] == list(range(n))


# -- across transports: a NATS agent and an MQTT device meet on the same event -----------------------------
async def test_nats_agent_and_mqtt_device_meet_through_the_gateway(nats_server: NatsServer) -> None:
    device_id = f"dev-{os.urandom(3).hex()}"
    async with Bus(NatsTransport(nats_server.url), source="agent") as agent, \
            Bus(MqttTransport(nats_server.mqtt_url, client_id=device_id), source=device_id) as device:
        at_agent = await agent.subscribe(Ask, key=device_id)
        at_device = await device.subscribe(Answer, key=device_id)
        # MQTT → NATS
        sent = await device.publish(Ask(agent_id=device_id, n=1))
        d = await at_agent.next(5)
        assert (d.event, d.envelope.id, d.source, d.subject) == (
            Ask(agent_id=device_id, n=1), sent.id, device_id, f"fedbus.ctest.ask.{device_id}")
        # NATS → MQTT
        await agent.publish(Answer(agent_id=device_id, n=2))
        d2 = await at_device.next(5)
        assert d2.event == Answer(agent_id=device_id, n=2) and d2.source == "agent"
        # request from the device, answered by the agent: the envelope's reply crosses the gateway
        await at_agent.unsubscribe()
        asks = await agent.subscribe(Ask, key=device_id)

        async def serve() -> None:
            async for req in asks:
                await agent.respond(req, Answer(agent_id=device_id, n=req.event.n + 100))

        async with asyncio.TaskGroup() as tg:
            server = tg.create_task(serve())
            reply = await device.request(Ask(agent_id=device_id, n=5), timeout=5)
            server.cancel()
        assert reply.event == Answer(agent_id=device_id, n=105)
