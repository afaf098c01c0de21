"""Server optimizers: how a round's combined delta becomes the next global model (FedAvg's SGD step, FedAvgM's
momentum, FedOpt's Adam, Yogi and Adagrad). :mod:`.strategies` pairs one with an aggregation rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import StrategyError

__all__ = ["Adagrad", "Adam", "Adaptive", "Momentum", "ServerOptimizer", "Sgd", "Yogi"]

Vector = npt.NDArray[np.float32]
State = dict[str, Any]


class ServerOptimizer(ABC):
    """Applies the round's combined delta (a pseudo-gradient, negated) to the global model."""

    def __init__(self, *, lr: float) -> None:
        if lr <= 0:
            raise StrategyError(f"server learning rate must be > 0, got {lr}")
        self.lr = lr

    @abstractmethod
    def step(self, model: Vector, delta: Vector) -> Vector:
        """The next global model."""

    def state(self) -> State:
        return {}

    def restore(self, state: State) -> None:
        """Load what :meth:`state` returned."""


class Sgd(ServerOptimizer):
    """``x ← x + η·Δ``; with η = 1 this is FedAvg."""

    def __init__(self, *, lr: float = 1.0) -> None:
        super().__init__(lr=lr)

    def step(self, model: Vector, delta: Vector) -> Vector:
        return (model + np.float32(self.lr) * delta).astype(np.float32, copy=False)


class Momentum(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): ``m ← β·m + Δ``, ``x ← x + η·m``."""

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr=lr)
        self.momentum = momentum
        self.m: Vector | None = None

    def step(self, model: Vector, delta: Vector) -> Vector:
        self.m = delta.copy() if self.m is None else np.float32(self.momentum) * self.m + delta
        return (model + np.float32(self.lr) * self.m).astype(np.float32, copy=False)

    def state(self) -> State:
        return {} if self.m is None else {"m": self.m}

    def restore(self, state: State) -> None:
        self.m = np.array(state["m"], np.float32) if "m" in state else None


class Adaptive(ServerOptimizer):
    """FedOpt (Reddi et al. 2021): Adam-style moments of the pseudo-gradient, ``x ← x + η·m / (√v + τ)``."""

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: Vector | None = None
        self.v: Vector | None = None

    @abstractmethod
    def _second_moment(self, v: Vector, d2: Vector) -> Vector: ...

    def step(self, model: Vector, delta: Vector) -> Vector:
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, self.tau**2)
        self.m = np.float32(self.beta1) * self.m + np.float32(1 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta * delta).astype(np.float32, copy=False)
        return (model + np.float32(self.lr) * self.m / (np.sqrt(self.v) + np.float32(self.tau))).astype(
            np.float32, copy=False
        )

    def state(self) -> State:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def restore(self, state: State) -> None:
        if "m" in state:
            self.m = np.array(state["m"], np.float32)
            self.v = np.array(state["v"], np.float32)


class Adam(Adaptive):
    """FedAdam: ``v ← β₂·v + (1 − β₂)·Δ²``."""

    def _second_moment(self, v: Vector, d2: Vector) -> Vector:
        return np.float32(self.beta2) * v + np.float32(1 - self.beta2) * d2


class Yogi(Adaptive):
    """FedYogi: ``v ← v − (1 − β₂)·Δ²·sign(v − Δ²)`` (additive, so v cannot blow up on one big round)."""

    def _second_moment(self, v: Vector, d2: Vector) -> Vector:
        return v - np.float32(1 - self.beta2) * d2 * np.sign(v - d2)


class Adagrad(Adaptive):
    """FedAdagrad: ``v ← v + Δ²``."""

    def _second_moment(self, v: Vector, d2: Vector) -> Vector:
        return v + d2
