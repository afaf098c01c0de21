"""Aggregation strategies behind one small interface. Pure numpy on flat float32 vectors.

A client sends a *delta* (its trained model minus the global model it started from). A :class:`Strategy` is
three parts, each small:

* a **rule** that combines deltas. Linear rules (weighted mean, norm-clipped mean, DP mean) *fold* each
  update in as it arrives, so memory is O(model) however many clients there are; robust rules (median,
  trimmed mean, Krum) buffer the round's deltas, O(clients × model);
* a **server optimizer** that turns the combined delta into the next global model (plain step = FedAvg,
  momentum = FedAvgM, Adam / Yogi / Adagrad = FedOpt, Reddi et al. 2021);
* a **client config** sent with every round (e.g. FedProx's ``proximal_mu``, applied by the trainer).

Like Flower's strategy the interface is configure/aggregate pairs: :meth:`Strategy.configure` (what clients
get), :meth:`Strategy.begin` + :meth:`Aggregate.fold` (streaming aggregate), :meth:`Strategy.finish` (next
global model). :func:`make_strategy` builds any of them from a name and keyword parameters (fl.yaml).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.bus.events import Params

from . import robust
from .errors import StrategyError
from .optimizers import Adagrad, Adam, Adaptive, Momentum, ServerOptimizer, Sgd, Yogi
from .privacy import CentralDp

__all__ = [
    "STRATEGIES",
    "Adagrad",
    "Adam",
    "Aggregate",
    "BufferAggregate",
    "MeanAggregate",
    "Momentum",
    "ServerOptimizer",
    "Sgd",
    "Strategy",
    "Update",
    "Yogi",
    "axpy",
    "make_strategy",
    "staleness_weight",
]

Vector = npt.NDArray[np.float32]
State = dict[str, Any]

try:  # BLAS saxpy folds in one pass, in place, where numpy's `acc += w * x` also writes a temporary.
    from scipy.linalg.blas import saxpy as _saxpy
except ImportError:  # pragma: no cover - scipy comes with scikit-learn in the ml extra
    _saxpy = None
_blas_pinned = False


def _pin_blas_to_one_thread() -> None:
    """A fold is memory-bound: one core saturates it. A second OpenBLAS thread only helps on an idle machine
    and, on a busy one, spin-waits: measured on this 2-core box under load, saxpy fell from 12 GB/s (one
    thread) to 0.8 GB/s (two). So scipy's own OpenBLAS (not numpy's, not torch's) is pinned to one thread."""
    global _blas_pinned
    _blas_pinned = True
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    for lib in ThreadpoolController().lib_controllers:
        if "scipy.libs" in lib.filepath or "scipy/" in lib.filepath:
            lib.set_num_threads(1)


def axpy(acc: Vector, x: Vector, a: float) -> None:
    """``acc += a * x`` in place, in a single pass over ``x`` (float32, contiguous)."""
    if _saxpy is not None and acc.size > 4096:
        if not _blas_pinned:
            _pin_blas_to_one_thread()
        _saxpy(x, acc, a=a)
    else:
        acc += np.float32(a) * x


@dataclass(frozen=True, slots=True)
class Update:
    """One client's contribution: ``delta`` = trained model − the global model it trained on."""

    client_id: str
    delta: Vector
    num_examples: int
    staleness: int = 0
    """Global versions published since the client's base model (0 in synchronous rounds)."""
    metrics: Params = field(default_factory=dict)


def staleness_weight(staleness: int, *, exponent: float = 0.5) -> float:
    """FedBuff's polynomial discount ``1 / (1 + τ)^a`` for an update ``τ`` versions old."""
    return float((1.0 + max(staleness, 0)) ** -exponent)


# -- rules: how a round's deltas combine ---------------------------------------------------------------------
class Aggregate(ABC):
    """One round's (or one async buffer's) aggregation in progress."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.clients: list[str] = []

    def _check(self, update: Update) -> None:
        if update.delta.dtype != np.float32 or update.delta.ndim != 1 or update.delta.size != self.dim:
            raise StrategyError(
                f"update from {update.client_id} has shape {update.delta.shape} "
                f"{update.delta.dtype}, expected ({self.dim},) float32"
            )
        if not np.isfinite(update.num_examples) or update.num_examples <= 0:
            raise StrategyError(f"update from {update.client_id} has num_examples={update.num_examples}")

    @abstractmethod
    def fold(self, update: Update, *, discount: float = 1.0) -> None:
        """Take one update in (``discount`` scales its weight, e.g. for staleness)."""

    @abstractmethod
    def result(self) -> Vector:
        """The combined delta."""

    @abstractmethod
    def state(self) -> State:
        """Everything needed to resume this aggregation after a restart."""

    @abstractmethod
    def restore(self, state: State) -> None:
        """Load what :meth:`state` returned."""


class MeanAggregate(Aggregate):
    """Streaming weighted mean ``Σ wᵢ·dᵢ / Σ nᵢ`` in a float32 accumulator: O(model) memory.

    Weights are example counts (times a staleness discount), or 1 each when ``uniform``. With ``clip_norm``
    each delta is scaled to an L2 norm of at most that bound first. With ``dp`` (central DP) clipping is at
    ``dp.clip_norm``, weights are uniform and the mean over ``dp.expected_clients`` gets Gaussian noise.

    Why float32: one BLAS ``saxpy`` per update runs at memory speed, while a float64 accumulator needs a cast
    (three times the traffic). The relative rounding error of the sum stays ~√n·2⁻²⁴ (≈ 2·10⁻⁶ at 1,000
    clients, measured in ``bench/bench_fl.py``), far below the noise of SGD itself.
    """

    def __init__(
        self,
        dim: int,
        *,
        uniform: bool = False,
        clip_norm: float | None = None,
        dp: CentralDp | None = None,
        round: int = 0,
    ) -> None:
        super().__init__(dim)
        # Written now, not lazily: the page faults of a fresh accumulator (~0.1-0.3 s for 100 MB) are paid
        # when the round opens, not by the first update that arrives.
        self.acc = np.empty(dim, np.float32)
        self.acc.fill(0.0)
        self.weight = 0.0
        self.uniform = uniform or dp is not None
        self.clip_norm = dp.clip_norm if dp is not None else clip_norm
        self.dp = dp
        self.round = round
        self.clipped = 0
        self._final: Vector | None = None

    def fold(self, update: Update, *, discount: float = 1.0) -> None:
        self._check(update)
        if self._final is not None:
            raise StrategyError("this aggregation is final: its result was taken")
        n = 1.0 if self.uniform else float(update.num_examples)
        scale = n * discount
        if self.clip_norm is not None:
            norm = float(np.sqrt(np.dot(update.delta, update.delta)))
            if norm > self.clip_norm:
                scale *= self.clip_norm / norm
                self.clipped += 1
        axpy(self.acc, update.delta, scale)
        self.weight += n
        self.count += 1
        self.clients.append(update.client_id)

    def result(self) -> Vector:
        """The mean, computed once; without DP in place in the accumulator (no second model-sized array).
        With DP a round without updates is valid (noise only): the mechanism divides by a fixed m."""
        if self.count == 0 and self.dp is None:
            raise StrategyError("no updates to aggregate")
        if self._final is None:
            if self.dp is None:
                self._final = np.multiply(self.acc, np.float32(1.0 / self.weight), out=self.acc)
            else:
                self._final = self.dp.privatize(self.acc, round=self.round)
        return self._final

    def state(self) -> State:
        if self._final is not None and self.dp is None:
            raise StrategyError("this aggregation is final: checkpoint it before taking its result")
        return {
            "acc": self.acc,
            "weight": self.weight,
            "count": self.count,
            "clients": list(self.clients),
            "clipped": self.clipped,
        }

    def restore(self, state: State) -> None:
        self.acc = np.array(state["acc"], dtype=np.float32)
        self.weight = float(state["weight"])
        self.count = int(state["count"])
        self.clients = list(state["clients"])
        self.clipped = int(state.get("clipped", 0))


Combine = Callable[[npt.NDArray[np.float32], npt.NDArray[np.float64]], Vector]


class BufferAggregate(Aggregate):
    """Keeps every delta of the round (preallocated ``capacity × dim`` rows) for a robust ``combine``."""

    def __init__(self, dim: int, *, capacity: int, combine: Combine) -> None:
        super().__init__(dim)
        self.rows = np.empty((max(capacity, 1), dim), np.float32)
        self.weights: list[float] = []
        self.combine = combine

    def fold(self, update: Update, *, discount: float = 1.0) -> None:
        self._check(update)
        if self.count == self.rows.shape[0]:  # more than sampled (async buffers): grow geometrically
            self.rows = np.concatenate([self.rows, np.empty_like(self.rows)])
        self.rows[self.count] = update.delta
        self.weights.append(float(update.num_examples) * discount)
        self.count += 1
        self.clients.append(update.client_id)

    def result(self) -> Vector:
        if self.count == 0:
            raise StrategyError("no updates to aggregate")
        return self.combine(self.rows[: self.count], np.asarray(self.weights, np.float64))

    def state(self) -> State:
        return {"rows": self.rows[: self.count], "weights": list(self.weights), "clients": list(self.clients)}

    def restore(self, state: State) -> None:
        rows = np.asarray(state["rows"], np.float32).reshape(-1, self.dim)
        if rows.shape[0] > self.rows.shape[0]:
            self.rows = np.empty((rows.shape[0], self.dim), np.float32)
        self.rows[: rows.shape[0]] = rows
        self.count = rows.shape[0]
        self.weights = [float(w) for w in state["weights"]]
        self.clients = list(state["clients"])


# -- the strategy --------------------------------------------------------------------------------------------
Rule = Callable[[int, int, int], Aggregate]
"""``rule(dim, capacity, round)`` → a fresh :class:`Aggregate` for one round."""


@dataclass
class Strategy:
    """A named combination of rule, server optimizer and client config. See the module docstring."""

    name: str
    rule: Rule
    optimizer: ServerOptimizer
    streaming: bool
    client_config: Params = field(default_factory=dict)
    dp: CentralDp | None = None

    def configure(self, round: int) -> Params:
        """Extra config for the clients of ``round`` (merged into the round's config)."""
        return dict(self.client_config)

    def begin(self, round: int, *, dim: int, capacity: int) -> Aggregate:
        """A fresh aggregation for ``round``; ``capacity`` is the number of clients expected."""
        return self.rule(dim, capacity, round)

    def finish(self, model: Vector, aggregate: Aggregate) -> Vector:
        """The next global model from the current one and a round's aggregation."""
        delta = aggregate.result()
        new = self.optimizer.step(model, delta)
        if not np.all(np.isfinite(new)):
            raise StrategyError(f"{self.name} produced a non-finite model (diverged)")
        return new

    def state(self) -> State:
        return {"optimizer": self.optimizer.state()}

    def restore(self, state: State) -> None:
        self.optimizer.restore(state.get("optimizer", {}))


def _mean(*, clip_norm: float | None = None, dp: CentralDp | None = None) -> Rule:
    return lambda dim, capacity, rnd: MeanAggregate(dim, clip_norm=clip_norm, dp=dp, round=rnd)


def _buffered(combine: Combine) -> Rule:
    return lambda dim, capacity, rnd: BufferAggregate(dim, capacity=capacity, combine=combine)


def _take(params: dict[str, Any], name: str, default: Any, kind: type = float) -> Any:
    value = params.pop(name, default)
    try:
        return kind(value) if value is not None else None
    except (TypeError, ValueError):
        raise StrategyError(f"strategy parameter {name!r} must be {kind.__name__}, got {value!r}") from None


def make_strategy(
    name: str, params: Mapping[str, Any] | None = None, *, dp: CentralDp | None = None
) -> Strategy:
    """Build a strategy by name (``fedavg``, ``fedavgm``, ``fedprox``, ``fedadam``, ``fedyogi``,
    ``fedadagrad``, ``fedbuff``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``norm_clip``).

    ``params`` are the strategy's keyword parameters (``server_lr``, ``momentum``, ``proximal_mu``, ``beta``,
    ``f``, ``m``, ``clip_norm``, ``beta1``, ``beta2``, ``tau``); unknown ones raise :class:`StrategyError`.
    ``dp`` adds central differential privacy (only with linear mean strategies).
    """
    p = dict(params or {})
    key = name.lower().replace("-", "_")
    if key not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    strategy = STRATEGIES[key](p, dp)
    if p:
        raise StrategyError(f"unknown parameter(s) for {key}: {', '.join(sorted(p))}")
    if dp is not None and not strategy.streaming:
        raise StrategyError(f"central DP needs a linear (mean) strategy, not {key}")
    return strategy


def _fedavg(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    return Strategy("fedavg", _mean(dp=dp), Sgd(lr=_take(p, "server_lr", 1.0)), True, dp=dp)


def _fedavgm(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    opt = Momentum(lr=_take(p, "server_lr", 1.0), momentum=_take(p, "momentum", 0.9))
    return Strategy("fedavgm", _mean(dp=dp), opt, True, dp=dp)


def _fedprox(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    mu = _take(p, "proximal_mu", 0.01)
    if mu < 0:
        raise StrategyError(f"proximal_mu must be >= 0, got {mu}")
    return Strategy(
        "fedprox",
        _mean(dp=dp),
        Sgd(lr=_take(p, "server_lr", 1.0)),
        True,
        client_config={"proximal_mu": mu},
        dp=dp,
    )


def _fedopt(name: str, cls: type[Adaptive]) -> Callable[[dict[str, Any], CentralDp | None], Strategy]:
    def build(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
        opt = cls(
            lr=_take(p, "server_lr", 0.01),
            beta1=_take(p, "beta1", 0.9),
            beta2=_take(p, "beta2", 0.99),
            tau=_take(p, "tau", 1e-3),
        )
        return Strategy(name, _mean(dp=dp), opt, True, dp=dp)

    return build


def _fedbuff(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    # The buffer size and the staleness exponent are round settings (`mode: async`); the rule is a mean.
    return Strategy("fedbuff", _mean(dp=dp), Sgd(lr=_take(p, "server_lr", 1.0)), True, dp=dp)


def _median(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    rule = _buffered(lambda rows, w: robust.coordinate_median(rows))
    return Strategy("median", rule, Sgd(lr=_take(p, "server_lr", 1.0)), False)


def _trimmed(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    beta = _take(p, "beta", 0.2)
    robust.trimmed_mean(np.zeros((3, 1), np.float32), beta=beta)  # validate now, not mid-run
    rule = _buffered(lambda rows, w: robust.trimmed_mean(rows, beta=beta))
    return Strategy("trimmed_mean", rule, Sgd(lr=_take(p, "server_lr", 1.0)), False)


def _krum_factory(multi: bool) -> Callable[[dict[str, Any], CentralDp | None], Strategy]:
    def build(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
        f = _take(p, "f", 1, int)
        m = _take(p, "m", None, int) if multi else 1

        def combine(rows: npt.NDArray[np.float32], w: npt.NDArray[np.float64]) -> Vector:
            keep = m if m is not None else max(rows.shape[0] - f, 1)
            return robust.multi_krum(rows, w, f=f, m=min(keep, rows.shape[0]))[0]

        return Strategy(
            "multi_krum" if multi else "krum", _buffered(combine), Sgd(lr=_take(p, "server_lr", 1.0)), False
        )

    return build


def _norm_clip(p: dict[str, Any], dp: CentralDp | None) -> Strategy:
    clip = _take(p, "clip_norm", None)
    lr = Sgd(lr=_take(p, "server_lr", 1.0))
    if clip is not None:  # a fixed bound streams; the adaptive (median-norm) bound needs the whole round
        if clip <= 0 or math.isnan(clip):
            raise StrategyError(f"clip_norm must be > 0, got {clip}")
        return Strategy("norm_clip", _mean(clip_norm=clip), lr, True)
    return Strategy(
        "norm_clip", _buffered(lambda rows, w: robust.norm_clip_mean(rows, w, clip_norm=None)), lr, False
    )


STRATEGIES: dict[str, Callable[[dict[str, Any], CentralDp | None], Strategy]] = {
    "fedavg": _fedavg,
    "fedavgm": _fedavgm,
    "fedprox": _fedprox,
    "fedadam": _fedopt("fedadam", Adam),
    "fedyogi": _fedopt("fedyogi", Yogi),
    "fedadagrad": _fedopt("fedadagrad", Adagrad),
    "fedbuff": _fedbuff,
    "median": _median,
    "trimmed_mean": _trimmed,
    "krum": _krum_factory(False),
    "multi_krum": _krum_factory(True),
    "norm_clip": _norm_clip,
}
