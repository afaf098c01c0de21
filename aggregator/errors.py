"""Errors of the federated-learning package, under the one fedbus error tree::

FedbusError
├── ConfigError                 (fedbus.bus) a bad fl.yaml key, named
└── FlError
    ├── RoundError              a round that cannot complete (too few clients before the deadline)
    ├── UpdateRejected          a malformed, wrong-shape, stale or duplicate update (carries the reason)
    ├── StrategyError           a strategy misused (no updates, bad parameters)
    ├── SecAggError             secure aggregation cannot proceed (below threshold, bad share, abuse)
    └── PrivacyError            an invalid privacy setting or an exhausted budget
"""

from __future__ import annotations

from fedbus.bus.errors import FedbusError

__all__ = ["FlError", "PrivacyError", "RoundError", "SecAggError", "StrategyError", "UpdateRejected"]


class FlError(FedbusError):
    """Base of the federated-learning errors."""


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
