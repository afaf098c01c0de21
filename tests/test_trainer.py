"""The torch trainer: datasets, partitioners, flat weights, local training (FedProx), ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedbus.bus.errors import ConfigError
from fedbus.trainer.attacks import ByzantineTrainer
from fedbus.trainer.data import (
    load_digits,
    load_npz,
    partition_dirichlet,
    partition_iid,
    split,
    synthetic,
)
from fedbus.trainer.export import export_onnx, verify_onnx
from fedbus.trainer.local import TorchTrainer, evaluate_model, train_central
from fedbus.trainer.models import build_model, get_flat, set_flat

torch.set_num_threads(1)


def test_digits_need_no_download_and_split_stratified() -> None:
    ds = load_digits()
    assert len(ds) == 1797 and ds.features == 64 and ds.classes == 10
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    train, test = split(ds, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    assert np.bincount(test.y, minlength=10).min() >= 30  # every class in the test set


def test_iid_partition_covers_everything_once() -> None:
    parts = partition_iid(103, 10, seed=1)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(103))
    assert {len(p) for p in parts} <= {10, 11}


def test_dirichlet_partition_is_label_skewed_and_complete() -> None:
    labels = load_digits().y
    skewed = partition_dirichlet(labels, 10, alpha=0.1, seed=0)
    mild = partition_dirichlet(labels, 10, alpha=100.0, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(skewed)), np.arange(labels.size))
    assert min(len(p) for p in skewed) >= 10

    def skew(parts: list[np.ndarray]) -> float:  # mean total-variation distance of client label mix to global
        glob = np.bincount(labels, minlength=10) / labels.size
        return float(
            np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum() for p in parts])
        )

    assert skew(skewed) > 0.4
    assert skew(mild) < 0.1
    with pytest.raises(ConfigError):
        partition_dirichlet(labels, 10, alpha=0.0, seed=0)


def test_npz_datasets(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3)), y=np.array([0, 1, 2, 1, 0]))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.classes == 3 and ds.x.dtype == np.float32
    np.savez(tmp_path / "bad.npz", x=np.ones((5, 3)))
    with pytest.raises(ConfigError):
        load_npz(tmp_path / "bad.npz")


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_flat_weights_roundtrip(name: str) -> None:
    model = build_model(name, features=64, classes=10, hidden=[8], seed=3)
    flat = get_flat(model)
    assert flat.dtype == np.float32 and flat.size == sum(p.numel() for p in model.parameters())
    other = build_model(name, features=64, classes=10, hidden=[8], seed=4)
    assert not np.array_equal(get_flat(other), flat)
    set_flat(other, flat)
    x = torch.rand(5, 64)
    torch.testing.assert_close(model(x), other(x))
    np.testing.assert_array_equal(
        get_flat(build_model(name, features=64, classes=10, hidden=[8], seed=3)), flat
    )


def _trainer(seed: int = 0) -> TorchTrainer:
    ds = synthetic(samples=300, features=10, classes=3, seed=seed)
    train, test = split(ds, test_fraction=0.2, seed=seed)
    return TorchTrainer(
        lambda: build_model("mlp", features=10, classes=3, hidden=[16], seed=0),
        train,
        test,
        seed=seed,
        client_index=2,
    )


def test_local_training_is_deterministic_and_learns() -> None:
    t = _trainer()
    w0 = get_flat(t.model_factory())
    config = {"local_epochs": 3, "batch_size": 16, "lr": 0.1}
    a = t.fit(w0, config, round=1)
    b = t.fit(w0, config, round=1)
    np.testing.assert_array_equal(a.weights, b.weights)  # same round: same update (resume relies on it)
    assert not np.array_equal(a.weights, t.fit(w0, config, round=2).weights)  # another round reshuffles
    assert t.evaluate(a.weights, {}).loss < t.evaluate(w0, {}).loss
    assert a.num_examples == len(t.train) and 0 <= a.metrics["accuracy"] <= 1


def test_fedprox_term_keeps_the_model_near_the_global_one() -> None:
    t = _trainer()
    w0 = get_flat(t.model_factory())
    config = {"local_epochs": 5, "batch_size": 16, "lr": 0.1}
    free = t.fit(w0, config, round=1).weights
    prox = t.fit(w0, {**config, "proximal_mu": 5.0}, round=1).weights
    assert np.linalg.norm(prox - w0) < 0.8 * np.linalg.norm(free - w0)


def test_byzantine_wrapper_corrupts_the_delta() -> None:
    t = _trainer()
    w0 = get_flat(t.model_factory())
    config = {"local_epochs": 1, "lr": 0.1}
    honest = t.fit(w0, config, round=1).weights - w0
    flipped = ByzantineTrainer(t, attack="sign_flip", factor=2.0).fit(w0, config, round=1).weights - w0
    np.testing.assert_allclose(flipped, -2 * honest, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError):
        ByzantineTrainer(t, attack="teleport")


def test_central_baseline_trains() -> None:
    ds = synthetic(samples=400, features=10, classes=3, seed=1)
    train, test = split(ds, test_fraction=0.25, seed=1)
    model = build_model("logreg", features=10, classes=3, seed=0)
    before = evaluate_model(model, test)[1]
    train_central(model, train, {"lr": 0.1, "batch_size": 16}, epochs=5)
    assert evaluate_model(model, test)[1] > max(before, 0.8)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    model = build_model("mlp", features=64, classes=10, hidden=[16], seed=0)
    path = export_onnx(model, tmp_path / "m.onnx", features=64)
    x = load_digits().x[:32]
    assert verify_onnx(path, model, x) < 1e-4
