"""The bus's ``fedbus`` commands: the embedded broker (``up``) and the inspector (``tail``, ``publish``,
``stats``, ``streams``, ``replay``, ``events``). Registered through the ``fedbus.cli`` entry point as
:data:`COMMANDS`; see ``docs/cli.md``.

Commands only parse options and render; the work is done by :mod:`~fedbus.bus.inspector`,
:mod:`~fedbus.bus.jetstream`, :mod:`~fedbus.bus.catalogue_cli` and :mod:`~fedbus.bus.broker`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import msgpack
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import subjects
from .catalogue_cli import describe, event_for, load_events
from .cli import server_option
from .client import Security
from .codec import Codec, Envelope, new_id
from .connect import connect, transport_for
from .console import EXIT_FAILURE, configure_logging, err, fail, out, run_async
from .creds_cli import context_cmd, creds_group
from .errors import ConfigError, FedbusError
from .inspector import Snapshot, replay, stats, tail
from .render import format_time, frame_record, human_line, json_line
from .signing import AgentKey
from .stores import StreamStats
from .up_cli import up

__all__ = ["COMMANDS"]

_DEFAULT_PATTERN = "fedbus.>"


def _pattern(value: str) -> str:
    """A NATS pattern; MQTT-style filters (``fedbus/jobs/#``) are accepted and converted."""
    return subjects.from_mqtt(value) if "/" in value else subjects.validate_pattern(value)


def _client_id(name: str) -> str:
    """A client id of this process alone: two inspectors on one MQTT broker must not take each other's
    session."""
    return f"{name}-{os.urandom(3).hex()}"


def _emitter(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(record: dict[str, Any]) -> None:
        if as_json:
            click.echo(json_line(record))
        else:
            out.print(human_line(record))
    return emit


@click.command("tail")
@click.argument("pattern", default=_DEFAULT_PATTERN)
@server_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N frames.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Exit after S seconds (status 1 if --count frames were not seen by then).")
def tail_cmd(pattern: str, server: str, as_json: bool, count: int | None, timeout: float | None) -> None:
    """Decode every event on PATTERN live (default fedbus.>); undecodable frames are shown as such."""
    configure_logging()
    pattern = _catch(lambda: _pattern(pattern))
    load_events()

    async def main() -> int:
        async with transport_for(server, client_id=_client_id("fedbus-tail"), persistent=False) as transport:
            return await tail(
                transport, pattern, emit=_emitter(as_json), count=count, timeout=timeout,
                on_ready=lambda: err.print(f"tail: listening on {pattern} at {transport.url}"),
            )

    shown = run_async(main)
    if count is not None and shown < count:
        why = f"timed out after {timeout:g}s" if timeout is not None else "the subscription ended"
        fail(f"{why} with {shown} of {count} frames", EXIT_FAILURE)


def _catch(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except FedbusError as exc:
        fail(exc)


# -- fedbus publish -------------------------------------------------------------------------------------
def _raw_envelope(event_type: str, data_text: str, *, source: str, trace: str | None) -> Envelope:
    domain, _, name = event_type.partition(".")
    subjects.validate_token(domain, what="event type domain")
    subjects.validate_token(name, what="event type name")
    try:
        payload = json.loads(data_text)
    except ValueError as exc:
        raise ConfigError(f"--data is not valid JSON: {exc}", key="data") from None
    return Envelope(id=new_id(), type=event_type, v=1, src=source, time=time.time_ns(),
                    data=msgpack.packb(payload, use_bin_type=True), trace=trace)


@click.command("publish")
@click.argument("target", metavar="SUBJECT_OR_TYPE")
@server_option
@click.option("--data", default="{}", show_default=True, help="The event's fields as a JSON object.")
@click.option("--type", "event_type", default=None,
              help="Publish on the subject SUBJECT_OR_TYPE with this event type (raw JSON if unknown).")
@click.option("--key", default=None, help="Value of the event's key field (the subject's last token).")
@click.option("--source", default="fedbus-cli", show_default=True, help="Agent id to publish as.")
@click.option("--trace", default=None, help="Correlation / trace id.")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Ed25519 private key (PEM) to sign with.")
def publish_cmd(target: str, server: str, data: str, event_type: str | None, key: str | None, source: str,
                trace: str | None, sign_key: Path | None) -> None:
    """Publish one event by type name (e.g. bus.heartbeat) or on a subject, validated; prints its id."""
    configure_logging()
    load_events()
    event, subject = _catch(lambda: event_for(target, event_type, data, key=key))
    raw = None if event is not None else _catch(lambda: _raw_envelope(
        event_type or "", data, source=source, trace=trace))
    agent_key = _catch(lambda: AgentKey.load_or_create(sign_key)) if sign_key else None

    async def main() -> str:
        async with connect(server, source=source, key=agent_key, client_id=_client_id(source),
                           persistent=False) as bus:
            if event is not None:
                env = bus.envelope(event, trace=trace)
                if agent_key is not None and env.sig is None:
                    agent_key.sign(env)
            else:
                assert raw is not None
                env = raw
                if agent_key is not None:
                    agent_key.sign(env)
            if not any(c.spec.durable and subjects.matches(c.pattern(), subject) for c in bus.codec.catalogue):
                await bus.publish_envelope(subject, env)
                await bus.transport.flush()
                return env.id
            # A durable subject: stored through its stream (ensured first) and acknowledged, or an error.
            if bus.transport.name != "nats":
                raise ConfigError(f"{subject} is stored durably: publish it over NATS (a nats:// --server), "
                                  "which confirms that it was stored", key="server")
            from .stores import open_stores

            ack = await (await open_stores(bus)).event_log().publish_envelope(env, subject=subject)
            err.print(f"stored in {ack.stream} at seq {ack.seq}" + (" (a duplicate)" if ack.duplicate else ""))
            return env.id

    click.echo(run_async(main))


# -- fedbus stats ---------------------------------------------------------------------------------------
def _si(value: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:.1f} {prefix}{unit}" if prefix or value % 1 else f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.1f} T{unit}"


def _stats_table(snap: Snapshot, pattern: str, top: int) -> Table:
    table = Table(title=f"{pattern}  {snap.msgs / snap.interval_s:.1f} msg/s, "
                  f"{_si(snap.bytes / snap.interval_s, 'B/s')}", title_justify="left")
    table.add_column("subject", style="cyan")
    for name in ("msg/s", "bytes/s", "msgs", "total"):
        table.add_column(name, justify="right")
    for rate in snap.subjects[:top]:
        table.add_row(rate.subject, f"{rate.msg_per_s:.1f}", _si(rate.bytes_per_s, "B/s"), str(rate.msgs),
                      str(rate.total_msgs))
    if snap.dropped:
        table.caption = f"{snap.dropped} frames dropped (this inspector was too slow)"
    return table


@click.command("stats")
@click.argument("pattern", default=_DEFAULT_PATTERN)
@server_option
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds per snapshot.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N snapshots.")
@click.option("--top", type=click.IntRange(min=1), default=30, show_default=True, help="Rows in the table.")
@click.option("--json", "as_json", is_flag=True, help="One JSON snapshot per line.")
def stats_cmd(pattern: str, server: str, interval: float, count: int | None, top: int, as_json: bool) -> None:
    """Live message and byte rates per subject."""
    configure_logging()
    pattern = _catch(lambda: _pattern(pattern))

    async def main() -> None:
        async with transport_for(server, client_id=_client_id("fedbus-stats"), persistent=False) as transport:
            ready = lambda: err.print(f"stats: listening on {pattern} at {transport.url}")
            if as_json:
                await stats(transport, pattern, interval=interval, count=count, on_ready=ready,
                            emit=lambda snap: click.echo(json.dumps(snap.to_dict())))
                return
            if not out.is_terminal:  # a log, not a screen: one table per snapshot
                await stats(transport, pattern, interval=interval, count=count, on_ready=ready,
                            emit=lambda snap: out.print(_stats_table(snap, pattern, top)))
                return
            with Live(console=out, auto_refresh=False, transient=False) as live:
                await stats(transport, pattern, interval=interval, count=count, on_ready=ready,
                            emit=lambda snap: live.update(_stats_table(snap, pattern, top), refresh=True))

    run_async(main)


# -- fedbus streams -------------------------------------------------------------------------------------
@click.command("streams")
@server_option
@click.option("--json", "as_json", is_flag=True, help="A JSON array of streams with their consumers.")
def streams_cmd(server: str, as_json: bool) -> None:
    """List JetStream streams and their consumers (messages, bytes, pending)."""
    configure_logging()

    async def main() -> list[StreamStats]:
        from .jetstream import JetStream

        async with connect(server, source=_client_id("fedbus-streams"), security=Security.OFF) as bus:
            return await JetStream(bus).streams()

    views = run_async(main)
    if as_json:
        click.echo(json.dumps([asdict(v) for v in views]))
        return
    if not views:
        out.print("no streams")
        return
    table = Table("stream", "subjects", "messages", "bytes", "seq", "consumers", title="JetStream streams",
                  title_justify="left")
    for v in views:
        consumers = "\n".join(
            f"{c.name}: pending {c.pending}, ack pending "
            f"{c.ack_pending}, redelivered {c.redelivered}" for c in v.consumers) or "-"
        table.add_row(v.name, " ".join(v.subjects), str(v.messages), _si(v.bytes, "B"),
                      f"{v.first_seq}…{v.last_seq}", consumers)
    out.print(table)


# -- fedbus replay --------------------------------------------------------------------------------------
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """A start time: ISO-8601 (naive means local time) or relative to now, like ``90s``, ``10m``, ``2h``."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.fullmatch(value.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(f"not a time: {value!r} (ISO-8601, or relative like 30s, 10m, 2h, 1d)",
                          key="since") from None
    return parsed if parsed.tzinfo else parsed.astimezone()


@click.command("replay")
@click.argument("target", metavar="STREAM_OR_PATTERN")
@server_option
@click.option("--since", default=None, help="Start time: ISO-8601 or relative (10m, 2h, 1d).")
@click.option("--seq", type=click.IntRange(min=1), default=None, help="Start at this stream sequence.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="At most N events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (with seq and stored).")
def replay_cmd(target: str, server: str, since: str | None, seq: int | None, count: int | None,
               as_json: bool) -> None:
    """Re-read a durable stream (by name, or the stream holding a subject pattern) from a time or sequence."""
    configure_logging()
    if since is not None and seq is not None:
        fail(ConfigError("use --since or --seq, not both", key="since"))
    start = _catch(lambda: parse_since(since)) if since is not None else None
    start_time_ns = None if start is None else int(start.timestamp() * 1e9)
    load_events()
    codec = Codec()
    emit = _emitter(as_json)

    async def main() -> int:
        shown = 0
        async with connect(server, source=_client_id("fedbus-replay"), security=Security.OFF) as bus:
            events = replay(bus, target, start_seq=seq, start_time_ns=start_time_ns)
            async with contextlib.aclosing(events):
                async for stored in events:
                    record = frame_record(stored.subject, stored.data, codec)
                    record["seq"] = stored.seq
                    record["stored"] = format_time(stored.time_ns)
                    emit(record)
                    shown += 1
                    if count is not None and shown >= count:
                        break
        return shown

    shown = run_async(main)
    err.print(f"replay: {shown} event{'s' if shown != 1 else ''}")


# -- fedbus events --------------------------------------------------------------------------------------
@click.command("events")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="The catalogue as a JSON array.")
def events_cmd(prefix: str, as_json: bool) -> None:
    """The event catalogue: type, version, subject, key, durable, signed and fields of every event type."""
    configure_logging()
    infos = [describe(cls) for cls in load_events() if cls.spec.type.startswith(prefix)]
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos]))
        return
    for info in infos:
        head = Text()
        head.append(info.type, style="bold magenta")
        head.append(f" v{info.version}  ")
        subject = info.pattern if info.key is None else f"{info.pattern[:-1]}<{info.key}>"
        head.append(subject, style="cyan")
        for flag, on in (("durable", info.durable), ("signed", info.signed)):
            if on:
                head.append(f"  {flag}", style="yellow")
        out.print(head)
        if info.doc:
            out.print(Text(f"    {info.doc}", style="dim"))
        for f in info.fields:
            line = Text(f"    {f.name}", style="bold")
            line.append(f": {f.type}")
            if not f.required:
                line.append(f" = {f.default}", style="dim")
            out.print(line)
    err.print(f"{len(infos)} event type{'s' if len(infos) != 1 else ''}")


COMMANDS: list[click.Command] = [up, context_cmd, creds_group, tail_cmd, publish_cmd, stats_cmd, streams_cmd, replay_cmd, events_cmd]
"""The commands this package adds to ``fedbus`` (the ``fedbus.cli`` entry point)."""

from .deadletter_cli import dead_letters_cmd  # listed last, beside the list it joins

COMMANDS.append(dead_letters_cmd)
