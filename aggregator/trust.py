"""Who the aggregator listens to on a secure broker: clients are who the authority says they are.

With credentials every client signs everything it sends (joins and heartbeats included) with the key issued
with its credential, and its bus source is its credential id. :class:`IdentityClients` accepts a client's
event only when

- its source is a valid id registered in ``fedbus-identities`` (which only admin writes) in a client role
  (``fl-client``, or ``device`` for phones), not expired;
- it is signed by exactly that identity's key, the signature verifies, and it is fresh (not a replay);

so one client cannot speak for another, and a revoked or expired credential stops counting within
``ttl_s``. The aggregator then checks, as always, that the client id an event names is its source. Without
credentials (``fedbus up --insecure``, tests) the aggregator keeps its key ring: keys it generated
(``--simulate``), ``--trust`` files, or trust on first use.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import structlog

from fedbus.bus.client import Delivery
from fedbus.bus.creds import Identity, fetch_identity
from fedbus.bus.errors import AuthError, ConfigError, FedbusError
from fedbus.bus.roles import Role, validate_id
from fedbus.bus.signing import KeyRing, ReplayGuard
from fedbus.bus.stores import KeyValue

__all__ = ["CLIENT_ROLES", "IdentityClients"]

log = structlog.get_logger("fedbus.aggregator.trust")

#: Roles whose identities may take part in a federation as clients.
CLIENT_ROLES: Final = frozenset({Role.FL_CLIENT, Role.DEVICE})
_MAX_CACHED: Final = 10_000


class IdentityClients:
    """Checks each client event against the identities registry; see the module docstring."""

    def __init__(self, identities: KeyValue, *, ttl_s: float = 10.0, roles: frozenset[Role] = CLIENT_ROLES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identities = identities
        self.ttl_s = ttl_s
        self.roles = roles
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._ring = KeyRing()
        self._replay = ReplayGuard()

    async def _identity(self, ident: str) -> Identity | None:
        now = self._clock()
        cached = self._cache.get(ident)
        if cached is not None and cached[0] > now:
            return cached[1]
        identity = await fetch_identity(self.identities, ident)
        self._cache[ident] = (now + self.ttl_s, identity)
        self._cache.move_to_end(ident)
        while len(self._cache) > _MAX_CACHED:  # a flood of made-up ids cannot grow the cache
            self._cache.popitem(last=False)
        return identity

    async def check(self, delivery: Delivery[Any]) -> str | None:
        """``None`` when ``delivery`` comes from a registered client and is signed by its key, else why not."""
        env = delivery.envelope
        try:
            validate_id(env.src, what="source")
        except ConfigError:
            return f"source {env.src[:64]!r} is not a valid id"
        try:
            identity = await self._identity(env.src)
        except FedbusError as exc:  # the registry is unreachable now: accept nothing, decide again soon
            return f"the identities registry is unavailable ({exc})"
        if identity is None:
            return f"{env.src!r} is not a registered identity (or it expired)"
        if identity.role not in self.roles:
            return f"{env.src!r} is a {identity.role}, not an FL client"
        if env.sig is None or env.kid is None:
            return f"unsigned, but {env.src!r} must sign what it sends"
        if env.kid != identity.kid:
            return f"signed by key {env.kid}, not by {env.src!r}'s registered key {identity.kid}"
        if identity.kid not in self._ring:
            self._ring.trust(identity.public_key)
        try:
            self._ring.verify(env)
            self._replay.check(env)
        except AuthError as exc:
            return str(exc)
        return None
