"""A toy local trainer with a closed-form answer, for tests, benchmarks and demos that need no torch.

Client *i* minimises ``½‖w − tᵢ‖²`` with ``steps`` gradient steps of size ``lr``, so one round of FedAvg moves
the global model to ``w + c·(t̄ − w)`` with ``c = 1 − (1 − lr)^steps`` and ``t̄`` the example-weighted mean of
the answering clients' targets: any result of a run can be checked against that reference. Training is a
pure function of (weights, client, round): a round trained twice gives the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedbus.bus.events import Params

from .client import EvalOutcome, FitOutcome

__all__ = ["QuadraticTrainer", "quadratic_clients"]

Vector = npt.NDArray[np.float32]


@dataclass
class QuadraticTrainer:
    """``fit`` = ``steps`` gradient steps on ``½‖w − target‖²`` (config: ``lr``, ``local_epochs`` = steps)."""

    target: Vector
    examples: int = 10

    @property
    def num_examples(self) -> int:
        return self.examples

    def fit(self, weights: Vector, config: Params, *, round: int) -> FitOutcome:
        lr = float(config.get("lr", 0.5) or 0.5)  # type: ignore[arg-type]
        steps = int(config.get("local_epochs", 1) or 1)  # type: ignore[arg-type]
        w = weights.astype(np.float32, copy=True)
        for _ in range(steps):
            w -= np.float32(lr) * (w - self.target)
        loss = 0.5 * float(np.dot(w - self.target, w - self.target))
        return FitOutcome(w, self.examples, {"loss": loss})

    def evaluate(self, weights: Vector, config: Params) -> EvalOutcome:
        loss = 0.5 * float(np.dot(weights - self.target, weights - self.target))
        return EvalOutcome(loss, self.examples, {"accuracy": float(np.exp(-loss))})


def quadratic_clients(n: int, dim: int, *, seed: int = 0) -> list[QuadraticTrainer]:
    """``n`` clients with random targets and example counts 10, 20, …"""
    rng = np.random.default_rng(seed)
    return [QuadraticTrainer(rng.normal(size=dim).astype(np.float32), 10 * (i + 1)) for i in range(n)]
