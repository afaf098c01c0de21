"""The federated-learning stage of ``make demo``: a short FedAvg run on the bundled digits against a given
broker, with a progress bar. Registered under the ``fedbus.demo`` entry point group (:data:`STAGES`); on the
demo's secure broker the aggregator and each client log in with credentials issued for their roles."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console

from fedbus.bus.creds import Credentials

from .config import parse_config
from .federation import SimulationOptions, simulate
from .progress import ProgressView
from .server import RunResult

if TYPE_CHECKING:
    from fedbus.bus.demo import DemoContext

__all__ = ["STAGES", "demo_stage", "stage"]


async def demo_stage(url: str, console: Console, *, clients: int = 5, rounds: int = 5,
                     aggregator_creds: Credentials | None = None,
                     client_creds: Sequence[Credentials] = ()) -> RunResult:
    """Run ``clients`` digits clients and an aggregator (FedAvg, Dirichlet α = 0.5) for ``rounds`` rounds on
    the broker at ``url``; returns the aggregator's result. With ``client_creds`` (one per client) each agent
    logs in as its own credential. Needs the ``ml`` extra (torch)."""
    import torch

    from fedbus.trainer.setup import prepare

    torch.set_num_threads(1)
    config = parse_config(
        {
            "run_id": f"demo-{time.time_ns() // 1_000_000}",
            "rounds": rounds,
            "seed": 0,
            "model": {"name": "mlp", "hidden": [64]},
            "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5},
            "clients": {"count": clients, "local_epochs": 2, "batch_size": 8, "lr": 0.3},
            "round": {
                "min_clients": clients,
                "min_available": clients,
                "heartbeat_s": 0.5,
                "heartbeat_timeout_s": 3.0,
                "evaluate_every": 0,
            },
        }
    )
    federation = prepare(config)
    with ProgressView(console, rounds, title=f"federated digits ({clients} clients, FedAvg)") as view:
        return await simulate(
            config,
            federation.trainers,
            federation.initial,
            options=SimulationOptions(server=url, aggregator_creds=aggregator_creds, client_creds=client_creds),
            evaluate_fn=federation.evaluate,
            on_event=view,
        )


async def stage(ctx: DemoContext) -> None:
    """``make demo`` stage: a federation over the demo's broker, every agent with its own credential."""
    clients = 5
    aggregator, *silos = await ctx.creds(("aggregator", "aggregator"),
                                         *(("fl-client", f"silo-{i}") for i in range(1, clients + 1)))
    result = await demo_stage(ctx.url, ctx.console, clients=clients, aggregator_creds=aggregator, client_creds=silos)
    accuracy = result.history[-1].get("test_accuracy", 0.0) if result.history else 0.0
    ctx.tally["federated rounds"] += result.rounds
    ctx.say(
        "aggregator",
        f"federation done: {result.rounds} rounds, global model v{result.version}, "
        f"test accuracy {accuracy:.3f}",
    )


#: Registered under the ``fedbus.demo`` entry point group: ``make demo`` runs these after the launch stage.
STAGES = [("Federate: FedAvg on digits, 5 clients, 5 rounds", stage, 90.0)]
