"""The context: which broker a command talks to, and as whom, when it is not told (like ``nats context``).

``fedbus up`` writes it once the broker is ready: the URLs it actually bound (a taken 4222 moves the broker,
and the context moves every client with it) and the admin creds file. ``connect()`` and every CLI command use
it when no ``--server``/``FEDBUS_SERVER`` and no ``--creds``/``FEDBUS_CREDS`` are given; ``fedbus context``
shows it. The file is ``$FEDBUS_CONTEXT``, else ``$XDG_CONFIG_HOME/fedbus/context.json`` (``~/.config``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from ._files import write_private
from .errors import ConfigError

__all__ = ["CONTEXT_ENV", "Context", "context_path", "load_context", "save_context"]

CONTEXT_ENV: Final = "FEDBUS_CONTEXT"


@dataclass(frozen=True, kw_only=True)
class Context:
    """Where the broker ``fedbus up`` started is, and the creds file to reach it with."""

    servers: dict[str, str] = field(default_factory=dict)
    creds: str | None = None
    data_dir: str | None = None
    insecure: bool = False
    pid: int | None = None

    @property
    def nats_url(self) -> str | None:
        return self.servers.get("nats")

    def serves(self, url: str) -> bool:
        """Whether ``url`` names this context's broker (any of its listeners)."""
        wanted = {_hostport(part) for part in url.split(",") if part.strip()}
        return bool(wanted & {_hostport(u) for u in self.servers.values()})


def _hostport(url: str) -> str:
    rest = url.strip().split("://", 1)[-1]
    return rest.split("@", 1)[-1].rstrip("/")


def context_path() -> Path:
    explicit = os.environ.get(CONTEXT_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedbus" / "context.json"


def load_context(path: Path | None = None) -> Context | None:
    """The saved context, or ``None`` when there is none (an unreadable one is a :class:`ConfigError`)."""
    path = path or context_path()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Context(servers=dict(data.get("servers") or {}), creds=data.get("creds"),
                       data_dir=data.get("data_dir"), insecure=bool(data.get("insecure")), pid=data.get("pid"))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"unreadable context: {exc}", key="context", source=str(path)) from None


def save_context(context: Context, path: Path | None = None) -> Path:
    return write_private(path or context_path(), json.dumps(asdict(context), indent=1))
