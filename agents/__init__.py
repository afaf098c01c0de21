"""fedbus.agents: the agent runtime, the Launch scheduler and GPU agents, and the launch CLI (issue #3).

See ``docs/launch.md``. The import-light pieces (job files, events, the pure scheduling core) can be used
without starting anything; the daemons are :class:`SchedulerAgent` and :class:`GpuAgent`.

The names below are imported on first use (PEP 562), so that ``import fedbus.agents.events`` (what
``fedbus tail`` does) does not pull in the daemons and aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbus.bus.lazy import lazy_exports

if TYPE_CHECKING:
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

_HOME = {
    "LaunchClient": ".client",
    **dict.fromkeys(("AgentError", "JobError", "JobSpecError", "ResourceError", "UnknownJob", "WorkspaceError"),
                    ".errors"),
    **dict.fromkeys(("AgentHeartbeat", "Capacity", "JobAward", "JobBid", "JobCancel", "JobLog", "JobOffer",
                     "JobReject", "JobReport", "JobState", "JobStatus", "JobStop", "JobSubmit"), ".events"),
    "GpuAgent": ".gpu", "GpuAgentConfig": ".gpu",
    **dict.fromkeys(("Computing", "JobSpec", "LoadedJob", "load_jobspec", "parse_jobspec"), ".jobspec"),
    **dict.fromkeys(("BinPack", "LowestCost", "Policy", "Spread", "policy_named"), ".placement"),
    "Agent": ".runtime", "AgentStatus": ".runtime", "RuntimeConfig": ".runtime",
    "SchedulerAgent": ".scheduler", "SchedulerAgentConfig": ".scheduler",
    "JobRecord": ".scheduling", "SchedulerConfig": ".scheduling", "SchedulingCore": ".scheduling",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__)
