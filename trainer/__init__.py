"""fedbus.trainer: local training with torch for federated clients (datasets that need no download, IID and
Dirichlet partitioners, model factories, FedProx, ONNX export). See ``docs/federate.md``.

The names below are imported on first use (PEP 562): importing a submodule does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbus.bus.lazy import lazy_exports

if TYPE_CHECKING:
    from .data import Dataset, load_digits, load_npz, partition_dirichlet, partition_iid, split, synthetic
    from .local import TorchTrainer, evaluate_model, train_central
    from .models import build_model, get_flat, set_flat

__all__ = [
    "Dataset",
    "TorchTrainer",
    "build_model",
    "evaluate_model",
    "get_flat",
    "load_digits",
    "load_npz",
    "partition_dirichlet",
    "partition_iid",
    "set_flat",
    "split",
    "synthetic",
    "train_central",
]

_HOME = {
    "Dataset": ".data", "load_digits": ".data", "load_npz": ".data", "partition_dirichlet": ".data",
    "partition_iid": ".data", "split": ".data", "synthetic": ".data",
    "TorchTrainer": ".local", "evaluate_model": ".local", "train_central": ".local",
    "build_model": ".models", "get_flat": ".models", "set_flat": ".models",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__)
