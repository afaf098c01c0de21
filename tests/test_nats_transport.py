"""Core NATS transport against a real nats-server: restarts, buffering, drain, errors."""

from __future__ import annotations

import asyncio

import pytest

from fedbus.bus import Bus, Catalogue, Codec, Event, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.errors import ClosedError, ConnectError, FrameTooLarge, NoResponders, RequestTimeout
from fedbus.bus.nats_transport import NatsTransport

CAT = Catalogue()


@event("test", "tick", key="stream", catalogue=CAT)
class Tick(Event):
    stream: str
    n: int


async def test_publishes_during_a_broker_restart_are_buffered_and_delivered(fresh_nats: NatsServer) -> None:
    codec = Codec(catalogue=CAT)
    async with (
        # The subscriber retries fast and the publisher slowly, so the subscriber is back (and subscribed) before
        # the publisher flushes its buffer: core NATS itself is at-most-once (durable events use JetStream).
        Bus(NatsTransport(fresh_nats.url, reconnect_wait=3.0), source="pub", codec=codec) as pub,
        Bus(NatsTransport(fresh_nats.url, reconnect_wait=0.05), source="sub", codec=codec) as sub,
    ):
        ticks = await sub.subscribe(Tick)
        for _ in range(25):  # core NATS is at-most-once: handshake until the path is known to work
            await pub.publish(Tick(stream="s", n=0))
            try:
                assert (await ticks.next(0.2)).event.n == 0
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no tick got through before the restart")

        fresh_nats.stop()
        assert isinstance(pub.transport, NatsTransport)
        # Frames written in the instant before the client notices a dead socket are lost (core NATS is
        # at-most-once); once it knows the broker is away, publishes are buffered and not raised.
        await asyncio.wait_for(pub.transport.disconnected.wait(), 10)
        for n in range(1, 6):
            await pub.publish(Tick(stream="s", n=n))
        fresh_nats.start()
        assert isinstance(sub.transport, NatsTransport)
        await asyncio.wait_for(sub.transport.connected.wait(), 15)
        await sub.transport.flush()  # its subscriptions are re-sent on reconnect
        await asyncio.wait_for(pub.transport.connected.wait(), 15)
        await pub.transport.flush()
        received = []
        while len(received) < 5:
            n = (await ticks.next(10)).event.n
            if n > 0:  # a late copy of a handshake tick is not part of the check
                received.append(n)
        assert received == [1, 2, 3, 4, 5]
        assert pub.transport.reconnects >= 1


async def test_unreachable_server_is_a_connect_error() -> None:
    transport = NatsTransport("nats://127.0.0.1:1", connect_timeout=0.2, initial_attempts=1)
    with pytest.raises(ConnectError, match="127.0.0.1:1"):
        await transport.connect()


async def test_request_errors(nats_server: NatsServer) -> None:
    async with NatsTransport(nats_server.url) as t:
        with pytest.raises(NoResponders):
            await t.request("fedbus.test.nobody", b"x", timeout=1)
        sub = await t.subscribe("fedbus.test.silent")
        with pytest.raises(RequestTimeout):
            await t.request("fedbus.test.silent", b"x", timeout=0.2)
        await sub.unsubscribe()


async def test_frame_over_server_max_payload(nats_server: NatsServer) -> None:
    async with NatsTransport(nats_server.url) as t:
        with pytest.raises(FrameTooLarge) as info:
            await t.publish("fedbus.test.big", b"x" * (nats_server.max_payload + 1))
        assert info.value.limit == nats_server.max_payload


async def test_close_drains_and_is_idempotent(nats_server: NatsServer) -> None:
    t = NatsTransport(nats_server.url)
    await t.connect()
    sub = await t.subscribe("fedbus.test.drain")
    async with NatsTransport(nats_server.url) as other:
        for i in range(100):
            await other.publish("fedbus.test.drain", str(i).encode())
        await other.flush()
    await t.close()
    await t.close()
    got = [frame.data async for frame in sub]  # what the server sent before close is still readable
    assert got == [str(i).encode() for i in range(100)]
    with pytest.raises(ClosedError):
        await t.publish("fedbus.test.drain", b"late")
