"""The Launch stage of ``make demo``: a scheduler and a local GPU agent run the hello job and show its logs.

``launch_stage(ctx)`` takes the demo's context (``url``, ``data_dir``, ``say``, ``tally``, ``creds``,
``admin``; see :class:`fedbus.bus.demo.DemoContext`): the scheduler and the agent log in with credentials
issued for their roles, the job is submitted (and signed) as admin, as ``fedbus launch`` does through the
context. ``python -m fedbus.agents.demo`` runs it alone on the secure broker of the demo.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

from fedbus.bus.creds import Credentials
from fedbus.bus.roles import Role

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

    @property
    def admin(self) -> Credentials: ...

    async def creds(self, *wanted: tuple[Role | str, str]) -> list[Credentials]: ...


async def launch_stage(ctx: StageContext, *, job_file: Path = HELLO_JOB, timeout: float = 30.0) -> list[str]:
    """Start a scheduler and a GPU agent on ``ctx.url``, launch ``job_file``, tell the story; returns the
    job's output lines. Raises ``TimeoutError`` if the job has not ended after ``timeout`` seconds."""
    root = Path(ctx.data_dir) / "launch"
    fast = {"heartbeat_s": 0.5, "health_port": None}
    scheduler_creds, gpu_creds = await ctx.creds(("scheduler", "scheduler"), ("gpu-agent", "gpu-1"))
    # With credentials each agent is its credential's id, and trusts the scheduler the authority registered.
    scheduler = SchedulerAgent(RuntimeConfig(server=ctx.url, state_dir=root / "scheduler", creds=scheduler_creds,
                                             **fast),  # type: ignore[arg-type]
                               SchedulerAgentConfig(scheduling=SchedulerConfig(warmup_s=0.6)))
    lines: list[str] = []
    async with scheduler:
        # As root, jobs run as `nobody` (the secure default). The hello job needs only a `python3` on the PATH
        # that `nobody` can run (/usr/bin/python3; a pyenv shim under a 0700 /root is skipped). A job that runs
        # "$FEDBUS_PYTHON" (this venv's interpreter, which may live under /root) would need
        # GpuAgentConfig(job_user=<the agent's own user>), as examples/fl-launch/README.md explains.
        gpu = GpuAgent(RuntimeConfig(server=ctx.url, state_dir=root / "gpu-1", creds=gpu_creds,
                                     **fast),  # type: ignore[arg-type]
                       GpuAgentConfig(address="127.0.0.1", scheduler_id=scheduler_creds.id))
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

            async with LaunchClient(ctx.url, creds=ctx.admin) as client:  # submits are signed by admin
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


def main() -> int:
    """Run the stage alone on the demo's secure broker."""
    from fedbus.bus.console import configure_logging, out
    from fedbus.bus.demo import DemoContext
    from fedbus.bus.demo_broker import DemoBroker

    configure_logging()
    with tempfile.TemporaryDirectory(prefix="fedbus-launch-demo-") as tmp, \
            DemoBroker(Path(tmp) / "broker", mqtt=False) as broker:
        ctx = DemoContext(url=broker.url, mqtt_url=None, console=out, data_dir=Path(tmp), broker=broker)

        async def provision_and_launch() -> list[str]:
            await broker.provision()
            return await launch_stage(ctx)

        lines = asyncio.run(provision_and_launch())
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
