"""fedbus.agents: the agent runtime, the Launch scheduler and GPU agents, and the launch CLI (issue #3).

See ``docs/launch.md``. The import-light pieces (job files, events, the pure scheduling core) can be used
without starting anything; the daemons are :class:`SchedulerAgent` and :class:`GpuAgent`.
"""

from .client import LaunchClient
from .errors import AgentError, JobError, JobSpecError, ResourceError, UnknownJob, WorkspaceError
from .events import (
    AgentHeartbeat,
    Capacity,
    JobAward,
    JobBid,
    JobCancel,
    JobLog,
    JobOffer,
    JobReject,
    JobReport,
    JobState,
    JobStatus,
    JobStop,
    JobSubmit,
)
from .gpu import GpuAgent, GpuAgentConfig
from .jobspec import Computing, JobSpec, LoadedJob, load_jobspec, parse_jobspec
from .placement import BinPack, LowestCost, Policy, Spread, policy_named
from .runtime import Agent, AgentStatus, RuntimeConfig
from .scheduler import SchedulerAgent, SchedulerAgentConfig
from .scheduling import JobRecord, SchedulerConfig, SchedulingCore

__all__ = [
    "Agent",
    "AgentError",
    "AgentHeartbeat",
    "AgentStatus",
    "BinPack",
    "Capacity",
    "Computing",
    "GpuAgent",
    "GpuAgentConfig",
    "JobAward",
    "JobBid",
    "JobCancel",
    "JobError",
    "JobLog",
    "JobOffer",
    "JobRecord",
    "JobReject",
    "JobReport",
    "JobSpec",
    "JobSpecError",
    "JobState",
    "JobStatus",
    "JobStop",
    "JobSubmit",
    "LaunchClient",
    "LoadedJob",
    "LowestCost",
    "Policy",
    "ResourceError",
    "RuntimeConfig",
    "SchedulerAgent",
    "SchedulerAgentConfig",
    "SchedulerConfig",
    "SchedulingCore",
    "Spread",
    "UnknownJob",
    "WorkspaceError",
    "load_jobspec",
    "parse_jobspec",
    "policy_named",
]
