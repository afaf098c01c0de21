"""Datasets that need no download, and partitioners that split them across clients.

* :func:`load_digits`: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), scaled to [0, 1];
* :func:`synthetic`: Gaussian class clusters of any size, for quick tests and benchmarks;
* :func:`load_npz`: a user file with arrays ``x`` and ``y``.

Partitioners return index arrays, one per client: :func:`partition_iid` (a shuffled even split) and
:func:`partition_dirichlet` (label skew: each class is spread over clients by proportions drawn from
Dirichlet(α); small α = very non-IID, Hsu et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedbus.bus.errors import ConfigError

__all__ = ["Dataset", "load_digits", "load_npz", "partition_dirichlet", "partition_iid", "split", "synthetic"]

Indices = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (n × features, float32) and integer labels ``y`` (n,)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, idx: Indices) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.classes)


def load_digits() -> Dataset:
    """scikit-learn's bundled digits (no download)."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return Dataset((bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64), 10)


def synthetic(
    *, samples: int = 2000, features: int = 20, classes: int = 4, seed: int = 0, spread: float = 1.0
) -> Dataset:
    """Gaussian clusters around random class centres: learnable, but not trivially."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    y = rng.integers(0, classes, samples)
    x = centres[y] + rng.normal(0.0, spread, (samples, features))
    return Dataset(x.astype(np.float32), y.astype(np.int64), classes)


def load_npz(path: str | Path) -> Dataset:
    """A dataset from an ``.npz`` file with ``x`` (n × features) and integer ``y`` (n,)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot load the dataset: {exc}", key="data.path", source=str(path)) from None
    if x.ndim != 2 or y.shape != (x.shape[0],) or y.min() < 0:
        raise ConfigError(
            "need x of shape (n, features) and y of shape (n,) with labels >= 0",
            key="data.path",
            source=str(path),
        )
    return Dataset(x, y, int(y.max()) + 1)


def split(ds: Dataset, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A stratified train/test split."""
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for c in range(ds.classes):
        idx = np.flatnonzero(ds.y == c)
        rng.shuffle(idx)
        test.extend(idx[: round(test_fraction * idx.size)].tolist())
    mask = np.zeros(len(ds), bool)
    mask[test] = True
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))


def partition_iid(n: int, clients: int, *, seed: int) -> list[Indices]:
    """A shuffled, (almost) even split of ``n`` samples."""
    if clients < 1 or clients > n:
        raise ConfigError(f"cannot split {n} samples over {clients} clients", key="clients.count")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, clients)]


def partition_dirichlet(
    labels: npt.NDArray[np.int64],
    clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[Indices]:
    """Label-skewed split: class ``c``'s samples go to clients in proportions ~ Dirichlet(α,…,α).

    Redrawn (up to ``max_tries``) until every client has at least ``min_size`` samples.
    """
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}", key="data.alpha")
    if clients * min_size > labels.size:
        raise ConfigError(
            f"{labels.size} samples cannot give {clients} clients {min_size} each", key="clients.count"
        )
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in range(classes):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * idx.size).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, np.int64)) for p in parts]
    raise ConfigError(
        f"no Dirichlet(α={alpha}) split gave every client {min_size} samples; raise alpha", key="data.alpha"
    )
