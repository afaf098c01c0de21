"""An agent's state dir: one live owner at a time (a lock), its id, and who may read it.

- :class:`StateLock`: an exclusive ``fcntl`` lock on ``agent.lock`` in the state dir, held for the agent's
  life. The kernel drops it when the process dies (SIGKILL included), so a crashed agent never blocks its
  successor; a second live agent on the same dir is refused with one line naming the holder's PID.
- :func:`load_identity`: the agent id stored in ``identity.json``; on first start ``<hostname>-<6 hex>``, so
  two state dirs on one machine never share an id unless told to.
- :func:`private_dir`: the state dir is made ``0700``: job processes (another user when the agent is root)
  cannot read the agent's key, pins or records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import IO

from fedbus.bus.errors import ConfigError

from .errors import AgentError

__all__ = ["DirHeld", "StateLock", "default_agent_id", "load_identity", "private_dir"]

LOCK_FILE = "agent.lock"
IDENTITY_FILE = "identity.json"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class DirHeld(AgentError):
    """Another live agent holds the folder (``pid`` names it when it could be read)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class StateLock:
    """The exclusive lock that makes a process the one owner of a state dir."""

    def __init__(self, state_dir: Path, *, what: str = "state dir", option: str = "--state-dir") -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.what, self.option = what, option
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> StateLock:
        """Take the lock or raise :class:`DirHeld` naming the PID that holds it."""
        if self._file is not None:
            return self
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the agent's life
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            text = file.read().strip()
            file.close()
            pid = int(text) if text.isdigit() else None
            raise DirHeld(f"{self.what} {self.path.parent} is held by another agent (pid {pid or 'unknown'}); "
                          f"give each agent its own {self.option}", pid=pid) from None
        except OSError:
            file.close()
            raise
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; only the lock says who owns the dir."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.truncate(0)
            file.close()  # closing the descriptor releases the flock


def private_dir(path: Path) -> Path:
    """Create ``path`` if needed and make it readable by its owner only (when we own it)."""
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        if path.stat().st_uid == os.geteuid():
            path.chmod(0o700)
    return path


def default_agent_id() -> str:
    """``<hostname>-<6 random hex>``: unique per state dir, still telling which machine it is on."""
    host = _UNSAFE.sub("-", socket.gethostname()).strip("-")[:57] or "agent"
    return f"{host}-{secrets.token_hex(3)}"


def load_identity(state_dir: Path, wanted: str | None) -> str:
    """The agent id: ``wanted`` when given (and remembered), else the stored one, else a new default one."""
    path = state_dir / IDENTITY_FILE
    stored: str | None = None
    if path.exists():
        try:
            stored = json.loads(path.read_text())["agent_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"unreadable identity file: {exc}", source=str(path)) from None
    agent_id = wanted or stored or default_agent_id()
    if not isinstance(agent_id, str) or not _ID.fullmatch(agent_id):
        raise ConfigError(f"agent id {agent_id!r} must be 1-64 letters, digits, '_' or '-'", key="agent_id")
    if agent_id != stored:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"agent_id": agent_id, "created": time.time()}))
        tmp.replace(path)
    return agent_id
