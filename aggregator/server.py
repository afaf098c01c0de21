"""The aggregator agent: runs a federation's rounds on the bus, push-based (no polling anywhere).

::

    async with Bus(transport, source="aggregator") as bus:
        result = await Aggregator(bus, settings=settings, strategy=make_strategy("fedavg"),
                                  initial_model=weights, store=store).run()

Each round it samples live clients, publishes :class:`RoundStart`, folds :class:`ModelUpdate` events in as
they arrive, closes on all-answered / ``min_clients`` / deadline, stores and publishes the new global model.
Vanished clients are noticed by their missing heartbeats, so no round waits on the dead. State is
checkpointed (see :mod:`fedbus.aggregator.state`): a restarted aggregator resumes the run where it stopped.
Secure rounds are delegated to :mod:`fedbus.aggregator.secure_round`, the asynchronous (FedBuff) mode to
:mod:`fedbus.aggregator.async_rounds`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from fedbus.bus.client import Bus, Delivery
from fedbus.bus.events import Params
from fedbus.bus.signing import key_id
from fedbus.bus.stores import ObjectStore

from . import blobs
from .async_rounds import AsyncRounds
from .config import RoundSettings, SecureSpec
from .errors import FlError, RoundError, UpdateRejected
from .events import (
    ClientHeartbeat,
    ClientJoin,
    ClientLeave,
    EvalReport,
    GlobalModel,
    ModelRef,
    ModelUpdate,
    RoundClose,
    RoundStart,
    RunFinished,
    SecAggAdvertise,
    SecAggMasked,
    SecAggReveal,
    SecAggShares,
    UpdateRefused,
)
from .inbox import Inbox
from .privacy import RdpAccountant
from .registry import Registry, sample_clients
from .round import EvalRound, FitRound, Verdict
from .secure_round import SecureRound
from .state import RoundProgress, RunState, StateStore
from .strategies import Strategy, Update

__all__ = ["Aggregator", "RunResult"]

log = structlog.get_logger("fedbus.aggregator")
Vector = npt.NDArray[np.float32]


@dataclass
class RunResult:
    """How a federation ended."""

    status: str
    model: Vector
    version: int
    rounds: int
    history: list[Params] = field(default_factory=list)
    epsilon: float | None = None


class Aggregator:
    """Runs one federation (``settings.run_id``) on a bus. Not reusable: one :meth:`run` per instance."""

    def __init__(
        self,
        bus: Bus,
        *,
        settings: RoundSettings,
        strategy: Strategy,
        initial_model: Vector,
        store: ObjectStore,
        client_config: Params | None = None,
        secure: SecureSpec | None = None,
        evaluate_fn: Callable[[Vector], Params] | None = None,
        trust_on_first_use: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.strategy = strategy
        self.store = store
        self.states = StateStore(store, settings.run_id)
        self.client_config = dict(client_config or {})
        self.secure = secure
        self.evaluate_fn = evaluate_fn
        self.trust_on_first_use = trust_on_first_use
        self.clock = clock
        self.registry = Registry(timeout=settings.heartbeat_timeout_s)
        self.accountant = RdpAccountant() if strategy.dp is not None else None
        self.model = np.ascontiguousarray(initial_model, dtype=np.float32).copy()
        self.dim = self.model.size
        self.state = RunState(run_id=settings.run_id)
        self.log = log.bind(run_id=settings.run_id, agent=bus.source)
        self.refused = 0
        self._inbox: Inbox | None = None
        self._last_checkpoint = 0.0
        self._listening_until = 0.0

    # -- entry point -----------------------------------------------------------------------------------------
    async def run(self) -> RunResult:
        """Run (or resume) the federation to the end; returns the final model and the per-round history."""
        async with Inbox(self.bus, max_pending=max(4096, 8 * self.settings.min_available)) as inbox:
            self._inbox = inbox
            for cls in (ClientJoin, ClientHeartbeat, ClientLeave, ModelUpdate, EvalReport):
                await inbox.add(cls, key=self.settings.run_id)
            if self.secure is not None:
                for cls in (SecAggAdvertise, SecAggShares, SecAggMasked, SecAggReveal):
                    await inbox.add(cls, key=self.settings.run_id)
            await self.bus.transport.flush()
            self._listening_until = self.clock() + 1.5 * self.settings.heartbeat_s
            await self._load()
            try:
                if not self.state.finished:
                    if self.settings.mode == "async":
                        await AsyncRounds(self).run()
                    else:
                        await self._run_sync()
            except FlError as exc:
                self.log.error("federation failed", error=str(exc))
                await self.bus.publish(
                    RunFinished(
                        run_id=self.settings.run_id,
                        status="failed",
                        rounds=self.state.round - 1,
                        version=self.state.version,
                        reason=str(exc),
                    )
                )
                raise
            ref = self._model_ref()
            await self.bus.publish(
                RunFinished(
                    run_id=self.settings.run_id,
                    status="ok",
                    rounds=self.state.round - 1,
                    version=self.state.version,
                    model=ref,
                    metrics=self._last_metrics(),
                )
            )
            await self.bus.transport.flush()
        epsilon = (
            self.accountant.epsilon(self.strategy.dp.delta) if self.accountant and self.strategy.dp else None
        )
        return RunResult(
            "ok", self.model, self.state.version, self.state.round - 1, list(self.state.history), epsilon
        )

    def _last_metrics(self) -> Params:
        return dict(self.state.history[-1]) if self.state.history else {}

    # -- state -----------------------------------------------------------------------------------------------
    async def _load(self) -> None:
        saved = await self.states.load()
        if saved is None:
            self.state.model_object = await self.states.save_model(0, self.model, {"round": 0})
            self.state.model_sha256 = blobs.sha256_of(self.model)
            await self._checkpoint(force=True)
            self.log.info(
                "run started", rounds=self.settings.rounds, dim=self.dim, strategy=self.strategy.name
            )
            return
        self.state = saved
        self.model = await self.states.load_model(saved.version)
        if self.model.size != self.dim:
            raise FlError(f"checkpointed model has {self.model.size} values, the configured one {self.dim}")
        self.strategy.restore(saved.strategy)
        if self.accountant is not None and saved.dp_rdp:
            self.accountant.rdp = np.asarray(saved.dp_rdp, np.float64)
            self.accountant.steps = saved.dp_steps
        self.log.info(
            "run resumed", round=saved.round, version=saved.version, in_progress=saved.progress is not None
        )

    async def _checkpoint(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_checkpoint < self.settings.checkpoint_interval_s:
            return
        self.state.strategy = self.strategy.state()
        if self.accountant is not None:
            self.state.dp_rdp = [float(x) for x in self.accountant.rdp]
            self.state.dp_steps = self.accountant.steps
        await self.states.save(self.state)
        self._last_checkpoint = now

    def _model_ref(self) -> ModelRef:
        data_bytes = self.model.nbytes
        if data_bytes <= self.settings.inline_limit:
            return ModelRef(sha256=self.state.model_sha256, length=self.dim, inline=self.model.tobytes())
        return ModelRef(sha256=self.state.model_sha256, length=self.dim, object=self.state.model_object)

    async def _new_version(self, model: Vector, metrics: Params, *, round: int) -> None:
        """Adopt, store (lineage) and announce a new global model."""
        self.model = model
        self.state.version += 1
        metrics = {"round": round, "version": self.state.version, **metrics}
        self.state.model_object = await self.states.save_model(self.state.version, model, metrics)
        self.state.model_sha256 = blobs.sha256_of(model)
        await self.bus.publish(
            GlobalModel(
                run_id=self.settings.run_id,
                version=self.state.version,
                round=round,
                model=self._model_ref(),
                metrics=metrics,
            )
        )

    # -- events ----------------------------------------------------------------------------------------------
    async def _next(self, wake_at: float) -> Delivery[Any] | None:
        """The next round-relevant delivery, or ``None`` when the caller should re-check its conditions: a
        membership event was handled here, a client may have timed out, or ``wake_at`` passed."""
        assert self._inbox is not None
        now = self.clock()
        expiry = self.registry.next_expiry(now)
        until = min(wake_at, expiry + 1e-3) if expiry is not None else wake_at
        delivery = await self._inbox.next(max(until - now, 0.0))
        if delivery is None:
            return None
        match delivery.event:
            case ClientJoin(client_id=cid, num_examples=n, public_key=key) if self._genuine(delivery, cid):
                self._learn_key(cid, key)
                if self.registry.seen(cid, self.clock(), num_examples=n):
                    self.log.info("client joined", client=cid, examples=n)
            case ClientHeartbeat(client_id=cid, busy=busy, public_key=key) if self._genuine(delivery, cid):
                self._learn_key(cid, key)
                if self.registry.seen(cid, self.clock(), busy=busy):
                    self.log.info("client is back", client=cid)
            case ClientLeave(client_id=cid, reason=reason) if self._genuine(delivery, cid):
                self.registry.leave(cid)
                self.log.info("client left", client=cid, reason=reason)
            case ClientJoin() | ClientHeartbeat() | ClientLeave():
                pass
            case _:
                return delivery
        return None

    def _learn_key(self, client_id: str, public_key: bytes) -> None:
        """Trust a client's signing key on first use (no ``--trust`` file): convenient, and as safe as the
        first contact; deployments that need more pin the keys instead."""
        if not self.trust_on_first_use or len(public_key) != 32:
            return
        if key_id(public_key) not in self.bus.keyring:
            self.bus.keyring.trust(public_key)
            self.log.warning("trusting a client key on first use", client=client_id, kid=key_id(public_key))

    def _genuine(self, delivery: Delivery[Any], client_id: str) -> bool:
        """A client speaks only for itself: the envelope's source must be the client id it claims."""
        if delivery.source == client_id:
            return True
        self.log.warning(
            "event claims another client's id",
            claimed=client_id,
            source=delivery.source,
            type=delivery.envelope.type,
        )
        return False

    async def _refuse(self, round: int, client_id: str, reason: str, detail: str = "") -> None:
        self.refused += 1
        self.log.warning("update refused", round=round, client=client_id, reason=reason, detail=detail)
        await self.bus.publish(
            UpdateRefused(
                run_id=self.settings.run_id, round=round, client_id=client_id, reason=reason, detail=detail
            )
        )

    async def _wait_for_clients(self, needed: int) -> list[str]:
        """Wait until ``needed`` clients are alive. A freshly started aggregator also listens for one and a
        half heartbeat periods first, so that every running client is heard before the first sample is drawn
        (a restarted aggregator then re-draws exactly what the interrupted one drew)."""
        deadline = self.clock() + self.settings.wait_clients_s
        while (
            len(alive := self.registry.alive(self.clock())) < needed or self.clock() < self._listening_until
        ):
            if self.clock() >= deadline:
                raise RoundError(
                    f"only {len(alive)} clients alive after {self.settings.wait_clients_s:g}s",
                    round=self.state.round,
                    received=len(alive),
                    needed=needed,
                )
            delivery = await self._next(min(deadline, max(self._listening_until, self.clock() + 0.05)))
            if delivery is not None:
                await self._stray(delivery)
        return alive

    async def _stray(self, delivery: Delivery[Any]) -> None:
        """An update or report that belongs to no open round."""
        match delivery.event:
            case ModelUpdate(client_id=cid, round=r) | SecAggMasked(client_id=cid, round=r):
                await self._refuse(r, cid, Verdict.LATE, "no fit round is open for it")
            case _:
                pass

    # -- synchronous rounds ----------------------------------------------------------------------------------
    async def _run_sync(self) -> None:
        s = self.settings
        while self.state.round <= s.rounds:
            rnd = self.state.round
            metrics = await self._fit_round(rnd)
            metrics = {"round": rnd, "version": self.state.version, **metrics}
            if s.evaluate_every and (rnd % s.evaluate_every == 0 or rnd == s.rounds):
                metrics.update(await self._eval_round(rnd))
            if self.evaluate_fn is not None:
                metrics.update(await asyncio.to_thread(self.evaluate_fn, self.model))
            if self.accountant is not None and self.strategy.dp is not None:
                metrics["epsilon"] = self.accountant.epsilon(self.strategy.dp.delta)
            self.state.history.append(metrics)
            self.state.round = rnd + 1
            self.state.progress = None
            await self.states.store.put_bytes(
                f"{self.states.model_name(self.state.version)}.json", _json(metrics)
            )
            await self._checkpoint(force=True)
            await self.bus.publish(
                RoundClose(
                    run_id=s.run_id,
                    round=rnd,
                    kind="summary",
                    status="ok",
                    version=self.state.version,
                    metrics=metrics,
                )
            )
        self.state.finished = True
        await self._checkpoint(force=True)

    async def _fit_round(self, rnd: int) -> Params:
        """Run fit round ``rnd`` (re-sampling on failure) until it succeeds; returns its metrics."""
        s = self.settings
        progress = self.state.progress
        attempt = progress.attempt if progress is not None and progress.round == rnd else 0
        while True:
            if attempt >= s.max_attempts:
                raise RoundError(f"failed {attempt} times", round=rnd, needed=s.min_clients)
            if self.secure is not None:
                alive = await self._wait_for_clients(s.min_available)
                sampled = sample_clients(
                    alive,
                    fraction=s.fraction,
                    min_clients=s.min_clients,
                    seed=s.seed,
                    round=rnd,
                    attempt=attempt,
                )
                outcome = await SecureRound(self, rnd, attempt, sampled).run()
            else:
                outcome = await self._plain_round(rnd, attempt)
            if outcome is not None:
                return outcome
            attempt += 1

    async def _plain_round(self, rnd: int, attempt: int) -> Params | None:
        s = self.settings
        progress = self.state.progress
        resuming = progress is not None and progress.round == rnd and progress.attempt == attempt
        if resuming:
            assert progress is not None
            sampled = progress.sampled
            await self._wait_for_clients(min(s.min_available, len(set(sampled) - set(progress.received))))
        else:
            alive = await self._wait_for_clients(s.min_available)
            sampled = sample_clients(
                alive, fraction=s.fraction, min_clients=s.min_clients, seed=s.seed, round=rnd, attempt=attempt
            )
        started = self.clock()
        fit = FitRound(
            round=rnd,
            attempt=attempt,
            version=self.state.version,
            sampled=sampled,
            min_clients=min(s.min_clients, len(sampled)),
            deadline=started + s.timeout_s,
            close_early=s.close_early,
            aggregate=self.strategy.begin(rnd, dim=self.dim, capacity=len(sampled)),
        )
        if resuming:
            assert progress is not None
            if progress.aggregate:  # empty when the round was checkpointed before anything was folded
                fit.aggregate.restore(progress.aggregate)
            fit.received = list(progress.received)
        else:
            self.state.progress = RoundProgress(
                round=rnd, attempt=attempt, sampled=sampled, started_version=self.state.version
            )
            await self._checkpoint(force=True)
        rlog = self.log.bind(round=rnd, attempt=attempt)
        config = {**self.client_config, **self.strategy.configure(rnd)}
        await self.bus.publish(
            RoundStart(
                run_id=s.run_id,
                round=rnd,
                kind="fit",
                version=self.state.version,
                model=self._model_ref(),
                clients=fit.pending,
                deadline_s=s.timeout_s,
                config=config,
                attempt=attempt,
            )
        )
        rlog.info("round started", sampled=len(sampled), pending=len(fit.pending), resumed=resuming)
        while not fit.closed(self.clock()):
            delivery = await self._next(fit.deadline)
            for cid in fit.pending:
                if not self.registry.is_alive(cid, self.clock()):
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
                    await self._stray(delivery)
        late = [c for c in fit.pending if c not in fit.dropped]
        status = "ok" if fit.succeeded else "failed"
        close = RoundClose(
            run_id=s.run_id,
            round=rnd,
            kind="fit",
            status=status,
            version=self.state.version,
            received=list(fit.received),
            late=late,
            dropped=sorted(fit.dropped),
            rejected=sorted(fit.rejected),
            duration_s=self.clock() - started,
        )
        if not fit.succeeded:
            rlog.warning(
                "round failed",
                received=len(fit.received),
                needed=fit.min_clients,
                late=len(late),
                dropped=len(fit.dropped),
            )
            self.state.progress = None
            await self.bus.publish(close)
            return None
        self.state.progress.aggregate = fit.aggregate.state()  # type: ignore[union-attr]
        self.state.progress.received = list(fit.received)  # type: ignore[union-attr]
        await self._checkpoint(force=True)  # the round's inputs are safe: their blobs may go
        for name in fit.blobs:
            await self.store.delete(name)
        new_model = self.strategy.finish(self.model, fit.aggregate)
        if self.accountant is not None and self.strategy.dp is not None:
            dp = self.strategy.dp
            self.accountant.step(q=dp.sampling_rate, sigma=dp.noise_multiplier)
        metrics: Params = {
            **fit.summary(),
            "clients": len(fit.received),
            "late": len(late),
            "dropped": len(fit.dropped),
            "rejected": len(fit.rejected),
        }
        await self._new_version(new_model, metrics, round=rnd)
        await self.bus.publish(
            RoundClose(
                run_id=s.run_id,
                round=rnd,
                kind="fit",
                status="ok",
                version=self.state.version,
                received=close.received,
                late=late,
                dropped=close.dropped,
                rejected=close.rejected,
                duration_s=close.duration_s,
                metrics=metrics,
            )
        )
        rlog.info(
            "round closed",
            clients=len(fit.received),
            late=len(late),
            dropped=len(fit.dropped),
            rejected=len(fit.rejected),
            version=self.state.version,
            seconds=round(close.duration_s, 4),
        )
        return metrics

    async def _on_update(self, fit: FitRound, event: ModelUpdate, delivery: Delivery[Any]) -> None:
        cid = event.client_id
        if not self._genuine(delivery, cid):
            return
        verdict = fit.check(cid, event.round, event.base_version)
        if verdict is not Verdict.ACCEPTED:
            await self._refuse(event.round, cid, verdict)
            return
        try:
            delta = await blobs.fetch(event.update, store=self.store, length=self.dim)
            if event.num_examples <= 0:
                raise UpdateRejected("bad_examples", f"num_examples={event.num_examples}")
        except UpdateRejected as exc:
            fit.reject(cid, exc.reason)
            await self._refuse(event.round, cid, exc.reason, str(exc))
            return
        fit.accept(Update(cid, delta, event.num_examples, metrics=event.metrics))
        if event.update.object is not None:
            fit.blobs.append(event.update.object)
        assert self.state.progress is not None
        self.state.progress.received = list(fit.received)
        self.state.progress.aggregate = fit.aggregate.state()
        await self._checkpoint()

    async def _eval_round(self, rnd: int) -> Params:
        s = self.settings
        alive = self.registry.alive(self.clock())
        if not alive:
            return {}
        sampled = sample_clients(
            alive, fraction=s.fraction_evaluate, min_clients=1, seed=s.seed + 1, round=rnd
        )
        started = self.clock()
        ev = EvalRound(round=rnd, version=self.state.version, sampled=sampled, deadline=started + s.timeout_s)
        await self.bus.publish(
            RoundStart(
                run_id=s.run_id,
                round=rnd,
                kind="evaluate",
                version=self.state.version,
                model=self._model_ref(),
                clients=sampled,
                deadline_s=s.timeout_s,
                config=dict(self.client_config),
            )
        )
        while not ev.closed(self.clock()):
            delivery = await self._next(ev.deadline)
            for cid in sampled:
                if not self.registry.is_alive(cid, self.clock()):
                    ev.drop(cid)
            if delivery is None:
                continue
            match delivery.event:
                case EvalReport() as r if self._genuine(delivery, r.client_id):
                    ev.offer(r.client_id, r.round, r.version, r.num_examples, r.loss, r.metrics)
                case _:
                    await self._stray(delivery)
        metrics = ev.summary()
        await self.bus.publish(
            RoundClose(
                run_id=s.run_id,
                round=rnd,
                kind="evaluate",
                status="ok",
                version=self.state.version,
                received=sorted(ev.reports),
                dropped=sorted(ev.dropped),
                duration_s=self.clock() - started,
                metrics=metrics,
            )
        )
        return metrics


def _json(metrics: Params) -> bytes:
    return json.dumps(metrics, sort_keys=True).encode()
