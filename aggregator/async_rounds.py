"""Asynchronous federated learning (FedBuff, Nguyen et al. 2022) for an
:class:`~fedbus.aggregator.server.Aggregator` with ``round.mode: async``.

Every version is announced to every client; a free client trains on the newest model it has and sends its
delta with the version it started from. Each ``buffer_size`` updates, weighted by
``num_examples / (1 + staleness)^staleness_exponent``, make a new version (one "round" of the run). Updates
more than ``max_staleness`` versions old are refused. Idempotence is by ``client@base_version`` across
buffers, so an update is folded at most once whichever buffer it arrives in.
"""

from __future__ import annotations

import asyncio

import numpy as np

from fedbus.bus.events import Params

from . import blobs
from .errors import RoundError, UpdateRejected
from .events import ModelUpdate, RoundStart
from .host import RoundHost
from .round import Verdict, weighted_metrics
from .state import RoundProgress
from .strategies import Aggregate, Update, staleness_weight

__all__ = ["AsyncRounds"]


def _base(key: str) -> int:
    """The base version of an idempotence key ``client@version``."""
    return int(key.rsplit("@", 1)[1])


class AsyncRounds:
    """Runs the remaining versions of an asynchronous run."""

    def __init__(self, agg: RoundHost) -> None:
        self.agg = agg

    async def run(self) -> None:
        agg, s = self.agg, self.agg.settings
        await agg.wait_for_clients(s.min_available)
        while agg.state.round <= s.rounds:
            await self._one(agg.state.round)
        agg.state.finished = True
        await agg.checkpoint(force=True)

    async def _one(self, rnd: int) -> None:
        agg, s = self.agg, self.agg.settings
        progress = agg.state.progress
        aggregate = agg.strategy.begin(rnd, dim=agg.dim, capacity=s.buffer_size)
        horizon = agg.state.version - s.max_staleness
        seen = [k for k in (progress.received if progress is not None else []) if _base(k) >= horizon]
        if progress is not None and progress.round == rnd and progress.aggregate:
            aggregate.restore(progress.aggregate)
        agg.state.progress = RoundProgress(
            round=rnd,
            attempt=0,
            sampled=[],
            received=seen,
            aggregate=progress.aggregate if progress is not None and progress.round == rnd else {},
            started_version=agg.state.version,
        )
        started = agg.clock()
        await agg.publish(
            RoundStart(
                run_id=s.run_id,
                round=rnd,
                kind="fit",
                version=agg.state.version,
                model=agg.model_ref(),
                deadline_s=s.timeout_s,
                config={**agg.client_config, **agg.strategy.configure(rnd)},
                open=True,
            )
        )
        rows: list[tuple[int, Params]] = []
        staleness: list[int] = []
        idle_deadline = agg.clock() + s.timeout_s
        while aggregate.count < s.buffer_size:
            delivery = await agg.next_delivery(idle_deadline)
            if delivery is None:
                if agg.clock() >= idle_deadline:
                    raise RoundError(
                        f"no update for {s.timeout_s:g}s",
                        round=rnd,
                        received=aggregate.count,
                        needed=s.buffer_size,
                    )
                continue
            match delivery.event:
                case ModelUpdate() as u if agg.genuine(delivery, u.client_id):
                    tau = await self._fold(aggregate, u, seen)
                    if tau is None:
                        continue
                    staleness.append(tau)
                    rows.append((u.num_examples, u.metrics))
                    idle_deadline = agg.clock() + s.timeout_s
                    agg.state.progress.received = seen
                    agg.state.progress.aggregate = aggregate.state()
                    await agg.checkpoint()
                case _:
                    pass
        metrics: Params = {
            **weighted_metrics(rows),
            "clients": aggregate.count,
            "mean_staleness": float(np.mean(staleness)) if staleness else 0.0,
        }
        new_model = agg.strategy.finish(agg.model, aggregate)
        if agg.evaluate_fn is not None:
            metrics.update(await asyncio.to_thread(agg.evaluate_fn, new_model))
        await agg.finish_round(
            rnd, model=new_model, metrics=metrics, received=sorted(aggregate.clients), started=started
        )
        agg.state.history.append(metrics)
        agg.state.round = rnd + 1
        agg.state.progress = RoundProgress(  # an empty buffer that remembers what was folded
            round=rnd + 1, attempt=0, sampled=[], received=seen, started_version=agg.state.version
        )
        await agg.checkpoint(force=True)

    async def _fold(self, aggregate: Aggregate, u: ModelUpdate, seen: list[str]) -> int | None:
        """Fold one update into the buffer; its staleness, or ``None`` when it was refused."""
        agg, s = self.agg, self.agg.settings
        key = f"{u.client_id}@{u.base_version}"
        tau = agg.state.version - u.base_version
        if key in seen:
            await agg.refuse(u.round, u.client_id, Verdict.DUPLICATE)
            return None
        if tau < 0 or tau > s.max_staleness:
            await agg.refuse(u.round, u.client_id, Verdict.STALE, f"staleness {tau}")
            return None
        try:
            delta = await blobs.fetch(
                u.update, store=agg.store, length=agg.dim, within=f"{s.run_id}/update/{u.round}/"
            )
        except UpdateRejected as exc:
            await agg.refuse(u.round, u.client_id, exc.reason, str(exc))
            return None
        aggregate.fold(
            Update(u.client_id, delta, max(u.num_examples, 1), staleness=tau),
            discount=staleness_weight(tau, exponent=s.staleness_exponent),
        )
        seen.append(key)
        return tau
