"""Job records as the ``jobs`` bucket keeps them, and the claim a submitter makes on a job id.

One key per job id. The scheduler writes every record it keeps (compare-and-set on the revision it wrote
last); a submitter writes only the first, the *claim*: a record with ``seq == 0`` created with a
compare-and-set create before anything else is sent, so a job id that is taken is refused to the submitter
at once and never overwrites the first job's record or workspace. The claim names the envelope id of the
submission that follows it (``submit_id``); the scheduler turns the claim into the job's record when that
submission arrives, and marks it failed, with the reason, when it refuses the submission.
"""

from __future__ import annotations

import msgspec

from .events import JobState
from .jobspec import JobSpec
from .scheduling import JobRecord, Transition

__all__ = ["JOBS_BUCKET", "claim_record", "decode_record", "encode_record", "is_claim", "refused_record"]

JOBS_BUCKET = "jobs"
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(JobRecord)
_WAITING = "submitted; waiting for the scheduler"


def encode_record(rec: JobRecord) -> bytes:
    """A job record as stored in the ``jobs`` bucket."""
    return _ENCODER.encode(rec)


def decode_record(data: bytes) -> JobRecord:
    """The inverse of :func:`encode_record`."""
    return _DECODER.decode(data)


def claim_record(job_id: str, spec: JobSpec, *, submit_id: str, submitted_by: str, now: float) -> JobRecord:
    """The record a submitter creates (compare-and-set) before it sends the submission ``submit_id``."""
    return JobRecord(job_id=job_id, spec=spec, state=JobState.QUEUED, created=now, updated=now,
                     submitted_by=submitted_by, submit_id=submit_id, reason=_WAITING, seq=0,
                     history=[Transition(now, JobState.QUEUED, 0, _WAITING)])


def is_claim(rec: JobRecord) -> bool:
    """Whether ``rec`` is a submitter's claim that no scheduler has taken over yet."""
    return rec.seq == 0


def refused_record(claim: JobRecord, reason: str, *, now: float) -> JobRecord:
    """The claim, turned into a failed job: the scheduler refused its submission."""
    why = f"refused by the scheduler: {reason}"
    return msgspec.structs.replace(claim, state=JobState.FAILED, reason=why, updated=now, seq=1,
                                   history=[*claim.history, Transition(now, JobState.FAILED, 0, why)])
