"""Model factories and flat-vector views of a model's weights (what travels between client and server)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedbus.bus.errors import ConfigError

__all__ = ["build_model", "get_flat", "set_flat"]


class _Cnn(nn.Module):
    """A small CNN for square single-channel images given as flat rows (8×8 digits: 64 features)."""

    def __init__(self, features: int, classes: int, channels: int) -> None:
        super().__init__()
        self.side = round(features**0.5)
        if self.side * self.side != features:
            raise ConfigError(f"cnn needs square images, got {features} features", key="model.name")
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * (self.side // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x.view(-1, 1, self.side, self.side))
        return self.head(z.flatten(1))


def build_model(
    name: str, *, features: int, classes: int, hidden: list[int] | None = None, seed: int = 0
) -> nn.Module:
    """``logreg`` (one linear layer), ``mlp`` (ReLU layers of ``hidden`` sizes) or ``cnn``; seeded init."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "logreg":
            return nn.Linear(features, classes)
        if name == "mlp":
            layers: list[nn.Module] = []
            width = features
            for h in hidden or [32]:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            return nn.Sequential(*layers, nn.Linear(width, classes))
        if name == "cnn":
            return _Cnn(features, classes, (hidden or [16])[0])
        raise ConfigError(f"unknown model {name!r} (logreg, mlp, cnn)", key="model.name")
    finally:
        torch.random.set_rng_state(gen_state)


def get_flat(model: nn.Module) -> npt.NDArray[np.float32]:
    """All parameters, concatenated in ``parameters()`` order, as one float32 vector (a copy)."""
    with torch.no_grad():
        return (
            torch.nn.utils.parameters_to_vector(model.parameters())
            .detach()
            .cpu()
            .numpy()
            .astype(np.float32, copy=True)
        )


def set_flat(model: nn.Module, flat: npt.NDArray[np.float32]) -> None:
    """Load a flat vector made by :func:`get_flat` into ``model``."""
    n = sum(p.numel() for p in model.parameters())
    if flat.shape != (n,):
        raise ValueError(f"model has {n} parameters, vector has shape {flat.shape}")
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(np.array(flat, np.float32)), model.parameters())
