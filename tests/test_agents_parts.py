"""The GPU agent's parts on their own: job files, the ledger, the runner, workspaces, logs, metrics."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fedbus import agents
from fedbus.agents.errors import JobSpecError, WorkspaceError
from fedbus.agents.events import JobLog
from fedbus.agents.executor import Launch, SubprocessRunner, agent_env, reap_orphans
from fedbus.agents.gpu import GpuAgent
from fedbus.agents.jobspec import Computing, JobSpec, load_jobspec, parse_jobspec
from fedbus.agents.ledger import Ledger
from fedbus.agents.logship import LogShipper
from fedbus.agents.metrics import Metrics
from fedbus.agents.resources import DeclaredResources, detect_resources
from fedbus.agents.runtime import RuntimeConfig
from fedbus.agents.workspace import pack, unpack

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-job" / "job.yaml"


# -- job files ------------------------------------------------------------------------------------------
def test_example_job_file_is_valid() -> None:
    loaded = load_jobspec(EXAMPLE)
    assert loaded.spec.name == "hello" and loaded.workspace_dir == EXAMPLE.parent
    assert (loaded.workspace_dir / "hello.py").exists()


@pytest.mark.parametrize(("text", "key", "line", "words"), [
    ("job: x\ncomputing:\n  nodes: 0\n", "computing.nodes", 3, ">= 1"),
    ("job: x\ncomputing:\n  gpu_per_node: 2\n", "computing.gpu_per_node", 3, "did you mean 'gpus_per_node'"),
    ("jbo: x\n", "jbo", 1, "did you mean 'job'"),
    ("name: x\n", "job", None, "required"),
    ("job: x\nretries: many\n", "retries", 2, "Expected `int`"),
    ("job: x\nenv:\n  9LIVES: 1\n", "env", 2, "not a valid shell name"),
    ("job: [unclosed\n", None, 2, "not valid YAML"),
    ("- a list\n", None, 1, "mapping"),
])
def test_malformed_job_files_point_at_the_key_and_line(text: str, key: str | None, line: int | None,
                                                        words: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_jobspec(text, source="job.yaml")
    err = info.value
    assert (err.key, err.line) == (key, line) and words in str(err)
    if line:
        assert f"job.yaml:{line}" in str(err)


def test_fedml_aliases_and_env_scalars() -> None:
    spec = parse_jobspec("job: x\ncomputing: {minimum_num_gpus: 2, maximum_cost_per_hour: 3}\n"
                         "env: {EPOCHS: 3, DEBUG: true}\njob_type: train\n")
    assert spec.computing.gpus_per_node == 2 and spec.computing.max_cost_per_hour == 3
    assert spec.env == {"EPOCHS": "3", "DEBUG": "true"}


def test_missing_workspace_folder(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("job: x\nworkspace: nowhere\n")
    with pytest.raises(JobSpecError, match="does not exist") as info:
        load_jobspec(tmp_path / "job.yaml")
    assert info.value.line == 2


# -- ledger ---------------------------------------------------------------------------------------------
def _ledger(gpus: int = 2) -> Ledger:
    res = detect_resources(DeclaredResources(gpus=gpus, gpu_model="A100", cpus=4, memory_gb=16, disk_gb=100),
                           work_dir=Path("."))
    return Ledger(res, price_per_hour=2.0)


def test_ledger_reserves_distinct_gpus_and_expires_reservations() -> None:
    ledger = _ledger()
    one = Computing(gpus_per_node=1)
    a = ledger.reserve("a", one, expires=10.0, now=0.0)
    b = ledger.reserve("b", one, expires=10.0, now=0.0)
    assert not isinstance(a, str) and not isinstance(b, str)
    assert (a.gpu_ids, b.gpu_ids) == ((0,), (1,))
    assert ledger.reserve("c", one, expires=10.0, now=0.0) == "0 of 2 GPUs free, needs 1"
    assert ledger.capacity(11.0).free_gpus == 2  # reservations lapse without an award
    held = ledger.confirm("c", 1, one, now=11.0)  # an award after the lapse reserves afresh
    assert not isinstance(held, str) and ledger.held()[0].job_id == "c"
    assert ledger.capacity(100.0).free_gpus == 1  # holds do not expire
    assert isinstance(ledger.confirm("c", 2, one, now=100.0), str)  # one attempt at a time
    ledger.release("c", 1)
    assert ledger.capacity(100.0).free_gpus == 2


# -- the runner -----------------------------------------------------------------------------------------
def _launch(tmp_path: Path, spec: JobSpec, **kw: object) -> Launch:
    base: dict[str, object] = {"job_id": "j", "attempt": 3, "agent_id": "gpu-9", "node_rank": 1, "nodes": 2,
                               "master_addr": "10.1.1.1", "master_port": 29500, "spec": spec, "gpu_ids": (2, 3),
                               "workdir": tmp_path}
    base.update(kw)
    return Launch(**base)  # type: ignore[arg-type]


async def test_runner_sets_rendezvous_env_per_process(tmp_path: Path) -> None:
    lines: list[tuple[str, int, str]] = []
    started = asyncio.Event()

    async def on_start() -> None:
        started.set()

    spec = JobSpec(job='echo "$RANK/$WORLD_SIZE local=$LOCAL_RANK node=$NODE_RANK cvd=$CUDA_VISIBLE_DEVICES '
                       '$MASTER_ADDR:$MASTER_PORT $FEDBUS_ATTEMPT $X"; echo oops >&2',
                   bootstrap="echo boot > made-by-bootstrap", env={"X": "y"}, processes_per_node=2)
    result = await SubprocessRunner(grace_s=1).run(_launch(tmp_path, spec), lambda *a: lines.append(a),
                                                   started=on_start, stop=asyncio.Event())
    assert result.code == 0 and started.is_set() and (tmp_path / "made-by-bootstrap").exists()
    out = sorted(text for stream, _, text in lines if stream == "stdout")
    assert out == ["2/4 local=0 node=1 cvd=2,3 10.1.1.1:29500 3 y",
                   "3/4 local=1 node=1 cvd=2,3 10.1.1.1:29500 3 y"]
    assert sorted(rank for stream, rank, _ in lines if stream == "stderr") == [2, 3]


async def test_jobs_get_the_agents_broker_and_python_unless_their_env_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_SERVER", "nats://from-the-agents-own-environ:1")  # the agent's --server wins
    lines: list[tuple[str, int, str]] = []

    async def nothing() -> None:
        return None

    runner = SubprocessRunner(grace_s=1, env=agent_env("nats://10.0.0.5:4222", python="/opt/py/bin/python"))
    command = 'echo "$FEDBUS_SERVER $FEDBUS_PYTHON"'
    for spec in (JobSpec(job=command), JobSpec(job=command, env={"FEDBUS_SERVER": "nats://mine:4222"})):
        result = await runner.run(_launch(tmp_path, spec), lambda *a: lines.append(a), started=nothing,
                                  stop=asyncio.Event())
        assert result.code == 0
    assert [text for stream, _, text in lines if stream == "stdout"] == [
        "nats://10.0.0.5:4222 /opt/py/bin/python", "nats://mine:4222 /opt/py/bin/python"]
    assert agent_env("nats://b:1") == {"FEDBUS_SERVER": "nats://b:1", "FEDBUS_PYTHON": sys.executable}
    # The GPU agent hands its jobs the URL it connects to itself.
    gpu = GpuAgent(RuntimeConfig(server="nats://broker.example:4333", state_dir=tmp_path / "agent"))
    assert isinstance(gpu.runner, SubprocessRunner)
    assert gpu.runner.env == agent_env("nats://broker.example:4333")


async def test_runner_failures_stop_and_timeout(tmp_path: Path) -> None:
    sink = lambda *a: None

    async def nothing() -> None:
        return None

    runner = SubprocessRunner(grace_s=0.3)
    failed = await runner.run(_launch(tmp_path, JobSpec(job="exit 7", bootstrap="exit 5")), sink,
                              started=nothing, stop=asyncio.Event())
    assert failed.code == 5 and "bootstrap" in failed.reason
    # One rank failing stops its siblings (which would otherwise sleep for a minute).
    spec = JobSpec(job='if [ "$LOCAL_RANK" = 1 ]; then exit 9; fi; sleep 60', processes_per_node=2)
    failed = await asyncio.wait_for(runner.run(_launch(tmp_path, spec), sink, started=nothing,
                                               stop=asyncio.Event()), 10)
    assert failed.code == 9 and "rank 3" in failed.reason
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(_launch(tmp_path, JobSpec(job="trap '' TERM; sleep 60")), sink,
                                          started=nothing, stop=stop))
    await asyncio.sleep(0.2)
    stop.set()
    stopped = await asyncio.wait_for(task, 10)  # SIGTERM ignored: SIGKILL after the grace period
    assert stopped.code == 143 and stopped.reason == "stopped"
    timed = await asyncio.wait_for(runner.run(_launch(tmp_path, JobSpec(job="sleep 60", timeout_s=0.2)), sink,
                                              started=nothing, stop=asyncio.Event()), 10)
    assert timed.code == 124


# -- workspaces -----------------------------------------------------------------------------------------
async def test_workspace_round_trip_skips_caches(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    archive = await pack(src)
    try:
        await unpack(archive, tmp_path / "dst")
    finally:
        archive.unlink()
    assert (tmp_path / "dst" / "pkg" / "train.py").read_text() == "print('hi')\n"
    assert not (tmp_path / "dst" / ".git").exists()
    assert not (tmp_path / "dst" / "pkg" / "__pycache__").exists()


async def test_workspace_cannot_escape_its_folder(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("../outside.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(WorkspaceError):
        await unpack(archive, tmp_path / "dst")
    assert not (tmp_path / "outside.txt").exists()


# -- logs and metrics -----------------------------------------------------------------------------------
async def test_log_shipper_batches_and_counts_drops() -> None:
    sent: list[JobLog] = []

    async def publish(batch: JobLog) -> None:
        sent.append(batch)

    shipper = LogShipper(publish, job_id="j", attempt=1, agent_id="a", node_rank=0, max_lines=3,
                         max_pending=5)
    for i in range(7):
        shipper.line("stdout", 0, f"line {i}")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(shipper.run())
        shipper.close()
    assert [len(b.lines) for b in sent] == [3, 2] and sum(b.dropped for b in sent) == 2
    assert [b.seq for b in sent] == [1, 2] and sent[0].lines[0].text == "line 0"


def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics(const_labels={"agent_id": "gpu-1"})
    metrics.counter("jobs_total", "jobs run")
    metrics.inc("jobs_total", state="ok")
    metrics.inc("jobs_total", state="ok")
    metrics.set("free_gpus", 3)
    text = metrics.render()
    assert "# TYPE fedbus_jobs_total counter" in text
    assert 'fedbus_jobs_total{agent_id="gpu-1",state="ok"} 2' in text
    assert 'fedbus_free_gpus{agent_id="gpu-1"} 3' in text


def test_reap_orphans_kills_only_the_job_groups_left_behind(tmp_path: Path) -> None:
    workdir, elsewhere = tmp_path / "job-1", tmp_path / "other"
    workdir.mkdir()
    elsewhere.mkdir()
    orphan = subprocess.Popen(["sleep", "60"], cwd=workdir, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], cwd=elsewhere, start_new_session=True)
    try:
        pids = tmp_path / "pids"
        pids.mkdir()
        # The bystander's pid is recorded with another work dir: as if the pid had been recycled.
        (pids / "job-1.pgids").write_text(f"{orphan.pid} {workdir}\n{bystander.pid} {workdir}\n")
        assert reap_orphans(pids) == 1
        assert orphan.wait(10) == -9
        assert bystander.poll() is None and not list(pids.iterdir())
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()


def test_public_api_is_pinned_and_torch_free() -> None:
    assert sorted(agents.__all__) == agents.__all__ and all(hasattr(agents, name) for name in agents.__all__)
    assert {"GpuAgent", "SchedulerAgent", "LaunchClient", "JobSpec", "SchedulingCore"} <= set(agents.__all__)
    probe = "import sys, fedbus.agents, fedbus.agents.commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out == "False\n"
