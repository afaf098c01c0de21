"""fedbus.aggregator: federated learning as events (aggregator, clients, strategies, privacy, secure
aggregation). Pure numpy; torch lives in :mod:`fedbus.trainer`. See ``docs/federate.md``."""

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
