"""Who signs what: every agent registers its public key under its id, first come first served.

The ``agent-keys`` bucket maps an agent id to its raw Ed25519 public key. An agent creates its entry on first
start (compare-and-set, so nobody can take over an id that is already registered) and the scheduler trusts a
report only when its signature is by the key registered for the agent id it names. Agents trust the
scheduler's key the same way, pinning it in their state dir the first time they see it (trust on first use),
unless an operator gave them a trusted-keys file (``--trust``), which then is the only source.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import structlog

from fedbus.bus.errors import ConfigError, Conflict, NotFound
from fedbus.bus.signing import AgentKey, KeyRing, key_id
from fedbus.bus.stores import KeyValue

from .errors import AgentError

__all__ = ["KEYS_BUCKET", "PinnedKeys", "fetch_key", "load_trust_file", "register_key"]

log = structlog.get_logger("fedbus.agents.trust")

KEYS_BUCKET = "agent-keys"


async def register_key(keys: KeyValue, agent_id: str, key: AgentKey) -> None:
    """Register ``key`` for ``agent_id``; raises :class:`AgentError` if the id belongs to another key."""
    try:
        await keys.create(agent_id, key.public_raw)
        log.info("registered agent key", agent_id=agent_id, kid=key.kid)
        return
    except Conflict:
        pass
    entry = await keys.get(agent_id)
    if entry.value != key.public_raw:
        raise AgentError(
            f"agent id {agent_id!r} is registered with another key ({key_id(entry.value)}, ours is "
            f"{key.kid}); use another --agent-id, or the state dir that holds the original key")


async def fetch_key(keys: KeyValue, agent_id: str) -> bytes | None:
    """The public key registered for ``agent_id``, if any."""
    try:
        return (await keys.get(agent_id)).value
    except NotFound:
        return None


def load_trust_file(ring: KeyRing, path: Path) -> list[str]:
    """Trust every key of a trusted-keys file (``{"<kid>": "<base64 raw key>"}``, as ``KeyRing.dump``
    writes); returns their key ids."""
    try:
        data = json.loads(Path(path).read_text())
        return [ring.trust(base64.b64decode(value)) for value in data.values()]
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"unreadable trusted-keys file: {exc}", key="trust", source=str(path)) from None


class PinnedKeys:
    """Keys this agent decided to trust, by agent id, kept in a JSON file in its state dir."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: dict[str, bytes] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self._keys = {name: base64.b64decode(value) for name, value in data.items()}
            except (OSError, ValueError, AttributeError):
                log.warning("unreadable pinned keys; starting afresh", path=str(self.path))

    def get(self, agent_id: str) -> bytes | None:
        return self._keys.get(agent_id)

    def pin(self, agent_id: str, public_raw: bytes) -> None:
        """Remember ``public_raw`` as ``agent_id``'s key."""
        self._keys[agent_id] = public_raw
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in self._keys.items()}, indent=2))
        tmp.replace(self.path)

    def into(self, ring: KeyRing) -> None:
        for raw in self._keys.values():
            ring.trust(raw)
