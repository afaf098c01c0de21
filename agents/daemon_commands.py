"""The daemons' ``fedbus`` commands: ``fedbus agent gpu`` and ``fedbus agent scheduler``.

They parse options and a config file into a runtime; the daemons themselves are imported only when one runs,
so ``fedbus --help`` loads no daemon and no aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedbus.bus.cli import server_option
from fedbus.bus.console import EXIT_UNAVAILABLE, fail
from fedbus.bus.creds import Credentials, load_creds
from fedbus.bus.errors import ConfigError, FedbusError

if TYPE_CHECKING:
    from .config import AgentFile
    from .gpu import GpuAgent
    from .runtime import RuntimeConfig
    from .scheduler import SchedulerAgent

__all__ = ["agent_group"]


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", key="label")
        labels[key] = value
    return labels


def _daemon(make: Callable[[], Any], json_logs: bool | None, level: str | None) -> None:
    """Run an agent until SIGTERM/SIGINT; it drains and the process exits 0."""
    from .runtime import configure_daemon_logging
    from .statedir import DirHeld

    configure_daemon_logging(json_logs=json_logs, level=level)
    try:
        agent = make()
        asyncio.run(agent.run())
    except DirHeld as exc:  # another live agent owns the state or work dir
        fail(exc, EXIT_UNAVAILABLE)
    except FedbusError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


_common_daemon_options = [
    click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Identity, key and records; one live agent per dir. [default: ~/.fedbus/<agent-id>, "
                      "~/.fedbus/<kind> without an id]"),
    click.option("--agent-id", default=None,
                 help="Stable id (letters, digits, '_', '-'); remembered. [default: the credential's id, "
                      "else <hostname>-<6 hex> made once per state dir]"),
    click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.05), default=None,
                 help="Seconds between heartbeats. [default: 2]"),
    click.option("--health-port", type=click.IntRange(0, 65535), default=None,
                 help="Port of /healthz and /metrics (0: any free port). [default: 0]"),
    click.option("--trust", "trust", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="Trusted-keys JSON file, e.g. the scheduler's public_key.json (repeatable); "
                      "without it the scheduler's key is pinned on first use."),
    click.option("--json-logs/--pretty-logs", default=None,
                 help="Log format. [default: JSON unless a terminal]"),
    click.option("--log-level", default=None, help="debug, info, warning, error. [default: info]"),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _server(server: str | None, file: AgentFile, creds: Credentials | None) -> str | None:
    """``--server``/``FEDBUS_SERVER`` when given, else the config file's, else the credential's, else the
    default."""
    source = click.get_current_context().get_parameter_source("server")
    if source is click.core.ParameterSource.DEFAULT:
        return file.server or (creds.servers.get("nats") if creds else None) or server
    return server


def _runtime(file: AgentFile, *, server: str, kind: str, state_dir: Path | None, agent_id: str | None,
             heartbeat_s: float | None, health_port: int | None, trust: tuple[Path, ...],
             default_id: str | None = None) -> RuntimeConfig:
    """The runtime config from options, then the config file, then the credential (``--creds``, which
    ``server_option`` puts in ``FEDBUS_CREDS``, else the file's ``creds``), then defaults. Two agents started
    with default flags share ``~/.fedbus/<kind>``: the second is refused (one live agent per dir)."""
    from .runtime import RuntimeConfig

    creds = load_creds() or load_creds(Path(file.creds).expanduser() if file.creds else None)
    agent_id = agent_id or file.agent_id or (creds.id if creds else default_id)
    default_dir = Path.home() / ".fedbus" / (agent_id or kind)
    return RuntimeConfig(
        server=_server(server, file, creds), agent_id=agent_id, creds=creds,
        state_dir=Path(state_dir or file.state_dir or default_dir).expanduser(),
        heartbeat_s=heartbeat_s or file.heartbeat_s or 2.0,
        health_port=health_port if health_port is not None else (file.health_port or 0),
        trust=tuple(trust) or tuple(Path(p) for p in file.trust),
    )


@click.group("agent")
def agent_group() -> None:
    """Run a fedbus daemon (GPU node agent, scheduler, ...)."""


@agent_group.command("gpu")
@server_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Agent config YAML (see docs/launch.md); options override it.")
@_with(_common_daemon_options)
@click.option("--gpus", type=click.IntRange(0, 64), default=None, help="Declare N GPUs instead of detecting.")
@click.option("--gpu-model", default=None, help="Declared GPU model (e.g. A100).")
@click.option("--gpu-memory-gb", type=click.FloatRange(min=0), default=None,
              help="Declared memory per GPU, in GB (with --gpus, or to correct the detected value).")
@click.option("--cpus", type=click.FloatRange(min=0), default=None, help="Declared CPUs (to share a node).")
@click.option("--memory-gb", type=click.FloatRange(min=0), default=None, help="Declared memory.")
@click.option("--disk-gb", type=click.FloatRange(min=0), default=None, help="Declared disk.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE placement label (repeatable).")
@click.option("--price-per-hour", type=click.FloatRange(min=0), default=None,
              help="Per GPU (per node for jobs without GPUs).")
@click.option("--address", default=None, help="Address other nodes reach this one at (MASTER_ADDR).")
@click.option("--scheduler-id", default=None, help="Agent id of the scheduler whose awards count.")
@click.option("--probe-torch", is_flag=True,
              help="Ask torch.cuda for GPUs when NVML and nvidia-smi find none.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of job work dirs, outside the state dir. "
                   "[default: <tmp>/fedbus-jobs-<agent-id>-<hash>]")
@click.option("--job-user", default=None,
              help="User jobs run as when the agent is root. [default: nobody; else the agent's user]")
def gpu_cmd(server: str | None, config_file: Path | None, state_dir: Path | None, agent_id: str | None,
            heartbeat_s: float | None, health_port: int | None, trust: tuple[Path, ...],
            json_logs: bool | None, log_level: str | None, gpus: int | None, gpu_model: str | None,
            gpu_memory_gb: float | None, cpus: float | None, memory_gb: float | None, disk_gb: float | None,
            labels: tuple[str, ...], price_per_hour: float | None, address: str | None,
            scheduler_id: str | None, probe_torch: bool, work_dir: Path | None, job_user: str | None) -> None:
    """Run a GPU node agent: bid on job offers, run awarded jobs, stream their logs (SIGTERM drains)."""

    def make() -> GpuAgent:
        from .config import load_agent_file
        from .gpu import GpuAgent, GpuAgentConfig
        from .resources import DeclaredResources

        file = load_agent_file(config_file)
        res = file.resources
        runtime = _runtime(file, server=server, kind="gpu", state_dir=state_dir, agent_id=agent_id,
                           heartbeat_s=heartbeat_s, health_port=health_port, trust=trust)
        declared = DeclaredResources(
            gpus=gpus if gpus is not None else res.gpus, gpu_model=gpu_model or res.gpu_model,
            gpu_memory_gb=gpu_memory_gb if gpu_memory_gb is not None else res.gpu_memory_gb,
            cpus=cpus if cpus is not None else res.cpus,
            memory_gb=memory_gb if memory_gb is not None else res.memory_gb,
            disk_gb=disk_gb if disk_gb is not None else res.disk_gb)
        config = GpuAgentConfig(
            declared=declared, labels={**file.labels, **_labels(labels)},
            price_per_hour=price_per_hour if price_per_hour is not None else (file.price_per_hour or 0.0),
            address=address or file.address, scheduler_id=scheduler_id or file.scheduler_id or "scheduler",
            probe_torch=probe_torch, job_user=job_user or file.job_user,
            work_dir=Path(work_dir or file.work_dir).expanduser() if (work_dir or file.work_dir) else None)
        return GpuAgent(runtime, config)

    _daemon(make, json_logs, log_level)


@agent_group.command("scheduler")
@server_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Agent config YAML; options override it.")
@_with(_common_daemon_options)
@click.option("--policy", type=click.Choice(["binpack", "spread", "lowest-cost"]), default=None,
              help="Placement policy. [default: binpack]")
@click.option("--bid-window", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Seconds agents have to bid on an offer.")
@click.option("--lease", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="A running node unseen in heartbeats this long is lost (its job retried).")
@click.option("--backoff", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="First retry delay (doubles per retry).")
def scheduler_cmd(server: str | None, config_file: Path | None, state_dir: Path | None, agent_id: str | None,
                  heartbeat_s: float | None, health_port: int | None, trust: tuple[Path, ...],
                  json_logs: bool | None, log_level: str | None, policy: str | None, bid_window: float,
                  lease: float, backoff: float) -> None:
    """Run the scheduler: offers, bids, awards, leases, retries; jobs persist in JetStream."""

    def make() -> SchedulerAgent:
        from .config import load_agent_file
        from .scheduler import SchedulerAgent, SchedulerAgentConfig
        from .scheduling import SchedulerConfig

        file = load_agent_file(config_file)
        runtime = _runtime(file, server=server, kind="scheduler", state_dir=state_dir, agent_id=agent_id,
                           heartbeat_s=heartbeat_s, health_port=health_port, trust=trust,
                           default_id="scheduler")
        scheduling = SchedulerConfig(bid_window_s=bid_window, lease_s=lease, agent_ttl_s=lease,
                                     backoff_s=backoff, warmup_s=max(runtime.heartbeat_s * 1.5, 0.5))
        return SchedulerAgent(runtime, SchedulerAgentConfig(scheduling=scheduling,
                                                            policy=policy or file.policy or "binpack"))

    _daemon(make, json_logs, log_level)
