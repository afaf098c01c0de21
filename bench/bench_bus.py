"""Publish→subscribe and request/reply through fedbus vs raw nats-py, side by side on the same server.

    python -m bench.bench_bus [--messages 20000] [--rounds 3] [--server nats://...]

Without --server an embedded nats-server is started on free ports. Each case runs ``--rounds`` times, fedbus
and raw interleaved, and the best round is kept (this machine is shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import nats

from fedbus.bus import Bus, Event, Security, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.nats_transport import NatsTransport

from ._table import print_table


@event("bench", "blob", key="stream")
class Blob(Event):
    stream: str
    seq: int
    data: bytes


async def raw_pubsub(url: str, size: int, n: int) -> float:
    pub, sub_nc = await nats.connect(url, pending_size=256 * 1024 * 1024), await nats.connect(url)
    done = asyncio.Event()
    count = 0

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    await sub_nc.subscribe("bench.raw", cb=on_msg, pending_msgs_limit=n + 1, pending_bytes_limit=-1)
    await sub_nc.flush()
    payload = b"x" * size
    start = time.perf_counter()
    for _ in range(n):
        await pub.publish("bench.raw", payload)
    await pub.flush()
    await done.wait()
    elapsed = time.perf_counter() - start
    await pub.close()
    await sub_nc.close()
    return n / elapsed


async def fedbus_pubsub(url: str, size: int, n: int) -> float:
    async with (
        Bus(NatsTransport(url, reconnect_buffer_bytes=256 * 1024 * 1024), source="pub",
            security=Security.OFF) as pub,
        Bus(NatsTransport(url), source="sub", security=Security.OFF) as sub,
    ):
        received = 0
        done = asyncio.Event()
        subscription = await sub.subscribe(Blob, key="s", max_pending=n + 1)

        async def reader() -> None:
            nonlocal received
            async for _ in subscription:
                received += 1
                if received == n:
                    done.set()
                    return

        payload = b"x" * size
        task = asyncio.create_task(reader())
        start = time.perf_counter()
        for i in range(n):
            await pub.publish(Blob(stream="s", seq=i, data=payload))
        await pub.transport.flush()
        await done.wait()
        elapsed = time.perf_counter() - start
        await task
        return n / elapsed


async def raw_request(url: str, n: int) -> list[float]:
    client, server = await nats.connect(url), await nats.connect(url)

    async def respond(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data)

    await server.subscribe("bench.rr", cb=respond)
    await server.flush()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        await client.request("bench.rr", b"x" * 128, timeout=5)
        lat.append(time.perf_counter() - t)
    await client.close()
    await server.close()
    return lat


async def fedbus_request(url: str, n: int) -> list[float]:
    async with (
        Bus(NatsTransport(url), source="client", security=Security.OFF) as client,
        Bus(NatsTransport(url), source="server", security=Security.OFF) as server,
    ):
        sub = await server.subscribe(Blob, key="rr")

        async def responder() -> None:
            async for d in sub:
                await server.respond(d, d.event)

        task = asyncio.create_task(responder())
        lat = []
        req = Blob(stream="rr", seq=0, data=b"x" * 100)
        for _ in range(n):
            t = time.perf_counter()
            await client.request(req, timeout=5)
            lat.append(time.perf_counter() - t)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return lat


def signing_rows(n: int = 3000) -> list[list[str]]:
    """Ed25519 through the envelope (signing bytes + sign / verify) vs raw ``cryptography`` on the same bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedbus.bus import AgentKey, Codec, KeyRing

    codec, key = Codec(), AgentKey.generate()
    ring = KeyRing({key.kid: key.public_raw})
    envs = [codec.envelope(Blob(stream="s", seq=i, data=b"x" * 128), source="a") for i in range(n)]
    raw_key = Ed25519PrivateKey.generate()
    blobs = [e.data for e in envs]

    def rate(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t)

    raw_sign = rate(lambda: [raw_key.sign(b) for b in blobs])
    fed_sign = rate(lambda: [key.sign(e) for e in envs])
    sigs = [raw_key.sign(b) for b in blobs]
    pub = raw_key.public_key()
    raw_verify = rate(lambda: [pub.verify(s, b) for s, b in zip(sigs, blobs, strict=True)])
    fed_verify = rate(lambda: [ring.verify(e) for e in envs])
    return [["Ed25519 sign (1 core)", f"{raw_sign:,.0f}/s", f"{fed_sign:,.0f}/s", f"{fed_sign / raw_sign:.0%}", ""],
            ["Ed25519 verify (1 core)", f"{raw_verify:,.0f}/s", f"{fed_verify:,.0f}/s",
             f"{fed_verify / raw_verify:.0%}", ""]]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e6


async def run(url: str, messages: int, rounds: int) -> None:
    rows = []
    for size in (128, 4096, 65536):
        n = messages if size < 65536 else max(messages // 4, 1000)
        raw, fed = 0.0, 0.0
        for _ in range(rounds):  # interleaved, best of
            raw = max(raw, await raw_pubsub(url, size, n))
            fed = max(fed, await fedbus_pubsub(url, size, n))
        rows.append([f"pub→sub {size} B", f"{raw:,.0f} msg/s", f"{fed:,.0f} msg/s", f"{fed / raw:.0%}",
                     f"{raw * size / 1e6:,.0f} / {fed * size / 1e6:,.0f} MB/s"])
    n_rr = max(messages // 10, 500)
    raw_lat, fed_lat = await raw_request(url, n_rr), await fedbus_request(url, n_rr)
    for q in (50, 99):
        r, f = pct(raw_lat, q), pct(fed_lat, q)
        rows.append([f"request/reply p{q}", f"{r:,.0f} µs", f"{f:,.0f} µs", f"{r / f:.0%}", ""])
    rows += signing_rows()
    print_table("fedbus vs raw nats-py (same server, same payload)",
                ["case", "raw nats-py", "fedbus", "fedbus/raw", "payload MB/s raw / fedbus"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default=None)
    args = parser.parse_args()
    if args.server:
        asyncio.run(run(args.server, args.messages, args.rounds))
    else:
        with NatsServer(mqtt_port=None) as server:
            asyncio.run(run(server.url, args.messages, args.rounds))


if __name__ == "__main__":
    main()
