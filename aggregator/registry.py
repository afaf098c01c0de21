"""Which clients are alive (heartbeats), and seeded client sampling. Pure logic, time passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FlError

__all__ = ["ClientInfo", "Registry", "sample_clients"]


@dataclass
class ClientInfo:
    client_id: str
    num_examples: int = 0
    last_seen: float = 0.0
    busy: bool = False


@dataclass
class Registry:
    """Clients known to the aggregator. A client is alive while heard from within ``timeout`` seconds
    (Flower marks a node offline after two missed 30 s heartbeats; ours are seconds, pushed, not polled)."""

    timeout: float = 3.0
    clients: dict[str, ClientInfo] = field(default_factory=dict)

    def seen(
        self, client_id: str, now: float, *, num_examples: int | None = None, busy: bool = False
    ) -> bool:
        """Record a sign of life; returns ``True`` when the client is new (or came back)."""
        info = self.clients.get(client_id)
        fresh = info is None or now - info.last_seen > self.timeout
        if info is None:
            info = self.clients[client_id] = ClientInfo(client_id)
        info.last_seen = now
        info.busy = busy
        if num_examples is not None:
            info.num_examples = num_examples
        return fresh

    def leave(self, client_id: str) -> None:
        self.clients.pop(client_id, None)

    def alive(self, now: float) -> list[str]:
        """Ids of the clients heard from within the timeout, sorted."""
        return sorted(c for c, i in self.clients.items() if now - i.last_seen <= self.timeout)

    def is_alive(self, client_id: str, now: float) -> bool:
        info = self.clients.get(client_id)
        return info is not None and now - info.last_seen <= self.timeout

    def next_expiry(self, now: float) -> float | None:
        """When the next currently-alive client would time out (to wake up and notice it)."""
        times = [
            i.last_seen + self.timeout for i in self.clients.values() if i.last_seen + self.timeout >= now
        ]
        return min(times) if times else None


def sample_clients(
    available: list[str], *, fraction: float, min_clients: int, seed: int, round: int, attempt: int = 0
) -> list[str]:
    """``max(min_clients, ⌈fraction·n⌉)`` of the available clients, chosen by a generator seeded with
    ``(seed, round, attempt)``: the same inputs always pick the same clients (a resumed run re-picks them)."""
    if not 0.0 < fraction <= 1.0:
        raise FlError(f"fraction must be in (0, 1], got {fraction}")
    pool = sorted(available)
    k = min(len(pool), max(min_clients, math.ceil(fraction * len(pool))))
    if k == len(pool):
        return pool
    rng = np.random.default_rng([seed, round, attempt])
    chosen = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[int(i)] for i in chosen)
