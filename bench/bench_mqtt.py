"""The MQTT path: fedbus over MQTT vs raw aiomqtt, and MQTT devices meeting NATS agents, side by side.

    python -m bench.bench_mqtt [--messages 3000] [--rounds 3] [--latency 1000]

Publish → subscribe of 128 B at QoS 1 (each publish awaits its PUBACK), 1 and 32 publishes in flight, through
``Bus(MqttTransport(...))`` vs raw aiomqtt 2.x with the same payload, on nats-server's MQTT listener and, when
the ``mosquitto`` binary exists, on a Mosquitto started on a free port. The rate is from the first publish to
the last message received. Then the cross-transport path through nats-server's MQTT gateway: an MQTT device
publishing an event that a NATS agent receives (and the reverse), one message at a time, latency p50/p99 from
the publish call to the receive; raw is aiomqtt → nats-py on the same topic/subject.

Throughput cases run ``--rounds`` times, fedbus and raw interleaved, and keep the best round (this machine is
shared; the best is the least disturbed). Every client uses a clean session and a fresh client id.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiomqtt
import nats

from fedbus.bus import Bus, Event, Security, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.mqtt_transport import MqttTransport
from fedbus.bus.nats_transport import NatsTransport

from ._brokers import Mosquitto, find_mosquitto
from ._table import print_table

PAYLOAD = 128
WINDOWS = (1, 32)


@event("bench", "reading", key="device")
class Reading(Event):
    device: str
    seq: int
    data: bytes


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def raw_client(url: str) -> aiomqtt.Client:
    host, port = host_port(url)
    client = aiomqtt.Client(host, port, identifier=new_id("raw"), clean_session=True,
                            protocol=aiomqtt.ProtocolVersion.V311)
    client.pending_calls_threshold = 1_000_000  # the window bounds publishes; silence aiomqtt's warning
    return client


def fed_bus(url: str, source: str) -> Bus:
    transport = MqttTransport(url, client_id=new_id(source), clean_session=True)
    return Bus(transport, source=source, security=Security.OFF)


async def windows(n: int, window: int, publish: Callable[[int], Awaitable[None]]) -> None:
    """``n`` publishes, ``window`` at a time, each awaited (QoS 1: until its PUBACK)."""
    for first in range(0, n, window):
        await asyncio.gather(*(publish(i) for i in range(first, min(first + window, n))))


# -- publish → subscribe --------------------------------------------------------------------------------
async def raw_pubsub(url: str, n: int, window: int) -> float:
    topic = f"rawbench/{os.urandom(4).hex()}/x"
    payload = os.urandom(PAYLOAD)
    async with raw_client(url) as sub, raw_client(url) as pub:
        await sub.subscribe(topic, qos=1)
        done = asyncio.Event()

        async def reader() -> None:
            count = 0
            async for _ in sub.messages:
                count += 1
                if count == n:
                    done.set()
                    return

        async with asyncio.TaskGroup() as tg:
            tg.create_task(reader())
            start = time.perf_counter()
            await windows(n, window, lambda _i: pub.publish(topic, payload, qos=1))
            await asyncio.wait_for(done.wait(), 30)
            elapsed = time.perf_counter() - start
    return n / elapsed


async def fed_pubsub(url: str, n: int, window: int) -> float:
    device = new_id("dev")
    payload = os.urandom(PAYLOAD)
    async with fed_bus(url, "bench-sub") as sub_bus, fed_bus(url, "bench-pub") as pub_bus:
        subscription = await sub_bus.subscribe(Reading, key=device, max_pending=n + 16)
        done = asyncio.Event()

        async def reader() -> None:
            count = 0
            async for _ in subscription:
                count += 1
                if count == n:
                    done.set()
                    return

        async with asyncio.TaskGroup() as tg:
            tg.create_task(reader())
            start = time.perf_counter()
            await windows(n, window, lambda i: pub_bus.publish(Reading(device=device, seq=i, data=payload)))
            await asyncio.wait_for(done.wait(), 30)
            elapsed = time.perf_counter() - start
    return n / elapsed


# -- across the gateway: MQTT device ↔ NATS agent -------------------------------------------------------
Probe = Callable[[int], Awaitable[float]]


async def timed(n: int, warmup: int, probe: Probe) -> list[float]:
    """Latencies of ``n`` probes, after ``warmup`` untimed ones (routes, sessions, caches settle)."""
    for i in range(warmup):
        await probe(i)
    return [await probe(warmup + i) for i in range(n)]


async def raw_cross(nats_url: str, mqtt_url: str, n: int) -> tuple[list[float], list[float]]:
    token = os.urandom(4).hex()
    topic, subject = f"rawbench/{token}/x", f"rawbench.{token}.x"
    payload = os.urandom(PAYLOAD)
    nc = await nats.connect(nats_url)
    try:
        async with raw_client(mqtt_url) as device:
            nsub = await nc.subscribe(subject)
            await nc.flush()

            async def up(_i: int) -> float:  # device publishes, agent receives
                start = time.perf_counter()
                sent = asyncio.ensure_future(device.publish(topic, payload, qos=1))
                await nsub.next_msg(timeout=5)
                latency = time.perf_counter() - start
                await sent
                return latency

            ups = await timed(n, 20, up)
            await nsub.unsubscribe()
            await device.subscribe(topic, qos=1)
            messages = aiter(device.messages)

            async def down(_i: int) -> float:  # agent publishes, device receives
                start = time.perf_counter()
                await nc.publish(subject, payload)
                await asyncio.wait_for(anext(messages), 5)
                return time.perf_counter() - start

            downs = await timed(n, 20, down)
    finally:
        await nc.close()
    return ups, downs


async def fed_cross(nats_url: str, mqtt_url: str, n: int) -> tuple[list[float], list[float]]:
    device_id = new_id("dev")
    payload = os.urandom(PAYLOAD)
    async with fed_bus(mqtt_url, device_id) as device, \
            Bus(NatsTransport(nats_url), source="bench-agent", security=Security.OFF) as agent:
        at_agent = await agent.subscribe(Reading, key=device_id)

        async def up(i: int) -> float:
            start = time.perf_counter()
            sent = asyncio.ensure_future(device.publish(Reading(device=device_id, seq=i, data=payload)))
            await at_agent.next(5)
            latency = time.perf_counter() - start
            await sent
            return latency

        ups = await timed(n, 20, up)
        await at_agent.unsubscribe()
        at_device = await device.subscribe(Reading, key=device_id)

        async def down(i: int) -> float:
            start = time.perf_counter()
            await agent.publish(Reading(device=device_id, seq=i, data=payload))
            await at_device.next(5)
            return time.perf_counter() - start

        downs = await timed(n, 20, down)
    return ups, downs


# -- the run --------------------------------------------------------------------------------------------
async def best_of(rounds: int, cases: list[tuple[str, Callable[[], Awaitable[float]]]]) -> dict[str, float]:
    best = dict.fromkeys((name for name, _ in cases), 0.0)
    for _ in range(rounds):
        for name, case in cases:
            best[name] = max(best[name], await case())
    return best


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1e6


async def throughput_rows(broker: str, url: str, messages: int, rounds: int) -> list[list[str]]:
    rows = []
    for window in WINDOWS:
        n = messages if window == 1 else messages * 2
        best = await best_of(rounds, [("raw", functools.partial(raw_pubsub, url, n, window)),
                                      ("fed", functools.partial(fed_pubsub, url, n, window))])
        raw, fed = best["raw"], best["fed"]
        rows.append([f"{broker}: pub→sub, {window} in flight", f"{raw:,.0f} msg/s", f"{fed:,.0f} msg/s",
                     f"{fed / raw:.0%}", f"{n:,} msgs"])
    return rows


async def run(nats_url: str, mqtt_url: str, mosquitto: str | None, args: argparse.Namespace) -> None:
    rows = await throughput_rows("nats-server MQTT", mqtt_url, args.messages, args.rounds)
    if mosquitto is not None:
        with Mosquitto(mosquitto) as broker:
            rows += await throughput_rows("mosquitto", broker.url, args.messages, args.rounds)
    raw_up, raw_down = await raw_cross(nats_url, mqtt_url, args.latency)
    fed_up, fed_down = await fed_cross(nats_url, mqtt_url, args.latency)
    for label, raw_lat, fed_lat in (("MQTT device → NATS agent", raw_up, fed_up),
                                    ("NATS agent → MQTT device", raw_down, fed_down)):
        for q in (50, 99):
            r, f = pct(raw_lat, q), pct(fed_lat, q)
            rows.append([f"{label} p{q}", f"{r:,.0f} µs", f"{f:,.0f} µs", f"{r / f:.0%}",
                         f"{args.latency} msgs, 1 at a time"])
    if mosquitto is None:
        rows.append(["mosquitto", "not found", "", "", "install it to compare a second broker"])
    print_table(f"MQTT, {PAYLOAD} B QoS 1: fedbus Bus(MqttTransport) vs raw aiomqtt "
                f"(same broker; best of {args.rounds}; latency ratio = raw/fedbus)",
                ["case", "raw aiomqtt (→ nats-py)", "fedbus", "fedbus/raw", "n"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000, help="messages per round with 1 in flight "
                        "(twice as many with 32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=int, default=1000, help="messages timed one at a time, each way")
    args, _unknown = parser.parse_known_args()  # `python -m bench` passes every bench the same arguments
    mosquitto = find_mosquitto()
    with NatsServer() as server:
        assert server.mqtt_url is not None
        asyncio.run(run(server.url, server.mqtt_url, mosquitto, args))


if __name__ == "__main__":
    main()
