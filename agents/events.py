"""The events of Launch: agent liveness, the contract-net flow, job reports, logs and the job lifecycle.

The flow, with the subject key of each event and who may publish it (admin may always)::

    admin      JobSubmit(job)  ──durable, signed by the submitter──►  scheduler     (also JobCancel(job))
    scheduler  JobOffer(to)    ──────────►   the best candidates of the heartbeat view, one event each
    agent      JobBid(job)     ──signed──►   scheduler                     (ok=False: a refusal, with why)
    scheduler  JobAward(agent) ──signed──►   agent, one per node; carries the attempt (fencing token)
    scheduler  JobReject(agent) ─signed──►   the bidders that lost: free the reservation
    agent      JobReport(job)  ──durable, signed──► scheduler: accepted/declined/running/exited
    scheduler  JobStop(agent)  ──signed──►   agent: cancel, or a stale attempt to kill
    agent      JobLog(job)     ──durable──►  admin: the CLI, the inspector (batched lines)
    scheduler  JobStatus(job)  ──durable, signed──► admin, observers: the lifecycle (queued … succeeded)
    agent      AgentHeartbeat(agent) ─────►  scheduler, observers: live capacity and running jobs

Every award and every report names the job's ``attempt``; the scheduler ignores reports from any other
attempt, so an agent that was presumed dead and comes back can neither complete nor overwrite a re-run.

Every field that becomes a subject token, a path, a KV key or an object name is an
:data:`~fedbus.bus.roles.Id`, checked by the codec on decode: a ``job_id`` of ``../../x`` never reaches a
handler. Reasons that end up in job records are bounded (:data:`Why`).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from fedbus.bus.events import Event, event
from fedbus.bus.roles import Id

from .jobspec import Computing, JobSpec

__all__ = [
    "EVENT_TYPES",
    "AgentHeartbeat",
    "Capacity",
    "JobAward",
    "JobBid",
    "JobCancel",
    "JobLog",
    "JobOffer",
    "JobRef",
    "JobReject",
    "JobReport",
    "JobState",
    "JobStatus",
    "JobStop",
    "JobSubmit",
    "LogLine",
    "ReportPhase",
    "Why",
]

#: A reason an agent or a user gives (bounded: reasons end up in job records and their history).
Why = Annotated[str, msgspec.Meta(max_length=2000)]
#: A short word (an agent's kind or status).
Word = Annotated[str, msgspec.Meta(max_length=64)]
#: Resources and prices: finite and not negative (a NaN or an infinity would win every placement).
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

class JobState(enum.StrEnum):
    """A job's lifecycle. ``lost`` is transient: the job goes back to ``queued`` (retry) or to ``failed``."""

    QUEUED = "queued"
    OFFERED = "offered"
    AWARDED = "awarded"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ReportPhase(enum.StrEnum):
    """What an agent reports about its part (one node) of a job attempt."""

    ACCEPTED = "accepted"
    DECLINED = "declined"
    RUNNING = "running"
    EXITED = "exited"
    LOST = "lost"
    """The agent gave the job up (it is shutting down): not the job's fault, so it is retried."""


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's resources: totals and what is free now (after reservations and running jobs)."""

    gpus: Count = 0
    free_gpus: Count = 0
    gpu_model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    gpu_memory_gb: Amount = 0.0
    cpus: Amount = 0.0
    free_cpus: Amount = 0.0
    memory_gb: Amount = 0.0
    free_memory_gb: Amount = 0.0
    disk_gb: Amount = 0.0
    free_disk_gb: Amount = 0.0
    price_per_hour: Amount = 0.0
    """Per GPU, or per node for jobs that use no GPU."""
    labels: Annotated[dict[str, str], msgspec.Meta(max_length=64)] = {}


class JobRef(msgspec.Struct, frozen=True, array_like=True):
    """A job attempt an agent holds (reserved, starting or running)."""

    job_id: Id
    attempt: int


class LogLine(msgspec.Struct, frozen=True, array_like=True):
    """One line of a job's output; ``stream`` is stdout, stderr or system (the agent's own notes)."""

    t_ns: int
    stream: str
    rank: int
    text: str


@event("agents", "heartbeat", key="agent_id", pub=("scheduler:self", "gpu-agent:self", "device:self",
                                                   "aggregator:self", "observer:self", "gateway:self",
                                                   "replica:self"),
       sub=("scheduler", "observer"))
class AgentHeartbeat(Event):
    """An agent is alive: its status, live capacity and the job attempts it holds (which renews their
    leases). ``instance`` changes when the agent process restarts."""

    agent_id: Id
    kind: Word
    status: Word
    instance: Word
    seq: int
    interval_s: float
    address: str = ""
    capacity: Capacity | None = None
    jobs: list[JobRef] = []
    public_key: bytes | None = None


@event("jobs", "submit", key="job_id", durable=True, pub=(), sub=("scheduler",))
class JobSubmit(Event):
    """A new job; ``spec.workspace`` is the object-store name of its packed workspace, if any.

    Signed by the submitter when it has credentials; a secure scheduler accepts it only when signed by the
    registered key of ``submitted_by``, an admin identity (see ``docs/launch.md``)."""

    job_id: Id
    jobspec: JobSpec
    submitted_by: Id | None = None


@event("jobs", "cancel", key="job_id", durable=True, pub=(), sub=("scheduler",))
class JobCancel(Event):
    """Stop a job in whatever state it is; signed like :class:`JobSubmit`, by ``cancelled_by``."""

    job_id: Id
    reason: Why = "cancelled by user"
    cancelled_by: Id | None = None


@event("jobs", "offer", key="to", pub=("scheduler",), sub=("gpu-agent:self", "device:self"))
class JobOffer(Event):
    """A call for proposals to agent ``to``: bid by ``deadline_ns`` if you can run one node of this job, or
    refuse with the reason. Offers go to the best candidates of the scheduler's heartbeat view only."""

    to: Id
    job_id: Id
    round: int
    nodes: int
    needs: Computing
    deadline_ns: int


@event("jobs", "bid", key="job_id", signed=True, pub=("gpu-agent", "device"), sub=("scheduler",))
class JobBid(Event):
    """An agent's proposal for one node of a job, or (``ok=False``) its refusal with the reason; the
    scheduler counts it only when signed by ``agent_id``'s registered key."""

    job_id: Id
    round: int
    agent_id: Id
    ok: bool = True
    reason: Why = ""
    capacity: Capacity | None = None
    cost_per_hour: Amount = 0.0
    address: Annotated[str, msgspec.Meta(max_length=256)] = ""
    port: Port = 0
    """A port free on the agent, used as MASTER_PORT when it becomes rank 0."""


@event("jobs", "award", key="agent_id", signed=True, pub=("scheduler",),
       sub=("gpu-agent:self", "device:self"))
class JobAward(Event):
    """One node of a job is awarded to ``agent_id``; ``attempt`` is the fencing token for everything after."""

    agent_id: Id
    job_id: Id
    attempt: int
    round: int
    node_rank: int
    nodes: int
    master_addr: str
    master_port: int
    jobspec: JobSpec
    accept_by_ns: int


@event("jobs", "reject", key="agent_id", signed=True, pub=("scheduler",),
       sub=("gpu-agent:self", "device:self"))
class JobReject(Event):
    """Contract net's reject-proposal: ``agent_id`` bid in ``round`` and lost; it may free its reservation."""

    agent_id: Id
    job_id: Id
    round: int


@event("jobs", "report", key="job_id", durable=True, signed=True, pub=("gpu-agent", "device"),
       sub=("scheduler",))
class JobReport(Event):
    """An agent's news about its node of one job attempt (counted only when signed by ``agent_id``)."""

    job_id: Id
    attempt: int
    agent_id: Id
    node_rank: int
    phase: ReportPhase
    exit_code: int | None = None
    reason: Why = ""


@event("jobs", "stop", key="agent_id", signed=True, pub=("scheduler",),
       sub=("gpu-agent:self", "device:self"))
class JobStop(Event):
    """Stop one job attempt on ``agent_id``: SIGTERM, then SIGKILL after ``grace_s``."""

    agent_id: Id
    job_id: Id
    attempt: int
    reason: str = ""
    grace_s: float = 10.0


@event("jobs", "log", key="job_id", durable=True, pub=("gpu-agent", "device"), sub=())
class JobLog(Event):
    """A batch of output lines of one node of one job attempt (readable by admin, the submitter's role)."""

    job_id: Id
    attempt: int
    agent_id: Id
    node_rank: int
    seq: int
    lines: list[LogLine]
    dropped: int = 0


@event("jobs", "status", key="job_id", durable=True, signed=True, pub=("scheduler",), sub=("observer",))
class JobStatus(Event):
    """A job changed state; ``reason`` says why (for ``queued``: why it is waiting)."""

    job_id: Id
    state: JobState
    attempt: int
    seq: int
    reason: str = ""
    agents: list[Id] = []
    exit_code: int | None = None


#: Every event type this package declares.
EVENT_TYPES: tuple[type[Event], ...] = (
    AgentHeartbeat, JobSubmit, JobCancel, JobOffer, JobBid, JobAward, JobReject, JobReport, JobStop, JobLog,
    JobStatus,
)
