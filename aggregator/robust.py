"""Byzantine-robust combination rules over a matrix of client deltas (one row per client). Pure numpy.

Each function takes ``rows`` (``n × d`` float32, C-contiguous) and the clients' example counts, and returns
the combined ``d``-vector. They need every update at once, so their memory is O(clients × model); the linear
rules in :mod:`fedbus.aggregator.strategies` stream in O(model).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import StrategyError

__all__ = ["coordinate_median", "krum_scores", "multi_krum", "norm_clip_mean", "trimmed_mean"]

Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]


def _check(rows: Matrix) -> int:
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise StrategyError(f"need a non-empty n × d matrix of updates, got shape {rows.shape}")
    return int(rows.shape[0])


def coordinate_median(rows: Matrix) -> Vector:
    """Coordinate-wise median (Yin et al. 2018); unweighted by design, so one big client cannot steer it."""
    _check(rows)
    return np.median(rows, axis=0).astype(np.float32, copy=False)


def trimmed_mean(rows: Matrix, *, beta: float) -> Vector:
    """Coordinate-wise mean after dropping the ``⌊beta·n⌋`` largest and smallest values of each coordinate."""
    n = _check(rows)
    if not 0.0 <= beta < 0.5:
        raise StrategyError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    k = int(beta * n)
    if k == 0:
        return rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    part = np.partition(rows, (k, n - k - 1), axis=0)
    return part[k : n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


def krum_scores(rows: Matrix, *, f: int) -> npt.NDArray[np.float64]:
    """Krum score of each row: the sum of squared distances to its ``n − f − 2`` nearest other rows.

    Distances come from one Gram matrix (a single BLAS call) of the centred rows, in float64 to avoid
    cancellation between nearly equal updates.
    """
    n = _check(rows)
    if f < 0 or n - f - 2 < 1:
        raise StrategyError(f"Krum with f={f} needs at least f + 3 = {f + 3} updates, got {n}")
    centred = (rows - rows.mean(axis=0, dtype=np.float64).astype(np.float32)).astype(np.float64)
    gram = centred @ centred.T
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)


def multi_krum(
    rows: Matrix, weights: npt.NDArray[np.float64], *, f: int, m: int = 1
) -> tuple[Vector, list[int]]:
    """Multi-Krum (Blanchard et al. 2017): weighted mean of the ``m`` rows with the lowest Krum scores.

    ``m = 1`` is plain Krum. Returns the combined vector and the indices of the selected rows.
    """
    n = _check(rows)
    if not 1 <= m <= n:
        raise StrategyError(f"multi-Krum needs 1 <= m <= n ({n}), got m={m}")
    scores = krum_scores(rows, f=f)
    chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])
    w = weights[chosen] / weights[chosen].sum()
    combined = (w.astype(np.float32) @ rows[chosen]).astype(np.float32, copy=False)
    return combined, chosen


def norm_clip_mean(rows: Matrix, weights: npt.NDArray[np.float64], *, clip_norm: float | None) -> Vector:
    """Weighted mean after scaling every row to an L2 norm of at most ``clip_norm``.

    With ``clip_norm=None`` the bound is the median of this round's norms, so a minority of scaled-up
    updates is cut down to an honest size without any tuning.
    """
    _check(rows)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    bound = float(np.median(norms)) if clip_norm is None else float(clip_norm)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-12))
    w = weights * scale / weights.sum()
    return (w.astype(np.float32) @ rows).astype(np.float32, copy=False)
