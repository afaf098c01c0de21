"""Bounded storage and durable publishes from the CLI (finding 9 of the Trust issue).

The limits config (defaults, YAML, errors), ``provision`` on a real nats-server, ``fedbus publish`` of a
durable type before its stream exists (stored as admin, refused with one line for a role that may not create
it, on the secure broker ``fedbus up`` starts), and a 2 MiB junk frame on a durable subject.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from fedbus.bus import Bus, Codec
from fedbus.bus._js_errors import denied
from fedbus.bus.authority import Authority
from fedbus.bus.broker import NatsServer
from fedbus.bus.catalogue import Record
from fedbus.bus.catalogue_cli import load_events
from fedbus.bus.connect import connect
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials
from fedbus.bus.errors import ConfigError
from fedbus.bus.events import CATALOGUE
from fedbus.bus.jetstream import JetStream
from fedbus.bus.limits import (
    GiB,
    MiB,
    StorageLimits,
    StoreMissing,
    StreamLimits,
    durable_streams,
    kv_stream,
    load_limits,
    object_stream,
    parse_limits,
    provision,
    render_limits,
)
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.stores import open_stores

FEDBUS = str(Path(sys.executable).parent / "fedbus")
WAIT = 30.0  # an upper bound for a loaded machine; nothing waits this long when things work


# -- the config ----------------------------------------------------------------------------------------
def test_every_stream_and_bucket_the_project_uses_has_limits_and_logs_live_apart() -> None:
    from fedbus.agents.records import JOBS_BUCKET
    from fedbus.agents.runtime import LIVENESS_BUCKET
    from fedbus.agents.trust import KEYS_BUCKET
    from fedbus.agents.workspace import BUCKET as WORKSPACES
    from fedbus.aggregator.federation import STATE_BUCKET

    load_events()
    streams = durable_streams(CATALOGUE)
    assert streams["FEDBUS_JOBS_LOG"] == ["fedbus.jobs.log.*"]  # a chatty job never crowds out job records
    assert "fedbus.jobs.submit.*" in streams["FEDBUS_JOBS"] and "fedbus.jobs.log.*" not in streams["FEDBUS_JOBS"]
    limits = StorageLimits()
    jobs, logs = limits.stream("FEDBUS_JOBS"), limits.stream("FEDBUS_JOBS_LOG")
    assert (jobs.discard, jobs.discard_new_per_subject, logs.discard) == ("new", True, "old")
    assert {JOBS_BUCKET, LIVENESS_BUCKET, KEYS_BUCKET, IDENTITIES_BUCKET} <= set(limits.kv)
    assert {WORKSPACES, "fl", STATE_BUCKET} <= set(limits.objects)


def test_the_jobs_stream_takes_real_events_and_refuses_a_2_mib_frame() -> None:
    from fedbus.agents.events import JobLog, JobSubmit, LogLine
    from fedbus.agents.jobspec import JobSpec

    codec = Codec()
    limits = StorageLimits()
    script = "python train.py --epochs 3\n" * 600  # a 16 KiB inline script
    submit = codec.pack(codec.envelope(JobSubmit(job_id="j" * 32, jobspec=JobSpec(job=script)), source="cli"))
    batch = [LogLine(0, "stdout", 0, "x" * 16_384)] * 17  # what logship sends at most, in ASCII
    log = codec.pack(codec.envelope(JobLog(job_id="j1", attempt=1, agent_id="gpu-1", node_rank=0, seq=1,
                                           lines=batch), source="gpu-1"))
    assert len(submit) < limits.stream("FEDBUS_JOBS").max_msg_size < 2 * MiB
    assert len(log) < limits.stream("FEDBUS_JOBS_LOG").max_msg_size < 2 * MiB


def test_a_limits_file_overrides_field_by_field_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("streams:\n  FEDBUS_JOBS: {max_bytes: 2GiB, max_age: 12h}\n  default: {max_msg_size: 64KiB}\n"
                    "kv:\n  jobs: {max_value_size: 100000}\nobjects:\n  models: {max_bytes: 3GB, max_age: 90m}\n")
    limits = load_limits(path)
    jobs = limits.stream("FEDBUS_JOBS")
    assert (jobs.max_bytes, jobs.max_age, jobs.discard) == (2 * GiB, 12 * 3600.0, "new")  # the rest stays
    assert limits.stream("FEDBUS_ELSEWHERE").max_msg_size == 64 * 1024
    assert limits.bucket("jobs").max_value_size == 100_000 and limits.bucket("jobs").max_bytes == 512 * MiB
    assert (limits.object_bucket("models").max_bytes, limits.object_bucket("models").max_age) == (3 * 10**9, 5400)
    assert load_limits(None) == StorageLimits()
    again = tmp_path / "again.yaml"
    again.write_text(render_limits(limits))
    assert load_limits(again) == limits


@pytest.mark.parametrize(("text", "key"), [
    ("volumes: {}", "volumes"),
    ("streams: {FEDBUS_JOBS: {max_bites: 1}}", "streams.FEDBUS_JOBS.max_bites"),
    ("streams: {FEDBUS_JOBS: {max_bytes: lots}}", "streams.FEDBUS_JOBS.max_bytes"),
    ("streams: {FEDBUS_JOBS: {discard: newest}}", "streams.FEDBUS_JOBS.discard"),
    ("streams: {FEDBUS_JOBS: {max_msg_size: 16MiB}}", "streams.FEDBUS_JOBS.max_msg_size"),
    ("streams: {default: {discard_new_per_subject: true}}", "streams.default.discard_new_per_subject"),
    ("kv: {'../x': {max_bytes: 1}}", "kv.../x"),
    ("objects: {fl: {max_age: soon}}", "objects.fl.max_age"),
])
def test_a_bad_limits_file_is_one_error_naming_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_limits(path)
    assert caught.value.key == key and caught.value.source == str(path)


def test_parse_limits_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError):
        parse_limits(["streams"])
    with pytest.raises(ConfigError):
        StreamLimits(max_bytes=0, max_age=0, max_msg_size=1)


def test_a_permissions_violation_is_matched_to_its_subject_token_by_token() -> None:
    class Conn:  # what nats-py keeps of the server's -ERR (lower-cased)
        last_error = Exception('nats: permissions violation for publish to "$js.api.stream.info.fedbus_jobs_log"')

    assert denied(Conn(), "$JS.API.STREAM.INFO.FEDBUS_JOBS_LOG")
    assert denied(Conn(), "$JS.API.STREAM.INFO")  # a subject below it
    assert not denied(Conn(), "$JS.API.STREAM.INFO.FEDBUS_JOBS")  # another stream, though a prefix
    assert not denied(Conn(), "$JS.API.STREAM.INFO.FEDBUS_JOBS_LOG", since=Conn.last_error)  # seen before


# -- provisioning ----------------------------------------------------------------------------------------
@pytest.fixture
async def admin(fresh_nats: NatsServer) -> AsyncIterator[JetStream]:
    async with Bus(NatsTransport(fresh_nats.url), source="admin") as bus:
        stores = await open_stores(bus)
        assert isinstance(stores, JetStream)
        yield stores


async def test_provision_creates_every_stream_and_bucket_with_its_limits_then_updates_only_changes(
        admin: JetStream) -> None:
    load_events()
    limits = StorageLimits()
    lines = await provision(admin, limits)
    names = [*durable_streams(CATALOGUE), *(kv_stream(b) for b in limits.kv),
             *(object_stream(b) for b in limits.objects)]
    assert sorted(line.split(":")[0] for line in lines) == sorted(names)
    assert all(": created" in line for line in lines), lines
    jobs = (await admin.js.stream_info("FEDBUS_JOBS")).config
    wanted = limits.stream("FEDBUS_JOBS")
    assert (jobs.max_msg_size, jobs.max_age, jobs.max_msgs_per_subject, jobs.discard_new_per_subject) == (
        wanted.max_msg_size, wanted.max_age, wanted.max_msgs_per_subject, True)
    assert jobs.discard == "new"
    for name, stats in {s.name: s for s in await admin.streams()}.items():
        assert stats.max_bytes > 0, name  # nothing unbounded; less than asked only where a line says so
    keys = (await admin.js.stream_info(kv_stream("agent-keys"))).config
    assert keys.max_msg_size == limits.bucket("agent-keys").max_value_size

    assert all(": unchanged" in line for line in await provision(admin, limits))
    tighter = StorageLimits(streams={**limits.streams, "FEDBUS_JOBS": StreamLimits(
        max_bytes=64 * MiB, max_age=86400.0, max_msg_size=64 * 1024)})
    changed = [line for line in await provision(admin, tighter) if ": updated" in line]
    assert [line.split(":")[0] for line in changed] == ["FEDBUS_JOBS"]
    jobs = (await admin.js.stream_info("FEDBUS_JOBS")).config
    assert (jobs.max_bytes, jobs.max_msg_size) == (64 * MiB, 64 * 1024)


# -- finding 9: fedbus publish of a durable type, and junk on a durable subject ----------------------------
async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(FEDBUS, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No server, creds or context of the developer's own: only what the test gives."""
    env = {k: v for k, v in os.environ.items() if k not in ("FEDBUS_SERVER", "FEDBUS_CREDS")}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "config"), **extra}


async def test_cli_publish_of_a_durable_type_before_its_stream_exists_creates_it_and_stores_the_event(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    code, out, err = await run("publish", "bus.record", "--data", '{"topic": "t9", "text": "kept"}',
                               env=cli_env(tmp_path, FEDBUS_SERVER=fresh_nats.url))
    assert code == 0, err
    assert "stored in FEDBUS_BUS" in err
    async with Bus(NatsTransport(fresh_nats.url), source="reader") as bus:
        js = JetStream(bus)
        stored = [s async for s in js.event_log().replay(Record.pattern())]
        assert [(s.envelope.id if s.envelope else None, s.event) for s in stored] == [
            (out.strip(), Record(topic="t9", text="kept"))]
        config = (await js.js.stream_info("FEDBUS_BUS")).config
        assert config.max_bytes == StorageLimits().stream("FEDBUS_BUS").max_bytes  # created with its limits


async def test_cli_publish_of_a_durable_type_over_mqtt_is_refused_rather_than_unconfirmed(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    assert fresh_nats.mqtt_url is not None
    code, out, err = await run("publish", "bus.record", "--data", '{"topic": "t9", "text": "lost?"}',
                               env=cli_env(tmp_path, FEDBUS_SERVER=fresh_nats.mqtt_url))
    assert code == 2 and out == "" and "publish it over NATS" in err and "Traceback" not in err


async def test_a_2_mib_junk_frame_on_a_durable_subject_is_not_stored(admin: JetStream, fresh_nats: NatsServer
                                                                      ) -> None:
    await provision(admin, events=list(load_events()))
    log = admin.event_log()
    raw = await nats.connect(fresh_nats.url)
    try:
        await raw.publish("fedbus.jobs.submit.junk", os.urandom(2 * MiB))  # as a hostile client would
        await raw.flush()
    finally:
        await raw.close()
    after = await log.publish(Record(topic="after", text="stored"))  # this stream's ack: the junk was handled
    assert after.id
    from fedbus.agents.events import JobCancel

    cancel = await log.publish(JobCancel(job_id="j1"))  # acked by FEDBUS_JOBS, after the junk
    info = await admin.js.stream_info("FEDBUS_JOBS")
    assert info.state.messages == 1 and info.state.bytes < 4096
    assert [s.envelope.id for s in [s async for s in log.replay("fedbus.jobs.>")] if s.envelope] == [cancel.id]


# -- the same on the secure broker: only admin creates streams ---------------------------------------------
class Secure:
    def __init__(self, authority: Authority, server: NatsServer, gpu: Path) -> None:
        self.authority = authority
        self.server = server
        self.gpu = gpu


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    authority = Authority(tmp_path_factory.mktemp("secure-limits"))
    with authority.server() as server:
        authority.record(server)
        gpu = authority.issue("gpu-agent", "gpu-9").dump(tmp_path_factory.mktemp("creds") / "gpu.creds")
        assert authority.apply()
        yield Secure(authority, server, gpu)


async def test_secure_cli_publish_of_a_durable_type_without_its_stream_fails_in_one_line_then_works(
        secure: Secure, tmp_path: Path) -> None:
    data = '{"job_id": "j9", "attempt": 1, "agent_id": "gpu-9", "node_rank": 0, "seq": 1, "lines": []}'
    env = cli_env(tmp_path, FEDBUS_CREDS=str(secure.gpu))
    code, out, err = await run("publish", "jobs.log", "--data", data, env=env)
    assert code != 0 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FEDBUS_JOBS_LOG" in errors[0], err
    assert errors[0].endswith("start the broker with `fedbus up`"), err

    admin_creds = secure.authority.admin_creds()
    async with connect(source="admin", creds=admin_creds, persistent=False) as bus:
        stores = await open_stores(bus)
        assert isinstance(stores, JetStream)
        assert "FEDBUS_JOBS_LOG" not in [s.name for s in await stores.streams()]  # nothing half-made
        await provision(stores)  # what `fedbus up` does as admin
    code, out, err = await run("publish", "jobs.log", "--data", data, env=env)
    assert code == 0, err
    async with connect(source="admin", creds=admin_creds, persistent=False) as bus:
        log = JetStream(bus).event_log()
        assert [s.envelope.id for s in [s async for s in log.replay("fedbus.jobs.log.j9")] if s.envelope] == [
            out.strip()]


async def test_secure_roles_only_look_buckets_up_and_say_so_when_one_is_missing(secure: Secure) -> None:
    gpu = Credentials.load(secure.gpu)
    async with connect(source="gpu-9", creds=gpu, persistent=False) as bus:
        stores = await open_stores(bus, api_timeout=WAIT)  # a hang would show as a timeout, not this error
        with pytest.raises(StoreMissing, match="start the broker with `fedbus up`"):
            await stores.key_value("no-such-bucket")
        with pytest.raises(StoreMissing, match="start the broker with `fedbus up`"):
            await stores.object_store("no-such-objects")
