"""The events of Launch: agent liveness, the contract-net flow, job reports, logs and the job lifecycle.

The flow, with the subject key of each event::

    CLI        JobSubmit(job)  ──durable──►  scheduler                    (also JobCancel(job))
    scheduler  JobOffer(to)    ──────────►   the best candidates of the heartbeat view, one event each
    agent      JobBid(job)     ──────────►   scheduler                     (ok=False: a refusal, with why)
    scheduler  JobAward(agent) ──signed──►   agent, one per node; carries the attempt (fencing token)
    scheduler  JobReject(agent) ─signed──►   the bidders that lost: free the reservation
    agent      JobReport(job)  ──durable, signed──► scheduler: accepted/declined/running/exited
    scheduler  JobStop(agent)  ──signed──►   agent: cancel, or a stale attempt to kill
    agent      JobLog(job)     ──durable──►  CLI, inspector (batched lines)
    scheduler  JobStatus(job)  ──durable, signed──► everyone: the lifecycle (queued … succeeded)
    agent      AgentHeartbeat(agent) ─────►  scheduler, ``fedbus agents``: live capacity and running jobs

Every award and every report names the job's ``attempt``; the scheduler ignores reports from any other
attempt, so an agent that was presumed dead and comes back can neither complete nor overwrite a re-run.
"""

from __future__ import annotations

import enum

import msgspec

from fedbus.bus.events import Event, event

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
]

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

    gpus: int = 0
    free_gpus: int = 0
    gpu_model: str = ""
    gpu_memory_gb: float = 0.0
    cpus: float = 0.0
    free_cpus: float = 0.0
    memory_gb: float = 0.0
    free_memory_gb: float = 0.0
    disk_gb: float = 0.0
    free_disk_gb: float = 0.0
    price_per_hour: float = 0.0
    """Per GPU, or per node for jobs that use no GPU."""
    labels: dict[str, str] = {}


class JobRef(msgspec.Struct, frozen=True, array_like=True):
    """A job attempt an agent holds (reserved, starting or running)."""

    job_id: str
    attempt: int


class LogLine(msgspec.Struct, frozen=True, array_like=True):
    """One line of a job's output; ``stream`` is stdout, stderr or system (the agent's own notes)."""

    t_ns: int
    stream: str
    rank: int
    text: str


@event("agents", "heartbeat", key="agent_id")
class AgentHeartbeat(Event):
    """An agent is alive: its status, live capacity and the job attempts it holds (which renews their
    leases). ``instance`` changes when the agent process restarts."""

    agent_id: str
    kind: str
    status: str
    instance: str
    seq: int
    interval_s: float
    address: str = ""
    capacity: Capacity | None = None
    jobs: list[JobRef] = []
    public_key: bytes | None = None


@event("jobs", "submit", key="job_id", durable=True)
class JobSubmit(Event):
    """A new job; ``spec.workspace`` is the object-store name of its packed workspace, if any."""

    job_id: str
    jobspec: JobSpec
    submitted_by: str = ""


@event("jobs", "cancel", key="job_id", durable=True)
class JobCancel(Event):
    """Stop a job in whatever state it is."""

    job_id: str
    reason: str = "cancelled by user"


@event("jobs", "offer", key="to")
class JobOffer(Event):
    """A call for proposals to agent ``to``: bid by ``deadline_ns`` if you can run one node of this job, or
    refuse with the reason. Offers go to the best candidates of the scheduler's heartbeat view only."""

    to: str
    job_id: str
    round: int
    nodes: int
    needs: Computing
    deadline_ns: int


@event("jobs", "bid", key="job_id")
class JobBid(Event):
    """An agent's proposal for one node of a job, or (``ok=False``) its refusal with the reason."""

    job_id: str
    round: int
    agent_id: str
    ok: bool = True
    reason: str = ""
    capacity: Capacity | None = None
    cost_per_hour: float = 0.0
    address: str = ""
    port: int = 0
    """A port free on the agent, used as MASTER_PORT when it becomes rank 0."""


@event("jobs", "award", key="agent_id", signed=True)
class JobAward(Event):
    """One node of a job is awarded to ``agent_id``; ``attempt`` is the fencing token for everything after."""

    agent_id: str
    job_id: str
    attempt: int
    round: int
    node_rank: int
    nodes: int
    master_addr: str
    master_port: int
    jobspec: JobSpec
    accept_by_ns: int


@event("jobs", "reject", key="agent_id", signed=True)
class JobReject(Event):
    """Contract net's reject-proposal: ``agent_id`` bid in ``round`` and lost; it may free its reservation."""

    agent_id: str
    job_id: str
    round: int


@event("jobs", "report", key="job_id", durable=True, signed=True)
class JobReport(Event):
    """An agent's news about its node of one job attempt."""

    job_id: str
    attempt: int
    agent_id: str
    node_rank: int
    phase: ReportPhase
    exit_code: int | None = None
    reason: str = ""


@event("jobs", "stop", key="agent_id", signed=True)
class JobStop(Event):
    """Stop one job attempt on ``agent_id``: SIGTERM, then SIGKILL after ``grace_s``."""

    agent_id: str
    job_id: str
    attempt: int
    reason: str = ""
    grace_s: float = 10.0


@event("jobs", "log", key="job_id", durable=True)
class JobLog(Event):
    """A batch of output lines of one node of one job attempt."""

    job_id: str
    attempt: int
    agent_id: str
    node_rank: int
    seq: int
    lines: list[LogLine]
    dropped: int = 0


@event("jobs", "status", key="job_id", durable=True, signed=True)
class JobStatus(Event):
    """A job changed state; ``reason`` says why (for ``queued``: why it is waiting)."""

    job_id: str
    state: JobState
    attempt: int
    seq: int
    reason: str = ""
    agents: list[str] = []
    exit_code: int | None = None


#: Every event type this package declares.
EVENT_TYPES: tuple[type[Event], ...] = (
    AgentHeartbeat, JobSubmit, JobCancel, JobOffer, JobBid, JobAward, JobReject, JobReport, JobStop, JobLog,
    JobStatus,
)
