"""The edge SDK against a real nats-server (its MQTT listener), with NATS agents on the other side: imports
(only aiomqtt + msgpack), status and last will, batched telemetry, subscriptions, request/reply both ways,
signatures, and the limits on untrusted incoming frames."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import textwrap

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.bus import Bus, Security
from fedbus.bus.broker import NatsServer
from fedbus.bus.catalogue import EdgeMetrics, EdgeStatus, Heartbeat, Notice, Ping, Pong
from fedbus.bus.events import CATALOGUE
from fedbus.bus.mqtt_transport import MqttTransport
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.signing import AgentKey, KeyRing
from fedbus.bus.subjects import to_mqtt
from fedbus.edge_sdk import (
    SDK_VERSION,
    EdgeClient,
    EdgeError,
    FrameLimits,
    FrameTooLarge,
    MalformedFrame,
    MetricsBatcher,
    TopicError,
    event_topic,
    make_envelope,
    pack,
    unpack,
)
from fedbus.edge_sdk.envelope import decode_data
from fedbus.edge_sdk.errors import FrameError
from fedbus.edge_sdk.signing import Signer


def device() -> str:
    return f"pi-{os.urandom(3).hex()}"


def mqtt_url(server: NatsServer) -> str:
    assert server.mqtt_url is not None
    return server.mqtt_url


_DEVICE_PROCESS = textwrap.dedent("""
    import asyncio, json, sys
    before = set(sys.modules)
    from fedbus.edge_sdk import EdgeClient

    async def main() -> None:
        url, device_id = sys.argv[1:3]
        edge = EdgeClient(device_id=device_id, url=url, keepalive=5)
        await edge.connect()
        await edge.publish("bus.heartbeat", {"agent_id": device_id, "seq": 1}, key=device_id)
        await edge.log_metrics({"x": 1.0})
        await edge.flush_metrics()
        # modules loaded from files (msgpack's Cython extension also registers in-memory helper modules)
        loaded = {m for m in set(sys.modules) - before if getattr(sys.modules[m], "__file__", None)}
        print(json.dumps({
            "third_party": sorted({m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)),
            "fedbus": sorted(m for m in sys.modules if m.startswith("fedbus")),
        }), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_device_process_needs_only_aiomqtt_msgpack_and_its_will_says_offline(
        nats_server: NatsServer) -> None:
    dev = device()
    async with Bus(NatsTransport(nats_server.url), source="watcher") as agent:
        status = await agent.subscribe(EdgeStatus, key=dev)
        beats = await agent.subscribe(Heartbeat, key=dev)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DEVICE_PROCESS, mqtt_url(nats_server), dev, stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            online = await status.next(10)
            assert (await beats.next(5)).event == Heartbeat(agent_id=dev, seq=1)
            proc.send_signal(signal.SIGKILL)  # vanish without DISCONNECT
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        offline = await status.next(10)
    # what the device process loaded, beyond the standard library, while connecting and publishing
    assert set(report["third_party"]) <= {"aiomqtt", "paho", "msgpack", "fedbus"}, report
    assert all(m == "fedbus" or m.startswith("fedbus.edge_sdk") for m in report["fedbus"]), report
    assert online.event == EdgeStatus(device_id=dev, online=True, sdk=SDK_VERSION) and online.source == dev
    assert offline.event == EdgeStatus(device_id=dev, online=False, sdk=SDK_VERSION)  # the last will


async def test_status_online_then_offline_on_close(nats_server: NatsServer) -> None:
    dev = device()
    async with Bus(NatsTransport(nats_server.url), source="watcher") as agent:
        status = await agent.subscribe(EdgeStatus, key=dev)
        async with EdgeClient(device_id=dev, url=mqtt_url(nats_server), info={"arch": "aarch64", "cpus": 4}):
            online = await status.next(5)
        offline = await status.next(5)
    assert online.event == EdgeStatus(device_id=dev, online=True, sdk=SDK_VERSION,
                                      info={"arch": "aarch64", "cpus": 4})
    assert offline.event.online is False and offline.envelope.id != online.envelope.id


async def test_telemetry_is_batched_by_count_and_by_time(nats_server: NatsServer) -> None:
    dev = device()
    async with Bus(NatsTransport(nats_server.url), source="tracker") as agent:
        batches = await agent.subscribe(EdgeMetrics, key=dev)
        async with EdgeClient(device_id=dev, url=mqtt_url(nats_server), batch_points=5,
                              batch_interval=0.2) as edge:
            for step in range(12):
                await edge.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            got = [await batches.next(5) for _ in range(3)]  # 5 + 5 at once, the last 2 when the timer fires
    assert [d.event.seq for d in got] == [1, 2, 3]
    assert [len(d.event.points) for d in got] == [5, 5, 2]
    points = [p for d in got for p in d.event.points]
    assert [p.step for p in points] == list(range(12)) and {p.name for p in points} == {"loss"}
    assert math.isclose(points[3].value, 0.25)
    assert len({d.envelope.id for d in got}) == 3  # the envelope id is each batch's idempotency key


async def test_subscribe_yields_type_data_envelope_and_skips_bad_frames(
        nats_server: NatsServer) -> None:
    dev = device()
    limits = FrameLimits(max_frame_bytes=4096, max_depth=4)
    async with (
        Bus(NatsTransport(nats_server.url), source="agent-1") as agent,
        EdgeClient(device_id=dev, url=mqtt_url(nats_server), limits=limits) as edge,
        edge.subscribe("bus.ping", key=dev) as pings,
    ):
        raw, subject = agent.transport, Ping(agent_id=dev).subject()
        await raw.publish(subject, b"\xc1 garbage")
        await raw.publish(subject, b"\x00" * 5000)  # over the device's frame limit
        deep: object = 1
        for _ in range(10):
            deep = [deep]
        too_deep = make_envelope("bus.ping", {"agent_id": dev, "x": deep}, source="a")
        await raw.publish(subject, pack(too_deep))
        await raw.publish(subject, pack(make_envelope("bus.pong", {"agent_id": dev}, source="a")))
        sent = await agent.publish(Ping(agent_id=dev, text="hi"))
        event_type, data, env = await pings.next(5)
    assert (event_type, data) == ("bus.ping", {"agent_id": dev, "text": "hi"})
    assert env["id"] == sent.id and env["src"] == "agent-1" and env["sig"] is None
    assert edge.rejected == {"MalformedFrame": 3, "FrameTooLarge": 1}


async def test_request_reply_both_ways(nats_server: NatsServer) -> None:
    dev = device()
    async with Bus(NatsTransport(nats_server.url), source="agent-x") as agent, \
            Bus(MqttTransport(mqtt_url(nats_server), client_id=f"{dev}-a"), source="mqtt-ask") as asker, \
            EdgeClient(device_id=dev, url=mqtt_url(nats_server)) as edge:
        pings = await agent.subscribe(Ping, key="agent-x")

        async def agent_answers() -> None:
            async for d in pings:
                await agent.respond(d, Pong(agent_id="agent-x", text=d.event.text.upper()))

        async def device_answers() -> None:
            async with edge.subscribe("bus.ping", key=dev) as sub:
                ready.set()
                async for received in sub:
                    doubled = received.data["text"] * 2
                    await edge.respond(received, "bus.pong", {"agent_id": dev, "text": doubled})

        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(agent_answers()), tg.create_task(device_answers())]
            # the device asks a NATS agent: the envelope's reply is the device's inbox, across the gateway
            reply = await edge.request("bus.ping", {"agent_id": "agent-x", "text": "hi"}, key="agent-x",
                                       timeout=5)
            # an agent on MQTT asks the device (Bus.request over MQTT uses the envelope's reply too)
            await ready.wait()
            answer = await asker.request(Ping(agent_id=dev, text="yo"), timeout=5)
            for task in tasks:
                task.cancel()
    assert (reply.type, reply.data) == ("bus.pong", {"agent_id": "agent-x", "text": "HI", "rtt_hint_us": 0})
    assert reply.envelope["src"] == "agent-x"
    assert answer.event == Pong(agent_id=dev, text="yoyo") and answer.source == dev


async def test_signatures_verify_both_ways(nats_server: NatsServer) -> None:
    dev = device()
    agent_key = AgentKey(Ed25519PrivateKey.from_private_bytes(os.urandom(32)))
    async with EdgeClient(device_id=dev, url=mqtt_url(nats_server), signing_seed=os.urandom(32),
                          trusted_keys={agent_key.kid: agent_key.public_raw},
                          require_signatures=True) as edge:
        assert edge.public_key is not None
        keyring = KeyRing()
        keyring.trust(edge.public_key)
        async with Bus(NatsTransport(nats_server.url), source="strict", key=agent_key, keyring=keyring,
                       security=Security.STRICT) as agent:
            notices = await agent.subscribe(Notice, key="n1")
            forged = make_envelope("bus.notice", {"agent_id": "n1", "text": "forged"}, source=dev)
            Signer(os.urandom(32)).sign(forged)  # a key nobody trusts
            await edge.publish_envelope(forged, key="n1")
            sent = await edge.publish("bus.notice", {"agent_id": "n1", "text": "signed by the device"},
                                      key="n1")
            d = await notices.next(5)  # one connection, QoS 1: the forged frame came (and went) first
            assert d.event == Notice(agent_id="n1", text="signed by the device")
            assert d.envelope.id == sent["id"]
            assert agent.rejected == {"UnknownKey": 1}

            async with edge.subscribe("bus.notice", key=dev) as inbox:
                unsigned = agent.codec.envelope(Notice(agent_id=dev, text="unsigned"), source="strict")
                subject = Notice(agent_id=dev, text="").subject()
                await agent.transport.publish(subject, agent.codec.pack(unsigned))
                await agent.publish(Notice(agent_id=dev, text="from the agent"))  # Notice is signed=True
                received = await inbox.next(5)
    assert received.data == {"agent_id": dev, "text": "from the agent"}
    assert received.envelope["kid"] == agent_key.kid
    assert edge.rejected == {"SignatureError": 1}


# -- pure logic ---------------------------------------------------------------------------------------------
def test_topics_are_the_fedbus_subjects() -> None:
    for cls in CATALOGUE:
        spec = cls.spec
        pattern = to_mqtt(cls.pattern("k1")) if spec.key else to_mqtt(cls.pattern())
        assert event_topic(spec.type, "k1" if spec.key else None) == pattern
    assert event_topic("edge.status", "pi-7") == "fedbus/edge/status/pi-7"
    for bad_type, key in (("edge", None), ("edge.status.x", None), ("edge.sta tus", None),
                          ("edge.status", "a/b"), ("edge.status", "+")):
        with pytest.raises(TopicError):
            event_topic(bad_type, key)
    with pytest.raises(TopicError):
        EdgeClient(device_id="pi/7")
    # the client id is stable across restarts, so the persistent session resumes
    assert EdgeClient(device_id="pi-7")._link.options.client_id == "fedbus-edge-pi-7"


def test_incoming_frames_are_checked_before_and_while_decoding() -> None:
    good = make_envelope("bus.ping", {"agent_id": "a"}, source="s")
    present = {k: v for k, v in good.items() if v is not None}
    limits = FrameLimits(max_frame_bytes=256, max_depth=3, max_container_len=30)
    with pytest.raises(FrameTooLarge) as too_large:
        unpack(b"\x00" * 300, limits=limits)
    assert (too_large.value.size, too_large.value.limit) == (300, 256)
    cases = {
        "not a map": (msgpack.packb([1, 2]), None),
        "missing src": (msgpack.packb({k: v for k, v in present.items() if k != "src"}), "src"),
        "bool version": (pack({**good, "v": True}), "v"),
        "str data": (msgpack.packb({**present, "data": "x"}), "data"),
        "long string": (pack({**good, "src": "s" * 40}), None),
        "truncated": (pack(good)[:-3], None),
    }
    for name, (frame, field) in cases.items():
        with pytest.raises(MalformedFrame) as exc:
            unpack(frame, limits=limits)
        assert exc.value.field == field, name
    deep = make_envelope("x.y", {"a": [[[[1]]]]}, source="s")
    with pytest.raises(MalformedFrame, match="nesting deeper than 3"):
        decode_data(deep, limits=limits)
    with pytest.raises(MalformedFrame, match="payload is a map"):
        decode_data({**good, "data": msgpack.packb([1])})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.builds(lambda f, n: f[:n], st.just(pack(make_envelope(
    "bus.ping", {"agent_id": "a"}, source="s", trace="t"))), st.integers(0, 120)))
def test_fuzzed_frames_raise_only_frame_errors(frame: bytes) -> None:
    try:
        env = unpack(frame, limits=FrameLimits(max_frame_bytes=150))
        decode_data(env)
    except FrameError:
        pass


def test_metrics_batcher() -> None:
    batcher = MetricsBatcher("pi-7", max_points=3, max_age_s=60)
    batcher.add({"a": 1, "b": 2.5}, step=1, time_ns=10)
    assert not batcher.due() and batcher.due(now=float("inf"))
    batcher.add({"c": 3}, time_ns=11)
    assert batcher.due()
    assert batcher.take() == {"device_id": "pi-7", "seq": 1, "points": [
        {"name": "a", "value": 1.0, "time": 10, "step": 1},
        {"name": "b", "value": 2.5, "time": 10, "step": 1},
        {"name": "c", "value": 3.0, "time": 11, "step": None}]}
    assert batcher.take() is None
    for bad in ({"": 1.0}, {"x": float("nan")}, {"x": True}, {"x": "1"}):
        with pytest.raises(EdgeError):
            batcher.add(bad)


def test_the_slim_edge_distribution_declares_only_mqtt_and_msgpack() -> None:
    """`pip install ./edge_sdk` (fedbus-edge) ships the same package with nothing but its two dependencies."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "edge_sdk" / "pyproject.toml").read_text())
    deps = sorted(d.split(">")[0].split("<")[0].split("=")[0] for d in project["project"]["dependencies"])
    assert deps == ["aiomqtt", "msgpack"]
    assert project["tool"]["setuptools"]["package-dir"] == {"fedbus.edge_sdk": "."}
