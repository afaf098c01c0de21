"""Offer → award latency and placements per second with 100 GPU agents, beside the anchors.

    python -m bench.bench_launch [--agents 100] [--jobs 1000] [--hosts 2] [--server nats://...]

An embedded nats-server (unless ``--server``), the real scheduler (``fedbus agent scheduler``, its own
process) and ``--agents`` real :class:`~fedbus.agents.gpu.GpuAgent`\\s spread over ``--hosts`` processes
(several agents per process, each with its own connection, key and heartbeats). Jobs hold their GPUs until
stopped, so every placement is a fresh one (no slot is reused). An observer sees every offer and award on the
bus; latency is the time from a job's first offer to its award as the observer saw them.

- *at rest*: one job at a time (``--probe`` of them): the latency of one placement on an idle cluster;
- *burst*: ``--jobs`` submitted at once: latency under load, and placements per second from the first
  offer to the last award.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fedbus.agents.client import LaunchClient
from fedbus.agents.events import JobAward, JobOffer, JobSubmit
from fedbus.agents.executor import ExitResult, Launch, LineSink
from fedbus.agents.gpu import GpuAgent, GpuAgentConfig
from fedbus.agents.jobspec import Computing, JobSpec
from fedbus.agents.resources import DeclaredResources
from fedbus.agents.runtime import RuntimeConfig, configure_daemon_logging
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.stores import open_stores

from ._table import print_table

FEDBUS = str(Path(sys.executable).parent / "fedbus")


class HoldRunner:
    """Holds its GPUs until stopped: a placement benchmark must not free slots behind its back."""

    async def run(self, launch: Launch, sink: LineSink, *, started: Callable[[], Awaitable[None]],
                  stop: asyncio.Event) -> ExitResult:
        await started()
        await stop.wait()
        return ExitResult(0)


async def host_agents(url: str, first: int, count: int, gpus: int, root: Path) -> None:
    """Run ``count`` GPU agents in this process until SIGTERM."""
    configure_daemon_logging(json_logs=True, level="warning")
    agents = [GpuAgent(RuntimeConfig(server=url, agent_id=f"bench-{i:03d}", state_dir=root / f"bench-{i:03d}",
                                     heartbeat_s=2.0, health_port=None, drain_timeout_s=0.5),
                       GpuAgentConfig(declared=DeclaredResources(gpus=gpus, gpu_model="H100",
                                                                 gpu_memory_gb=80, cpus=64, memory_gb=512,
                                                                 disk_gb=1000),
                                      address="127.0.0.1", price_per_hour=1.0 + (i % 7) / 10),
                       runner=HoldRunner())
              for i in range(first, first + count)]
    async with asyncio.TaskGroup() as tg:
        for agent in agents:
            tg.create_task(agent.start())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)


class Observer:
    """First offer and award time of every job, as seen on the bus."""

    def __init__(self) -> None:
        self.offered: dict[str, float] = {}
        self.awarded: dict[str, float] = {}
        self.all_awarded = asyncio.Event()
        self.expect: set[str] = set()

    async def watch(self, bus: Bus) -> None:
        async with await bus.subscribe("fedbus.jobs.offer.>", max_pending=200_000) as offers, \
                await bus.subscribe(JobAward, max_pending=200_000) as awards:
            async def read_offers() -> None:
                async for d in offers:
                    if isinstance(d.event, JobOffer):
                        self.offered.setdefault(d.event.job_id, time.perf_counter())

            async def read_awards() -> None:
                async for d in awards:
                    self.awarded.setdefault(d.event.job_id, time.perf_counter())
                    if self.expect and self.expect <= self.awarded.keys():
                        self.all_awarded.set()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(read_offers())
                tg.create_task(read_awards())

    def latencies_ms(self, jobs: list[str]) -> list[float]:
        return [(self.awarded[j] - self.offered[j]) * 1000 for j in jobs
                if j in self.awarded and j in self.offered]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p / 100), len(ordered) - 1)]


async def drive(url: str, agents: int, jobs: int, probe: int) -> dict[str, float]:
    spec = JobSpec(job="hold", name="bench", computing=Computing(gpus_per_node=1, cpus_per_node=1))
    observer = Observer()
    async with LaunchClient(url) as client, \
            Bus(transport_for(url), source="bench-observer", security=Security.OFF) as bus:
        deadline = time.monotonic() + 120
        while len([b for b in await client.agents() if b.kind == "gpu" and b.status == "ready"]) < agents:
            if time.monotonic() > deadline:
                raise SystemExit("agents did not come up in 120 s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.5)  # one heartbeat period: the scheduler has seen everyone
        watcher = asyncio.create_task(observer.watch(bus))
        await asyncio.sleep(0.2)
        log = (await open_stores(client.bus)).event_log()
        # At rest: one job at a time.
        rest_ids = [f"rest-{i:04d}" for i in range(probe)]
        for job_id in rest_ids:
            observer.expect = {job_id}
            observer.all_awarded.clear()
            await log.publish(JobSubmit(job_id=job_id, jobspec=spec))
            await asyncio.wait_for(observer.all_awarded.wait(), 30)
        # Burst: every job at once.
        burst_ids = [f"burst-{i:05d}" for i in range(jobs)]
        observer.expect = set(burst_ids)
        observer.all_awarded.clear()
        submitted = time.perf_counter()
        await log.publish_many(JobSubmit(job_id=j, jobspec=spec) for j in burst_ids)
        submit_s = time.perf_counter() - submitted
        try:
            await asyncio.wait_for(observer.all_awarded.wait(), 300)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        first_offer = min(observer.offered[j] for j in burst_ids)
        last_award = max(observer.awarded[j] for j in burst_ids)
    rest = observer.latencies_ms(rest_ids)
    burst = observer.latencies_ms(burst_ids)
    return {
        "rest_p50": statistics.median(rest), "rest_p99": _pct(rest, 99),
        "burst_p50": statistics.median(burst), "burst_p99": _pct(burst, 99),
        "placements_s": len(burst_ids) / (last_award - first_offer),
        "end_to_end_s": len(burst_ids) / (last_award - submitted), "submit_s": submit_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--probe", type=int, default=50, help="jobs placed one at a time (latency at rest)")
    parser.add_argument("--hosts", type=int, default=2, help="processes the agents are spread over")
    parser.add_argument("--server", default=None)
    parser.add_argument("--profile", default="", help="write a cProfile of the scheduler to this file")
    parser.add_argument("--role", choices=["driver", "agents"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.role == "agents":
        asyncio.run(host_agents(args.server, args.first, args.count, args.gpus, Path(args.root)))
        return 0
    gpus = -(-(args.jobs + args.probe) // args.agents) + 1  # enough slots that no job waits for capacity
    with tempfile.TemporaryDirectory(prefix="fedbus-bench-launch-") as tmp:
        root = Path(tmp)
        server = None if args.server else NatsServer(data_dir=root / "nats", mqtt_port=None).start()
        url = args.server or server.url  # type: ignore[union-attr]
        procs: list[subprocess.Popen[bytes]] = []
        env = {**os.environ, "FEDBUS_LOG_LEVEL": "warning"}
        try:
            profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
            procs.append(subprocess.Popen(
                [sys.executable, *profile, FEDBUS, "agent", "scheduler", "--server", url,
                 "--state-dir", str(root / "scheduler"),
                 "--heartbeat", "2", "--json-logs", "--log-level", "warning"], env=env))
            per_host = -(-args.agents // args.hosts)
            for first in range(0, args.agents, per_host):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.bench_launch", "--role", "agents", "--server", url,
                     "--first", str(first), "--count", str(min(per_host, args.agents - first)),
                     "--gpus", str(gpus), "--root", str(root)], env=env))
            result = asyncio.run(drive(url, args.agents, args.jobs, args.probe))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if server is not None:
                server.close()
    print_table(
        f"Launch: offer → award with {args.agents} agents in {args.hosts} processes, "
        f"{args.jobs} jobs ({os.cpu_count()} CPUs, shared)",
        ["system", "award latency p50", "p99", "placements/s"],
        [
            ["fedbus, one job at a time", f"{result['rest_p50']:.1f} ms", f"{result['rest_p99']:.1f} ms",
             "-"],
            [f"fedbus, {args.jobs} at once", f"{result['burst_p50']:.0f} ms", f"{result['burst_p99']:.0f} ms",
             f"{result['placements_s']:.0f} (submit→last award: {result['end_to_end_s']:.0f})"],
            ["goal (issue #3)", "< 20 ms", "-", "> 200"],
            ["FedML (polls every 10 s)", "~5,000 ms", "~10,000 ms", "-"],
            ["Nomad (cluster)", "-", "-", "1,500-3,750"],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
