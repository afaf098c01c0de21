"""A job's workspace folder, packed by the CLI into a tar.gz in the object store and unpacked by agents.

Packing skips version-control and cache folders and stops at ``max_bytes``; unpacking uses tarfile's
``data`` filter, so an archive cannot write outside its folder, create devices or keep setuid bits.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from pathlib import Path

from .errors import WorkspaceError

__all__ = ["BUCKET", "SKIP", "object_name", "pack", "unpack"]

BUCKET = "workspaces"
SKIP = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache",
                  "node_modules", ".DS_Store"})


def object_name(job_id: str) -> str:
    """The object-store name of a job's workspace archive."""
    return f"{job_id}.tar.gz"


def _pack(folder: Path, dest: Path, max_bytes: int) -> int:
    total = 0

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        nonlocal total
        if any(part in SKIP for part in Path(info.name).parts):
            return None
        total += info.size
        if total > max_bytes:
            raise WorkspaceError(f"workspace {folder} is over {max_bytes // 2**20} MiB; keep data out of it "
                                 f"(fetch it from the job, or use the object store)")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
        tar.add(folder, arcname=".", filter=keep)
    return dest.stat().st_size


async def pack(folder: Path, *, max_bytes: int = 512 * 2**20) -> Path:
    """Pack ``folder`` into a temporary tar.gz (the caller deletes it); done in a worker thread."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkspaceError(f"workspace {folder} is not a folder")
    fd, name = tempfile.mkstemp(prefix="fedbus-ws-", suffix=".tar.gz")
    os.close(fd)
    dest = Path(name)
    try:
        await asyncio.to_thread(_pack, folder, dest, max_bytes)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise WorkspaceError(f"cannot unpack the workspace: {exc}") from None


async def unpack(archive: Path, dest: Path) -> None:
    """Unpack an archive made by :func:`pack` into ``dest`` (in a worker thread)."""
    await asyncio.to_thread(_unpack, archive, dest)
