"""A scheduler and GPU agents in one process on an in-memory broker: pinned trust, refusals, reservations."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedbus.agents.client import LaunchClient
from fedbus.agents.events import JobBid, JobState, JobStatus
from fedbus.agents.gpu import GpuAgent, GpuAgentConfig
from fedbus.agents.jobspec import Computing, JobSpec
from fedbus.agents.resources import DeclaredResources
from fedbus.agents.runtime import RuntimeConfig
from fedbus.agents.scheduler import SchedulerAgent, SchedulerAgentConfig
from fedbus.agents.scheduling import SchedulerConfig
from fedbus.bus.memory import MemoryBroker, MemoryTransport


def _scheduler(root: Path, broker: MemoryBroker) -> SchedulerAgent:
    return SchedulerAgent(RuntimeConfig(state_dir=root / "scheduler", agent_id="scheduler", heartbeat_s=0.1,
                                        health_port=None),
                          SchedulerAgentConfig(scheduling=SchedulerConfig(warmup_s=0.2)),
                          transport=MemoryTransport(broker))


def _gpu(root: Path, broker: MemoryBroker, name: str, *, gpus: int = 1, trust: tuple[Path, ...] = (),
         heartbeat_s: float = 0.1) -> GpuAgent:
    return GpuAgent(RuntimeConfig(state_dir=root / name, agent_id=name, heartbeat_s=heartbeat_s,
                                  health_port=None, trust=trust),
                    GpuAgentConfig(declared=DeclaredResources(gpus=gpus, cpus=2, memory_gb=4, disk_gb=10),
                                   address="127.0.0.1"),
                    transport=MemoryTransport(broker))


async def test_agent_with_a_trust_file_runs_the_scheduler_awards(tmp_path: Path) -> None:
    broker = MemoryBroker()
    scheduler = _scheduler(tmp_path, broker)
    trust = tmp_path / "scheduler" / "public_key.json"
    async with scheduler:
        assert trust.exists()
        async with _gpu(tmp_path, broker, "gpu-1", trust=(trust,)) as gpu, \
                LaunchClient(transport=MemoryTransport(broker)) as client:
            assert gpu.scheduler_trust is not None and gpu.scheduler_trust.kids == {scheduler.key.kid}
            assert not (tmp_path / "gpu-1" / "trusted_keys.json").exists()  # nothing pinned on first use
            spec = JobSpec(job="echo ok", computing=Computing(gpus_per_node=1))
            record = await client.follow("j1", submit=lambda: client.submit(spec, job_id="j1"), timeout=20)
            assert record.state is JobState.SUCCEEDED and record.agents == ["gpu-1"]


async def test_busy_agent_refuses_and_the_job_goes_to_the_next(tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with _scheduler(tmp_path, broker), _gpu(tmp_path, broker, "gpu-a", heartbeat_s=5) as a, \
            _gpu(tmp_path, broker, "gpu-b", gpus=2) as b, \
            LaunchClient(transport=MemoryTransport(broker)) as client:
        for agent in (a, b):  # bids are signed: the watcher verifies them with the agents' keys
            client.keyring.trust(agent.key.public_raw)
        # Something takes gpu-a's only GPU after its heartbeat: its ledger knows, the scheduler's view not.
        assert a.ledger is not None
        a.ledger.reserve("outside", Computing(gpus_per_node=1), expires=1e12, now=0.0)
        refusals: list[JobBid] = []
        async with await client.bus.subscribe(JobBid) as bids:
            async def watch() -> None:
                async for d in bids:
                    if not d.event.ok:
                        refusals.append(d.event)

            watcher = asyncio.create_task(watch())
            spec = JobSpec(job="true", computing=Computing(gpus_per_node=1))
            record = await client.follow("j2", submit=lambda: client.submit(spec, job_id="j2"), timeout=20,
                                         logs=False)
            watcher.cancel()
        assert record.state is JobState.SUCCEEDED and record.agents == ["gpu-b"]
        assert [(r.agent_id, r.reason) for r in refusals] == [("gpu-a", "0 of 1 GPUs free, needs 1")]


async def test_agent_shut_down_before_its_job_ends_gives_it_back(tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with _scheduler(tmp_path, broker), LaunchClient(transport=MemoryTransport(broker)) as client:
        gpu = GpuAgent(RuntimeConfig(state_dir=tmp_path / "gpu-x", agent_id="gpu-x", heartbeat_s=0.1,
                                     health_port=None, drain_timeout_s=0.3),
                       GpuAgentConfig(declared=DeclaredResources(gpus=1, cpus=2, memory_gb=4, disk_gb=10),
                                      address="127.0.0.1", stop_grace_s=0.5),
                       transport=MemoryTransport(broker))
        async with gpu:
            spec = JobSpec(job="sleep 30", retries=1, computing=Computing(gpus_per_node=1))
            async with await client.bus.subscribe(JobStatus, key="long") as statuses:
                await client.submit(spec, job_id="long")
                while (await statuses.next(timeout=20)).event.state is not JobState.RUNNING:
                    pass
        # The drain timed out: the job was stopped and reported lost, so it waits for a node to run again.
        record = await client.job("long")
        assert record.state is JobState.QUEUED and record.retries_used == 1
        assert "gpu-x gave the job up" in record.history[-2].reason
