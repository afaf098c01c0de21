"""One round's bookkeeping, as pure logic: who was asked, who answered, who is late or gone, and when the
round may close. The server feeds it events and the clock; it never does I/O.

A synchronous fit round closes when every sampled client has answered, been rejected or vanished; or as soon
as ``min_clients`` answers are in when ``close_early``; or at the deadline. It succeeds with at least
``min_clients`` answers. An update is accepted at most once per client and round (idempotent: a duplicate is
refused, never folded twice).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fedbus.bus.events import Params

from .strategies import Aggregate, Update

__all__ = ["EvalRound", "FitRound", "Verdict", "weighted_metrics"]


class Verdict(enum.StrEnum):
    """Why an update was or was not taken."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"
    NOT_SAMPLED = "not_sampled"
    STALE = "stale"
    WRONG_VERSION = "wrong_version"


@dataclass
class FitRound:
    """A synchronous fit round in progress."""

    round: int
    attempt: int
    version: int
    sampled: list[str]
    min_clients: int
    deadline: float
    aggregate: Aggregate
    close_early: bool = False
    received: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    metrics: list[tuple[int, Params]] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    """Object-store names of the folded updates, deleted once the round is checkpointed."""

    def check(self, client_id: str, round: int, base_version: int) -> Verdict:
        """Whether an update for (``client_id``, ``round``) may be folded in now."""
        if round < self.round:
            return Verdict.LATE
        if client_id not in self.sampled:
            return Verdict.NOT_SAMPLED
        if client_id in self.received:
            return Verdict.DUPLICATE
        if round != self.round or base_version != self.version:
            return Verdict.WRONG_VERSION
        return Verdict.ACCEPTED

    def accept(self, update: Update) -> None:
        """Fold an update that :meth:`check` accepted."""
        self.aggregate.fold(update)
        self.received.append(update.client_id)
        self.rejected.pop(update.client_id, None)
        self.dropped.discard(update.client_id)
        self.metrics.append((update.num_examples, update.metrics))

    def reject(self, client_id: str, reason: str) -> None:
        """A sampled client's update was malformed: it counts as answered, without being folded in."""
        if client_id in self.sampled and client_id not in self.received:
            self.rejected[client_id] = reason

    def drop(self, client_id: str) -> None:
        """A sampled client vanished (missed heartbeats) before answering."""
        if client_id in self.sampled and client_id not in self.received:
            self.dropped.add(client_id)

    @property
    def pending(self) -> list[str]:
        """Sampled clients still expected to answer."""
        done = set(self.received) | set(self.rejected) | self.dropped
        return [c for c in self.sampled if c not in done]

    def closed(self, now: float) -> bool:
        if not self.pending:
            return True
        if self.close_early and len(self.received) >= self.min_clients:
            return True
        return now >= self.deadline

    @property
    def succeeded(self) -> bool:
        return len(self.received) >= self.min_clients

    def summary(self) -> Params:
        """Example-weighted means of the clients' reported metrics."""
        return weighted_metrics(self.metrics)


@dataclass
class EvalRound:
    """A federated evaluation round: clients evaluate the global model on their local data."""

    round: int
    version: int
    sampled: list[str]
    deadline: float
    reports: dict[str, tuple[int, float, Params]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def offer(
        self, client_id: str, round: int, version: int, num_examples: int, loss: float, metrics: Params
    ) -> Verdict:
        if round != self.round or version != self.version:
            return Verdict.LATE
        if client_id not in self.sampled:
            return Verdict.NOT_SAMPLED
        if client_id in self.reports:
            return Verdict.DUPLICATE
        self.reports[client_id] = (max(num_examples, 0), float(loss), metrics)
        return Verdict.ACCEPTED

    def drop(self, client_id: str) -> None:
        if client_id in self.sampled and client_id not in self.reports:
            self.dropped.add(client_id)

    def closed(self, now: float) -> bool:
        return all(c in self.reports or c in self.dropped for c in self.sampled) or now >= self.deadline

    def summary(self) -> Params:
        rows = [(n, {"loss": loss, **m}) for n, loss, m in self.reports.values()]
        return {f"eval_{k}": v for k, v in weighted_metrics(rows).items()}


def weighted_metrics(rows: list[tuple[int, Params]]) -> Params:
    """Example-weighted mean of every numeric metric present in the rows."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in rows:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + n * float(value)
                weights[key] = weights.get(key, 0.0) + n
    return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}
