"""Launch end to end: a real nats-server, the scheduler and GPU agents as real ``fedbus agent`` processes.

One broker, scheduler and pool of agents serve the module; tests that kill, stop or drain agents start
their own (each pool has a label that only its tests' jobs ask for). Timings are shortened: heartbeats every
0.2 s, leases of 1.5 s, bid windows of 0.3 s.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from fedbus.agents.client import LaunchClient
from fedbus.agents.events import JobAward, JobLog, JobReport, JobState, JobStatus
from fedbus.agents.jobspec import Computing, JobSpec, load_jobspec
from fedbus.agents.trust import KEYS_BUCKET
from fedbus.bus.broker import NatsServer, free_port
from fedbus.bus.client import Bus
from fedbus.bus.connect import transport_for
from fedbus.bus.signing import AgentKey

pytestmark = pytest.mark.slow

FEDBUS = str(Path(sys.executable).parent / "fedbus")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-job" / "job.yaml"
FAST = ["--heartbeat", "0.2", "--json-logs", "--log-level", "info"]


class Cluster:
    """The processes of a Launch deployment, started and killed on demand."""

    def __init__(self, server: NatsServer, root: Path) -> None:
        self.server = server
        self.url = server.url
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.health: dict[str, int] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        port = self.health[name] = free_port()
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen([FEDBUS, *args, "--server", self.url, "--state-dir", str(self.root / name),
                                 "--health-port", str(port), *FAST], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def start_scheduler(self) -> None:
        self._spawn("scheduler", ["agent", "scheduler", "--lease", "1.5", "--bid-window", "0.3",
                                  "--backoff", "0.2"])

    def start_agent(self, agent_id: str, *, gpus: int = 1, labels: dict[str, str]) -> None:
        label_args = [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
        self._spawn(agent_id, ["agent", "gpu", "--agent-id", agent_id, "--gpus", str(gpus),
                               "--gpu-model", "A100", "--cpus", "4", "--memory-gb", "8", "--disk-gb", "10",
                               *label_args])

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health[name]}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_tail(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("launch")
    with NatsServer(data_dir=root / "nats", mqtt_port=None) as server:
        c = Cluster(server, root)
        try:
            c.start_scheduler()
            for name in ("gpu-a", "gpu-b"):
                c.start_agent(name, gpus=2, labels={"pool": "main", "name": name})
            yield c
        finally:
            c.close()


async def wait_agents(client: LaunchClient, names: set[str], timeout: float = 30.0) -> None:
    """Until every named agent (and the scheduler) is in the liveness bucket as ready."""
    async with asyncio.timeout(timeout):
        while True:
            live = {b.agent_id for b in await client.agents() if b.status == "ready"}
            if names | {"scheduler"} <= live:
                return
            await asyncio.sleep(0.1)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[LaunchClient]:
    # The scheduler registers its key on start; a client made before that would not trust its statuses.
    async with asyncio.timeout(30):
        while True:
            async with LaunchClient(cluster.url) as probe:
                if len(probe.keyring):
                    break
            await asyncio.sleep(0.1)
    async with LaunchClient(cluster.url) as c:
        await wait_agents(c, {"gpu-a", "gpu-b"})
        yield c


def job(command: str, *, pool: str = "main", gpus: int = 1, nodes: int = 1, **kw: object) -> JobSpec:
    computing = Computing(nodes=nodes, gpus_per_node=gpus, labels={"pool": pool})
    return JobSpec(job=command, computing=computing, **kw)  # type: ignore[arg-type]


async def statuses_until(client: LaunchClient, job_id: str, done: Callable[[JobStatus], bool],
                         timeout: float = 20.0) -> list[JobStatus]:
    """Subscribe to a job's statuses until ``done`` says stop (the subscription is live before returning)."""
    seen: list[JobStatus] = []
    async with await client.bus.subscribe(JobStatus, key=job_id) as sub:
        async with asyncio.timeout(timeout):
            while not seen or not done(seen[-1]):
                seen.append((await sub.next()).event)
    return seen


async def stored_reports(client: LaunchClient, job_id: str) -> list[JobReport]:
    """Every report stored for a job, whoever signed it (the client trusts every registered key here)."""
    keys = await client.stores.key_value(KEYS_BUCKET)
    for agent_id in await keys.keys():
        client.keyring.trust((await keys.get(agent_id)).value)
    assert client._log is not None
    stored = client._log.replay(JobReport.pattern(job_id))
    return [s.event async for s in stored if isinstance(s.event, JobReport)]


async def stored_statuses(client: LaunchClient, job_id: str) -> list[JobStatus]:
    assert client._log is not None
    stored = client._log.replay(JobStatus.pattern(job_id))
    return [s.event async for s in stored if isinstance(s.event, JobStatus)]


def log_text(batches: list[JobLog]) -> list[str]:
    return [line.text for b in batches for line in b.lines]


# -- the proofs -----------------------------------------------------------------------------------------
async def test_job_runs_and_its_logs_arrive(client: LaunchClient) -> None:
    loaded = load_jobspec(EXAMPLE)
    spec = msgspec.structs.replace(loaded.spec, computing=Computing(labels={"pool": "main"}))
    loaded = type(loaded)(spec=spec, path=loaded.path, workspace_dir=loaded.workspace_dir)
    batches: list[JobLog] = []
    states: list[JobState] = []
    job_id = "hello-e2e"
    record = await client.follow(job_id, submit=lambda: client.submit(loaded, job_id=job_id),
                                 on_log=batches.append, on_status=lambda s: states.append(s.state),
                                 timeout=30)
    assert record.state is JobState.SUCCEEDED and record.exit_code == 0, record.reason
    text = log_text(batches)
    assert "hello from fedbus" in text  # hello.py came from the shipped workspace
    assert {"RANK=0", "WORLD_SIZE=1", "LOCAL_RANK=0", f"FEDBUS_JOB_ID={job_id}"} <= set(text)
    assert states[-1] is JobState.SUCCEEDED and JobState.RUNNING in states
    assert log_text([b async for b in client.stored_logs(job_id)]) == text  # `fedbus logs` shows the same


async def test_two_node_job_gets_torchrun_rendezvous(client: LaunchClient) -> None:
    command = ('echo "env $RANK $WORLD_SIZE $LOCAL_RANK $NODE_RANK $MASTER_ADDR:$MASTER_PORT '
               '$CUDA_VISIBLE_DEVICES $FEDBUS_AGENT_ID"')
    spec = job(command, nodes=2, gpus=2, processes_per_node=2)
    batches: list[JobLog] = []
    job_id = "ddp-e2e"
    record = await client.follow(job_id, submit=lambda: client.submit(spec, job_id=job_id),
                                 on_log=batches.append, timeout=30)
    assert record.state is JobState.SUCCEEDED, record.reason
    rows = sorted(line.split()[1:] for line in log_text(batches) if line.startswith("env "))
    assert [r[:4] for r in rows] == [["0", "4", "0", "0"], ["1", "4", "1", "0"], ["2", "4", "0", "1"],
                                     ["3", "4", "1", "1"]]
    assert len({r[4] for r in rows}) == 1 and rows[0][4].endswith(f":{record.master_port}")
    assert {r[5] for r in rows} == {"0,1"}
    by_node = {r[3]: r[6] for r in rows}
    assert sorted(by_node.values()) == ["gpu-a", "gpu-b"] and record.agents == [by_node["0"], by_node["1"]]


async def test_unplaceable_job_says_why_until_cancelled(client: LaunchClient) -> None:
    job_id = "too-big"
    await client.submit(job("true", gpus=8), job_id=job_id)
    seen = await statuses_until(client, job_id, lambda s: "live agents fit" in s.reason)
    reason = seen[-1].reason
    assert seen[-1].state is JobState.QUEUED
    assert "needs 1 node with 8 GPUs" in reason and "gpu-a: has 2 GPUs, needs 8" in reason
    assert (await client.job(job_id)).reason == reason  # `fedbus job` shows it too
    await client.cancel(job_id)
    record = await client.wait(job_id, timeout=10)
    assert record.state is JobState.CANCELLED


def test_malformed_job_file_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("name: demo\njob: python train.py\ncomputing:\n  nodes: 2\n  gpu_per_node: 1\n")
    result = subprocess.run([FEDBUS, "launch", str(bad), "--server", "nats://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    expected = f"'computing.gpu_per_node' in {bad}:5: unknown key (did you mean 'gpus_per_node'?)"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


async def test_forged_award_is_ignored(cluster: Cluster, client: LaunchClient) -> None:
    # Jobs run as `nobody` (the agents run as root): the markers go where that user may write.
    markers = Path(tempfile.mkdtemp(prefix="fedbus-e2e-"))
    markers.chmod(0o777)
    forged_marker, genuine_marker = markers / "forged", markers / "genuine"
    award = JobAward(agent_id="gpu-a", job_id="forged-1", attempt=1, round=1, node_rank=0, nodes=1,
                     master_addr="127.0.0.1", master_port=1, jobspec=JobSpec(job=f"touch {forged_marker}"),
                     accept_by_ns=0)
    mallory = AgentKey.generate()
    async with Bus(transport_for(cluster.url), source="scheduler", key=mallory) as signed_by_mallory, \
            Bus(transport_for(cluster.url), source="scheduler") as unsigned:
        await signed_by_mallory.publish(award)
        await unsigned.publish(msgspec.structs.replace(award, job_id="forged-2"))
    rejected_before = cluster.metrics("gpu-a")
    # A genuine award on the same agent: once it has run, the forged ones before it were handled (dropped).
    spec = JobSpec(job=f"touch {genuine_marker}",
                   computing=Computing(gpus_per_node=1, labels={"pool": "main", "name": "gpu-a"}))
    record = await client.follow("genuine-1", submit=lambda: client.submit(spec, job_id="genuine-1"),
                                 timeout=30)
    assert record.state is JobState.SUCCEEDED and genuine_marker.exists()
    assert not forged_marker.exists()
    shutil.rmtree(markers, ignore_errors=True)
    reports = await stored_reports(client, "*")
    assert [r.phase for r in reports if r.job_id == "genuine-1"] == ["accepted", "running", "exited"]
    assert not [r for r in reports if r.job_id.startswith("forged")]
    assert 'fedbus_bus_rejected{agent_id="gpu-a",kind="gpu"}' in rejected_before
    rejected = float(rejected_before.split('fedbus_bus_rejected{agent_id="gpu-a",kind="gpu"} ')[1].split()[0])
    assert rejected >= 2


async def test_sigkilled_agent_job_completes_on_another_exactly_once(cluster: Cluster,
                                                                    client: LaunchClient) -> None:
    for name in ("gpu-k1", "gpu-k2"):
        cluster.start_agent(name, labels={"pool": "kill"})
    await wait_agents(client, {"gpu-k1", "gpu-k2"})
    job_id = "survivor"
    spec = job('echo "on $FEDBUS_AGENT_ID attempt $FEDBUS_ATTEMPT"; sleep 1.5; echo done', pool="kill",
               retries=2)
    await client.submit(spec, job_id=job_id)
    await statuses_until(client, job_id, lambda s: s.state is JobState.RUNNING)
    victim = (await client.job(job_id)).agents[0]
    cluster.signal(victim, signal.SIGKILL)
    batches: list[JobLog] = []
    record = await client.follow(job_id, on_log=batches.append, timeout=30)
    survivor = ({"gpu-k1", "gpu-k2"} - {victim}).pop()
    assert record.state is JobState.SUCCEEDED, record.reason
    assert (record.attempt, record.agents, record.retries_used) == (2, [survivor], 1)
    assert f"on {survivor} attempt 2" in log_text(batches) and "done" in log_text(batches)
    stored = await stored_statuses(client, job_id)
    assert [s.attempt for s in stored if s.state is JobState.SUCCEEDED] == [2]
    assert any(s.state is JobState.LOST and victim in s.reason for s in stored)
    assert [t.state for t in record.history].count(JobState.SUCCEEDED) == 1


async def test_presumed_dead_agent_cannot_complete_the_rerun(cluster: Cluster, client: LaunchClient) -> None:
    for name in ("gpu-s1", "gpu-s2"):
        cluster.start_agent(name, labels={"pool": "stop"})
    await wait_agents(client, {"gpu-s1", "gpu-s2"})
    job_id = "fenced"
    await client.submit(job("sleep 1.2; echo finished by $FEDBUS_AGENT_ID", pool="stop", retries=1),
                        job_id=job_id)
    await statuses_until(client, job_id, lambda s: s.state is JobState.RUNNING)
    frozen = (await client.job(job_id)).agents[0]
    cluster.signal(frozen, signal.SIGSTOP)  # alive but silent: its lease runs out
    await statuses_until(client, job_id, lambda s: s.state is JobState.AWARDED and s.attempt == 2)
    cluster.signal(frozen, signal.SIGCONT)  # it wakes up and reports attempt 1 as finished
    record = await client.wait(job_id, timeout=30)
    assert record.state is JobState.SUCCEEDED and record.attempt == 2 and record.agents != [frozen]
    stale = [r for r in await stored_reports(client, job_id) if r.attempt == 1 and r.phase == "exited"]
    stored = await stored_statuses(client, job_id)
    assert [s.attempt for s in stored if s.state is JobState.SUCCEEDED] == [2]
    # The frozen agent did report its attempt as done (it is in the stream), and it changed nothing.
    assert stale and stale[0].agent_id == frozen
    metrics = cluster.metrics("scheduler")
    stale_count = metrics.split('fedbus_scheduler_stale_reports{agent_id="scheduler",kind="scheduler"} ')[1]
    assert float(stale_count.split()[0]) >= 1


async def test_scheduler_killed_and_restarted_loses_nothing(cluster: Cluster, client: LaunchClient) -> None:
    await client.submit(job("sleep 1; echo first-done"), job_id="before-crash")
    await statuses_until(client, "before-crash", lambda s: s.state is JobState.RUNNING)
    cluster.signal("scheduler", signal.SIGKILL)
    cluster.procs["scheduler"].wait(10)
    # While it is down: the running job ends (its report waits in the stream) and a new job is submitted.
    async with await client.bus.subscribe(JobLog, key="before-crash") as logs:
        await client.submit(job("echo second-done"), job_id="during-crash")
        async with asyncio.timeout(20):
            while "exited with 0" not in log_text([(await logs.next()).event]):
                pass
    cluster.start_scheduler()
    first = await client.wait("before-crash", timeout=30)
    second = await client.wait("during-crash", timeout=30)
    assert (first.state, first.attempt, first.exit_code) == (JobState.SUCCEEDED, 1, 0)
    assert (second.state, second.attempt) == (JobState.SUCCEEDED, 1)
    for job_id in ("before-crash", "during-crash"):
        stored = await stored_statuses(client, job_id)
        assert [s.state for s in stored].count(JobState.SUCCEEDED) == 1


async def test_sigterm_drains_the_running_job_then_exits_0(cluster: Cluster, client: LaunchClient) -> None:
    cluster.start_agent("gpu-d", labels={"pool": "drain"})
    await wait_agents(client, {"gpu-d"})
    await client.submit(job("sleep 0.8; echo drained", pool="drain"), job_id="drain-me")
    await statuses_until(client, "drain-me", lambda s: s.state is JobState.RUNNING)
    cluster.signal("gpu-d", signal.SIGTERM)
    record = await client.wait("drain-me", timeout=30)
    assert record.state is JobState.SUCCEEDED, record.reason
    assert await asyncio.to_thread(cluster.procs["gpu-d"].wait, 20) == 0
    assert "gpu-d" not in {b.agent_id for b in await client.agents()}

