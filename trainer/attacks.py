"""Byzantine clients for robustness tests and benchmarks: wrap an honest trainer, corrupt its update.

* ``sign_flip``: send ``−factor ×`` the honest delta (pushes the model the wrong way);
* ``scale``: send ``factor ×`` the honest delta (a model-replacement style boost);
* ``noise``: send Gaussian noise with ``factor ×`` the honest delta's norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedbus.aggregator.client import EvalOutcome, FitOutcome, LocalTrainer
from fedbus.bus.errors import ConfigError
from fedbus.bus.events import Params

__all__ = ["ATTACKS", "ByzantineTrainer"]

ATTACKS = ("sign_flip", "scale", "noise")


@dataclass
class ByzantineTrainer:
    """A :class:`~fedbus.aggregator.client.LocalTrainer` whose updates are corrupted."""

    inner: LocalTrainer
    attack: str = "sign_flip"
    factor: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ConfigError(f"unknown attack {self.attack!r} ({', '.join(ATTACKS)})", key="attack")

    @property
    def num_examples(self) -> int:
        return self.inner.num_examples

    def fit(self, weights: npt.NDArray[np.float32], config: Params, *, round: int) -> FitOutcome:
        honest = self.inner.fit(weights, config, round=round)
        delta = honest.weights - weights
        if self.attack == "sign_flip":
            bad = -self.factor * delta
        elif self.attack == "scale":
            bad = self.factor * delta
        else:
            rng = np.random.default_rng([self.seed, round])
            noise = rng.standard_normal(delta.size).astype(np.float32)
            bad = noise * (self.factor * np.linalg.norm(delta) / max(np.linalg.norm(noise), 1e-12))
        return FitOutcome((weights + bad).astype(np.float32), honest.num_examples, honest.metrics)

    def evaluate(self, weights: npt.NDArray[np.float32], config: Params) -> EvalOutcome:
        return self.inner.evaluate(weights, config)
