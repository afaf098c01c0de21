"""A node's books: what is reserved (bid for, until the award or a timeout) and what is held (running).

Pure logic, no I/O: the GPU agent asks :meth:`Ledger.reserve` before bidding, :meth:`Ledger.confirm` when
an award arrives, :meth:`Ledger.release` when a job ends, and sends :meth:`Ledger.capacity` in heartbeats.
Specific GPU indices are handed out (lowest first), so ``CUDA_VISIBLE_DEVICES`` never overlaps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .events import Capacity, JobRef
from .jobspec import Computing
from .placement import fit_problem
from .resources import Resources

__all__ = ["Hold", "Ledger"]


@dataclass(slots=True)
class Hold:
    """Resources set aside for one job: reserved while ``attempt`` is ``None``, then held for that attempt."""

    job_id: str
    needs: Computing
    gpu_ids: tuple[int, ...]
    expires: float | None
    attempt: int | None = None
    round: int = 0


class Ledger:
    """Reservations and holds against a node's :class:`Resources`."""

    def __init__(self, resources: Resources, *, price_per_hour: float = 0.0,
                 labels: dict[str, str] | None = None, free_disk: Callable[[], float] | None = None) -> None:
        self.resources = resources
        self.price_per_hour = price_per_hour
        self.labels = dict(labels or {})
        self._free_disk = free_disk
        self._holds: dict[str, Hold] = {}

    def _expire(self, now: float) -> None:
        for job_id in [j for j, h in self._holds.items() if h.expires is not None and h.expires <= now]:
            del self._holds[job_id]

    def capacity(self, now: float, *, exclude: str | None = None) -> Capacity:
        """Totals and what is free now (``exclude``: as if that job's reservation did not exist)."""
        self._expire(now)
        holds = [h for j, h in self._holds.items() if j != exclude]
        res = self.resources
        disk_free = self._free_disk() if self._free_disk is not None else res.disk_gb
        # Never negative (a full disk, an overcommit): the schema refuses negative amounts on the wire.
        return Capacity(
            gpus=len(res.gpus), free_gpus=max(len(res.gpus) - sum(len(h.gpu_ids) for h in holds), 0),
            gpu_model=res.gpu_model, gpu_memory_gb=res.gpu_memory_gb,
            cpus=res.cpus, free_cpus=max(round(res.cpus - sum(h.needs.cpus_per_node for h in holds), 3), 0.0),
            memory_gb=res.memory_gb,
            free_memory_gb=max(round(res.memory_gb - sum(h.needs.min_memory_gb for h in holds), 3), 0.0),
            disk_gb=res.disk_gb,
            free_disk_gb=max(round(min(disk_free, res.disk_gb) - sum(h.needs.min_disk_gb for h in holds), 3),
                             0.0),
            price_per_hour=self.price_per_hour, labels=self.labels,
        )

    def reserve(self, job_id: str, needs: Computing, *, expires: float, now: float,
                round: int = 0) -> Hold | str:
        """Set resources aside for one node of a job until ``expires``; a reason string when it cannot."""
        current = self._holds.get(job_id)
        if current is not None and current.attempt is not None:
            return f"already running job {job_id}"
        problem = fit_problem(needs, self.capacity(now, exclude=job_id))
        if problem is not None:
            return problem
        used = {i for j, h in self._holds.items() if j != job_id for i in h.gpu_ids}
        free = [g.index for g in self.resources.gpus if g.index not in used]
        hold = Hold(job_id, needs, tuple(free[: needs.gpus_per_node]), expires, round=round)
        self._holds[job_id] = hold
        return hold

    def confirm(self, job_id: str, attempt: int, needs: Computing, *, now: float) -> Hold | str:
        """Turn the reservation into a hold for ``attempt`` (reserving afresh if it lapsed)."""
        self._expire(now)
        hold = self._holds.get(job_id)
        if hold is not None and hold.attempt is not None:
            return hold if hold.attempt == attempt else f"already running attempt {hold.attempt}"
        if hold is None:
            reserved = self.reserve(job_id, needs, expires=now + 1.0, now=now)
            if isinstance(reserved, str):
                return reserved
            hold = reserved
        hold.attempt, hold.expires = attempt, None
        return hold

    def release(self, job_id: str, attempt: int | None = None) -> None:
        """Free a job's resources (only if they are held for ``attempt``, when given)."""
        hold = self._holds.get(job_id)
        if hold is not None and (attempt is None or hold.attempt in (None, attempt)):
            del self._holds[job_id]

    def unreserve(self, job_id: str, round: int) -> bool:
        """Drop the reservation made in ``round`` (the bid lost); holds for an attempt stay."""
        hold = self._holds.get(job_id)
        if hold is None or hold.attempt is not None or hold.round != round:
            return False
        del self._holds[job_id]
        return True

    def get(self, job_id: str) -> Hold | None:
        return self._holds.get(job_id)

    def held(self) -> list[JobRef]:
        """The job attempts held (not mere reservations)."""
        return [JobRef(h.job_id, h.attempt) for h in self._holds.values() if h.attempt is not None]
