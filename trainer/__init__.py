"""fedbus.trainer: local training with torch for federated clients (datasets that need no download, IID and
Dirichlet partitioners, model factories, FedProx, ONNX export). See ``docs/federate.md``."""

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
