"""JetStream durable events through fedbus's event log vs raw nats-py JetStream, side by side on one server.

    python -m bench.bench_durable [--events 20000] [--rounds 3] [--batch 64] [--server nats://...]

Cases, each 128 B of payload per event (fedbus adds its envelope around it):

* publish one at a time, awaiting each ack: ``EventLog.publish`` vs ``js.publish``;
* windowed publish, 256 acks in flight: ``EventLog.publish_many`` vs ``js.publish_async`` (nats-py's own
  window; an ``asyncio.gather`` over windows of ``js.publish`` where nats-py lacks it); raw once plain and
  once with a ``Nats-Msg-Id`` header per message, which fedbus always sends (its dedup key: a retried
  publish is never stored twice), so the second raw row is the like-for-like one;
* durable consume with explicit acks: ``EventLog.consume(...)`` + ``ack()`` vs a raw pull subscription,
  ``fetch(batch)`` + ``ack()``; both read the events the windowed round just stored.

Both sides use file-storage streams with the same settings; streams are purged before every round. Each case
runs ``--rounds`` times, fedbus and raw interleaved, and the best round is kept (this machine is shared; the
best is the least disturbed). Without ``--server`` an embedded nats-server is started on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import nats
from nats.js import api
from nats.js.client import JetStreamContext

from fedbus.bus import Bus, Event, Security, event
from fedbus.bus.broker import NatsServer
from fedbus.bus.jetstream import JetStreamEventLog
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.stores import open_stores, stream_name

from ._table import print_table

PAYLOAD = 128
WINDOW = 256  # JetStreamOptions.publish_window's default: the same window on both sides
RAW_STREAM = "RAW_BENCH"
RAW_SUBJECT = "rawbench.tick"


@event("bench", "tick", key="stream", durable=True)
class Tick(Event):
    stream: str
    seq: int
    data: bytes


FED_STREAM = stream_name(Tick.spec.domain)


def stream_config(name: str, subjects: list[str], max_msg_size: int) -> api.StreamConfig:
    """The raw stream, configured as the event log configures its own (file storage, 2 min dedup window)."""
    return api.StreamConfig(
        name=name, subjects=subjects, storage=api.StorageType.FILE, num_replicas=1, duplicate_window=120.0,
        max_msg_size=max_msg_size, discard=api.DiscardPolicy.OLD, retention=api.RetentionPolicy.LIMITS,
    )


def msg_ids(n: int) -> list[str]:
    """Unique dedup ids for the raw publishes, made before the clock starts (fedbus makes its own inside)."""
    prefix = os.urandom(6).hex()
    return [f"{prefix}-{i}" for i in range(n)]


# -- raw nats-py ----------------------------------------------------------------------------------------
async def raw_publish_each(js: JetStreamContext, n: int) -> float:
    payload = os.urandom(PAYLOAD)
    start = time.perf_counter()
    for _ in range(n):
        await js.publish(RAW_SUBJECT, payload)
    return n / (time.perf_counter() - start)


async def raw_publish_window(js: JetStreamContext, n: int, *, with_ids: bool) -> float:
    payload = os.urandom(PAYLOAD)
    ids = msg_ids(n) if with_ids else None
    if hasattr(js, "publish_async"):  # nats-py >= 2.10: its semaphore keeps WINDOW acks in flight
        start = time.perf_counter()
        futures = [await js.publish_async(RAW_SUBJECT, payload,
                                          headers=None if ids is None else {"Nats-Msg-Id": ids[i]})
                   for i in range(n)]
        await asyncio.gather(*futures)
    else:
        start = time.perf_counter()
        for first in range(0, n, WINDOW):
            await asyncio.gather(*(js.publish(RAW_SUBJECT, payload,
                                              headers=None if ids is None else {"Nats-Msg-Id": ids[i]})
                                   for i in range(first, min(first + WINDOW, n))))
    return n / (time.perf_counter() - start)


async def raw_consume(js: JetStreamContext, n: int, batch: int, durable: str) -> float:
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30.0, max_ack_pending=1000,
                                deliver_policy=api.DeliverPolicy.ALL)
    psub = await js.pull_subscribe(RAW_SUBJECT, durable=durable, stream=RAW_STREAM, config=config)
    received = 0
    start = time.perf_counter()
    while received < n:
        for msg in await psub.fetch(min(batch, n - received), timeout=10):
            await msg.ack()
            received += 1
    elapsed = time.perf_counter() - start
    await psub.unsubscribe()
    await js.delete_consumer(RAW_STREAM, durable)
    return n / elapsed


# -- fedbus ---------------------------------------------------------------------------------------------
def ticks(n: int) -> list[Tick]:
    payload = os.urandom(PAYLOAD)
    return [Tick(stream="s", seq=i, data=payload) for i in range(n)]


async def fed_publish_each(log: JetStreamEventLog, n: int) -> float:
    events = ticks(n)
    start = time.perf_counter()
    for ev in events:
        await log.publish(ev)
    return n / (time.perf_counter() - start)


async def fed_publish_window(log: JetStreamEventLog, n: int) -> float:
    events = ticks(n)
    start = time.perf_counter()
    await log.publish_many(events)
    return n / (time.perf_counter() - start)


async def fed_consume(
    log: JetStreamEventLog, js: JetStreamContext, n: int, batch: int, durable: str
) -> float:
    async with log.consume(Tick, durable=durable, batch=batch, max_ack_pending=1000) as consumer:
        start = time.perf_counter()  # after the consumer exists, as on the raw side
        for _ in range(n):
            delivery = await consumer.next(10)
            await delivery.ack()
        elapsed = time.perf_counter() - start
    await js.delete_consumer(FED_STREAM, durable)
    return n / elapsed


# -- the run --------------------------------------------------------------------------------------------
async def best_of(rounds: int, before: Callable[[], Awaitable[None]],
                  cases: list[tuple[str, Callable[[int], Awaitable[float]]]]) -> dict[str, float]:
    """Run every case once per round (interleaved, ``before`` first), keep each case's best rate."""
    best = dict.fromkeys((name for name, _ in cases), 0.0)
    for r in range(rounds):
        await before()
        for name, case in cases:
            best[name] = max(best[name], await case(r))
    return best


async def run(url: str, events: int, rounds: int, batch: int) -> None:
    async with Bus(NatsTransport(url), source="bench-durable", security=Security.OFF) as bus:
        stores = await open_stores(bus, publish_window=WINDOW)
        log = stores.event_log()
        assert isinstance(log, JetStreamEventLog)
        await log.ensure(Tick)
        raw_nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        try:
            js = raw_nc.jetstream(publish_async_max_pending=WINDOW)
            await js.add_stream(stream_config(RAW_STREAM, [RAW_SUBJECT], bus.codec.limits.max_frame_bytes))

            async def purge() -> None:
                await js.purge_stream(RAW_STREAM)
                await js.purge_stream(FED_STREAM)

            n_each = max(events // 5, 500)
            each = await best_of(rounds, purge, [
                ("raw", lambda _r: raw_publish_each(js, n_each)),
                ("fed", lambda _r: fed_publish_each(log, n_each)),
            ])
            # windowed publishes fill the streams that the consumers then read, in the same round
            window = await best_of(rounds, purge, [
                ("raw", lambda _r: raw_publish_window(js, events, with_ids=False)),
                ("raw+id", lambda _r: raw_publish_window(js, events, with_ids=True)),  # the stream holds 2x events
                ("fed", lambda _r: fed_publish_window(log, events)),
                ("raw consume", lambda r: raw_consume(js, events, batch, f"raw{r}")),
                ("fed consume", lambda r: fed_consume(log, js, events, batch, f"fed{r}")),
            ])
        finally:
            await raw_nc.close()

    def row(case: str, raw: float, fed: float, note: str = "") -> list[str]:
        return [case, f"{raw:,.0f} ev/s", f"{fed:,.0f} ev/s", f"{fed / raw:.0%}", note]

    rows = [
        row("publish, await each ack", each["raw"], each["fed"], "js.publish vs EventLog.publish"),
        row(f"publish, {WINDOW} acks in flight", window["raw"], window["fed"],
            "js.publish_async vs EventLog.publish_many"),
        row("  same, raw with Nats-Msg-Id", window["raw+id"], window["fed"],
            "fedbus always sends one (dedup by event id)"),
        row(f"consume + ack, batch {batch}", window["raw consume"], window["fed consume"],
            "pull fetch+ack vs EventLog.consume+ack"),
    ]
    print_table(f"JetStream durable events, {PAYLOAD} B payload: fedbus vs raw nats-py (same server, file "
                f"storage, best of {rounds})", ["case", "raw nats-py", "fedbus", "fedbus/raw", "what"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per windowed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="events fetched at a time by the consumers")
    parser.add_argument("--server", default=None, help="an existing nats:// server (default: embedded)")
    args, _unknown = parser.parse_known_args()  # `python -m bench` passes every bench the same arguments
    if args.server:
        asyncio.run(run(args.server, args.events, args.rounds, args.batch))
    else:
        with NatsServer(mqtt_port=None) as server:
            asyncio.run(run(server.url, args.events, args.rounds, args.batch))


if __name__ == "__main__":
    main()
