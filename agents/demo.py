"""The Launch stage of ``make demo``: a scheduler and a local GPU agent run the hello job and show its logs.

``launch_stage(ctx)`` takes the demo's context (``url``, ``data_dir``, ``say``, ``tally``; see
:class:`fedbus.bus.demo.DemoContext`). ``python -m fedbus.agents.demo`` runs it alone on an embedded broker.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

from .client import LaunchClient
from .events import JobLog, JobState, JobStatus
from .gpu import GpuAgent, GpuAgentConfig
from .jobspec import load_jobspec
from .runtime import RuntimeConfig
from .scheduler import SchedulerAgent, SchedulerAgentConfig
from .scheduling import SchedulerConfig

__all__ = ["HELLO_JOB", "STAGES", "demo_stage", "launch_stage"]

HELLO_JOB = Path(__file__).resolve().parent.parent / "examples" / "hello-job" / "job.yaml"


class StageContext(Protocol):
    url: str
    data_dir: Path
    tally: Counter[str]

    def say(self, who: str, what: str, *, style: str = "") -> None: ...


async def launch_stage(ctx: StageContext, *, job_file: Path = HELLO_JOB, timeout: float = 30.0) -> list[str]:
    """Start a scheduler and a GPU agent on ``ctx.url``, launch ``job_file``, tell the story; returns the
    job's output lines. Raises ``TimeoutError`` if the job has not ended after ``timeout`` seconds."""
    root = Path(ctx.data_dir) / "launch"
    fast = {"heartbeat_s": 0.5, "health_port": None}
    scheduler = SchedulerAgent(RuntimeConfig(server=ctx.url, state_dir=root / "scheduler",
                                             agent_id="scheduler", **fast),  # type: ignore[arg-type]
                               SchedulerAgentConfig(scheduling=SchedulerConfig(warmup_s=0.6)))
    lines: list[str] = []
    async with scheduler:
        trust = (root / "scheduler" / "public_key.json",)  # pinned: the agent trusts exactly this scheduler
        gpu = GpuAgent(RuntimeConfig(server=ctx.url, state_dir=root / "gpu-1", agent_id="gpu-1", trust=trust,
                                     **fast),  # type: ignore[arg-type]
                       GpuAgentConfig(address="127.0.0.1"))
        async with gpu:
            cap, res = gpu.capacity(), gpu.resources
            assert cap is not None and res is not None
            model = f" {cap.gpu_model}" if cap.gpu_model else ""
            ctx.say("gpu-1", f"up: {cap.gpus} GPU(s){model} (found by {res.gpu_source}), {cap.cpus:g} CPUs, "
                             f"{cap.memory_gb:g} GB memory")
            loaded = load_jobspec(job_file)
            started = time.monotonic()

            def on_status(status: JobStatus) -> None:
                ctx.say("scheduler", f"{status.job_id} {status.state.value}: {status.reason}",
                        style="green" if status.state is JobState.SUCCEEDED else "")

            def on_log(batch: JobLog) -> None:
                for line in batch.lines:
                    if line.stream != "system":
                        lines.append(line.text)
                        ctx.say(batch.agent_id, line.text, style="dim" if line.stream == "stderr" else "")

            async with LaunchClient(ctx.url) as client:
                job_id = "hello-demo-" + str(int(time.time()))
                record = await client.follow(job_id, submit=lambda: client.submit(loaded, job_id=job_id),
                                             on_status=on_status, on_log=on_log, timeout=timeout)
            ctx.tally["jobs launched"] += 1
            ctx.tally[f"jobs {record.state.value}"] += 1
            ctx.say("cli", f"{job_id} ended {record.state.value} (exit {record.exit_code}) in "
                           f"{time.monotonic() - started:.2f}s; {len(lines)} log lines")
    return lines


demo_stage = launch_stage
"""The name the demo's stage list may use."""


async def _launch(ctx: StageContext) -> None:
    await launch_stage(ctx)


#: Registered under the ``fedbus.demo`` entry point group: ``make demo`` runs these after the bus's stages.
STAGES = [("Launch: a job on a local GPU agent", _launch, 60.0)]


class _Console:
    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir, self.tally = url, data_dir, Counter[str]()
        self.started = time.monotonic()

    def say(self, who: str, what: str, *, style: str = "") -> None:
        from fedbus.bus.console import out

        out.print(f"  {time.monotonic() - self.started:6.2f}s  {who:<10} {what}", style=style, markup=False)


def main() -> int:
    """Run the stage alone on an embedded broker."""
    from fedbus.bus.broker import NatsServer
    from fedbus.bus.console import configure_logging

    configure_logging()
    with tempfile.TemporaryDirectory(prefix="fedbus-launch-demo-") as tmp, \
            NatsServer(data_dir=Path(tmp) / "nats", mqtt_port=None) as server:
        lines = asyncio.run(launch_stage(_Console(server.url, Path(tmp))))
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
