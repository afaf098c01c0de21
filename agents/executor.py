"""Running one node of a job: ``bootstrap``, then ``job`` (``processes_per_node`` copies), as subprocesses.

Each command runs through ``bash -c`` in its own process group (``start_new_session``), as the job's user
(:class:`~fedbus.agents.jobhost.JobUser`: never root when the agent is root), with the agent's environment
scrubbed of its secrets (:func:`~fedbus.agents.jobhost.scrub_env`), the agent's defaults for every job
(:func:`agent_env`: the broker URL and the agent's Python), the job's env over them, torchrun-style
rendezvous variables and ``CUDA_VISIBLE_DEVICES``. Output lines go to a sink as they come.
When one copy of ``job`` fails, the others are stopped (as torchrun does). Stopping is SIGTERM to the whole
group, then SIGKILL after the grace period; whatever is left of a group is killed when it ends, so no
stray process outlives its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from .jobhost import JobUser, scrub_env
from .jobspec import JobSpec

__all__ = ["ExitResult", "InstantRunner", "Launch", "LineSink", "Runner", "SubprocessRunner",
           "agent_env", "reap_orphans", "rendezvous_env"]

log = structlog.get_logger("fedbus.agents.executor")

LineSink = Callable[[str, int, str], None]
"""Called with ``(stream, rank, text)`` for every output line; must not block."""

_MAX_LINE = 16 * 1024
_STOPPED = 128 + signal.SIGTERM


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """Everything needed to start one node of one job attempt."""

    job_id: str
    attempt: int
    agent_id: str
    node_rank: int
    nodes: int
    master_addr: str
    master_port: int
    spec: JobSpec
    gpu_ids: tuple[int, ...]
    workdir: Path


@dataclass(frozen=True, slots=True)
class ExitResult:
    """How a node's part of a job ended: a shell-style exit code (128+N for signal N) and why."""

    code: int
    reason: str = ""


class Runner(Protocol):
    """Runs one node of a job until it ends or ``stop`` is set."""

    async def run(self, launch: Launch, sink: LineSink, *, started: Callable[[], Awaitable[None]],
                  stop: asyncio.Event) -> ExitResult: ...


def rendezvous_env(launch: Launch, local_rank: int) -> dict[str, str]:
    """The variables torchrun would set for this process, plus fedbus's own."""
    ppn = launch.spec.processes_per_node
    return {
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(launch.master_port),
        "WORLD_SIZE": str(launch.nodes * ppn),
        "RANK": str(launch.node_rank * ppn + local_rank),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(ppn),
        "NODE_RANK": str(launch.node_rank),
        "GROUP_RANK": str(launch.node_rank),
        "NNODES": str(launch.nodes),
        "NPROC_PER_NODE": str(ppn),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in launch.gpu_ids),
        "FEDBUS_JOB_ID": launch.job_id,
        "FEDBUS_ATTEMPT": str(launch.attempt),
        "FEDBUS_AGENT_ID": launch.agent_id,
        "FEDBUS_WORKDIR": str(launch.workdir),
    }


def agent_env(server: str, *, python: str | None = None) -> dict[str, str]:
    """What an agent tells every job it runs: ``FEDBUS_SERVER`` (the broker URL the agent itself uses) and
    ``FEDBUS_PYTHON`` (the agent's interpreter, so ``"$FEDBUS_PYTHON" -m fedbus.bus.cli`` runs the same
    fedbus even when its ``bin`` folder is not on the job's ``PATH``). A job's own ``env`` overrides both."""
    return {"FEDBUS_SERVER": server, "FEDBUS_PYTHON": python or sys.executable}


def _code(returncode: int | None) -> int:
    if returncode is None:
        return _STOPPED
    return 128 - returncode if returncode < 0 else returncode


class SubprocessRunner:
    """The real runner: subprocesses in their own process groups.

    With ``pid_dir``, the process groups of each running job are written there, so that an agent killed
    with SIGKILL can reap what it left behind when it starts again (:func:`reap_orphans`). ``env`` is set
    for every job (usually :func:`agent_env`), over the agent's own environment (scrubbed: nothing secret, no
    value naming a ``secret_paths`` entry) and under the job's ``env``. With a ``user`` other than the
    agent's, processes run as that user, its primary group and no supplementary groups.
    """

    def __init__(self, *, grace_s: float = 10.0, shell: str | None = None,
                 pid_dir: Path | None = None, env: Mapping[str, str] | None = None,
                 user: JobUser | None = None, secret_paths: Iterable[Path] = ()) -> None:
        self.grace_s = grace_s
        self.shell = shell or shutil.which("bash") or "/bin/sh"
        self.pid_dir = pid_dir
        self.env = dict(env or {})
        self.user = user
        self.secret_paths = tuple(secret_paths)

    async def run(self, launch: Launch, sink: LineSink, *, started: Callable[[], Awaitable[None]],
                  stop: asyncio.Event) -> ExitResult:
        pids = self.pid_dir / f"{launch.job_id}-{launch.attempt}.pgids" if self.pid_dir else None
        try:
            return await self._run(launch, sink, started, stop, pids)
        finally:
            if pids is not None:
                pids.unlink(missing_ok=True)

    async def _run(self, launch: Launch, sink: LineSink, started: Callable[[], Awaitable[None]],
                   stop: asyncio.Event, pids: Path | None) -> ExitResult:
        spec = launch.spec
        user_env = self.user.env(launch.workdir) if self.user is not None else {}
        base = {**scrub_env(os.environ, secret_paths=self.secret_paths), "PYTHONUNBUFFERED": "1", **user_env,
                **self.env, **spec.env}
        if spec.bootstrap:
            sink("system", 0, "running bootstrap")
            result = await self._group([(spec.bootstrap, {**base, **rendezvous_env(launch, 0)}, 0)],
                                       launch.workdir, sink, stop, None, pids)
            if result.code != 0:
                return ExitResult(result.code, result.reason or f"bootstrap exited with {result.code}")
        if stop.is_set():
            return ExitResult(_STOPPED, "stopped before the job started")
        await started()
        ppn = spec.processes_per_node
        commands = [(spec.job, {**base, **rendezvous_env(launch, r)}, launch.node_rank * ppn + r)
                    for r in range(ppn)]
        return await self._group(commands, launch.workdir, sink, stop, spec.timeout_s, pids)

    async def _group(self, commands: list[tuple[str, dict[str, str], int]], cwd: Path, sink: LineSink,
                     stop: asyncio.Event, timeout: float | None, pids: Path | None) -> ExitResult:
        procs: list[tuple[asyncio.subprocess.Process, int]] = []
        pumps: list[asyncio.Task[None]] = []
        who: dict[str, Any] = {}
        if self.user is not None and self.user.switches:
            who = {"user": self.user.uid, "group": self.user.gid, "extra_groups": []}
        try:
            async with asyncio.TaskGroup() as tg:
                for command, env, rank in commands:
                    proc = await asyncio.create_subprocess_exec(
                        self.shell, "-c", command, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                        start_new_session=True, **who)
                    procs.append((proc, rank))
                    if pids is not None:
                        pids.parent.mkdir(parents=True, exist_ok=True)
                        with open(pids, "a") as file:  # noqa: ASYNC230 - one short line, before any output is read
                            file.write(f"{proc.pid} {cwd}\n")
                    assert proc.stdout is not None and proc.stderr is not None
                    pumps.append(tg.create_task(_pump(proc.stdout, "stdout", rank, sink)))
                    pumps.append(tg.create_task(_pump(proc.stderr, "stderr", rank, sink)))
                try:
                    result = await self._supervise(procs, stop, timeout, tg)
                finally:
                    await self._terminate(procs, kill_now=False)
                    # Pipes close once every process holding them is gone; a grandchild that escaped its
                    # process group could keep them open, so stop reading after a short while.
                    _, late = await asyncio.wait(pumps, timeout=2.0) if pumps else (set(), set())
                    for task in late:
                        task.cancel()
            return result
        finally:
            await asyncio.shield(self._terminate(procs, kill_now=True))

    async def _supervise(self, procs: list[tuple[asyncio.subprocess.Process, int]], stop: asyncio.Event,
                         timeout: float | None, tg: asyncio.TaskGroup) -> ExitResult:
        waits = {tg.create_task(proc.wait()): (proc, rank) for proc, rank in procs}
        stopper = tg.create_task(stop.wait())
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pending = set(waits)
        try:
            while pending:
                left = None if deadline is None else max(deadline - loop.time(), 0.0)
                done, _ = await asyncio.wait(pending | {stopper}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    return ExitResult(_STOPPED, "stopped")
                if not done:
                    return ExitResult(124, f"timed out after {timeout:g}s")
                for task in done:
                    pending.discard(task)
                    proc, rank = waits[task]
                    code = _code(proc.returncode)
                    if code != 0:
                        return ExitResult(code, f"rank {rank} exited with {code}" if len(procs) > 1 else "")
            return ExitResult(0)
        finally:
            stopper.cancel()
            for task in pending:
                task.cancel()

    async def _terminate(self, procs: list[tuple[asyncio.subprocess.Process, int]], *,
                         kill_now: bool) -> None:
        """SIGTERM every group still running, SIGKILL after the grace period; then reap leftovers."""
        running = [p for p, _ in procs if p.returncode is None]
        if running and not kill_now:
            for proc in running:
                _signal_group(proc.pid, signal.SIGTERM)
            waiting = [asyncio.ensure_future(p.wait()) for p in running]
            _, late = await asyncio.wait(waiting, timeout=self.grace_s)
            for task in late:
                task.cancel()
        for proc, _ in procs:
            _signal_group(proc.pid, signal.SIGKILL)  # also whatever the command left behind in its group
        for proc, _ in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()


def reap_orphans(pid_dir: Path) -> int:
    """Kill the process groups that jobs of a previous run of this agent left behind; returns how many.

    A group is killed only if its leader still runs in the job's work dir, so a recycled pid is never hit.
    """
    killed = 0
    if not pid_dir.is_dir():
        return 0
    for path in pid_dir.glob("*.pgids"):
        for row in path.read_text().splitlines():
            pgid_text, _, cwd = row.partition(" ")
            try:
                leader = psutil.Process(int(pgid_text))
                if leader.cwd() == cwd:
                    _signal_group(leader.pid, signal.SIGKILL)
                    killed += 1
                    log.warning("killed a job process left by the previous run", pgid=leader.pid, workdir=cwd)
            except (ValueError, psutil.Error):
                continue
        path.unlink(missing_ok=True)
    return killed


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _pump(stream: asyncio.StreamReader, name: str, rank: int, sink: LineSink) -> None:
    """Split a pipe into lines (over-long lines are cut at 16 KiB) and hand them to the sink."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            sink(name, rank, line.decode("utf-8", "replace").rstrip("\r"))
        while len(pending) > _MAX_LINE:
            sink(name, rank, pending[:_MAX_LINE].decode("utf-8", "replace"))
            pending = pending[_MAX_LINE:]
    if pending:
        sink(name, rank, pending.decode("utf-8", "replace"))


class InstantRunner:
    """Runs nothing: reports the job started and exits with ``code`` at once (benchmarks, simulations)."""

    def __init__(self, code: int = 0) -> None:
        self.code = code

    async def run(self, launch: Launch, sink: LineSink, *, started: Callable[[], Awaitable[None]],
                  stop: asyncio.Event) -> ExitResult:
        await started()
        return ExitResult(self.code)
