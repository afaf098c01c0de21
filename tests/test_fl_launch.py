"""A federation launched through the scheduler, end to end: a real nats-server, the scheduler and three GPU
agents as real ``fedbus agent`` processes, and ``fedbus launch examples/fl-launch/job.yaml --follow``.

The job places three nodes (of four agents); node 0 runs ``fedbus agent aggregator``, nodes 1 and 2 run
``fedbus fl client``. The agents are started without ``FEDBUS_SERVER`` and with a ``PATH`` that lacks the venv's
``bin``: the job finds the broker and fedbus only through what its agent injects (``FEDBUS_SERVER``,
``FEDBUS_PYTHON``). The federation's outcome is read off the bus, as any observer would see it. Then the
aggregator's node dies mid-run: the job runs again on the three others and the aggregator resumes the run.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.agents.client import LaunchClient
from fedbus.agents.events import JobState, JobStatus
from fedbus.agents.executor import reap_orphans
from fedbus.agents.jobspec import load_jobspec
from fedbus.aggregator.events import GlobalModel, RoundClose, RunFinished
from fedbus.bus.broker import NatsServer, free_port
from fedbus.bus.client import Bus
from fedbus.bus.connect import transport_for

pytestmark = pytest.mark.slow

FEDBUS = str(Path(sys.executable).parent / "fedbus")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fl-launch" / "job.yaml"
AGENTS = ("node-a", "node-b", "node-c", "node-d")
FAST = ["--heartbeat", "0.2", "--json-logs", "--log-level", "info"]
# Jobs here run "$FEDBUS_PYTHON", the venv's interpreter, which may live where an unprivileged job user cannot
# reach it (a pyenv under a 0700 /root): they run as the agents' own user, an explicit opt-out of `nobody`.
JOB_USER = ["--job-user", pwd.getpwuid(os.geteuid()).pw_name]


class Cluster:
    """The scheduler and the agents, as processes; their output goes to log files under ``root``."""

    def __init__(self, server: NatsServer, root: Path) -> None:
        self.url = server.url
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # What a node's daemon would have: no broker in the environment, fedbus not on PATH.
        self.env = {k: v for k, v in os.environ.items() if k != "FEDBUS_SERVER"}
        self.env["PATH"] = "/usr/bin:/bin"

    def spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [FEDBUS, *args, "--server", self.url, "--state-dir", str(self.root / name),
                 "--health-port", str(free_port()), *FAST],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.root / f'{name}.log').read_text(errors='replace')[-2000:]}"
                         for name in self.procs)

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
    root = tmp_path_factory.mktemp("fl-launch")
    with NatsServer(data_dir=root / "nats", mqtt_port=None) as server:
        c = Cluster(server, root)
        try:
            c.spawn("scheduler", ["agent", "scheduler", "--lease", "3", "--bid-window", "0.3",
                                  "--backoff", "0.2"])
            for name in AGENTS:
                c.spawn(name, ["agent", "gpu", "--agent-id", name, "--gpus", "0", "--cpus", "2",
                               "--memory-gb", "4", "--disk-gb", "10", *JOB_USER])
            yield c
        finally:
            c.close()


async def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Until the scheduler's key is registered and every agent is live (as ``fedbus launch`` needs)."""
    async with asyncio.timeout(timeout):
        while True:
            async with LaunchClient(url) as probe:
                live = {b.agent_id for b in await probe.agents() if b.status == "ready"}
                if len(probe.keyring) and {*AGENTS, "scheduler"} <= live:
                    return
            await asyncio.sleep(0.2)


async def test_federation_launched_through_the_scheduler(cluster: Cluster) -> None:
    await wait_ready(cluster.url)
    async with Bus(transport_for(cluster.url), source="observer") as bus, \
            await bus.subscribe(RunFinished) as finished, await bus.subscribe(GlobalModel) as models:
        await bus.transport.flush()
        launch = await asyncio.create_subprocess_exec(
            FEDBUS, "launch", str(EXAMPLE), "--follow", "--timeout", "120", "--server", cluster.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(150):
                out_b, err_b = await launch.communicate()
        finally:
            if launch.returncode is None:
                launch.send_signal(signal.SIGKILL)
                await launch.wait()
        out, err = out_b.decode(), err_b.decode()
        assert launch.returncode == 0, f"{err[-3000:]}\n{out[-3000:]}\n{cluster.logs()}"
        job_id = re.search(r"job (fl-launch-\S+) submitted", err)
        assert job_id is not None, err
        run_id = job_id.group(1)  # the job's bootstrap made the job id the run id

        async with asyncio.timeout(10):
            done = (await finished.next()).event
        assert (done.run_id, done.status, done.rounds, done.version) == (run_id, "ok", 3, 3)
        assert done.metrics["clients"] == 2 and done.metrics["eval_accuracy"] > 0.8, done.metrics
        assert done.model is not None and done.model.length == 64 * 10 + 10  # logreg on 8x8 digits
        versions: list[int] = []
        async with asyncio.timeout(10):
            while len(versions) < 3:
                model = (await models.next()).event
                assert model.run_id == run_id
                versions.append(model.version)
        assert versions == [1, 2, 3]

    # The aggregator ran on one node, a client on each of the two others; their output came back as logs.
    lines = out.splitlines()
    for index in range(2):
        assert any(f"client-{index:04d}: finished, 3 fits, 3 evaluations" in line for line in lines), out
    nodes = {m.group(1) for m in re.finditer(r"^\[(node-[a-d]) r\d\]", out, re.MULTILINE)}
    assert len(nodes) == 3 and nodes <= set(AGENTS)
    assert "final metrics (version 3, 3 rounds)" in out  # the aggregator's report
    assert "succeeded" in err


async def test_aggregator_node_lost_mid_run_the_job_reruns_and_the_run_resumes(cluster: Cluster) -> None:
    await wait_ready(cluster.url)
    job_id = "fl-retry"  # the run id too
    async with LaunchClient(cluster.url) as client, \
            Bus(transport_for(cluster.url), source="observer") as bus, \
            await bus.subscribe(RunFinished, key=job_id) as finished, \
            await bus.subscribe(GlobalModel, key=job_id) as models, \
            await bus.subscribe(RoundClose, key=job_id) as closes, \
            await client.bus.subscribe(JobStatus, key=job_id) as statuses:
        await bus.transport.flush()
        await client.submit(load_jobspec(EXAMPLE), job_id=job_id)
        async with asyncio.timeout(90):  # round 1 is over and checkpointed (its summary comes after)
            while (close := (await closes.next()).event).kind != "summary":
                pass
        assert (close.round, close.version) == (1, 1)
        # The aggregator's machine dies: its agent and everything the job ran there, at once.
        victim = (await client.job(job_id)).agents[0]
        cluster.procs[victim].kill()
        cluster.procs[victim].wait()
        assert reap_orphans(cluster.root / victim / "pids") == 1
        async with asyncio.timeout(30):
            while (status := (await statuses.next()).event).state is not JobState.LOST:
                pass
        assert victim in status.reason
        record = await client.wait(job_id, timeout=120)
        if record.state is not JobState.SUCCEEDED:
            text = [f"[{b.agent_id} a{b.attempt} r{line.rank}] {line.text}"
                    async for b in client.stored_logs(job_id) for line in b.lines]
            pytest.fail(f"{record.reason}\n" + "\n".join(text[-80:]))
        assert record.attempt == 2 and victim not in record.agents
        async with asyncio.timeout(10):
            done = (await finished.next()).event
        assert (done.status, done.rounds, done.version) == ("ok", 3, 3)
        assert done.metrics["eval_accuracy"] > 0.8, done.metrics
        versions: list[int] = []
        async with asyncio.timeout(10):
            while not versions or versions[-1] != 3:
                versions.append((await models.next()).event.version)
        # Resumed from round 2's checkpoint: version 1 was made once, by the first attempt.
        assert versions[0] == 1 and 1 not in versions[1:] and versions[-1] == 3, versions
