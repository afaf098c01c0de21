"""The federated-learning stage of ``make demo``: a short FedAvg run on the bundled digits against a given
broker, with a progress bar. Add :func:`stage` to :data:`fedbus.bus.demo.STAGES`, or call
:func:`demo_stage`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console

from .config import parse_config
from .federation import SimulationOptions, simulate
from .progress import ProgressView
from .server import RunResult

if TYPE_CHECKING:
    from fedbus.bus.demo import DemoContext

__all__ = ["STAGES", "demo_stage", "stage"]


async def demo_stage(url: str, console: Console, *, clients: int = 5, rounds: int = 5) -> RunResult:
    """Run ``clients`` digits clients and an aggregator (FedAvg, Dirichlet α = 0.5) for ``rounds`` rounds on
    the broker at ``url``; returns the aggregator's result. Needs the ``ml`` extra (torch)."""
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
            options=SimulationOptions(server=url),
            evaluate_fn=federation.evaluate,
            on_event=view,
        )


async def stage(ctx: DemoContext) -> None:
    """``make demo`` stage: a federation over the demo's broker."""
    result = await demo_stage(ctx.url, ctx.console)
    accuracy = result.history[-1].get("test_accuracy", 0.0) if result.history else 0.0
    ctx.tally["federated rounds"] += result.rounds
    ctx.say(
        "aggregator",
        f"federation done: {result.rounds} rounds, global model v{result.version}, "
        f"test accuracy {accuracy:.3f}",
    )


#: Registered under the ``fedbus.demo`` entry point group: ``make demo`` runs these after the launch stage.
STAGES = [("Federate: FedAvg on digits, 5 clients, 5 rounds", stage, 90.0)]
