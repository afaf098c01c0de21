"""Errors of the federated-learning package, under the one fedbus error tree::

FedbusError
├── ConfigError                 (fedbus.bus) a bad fl.yaml key, named
└── FlError
    ├── RunExists               a new run was asked for, but its run id has state (also a ConfigError)
    ├── RoundError              a round that cannot complete (too few clients before the deadline)
    ├── UpdateRejected          a malformed, wrong-shape, stale or duplicate update (carries the reason)
    ├── StrategyError           a strategy misused (no updates, bad parameters)
    ├── SecAggError             secure aggregation cannot proceed (below threshold, bad share, abuse)
    └── PrivacyError            an invalid privacy setting or an exhausted budget
"""

from __future__ import annotations

from fedbus.bus.errors import ConfigError, FedbusError

__all__ = [
    "FlError",
    "PrivacyError",
    "RoundError",
    "RunExists",
    "SecAggError",
    "StrategyError",
    "UpdateRejected",
]


class FlError(FedbusError):
    """Base of the federated-learning errors."""


class RunExists(FlError, ConfigError):
    """The run id already names a run (a checkpoint exists): starting it afresh would mix two runs. Also a
    :class:`ConfigError` (the ``run_id`` the user chose), so the CLI exits with the usage code."""

    def __init__(self, run_id: str, *, round: int, rounds: int, finished: bool) -> None:
        where = "finished" if finished else f"stopped before round {round} of {rounds}"
        super().__init__(
            f"run {run_id!r} already exists ({where}); continue it with --resume or choose another run_id",
            key="run_id",
        )
        self.run_id = run_id
        self.round = round
        self.finished = finished


class RoundError(FlError):
    """A round could not complete."""

    def __init__(self, message: str, *, round: int, received: int = 0, needed: int = 0) -> None:
        super().__init__(f"round {round}: {message}")
        self.round = round
        self.received = received
        self.needed = needed


class UpdateRejected(FlError):
    """An update the aggregator refused; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str, *, client_id: str = "", round: int = -1) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.client_id = client_id
        self.round = round


class StrategyError(FlError):
    """A strategy was given input it cannot aggregate, or invalid parameters."""


class SecAggError(FlError):
    """Secure aggregation failed (too few survivors, a share that does not decrypt, a protocol abuse)."""

    def __init__(self, message: str, *, round: int = -1, stage: str = "") -> None:
        super().__init__(f"secagg {stage} round {round}: {message}" if stage else message)
        self.round = round
        self.stage = stage


class PrivacyError(FlError):
    """Invalid differential-privacy parameters."""
