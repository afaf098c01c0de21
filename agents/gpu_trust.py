"""Whose awards, stops and rejects a GPU agent obeys: the scheduler's, decided by one of two policies.

- :class:`IdentityTrust` (the agent has credentials): a signature counts only when its key is the one the
  ``fedbus-identities`` registry (written by admin alone) holds for the id the envelope names, and that
  identity's role is ``scheduler`` or ``admin``. Keys are learnt from the registry when a scheduler makes
  itself known (an offer, or the configured scheduler id at start) and looked up again after
  ``refresh_s``, so a revoked or expired identity stops counting.
- :class:`PinnedTrust` (no credentials, the insecure mode): the keys of ``--trust`` files, else the
  scheduler's key from the ``agent-keys`` bucket pinned in the state dir on first use.

Both put the keys they trust into the bus's key ring (so their signatures verify) and answer
:meth:`allows` for a delivery that did verify.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from fedbus.bus.codec import Envelope
from fedbus.bus.creds import Identity, fetch_identity
from fedbus.bus.errors import ConfigError
from fedbus.bus.roles import Role, validate_id
from fedbus.bus.signing import KeyRing, key_id
from fedbus.bus.stores import KeyValue

from .trust import PinnedKeys, fetch_key

__all__ = ["IdentityTrust", "PinnedTrust", "SchedulerTrust"]

log = structlog.get_logger("fedbus.agents.gpu_trust")

SCHEDULER_ROLES = frozenset({Role.SCHEDULER, Role.ADMIN})


class SchedulerTrust(Protocol):
    kids: set[str]
    """Key ids whose signatures count as the scheduler's."""

    async def learn(self, source: str) -> str | None:
        """Make sure ``source``'s key is known if it is a scheduler; ``None`` when it is, else why not."""
        ...

    async def allows(self, env: Envelope) -> bool:
        """Whether a verified envelope was signed by a scheduler (as the id it names, in secure mode)."""
        ...


@dataclass(slots=True)
class _Known:
    identity: Identity | None
    checked: float


class IdentityTrust:
    """Scheduler keys from the identities registry; see the module docstring."""

    def __init__(self, keyring: KeyRing, identities: KeyValue, *, refresh_s: float = 30.0,
                 max_cached: int = 256) -> None:
        self.keyring = keyring
        self.identities = identities
        self.refresh_s = refresh_s
        self.max_cached = max_cached
        self.kids: set[str] = set()
        self._known: dict[str, _Known] = {}

    async def _lookup(self, ident: str) -> Identity | None:
        known = self._known.get(ident)
        now = time.monotonic()
        if known is not None and now - known.checked < self.refresh_s:
            return known.identity
        identity = await fetch_identity(self.identities, ident)
        old = known.identity if known is not None else None
        changed = identity is None or old is None or (identity.kid, identity.role) != (old.kid, old.role)
        if old is not None and old.kid in self.kids and changed:
            self.kids.discard(old.kid)
            self.keyring.revoke(old.kid)
            log.warning("scheduler identity changed or revoked; its old key no longer counts", id=ident,
                        kid=old.kid)
        self._known.pop(ident, None)
        self._known[ident] = _Known(identity, now)
        while len(self._known) > self.max_cached:  # the oldest look-up goes; a flood cannot grow the cache
            self._known.pop(next(iter(self._known)))
        return identity

    async def learn(self, source: str) -> str | None:
        try:
            validate_id(source)
        except ConfigError:
            return f"{source[:64]!r} is not a valid id"
        identity = await self._lookup(source)
        if identity is None:
            return f"{source!r} is not a registered identity"
        if identity.role not in SCHEDULER_ROLES:
            return f"{source!r} is a {identity.role}, not a scheduler"
        if identity.kid not in self.kids:
            self.keyring.trust(identity.public_key)
            self.kids.add(identity.kid)
            log.info("trusting a scheduler from the identities registry", id=identity.id, kid=identity.kid)
        return None

    async def allows(self, env: Envelope) -> bool:
        if env.kid is None or env.kid not in self.kids:
            return False
        if await self.learn(env.src) is not None:
            return False
        known = self._known.get(env.src)
        return known is not None and known.identity is not None and known.identity.kid == env.kid


class PinnedTrust:
    """The insecure mode's trust: ``--trust`` files, or the scheduler's key pinned on first use."""

    def __init__(self, keyring: KeyRing, keys: KeyValue, pins: PinnedKeys, *, scheduler_id: str,
                 trusted_kids: list[str]) -> None:
        self.keyring = keyring
        self.keys = keys
        self.pins = pins
        self.scheduler_id = scheduler_id
        self.kids: set[str] = set(trusted_kids)
        self._from_files = bool(trusted_kids)

    async def learn(self, source: str) -> str | None:
        if self.kids:
            return None
        if self._from_files:  # an operator said exactly whom to trust
            return "no key in the --trust files"
        sid = self.scheduler_id
        pinned = self.pins.get(sid)
        registered = await fetch_key(self.keys, sid)
        if pinned is not None:
            if registered is not None and registered != pinned:
                log.error("the scheduler's registered key differs from the pinned one; awards signed by it are "
                          "ignored (delete trusted_keys.json in the state dir to re-pin)",
                          pinned=key_id(pinned), registered=key_id(registered))
            raw = pinned
        elif registered is not None:
            self.pins.pin(sid, registered)
            log.warning("trusting the scheduler's key on first use; pin it with --trust for production",
                        scheduler=sid, kid=key_id(registered))
            raw = registered
        else:
            return f"no key registered for scheduler {sid!r} yet"
        self.kids = {self.keyring.trust(raw)}
        return None

    async def allows(self, env: Envelope) -> bool:
        return env.kid is not None and env.kid in self.kids
