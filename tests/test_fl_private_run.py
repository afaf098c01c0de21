"""A private (central DP) federation over a real nats-server, watched by a spy that reads every frame of the
run: regression test of finding 11 of issue 7. What an observer may read (round starts and closes, refusals,
models, the end) names no client and counts none; each sampled client is invited on its own subject; only
invited clients train; and the reported ε is the one an independent accountant gives for the Poisson
sampling the aggregator did."""

from __future__ import annotations

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant as TheirAccountant

from fedbus.aggregator.config import parse_config
from fedbus.aggregator.events import (
    GlobalModel,
    ModelUpdate,
    RoundClose,
    RoundInvite,
    RoundStart,
    RunFinished,
    UpdateRefused,
)
from fedbus.aggregator.federation import SimulationOptions, client_id, simulate
from fedbus.aggregator.testing import quadratic_clients
from fedbus.bus.broker import NatsServer
from fedbus.bus.codec import Codec
from fedbus.bus.connect import transport_for
from fedbus.bus.events import Event

N, DIM, ROUNDS, SIGMA, DELTA = 10, 16, 4, 0.8, 1e-5
OBSERVABLE = (RoundStart, RoundClose, UpdateRefused, GlobalModel, RunFinished)
"""What the observer role (and every fl-client) may subscribe to."""


def _independent_epsilon(q: float) -> float:
    accountant = TheirAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(SIGMA)), ROUNDS)
    return float(accountant.get_epsilon(DELTA))


async def test_private_run_keeps_the_sample_secret_and_reports_a_true_epsilon(nats_server: NatsServer) -> None:
    run_id = "private-run"
    config = parse_config(
        {
            "run_id": run_id,
            "rounds": ROUNDS,
            "clients": {"count": N, "lr": 0.5},
            "round": {
                "fraction": 0.3,
                "min_clients": 1,
                "min_available": N,
                "timeout_s": 10,
                "heartbeat_s": 0.2,
                "heartbeat_timeout_s": 1.0,
                "evaluate_every": 0,
            },
            "privacy": {"clip_norm": 1.0, "noise_multiplier": SIGMA, "delta": DELTA, "seed": 5},
        }
    )
    spy_transport = transport_for(nats_server.url, client_id="dp-spy")
    await spy_transport.connect()
    spy = await spy_transport.subscribe("fedbus.fl.>", max_pending=100_000)
    await spy_transport.flush()
    result = await simulate(
        config, quadratic_clients(N, DIM), np.zeros(DIM, np.float32), options=SimulationOptions(server=nats_server.url)
    )
    codec = Codec()
    frames: list[tuple[str, bytes, Event]] = []
    while not any(isinstance(e, RunFinished) for _, _, e in frames):  # the aggregator's last word
        frame = await spy.next(10.0)
        env = codec.unpack(frame.data)
        if env.type.startswith("fl."):
            frames.append((frame.subject, frame.data, codec.decode(env)))
    await spy_transport.close()

    assert result.status == "ok" and result.version == ROUNDS
    q = 3 / N  # fraction 0.3 of 10 clients: an expected 3 per round
    reference = _independent_epsilon(q)
    assert result.epsilon is not None and reference <= result.epsilon <= reference * 1.01
    assert result.history[-1]["epsilon"] == result.epsilon

    ids = [client_id(i).encode() for i in range(N)]
    for subject, data, event in frames:
        if isinstance(event, OBSERVABLE):
            assert event.run_id == run_id
            assert not any(cid in data for cid in ids), f"{subject} names a client"
        if isinstance(event, RoundClose):
            assert not (event.received or event.late or event.dropped or event.rejected)
            assert not {"clients", "late", "dropped", "rejected"} & set(event.metrics)
    starts = [e for _, _, e in frames if isinstance(e, RoundStart)]
    assert len(starts) == ROUNDS and all(s.invited is None and not s.open for s in starts)
    assert not [e for _, _, e in frames if isinstance(e, UpdateRefused)]

    invited: dict[int, set[str]] = {r: set() for r in range(1, ROUNDS + 1)}
    for subject, _, event in frames:
        if isinstance(event, RoundInvite):
            assert subject == f"fedbus.fl.invite.{event.client_id}"  # readable by that client alone
            invited[event.round].add(event.client_id)
    trained = {r: {e.client_id for _, _, e in frames if isinstance(e, ModelUpdate) and e.round == r} for r in invited}
    assert trained == invited  # only invited clients train, and every invited one did
    sizes = sorted(len(v) for v in invited.values())
    assert sum(sizes) > 0 and sizes[-1] < N  # a sample, not everyone
    assert len({frozenset(v) for v in invited.values()}) > 1  # drawn afresh each round
