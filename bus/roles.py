"""Roles: who a credential is, and so what it may publish and read.

Every credential the authority issues names one role. Each event type declares which roles may publish it
and which may subscribe to it (:func:`fedbus.bus.event`'s ``pub=`` and ``sub=``); the broker's permissions are
generated from those declarations, so an event type without a declaration is reachable by admin alone.

An access entry is a role name, or ``"<role>:self"``: the role may use the event only on subjects keyed by its
own id (a device publishes its own status and reads what is addressed to it, never another device's).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Final

import msgspec

from .errors import ConfigError

__all__ = ["ID_PATTERN", "ROLES", "Access", "Id", "Role", "parse_access", "validate_id"]


class Role(enum.StrEnum):
    """The roles a credential can have. Serving roles are reserved for the gateway and its replicas."""

    ADMIN = "admin"
    """The CLI and the authority: everything."""
    SCHEDULER = "scheduler"
    GPU_AGENT = "gpu-agent"
    AGGREGATOR = "aggregator"
    FL_CLIENT = "fl-client"
    DEVICE = "device"
    OBSERVER = "observer"
    GATEWAY = "gateway"
    REPLICA = "replica"


ROLES: Final = frozenset(Role)

#: Ids (agents, jobs, runs, devices, credentials): one subject token, a safe path component and KV key.
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN)

#: A field that becomes a subject token, a path, a KV key or an object name: validated by the codec on decode.
Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]

#: What an event declares: role names, or ``"<role>:self"`` for subjects keyed by the credential's own id.
Access = tuple[str, ...]


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`ConfigError` naming ``what``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"invalid {what} {value!r}: 1-64 letters, digits, '_' or '-'", key=what)
    return value


def parse_access(entry: str) -> tuple[Role, bool]:
    """``"device:self"`` → ``(Role.DEVICE, True)``; ``"scheduler"`` → ``(Role.SCHEDULER, False)``."""
    name, _, scope = entry.partition(":")
    if scope not in ("", "self"):
        raise ConfigError(f"unknown access scope {scope!r} in {entry!r} (only ':self')", key="access")
    try:
        return Role(name), scope == "self"
    except ValueError:
        raise ConfigError(f"unknown role {name!r}; roles: {', '.join(sorted(ROLES))}", key="access") from None
