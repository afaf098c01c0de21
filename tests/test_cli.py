"""The bus's ``fedbus`` commands as real subprocesses against real nats-servers, and ``make demo``'s module.

Every wait is on an event: a ready line on stderr, a JSON line on stdout, or a process exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
import pytest

from fedbus.bus import connect, publish_sync
from fedbus.bus.broker import NatsServer
from fedbus.bus.catalogue import Heartbeat, Notice, Record
from fedbus.bus.catalogue_cli import event_for, load_events
from fedbus.bus.client import Security
from fedbus.bus.codec import Codec, Limits
from fedbus.bus.commands import parse_since
from fedbus.bus.creds import Credentials
from fedbus.bus.errors import ConfigError, SchemaError, SubjectError, UnknownEventType
from fedbus.bus.jetstream import JetStream
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.render import frame_record
from fedbus.bus.signing import AgentKey, KeyRing

FEDBUS = str(Path(sys.executable).parent / "fedbus")
WAIT = 30.0  # generous upper bounds for a loaded 2-core machine; no test waits this long when things work


def _env(server: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDBUS_SERVER"}
    if server is not None:
        env["FEDBUS_SERVER"] = server
    return env


async def run(*args: str, server: str | None = None, module: bool = False) -> tuple[int, str, str]:
    """Run a command to completion: (exit code, stdout, stderr)."""
    argv = [sys.executable, "-m", "fedbus.bus.cli", *args] if module else [FEDBUS, *args]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=_env(server))
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def started(*args: str, server: str | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    """A long-running command; killed on the way out if it has not exited by itself."""
    proc = await asyncio.create_subprocess_exec(FEDBUS, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=_env(server))
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def line_containing(stream: asyncio.StreamReader | None, needle: str) -> str:
    """The first line of ``stream`` that contains ``needle``."""
    assert stream is not None

    async def scan() -> str:
        while line := (await stream.readline()).decode():
            if needle in line:
                return line
        raise AssertionError(f"stream ended without a line containing {needle!r}")

    return await asyncio.wait_for(scan(), WAIT)


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port some other program is listening on, as 4222/1883 are on a developer's machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- fedbus up --------------------------------------------------------------------------------------------
async def test_up_picks_free_ports_when_taken_says_so_and_stops_cleanly(tmp_path: Path) -> None:
    with occupied_port() as nats_port, occupied_port() as mqtt_port:
        async with started("up", "--json", "--nats-port", str(nats_port), "--mqtt-port", str(mqtt_port),
                           "--data-dir", str(tmp_path / "data")) as up:
            info = json.loads(await line_containing(up.stdout, '"nats"'))
            assert info["nats"] != f"nats://127.0.0.1:{nats_port}"
            assert info["mqtt"].startswith("mqtts://127.0.0.1:") and not info["mqtt"].endswith(f":{mqtt_port}")
            assert f"NATS port {nats_port} is in use; using " in " ".join(info["notes"])
            assert f"MQTT port {mqtt_port} is in use; using " in " ".join(info["notes"])
            assert info["nats"].startswith("tls://") and Path(info["creds"]).is_file()
            await line_containing(up.stderr, f"NATS port {nats_port} is in use")  # said to the human too
            (node,) = info["nodes"]

            creds = Credentials.load(Path(info["creds"]))
            async with connect(info["nats"], source="probe", creds=creds) as bus:  # a real, working broker
                beats = await bus.subscribe(Heartbeat)
                await bus.publish(Heartbeat(agent_id="probe"))
                assert (await beats.next(5)).event.agent_id == "probe"

            up.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(up.wait(), WAIT) == 0
        assert _gone(node["pid"])
        assert (tmp_path / "data" / "jetstream").is_dir()


async def test_up_cluster_starts_three_routed_nodes(tmp_path: Path) -> None:
    async with started("up", "--json", "--insecure", "--cluster", "3", "--nats-port", "0", "--no-mqtt",
                       "--data-dir", str(tmp_path)) as up:
        info = json.loads(await line_containing(up.stdout, '"nats"'))
        assert len(info["nodes"]) == 3 and info["mqtt"] is None
        assert info["nats"] == ",".join(n["nats"] for n in info["nodes"])
        # A client on node 0 reaches a subscriber on node 2 through the cluster's routes.
        async with connect(info["nodes"][2]["nats"], source="n2") as far, \
                connect(info["nodes"][0]["nats"], source="n0") as near:
            beats = await far.subscribe(Heartbeat)
            # Interest crosses the routes a moment after subscribing (core NATS is at-most-once until then):
            # publish until one arrives.
            first = asyncio.ensure_future(beats.next(WAIT))
            while not first.done():
                await near.publish(Heartbeat(agent_id="n0"))
                await asyncio.wait([first], timeout=0.05)
            assert first.result().source == "n0"
        up.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(up.wait(), WAIT) == 0
    assert all(_gone(n["pid"]) for n in info["nodes"])


# -- tail and publish -------------------------------------------------------------------------------------
async def test_tail_shows_events_from_the_cli_the_api_and_undecodable_frames(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with started("tail", "fedbus.tailtest.>", "--json", "--count", "4", "--timeout", str(WAIT),
                       server=url) as tail, started("tail", "fedbus.tailtest.>", "--count", "1",
                                                    "--timeout", str(WAIT), server=url) as human:
        await line_containing(tail.stderr, "listening on fedbus.tailtest.>")
        await line_containing(human.stderr, "listening on fedbus.tailtest.>")

        # 1. the CLI, by subject with a --type that is not in the catalogue: raw JSON, schema-less on display
        code, out, err = await run("publish", "fedbus.tailtest.raw", "--type", "tailtest.raw",
                                   "--data", '{"n": 1, "tags": ["a"]}', server=url)
        assert code == 0, err
        raw_id = out.strip()
        # 2. the CLI, a known type on a subject of its own (--type keeps the validation)
        code, out, err = await run("publish", "fedbus.tailtest.typed", "--type", "bus.heartbeat",
                                   "--data", '{"agent_id": "cli", "seq": 2}', "--source", "cli-1", server=url)
        assert code == 0, err
        typed_id = out.strip()
        # 3. the Python API
        async with connect(url, source="script") as bus:
            env = bus.envelope(Heartbeat(agent_id="script", seq=3), trace="t-42")
            await bus.publish_envelope("fedbus.tailtest.api", env)
        # 4. bytes that are no fedbus envelope
        async with NatsTransport(url) as raw:
            await raw.publish("fedbus.tailtest.junk", b"\xc1\x00 not msgpack")
            await raw.flush()

        assert await asyncio.wait_for(tail.wait(), WAIT) == 0
        assert tail.stdout is not None
        records = [json.loads(line) for line in (await tail.stdout.read()).decode().splitlines()]
        assert len(records) == 4, records
        by_subject = {r["subject"]: r for r in records}

        raw_rec = by_subject["fedbus.tailtest.raw"]
        assert raw_rec["id"] == raw_id and raw_rec["type"] == "tailtest.raw" and raw_rec["known"] is False
        assert raw_rec["data"] == {"n": 1, "tags": ["a"]} and raw_rec["source"] == "fedbus-cli"

        typed = by_subject["fedbus.tailtest.typed"]
        assert typed["id"] == typed_id and typed["source"] == "cli-1" and "known" not in typed
        assert typed["data"] == {"agent_id": "cli", "seq": 2, "role": "agent", "labels": {}}

        api = by_subject["fedbus.tailtest.api"]
        assert api["id"] == env.id and api["trace"] == "t-42" and api["signed"] is False
        assert abs(datetime.fromisoformat(api["time"]).timestamp() - env.time / 1e9) < 1e-5

        junk = by_subject["fedbus.tailtest.junk"]
        assert junk["bytes"] == len(b"\xc1\x00 not msgpack") and "MalformedFrame" in junk["error"]
        assert set(junk) == {"subject", "error", "bytes"}

        assert await asyncio.wait_for(human.wait(), WAIT) == 0
        assert human.stdout is not None
        line = (await human.stdout.read()).decode()
        assert "tailtest.raw" in line and "fedbus-cli" in line and "(unknown type)" in line


async def test_tail_shows_an_event_from_the_publish_sync_one_liner(nats_server: NatsServer) -> None:
    async with started("tail", Record.pattern("oneliner"), "--json", "--count", "1", "--timeout", str(WAIT),
                       server=nats_server.url) as tail:
        await line_containing(tail.stderr, "listening")
        env = await asyncio.to_thread(publish_sync, nats_server.url, Record(topic="oneliner", text="hi"))
        record = json.loads(await line_containing(tail.stdout, env.id))
        assert record["type"] == "bus.record" and record["data"]["text"] == "hi"
        assert await asyncio.wait_for(tail.wait(), WAIT) == 0


async def test_tail_and_publish_work_over_mqtt_too(nats_server: NatsServer) -> None:
    mqtt = nats_server.mqtt_url
    assert mqtt is not None
    async with started("tail", "fedbus/mqtttest/#", "--json", "--count", "2", "--timeout", str(WAIT),
                       server=mqtt) as tail:  # an MQTT-style filter is accepted too
        await line_containing(tail.stderr, "listening on fedbus.mqtttest.>")
        code, out, err = await run("publish", "fedbus.mqtttest.phone", "--type", "bus.heartbeat",
                                   "--data", '{"agent_id": "phone-1"}', server=mqtt)
        assert code == 0, err
        from_mqtt = out.strip()
        async with connect(nats_server.url, source="cloud") as bus:
            from_nats = bus.envelope(Heartbeat(agent_id="cloud"))
            await bus.publish_envelope("fedbus.mqtttest.cloud", from_nats)
        assert await asyncio.wait_for(tail.wait(), WAIT) == 0
        assert tail.stdout is not None
        records = [json.loads(line) for line in (await tail.stdout.read()).decode().splitlines()]
    assert {r["id"]: r["subject"] for r in records} == {
        from_mqtt: "fedbus.mqtttest.phone", from_nats.id: "fedbus.mqtttest.cloud"}


async def test_publish_validation_errors_exit_2_naming_the_field(nats_server: NatsServer) -> None:
    for args, needle in [
        (["bus.heartbeat", "--data", '{"agent_id": "a", "seq": "three"}'], "`$.seq`"),
        (["no.such", "--data", "{}"], "unknown event type 'no.such'"),
    ]:
        code, out, err = await run("publish", *args, server=nats_server.url)
        assert code == 2, (args, err)
        assert needle in err and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("target", "event_type", "data", "key", "error", "field"),
    [
        ("bus.heartbeat", None, '{"agent_id": "a", "seq": "three"}', None, SchemaError, "seq"),
        ("bus.heartbeat", None, '{"agent_id": "a", "sq": 1}', None, SchemaError, "sq"),
        ("bus.heartbeat", None, '{"seq": 1}', None, SchemaError, "agent_id"),
        ("bus.heartbeat", None, '{"agent_id": "a"}', "b", SchemaError, "agent_id"),
        ("fedbus.a b", "bus.heartbeat", "{}", None, SubjectError, None),
        ("fedbus.bus.heartbeat.a", None, "{}", "b", SchemaError, "agent_id"),
        ("bus.heartbeat", None, "{not json", None, ConfigError, None),
        ("bus.heartbeat", None, "[1, 2]", None, ConfigError, None),
        ("no.such", None, "{}", None, UnknownEventType, None),
        ("fedbus.nobody.here", None, "{}", None, ConfigError, None),
    ],
)
def test_publish_rejects_what_does_not_fit(target: str, event_type: str | None, data: str, key: str | None,
                                           error: type[Exception], field: str | None) -> None:
    load_events()
    with pytest.raises(error) as info:
        event_for(target, event_type, data, key=key)
    if field is not None:
        assert isinstance(info.value, SchemaError) and info.value.field == field


def test_publish_resolves_types_subjects_and_raw_json() -> None:
    load_events()
    assert event_for("bus.heartbeat", None, '{"seq": 2}', key="g") == (
        Heartbeat(agent_id="g", seq=2), "fedbus.bus.heartbeat.g")
    assert event_for("fedbus.bus.heartbeat.g", None, '{"seq": 2}') == (
        Heartbeat(agent_id="g", seq=2), "fedbus.bus.heartbeat.g")
    assert event_for("fedbus.lab.x", "bus.heartbeat", '{"agent_id": "g"}') == (
        Heartbeat(agent_id="g"), "fedbus.lab.x")
    raw = event_for("fedbus.lab.note", "lab.note", '{"anything": 1}', key="k1")
    assert raw == (None, "fedbus.lab.note.k1")


async def test_publish_fills_the_key_and_prints_the_id(nats_server: NatsServer) -> None:
    async with connect(nats_server.url, source="watcher") as watcher:
        beats = await watcher.subscribe(Heartbeat, key="k-7")
        code, out, err = await run("publish", "bus.heartbeat", "--key", "k-7", "--data", '{"seq": 9}',
                                   server=nats_server.url)
        assert code == 0, err
        got = await beats.next(WAIT)
        assert got.envelope.id == out.strip() and got.event == Heartbeat(agent_id="k-7", seq=9)


async def test_publish_signs_with_a_key_file(nats_server: NatsServer, tmp_path: Path) -> None:
    key = AgentKey.load_or_create(tmp_path / "ops.pem")
    trusted = KeyRing()
    trusted.trust(key.public_raw)
    async with connect(nats_server.url, source="strict", keyring=trusted, security=Security.STRICT) as strict:
        notices = await strict.subscribe(Notice, key="ops")
        code, out, err = await run("publish", "bus.notice", "--data", '{"agent_id": "ops", "text": "drain"}',
                                   "--source", "ops", "--sign-key", str(tmp_path / "ops.pem"),
                                   server=nats_server.url)
        assert code == 0, err
        got = await notices.next(WAIT)  # a strict bus drops unsigned or forged notices
        assert got.envelope.id == out.strip() and got.envelope.kid == key.kid and got.event.text == "drain"


async def test_errors_are_one_line_with_exit_codes() -> None:
    code, _, err = await run("tail", "--count", "1", server="nats://127.0.0.1:1")
    assert code == 69 and err.startswith("error: cannot reach NATS") and "Traceback" not in err
    code, _, err = await run("tail", server="gopher://x")
    assert code == 2 and "unsupported scheme 'gopher'" in err and "Traceback" not in err
    code, _, err = await run("tail", "no spaces allowed", server="nats://127.0.0.1:1")
    assert code == 2 and "invalid pattern" in err


# -- stats ------------------------------------------------------------------------------------------------
async def test_stats_json_reports_rates_per_subject(nats_server: NatsServer) -> None:
    async with started("stats", "fedbus.statstest.>", "--json", "--interval", "0.5", "--count", "1",
                       server=nats_server.url) as stats:
        await line_containing(stats.stderr, "listening")
        snapshot_line = asyncio.ensure_future(line_containing(stats.stdout, "interval_s"))
        async with connect(nats_server.url, source="load") as bus:
            sent = 0
            while not snapshot_line.done():  # publish until the one snapshot is out
                await bus.publish_envelope("fedbus.statstest.a", bus.envelope(Heartbeat(agent_id="a")))
                sent += 1
                await asyncio.wait([snapshot_line], timeout=0.01)
        snap = json.loads(snapshot_line.result())
        assert await asyncio.wait_for(stats.wait(), WAIT) == 0
    (row,) = snap["subjects"]
    assert row["subject"] == "fedbus.statstest.a" and 0 < row["msgs"] <= sent
    assert row["bytes"] > row["msgs"] * 50  # every frame carries an envelope
    assert row["msg_per_s"] == pytest.approx(row["msgs"] / snap["interval_s"], rel=0.01)
    assert snap["msgs"] == row["msgs"] and snap["dropped"] == 0


# -- streams and replay -----------------------------------------------------------------------------------
async def _store_records(url: str, n: int) -> list[str]:
    async with connect(url, source="recorder") as bus:
        log = JetStream(bus).event_log()
        ids = [(await log.publish(Record(topic="cli", text=f"r{i}", fields={"i": i}))).id for i in range(n)]
        assert isinstance(bus.transport, NatsTransport)
        # bytes that are no envelope, stored behind the event log's back
        await bus.transport.nc.jetstream().publish(Record(topic="junk", text="").subject(), b"\x92\x01")
    return ids


async def test_streams_and_replay_from_a_sequence(fresh_nats: NatsServer) -> None:
    url = fresh_nats.url
    ids = await _store_records(url, 4)

    code, out, err = await run("streams", "--json", server=url)
    assert code == 0, err
    (stream,) = json.loads(out)
    assert stream["name"] == "FEDBUS_BUS" and stream["subjects"] == ["fedbus.bus.record.*"]
    assert stream["messages"] == 5 and stream["last_seq"] == 5 and stream["bytes"] > 0

    code, out, err = await run("replay", "FEDBUS_BUS", "--seq", "3", "--json", server=url)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r.get("seq") for r in records] == [3, 4, 5]
    assert [r.get("id") for r in records[:2]] == ids[2:]
    assert records[0]["data"] == {"topic": "cli", "text": "r2", "fields": {"i": 2}}
    assert "MalformedFrame" in records[2]["error"] and records[2]["bytes"] == 2

    code, out, err = await run("replay", "fedbus.bus.record.cli", "--since", "1h", "--count", "2", "--json",
                               server=url)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids[:2]

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    code, out, err = await run("replay", "fedbus.bus.record.cli", "--since", later, server=url)
    assert code == 0 and out == "" and "replay: 0 events" in err

    code, out, err = await run("streams", "--json", server=url)
    assert code == 0 and json.loads(out)[0]["consumers"] == []  # replays leave no consumer behind
    code, out, err = await run("streams", server=url)  # the human table
    assert code == 0 and "FEDBUS_BUS" in out and "fedbus.bus.record.*" in out

    code, _, err = await run("replay", "NOSUCH", server=url)
    assert code == 1 and "no stream named 'NOSUCH'" in err


# -- events -----------------------------------------------------------------------------------------------
async def test_events_lists_the_catalogue() -> None:
    code, out, err = await run("events", "--json", module=True)  # python -m fedbus.bus.cli works too
    assert code == 0, err
    catalogue = {e["type"]: e for e in json.loads(out)}
    beat = catalogue["bus.heartbeat"]
    assert beat["subject"] == "fedbus.bus.heartbeat.*" and beat["key"] == "agent_id" and beat["version"] == 1
    assert {"name": "seq", "type": "int", "required": False, "default": "0"} in beat["fields"]
    assert catalogue["bus.notice"]["signed"] and not catalogue["bus.notice"]["durable"]
    assert catalogue["bus.record"]["durable"] and not catalogue["bus.record"]["signed"]

    code, out, _ = await run("events", "bus.record")
    assert code == 0 and "fedbus.bus.record.<topic>  durable" in out and "bus.heartbeat" not in out


# -- make demo --------------------------------------------------------------------------------------------
async def test_demo_runs_and_exits_0() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedbus.bus.demo",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    assert "demo finished" in text and "heartbeats seen: 4" in text and "bad events dropped: 3" in text
    assert "records replayed: 3" in text and "tls://127.0.0.1:" in text


# -- pure helpers -----------------------------------------------------------------------------------------
def test_server_help_names_the_one_default_url() -> None:
    import click

    from fedbus.bus.cli import server_option
    from fedbus.bus.connect import DEFAULT_URL

    @server_option
    @click.command()
    def cmd(server: str | None) -> None: ...

    (option,) = [p for p in cmd.params if p.name == "server"]
    assert DEFAULT_URL == "nats://127.0.0.1:4222"
    assert f"else {DEFAULT_URL}]" in (option.help or "")


def test_parse_since_takes_relative_and_iso_times() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_since("10m", now=now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now=now) == now - timedelta(minutes=90)
    assert parse_since("250ms", now=now) == now - timedelta(milliseconds=250)
    assert parse_since("2025-01-01T11:00:00Z") == datetime(2025, 1, 1, 11, tzinfo=UTC)
    assert parse_since("2025-01-01T11:00:00").tzinfo is not None  # naive means local time
    with pytest.raises(ConfigError, match="not a time"):
        parse_since("yesterday")


def test_frame_records_never_raise() -> None:
    codec = Codec(limits=Limits(max_frame_bytes=512))
    oversized = frame_record("fedbus.x.y", b"\x00" * 600, codec)
    assert oversized["bytes"] == 600 and "FrameTooLarge" in oversized["error"]
    bus_codec = Codec()
    env = bus_codec.envelope(Heartbeat(agent_id="a"), source="s")
    env.data = b"\x81\xa8agent_id\x07"  # agent_id is an int: the typed check fails, the raw data is shown
    bad = frame_record("fedbus.bus.heartbeat.a", bus_codec.pack(env), bus_codec)
    assert "SchemaError" in bad["error"] and bad["data"] == {"agent_id": 7}
    env.type = "blob.thing"
    env.data = msgpack.packb({"b": b"\x01\x02\x03", "c": b"\x00" * 256})
    shown = frame_record("fedbus.blob.thing", bus_codec.pack(env), bus_codec)
    assert shown["known"] is False and shown["data"] == {"b": "AQID", "c": "<256 bytes>"}

