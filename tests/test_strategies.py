"""Strategies against straightforward reference computations (pure numpy, no bus)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.aggregator import robust
from fedbus.aggregator.errors import PrivacyError, StrategyError
from fedbus.aggregator.privacy import CentralDp
from fedbus.aggregator.strategies import (
    STRATEGIES,
    BufferAggregate,
    MeanAggregate,
    Update,
    axpy,
    make_strategy,
    staleness_weight,
)

RNG = np.random.default_rng(7)


def _updates(n: int = 6, d: int = 50, *, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [
        Update(f"c{i}", rng.normal(size=d).astype(np.float32), int(rng.integers(1, 100))) for i in range(n)
    ]


def _run(name: str, updates: list[Update], model: np.ndarray, **params: object) -> np.ndarray:
    strategy = make_strategy(name, params)
    agg = strategy.begin(1, dim=model.size, capacity=len(updates))
    for u in updates:
        agg.fold(u)
    return strategy.finish(model, agg)


def test_axpy_is_in_place_and_exact_for_large_and_small_vectors() -> None:
    for d in (10, 100_000):
        acc = np.ones(d, np.float32)
        x = np.arange(d, dtype=np.float32)
        before = acc.ctypes.data
        axpy(acc, x, 0.5)
        assert acc.ctypes.data == before
        np.testing.assert_allclose(acc, 1 + 0.5 * np.arange(d), rtol=1e-6)


def test_fedavg_is_the_example_weighted_mean() -> None:
    ups = _updates()
    model = RNG.normal(size=50).astype(np.float32)
    want = model + sum(u.num_examples * u.delta.astype(np.float64) for u in ups) / sum(
        u.num_examples for u in ups
    )
    np.testing.assert_allclose(_run("fedavg", ups, model), want, rtol=1e-5, atol=1e-6)


def test_fedavg_memory_does_not_grow_with_clients() -> None:
    agg = make_strategy("fedavg").begin(1, dim=1000, capacity=500)
    assert isinstance(agg, MeanAggregate)
    for u in _updates(200, 1000):
        agg.fold(u)
    held = [v for v in vars(agg).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) == 1000 * 4  # one float32 accumulator, whatever the client count


def test_fedavgm_reference() -> None:
    model = np.zeros(5, np.float32)
    strategy = make_strategy("fedavgm", {"server_lr": 0.5, "momentum": 0.9})
    m = np.zeros(5)
    ref = model.astype(np.float64)
    for r in range(3):
        ups = _updates(3, 5, seed=r)
        agg = strategy.begin(r, dim=5, capacity=3)
        for u in ups:
            agg.fold(u)
        model = strategy.finish(model, agg)
        delta = sum(u.num_examples * u.delta.astype(np.float64) for u in ups) / sum(
            u.num_examples for u in ups
        )
        m = 0.9 * m + delta
        ref = ref + 0.5 * m
    np.testing.assert_allclose(model, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_reference(name: str) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = make_strategy(name, {"server_lr": lr, "beta1": b1, "beta2": b2, "tau": tau})
    model = np.zeros(4, np.float32)
    ref = np.zeros(4)
    m, v = np.zeros(4), np.full(4, tau**2)
    for r in range(4):
        ups = _updates(3, 4, seed=10 + r)
        agg = strategy.begin(r, dim=4, capacity=3)
        for u in ups:
            agg.fold(u)
        model = strategy.finish(model, agg)
        d = sum(u.num_examples * u.delta.astype(np.float64) for u in ups) / sum(u.num_examples for u in ups)
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        elif name == "fedyogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        ref = ref + lr * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(model, ref, rtol=1e-4, atol=1e-6)


def test_fedprox_sends_its_proximal_term_to_clients() -> None:
    s = make_strategy("fedprox", {"proximal_mu": 0.1})
    assert s.configure(3) == {"proximal_mu": 0.1}
    assert s.streaming


def test_median_and_trimmed_mean_reference() -> None:
    ups = _updates(7, 30)
    rows = np.stack([u.delta for u in ups])
    model = np.zeros(30, np.float32)
    np.testing.assert_allclose(_run("median", ups, model), np.median(rows, axis=0), rtol=1e-6)
    srt = np.sort(rows.astype(np.float64), axis=0)
    np.testing.assert_allclose(
        _run("trimmed_mean", ups, model, beta=0.2), srt[1:-1].mean(axis=0), rtol=1e-5, atol=1e-6
    )


def test_krum_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(3)
    honest = [rng.normal(0, 0.1, 20).astype(np.float32) for _ in range(7)]
    byzantine = [np.full(20, 5.0, np.float32), np.full(20, -5.0, np.float32)]
    rows = np.stack(honest + byzantine)
    n, f = rows.shape[0], 2
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((rows[i].astype(np.float64) - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    np.testing.assert_allclose(robust.krum_scores(rows, f=f), scores, rtol=1e-6)
    combined, chosen = robust.multi_krum(rows, np.ones(n), f=f, m=3)
    assert chosen == sorted(np.argsort(scores)[:3].tolist())
    assert not set(chosen) & {7, 8}
    np.testing.assert_allclose(combined, rows[chosen].mean(axis=0), rtol=1e-5)


def test_norm_clip_bounds_each_update() -> None:
    ups = [Update("a", np.full(4, 1.0, np.float32), 1), Update("b", np.full(4, 100.0, np.float32), 1)]
    out = _run("norm_clip", ups, np.zeros(4, np.float32), clip_norm=2.0)
    np.testing.assert_allclose(out, (np.full(4, 1.0) + np.full(4, 1.0)) / 2, rtol=1e-6)  # |(1,1,1,1)| = 2
    adaptive = _run("norm_clip", ups, np.zeros(4, np.float32))  # bound = median norm = 101
    assert np.all(np.abs(adaptive) < 100)


def test_staleness_discount() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3, exponent=0.5) == pytest.approx(0.5)
    agg = make_strategy("fedbuff").begin(1, dim=2, capacity=2)
    agg.fold(Update("a", np.array([1, 1], np.float32), 10), discount=1.0)
    agg.fold(Update("b", np.array([3, 3], np.float32), 10), discount=staleness_weight(3))
    np.testing.assert_allclose(agg.result(), (10 * 1 + 10 * 0.5 * 3) / 20)


def test_central_dp_clips_and_adds_calibrated_noise() -> None:
    dp = CentralDp(clip_norm=1.0, noise_multiplier=2.0, expected_clients=4, population=8, seed=1)
    strategy = make_strategy("fedavg", dp=dp)
    d = 200_000
    agg = strategy.begin(5, dim=d, capacity=4)
    for i in range(4):
        agg.fold(Update(f"c{i}", np.full(d, 10.0, np.float32), 1000 * (i + 1)))  # norm ≫ 1: clipped
    out = strategy.finish(np.zeros(d, np.float32), agg)
    clipped_value = 1.0 / math.sqrt(d)
    assert out.mean() == pytest.approx(
        clipped_value, abs=3 * 0.5 / math.sqrt(d)
    )  # uniform weights, mean kept
    assert out.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)  # σ·C/m
    again = make_strategy("fedavg", dp=dp).begin(5, dim=d, capacity=4)
    again.restore(agg.state())
    np.testing.assert_array_equal(make_strategy("fedavg", dp=dp).finish(np.zeros(d, np.float32), again), out)


def test_state_roundtrip_of_buffered_and_streaming_aggregates() -> None:
    for name in ("fedavg", "median"):
        s = make_strategy(name)
        a = s.begin(1, dim=8, capacity=4)
        ups = _updates(4, 8)
        for u in ups[:2]:
            a.fold(u)
        b = s.begin(1, dim=8, capacity=4)
        b.restore(a.state())
        for u in ups[2:]:
            a.fold(u)
            b.fold(u)
        np.testing.assert_array_equal(a.result(), b.result())


def test_rejects_bad_updates_and_parameters() -> None:
    agg = make_strategy("fedavg").begin(1, dim=3, capacity=1)
    with pytest.raises(StrategyError):
        agg.fold(Update("a", np.zeros(4, np.float32), 1))
    with pytest.raises(StrategyError):
        agg.fold(Update("a", np.zeros(3, np.float64), 1))  # type: ignore[arg-type]
    with pytest.raises(StrategyError):
        agg.fold(Update("a", np.zeros(3, np.float32), 0))
    with pytest.raises(StrategyError, match="unknown strategy"):
        make_strategy("fedsomething")
    with pytest.raises(StrategyError, match="unknown parameter"):
        make_strategy("fedavg", {"momentum": 0.9})
    with pytest.raises(StrategyError):
        make_strategy("trimmed_mean", {"beta": 0.6})
    with pytest.raises(StrategyError, match="linear"):
        make_strategy("median", dp=CentralDp())
    with pytest.raises(PrivacyError):
        CentralDp(expected_clients=20, population=10)
    with pytest.raises(StrategyError):
        make_strategy("fedavg").finish(
            np.zeros(3, np.float32), make_strategy("fedavg").begin(1, dim=3, capacity=1)
        )


def test_every_strategy_aggregates_identical_updates_to_that_update() -> None:
    delta = np.linspace(-1, 1, 16).astype(np.float32)
    for name in STRATEGIES:
        params = {"f": 1} if "krum" in name else {}
        if name in ("fedadam", "fedyogi", "fedadagrad"):
            continue  # adaptive steps rescale the delta by design (tested against the reference above)
        out = _run(name, [Update(f"c{i}", delta, 5) for i in range(5)], np.zeros(16, np.float32), **params)
        np.testing.assert_allclose(out, delta, rtol=1e-6, atol=1e-7, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(8))))
def test_streaming_fold_order_does_not_matter(order: list[int]) -> None:
    ups = _updates(8, 64, seed=42)
    a = MeanAggregate(64)
    for u in ups:
        a.fold(u)
    b = MeanAggregate(64)
    for i in order:
        b.fold(ups[i])
    np.testing.assert_allclose(a.result(), b.result(), rtol=1e-5, atol=1e-6)


def test_buffer_grows_past_capacity() -> None:
    agg = BufferAggregate(4, capacity=1, combine=lambda rows, w: rows.mean(axis=0))
    for u in _updates(5, 4):
        agg.fold(u)
    assert agg.count == 5
    np.testing.assert_allclose(agg.result(), np.mean([u.delta for u in _updates(5, 4)], axis=0), rtol=1e-6)


def test_mean_result_is_computed_once_in_place() -> None:
    agg = MeanAggregate(5000)
    for u in _updates(3, 5000):
        agg.fold(u)
    acc = agg.acc
    out = agg.result()
    assert out is acc and agg.result() is out  # no second model-sized array, and idempotent
    with pytest.raises(StrategyError):
        agg.fold(_updates(1, 5000)[0])
    with pytest.raises(StrategyError):
        agg.state()
