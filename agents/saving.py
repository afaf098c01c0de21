"""Storing the scheduler's job records: compare-and-set, claims taken over, and failures that end.

:class:`RecordSaver` writes each record on the revision the scheduler wrote last. A new record takes over its
submitter's claim (:mod:`fedbus.agents.records`) when the claim names the same submission, and is refused
when the id belongs to another job. While the broker is away a save waits (write-ahead: nothing is sent that
was not saved); a refusal by the bucket's limits (too large, or full) ends the save at once, and any other
error after ``give_up_s``, with a :class:`SaveFailure`, so one record that cannot be stored never blocks the
others: a new one is dropped (its submission is tried again later, with a growing delay, then dead-lettered),
an existing one is saved again with the next batches, a few times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from fedbus.bus.errors import Conflict, FedbusError, NotFound, TransportError
from fedbus.bus.limits import LimitExceeded
from fedbus.bus.stores import KeyValue

from .events import JobState, JobStatus
from .records import decode_record, encode_record, is_claim, refused_record
from .scheduling import JobRecord

__all__ = ["RecordSaver", "SaveFailure"]

_RESAVES = 5


@dataclass(frozen=True, slots=True)
class SaveFailure:
    """Why a record was not stored. ``new``: it never was; ``refuse``: trying again cannot help."""

    reason: str
    new: bool
    refuse: bool = False


class _Taken(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordSaver:
    """Saves job records to the ``jobs`` bucket; see the module docstring."""

    def __init__(self, jobs: KeyValue, *, max_bytes: int, log: Any, give_up_s: float = 0.5) -> None:
        self.jobs = jobs
        self.max_bytes = max_bytes
        self.give_up_s = give_up_s
        self.log = log
        self._revisions: dict[str, int] = {}
        self._claims: dict[str, tuple[str, int]] = {}
        """Claims not taken over yet: job id → (submission id, revision)."""
        self._dirty: dict[str, int] = {}
        """Stored records whose last save failed → failed saves so far."""

    def adopt(self, records: list[tuple[JobRecord, int]], claims: list[tuple[JobRecord, int]]) -> None:
        """What the store held at start: the scheduler's records and submitters' claims, with revisions."""
        self._revisions.update((rec.job_id, revision) for rec, revision in records)
        self._claims.update((rec.job_id, (rec.submit_id, revision)) for rec, revision in claims)

    def stored(self, job_id: str) -> bool:
        """Whether this scheduler stored a record under ``job_id`` (finished jobs leave memory, not the store)."""
        return job_id in self._revisions

    async def save_all(self, saves: Mapping[str, JobRecord], *, jobs: Mapping[str, JobRecord]
                       ) -> dict[str, SaveFailure]:
        """Save ``saves`` (and records whose earlier save failed); returns the failures by job id."""
        todo = dict(saves)
        for job_id in list(self._dirty):
            if job_id in jobs:
                todo.setdefault(job_id, jobs[job_id])
            else:
                del self._dirty[job_id]
        results = await asyncio.gather(*(self.save(rec) for rec in todo.values()))
        return {rec.job_id: failure for rec, failure in zip(todo.values(), results, strict=True)
                if failure is not None}

    async def save(self, rec: JobRecord) -> SaveFailure | None:
        """Store ``rec``; ``None`` once stored."""
        job_id, data = rec.job_id, encode_record(rec)
        new = job_id not in self._revisions
        if len(data) > self.max_bytes:
            return self._failed(job_id, new, f"its record is {len(data)} bytes, over the limit of "
                                             f"{self.max_bytes}", refuse=new)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.give_up_s
        delay = 0.1
        while True:
            try:
                revision = self._revisions.get(job_id)
                if revision is None:
                    revision = self._claimed(rec)
                if revision is None:
                    self._revisions[job_id] = await self.jobs.create(job_id, data)
                else:
                    self._revisions[job_id] = await self.jobs.update(job_id, data, revision=revision)
                self._claims.pop(job_id, None)
                self._dirty.pop(job_id, None)
                return None
            except _Taken as taken:
                return self._failed(job_id, new, taken.reason, refuse=True)
            except Conflict:
                await self._conflict(rec, new)
                continue
            except LimitExceeded as exc:  # not now: maybe later (a full bucket), the attempts will tell
                return self._failed(job_id, new, f"its record cannot be stored: {exc}")
            except TransportError as exc:  # the broker is away: everything waits for it
                self.log.warning("job record not saved yet; retrying", job_id=job_id, error=str(exc))
            except FedbusError as exc:
                if loop.time() + delay > give_up:
                    return self._failed(job_id, new, f"its record cannot be stored: {exc}")
                self.log.warning("job record not saved; trying again", job_id=job_id, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _claimed(self, rec: JobRecord) -> int | None:
        """The revision of the submitter's claim on ``rec``'s id, if it has one; raises if the id is taken."""
        claim = self._claims.get(rec.job_id)
        if claim is None:
            return None
        submit_id, revision = claim
        if submit_id != rec.submit_id:
            raise _Taken(f"job id {rec.job_id!r} was claimed by another submission")
        return revision

    async def _conflict(self, rec: JobRecord, new: bool) -> None:
        """The stored record is not the one we wrote last: learn what it is, or raise :class:`_Taken`."""
        stored, revision = await self._stored(rec.job_id)
        if stored is not None and is_claim(stored):
            self._claims[rec.job_id] = (stored.submit_id, revision or 0)
            self._revisions.pop(rec.job_id, None)
            return
        if new and stored is not None and stored.submit_id != rec.submit_id:
            raise _Taken(f"job id {rec.job_id!r} is taken (submitted by {stored.submitted_by or '?'})")
        self.log.error("job record was changed by someone else (two schedulers?); overwriting",
                       job_id=rec.job_id, ours=self._revisions.get(rec.job_id), theirs=revision)
        if revision is None:
            self._revisions.pop(rec.job_id, None)
        else:
            self._revisions[rec.job_id] = revision

    async def _stored(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        try:
            entry = await self.jobs.get(job_id)
        except NotFound:
            return None, None
        try:
            return decode_record(entry.value), entry.revision
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, entry.revision

    def _failed(self, job_id: str, new: bool, reason: str, *, refuse: bool = False) -> SaveFailure:
        if not new:
            count = self._dirty[job_id] = self._dirty.get(job_id, 0) + 1
            if count >= _RESAVES:  # it stays as it was stored; the job goes on in memory
                del self._dirty[job_id]
                self.log.error("job record cannot be saved; giving up on it", job_id=job_id, reason=reason)
        self.log.warning("job record not saved", job_id=job_id, new=new, reason=reason)
        return SaveFailure(reason, new=new, refuse=refuse)

    async def refuse_claim(self, job_id: str, submit_id: str, reason: str) -> JobStatus | None:
        """Mark the claim made for submission ``submit_id`` failed with ``reason`` (the scheduler refused
        the submission); the status to announce, or ``None`` if there was no such claim."""
        try:
            stored, revision = await self._stored(job_id)
            if stored is None or revision is None or not is_claim(stored) or stored.submit_id != submit_id:
                return None
            failed = refused_record(stored, reason, now=time.time())
            await self.jobs.update(job_id, encode_record(failed), revision=revision)
        except FedbusError as exc:
            self.log.warning("claim not marked failed", job_id=job_id, error=str(exc))
            return None
        self._claims.pop(job_id, None)
        return JobStatus(job_id=job_id, state=JobState.FAILED, attempt=0, seq=failed.seq, reason=failed.reason)
