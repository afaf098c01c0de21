"""What a node has: GPUs (NVML, else ``nvidia-smi``, else torch if already imported), CPUs, memory, disk.

Nothing here imports torch at module import; torch is only asked when it is already imported in this
process or when ``probe_torch`` is set (importing it costs seconds and hundreds of MB in a daemon that
otherwise does not need it). Resources may be declared instead (to share a node between agents, or to test
placement on a CPU machine): a declared value wins over the detected one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import structlog

__all__ = ["DeclaredResources", "GpuInfo", "Resources", "detect_gpus", "detect_resources", "free_disk_gb",
           "outbound_address"]

log = structlog.get_logger("fedbus.agents.resources")
_GB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    memory_gb: float
    uuid: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeclaredResources:
    """Resources from config; ``None`` means "detect it"."""

    gpus: int | None = None
    gpu_model: str | None = None
    gpu_memory_gb: float | None = None
    cpus: float | None = None
    memory_gb: float | None = None
    disk_gb: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """A node's totals; ``gpu_source`` says where the GPU list came from."""

    gpus: tuple[GpuInfo, ...]
    cpus: float
    memory_gb: float
    disk_gb: float
    gpu_source: str

    @property
    def gpu_model(self) -> str:
        return self.gpus[0].name if self.gpus else ""

    @property
    def gpu_memory_gb(self) -> float:
        return min((g.memory_gb for g in self.gpus), default=0.0)


def _nvml() -> list[GpuInfo] | None:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]  # nvidia-ml-py, the [gpu] extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_* ("no driver", a broken install): no NVML here
        log.warning("NVML unavailable; trying nvidia-smi, then torch", error=f"{type(exc).__name__}: {exc}")
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name: Any = pynvml.nvmlDeviceGetName(handle)
            uuid: Any = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            text = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(GpuInfo(i, text, round(memory / _GB, 1),
                                uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return gpus
    except Exception as exc:  # noqa: BLE001 - a GPU NVML cannot read is reported, and the next probe asked
        log.warning("NVML failed listing GPUs; trying nvidia-smi, then torch", error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> list[GpuInfo] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(  # a fixed command line
            [exe, "--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed", error=str(exc))
        return None
    gpus = []
    for row in out.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            try:
                memory = float(parts[2]) / 1024
            except ValueError:
                memory = 0.0
            uuid = parts[3] if len(parts) > 3 else ""
            gpus.append(GpuInfo(int(parts[0]), parts[1], round(memory, 1), uuid))
    return gpus


def _torch(probe: bool) -> list[GpuInfo] | None:
    torch = sys.modules.get("torch")
    if torch is None and probe:
        try:
            import torch  # type: ignore[no-redef]  # on request only
        except ImportError:
            return None
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return []
        return [GpuInfo(i, torch.cuda.get_device_name(i),
                        round(torch.cuda.get_device_properties(i).total_memory / _GB, 1))
                for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install means no GPUs, not a crash
        log.warning("torch.cuda probe failed", error=str(exc))
        return None


def detect_gpus(*, probe_torch: bool = False) -> tuple[list[GpuInfo], str]:
    """The node's GPUs and where the list came from (``nvml``, ``nvidia-smi``, ``torch`` or ``none``)."""
    for source, probe in (("nvml", _nvml), ("nvidia-smi", _nvidia_smi)):
        gpus = probe()
        if gpus is not None:
            return gpus, source
    gpus = _torch(probe_torch)
    if gpus is not None:
        return gpus, "torch"
    return [], "none"


def free_disk_gb(path: Path) -> float:
    """Free space on the file system holding ``path``."""
    return round(psutil.disk_usage(str(path)).free / _GB, 2)


def _cpus() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return float(psutil.cpu_count() or 1)


def detect_resources(declared: DeclaredResources | None = None, *, work_dir: Path, probe_torch: bool = False
                     ) -> Resources:
    """Detect the node's resources, then apply what ``declared`` sets."""
    declared = declared or DeclaredResources()
    if declared.gpus is not None:
        gpus = [GpuInfo(i, declared.gpu_model or "declared", declared.gpu_memory_gb or 0.0)
                for i in range(declared.gpus)]
        source = "declared"
    else:
        gpus, source = detect_gpus(probe_torch=probe_torch)
        if declared.gpu_model or declared.gpu_memory_gb:
            gpus = [replace(g, name=declared.gpu_model or g.name,
                            memory_gb=declared.gpu_memory_gb or g.memory_gb) for g in gpus]
    resources = Resources(
        gpus=tuple(gpus),
        cpus=declared.cpus if declared.cpus is not None else _cpus(),
        memory_gb=declared.memory_gb if declared.memory_gb is not None
        else round(psutil.virtual_memory().total / _GB, 2),
        disk_gb=declared.disk_gb if declared.disk_gb is not None else free_disk_gb(work_dir),
        gpu_source=source,
    )
    log.info("resources", gpus=len(gpus), gpu_model=resources.gpu_model, gpu_source=source,
             cpus=resources.cpus, memory_gb=resources.memory_gb, disk_gb=resources.disk_gb)
    return resources


def outbound_address(server: str) -> str:
    """The local address that routes to the broker (so other nodes can reach us as the broker does)."""
    host = urlsplit(server.split(",")[0]).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
