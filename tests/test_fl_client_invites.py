"""A client answers a synchronous round only when it holds both the round's start (which everyone sees) and
its own invitation, whichever arrives first; a start without an invitation is not its round. Over a real
nats-server, with the test playing the aggregator. And the secure-round mailbox stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import numpy as np

from fedbus.aggregator.client import FlClient
from fedbus.aggregator.events import (
    ClientJoin,
    EvalReport,
    ModelRef,
    ModelUpdate,
    RoundInvite,
    RoundStart,
    RunFinished,
    SecAggRoster,
)
from fedbus.aggregator.inbox import Inbox
from fedbus.aggregator.secure_client import Mailbox
from fedbus.aggregator.testing import quadratic_clients
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.signing import AgentKey

RUN, ME, DIM = "invites", "client-0007", 4


def _model() -> ModelRef:
    weights = np.zeros(DIM, np.float32)
    return ModelRef(sha256=hashlib.sha256(weights.tobytes()).hexdigest(), length=DIM, inline=weights.tobytes())


def _start(round: int, kind: str = "fit") -> RoundStart:
    return RoundStart(run_id=RUN, round=round, kind=kind, version=0, model=_model(), deadline_s=10.0)


def _invite(round: int, kind: str = "fit", client: str = ME) -> RoundInvite:
    return RoundInvite(client_id=client, run_id=RUN, round=round, kind=kind, version=0)


async def test_client_pairs_start_and_invitation_in_either_order(nats_server: NatsServer) -> None:
    async with contextlib.AsyncExitStack() as stack:
        agg = await stack.enter_async_context(
            Bus(transport_for(nats_server.url, client_id="agg-inv"), source="aggregator", security=Security.OFF)
        )
        inbox = await stack.enter_async_context(Inbox(agg))
        for cls in (ClientJoin, ModelUpdate, EvalReport):
            await inbox.add(cls, key=RUN)
        await agg.transport.flush()
        bus = await stack.enter_async_context(
            Bus(transport_for(nats_server.url, client_id=ME), source=ME, key=AgentKey.generate())
        )
        client = FlClient(bus, quadratic_clients(1, DIM)[0], run_id=RUN, heartbeat_s=0.2)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.run())

            async def next_answer() -> ModelUpdate | EvalReport:
                while True:
                    delivery = await inbox.next(10.0)
                    assert delivery is not None, "the client did not answer"
                    if isinstance(delivery.event, ModelUpdate | EvalReport):
                        return delivery.event

            while not isinstance((await inbox.next(10.0)).event, ClientJoin):  # type: ignore[union-attr]
                pass
            await agg.publish(_invite(1))  # the invitation first, then the start
            await agg.publish(_start(1))
            first = await next_answer()
            assert isinstance(first, ModelUpdate) and first.round == 1 and first.client_id == ME

            await agg.publish(_start(2))  # the start first, then the invitation
            await agg.publish(_invite(2))
            second = await next_answer()
            assert isinstance(second, ModelUpdate) and second.round == 2

            await agg.publish(_start(3))  # not invited: not this client's round
            await agg.publish(_invite(3, client="client-0008"))  # another client's invitation
            await agg.publish(_invite(3, kind="evaluate"))
            await agg.publish(_start(3, kind="evaluate"))
            third = await next_answer()  # had it trained in round 3, that update would come first
            assert isinstance(third, EvalReport) and third.round == 3

            await agg.publish(RunFinished(run_id=RUN, status="ok", rounds=3, version=0))
        assert task.result().fits == 2 and task.result().evaluations == 1


async def test_secure_mailbox_stays_bounded_under_a_flood() -> None:
    mailbox = Mailbox(capacity=16)
    for rnd in range(5000, 0, -1):  # descending rounds: none is older than the newest − 2 when it arrives
        roster = SecAggRoster(
            run_id=RUN, round=rnd, peers=[], total_examples=0, threshold=2, neighbours=0, clip=1.0, levels=2
        )
        mailbox.deliver(roster, rnd)
    assert len(mailbox) <= 16
    assert (await mailbox.wait(SecAggRoster, 1, 1.0)).round == 1  # the newest delivery is still there
