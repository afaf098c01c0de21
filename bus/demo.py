"""``make demo``: the secure broker `fedbus up` starts, a few agents in one process, typed events between them,
told as a log.

Run with ``python -m fedbus.bus.demo``. The broker is the secure default (an authority in a temp dir: TLS on
NATS and MQTT, only issued credentials, each limited to its role's subjects), and every component logs in with
a credential issued for its role (:meth:`DemoContext.creds`). Each stage is an async function taking the
shared :class:`DemoContext`; :data:`STAGES` lists the bus's, other packages add theirs under the
``fedbus.demo`` entry point group (launching a job, running a federation).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from .catalogue import Heartbeat, Notice, Ping, Pong, Record
from .client import Bus, Security
from .connect import connect
from .console import configure_logging
from .creds import IDENTITIES_BUCKET, Credentials, fetch_identity
from .demo_broker import DemoBroker
from .errors import ConnectError, FedbusError
from .jetstream import JetStream
from .nats_transport import NatsTransport
from .roles import Role
from .signing import KeyRing
from .stores import open_stores, stream_name

if TYPE_CHECKING:
    from fedbus.edge_sdk import EdgeClient

__all__ = ["STAGES", "DemoContext", "Stage", "all_stages", "main", "run"]


@dataclass
class DemoContext:
    """What every stage gets: where the broker is, its authority, where to write, and a running tally."""

    url: str
    mqtt_url: str | None
    console: Console
    data_dir: Path
    broker: DemoBroker
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

    @property
    def admin(self) -> Credentials:
        """The admin credential: the CLI's, through the context ``fedbus up`` saves."""
        return self.broker.admin

    async def creds(self, *wanted: tuple[Role | str, str]) -> list[Credentials]:
        """A credential per ``(role, id)``, issued by the demo's authority the first time it is asked for."""
        fresh = [f"{ident} ({Role(role)})" for role, ident in wanted if ident not in self.broker.issued]
        issued = await self.broker.issue(*wanted)
        if fresh:
            self.tally["credentials issued"] += len(fresh)
            self.say("authority", f"issued {', '.join(fresh)}", style="dim")
        return issued

    def bus(self, creds: Credentials, *, source: str | None = None, keyring: KeyRing | None = None,
            security: Security = Security.VERIFY) -> Bus:
        """A new bus logged in as ``creds`` (known as ``source``, default its id), signing with its key;
        ``async with`` it."""
        return connect(self.url, source=source or creds.id, creds=creds, keyring=keyring, security=security)


Stage = Callable[[DemoContext], Awaitable[None]]


async def heartbeats(ctx: DemoContext) -> None:
    """Two GPU agents announce themselves; a monitor (an observer credential) sees every heartbeat."""
    gpu1_creds, gpu2_creds, monitor_creds = await ctx.creds(("gpu-agent", "gpu-1"), ("gpu-agent", "gpu-2"),
                                                            ("observer", "monitor"))
    async with ctx.bus(monitor_creds) as monitor, ctx.bus(gpu1_creds) as gpu1, ctx.bus(gpu2_creds) as gpu2:
        beats = await monitor.subscribe(Heartbeat)
        for seq in (1, 2):
            for bus in (gpu1, gpu2):  # each may publish only under its own id: fedbus.bus.heartbeat.<id>
                await bus.publish(Heartbeat(agent_id=bus.source, seq=seq, role="gpu", labels={"gpus": 2}))
        for _ in range(4):
            d = await beats.next()
            ctx.tally["heartbeats seen"] += 1
            ctx.say("monitor", f"heartbeat #{d.event.seq} from {d.event.agent_id} on {d.subject}")


async def request_reply(ctx: DemoContext) -> None:
    """The admin pings an agent; the agent answers with a pong carrying the same trace id."""
    gpu1_creds, = await ctx.creds(("gpu-agent", "gpu-1"))
    async with ctx.bus(ctx.admin) as admin, ctx.bus(gpu1_creds) as gpu1:
        pings = await gpu1.subscribe(Ping, key="gpu-1")  # its own pings only; pings come from admin alone

        async def answer() -> None:
            async with pings:
                d = await pings.next()
                ctx.say("gpu-1", f"got ping {d.event.text!r}, answering")
                await gpu1.respond(d, Pong(agent_id="gpu-1", text="pong"))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(answer())
            t0 = time.perf_counter()
            reply = await admin.request(Ping(agent_id="gpu-1", text="are you there?"), timeout=5.0)
            rtt_us = (time.perf_counter() - t0) * 1e6
        ctx.tally["round trips"] += 1
        ctx.say("admin", f"{reply.envelope.type} from {reply.source} in {rtt_us:.0f} µs "
                         f"(trace {reply.envelope.trace})")


async def signed_events(ctx: DemoContext) -> None:
    """A signed notice is accepted; a forged copy, a replay and one signed by an untrusted key are dropped.

    Mallory is an insider: a scheduler credential of its own. The broker lets it publish notices only under
    its own id, so it sends its forgeries there; the worker still drops every one of them by signature."""
    scheduler_creds, mallory_creds, worker_creds = await ctx.creds(
        ("scheduler", "scheduler"), ("scheduler", "mallory"), ("gpu-agent", "worker"))
    trusted = KeyRing()
    trusted.trust(scheduler_creds.signing_key.public_raw)  # the worker trusts exactly the scheduler's key
    async with (
        ctx.bus(worker_creds, keyring=trusted, security=Security.STRICT) as worker,
        ctx.bus(scheduler_creds) as scheduler,
        ctx.bus(mallory_creds) as mallory,
    ):
        mallory_subject = Notice(agent_id="mallory", text="").subject()
        async with await worker.subscribe(Notice) as notices:
            genuine = await scheduler.publish(Notice(agent_id="scheduler", text="job j-1 goes to gpu-1"))
            ctx.say("scheduler", f"signed notice {genuine.id} (key {scheduler_creds.signing_key.kid})")
            d = await notices.next()
            ctx.say("worker", f"accepted: {d.event.text!r} signed by {d.envelope.kid}", style="green")

            forged = mallory.codec.unpack(scheduler.codec.pack(genuine))
            forged.data = mallory.codec.envelope(Notice(agent_id="scheduler", text="job j-1 goes to mallory"),
                                                 source="scheduler").data
            await mallory.publish_envelope(mallory_subject, forged)
            ctx.say("mallory", "sent the notice with its text altered", style="red")
            await mallory.publish_envelope(mallory_subject, genuine)
            ctx.say("mallory", "replayed the genuine notice", style="red")
            await mallory.publish(Notice(agent_id="mallory", text="trust me"))
            ctx.say("mallory", "sent a notice signed by its own key, which the worker does not trust", style="red")
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
    left. Records are the operator's: only admin may write and read them."""
    texts = ("dataset registered", "model v1 stored", "run r-1 finished")
    async with ctx.bus(ctx.admin, source="recorder") as recorder:
        log = JetStream(recorder).event_log()
        sent = [await log.publish(Record(topic="demo", text=text, fields={"step": i}))
                for i, text in enumerate(texts)]
        again = await log.publish_envelope(sent[0])  # a retry after a lost ack: stored once
        ctx.say("recorder", f"stored {len(sent)} records in {stream_name('bus')}; the retry of the first was "
                            f"{'dropped as a duplicate' if again.duplicate else 'stored again'}")
    async with ctx.bus(ctx.admin, source="auditor") as auditor:
        read = 0
        async for stored in JetStream(auditor).event_log().replay(Record.pattern(), start_seq=1):
            assert isinstance(stored.event, Record)
            read += 1
            ctx.say("auditor", f"replayed seq {stored.seq}: {stored.event.text!r}")
    ctx.tally["records replayed"] += read
    if read != len(sent) or not again.duplicate:
        raise FedbusError(f"replayed {read} records of {len(sent)} (duplicate retry: {again.duplicate})")


def _edge_client(ctx: DemoContext, creds: Credentials) -> EdgeClient:
    """The phone's SDK client, logged in over MQTT with TLS as its creds file says."""
    from fedbus.edge_sdk import EdgeClient

    path = creds.dump(ctx.data_dir / f"{creds.id}.creds")  # what the phone would carry
    return EdgeClient.from_creds(path, clean_session=True, initial_attempts=1)


async def edge_device(ctx: DemoContext) -> None:
    """A phone on MQTT (the edge SDK, its device credential) and the admin on NATS meet on the same events."""
    if ctx.mqtt_url is None:
        ctx.say("edge", "skipped: the broker has no MQTT listener", style="yellow")
        return
    phone_creds, = await ctx.creds(("device", "phone-1"))
    keyring = KeyRing()
    async with ctx.bus(ctx.admin, keyring=keyring) as admin:
        # The phone signs what it sends; its key is the one the authority registered for phone-1.
        identity = await fetch_identity(await (await open_stores(admin)).key_value(IDENTITIES_BUCKET), "phone-1")
        if identity is None:
            raise FedbusError("phone-1 is not in the identities registry")
        keyring.trust(identity.public_key)
        async with _edge_client(ctx, phone_creds) as phone, \
                await admin.subscribe(Heartbeat, key="phone-1") as beats, \
                phone.subscribe("bus.ping", key="phone-1") as pings:
            await admin.transport.flush()
            await phone.publish("bus.heartbeat", {"agent_id": "phone-1", "seq": 1, "role": "edge"},
                                key="phone-1")
            d = await beats.next()
            ctx.say("admin", f"heartbeat from {d.event.agent_id} over MQTT (TLS, signed by {d.envelope.kid}), "
                             f"seen on NATS {d.subject}")
            await admin.publish(Ping(agent_id="phone-1", text="sync please"))
            p = await pings.next(5.0)
            ctx.say("phone-1", f"ping {p.data['text']!r} from {p.envelope['src']} over NATS, seen on MQTT")
        ctx.tally["edge events"] += 2


async def refused(ctx: DemoContext) -> None:
    """Nobody gets in without a credential, and a device's credential cannot launch anything."""
    tls = ssl.create_default_context(cadata=ctx.admin.ca_pem)  # it trusts the broker: only the login is missing
    stranger = NatsTransport(ctx.url, client_name="stranger", tls=tls, initial_attempts=1)
    try:
        await stranger.connect()
    except ConnectError as exc:
        if "authorization violation" not in str(exc):
            raise
        ctx.tally["refused"] += 1
        ctx.say("stranger", "connected without a credential: refused (authorization violation)", style="yellow")
    else:
        await stranger.close()
        raise FedbusError("the broker let a client in without a credential")
    if ctx.mqtt_url is None:
        return
    phone_creds, = await ctx.creds(("device", "phone-1"))
    marker = "fedbus.demo.submit.evil-1"  # in no stream: the marker is stored nowhere
    async with ctx.bus(ctx.admin) as admin:
        # One admin subscription covers both the subject the phone's submit would take and a marker the admin
        # sends once the broker has acknowledged the phone's publish: anything of the phone's comes first.
        watch = await admin.transport.subscribe("fedbus.*.submit.evil-1")
        try:
            await admin.transport.flush()
            async with _edge_client(ctx, phone_creds) as phone:
                await phone.publish("jobs.submit", {"job_id": "evil-1", "jobspec": {"name": "evil", "job": "id"}},
                                    key="evil-1")
            ctx.say("phone-1", "published jobs.submit (a job that runs `id`) on fedbus/jobs/submit/evil-1",
                    style="red")
            await admin.transport.publish(marker, b"marker")
            arrived = 0
            while (await watch.next(5.0)).subject != marker:
                arrived += 1
        finally:
            await watch.unsubscribe()
    if arrived:
        raise FedbusError("a device's jobs.submit reached the NATS side")
    ctx.tally["refused"] += 1
    ctx.say("broker", "dropped it: only admin may publish jobs.submit; nothing reached the scheduler's subject",
            style="yellow")


STAGES: list[tuple[str, Stage]] = [
    ("Heartbeats over NATS", heartbeats),
    ("Request / reply", request_reply),
    ("Signed events, forged and replayed ones", signed_events),
    ("Durable events on JetStream", durable_events),
    ("An edge device over MQTT", edge_device),
    ("Refused: no credential, and a device that tries to launch a job", refused),
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
    """Start the secure broker on free ports, run every stage, print a summary; 0 when all went as expected."""
    configure_logging("error")
    console = Console(highlight=False, soft_wrap=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedbus-demo-") as tmp:
        try:
            with DemoBroker(Path(tmp) / "broker") as broker:
                console.print(
                    f"[bold]fedbus demo[/]: the broker `fedbus up` starts (JetStream + MQTT, TLS, only issued "
                    f"credentials, each with its role's permissions) on free ports\n"
                    f"  NATS {broker.url}   MQTT {broker.mqtt_url}   authority {broker.authority.dir}")
                ctx = DemoContext(url=broker.url, mqtt_url=broker.mqtt_url, console=console, data_dir=Path(tmp),
                                  broker=broker)
                asyncio.run(_provision_and_run(ctx))
        except (FedbusError, TimeoutError, ExceptionGroup) as exc:
            console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
            return 1
    summary = ", ".join(f"{what}: {n}" for what, n in ctx.tally.items())
    console.rule()
    console.print(f"[bold green]demo finished[/] in {time.monotonic() - started:.1f}s: {summary}")
    return 0


async def _provision_and_run(ctx: DemoContext) -> None:
    await ctx.broker.provision()  # every stream and bucket, with its limits: only admin may create them
    await run(ctx)


if __name__ == "__main__":
    sys.exit(main())
