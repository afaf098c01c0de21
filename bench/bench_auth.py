"""What trust costs: TLS + authentication + per-role permissions vs ``--insecure``, side by side in one run.

    python -m bench.bench_auth [--messages 20000] [--rounds 3]

Two nats-servers run at once on this machine: an open one (``fedbus up --insecure``) and one as ``fedbus up``
starts it by default (TLS on, bcrypt-hashed users, permissions generated from the catalogue). The publisher
logs in as a scheduler and the subscriber as an observer, so every message passes a permission check. Rounds
are interleaved and the best kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from fedbus.bus import Event, Security, connect, event
from fedbus.bus.authority import Authority
from fedbus.bus.broker import NatsServer
from fedbus.bus.creds import Credentials
from fedbus.bus.permissions import inbox_prefix

from ._table import print_table


@event("bench", "auth_blob", key="stream", pub=("scheduler",), sub=("observer",))
class AuthBlob(Event):
    stream: str
    seq: int
    data: bytes


@event("bench", "auth_echo", key="stream", pub=("observer",), sub=("scheduler",))
class AuthEcho(Event):
    stream: str
    seq: int


class Mode:
    def __init__(self, name: str, url: str, pub: Credentials | None, sub: Credentials | None) -> None:
        self.name, self.url, self.pub, self.sub = name, url, pub, sub


async def pubsub(mode: Mode, size: int, n: int) -> float:
    async with (
        connect(mode.url, source="bench-pub", creds=mode.pub, security=Security.OFF, persistent=False) as pub,
        connect(mode.url, source="bench-sub", creds=mode.sub, security=Security.OFF, persistent=False) as sub,
    ):
        subscription = await sub.subscribe(AuthBlob, key="s", max_pending=n + 1)
        done = asyncio.Event()

        async def reader() -> None:
            received = 0
            async for _ in subscription:
                received += 1
                if received == n:
                    done.set()
                    return

        task = asyncio.create_task(reader())
        await sub.transport.flush()
        payload = b"x" * size
        start = time.perf_counter()
        for i in range(n):
            await pub.publish(AuthBlob(stream="s", seq=i, data=payload))
        await pub.transport.flush()
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - start
        await task
        return n / elapsed


async def raw_pubsub(mode: Mode, size: int, n: int) -> float:
    """The same through raw nats-py: how much of the cost is the TLS stack itself, not fedbus."""
    def opts(creds: Credentials | None) -> dict[str, object]:
        if creds is None:
            return {}
        return {"user": creds.user, "password": creds.password, "tls": creds.ssl_context(),
                "inbox_prefix": inbox_prefix(creds.id)}

    pub = await nats.connect(mode.url, pending_size=256 * 1024 * 1024, **opts(mode.pub))  # type: ignore[arg-type]
    sub = await nats.connect(mode.url, **opts(mode.sub))  # type: ignore[arg-type]
    done, count = asyncio.Event(), 0

    async def on_msg(msg: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    await sub.subscribe(AuthBlob.pattern("s"), cb=on_msg, pending_msgs_limit=n + 1, pending_bytes_limit=-1)
    await sub.flush()
    payload = b"x" * size
    start = time.perf_counter()
    for _ in range(n):
        await pub.publish(AuthBlob.pattern("s"), payload)
    await pub.flush()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    await pub.close()
    await sub.close()
    return n / elapsed


async def request_reply(mode: Mode, n: int) -> list[float]:
    async with (
        connect(mode.url, source="bench-req", creds=mode.pub, security=Security.OFF, persistent=False) as client,
        connect(mode.url, source="bench-rep", creds=mode.sub, security=Security.OFF, persistent=False) as server,
    ):
        requests = await server.subscribe(AuthBlob, key="rr")

        async def responder() -> None:
            async for d in requests:
                await server.respond(d, AuthEcho(stream="rr", seq=d.event.seq))

        task = asyncio.create_task(responder())
        await server.transport.flush()
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            await client.request(AuthBlob(stream="rr", seq=i, data=b"x" * 100), timeout=5)
            latencies.append(time.perf_counter() - t)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return latencies


async def connect_times(mode: Mode, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        async with connect(mode.url, source="bench-conn", creds=mode.pub, persistent=False):
            times.append(time.perf_counter() - t)
    return times


async def run(modes: list[Mode], messages: int, rounds: int) -> None:
    insecure, secure = modes
    rows = []
    for size in (128, 4096):
        for label, bench in (("fedbus", pubsub), ("raw nats-py", raw_pubsub)):
            best = {m.name: 0.0 for m in modes}
            for _ in range(rounds):
                for mode in modes:
                    best[mode.name] = max(best[mode.name], await bench(mode, size, messages))
            a, b = best[insecure.name], best[secure.name]
            rows.append([f"{label} pub→sub {size} B", f"{a:,.0f} msg/s", f"{b:,.0f} msg/s", f"{b / a:.0%}"])
    n_rr = max(messages // 10, 500)
    lat = {m.name: await request_reply(m, n_rr) for m in modes}
    a, b = (statistics.median(lat[m.name]) * 1e6 for m in modes)
    rows.append(["request/reply p50", f"{a:,.0f} µs", f"{b:,.0f} µs", f"{a / b:.0%}"])
    conn = {m.name: await connect_times(m, 20) for m in modes}
    a, b = (statistics.median(conn[m.name]) * 1e3 for m in modes)
    rows.append(["connect (p50 of 20)", f"{a:,.1f} ms", f"{b:,.1f} ms", f"{a / b:.0%}"])
    print_table("fedbus: TLS + auth + permissions vs --insecure (same machine, same run; ratio: secure/insecure "
                "throughput, insecure/secure latency)", ["case", "--insecure", "secure (default)", "ratio"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="Run on uvloop (its TLS is not asyncio's).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedbus-bench-auth-") as tmp:
        authority = Authority(Path(tmp) / "secure")
        with NatsServer(mqtt_port=None, data_dir=Path(tmp) / "open") as open_server, \
                authority.server(mqtt_port=None) as secure_server:
            authority.record(secure_server)
            pub, sub = authority.issue("scheduler", "bench-sched"), authority.issue("observer", "bench-obs")
            authority.apply()
            modes = [Mode("insecure", open_server.url, None, None), Mode("secure", secure_server.url, pub, sub)]
            if args.uvloop:
                import uvloop  # optional

                uvloop.run(run(modes, args.messages, args.rounds))
            else:
                asyncio.run(run(modes, args.messages, args.rounds))


if __name__ == "__main__":
    main()
