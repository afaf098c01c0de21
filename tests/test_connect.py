"""Transport selection from URLs and the scripting API (connect, publish_sync), on a real nats-server."""

from __future__ import annotations

import asyncio
import re

import pytest

import fedbus.bus
from fedbus.bus import Bus, MemoryTransport, connect, publish_sync, transport_for
from fedbus.bus.broker import NatsServer
from fedbus.bus.catalogue import Heartbeat, Ping, Pong
from fedbus.bus.connect import memory_broker
from fedbus.bus.errors import BusError, ConfigError
from fedbus.bus.mqtt_transport import MqttTransport
from fedbus.bus.nats_transport import NatsTransport


def test_nats_urls_and_server_lists_give_a_nats_transport() -> None:
    one = transport_for("nats://127.0.0.1:4222", client_id="a")
    assert isinstance(one, NatsTransport) and one.client_name == "a"
    many = transport_for(" nats://127.0.0.1:1, 127.0.0.1:2 ,nats://127.0.0.1:3")
    assert isinstance(many, NatsTransport)
    assert many.url == "nats://127.0.0.1:1,nats://127.0.0.1:2,nats://127.0.0.1:3"


def test_memory_urls_share_a_broker_by_name() -> None:
    a, b, c = transport_for("memory://t1"), transport_for("memory://t1"), transport_for("memory://t2")
    assert isinstance(a, MemoryTransport) and isinstance(b, MemoryTransport)
    assert isinstance(c, MemoryTransport)
    assert a.broker is b.broker is memory_broker("t1")
    assert c.broker is not a.broker


def test_mqtt_urls_give_the_mqtt_transport() -> None:
    for url in ("mqtt://127.0.0.1:1883", "mqtts://broker.example:8883"):
        transport = transport_for(url, client_id="phone-1")
        assert isinstance(transport, MqttTransport) and transport.client_id == "phone-1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("foo://host:1", "unsupported scheme 'foo'"),
        ("127.0.0.1:4222", "has no scheme"),
        ("nats://", "has no host"),
        ("nats://h:notaport", "invalid port"),
        ("nats://a:1,mqtt://b:2", "one kind of server"),
        ("mqtt://a:1,mqtt://b:2", "only nats:// URLs take a server list"),
        (" , ", "empty broker URL"),
    ],
)
def test_bad_urls_are_config_errors_naming_the_server(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        transport_for(url)
    assert info.value.key == "server"


def test_no_url_falls_back_to_fedbus_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_SERVER", "nats://10.1.2.3:4999")
    assert transport_for(None).url == "nats://10.1.2.3:4999"
    monkeypatch.delenv("FEDBUS_SERVER")
    assert transport_for(None).url == "nats://127.0.0.1:4222"


def test_the_scripting_api_is_exported() -> None:
    for name in ("connect", "publish_sync", "transport_for"):
        assert name in fedbus.bus.__all__ and callable(getattr(fedbus.bus, name))


async def test_connect_gives_a_bus_that_talks_over_nats(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with connect(url, source="script-a") as a, connect(url, source="agent-b") as b:
        assert isinstance(a, Bus) and a.source == "script-a"
        pings = await b.subscribe(Ping, key="agent-b")

        async def answer() -> None:
            d = await pings.next(5)
            await b.respond(d, Pong(agent_id="agent-b", text=d.event.text.upper()))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(answer())
            reply = await a.request(Ping(agent_id="agent-b", text="hi"), timeout=5)
        assert isinstance(reply.event, Pong) and reply.event.text == "HI" and reply.source == "agent-b"


async def test_connect_over_memory() -> None:
    async with connect("memory://api-test", source="x") as x, connect("memory://api-test", source="y") as y:
        beats = await y.subscribe(Heartbeat)
        sent = await x.publish(Heartbeat(agent_id="x", seq=7))
        got = await beats.next(1)
        assert got.envelope.id == sent.id and got.event.seq == 7


async def test_publish_sync_publishes_one_event_from_plain_code(nats_server: NatsServer) -> None:
    async with connect(nats_server.url, source="listener") as listener:
        beats = await listener.subscribe(Heartbeat, key="cron-job")
        env = await asyncio.to_thread(
            publish_sync, nats_server.url, Heartbeat(agent_id="cron-job", seq=3), source="cron-job"
        )
        got = await beats.next(5)
        assert got.envelope.id == env.id and got.source == "cron-job" and got.event.seq == 3


async def test_publish_sync_refuses_to_run_inside_an_event_loop(nats_server: NatsServer) -> None:
    with pytest.raises(BusError, match="inside an event loop"):
        publish_sync(nats_server.url, Heartbeat(agent_id="x"))
