"""Trust on the scheduler's side (issue 7): hostile ids, signed submits and cancels, dead letters, duplicate ids,
128-bit ids and the exits of ``fedbus launch --follow``. Findings 2, 3 (scheduler side), 5 and 10 each have a
regression test here, on real servers: a real nats-server, and the scheduler and a GPU agent as real
``fedbus agent`` processes where the CLI is tested; in-process agents on a memory broker for the secure mode.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from fedbus.agents.client import LaunchClient, new_job_id
from fedbus.agents.events import (
    EVENT_TYPES,
    AgentHeartbeat,
    Capacity,
    JobBid,
    JobReport,
    JobState,
    JobSubmit,
    ReportPhase,
)
from fedbus.agents.gpu import GpuAgent, GpuAgentConfig
from fedbus.agents.jobspec import Computing, JobSpec
from fedbus.agents.resources import DeclaredResources
from fedbus.agents.runtime import RuntimeConfig
from fedbus.agents.scheduler import SchedulerAgent, SchedulerAgentConfig
from fedbus.agents.scheduling import SchedulerConfig
from fedbus.bus.broker import NatsServer, free_port
from fedbus.bus.client import Bus
from fedbus.bus.codec import Codec
from fedbus.bus.connect import transport_for
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials, Identity
from fedbus.bus.deadletter import DeadLetter, DeadLetters, RetryPolicy, read_dead_letters
from fedbus.bus.errors import SchemaError
from fedbus.bus.memory import MemoryBroker, MemoryTransport
from fedbus.bus.roles import ID_PATTERN, Role, validate_id
from fedbus.bus.stores import EventLog, open_stores

FEDBUS = str(Path(sys.executable).parent / "fedbus")
TRAVERSAL = "../../../victim"


# -- schemas: ids are validated by the codec -----------------------------------------------------------
def _id_fields(cls: type) -> set[str]:
    """The fields of ``cls`` (and of the structs and lists in it) that are validated as ids, dotted."""
    found: set[str] = set()

    def walk(info: msgspec.inspect.Type, path: str) -> None:
        match info:
            case msgspec.inspect.StrType(pattern=pattern) if pattern == ID_PATTERN:
                found.add(path)
            case msgspec.inspect.UnionType(types=types):
                for t in types:
                    walk(t, path)
            case msgspec.inspect.ListType(item_type=item):
                walk(item, f"{path}[]")
            case msgspec.inspect.StructType(fields=fields):
                for f in fields:
                    walk(f.type, f"{path}.{f.name}" if path else f.name)

    walk(msgspec.inspect.type_info(cls), "")
    return found


def test_every_id_of_launch_is_validated_in_the_schema() -> None:
    assert {cls.spec.type: _id_fields(cls) for cls in EVENT_TYPES} == {
        "agents.heartbeat": {"agent_id", "jobs[].job_id"},
        "jobs.submit": {"job_id", "submitted_by"},
        "jobs.cancel": {"job_id", "cancelled_by"},
        "jobs.offer": {"to", "job_id"},
        "jobs.bid": {"job_id", "agent_id"},
        "jobs.award": {"agent_id", "job_id"},
        "jobs.reject": {"agent_id", "job_id"},
        "jobs.report": {"job_id", "agent_id"},
        "jobs.stop": {"agent_id", "job_id"},
        "jobs.log": {"job_id", "agent_id"},
        "jobs.status": {"job_id", "agents[]"},
    }


@pytest.mark.parametrize("field", ["job_id", "submitted_by"])
def test_a_traversal_id_is_a_schema_error_before_any_handler(field: str) -> None:
    codec = Codec()
    env = codec.envelope(JobSubmit(job_id="fine", jobspec=JobSpec(job="id"), submitted_by="alice"), source="m")
    data = msgspec.msgpack.decode(env.data)
    data[field] = TRAVERSAL
    env.data = msgspec.msgpack.encode(data)
    with pytest.raises(SchemaError) as info:
        codec.decode(env)
    assert info.value.field == field


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_a_capacity_that_would_win_every_placement_is_a_schema_error(value: float) -> None:
    codec = Codec()
    beat = AgentHeartbeat(agent_id="gpu-x", kind="gpu", status="ready", instance="i", seq=1, interval_s=1.0,
                          capacity=Capacity(cpus=8, free_cpus=8, price_per_hour=1.0))
    env = codec.envelope(beat, source="gpu-x")
    data = msgspec.msgpack.decode(env.data)
    data["capacity"]["price_per_hour"] = value
    env.data = msgspec.msgpack.encode(data)
    with pytest.raises(SchemaError) as info:
        codec.decode(env)
    assert info.value.field == "capacity.price_per_hour"


def test_pub_sub_declarations_follow_the_table() -> None:
    table = {cls.spec.type: (cls.spec.pub, cls.spec.sub, cls.spec.signed) for cls in EVENT_TYPES}
    agents, own = ("gpu-agent", "device"), ("gpu-agent:self", "device:self")
    assert table == {
        "agents.heartbeat": (("scheduler:self", "gpu-agent:self", "device:self", "aggregator:self", "observer:self",
                              "gateway:self", "replica:self"), ("scheduler", "observer"), False),
        "jobs.submit": ((), ("scheduler",), False),  # signed by the submitter, checked by the scheduler
        "jobs.cancel": ((), ("scheduler",), False),
        "jobs.offer": (("scheduler",), own, False),
        "jobs.award": (("scheduler",), own, True),
        "jobs.reject": (("scheduler",), own, True),
        "jobs.stop": (("scheduler",), own, True),
        "jobs.bid": (agents, ("scheduler",), True),
        "jobs.report": (agents, ("scheduler",), True),
        "jobs.log": (agents, (), False),
        "jobs.status": (("scheduler",), ("observer",), True),
    }


def test_job_ids_carry_128_random_bits_and_stay_valid_ids() -> None:
    """Finding 5: ids had ~20 random bits. Every one of the 128 bits must vary across ids."""
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    ids = [new_job_id("train-" + "x" * 60) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for job_id in ids[:50]:
        assert validate_id(job_id) == job_id and len(job_id) <= 64
    tails = [job_id.rsplit("-", 1)[1] for job_id in ids]
    assert {len(t) for t in tails} == {26}
    values = [int("".join(f"{alphabet.index(c):05b}" for c in t), 2) for t in tails]
    assert all(v < 2**128 for v in values)
    ones, zeros = 0, 0
    for v in values:
        ones |= v
        zeros |= ~v & (2**128 - 1)
    assert ones == zeros == 2**128 - 1
    assert new_job_id("hello").startswith("hello-")


# -- the dead-letter facility on its own ---------------------------------------------------------------
@pytest.fixture(params=["memory", "nats"])
async def event_log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    if request.param == "memory":
        transport = MemoryTransport(MemoryBroker())
    else:
        transport = transport_for(request.getfixturevalue("nats_server").url)
    async with Bus(transport, source="tester") as bus:
        yield (await open_stores(bus)).event_log()


async def test_a_delivery_failing_five_times_becomes_a_dead_letter_and_never_comes_back(event_log: EventLog) -> None:
    key = os.urandom(4).hex()
    durable = f"poison-{key}"
    dead = DeadLetters(event_log, agent_id=f"t-{key}", policy=RetryPolicy(max_attempts=5, delay_s=0.01))
    await event_log.ensure(JobSubmit, DeadLetter)
    sent = await event_log.publish(JobSubmit(job_id=f"poison-{key}", jobspec=JobSpec(job="true")))
    attempts = []
    async with event_log.consume(JobSubmit, durable=durable, key=f"poison-{key}", ack_wait=30) as consumer:
        while True:
            d = await consumer.next(timeout=10)
            attempts.append(d.delivered)
            if await dead.failed(d, "the handler raised ValueError: nope", consumer=durable):
                break
        with pytest.raises(TimeoutError):  # terminated: not delivered again
            await consumer.next(timeout=0.5)
    assert attempts == [1, 2, 3, 4, 5]
    letters = [s.event async for s in read_dead_letters(event_log) if isinstance(s.event, DeadLetter)]
    mine = [letter for letter in letters if letter.agent_id == f"t-{key}"]
    assert len(mine) == 1
    letter = mine[0]
    assert (letter.attempts, letter.refused, letter.consumer, letter.event_type, letter.event_id) == (
        5, False, durable, "jobs.submit", sent.id)
    assert letter.reason == "the handler raised ValueError: nope"
    original = Codec().unpack(letter.frame)  # the envelope, whole, with its signature fields
    assert (original.id, original.data) == (sent.id, sent.data) and letter.frame_bytes == len(letter.frame)


# -- the secure mode: submits, cancels, bids and reports against the identities registry ----------------
def _creds(ident: str, role: Role, seed: bytes | None = None) -> Credentials:
    return Credentials(id=ident, role=role, user=ident, password="-", signing_seed=seed or os.urandom(32))


def _scheduler(root: Path, broker: MemoryBroker, *, keep_finished: int = 10_000) -> SchedulerAgent:
    scheduling = SchedulerConfig(warmup_s=0.2, bid_window_s=0.3, keep_finished=keep_finished)
    return SchedulerAgent(RuntimeConfig(state_dir=root / "scheduler", agent_id="scheduler", heartbeat_s=0.1,
                                        health_port=None),
                          SchedulerAgentConfig(scheduling=scheduling), transport=MemoryTransport(broker))


def _gpu(root: Path, transport: object, name: str, server: str | None = None) -> GpuAgent:
    return GpuAgent(RuntimeConfig(server=server, state_dir=root / name, agent_id=name, heartbeat_s=0.1,
                                  health_port=None),
                    GpuAgentConfig(declared=DeclaredResources(gpus=1, cpus=4, memory_gb=4, disk_gb=10),
                                   address="127.0.0.1"),
                    transport=transport)  # type: ignore[arg-type]


async def _until(check: object, timeout: float = 15.0) -> None:
    """Wait until ``check()`` (sync or async) is true."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)


async def _letters(log: EventLog) -> list[DeadLetter]:
    return [s.event async for s in read_dead_letters(log) if isinstance(s.event, DeadLetter)]


async def test_secure_scheduler_takes_jobs_only_from_admins_and_work_only_from_the_agent_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBUS_CREDS", raising=False)
    broker = MemoryBroker()
    alice, mallory = _creds("alice", Role.ADMIN), _creds("mallory", Role.GPU_AGENT)
    forger = _creds("alice", Role.ADMIN, seed=mallory.signing_seed)  # claims to be alice, holds mallory's key
    gpu = _gpu(tmp_path, MemoryTransport(broker), "gpu-1")
    async with Bus(MemoryTransport(broker), source="authority") as authority:
        registry = await (await open_stores(authority)).key_value(IDENTITIES_BUCKET)
        for identity in (alice.identity(), mallory.identity(),
                         Identity(id="gpu-1", role=Role.GPU_AGENT, public_key=gpu.key.public_raw)):
            await registry.put(identity.id, identity.encode())

    def client(creds: Credentials | None) -> LaunchClient:
        return LaunchClient(transport=MemoryTransport(broker), creds=creds)

    spec = JobSpec(job="sleep 30", computing=Computing())
    async with _scheduler(tmp_path, broker) as scheduler, gpu, client(alice) as admin, \
            client(None) as anonymous, client(mallory) as agent, client(forger) as forged:
        assert scheduler.secure
        # Submits: only a signature by an admin identity's registered key counts; the others are refused,
        # and their submitters see it (their claim ends failed, with the reason).
        for who, job_id, words in ((anonymous, "anon-1", "names no sender"),
                                   (agent, "agent-1", "identity 'mallory' is a gpu-agent, not admin"),
                                   (forged, "forged-1", "not by 'alice''s registered key")):
            refused = await who.follow(job_id, submit=lambda w=who, j=job_id: w.submit(spec, job_id=j),
                                       timeout=10, logs=False)
            assert refused.state is JobState.FAILED and words in refused.reason, refused.reason
            assert refused.reason.startswith("refused by the scheduler")
        await admin.submit(spec, job_id="real-1")
        await _until(lambda: _state_is(admin, "real-1", JobState.RUNNING))
        # A report and a bid in gpu-1's name, signed by mallory: refused; the job keeps running.
        log = admin.stores.event_log()
        async with Bus(MemoryTransport(broker), source="gpu-1", key=mallory.signing_key) as impostor:
            await impostor.publish(JobBid(job_id="real-1", round=1, agent_id="gpu-1"))
            forged_exit = impostor.envelope(JobReport(job_id="real-1", attempt=1, agent_id="gpu-1", node_rank=0,
                                                      phase=ReportPhase.EXITED, exit_code=0))
            await log.publish_envelope(forged_exit)
        await _until(lambda: scheduler.refused["jobs.bid"] >= 1 and scheduler.refused["jobs.report"] >= 1)
        # A cancel by a non-admin is refused; alice's counts, and the record says who did what.
        await agent.cancel("real-1")
        await _until(lambda: scheduler.refused["jobs.cancel"] >= 1)
        assert (await admin.job("real-1")).state is JobState.RUNNING
        await admin.cancel("real-1")
        record = await admin.wait("real-1", timeout=10)
        assert (record.state, record.submitted_by, record.cancelled_by) == (JobState.CANCELLED, "alice", "alice")
        letters = await _letters(log)
        assert sorted((d.event_type, d.original_subject.rsplit(".", 1)[1]) for d in letters) == [
            ("jobs.cancel", "real-1"), ("jobs.report", "real-1"), ("jobs.submit", "agent-1"),
            ("jobs.submit", "anon-1"), ("jobs.submit", "forged-1")]
        assert all(d.refused and d.attempts == 1 for d in letters)
        report = next(d for d in letters if d.event_type == "jobs.report")
        assert "not by 'gpu-1''s registered key" in report.reason


async def test_the_id_of_a_finished_job_stays_taken_after_it_leaves_memory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBUS_CREDS", raising=False)
    broker = MemoryBroker()
    async with _scheduler(tmp_path, broker, keep_finished=0) as scheduler, \
            _gpu(tmp_path, MemoryTransport(broker), "gpu-1"), \
            LaunchClient(transport=MemoryTransport(broker)) as client:
        spec = JobSpec(job="echo first")
        record = await client.follow("old-1", submit=lambda: client.submit(spec, job_id="old-1"), timeout=10)
        assert record.state is JobState.SUCCEEDED and scheduler.core is not None
        assert "old-1" not in scheduler.core.jobs  # only the store remembers it
        hijack = await client.stores.event_log().publish(JobSubmit(job_id="old-1", jobspec=JobSpec(job="echo 2")))
        await _until(lambda: _has_letter(client, hijack.id))
        after = await client.job("old-1")
        assert (after.spec.job, after.submit_id, after.state) == ("echo first", record.submit_id, record.state)


async def _state_is(client: LaunchClient, job_id: str, state: JobState) -> bool:
    return (await client.job(job_id)).state is state


# -- a poison submit: its record cannot be stored; five attempts, then a dead letter --------------------
async def test_a_submit_that_cannot_be_stored_goes_to_the_dead_letters_and_scheduling_goes_on(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    url = fresh_nats.url
    nc = await nats.connect(url)  # an operator made job records small: this job's will not fit
    await nc.jetstream().create_key_value(bucket="jobs", max_value_size=2048)
    await nc.close()

    def scheduler() -> SchedulerAgent:
        return SchedulerAgent(
            RuntimeConfig(server=url, state_dir=tmp_path / "scheduler", agent_id="scheduler", heartbeat_s=0.1,
                          health_port=None),
            SchedulerAgentConfig(scheduling=SchedulerConfig(warmup_s=0.2, bid_window_s=0.3),
                                 retry=RetryPolicy(max_attempts=5, delay_s=0.05), save_give_up_s=0.05))

    big = JobSpec(job="true", env={"PAYLOAD": "x" * 4000})
    small = JobSpec(job="echo fine")
    async with scheduler() as first, _gpu(tmp_path, None, "gpu-p", server=url), LaunchClient(url) as client:
        log = client.stores.event_log()
        await log.publish(JobSubmit(job_id="too-big", jobspec=big))
        record = await client.follow("fine-1", submit=lambda: client.submit(small, job_id="fine-1"), timeout=15)
        assert record.state is JobState.SUCCEEDED
        await _until(lambda: first.dead is not None and first.dead.count == 1)
        [letter] = await _letters(log)
        assert (letter.original_subject, letter.attempts, letter.refused) == ("fedbus.jobs.submit.too-big", 5, False)
        assert "cannot be stored" in letter.reason and "too-big" not in await _job_keys(client)
    async with scheduler() as second, _gpu(tmp_path, None, "gpu-p", server=url), LaunchClient(url) as client:
        record = await client.follow("fine-2", submit=lambda: client.submit(small, job_id="fine-2"), timeout=15)
        assert record.state is JobState.SUCCEEDED
        assert second.dead is not None and second.dead.count == 0  # the poison did not come back
        assert len(await _letters(client.stores.event_log())) == 1
        submit = await _consumer(client, "scheduler-submit")
        assert (submit.pending, submit.ack_pending) == (0, 0)


async def _job_keys(client: LaunchClient) -> list[str]:
    return [r.job_id for r in await client.jobs()]


async def _consumer(client: LaunchClient, name: str) -> object:
    for stream in await client.stores.streams():
        for consumer in stream.consumers:
            if consumer.name == name:
                return consumer
    raise AssertionError(f"no consumer {name}")


# -- the CLI and the daemons as real processes ---------------------------------------------------------
class Cluster:
    """A nats-server, a scheduler and one GPU agent (pool ``trust``) as real processes."""

    def __init__(self, server: NatsServer, root: Path) -> None:
        self.server, self.url, self.root = server, server.url, root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.health: dict[str, int] = {}

    def spawn(self, name: str, args: list[str]) -> None:
        port = self.health[name] = free_port()
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [FEDBUS, *args, "--server", self.url, "--state-dir", str(self.root / name), "--health-port",
                 str(port), "--heartbeat", "0.2", "--json-logs"], stdout=log, stderr=subprocess.STDOUT)

    def start_scheduler(self) -> None:
        self.spawn("scheduler", ["agent", "scheduler", "--lease", "1.5", "--bid-window", "0.3", "--backoff", "0.2"])

    def metric(self, name: str, metric: str, label: str = "") -> float:
        """A metric of a daemon's /metrics (the first series whose labels contain ``label``; 0 if none)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health[name]}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(f"fedbus_{metric}{{") and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("trust")
    with NatsServer(data_dir=root / "nats", mqtt_port=None) as server:
        c = Cluster(server, root)
        try:
            c.start_scheduler()
            c.spawn("gpu-t", ["agent", "gpu", "--agent-id", "gpu-t", "--gpus", "0", "--cpus", "8",
                              "--memory-gb", "8", "--disk-gb", "10", "--label", "pool=trust"])
            yield c
        finally:
            c.close()


@pytest.fixture
async def client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LaunchClient]:
    monkeypatch.delenv("FEDBUS_CREDS", raising=False)
    async with asyncio.timeout(30):
        while True:
            async with LaunchClient(cluster.url) as probe:  # the scheduler's key is registered once it runs
                if len(probe.keyring) and {"scheduler", "gpu-t"} <= {b.agent_id for b in await probe.agents()
                                                                      if b.status == "ready"}:
                    break
            await asyncio.sleep(0.1)
    async with LaunchClient(cluster.url) as c:
        yield c


def _job_file(folder: Path, command: str, *, workspace: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["name: trust", f"job: {command}", "computing:", "  labels: {pool: trust}"]
    if workspace:
        (folder / "ws").mkdir(exist_ok=True)
        (folder / "ws" / "data.txt").write_text("first\n")
        lines.append("workspace: ws")
    path = folder / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDBUS_CREDS", "FEDBUS_SERVER")}
    return {**env, "FEDBUS_LOG_LEVEL": "error"}


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(FEDBUS, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=_env())
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_hostile_submits_never_stop_scheduling_even_across_a_restart(cluster: Cluster,
                                                                           client: LaunchClient) -> None:
    """Finding 2: a submit with job_id ``../../../victim`` made the scheduler loop, restarts included."""
    codec = Codec()
    traversal = codec.envelope(JobSubmit(job_id="victim", jobspec=JobSpec(job="id")), source="mallory")
    payload = msgspec.msgpack.decode(traversal.data)
    payload["job_id"] = TRAVERSAL
    traversal.data = msgspec.msgpack.encode(payload)
    decoy = codec.envelope(JobSubmit(job_id="decoy", jobspec=JobSpec(job="id")), source="mallory")
    nc = await nats.connect(cluster.url)  # raw nats-py, as an attacker would
    try:
        js = nc.jetstream()
        await js.publish("fedbus.jobs.submit.victim", codec.pack(traversal))
        await js.publish("fedbus.jobs.submit.junk", b"\x92\xc1 not an envelope")
        await js.publish("fedbus.jobs.submit.victim", codec.pack(decoy))  # a valid event on another's subject
    finally:
        await nc.close()
    record = await client.follow("after-hostile", timeout=20, logs=False,
                                 submit=lambda: client.submit(JobSpec(job="echo ok", computing=_trust()),
                                                              job_id="after-hostile"))
    assert record.state is JobState.SUCCEEDED, record.reason
    assert cluster.metric("scheduler", "bus_rejected") >= 2  # the traversal and the junk: rejected at decode
    log = client.stores.event_log()
    decoys = [d for d in await _letters(log) if d.event_id == decoy.id]
    assert len(decoys) == 1 and decoys[0].refused and "not on its own subject" in decoys[0].reason
    # Nothing is lost: the frames that could not even be decoded are kept too, with the decoder's reason.
    kept = {d.frame: d for d in await _letters(log) if d.event_type == "?"}
    assert b"\x92\xc1 not an envelope" in kept and "MalformedFrame" in kept[b"\x92\xc1 not an envelope"].reason
    assert codec.pack(traversal) in kept and "job_id" in kept[codec.pack(traversal)].reason
    cluster.procs["scheduler"].send_signal(signal.SIGKILL)
    cluster.procs["scheduler"].wait(10)
    cluster.start_scheduler()
    record = await client.follow("after-restart", timeout=30, logs=False,
                                 submit=lambda: client.submit(JobSpec(job="echo ok", computing=_trust()),
                                                              job_id="after-restart"))
    assert record.state is JobState.SUCCEEDED, record.reason
    assert len([d for d in await _letters(log) if d.event_id == decoy.id]) == 1  # not handled again
    assert "victim" not in {r.job_id for r in await client.jobs()}
    assert "not saved yet" not in cluster.log("scheduler")
    submit = await _consumer(client, "scheduler-submit")
    assert (submit.pending, submit.ack_pending) == (0, 0)


def _trust() -> Computing:
    return Computing(labels={"pool": "trust"})


async def test_a_duplicate_job_id_is_refused_and_never_touches_the_first_job(cluster: Cluster,
                                                                           client: LaunchClient,
                                                                           tmp_path: Path) -> None:
    """Finding 5: the second submit of an id was dropped silently and its workspace replaced the first's."""
    job_file = _job_file(tmp_path, "cat data.txt", workspace=True)
    code, out, err = await _run("launch", str(job_file), "--job-id", "dup-1", "--server", cluster.url)
    assert (code, out.strip()) == (0, "dup-1"), err
    first = await client.wait("dup-1", timeout=20)
    assert first.state is JobState.SUCCEEDED
    workspaces = await client.stores.object_store("workspaces")
    stored = await workspaces.info("dup-1.tar.gz")
    (tmp_path / "ws" / "data.txt").write_text("second\n")
    code, out, err = await _run("launch", str(job_file), "--job-id", "dup-1", "--server", cluster.url)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "dup-1" in lines[0] and "already exists" in lines[0]
    assert (await workspaces.info("dup-1.tar.gz")).version == stored.version
    # Bypassing the CLI's claim: the scheduler refuses it into the dead letters.
    hijack = await client.stores.event_log().publish(
        JobSubmit(job_id="dup-1", jobspec=JobSpec(job="echo hijacked", computing=_trust())))
    await _until(lambda: _has_letter(client, hijack.id))
    after = await client.job("dup-1")
    assert (after.submit_id, after.spec.job, after.state) == (first.submit_id, "cat data.txt", JobState.SUCCEEDED)
    text = [line.text for batch in [b async for b in client.stored_logs("dup-1")] for line in batch.lines]
    assert "first" in text and "second" not in text
    # `fedbus dead-letters` lists it: one line each, or JSON.
    code, out, err = await _run("dead-letters", "--json", "--server", cluster.url)
    assert code == 0, err
    rows = [msgspec.json.decode(line) for line in out.splitlines()]
    row = next(r for r in rows if r["event_id"] == hijack.id)
    assert (row["subject"], row["type"], row["refused"], row["attempts"]) == (
        "fedbus.jobs.submit.dup-1", "jobs.submit", True, 1)
    assert "job id 'dup-1' is taken" in row["reason"] and row["time"]
    code, out, _ = await _run("dead-letters", "--server", cluster.url)
    line = next(x for x in out.splitlines() if "fedbus.jobs.submit.dup-1" in x)
    assert "jobs.submit" in line and "attempts=1" in line and "is taken" in line


async def _has_letter(client: LaunchClient, event_id: str) -> bool:
    return any(d.event_id == event_id for d in await _letters(client.stores.event_log()))


async def test_follow_with_a_timeout_ends_in_one_line_and_exit_124(cluster: Cluster, client: LaunchClient,
                                                                  tmp_path: Path) -> None:
    """Finding 10: ``launch --follow --timeout 5`` ended in a 68-line ExceptionGroup traceback."""
    job_file = _job_file(tmp_path, "sleep 60")
    code, _, err = await _run("launch", str(job_file), "--follow", "--timeout", "2", "--server", cluster.url)
    assert code == 124, err
    assert "Traceback" not in err and "ExceptionGroup" not in err
    last = err.strip().splitlines()[-1]
    job_id = last.split()[1]
    assert validate_id(job_id) and len(job_id.rsplit("-", 1)[1]) == 26  # a 128-bit id picked by the CLI
    assert "goes on" in last and f"fedbus cancel {job_id} --server {cluster.url}" in last
    assert (await client.job(job_id)).state in (JobState.RUNNING, JobState.STARTING, JobState.QUEUED,
                                                JobState.OFFERED, JobState.AWARDED)
    await client.cancel(job_id)
    assert (await client.wait(job_id, timeout=15)).state is JobState.CANCELLED


async def test_ctrl_c_during_follow_detaches_with_130_and_says_how_to_cancel(cluster: Cluster,
                                                                           client: LaunchClient,
                                                                           tmp_path: Path) -> None:
    """Finding 10: Ctrl-C during ``--follow`` exited 0 while the job kept running."""
    job_file = _job_file(tmp_path, "sleep 60")
    proc = await asyncio.create_subprocess_exec(
        FEDBUS, "launch", str(job_file), "--follow", "--server", cluster.url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env())
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(30):
        while not any(" running " in line for line in seen):
            line = (await proc.stderr.readline()).decode()
            assert line, "".join(seen)  # the command ended before the job ran
            seen.append(line)
    job_id = next(line.split()[1] for line in seen if line.startswith("job ") and "submitted" in line)
    proc.send_signal(signal.SIGINT)
    _out, rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, rest.decode()
    message = rest.decode().strip().splitlines()[-1]
    command = f"fedbus cancel {job_id} --server {cluster.url}"
    assert "goes on" in message and message.endswith(command) and "Traceback" not in rest.decode()
    assert (await client.job(job_id)).state is JobState.RUNNING  # detached, not stopped
    code, _, err = await _run(*command.split()[1:])
    assert code == 0, err
    assert (await client.wait(job_id, timeout=15)).state is JobState.CANCELLED


async def test_heartbeats_of_an_unregistered_agent_are_not_counted(cluster: Cluster, client: LaunchClient) -> None:
    """Insecure mode keeps its rule: an agent id with no registered key is no agent."""
    async with Bus(transport_for(cluster.url), source="ghost") as ghost:
        await ghost.publish(AgentHeartbeat(agent_id="ghost", kind="gpu", status="ready", instance="i", seq=1,
                                           interval_s=0.2))
    label = 'type="agents.heartbeat"'
    await _until(lambda: cluster.metric("scheduler", "inputs_refused_total", label) >= 1)
    assert "ghost" not in {b.agent_id for b in await client.agents()}
