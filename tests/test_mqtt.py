"""MQTT-specific behaviour on real brokers (nats-server's MQTT listener, and Mosquitto where it exists):
persistent sessions, last will, reconnect with buffered publishes after a broker restart, error mapping,
and the link's filter bookkeeping (pure logic)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Callable

import pytest
from conftest import MOSQUITTO

from fedbus.bus.broker import NatsServer, free_port
from fedbus.bus.errors import ConnectError, NotSupported, PublishTimeout
from fedbus.bus.mqtt_transport import LastWill, MqttTransport
from fedbus.bus.transport import Capabilities, Transport
from fedbus.edge_sdk.link import minimal_cover
from fedbus.edge_sdk.topics import filter_covers, topic_matches

BROKERS = ["nats-mqtt", *(["mosquitto"] if MOSQUITTO else [])]
FAST = {"reconnect_min": 0.02, "reconnect_max": 0.2}


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """The MQTT URL of a session-wide broker."""
    if request.param == "nats-mqtt":
        return str(request.getfixturevalue("nats_server").mqtt_url)
    return str(request.getfixturevalue("mosquitto").url)


def ids() -> tuple[str, str]:
    """A fresh subject prefix and client-id stem."""
    token = os.urandom(4).hex()
    return f"fedbus.mq{token}", f"mq{token}"


async def eventually(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_persistent_session_receives_what_was_published_while_offline(broker_url: str) -> None:
    prefix, cid = ids()
    async with MqttTransport(broker_url, client_id=f"{cid}-sub") as sub_t:
        await sub_t.subscribe(f"{prefix}.>")
    async with MqttTransport(broker_url, client_id=f"{cid}-clean", clean_session=True) as clean_t:
        await clean_t.subscribe(f"{prefix}.>")
    # both subscribers are offline now; only the persistent one keeps its session
    async with MqttTransport(broker_url, client_id=f"{cid}-pub") as pub:
        for i in range(3):
            await pub.publish(f"{prefix}.m", b"missed-%d" % i)
        async with MqttTransport(broker_url, client_id=f"{cid}-sub") as back, \
                MqttTransport(broker_url, client_id=f"{cid}-clean", clean_session=True) as clean_back:
            sub = await back.subscribe(f"{prefix}.>")
            clean_sub = await clean_back.subscribe(f"{prefix}.>")
            await pub.publish(f"{prefix}.m", b"live")
            assert [(await sub.next(5)).data for _ in range(4)] == [b"missed-0", b"missed-1", b"missed-2",
                                                                      b"live"]
            assert (await clean_sub.next(5)).data == b"live"  # a clean session missed them


async def test_unsubscribe_removes_the_subscription_from_the_session(broker_url: str) -> None:
    prefix, cid = ids()
    async with MqttTransport(broker_url, client_id=f"{cid}-sub") as t:
        sub = await t.subscribe(f"{prefix}.>")
        await sub.unsubscribe()
    async with MqttTransport(broker_url, client_id=f"{cid}-pub") as pub:
        await pub.publish(f"{prefix}.m", b"while-away")
        async with MqttTransport(broker_url, client_id=f"{cid}-sub") as back:
            sub = await back.subscribe(f"{prefix}.>")
            await pub.publish(f"{prefix}.m", b"live")
            assert (await sub.next(5)).data == b"live"


_DYING_CLIENT = textwrap.dedent("""
    import asyncio, sys
    from fedbus.bus.mqtt_transport import LastWill, MqttTransport

    async def main() -> None:
        url, cid, subject = sys.argv[1:4]
        transport = MqttTransport(url, client_id=cid, keepalive=5,
                                  will=LastWill(subject, b"offline", retain=True))
        await transport.connect()
        await transport.publish(subject, b"online")
        await transport.flush()
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_last_will_is_delivered_when_a_client_dies(broker_url: str) -> None:
    prefix, cid = ids()
    subject = f"{prefix}.status.dev"
    async with MqttTransport(broker_url, client_id=f"{cid}-obs") as observer:
        sub = await observer.subscribe(subject)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DYING_CLIENT, broker_url, f"{cid}-dying", subject,
            stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            while (line := await asyncio.wait_for(proc.stdout.readline(), 30)) != b"ready\n":
                assert line, "the client died before it was ready"
            assert (await sub.next(5)).data == b"online"
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert (await sub.next(10)).data == b"offline"
    async with MqttTransport(broker_url, client_id=f"{cid}-late", clean_session=True) as late:
        retained = await late.subscribe(subject)
        assert (await retained.next(5)).data == b"offline"  # the will was retained


@pytest.mark.parametrize("which", BROKERS)
async def test_reconnect_after_broker_restart_sends_buffered_publishes(
        which: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("fresh_nats" if which == "nats-mqtt" else "fresh_mosquitto")
    url = server.mqtt_url if which == "nats-mqtt" else server.url
    prefix, cid = ids()
    async with MqttTransport(url, client_id=f"{cid}-sub", **FAST) as sub_t, \
            MqttTransport(url, client_id=f"{cid}-pub", max_buffered=5, **FAST) as pub:
        sub = await sub_t.subscribe(f"{prefix}.>")
        await pub.publish(f"{prefix}.m", b"before")
        assert (await sub.next(5)).data == b"before"

        await asyncio.to_thread(server.stop)
        await eventually(lambda: not pub.connected and not sub_t.connected)
        for i in range(5):
            await pub.publish(f"{prefix}.m", b"buffered-%d" % i)  # returns at once: held for the reconnect
        assert pub.buffered == 5
        with pytest.raises(PublishTimeout, match="buffer full"):
            await pub.publish(f"{prefix}.m", b"one too many")

        await asyncio.to_thread(server.start)
        assert [(await sub.next(15)).data for _ in range(5)] == [b"buffered-%d" % i for i in range(5)]
        await pub.flush(5)
        await eventually(lambda: sub_t.connected)  # the restored session may deliver before set-up ends
        assert pub.buffered == 0 and pub.reconnects >= 1 and sub_t.reconnects >= 1
        await pub.publish(f"{prefix}.m", b"after")
        assert (await sub.next(5)).data == b"after"

        # and once more: the second outage must be survived like the first
        await asyncio.to_thread(server.stop)
        await eventually(lambda: not pub.connected and not sub_t.connected)
        await pub.publish(f"{prefix}.m", b"second outage")
        await asyncio.to_thread(server.start)
        assert (await sub.next(15)).data == b"second outage"
        await eventually(lambda: pub.connected and sub_t.connected)
        assert pub.reconnects >= 2 and sub_t.reconnects >= 2


async def test_overlapping_subscriptions_deliver_once_each(broker_url: str) -> None:
    # nats-server sends one copy per overlapping subscription of a client, Mosquitto one per client: the
    # transport keeps only covering filters at the broker, so both behave the same.
    prefix, cid = ids()
    async with MqttTransport(broker_url, client_id=f"{cid}-a") as a, \
            MqttTransport(broker_url, client_id=f"{cid}-b") as b:
        narrow = await b.subscribe(f"{prefix}.x.y")
        wide = await b.subscribe(f"{prefix}.>")
        await a.publish(f"{prefix}.x.y", b"one")
        await a.publish(f"{prefix}.x.end", b"end")
        assert [(await wide.next(5)).data for _ in range(2)] == [b"one", b"end"]
        assert (await narrow.next(5)).data == b"one"
        await wide.unsubscribe()  # the narrow filter must go back to the broker
        await a.publish(f"{prefix}.x.y", b"two")
        assert (await narrow.next(5)).data == b"two"


async def test_errors_map_into_the_fedbus_tree(nats_server: NatsServer) -> None:
    with pytest.raises(ConnectError):
        MqttTransport("http://127.0.0.1:1")
    refused = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", initial_attempts=2, reconnect_min=0.01)
    with pytest.raises(ConnectError, match="cannot connect after 2 attempts"):
        await refused.connect()
    await refused.close()
    async with MqttTransport(str(nats_server.mqtt_url), client_id=f"{ids()[1]}-r") as t:
        assert isinstance(t, Transport)
        assert t.capabilities == Capabilities(queue_groups=True, native_reply=False)  # until probed
        with pytest.raises(NotSupported, match="inbox"):
            await t.request("fedbus.x.y", b"")
    with pytest.raises(Exception, match="invalid subject"):
        LastWill("fedbus.x.*", b"")


@pytest.mark.parametrize(("a", "b", "covers"), [
    ("x/#", "x/y", True), ("x/#", "x", True), ("x/#", "x/+/z", True), ("x/+", "x/y", True),
    ("x/+", "x/+", True), ("x/+", "x/#", False), ("x/y", "x/+", False), ("x/+/z", "x/y", False),
    ("x/y", "x/y/z", False), ("#", "a/b", True), ("$share/g/x/#", "x/y", False),
    ("x/#", "$share/g/x/y", False), ("$share/g/x/+", "$share/g/x/+", True),
])
def test_filter_covers(a: str, b: str, covers: bool) -> None:
    assert filter_covers(a, b) is covers


def test_minimal_cover_and_matching() -> None:
    filters = ["x/y", "x/#", "x/y", "z/+", "z/a", "$share/g/x/y"]
    assert minimal_cover(filters) == ["x/#", "z/+", "$share/g/x/y"]
    assert minimal_cover(["a/+/c", "a/b/+"]) == ["a/+/c", "a/b/+"]  # partial overlap: both needed
    assert topic_matches("x/#", "x") and topic_matches("x/+", "x/y") and not topic_matches("x/+", "x/y/z")
    assert topic_matches("$share/g/x/+", "x/y") and not topic_matches("#", "$SYS/x")
