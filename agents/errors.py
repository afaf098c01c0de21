"""Errors of the agents package, under the one fedbus error tree::

    FedbusError
    ├── ConfigError
    │   └── JobSpecError        a job file that does not validate (names the key and the line)
    └── AgentError              an agent or the scheduler could not do what was asked
        ├── JobError            a job operation failed (``job_id`` names it)
        │   ├── UnknownJob      no job with that id
        │   └── WorkspaceError  the workspace could not be packed, fetched or unpacked
        └── ResourceError       resources could not be detected or reserved
"""

from __future__ import annotations

from fedbus.bus.errors import ConfigError, FedbusError

__all__ = ["AgentError", "JobError", "JobSpecError", "ResourceError", "UnknownJob", "WorkspaceError"]


class JobSpecError(ConfigError):
    """A job file that does not validate; ``key`` is the dotted path, ``line`` the 1-based line if known."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 line: int | None = None) -> None:
        where = f"{source}:{line}" if source and line else source
        super().__init__(message, key=key, source=where)
        self.line = line
        self.file = source


class AgentError(FedbusError):
    """An agent or the scheduler could not do what was asked."""


class JobError(AgentError):
    """A job operation failed."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(f"job {job_id}: {message}" if job_id else message)
        self.job_id = job_id


class UnknownJob(JobError):
    """No job with that id is known."""

    def __init__(self, job_id: str) -> None:
        super().__init__("no such job", job_id=job_id)


class WorkspaceError(JobError):
    """The job's workspace could not be packed, fetched or unpacked."""


class ResourceError(AgentError):
    """Resources could not be detected or reserved."""
