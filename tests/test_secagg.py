"""Secure aggregation: Shamir sharing, the SecAgg+ protocol as pure state machines, and secure rounds over
a real nats-server (equal to FedAvg within quantisation error, dropouts recovered, only masked vectors
seen)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedbus.aggregator import blobs, shamir
from fedbus.aggregator.client import ClientFaults, FitOutcome
from fedbus.aggregator.config import parse_config
from fedbus.aggregator.errors import RoundError, SecAggError
from fedbus.aggregator.events import GlobalModel, SecAggMasked
from fedbus.aggregator.federation import SimulationOptions, simulate
from fedbus.aggregator.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    dequantize,
    neighbours,
    quantize,
)
from fedbus.aggregator.testing import QuadraticTrainer, quadratic_clients
from fedbus.bus.broker import NatsServer
from fedbus.bus.codec import Codec
from fedbus.bus.connect import transport_for
from fedbus.bus.events import Event, Params


def test_shamir_threshold() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, holders=[1, 2, 3, 4, 5, 6], threshold=4)
    assert shamir.combine({x: shares[x] for x in (6, 2, 5, 1)}, threshold=4) == secret
    with pytest.raises(SecAggError):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, threshold=4)
    with pytest.raises(SecAggError):
        shamir.split(secret, holders=[1, 1], threshold=1)


def test_quantisation_roundtrip_error_is_half_a_step() -> None:
    x = np.random.default_rng(0).uniform(-3, 3, 10_000).astype(np.float32)
    q = quantize(x, clip=8.0, levels=1 << 22)
    back = dequantize(q, count=1, clip=8.0, levels=1 << 22)
    assert np.abs(back - x).max() <= 16 / (1 << 22) / 2 + 1e-6


def test_neighbour_graph_is_symmetric() -> None:
    roster = [f"c{i}" for i in range(11)]
    for degree in (3, 4, 5, 6):
        d = SecAggParams(neighbours=degree).degree(len(roster))
        assert d % 2 == 0
        for c in roster:
            assert len(neighbours(roster, c, d)) == d
            for p in neighbours(roster, c, d):
                assert c in neighbours(roster, p, d)
    assert set(neighbours(roster, "c0", 20)) == set(roster[1:])


@dataclass
class _Run:
    server: SecAggServer
    xs: dict[str, np.ndarray]
    ns: dict[str, int]
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)


def _protocol(
    n: int,
    d: int,
    params: SecAggParams,
    *,
    no_share: set[str] = frozenset(),  # type: ignore[assignment]
    no_mask: set[str] = frozenset(),
    no_reveal: set[str] = frozenset(),
) -> _Run:  # type: ignore[assignment]
    rng = np.random.default_rng(n)
    xs = {f"c{i:02d}": rng.normal(0, 0.1, d).astype(np.float32) for i in range(n)}
    ns = {c: int(rng.integers(5, 50)) for c in xs}
    run = _Run(SecAggServer(params, b"ctx", d), xs, ns)
    run.clients = {c: SecAggClient(c, params, context=b"ctx") for c in xs}
    for c, cl in run.clients.items():
        run.server.advertised(c, *cl.advertise(), ns[c])
    total = run.server.close_roster()
    inbox: dict[str, dict[str, bytes]] = {c: {} for c in xs}
    for c, cl in run.clients.items():
        cts = cl.share(run.server.roster, total_examples=total)
        if c not in no_share:
            for dst, blob in run.server.route(c, cts).items():
                inbox[dst][c] = blob
    for c, cl in run.clients.items():
        if c not in no_share:
            cl.receive(inbox[c])
    for c, cl in run.clients.items():
        if c not in no_share | no_mask:
            run.masked[c] = cl.mask(xs[c], num_examples=ns[c])
            run.server.add_masked(c, run.masked[c])
    for c, cl in run.clients.items():
        if c not in no_share | no_mask | no_reveal:
            run.server.add_reveal(c, *cl.reveal(run.server.survivors, run.server.dropped()))
    return run


@pytest.mark.parametrize(
    ("no_share", "no_mask", "no_reveal", "params"),
    [
        (set(), set(), set(), SecAggParams(threshold=6)),
        (set(), set(), {"c01", "c04", "c07"}, SecAggParams(threshold=6)),  # 30% drop after masking
        ({"c02"}, {"c05"}, {"c01", "c07"}, SecAggParams(threshold=4)),  # drops at every stage
        (set(), {"c03", "c09"}, {"c00"}, SecAggParams(threshold=3, neighbours=6)),  # SecAgg+ sparse graph
    ],
)
def test_unmasked_sum_equals_weighted_mean_of_survivors(
    no_share: set[str], no_mask: set[str], no_reveal: set[str], params: SecAggParams
) -> None:
    run = _protocol(10, 500, params, no_share=no_share, no_mask=no_mask, no_reveal=no_reveal)
    mean, k = run.server.unmask()
    survivors = [c for c in run.xs if c not in no_share | no_mask]
    assert k == len(survivors)
    want = sum(run.ns[c] * run.xs[c].astype(np.float64) for c in survivors) / sum(
        run.ns[c] for c in survivors
    )
    step = 2 * params.clip / (params.levels - 1)
    total = sum(run.ns.values())
    bound = len(survivors) * step / 2 * total / sum(run.ns[c] for c in survivors)
    assert np.abs(mean - want).max() <= bound + 1e-7


def test_server_state_is_only_the_sum_of_masked_vectors() -> None:
    run = _protocol(8, 2000, SecAggParams(threshold=4))
    arrays = {k: v for k, v in vars(run.server).items() if isinstance(v, np.ndarray)}
    assert list(arrays) == ["masked_sum"]
    for c, y in run.masked.items():
        q = quantize(run.xs[c] * np.float32(run.ns[c] / sum(run.ns.values())), clip=8.0, levels=1 << 22)
        assert np.mean(y == q) < 0.01  # masked input agrees with its plaintext only by chance
        assert abs(np.corrcoef(y.astype(np.float64), q.astype(np.float64))[0, 1]) < 0.1


def test_client_refuses_to_reveal_both_secrets_of_one_peer() -> None:
    run = _protocol(5, 10, SecAggParams(threshold=3), no_reveal={f"c{i:02d}" for i in range(5)})
    with pytest.raises(SecAggError, match="both"):
        run.clients["c00"].reveal(["c01", "c02", "c03"], ["c03"])
    with pytest.raises(SecAggError, match="threshold"):
        run.clients["c00"].reveal(["c01"], [])


def test_unmask_needs_the_threshold() -> None:
    run = _protocol(6, 10, SecAggParams(threshold=4), no_reveal={"c00", "c01", "c02"})
    with pytest.raises(SecAggError, match="not enough shares"):
        run.server.unmask()


# -- over a real broker --------------------------------------------------------------------------------------
@dataclass
class _Recording:
    """Wraps a trainer to remember every delta it produced (the plaintexts the aggregator must never see)."""

    inner: QuadraticTrainer
    deltas: list[np.ndarray] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return self.inner.num_examples

    def fit(self, weights: np.ndarray, config: Params, *, round: int) -> FitOutcome:
        out = self.inner.fit(weights, config, round=round)
        self.deltas.append((out.weights - weights).astype(np.float32))
        return out

    def evaluate(self, weights: np.ndarray, config: Params):  # type: ignore[no-untyped-def]
        return self.inner.evaluate(weights, config)


def _config(run_id: str, *, secure: bool) -> object:
    raw: dict[str, object] = {
        "run_id": run_id,
        "rounds": 2,
        "clients": {"count": 10, "lr": 0.5},
        "round": {
            "min_clients": 6,
            "min_available": 10,
            "timeout_s": 10,
            "heartbeat_s": 0.2,
            "heartbeat_timeout_s": 1.0,
            "evaluate_every": 0,
        },
    }
    if secure:
        raw["secure_aggregation"] = {"threshold": 6, "stage_timeout_s": 10}
    return parse_config(raw)


async def test_secure_rounds_equal_fedavg_and_survive_30_percent_dropout(nats_server: NatsServer) -> None:
    dim = 3000
    init = np.zeros(dim, np.float32)
    plain_models: dict[int, np.ndarray] = {}
    secure_models: dict[int, np.ndarray] = {}

    def keep(into: dict[int, np.ndarray]):  # type: ignore[no-untyped-def]
        def on_event(e: Event) -> None:
            if isinstance(e, GlobalModel) and e.model.inline is not None:
                into[e.version] = np.frombuffer(e.model.inline, np.float32)

        return on_event

    opts = SimulationOptions(server=nats_server.url)
    await simulate(
        _config("sa-plain", secure=False),
        quadratic_clients(10, dim),
        init,
        options=opts,
        on_event=keep(plain_models),
    )

    # Spy on every frame that crosses the broker during the secure run.
    frames: list[tuple[str, bytes]] = []
    spy_transport = transport_for(nats_server.url, client_id="spy")
    await spy_transport.connect()
    spy = await spy_transport.subscribe("fedbus.>", max_pending=100_000)
    recorders = [_Recording(t) for t in quadratic_clients(10, dim)]
    faults = {i: ClientFaults(crash_at="after_masked", crash_round=2) for i in (1, 4, 7)}  # 30% of clients
    result = await simulate(
        _config("sa-secure", secure=True),
        recorders,
        init,  # type: ignore[arg-type]
        options=SimulationOptions(server=nats_server.url, faults=faults),
        on_event=keep(secure_models),
    )
    await spy_transport.flush()
    while spy.pending:
        frame = await spy.next(1.0)
        frames.append((frame.subject, frame.data))
    await spy_transport.close()

    assert result.version == 2 and result.history[1]["clients"] == 10 and result.history[1]["dropped"] == 0
    step = 16 / ((1 << 22) - 1)
    for version in (1, 2):  # both rounds aggregate all 10 clients: the 3 dropouts are unmasked from shares
        np.testing.assert_allclose(secure_models[version], plain_models[version], atol=10 * step)

    codec = Codec()
    masked_seen = 0
    plaintexts = [d for r in recorders for d in r.deltas]
    assert len(plaintexts) == 20
    for subject, data in frames:
        for delta in plaintexts:
            assert delta.tobytes()[:256] not in data, f"a plaintext update crossed the broker on {subject}"
        env = codec.unpack(data)
        if env.type == SecAggMasked.spec.type:
            masked_seen += 1
            event = codec.decode(env)
            assert isinstance(event, SecAggMasked)
            y = np.asarray(
                await blobs.fetch(event.masked, store=None, length=dim, dtype="uint32"), np.float64
            )
            for delta in plaintexts:
                q = quantize(delta * np.float32(0.1), clip=8.0, levels=1 << 22).astype(np.float64)
                assert abs(np.corrcoef(y, q)[0, 1]) < 0.1
    assert masked_seen == 20


async def test_secure_round_fails_cleanly_below_threshold(nats_server: NatsServer) -> None:
    faults = {i: ClientFaults(crash_at="after_advertise", crash_round=1) for i in range(5)}
    config = parse_config(
        {
            "run_id": "sa-fail",
            "rounds": 1,
            "clients": {"count": 8},
            "round": {
                "min_clients": 6,
                "min_available": 8,
                "timeout_s": 5,
                "heartbeat_s": 0.2,
                "heartbeat_timeout_s": 1.0,
                "evaluate_every": 0,
                "max_attempts": 1,
            },
            "secure_aggregation": {"threshold": 6, "stage_timeout_s": 5},
        }
    )
    with pytest.raises(RoundError):
        await simulate(
            config,
            quadratic_clients(8, 10),
            np.zeros(10, np.float32),
            options=SimulationOptions(server=nats_server.url, faults=faults),
        )
