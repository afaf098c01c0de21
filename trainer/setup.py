"""From an fl.yaml config to what a simulation needs: data split over clients, a trainer per client, the
initial global model, and a central evaluation on the held-out test set."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt
from torch import nn

from fedbus.aggregator.config import FlConfig
from fedbus.bus.events import Params

from .data import Dataset, load_digits, load_npz, partition_dirichlet, partition_iid, split, synthetic
from .local import TorchTrainer, evaluate_model
from .models import build_model, get_flat, set_flat

__all__ = ["Federation", "load_dataset", "prepare"]


def load_dataset(config: FlConfig) -> Dataset:
    """The configured dataset (no download)."""
    d = config.data
    if d.name == "digits":
        return load_digits()
    if d.name == "synthetic":
        return synthetic(samples=d.samples, features=d.features, classes=d.classes, seed=config.settings.seed)
    return load_npz(d.path)


@dataclass
class Federation:
    """Everything a simulated federation runs on."""

    initial: npt.NDArray[np.float32]
    trainers: list[TorchTrainer]
    train: Dataset
    test: Dataset
    config: FlConfig

    def new_model(self) -> nn.Module:
        m = self.config.model
        return build_model(
            m.name,
            features=self.train.features,
            classes=self.train.classes,
            hidden=m.hidden,
            seed=self.config.settings.seed,
        )

    def evaluate(self, weights: npt.NDArray[np.float32]) -> Params:
        """Central test loss and accuracy of a global model (simulation only: the server holds no data)."""
        model = self.new_model()
        set_flat(model, weights)
        loss, acc = evaluate_model(model, self.test)
        return {"test_loss": loss, "test_accuracy": acc}


def prepare(config: FlConfig, *, clients: int | None = None) -> Federation:
    """Split the data over ``clients`` (default ``clients.count``) and build one trainer per client."""
    n = clients or config.clients.count
    seed = config.settings.seed
    train, test = split(load_dataset(config), test_fraction=config.data.test_fraction, seed=seed)
    if config.data.partition == "dirichlet":
        parts = partition_dirichlet(
            train.y, n, alpha=config.data.alpha, seed=seed, min_size=min(10, len(train) // n)
        )
    else:
        parts = partition_iid(len(train), n, seed=seed)
    test_parts = partition_iid(len(test), n, seed=seed + 1) if len(test) >= n else [np.arange(len(test))] * n
    m = config.model
    factory = partial(
        build_model, m.name, features=train.features, classes=train.classes, hidden=m.hidden, seed=seed
    )
    trainers = [
        TorchTrainer(factory, train.subset(p), test.subset(t), seed=seed, client_index=i)
        for i, (p, t) in enumerate(zip(parts, test_parts, strict=True))
    ]
    return Federation(get_flat(factory()), trainers, train, test, config)
