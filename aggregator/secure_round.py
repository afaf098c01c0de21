"""A secure fit round on the bus: the aggregator's side of the SecAgg+ message flow.

Each stage waits until every expected client has answered or vanished (heartbeats), or until the stage
timeout; the unmask stage ends as soon as enough shares are in. The protocol itself (keys, shares, masks,
reconstruction) is :mod:`fedbus.aggregator.secagg`; a secure round is not checkpointed mid-way (a restarted
aggregator re-runs it with fresh keys).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedbus.bus.client import Delivery
from fedbus.bus.events import Params

from . import blobs
from .errors import SecAggError, UpdateRejected
from .events import (
    RoundStart,
    SecAggAdvertise,
    SecAggInbox,
    SecAggMasked,
    SecAggPeer,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from .host import RoundHost
from .round import weighted_metrics
from .secagg import SecAggServer
from .strategies import MeanAggregate

__all__ = ["SecureRound"]


class SecureRound:
    """Runs one secure round for an :class:`~fedbus.aggregator.server.Aggregator`."""

    def __init__(self, agg: RoundHost, rnd: int, attempt: int, sampled: list[str]) -> None:
        assert agg.secure is not None
        self.agg = agg
        self.round = rnd
        self.attempt = attempt
        self.sampled = sampled
        self.spec = agg.secure
        self.server = SecAggServer(
            agg.secure.params(), f"{agg.settings.run_id}|{rnd}|{attempt}".encode(), agg.dim
        )
        self.metrics: list[tuple[int, Params]] = []
        self.log = agg.log.bind(round=rnd, attempt=attempt, secure=True)

    async def _stage(self, expected: set[str], handle: Any, done: Any = None) -> None:
        """Feed deliveries to ``handle`` until ``expected`` answered or vanished, ``done()``, or timeout."""
        agg = self.agg
        deadline = agg.clock() + self.spec.stage_timeout_s
        while agg.clock() < deadline:
            alive_pending = {c for c in expected if agg.registry.is_alive(c, agg.clock())}
            if not alive_pending or (done is not None and done()):
                return
            delivery = await agg.next_delivery(deadline)
            if delivery is not None and await handle(delivery):
                expected.discard(delivery.event.client_id)

    def _from(self, delivery: Delivery[Any], cls: type) -> Any:
        event = delivery.event
        if (
            isinstance(event, cls)
            and event.round == self.round  # type: ignore[attr-defined]
            and self.agg.genuine(delivery, event.client_id)
        ):  # type: ignore[attr-defined]
            return event
        return None

    async def run(self) -> Params | None:
        """The round's metrics, or ``None`` when it failed (too few clients at some stage)."""
        agg, s = self.agg, self.agg.settings
        started = agg.clock()
        p = self.server.params
        config = {**agg.client_config, **agg.strategy.configure(self.round)}
        await agg.announce(
            RoundStart(
                run_id=s.run_id,
                round=self.round,
                kind="fit",
                version=agg.state.version,
                model=agg.model_ref(),
                deadline_s=s.timeout_s,
                config=config,
                attempt=self.attempt,
                secure=True,
            ),
            self.sampled,
        )
        try:
            await self._advertise()
            total = self.server.close_roster()
            await agg.publish(
                SecAggRoster(
                    run_id=s.run_id,
                    round=self.round,
                    total_examples=total,
                    threshold=p.threshold,
                    neighbours=p.neighbours,
                    clip=p.clip,
                    levels=p.levels,
                    peers=[
                        SecAggPeer(client_id=c, enc_key=k.enc, mask_key=k.mask, num_examples=k.num_examples)
                        for c, k in sorted(self.server.roster.items())
                    ],
                )
            )
            await self._share()
            await self._mask()
            await self._unmask()
            mean_delta, survivors = self.server.unmask()
        except SecAggError as exc:
            self.log.warning("secure round failed", error=str(exc))
            await agg.finish_round(
                self.round,
                status="failed",
                received=self.server.survivors,
                started=started,
                metrics={"error": str(exc)},
            )
            return None
        holder = MeanAggregate(agg.dim)
        holder.acc[:] = mean_delta
        holder.weight, holder.count = 1.0, survivors
        new_model = agg.strategy.finish(agg.model, holder)
        dropped = sorted(set(self.sampled) - set(self.server.survivors))
        metrics: Params = {
            **weighted_metrics(self.metrics),
            "clients": survivors,
            "late": 0,
            "dropped": len(dropped),
            "rejected": 0,
            "secagg_revealers": len(self.server.revealers),
        }
        await agg.finish_round(
            self.round,
            model=new_model,
            metrics=metrics,
            received=sorted(self.server.survivors),
            dropped=dropped,
            started=started,
        )
        self.log.info(
            "secure round closed",
            survivors=survivors,
            dropped=len(dropped),
            revealers=len(self.server.revealers),
        )
        return metrics

    async def _advertise(self) -> None:
        async def handle(d: Delivery[Any]) -> bool:
            if (e := self._from(d, SecAggAdvertise)) is None or e.client_id not in self.sampled:
                return False
            try:
                self.server.advertised(e.client_id, e.enc_key, e.mask_key, e.num_examples)
            except SecAggError as exc:
                await self.agg.refuse(self.round, e.client_id, "bad_secagg", str(exc))
                return False
            return True

        await self._stage(set(self.sampled), handle)

    async def _share(self) -> None:
        inboxes: dict[str, dict[str, bytes]] = {c: {} for c in self.server.roster}

        async def handle(d: Delivery[Any]) -> bool:
            if (e := self._from(d, SecAggShares)) is None or e.client_id in self.server.shared:
                return False
            try:
                routed = self.server.route(e.client_id, e.ciphertexts)
            except SecAggError as exc:
                await self.agg.refuse(self.round, e.client_id, "bad_secagg", str(exc))
                return False
            for dst, blob in routed.items():
                inboxes[dst][e.client_id] = blob
            return True

        await self._stage(set(self.server.roster), handle)
        for client in sorted(self.server.shared):
            await self.agg.publish(
                SecAggInbox(
                    client_id=client,
                    run_id=self.agg.settings.run_id,
                    round=self.round,
                    ciphertexts=inboxes[client],
                )
            )

    async def _mask(self) -> None:
        async def handle(d: Delivery[Any]) -> bool:
            if (e := self._from(d, SecAggMasked)) is None:
                return False
            try:
                y = await blobs.fetch(
                    e.masked,
                    store=self.agg.store,
                    length=self.agg.dim,
                    dtype="uint32",
                    within=f"{self.agg.settings.run_id}/masked/{self.round}/",
                )
                self.server.add_masked(e.client_id, np.asarray(y, np.uint32))
            except (UpdateRejected, SecAggError) as exc:
                await self.agg.refuse(
                    self.round, e.client_id, getattr(exc, "reason", "bad_secagg"), str(exc)
                )
                return False
            self.metrics.append((e.num_examples, e.metrics))
            return True

        await self._stage(set(self.server.shared), handle)

    async def _unmask(self) -> None:
        if len(self.server.survivors) < self.server.params.threshold:
            raise SecAggError(
                f"{len(self.server.survivors)} masked inputs, below the threshold "
                f"{self.server.params.threshold}",
                round=self.round,
                stage="mask",
            )
        await self.agg.publish(
            SecAggUnmask(
                run_id=self.agg.settings.run_id,
                round=self.round,
                survivors=sorted(self.server.survivors),
                dropped=self.server.dropped(),
            )
        )

        async def handle(d: Delivery[Any]) -> bool:
            if (e := self._from(d, SecAggReveal)) is None:
                return False
            try:
                self.server.add_reveal(e.client_id, e.seed_shares, e.key_shares)
            except SecAggError as exc:
                await self.agg.refuse(self.round, e.client_id, "bad_secagg", str(exc))
                return False
            return True

        await self._stage(set(self.server.shared), handle, done=self.server.can_unmask)
