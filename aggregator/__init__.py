"""fedbus.aggregator: federated learning as events (aggregator, clients, strategies, privacy, secure
aggregation). Pure numpy; torch lives in :mod:`fedbus.trainer`. See ``docs/federate.md``.

The names below are imported on first use (PEP 562), so that ``import fedbus.aggregator.events`` (what
``fedbus tail`` does to decode ``fl.*`` events) needs neither numpy nor the ``ml`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbus.bus.lazy import lazy_exports

if TYPE_CHECKING:
    from .client import ClientFaults, EvalOutcome, FitOutcome, FlClient, LocalTrainer
    from .config import FlConfig, RoundSettings, load_config, parse_config
    from .federation import SimulationOptions, simulate
    from .privacy import CentralDp, RdpAccountant
    from .server import Aggregator, RunResult
    from .strategies import Strategy, Update, make_strategy

__all__ = [
    "Aggregator",
    "CentralDp",
    "ClientFaults",
    "EvalOutcome",
    "FitOutcome",
    "FlClient",
    "FlConfig",
    "LocalTrainer",
    "RdpAccountant",
    "RoundSettings",
    "RunResult",
    "SimulationOptions",
    "Strategy",
    "Update",
    "load_config",
    "make_strategy",
    "parse_config",
    "simulate",
]

_HOME = {
    "ClientFaults": ".client", "EvalOutcome": ".client", "FitOutcome": ".client", "FlClient": ".client",
    "LocalTrainer": ".client",
    "FlConfig": ".config", "RoundSettings": ".config", "load_config": ".config", "parse_config": ".config",
    "SimulationOptions": ".federation", "simulate": ".federation",
    "CentralDp": ".privacy", "RdpAccountant": ".privacy",
    "Aggregator": ".server", "RunResult": ".server",
    "Strategy": ".strategies", "Update": ".strategies", "make_strategy": ".strategies",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__)
