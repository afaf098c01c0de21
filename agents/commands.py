"""Launch's ``fedbus`` commands, registered through the ``fedbus.cli`` entry point as :data:`COMMANDS`.

Daemons: ``fedbus agent gpu`` and ``fedbus agent scheduler`` (:mod:`.daemon_commands`; the ``agent`` group is
shared with other packages). Clients: ``fedbus launch job.yaml [--follow]``, ``fedbus jobs``, ``fedbus job JOB``,
``fedbus logs JOB [-f]``, ``fedbus cancel JOB``, ``fedbus agents``. Commands parse options and render; the
work is done by :class:`~fedbus.agents.client.LaunchClient` and the agent classes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.text import Text

from fedbus.bus.cli import server_option
from fedbus.bus.console import (
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    configure_logging,
    err,
    fail,
    out,
    run_async,
)
from fedbus.bus.errors import FedbusError

from .daemon_commands import agent_group
from .events import AgentHeartbeat, JobLog, JobState, JobStatus

if TYPE_CHECKING:  # imported by the commands that run them: `fedbus --help` loads no daemon and no aiohttp
    from rich.table import Table

    from .client import LaunchClient
    from .scheduling import JobRecord

__all__ = ["COMMANDS"]

_STATE_STYLE = {
    JobState.QUEUED: "yellow", JobState.OFFERED: "yellow", JobState.AWARDED: "cyan",
    JobState.STARTING: "cyan", JobState.RUNNING: "blue", JobState.SUCCEEDED: "green", JobState.FAILED: "red",
    JobState.CANCELLED: "magenta", JobState.LOST: "red",
}


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


# -- clients --------------------------------------------------------------------------------------------
def _launch_client(server: str | None) -> LaunchClient:
    from .client import LaunchClient

    return LaunchClient(server)


def _print_status(status: JobStatus) -> None:
    line = Text(f"{_clock(time.time())} ", style="dim")
    line.append(f"{status.state.value:<10}", style=_STATE_STYLE.get(status.state, ""))
    line.append(f" {status.reason}")
    err.print(line)


def _print_log(batch: JobLog, *, show_source: bool = True) -> None:
    for entry in batch.lines:
        prefix = f"[{batch.agent_id} r{entry.rank}] " if show_source else ""
        style = "dim" if entry.stream == "system" else "red" if entry.stream == "stderr" else ""
        out.print(Text(prefix, style="dim") + Text(entry.text, style=style))
    if batch.dropped:
        err.print(f"[yellow]({batch.dropped} lines dropped by {batch.agent_id})[/]", markup=True)


@click.command("launch")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@server_option
@click.option("--follow", "-f", is_flag=True,
              help="Stream status and logs until the job ends; exit with its code.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --follow: stop waiting after S seconds (exit 124; the job goes on).")
@click.option("--job-id", default=None,
              help="The job's id (letters, digits, '_', '-'); refused if taken. [default: <name>-<26 random "
                   "characters>]")
def launch_cmd(job_file: Path, server: str | None, follow: bool, timeout: float | None,
               job_id: str | None) -> None:
    """Submit a job file; prints the job id.

    Exit codes: 0 submitted (with --follow: the job succeeded); the job's own code (1 without one) when it
    failed, was cancelled or refused; 1 the id is taken, or another run-time error; 2 a bad job file or
    option; 124 --timeout ran out; 130 Ctrl-C while following (the job goes on; the message says how to
    cancel it). See docs/cli.md.
    """
    configure_logging()
    from .client import new_job_id
    from .jobspec import load_jobspec

    try:
        loaded = load_jobspec(job_file)
    except FedbusError as exc:
        fail(exc)

    async def main() -> int:
        async with _launch_client(server) as client:
            chosen = job_id or new_job_id(loaded.spec.name)
            if not follow:
                out.print(await client.submit(loaded, job_id=chosen))
                return 0
            return await _launch_and_follow(client, loaded, chosen, timeout=timeout, server=server)

    raise SystemExit(run_async(main))


async def _launch_and_follow(client: LaunchClient, loaded: Any, job_id: str, *, timeout: float | None,
                             server: str | None) -> int:
    """Submit and follow until the job ends (its exit code), ``timeout`` runs out (124) or Ctrl-C (130)."""
    where = f" --server {server}" if server else ""
    submitted = False

    async def submit() -> None:
        nonlocal submitted
        await client.submit(loaded, job_id=job_id)
        submitted = True
        err.print(f"job [bold]{job_id}[/] submitted", markup=True)

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    following = asyncio.ensure_future(client.follow(job_id, submit=submit, on_status=_print_status,
                                                    on_log=_print_log, timeout=timeout))
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        stop.cancel()
    if not following.done():
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        if submitted:
            err.print(f"detached: job {job_id} goes on; cancel it with: fedbus cancel {job_id}{where}")
        else:
            err.print(f"interrupted while submitting job {job_id}; check with: fedbus job {job_id}{where}")
        return EXIT_INTERRUPTED
    try:
        record = following.result()
    except TimeoutError:
        try:
            state = (await client.job(job_id)).state.value
        except FedbusError:
            state = "not finished"
        err.print(f"job {job_id} is still {state} after {timeout:g}s and goes on; follow it with: "
                  f"fedbus logs -f {job_id}{where}; cancel it with: fedbus cancel {job_id}{where}")
        return EXIT_TIMEOUT
    from .client import exit_code_of

    return exit_code_of(record)


def _jobs_table(records: list[JobRecord]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("JOB", "NAME", "STATE", "ATTEMPT", "AGENTS", "EXIT", "AGE", "REASON"):
        table.add_column(column, overflow="fold" if column == "REASON" else "ellipsis",
                         no_wrap=column != "REASON")
    for rec in records:
        table.add_row(rec.job_id, rec.spec.name, Text(rec.state.value, style=_STATE_STYLE.get(rec.state, "")),
                      str(rec.attempt), ",".join(rec.agents) or "-",
                      "-" if rec.exit_code is None else str(rec.exit_code), _ago(rec.created), rec.reason)
    return table


@click.command("jobs")
@server_option
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in JobState]),
              help="Only jobs in this state (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Show at most this many jobs (the newest).")
def jobs_cmd(server: str, states: tuple[str, ...], limit: int) -> None:
    """List jobs, newest first."""
    configure_logging()

    async def main() -> None:
        async with _launch_client(server) as client:
            records = [r for r in await client.jobs() if not states or r.state.value in states][:limit]
        if not records:
            err.print("no jobs")
            return
        out.print(_jobs_table(records))

    run_async(main)


@click.command("job")
@click.argument("job_id")
@server_option
def job_cmd(job_id: str, server: str) -> None:
    """Show one job: state, why it is waiting, placements, history."""
    configure_logging()

    async def main() -> None:
        async with _launch_client(server) as client:
            rec = await client.job(job_id)
        spec = rec.spec
        c = spec.computing
        out.print(Text.assemble(("job ", "bold"), (rec.job_id, "bold"), "  ",
                                (rec.state.value, _STATE_STYLE.get(rec.state, "") + " bold")))
        if rec.reason:
            label = "why waiting" if rec.state in (JobState.QUEUED, JobState.OFFERED) else "reason"
            out.print(f"  {label}: {rec.reason}")
        out.print(f"  name {spec.name}, submitted {_ago(rec.created)} by {rec.submitted_by or '?'}")
        out.print(f"  needs {c.nodes} node(s) × {c.gpus_per_node} GPU(s)"
                  + (f" ({c.resource_type})" if c.resource_type else "")
                  + f", {c.cpus_per_node:g} CPUs, {c.min_memory_gb:g} GB memory"
                  + (f", ≤ {c.max_cost_per_hour:g}/h" if c.max_cost_per_hour is not None else ""))
        out.print(f"  attempt {rec.attempt}, retries used {rec.retries_used} of {spec.retries}"
                  + (f", exit code {rec.exit_code}" if rec.exit_code is not None else ""))
        for p in rec.placements:
            out.print(f"  node {p.node_rank}: {p.agent_id} ({p.address or '?'}) {p.phase}"
                      + (f" with {p.exit_code}" if p.exit_code is not None else ""))
        from rich.table import Table

        table = Table(box=None, header_style="bold", title="history", title_justify="left")
        for column in ("TIME", "STATE", "ATTEMPT", "REASON"):
            table.add_column(column, overflow="fold")
        for t in rec.history:
            state = Text(t.state.value, style=_STATE_STYLE.get(t.state, ""))
            table.add_row(_clock(t.t), state, str(t.attempt), t.reason)
        out.print(table)

    run_async(main)


@click.command("logs")
@click.argument("job_id")
@server_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs_cmd(job_id: str, server: str, follow: bool) -> None:
    """Print a job's output (stored, then live with -f)."""
    configure_logging()

    async def main() -> None:
        async with _launch_client(server) as client:
            job_id_full = await client.resolve(job_id)
            if follow:
                await client.follow(job_id_full, on_log=_print_log)
            else:
                async for batch in client.stored_logs(job_id_full):
                    _print_log(batch)

    run_async(main)


@click.command("cancel")
@click.argument("job_id")
@server_option
@click.option("--reason", default="cancelled by user", show_default=True,
              help="Why: kept in the job's history and shown by `fedbus job`.")
def cancel_cmd(job_id: str, server: str, reason: str) -> None:
    """Cancel a job, whatever its state."""
    configure_logging()

    async def main() -> None:
        async with _launch_client(server) as client:  # signed with FEDBUS_CREDS' key when it is set
            full = await client.cancel(job_id, reason=reason)
        err.print(f"cancel requested for {full}")

    run_async(main)


def _agents_table(beats: list[AgentHeartbeat]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("AGENT", "KIND", "STATUS", "GPUS FREE", "MODEL", "CPUS FREE", "MEM FREE GB", "PRICE/H",
                   "JOBS", "ADDRESS"):
        table.add_column(column, no_wrap=True)
    for hb in beats:
        cap = hb.capacity
        table.add_row(
            hb.agent_id, hb.kind, hb.status,
            f"{cap.free_gpus}/{cap.gpus}" if cap else "-", (cap.gpu_model or "-") if cap else "-",
            f"{cap.free_cpus:g}/{cap.cpus:g}" if cap else "-",
            f"{cap.free_memory_gb:g}/{cap.memory_gb:g}" if cap else "-",
            f"{cap.price_per_hour:g}" if cap else "-", ",".join(j.job_id for j in hb.jobs) or "-",
            hb.address or "-")
    return table


@click.command("agents")
@server_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per agent per line (its last heartbeat).")
def agents_cmd(server: str, as_json: bool) -> None:
    """List live agents and their free capacity."""
    configure_logging()

    async def main() -> None:
        async with _launch_client(server) as client:
            beats = await client.agents()
        if not beats:
            err.print("no live agents")
            return
        if as_json:
            for hb in beats:
                click.echo(msgspec.json.encode(hb).decode())
            return
        out.print(_agents_table(beats))

    run_async(main)


COMMANDS: list[click.Command] = [agent_group, launch_cmd, jobs_cmd, job_cmd, logs_cmd, cancel_cmd, agents_cmd]
