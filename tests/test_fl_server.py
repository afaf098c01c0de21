"""The round protocol end to end over a real nats-server: aggregator and clients are the deployed agents.

Clients are :class:`~fedbus.aggregator.testing.QuadraticTrainer` s, whose FedAvg result has a closed form,
so every run is checked against a reference computation, with and without injected faults.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fedbus.aggregator.client import ClientFaults
from fedbus.aggregator.config import parse_config
from fedbus.aggregator.events import GlobalModel, RoundClose, RunFinished
from fedbus.aggregator.federation import SimulationOptions, client_id, simulate
from fedbus.aggregator.server import RunResult
from fedbus.aggregator.testing import QuadraticTrainer, quadratic_clients
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus
from fedbus.bus.connect import transport_for
from fedbus.bus.events import Event
from fedbus.bus.stores import open_stores

DIM = 64
LR = 0.5  # one gradient step of size 0.5: a client moves halfway to its target
_ids = itertools.count()


@dataclass
class Run:
    result: RunResult
    events: list[Event] = field(default_factory=list)

    def closes(self, kind: str = "fit") -> list[RoundClose]:
        return [e for e in self.events if isinstance(e, RoundClose) and e.kind == kind]

    def models(self) -> dict[int, np.ndarray]:
        return {
            e.version: np.frombuffer(e.model.inline, np.float32)
            for e in self.events
            if isinstance(e, GlobalModel) and e.model.inline is not None
        }


async def _run(
    server: NatsServer,
    *,
    n: int = 5,
    rounds: int = 3,
    faults: dict[int, ClientFaults] | None = None,
    round_cfg: dict[str, Any] | None = None,
    strategy: dict[str, Any] | None = None,
    trainers: list[QuadraticTrainer] | None = None,
    run_id: str | None = None,
) -> Run:
    cfg = {
        "min_clients": n,
        "min_available": n,
        "timeout_s": 10,
        "heartbeat_s": 0.2,
        "heartbeat_timeout_s": 1.0,
        "evaluate_every": 0,
        "checkpoint_interval_s": 0,
    }
    cfg.update(round_cfg or {})
    config = parse_config(
        {
            "run_id": run_id or f"t{next(_ids)}",
            "rounds": rounds,
            "clients": {"count": n, "lr": LR},
            "round": cfg,
            "strategy": strategy or {"name": "fedavg"},
        }
    )
    events: list[Event] = []
    result = await simulate(
        config,
        trainers or quadratic_clients(n, DIM),
        np.zeros(DIM, np.float32),
        options=SimulationOptions(server=server.url, faults=faults or {}),
        on_event=events.append,
    )
    return Run(result, events)


def _reference(trainers: list[QuadraticTrainer], rounds: list[list[int]]) -> np.ndarray:
    """FedAvg of one half-step per client, with the given clients answering in each round."""
    w = np.zeros(DIM)
    for answering in rounds:
        ts = [trainers[i] for i in answering]
        mean_target = sum(t.examples * t.target.astype(np.float64) for t in ts) / sum(t.examples for t in ts)
        w = w + LR * (mean_target - w)
    return w


async def test_fedavg_over_nats_matches_the_reference(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(5, DIM)
    run = await _run(nats_server, trainers=trainers, round_cfg={"evaluate_every": 1})
    assert run.result.status == "ok" and run.result.version == 3
    np.testing.assert_allclose(
        run.result.model, _reference(trainers, [list(range(5))] * 3), rtol=1e-5, atol=1e-6
    )
    fits = run.closes("fit")
    assert [c.round for c in fits] == [1, 2, 3]
    assert all(
        sorted(c.received) == [client_id(i) for i in range(5)] and not c.late and not c.dropped for c in fits
    )
    evals = run.closes("evaluate")
    assert len(evals) == 3 and all(len(e.received) == 5 for e in evals)
    losses = [h["eval_loss"] for h in run.result.history]
    assert losses[0] > losses[1] > losses[2]  # federated evaluation sees the model improve
    assert isinstance(run.events[-1], RunFinished) and run.events[-1].status == "ok"
    assert set(run.models()) == {1, 2, 3}


async def test_lineage_keeps_every_global_model_with_its_metrics(nats_server: NatsServer) -> None:
    run = await _run(nats_server, run_id="lineage")
    async with Bus(transport_for(nats_server.url, client_id="reader"), source="reader") as bus:
        store = await (await open_stores(bus)).object_store("fl")
        for version, model in run.models().items():
            stored = np.frombuffer(await store.get_bytes(f"lineage/model/v{version}"), np.float32)
            np.testing.assert_array_equal(stored, model)
        assert np.count_nonzero(np.frombuffer(await store.get_bytes("lineage/model/v0"), np.float32)) == 0
        import json

        metrics = json.loads(await store.get_bytes("lineage/model/v3.json"))
        assert metrics["round"] == 3 and metrics["clients"] == 5


async def test_vanished_client_is_dropped_and_the_round_does_not_hang(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(5, DIM)
    faults = {2: ClientFaults(crash_at="fit", crash_round=2)}  # dies when asked to train in round 2
    run = await _run(
        nats_server,
        trainers=trainers,
        faults=faults,
        round_cfg={"min_clients": 3, "min_available": 4, "timeout_s": 30},
    )
    fits = run.closes("fit")
    assert fits[1].dropped == [client_id(2)] and len(fits[1].received) == 4
    assert fits[1].duration_s < 10  # noticed by missed heartbeats (1 s), far before the 30 s deadline
    assert client_id(2) not in fits[2].received
    expected = _reference(trainers, [[0, 1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 3, 4]])
    np.testing.assert_allclose(run.result.model, expected, rtol=1e-5, atol=1e-6)


async def test_duplicate_updates_are_folded_once(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(4, DIM)
    faults = {i: ClientFaults(duplicate=True) for i in range(4)}
    run = await _run(nats_server, n=4, trainers=trainers, faults=faults)
    np.testing.assert_allclose(
        run.result.model, _reference(trainers, [list(range(4))] * 3), rtol=1e-5, atol=1e-6
    )
    assert all(len(c.received) == 4 for c in run.closes("fit"))


async def test_straggler_is_late_and_its_update_is_not_used(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(4, DIM)
    faults = {3: ClientFaults(delay_s=1.5)}
    run = await _run(
        nats_server,
        n=4,
        rounds=2,
        trainers=trainers,
        faults=faults,
        round_cfg={"min_clients": 3, "min_available": 4, "timeout_s": 0.8},
    )
    for close in run.closes("fit"):
        assert close.late == [client_id(3)] and sorted(close.received) == [client_id(i) for i in range(3)]
    np.testing.assert_allclose(
        run.result.model, _reference(trainers, [[0, 1, 2], [0, 1, 2]]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("corruption", ["wrong_shape", "bad_hash", "nan"])
async def test_malformed_update_is_rejected_and_the_round_is_unaffected(
    nats_server: NatsServer, corruption: str
) -> None:
    trainers = quadratic_clients(4, DIM)
    faults = {1: ClientFaults(corrupt=corruption, crash_round=1)}
    run = await _run(
        nats_server,
        n=4,
        rounds=2,
        trainers=trainers,
        faults=faults,
        round_cfg={"min_clients": 3, "min_available": 4},
    )
    first = run.closes("fit")[0]
    assert first.rejected == [client_id(1)] and client_id(1) not in first.received
    assert first.duration_s < 5  # a rejected client counts as answered: no wait for the deadline
    np.testing.assert_allclose(
        run.result.model, _reference(trainers, [[0, 2, 3], [0, 1, 2, 3]]), rtol=1e-5, atol=1e-6
    )


async def test_sampling_a_fraction_of_clients(nats_server: NatsServer) -> None:
    run = await _run(
        nats_server, n=6, rounds=3, round_cfg={"fraction": 0.5, "min_clients": 2, "min_available": 6}
    )
    sizes = [len(c.received) for c in run.closes("fit")]
    assert sizes == [3, 3, 3]
    assert len({tuple(sorted(c.received)) for c in run.closes("fit")}) > 1  # different clients each round


async def test_fedbuff_async_mode(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(5, DIM)
    run = await _run(
        nats_server,
        rounds=6,
        trainers=trainers,
        strategy={"name": "fedbuff"},
        round_cfg={"mode": "async", "buffer_size": 3, "min_clients": 1, "min_available": 5},
    )
    assert run.result.version == 6
    fits = run.closes("fit")
    assert len(fits) == 6 and all(c.metrics["clients"] == 3 for c in fits)
    assert any(c.metrics["mean_staleness"] > 0 for c in fits)  # clients trained on older versions too
    target = sum(t.examples * t.target for t in trainers) / sum(t.examples for t in trainers)
    assert np.linalg.norm(run.result.model - target) < 0.6 * np.linalg.norm(target)


async def test_server_optimizer_state_carries_across_rounds(nats_server: NatsServer) -> None:
    trainers = quadratic_clients(3, DIM)
    run = await _run(
        nats_server,
        n=3,
        rounds=3,
        trainers=trainers,
        strategy={"name": "fedavgm", "server_lr": 1.0, "momentum": 0.5},
    )
    w, m = np.zeros(DIM), np.zeros(DIM)
    mean_target = sum(t.examples * t.target.astype(np.float64) for t in trainers) / sum(
        t.examples for t in trainers
    )
    for _ in range(3):
        m = 0.5 * m + LR * (mean_target - w)
        w = w + m
    np.testing.assert_allclose(run.result.model, w, rtol=1e-5, atol=1e-5)
