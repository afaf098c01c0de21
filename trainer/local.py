"""Local training with torch: what a federated client runs each round, and the centralised baseline.

:class:`TorchTrainer` implements :class:`fedbus.aggregator.client.LocalTrainer`. Each ``fit`` loads the
global weights, trains ``local_epochs`` epochs of mini-batch SGD (or Adam) and returns the new weights; with
``proximal_mu`` > 0 (FedProx, Li et al. 2020) the loss gets ``μ/2·‖w − w_global‖²``. Shuffling is seeded by
(seed, client, round), so a round trained twice gives the same weights: a resumed run matches an
uninterrupted one. It is called from a worker thread; it owns its model, so clients never share state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedbus.aggregator.client import EvalOutcome, FitOutcome
from fedbus.bus.events import Params

from .data import Dataset
from .models import get_flat, set_flat

__all__ = ["TorchTrainer", "evaluate_model", "train_central"]

Vector = npt.NDArray[np.float32]


def _float(config: Params, key: str, default: float) -> float:
    value = config.get(key, default)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _int(config: Params, key: str, default: int) -> int:
    value = config.get(key, default)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _optimizer(model: nn.Module, config: Params) -> torch.optim.Optimizer:
    lr = _float(config, "lr", 0.05)
    wd = _float(config, "weight_decay", 0.0)
    if config.get("optimizer", "sgd") == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=_float(config, "momentum", 0.0), weight_decay=wd
    )


def _epochs(
    model: nn.Module,
    data: Dataset,
    config: Params,
    *,
    epochs: int,
    generator: torch.Generator,
    anchor: list[torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Train in place; returns the mean loss and accuracy over the last epoch."""
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    batch = max(1, _int(config, "batch_size", 32))
    mu = _float(config, "proximal_mu", 0.0)
    opt = _optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(max(epochs, 0)):
        total_loss, correct, seen = 0.0, 0, 0
        perm = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch):
            idx = perm[start : start + batch]
            logits = model(x[idx])
            loss = loss_fn(logits, y[idx])
            if mu > 0 and anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * idx.numel()
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += idx.numel()
    return (total_loss / seen, correct / seen) if seen else (0.0, 0.0)


def evaluate_model(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x))
        y = torch.from_numpy(data.y)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@dataclass
class TorchTrainer:
    """A client's local trainer over its own train and test data."""

    model_factory: Callable[[], nn.Module]
    train: Dataset
    test: Dataset | None = None
    seed: int = 0
    client_index: int = 0

    def __post_init__(self) -> None:
        self.model = self.model_factory()

    @property
    def num_examples(self) -> int:
        return len(self.train)

    def fit(self, weights: Vector, config: Params, *, round: int) -> FitOutcome:
        set_flat(self.model, weights)
        anchor = (
            [p.detach().clone() for p in self.model.parameters()]
            if _float(config, "proximal_mu", 0) > 0
            else None
        )
        gen = torch.Generator().manual_seed(hash((self.seed, self.client_index, round)) & 0x7FFF_FFFF)
        loss, acc = _epochs(
            self.model,
            self.train,
            config,
            epochs=_int(config, "local_epochs", 1),
            generator=gen,
            anchor=anchor,
        )
        return FitOutcome(get_flat(self.model), len(self.train), {"loss": loss, "accuracy": acc})

    def evaluate(self, weights: Vector, config: Params) -> EvalOutcome:
        data = self.test if self.test is not None and len(self.test) else self.train
        set_flat(self.model, weights)
        loss, acc = evaluate_model(self.model, data)
        return EvalOutcome(loss, len(data), {"accuracy": acc})


def train_central(
    model: nn.Module, train: Dataset, config: Params, *, epochs: int, seed: int = 0
) -> nn.Module:
    """The centralised baseline: the same model and optimiser on all the data, for ``epochs`` epochs."""
    _epochs(model, train, config, epochs=epochs, generator=torch.Generator().manual_seed(seed))
    return model
