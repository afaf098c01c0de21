"""Synchronous rounds for an :class:`~fedbus.aggregator.server.Aggregator` (``round.mode: sync``).

Each fit round samples live clients, announces the round (everyone sees that it starts; only the sampled
clients are invited, each on its own subject), folds updates as they arrive and closes on all-answered /
``min_clients`` with ``close_early`` / deadline. A round with fewer than ``min_clients`` updates is re-sampled
and retried, except in a private (central DP) run: there every round is released as it is, because the
mechanism divides by a fixed denominator (a missing update adds nothing) and a retry would let whether a
round failed depend on who was sampled. Federated evaluation rounds follow every ``evaluate_every`` rounds.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fedbus.bus.client import Delivery
from fedbus.bus.events import Params

from . import blobs
from .errors import RoundError, UpdateRejected
from .events import EvalReport, ModelUpdate, RoundStart
from .host import RoundHost
from .registry import sample_clients
from .round import EvalRound, FitRound, Verdict
from .secure_round import SecureRound
from .state import RoundProgress
from .strategies import Update

__all__ = ["SyncRounds"]


def _json(metrics: Params) -> bytes:
    return json.dumps(metrics, sort_keys=True).encode()


class SyncRounds:
    """Runs the remaining rounds of a synchronous run."""

    def __init__(self, agg: RoundHost) -> None:
        self.agg = agg

    async def run(self) -> None:
        agg, s = self.agg, self.agg.settings
        while agg.state.round <= s.rounds:
            rnd = agg.state.round
            metrics = await self._fit_round(rnd)
            metrics = {"round": rnd, "version": agg.state.version, **metrics}
            if s.evaluate_every and (rnd % s.evaluate_every == 0 or rnd == s.rounds):
                metrics.update(await self._eval_round(rnd))
            if agg.evaluate_fn is not None:
                metrics.update(await asyncio.to_thread(agg.evaluate_fn, agg.model))
            if agg.accountant is not None and agg.strategy.dp is not None:
                metrics["epsilon"] = agg.accountant.epsilon(agg.strategy.dp.delta)
            agg.state.history.append(metrics)
            agg.state.round = rnd + 1
            agg.state.progress = None
            await agg.states.store.put_bytes(f"{agg.states.model_name(agg.state.version)}.json", _json(metrics))
            await agg.checkpoint(force=True)
            await agg.finish_round(rnd, kind="summary", metrics=metrics)
        agg.state.finished = True
        await agg.checkpoint(force=True)

    async def _fit_round(self, rnd: int) -> Params:
        """Run fit round ``rnd`` (re-sampling on failure) until it succeeds; returns its metrics."""
        agg, s = self.agg, self.agg.settings
        progress = agg.state.progress
        attempt = progress.attempt if progress is not None and progress.round == rnd else 0
        while True:
            if attempt >= s.max_attempts:
                raise RoundError(f"failed {attempt} times", round=rnd, needed=s.min_clients)
            if agg.secure is not None:
                alive = await agg.wait_for_clients(s.min_available)
                sampled = agg.sample(alive, round=rnd, attempt=attempt)
                outcome = await SecureRound(agg, rnd, attempt, sampled).run()
            else:
                outcome = await self._plain_round(rnd, attempt)
            if outcome is not None:
                return outcome
            attempt += 1

    async def _plain_round(self, rnd: int, attempt: int) -> Params | None:
        agg, s = self.agg, self.agg.settings
        progress = agg.state.progress
        resuming = progress is not None and progress.round == rnd and progress.attempt == attempt
        if resuming:
            assert progress is not None
            sampled = progress.sampled
            await agg.wait_for_clients(min(s.min_available, len(set(sampled) - set(progress.received))))
        else:
            alive = await agg.wait_for_clients(s.min_available)
            sampled = agg.sample(alive, round=rnd, attempt=attempt)
        started = agg.clock()
        fit = FitRound(
            round=rnd,
            attempt=attempt,
            version=agg.state.version,
            sampled=sampled,
            min_clients=min(s.min_clients, len(sampled)),
            deadline=started + s.timeout_s,
            close_early=s.close_early,
            aggregate=agg.strategy.begin(rnd, dim=agg.dim, capacity=len(sampled)),
        )
        if resuming:
            assert progress is not None
            if progress.aggregate:  # empty when the round was checkpointed before anything was folded
                fit.aggregate.restore(progress.aggregate)
            fit.received = list(progress.received)
        else:
            agg.state.progress = RoundProgress(
                round=rnd, attempt=attempt, sampled=sampled, started_version=agg.state.version
            )
            await agg.checkpoint(force=True)
        rlog = agg.log.bind(round=rnd, attempt=attempt)
        config = {**agg.client_config, **agg.strategy.configure(rnd)}
        start = RoundStart(
            run_id=s.run_id,
            round=rnd,
            kind="fit",
            version=agg.state.version,
            model=agg.model_ref(),
            deadline_s=s.timeout_s,
            config=config,
            attempt=attempt,
        )
        await agg.announce(start, fit.pending)
        rlog.info("round started", sampled=len(sampled), pending=len(fit.pending), resumed=resuming)
        while not fit.closed(agg.clock()):
            delivery = await agg.next_delivery(fit.deadline)
            for cid in fit.pending:
                if not agg.registry.is_alive(cid, agg.clock()):
                    fit.drop(cid)
                    rlog.warning("client vanished", client=cid)
            if delivery is None:
                continue
            match delivery.event:
                case ModelUpdate() as update:
                    await self._on_update(fit, update, delivery)
                case EvalReport():
                    pass  # a report of an evaluation round that already closed
                case _:
                    await agg.stray(delivery)
        late = [c for c in fit.pending if c not in fit.dropped]
        duration = agg.clock() - started
        if not fit.succeeded and not agg.private:
            rlog.warning(
                "round failed",
                received=len(fit.received),
                needed=fit.min_clients,
                late=len(late),
                dropped=len(fit.dropped),
            )
            agg.state.progress = None
            await agg.finish_round(
                rnd,
                status="failed",
                received=fit.received,
                late=late,
                dropped=sorted(fit.dropped),
                rejected=sorted(fit.rejected),
                duration_s=duration,
            )
            return None
        agg.state.progress.aggregate = fit.aggregate.state()  # type: ignore[union-attr]
        agg.state.progress.received = list(fit.received)  # type: ignore[union-attr]
        await agg.checkpoint(force=True)  # the round's inputs are safe: their blobs may go
        for name in fit.blobs:
            await agg.store.delete(name)
        new_model = agg.strategy.finish(agg.model, fit.aggregate)
        agg.account()
        counts: Params = {
            "clients": len(fit.received),
            "late": len(late),
            "dropped": len(fit.dropped),
            "rejected": len(fit.rejected),
        }
        # A private run publishes neither the clients' own (un-noised) metrics nor who or how many took part.
        metrics: Params = {} if agg.private else {**fit.summary(), **counts}
        public = not agg.private
        await agg.finish_round(
            rnd,
            model=new_model,
            metrics=metrics,
            received=fit.received if public else [],
            late=late if public else [],
            dropped=sorted(fit.dropped) if public else [],
            rejected=sorted(fit.rejected) if public else [],
            duration_s=duration,
        )
        rlog.info("round closed", **counts, version=agg.state.version, seconds=round(duration, 4))
        return metrics

    async def _on_update(self, fit: FitRound, event: ModelUpdate, delivery: Delivery[Any]) -> None:
        agg = self.agg
        cid = event.client_id
        if not agg.genuine(delivery, cid):
            return
        verdict = fit.check(cid, event.round, event.base_version)
        if verdict is not Verdict.ACCEPTED:
            await agg.refuse(event.round, cid, verdict)
            return
        try:
            delta = await blobs.fetch(
                event.update,
                store=agg.store,
                length=agg.dim,
                within=f"{agg.settings.run_id}/update/{event.round}/",
            )
            if event.num_examples <= 0:
                raise UpdateRejected("bad_examples", f"num_examples={event.num_examples}")
        except UpdateRejected as exc:
            fit.reject(cid, exc.reason)
            await agg.refuse(event.round, cid, exc.reason, str(exc))
            return
        fit.accept(Update(cid, delta, event.num_examples, metrics=event.metrics))
        if event.update.object is not None:
            fit.blobs.append(event.update.object)
        assert agg.state.progress is not None
        agg.state.progress.received = list(fit.received)
        agg.state.progress.aggregate = fit.aggregate.state()
        await agg.checkpoint()

    async def _eval_round(self, rnd: int) -> Params:
        agg, s = self.agg, self.agg.settings
        alive = agg.registry.alive(agg.clock())
        if not alive:
            return {}
        sampled = sample_clients(alive, fraction=s.fraction_evaluate, min_clients=1, seed=s.seed + 1, round=rnd)
        started = agg.clock()
        ev = EvalRound(round=rnd, version=agg.state.version, sampled=sampled, deadline=started + s.timeout_s)
        start = RoundStart(
            run_id=s.run_id,
            round=rnd,
            kind="evaluate",
            version=agg.state.version,
            model=agg.model_ref(),
            deadline_s=s.timeout_s,
            config=dict(agg.client_config),
        )
        await agg.announce(start, sampled)
        while not ev.closed(agg.clock()):
            delivery = await agg.next_delivery(ev.deadline)
            for cid in sampled:
                if not agg.registry.is_alive(cid, agg.clock()):
                    ev.drop(cid)
            if delivery is None:
                continue
            match delivery.event:
                case EvalReport() as r if agg.genuine(delivery, r.client_id):
                    ev.offer(r.client_id, r.round, r.version, r.num_examples, r.loss, r.metrics)
                case _:
                    await agg.stray(delivery)
        metrics = ev.summary()
        public = not agg.private
        await agg.finish_round(
            rnd,
            kind="evaluate",
            metrics=metrics,
            received=sorted(ev.reports) if public else [],
            dropped=sorted(ev.dropped) if public else [],
            started=started,
        )
        return metrics
