"""``make demo``: an embedded broker, a few agents in one process, typed events between them, told as a log.

Run with ``python -m fedbus.bus.demo``. Each stage is an async function taking the shared
:class:`DemoContext`; :data:`STAGES` lists them in order. Later work (launching a job, running a federation)
adds its own stage functions to :data:`STAGES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console
from rich.text import Text

from .broker import NatsServer
from .catalogue import Heartbeat, Notice, Ping, Pong, Record
from .client import Bus, Security
from .connect import connect, transport_for
from .console import configure_logging
from .errors import ConfigError, FedbusError
from .jetstream import JetStream
from .signing import AgentKey, KeyRing
from .stores import stream_name

__all__ = ["STAGES", "DemoContext", "Stage", "all_stages", "main", "run"]


@dataclass
class DemoContext:
    """What every stage gets: where the broker is, where to write, and a running tally."""

    url: str
    mqtt_url: str | None
    console: Console
    data_dir: Path
    stage_timeout: float = 10.0
    started: float = field(default_factory=time.monotonic)
    tally: Counter[str] = field(default_factory=Counter)

    def say(self, who: str, what: str, *, style: str = "") -> None:
        """One line of the story: elapsed time, the agent, what happened."""
        line = Text(f"  {time.monotonic() - self.started:6.2f}s  ", style="dim")
        line.append(f"{who:<10}", style="bold green")
        line.append(" ")
        line.append(what, style=style)
        self.console.print(line)

    def bus(self, source: str, *, key: AgentKey | None = None, keyring: KeyRing | None = None,
            security: Security = Security.VERIFY) -> Bus:
        """A new bus for agent ``source`` on the demo's NATS broker (``async with`` it)."""
        return connect(self.url, source=source, key=key, keyring=keyring, security=security)


Stage = Callable[[DemoContext], Awaitable[None]]


async def heartbeats(ctx: DemoContext) -> None:
    """Two GPU agents announce themselves; a monitor sees every heartbeat."""
    async with ctx.bus("monitor") as monitor, ctx.bus("gpu-1") as gpu1, ctx.bus("gpu-2") as gpu2:
        beats = await monitor.subscribe(Heartbeat)
        for seq in (1, 2):
            for bus in (gpu1, gpu2):
                await bus.publish(Heartbeat(agent_id=bus.source, seq=seq, role="gpu", labels={"gpus": 2}))
        for _ in range(4):
            d = await beats.next()
            ctx.tally["heartbeats seen"] += 1
            ctx.say("monitor", f"heartbeat #{d.event.seq} from {d.event.agent_id} on {d.subject}")


async def request_reply(ctx: DemoContext) -> None:
    """The monitor pings an agent; the agent answers with a pong carrying the same trace id."""
    async with ctx.bus("monitor") as monitor, ctx.bus("gpu-1") as gpu1:
        pings = await gpu1.subscribe(Ping, key="gpu-1")

        async def answer() -> None:
            async with pings:
                d = await pings.next()
                ctx.say("gpu-1", f"got ping {d.event.text!r}, answering")
                await gpu1.respond(d, Pong(agent_id="gpu-1", text="pong"))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(answer())
            t0 = time.perf_counter()
            reply = await monitor.request(Ping(agent_id="gpu-1", text="are you there?"), timeout=5.0)
            rtt_us = (time.perf_counter() - t0) * 1e6
        ctx.tally["round trips"] += 1
        ctx.say("monitor", f"{reply.envelope.type} from {reply.source} in {rtt_us:.0f} µs "
                           f"(trace {reply.envelope.trace})")


async def signed_events(ctx: DemoContext) -> None:
    """A signed notice is accepted; a forged copy, a replay and one signed by an unknown key are dropped."""
    scheduler_key, mallory_key = AgentKey.generate(), AgentKey.generate()
    trusted = KeyRing()
    trusted.trust(scheduler_key.public_raw)
    async with (
        ctx.bus("worker", keyring=trusted, security=Security.STRICT) as worker,
        ctx.bus("scheduler", key=scheduler_key) as scheduler,
        ctx.bus("mallory", key=mallory_key) as mallory,
    ):
        async with await worker.subscribe(Notice) as notices:
            genuine = await scheduler.publish(Notice(agent_id="scheduler", text="job j-1 goes to gpu-1"))
            ctx.say("scheduler", f"signed notice {genuine.id} (key {scheduler_key.kid})")
            d = await notices.next()
            ctx.say("worker", f"accepted: {d.event.text!r} signed by {d.envelope.kid}", style="green")

            forged = mallory.codec.unpack(scheduler.codec.pack(genuine))
            forged.data = mallory.codec.envelope(Notice(agent_id="scheduler", text="job j-1 goes to mallory"),
                                                 source="scheduler").data
            await mallory.publish_envelope(Notice(agent_id="scheduler", text="").subject(), forged)
            ctx.say("mallory", "sent the notice with its text altered", style="red")
            await mallory.publish_envelope(Notice(agent_id="scheduler", text="").subject(), genuine)
            ctx.say("mallory", "replayed the genuine notice", style="red")
            await mallory.publish(Notice(agent_id="mallory", text="trust me"))
            ctx.say("mallory", "sent a notice signed by its own, untrusted key", style="red")
            await mallory.transport.flush()  # the server has them before the next genuine notice

            await scheduler.publish(Notice(agent_id="scheduler", text="that is all"))
            d = await notices.next()
            ctx.say("worker", f"accepted: {d.event.text!r}", style="green")
            # NATS orders messages per publisher only: mallory's frames may still be on their way.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while sum(worker.rejected.values()) < 3 and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    extra = await notices.next(0.2)
                    ctx.say("worker", f"accepted: {extra.event.text!r}", style="green")
        rejected = dict(worker.rejected)
        ctx.tally["bad events dropped"] += sum(rejected.values())
        ctx.say("worker", f"dropped {sum(rejected.values())}: {rejected}", style="yellow")
        if sum(rejected.values()) != 3:
            raise FedbusError(f"expected 3 rejected notices, got {rejected}")


async def durable_events(ctx: DemoContext) -> None:
    """Records go to a JetStream stream (deduplicated by event id) and are read back after their publisher
    left."""
    texts = ("dataset registered", "model v1 stored", "run r-1 finished")
    async with ctx.bus("recorder") as recorder:
        log = JetStream(recorder).event_log()
        sent = [await log.publish(Record(topic="demo", text=text, fields={"step": i}))
                for i, text in enumerate(texts)]
        again = await log.publish_envelope(sent[0])  # a retry after a lost ack: stored once
        ctx.say("recorder", f"stored {len(sent)} records in {stream_name('bus')}; the retry of the first was "
                            f"{'dropped as a duplicate' if again.duplicate else 'stored again'}")
    async with ctx.bus("auditor") as auditor:
        read = 0
        async for stored in JetStream(auditor).event_log().replay(Record.pattern(), start_seq=1):
            assert isinstance(stored.event, Record)
            read += 1
            ctx.say("auditor", f"replayed seq {stored.seq}: {stored.event.text!r}")
    ctx.tally["records replayed"] += read
    if read != len(sent) or not again.duplicate:
        raise FedbusError(f"replayed {read} records of {len(sent)} (duplicate retry: {again.duplicate})")


async def edge_device(ctx: DemoContext) -> None:
    """A phone on MQTT and an agent on NATS meet on the same events through the broker's MQTT listener."""
    if ctx.mqtt_url is None:
        ctx.say("edge", "skipped: the broker has no MQTT listener", style="yellow")
        return
    try:
        phone_transport = transport_for(ctx.mqtt_url, client_id="phone-1")
    except ConfigError:
        ctx.say("edge", "skipped: the MQTT transport (fedbus.bus.mqtt_transport) is not available yet",
                style="yellow")
        return
    async with ctx.bus("monitor") as monitor, Bus(phone_transport, source="phone-1") as phone:
        async with await monitor.subscribe(Heartbeat, key="phone-1") as beats, \
                await phone.subscribe(Ping, key="phone-1") as pings:
            await phone.publish(Heartbeat(agent_id="phone-1", seq=1, role="edge"))
            d = await beats.next()
            ctx.say("monitor", f"heartbeat from {d.event.agent_id} over MQTT, seen on NATS {d.subject}")
            await monitor.publish(Ping(agent_id="phone-1", text="sync please"))
            p = await pings.next()
            ctx.say("phone-1", f"ping {p.event.text!r} from {p.source} over NATS, seen on MQTT")
        ctx.tally["edge events"] += 2


STAGES: list[tuple[str, Stage]] = [
    ("Heartbeats over NATS", heartbeats),
    ("Request / reply", request_reply),
    ("Signed events, forged and replayed ones", signed_events),
    ("Durable events on JetStream", durable_events),
    ("An edge device over MQTT", edge_device),
]


def all_stages() -> list[tuple[str, Stage, float | None]]:
    """The bus's own stages, then those other packages register under the ``fedbus.demo`` entry point group
    (each a list of ``(title, stage)`` or ``(title, stage, timeout_s)``), in the order of their names."""
    stages: list[tuple[str, Stage, float | None]] = [(title, stage, None) for title, stage in STAGES]
    for ep in sorted(entry_points(group="fedbus.demo"), key=lambda e: e.name):
        for entry in ep.load():
            title, stage, *rest = entry
            stages.append((title, stage, rest[0] if rest else None))
    return stages


async def run(ctx: DemoContext, stages: Sequence[tuple[str, Stage, float | None]] | None = None) -> None:
    """Run ``stages`` (default: :func:`all_stages`) in order, each under its timeout or the context's."""
    for title, stage, timeout in all_stages() if stages is None else stages:
        ctx.console.rule(f"[bold]{title}", align="left")
        async with asyncio.timeout(timeout or ctx.stage_timeout):
            await stage(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the broker on free ports, run every stage, print a summary; 0 when all went as expected."""
    configure_logging("error")
    console = Console(highlight=False, soft_wrap=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedbus-demo-") as tmp, \
            NatsServer(data_dir=Path(tmp) / "nats") as server:
        console.print(f"[bold]fedbus demo[/]: embedded nats-server (JetStream + MQTT) on free ports\n"
                      f"  NATS {server.url}   MQTT {server.mqtt_url}   data {server.data_dir}")
        ctx = DemoContext(url=server.url, mqtt_url=server.mqtt_url, console=console, data_dir=Path(tmp))
        try:
            asyncio.run(run(ctx))
        except (FedbusError, TimeoutError, ExceptionGroup) as exc:
            console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
            return 1
    summary = ", ".join(f"{what}: {n}" for what, n in ctx.tally.items())
    console.rule()
    console.print(f"[bold green]demo finished[/] in {time.monotonic() - started:.1f}s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
