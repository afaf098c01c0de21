"""Agent config files (``fedbus agent gpu --config agent.yaml``), parsed in one place.

::

    agent_id: gpu-1
    state_dir: ~/.fedbus/gpu-1
    heartbeat_s: 2
    health_port: 9101            # 0: any free port; omit for the default
    trust: [/etc/fedbus/scheduler.json]
    price_per_hour: 1.2          # per GPU (per node for CPU-only jobs)
    labels: {zone: eu-west}
    address: 10.0.0.5            # MASTER_ADDR other nodes reach this one at
    creds: /etc/fedbus/gpu-1.creds   # secure mode: id, login and signing key (fedbus creds issue)
    work_dir: /var/lib/fedbus-jobs   # job work dirs, outside state_dir
    job_user: fedbus-job         # jobs run as this user when the agent is root (default: nobody)
    resources:                   # declared resources win over detected ones
      gpus: 2
      gpu_model: A100
      gpu_memory_gb: 80
      cpus: 16
      memory_gb: 128
      disk_gb: 500

Command-line options override the file; the file overrides the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml

from fedbus.bus.errors import ConfigError

__all__ = ["AgentFile", "ResourcesFile", "load_agent_file"]


class ResourcesFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gpus: int | None = None
    gpu_model: str | None = None
    gpu_memory_gb: float | None = None
    cpus: float | None = None
    memory_gb: float | None = None
    disk_gb: float | None = None


class AgentFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every key an agent config file may hold (all optional)."""

    server: str | None = None
    agent_id: str | None = None
    state_dir: str | None = None
    heartbeat_s: float | None = None
    health_port: int | None = None
    trust: list[str] = []
    price_per_hour: float | None = None
    labels: dict[str, str] = {}
    address: str | None = None
    scheduler_id: str | None = None
    creds: str | None = None
    work_dir: str | None = None
    job_user: str | None = None
    resources: ResourcesFile = ResourcesFile()
    policy: str | None = None


def load_agent_file(path: Path | None) -> AgentFile:
    """Read and validate an agent config file (an empty :class:`AgentFile` when ``path`` is ``None``)."""
    if path is None:
        return AgentFile()
    try:
        data: Any = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    try:
        return msgspec.convert(data, AgentFile)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$")
        raise ConfigError(message, key=at.rstrip("`").lstrip(".") or None, source=str(path)) from None
