"""The aggregator agent: runs a federation's rounds on the bus, push-based (no polling anywhere).

::

    async with Bus(transport, source="aggregator") as bus:
        result = await Aggregator(bus, settings=settings, strategy=make_strategy("fedavg"),
                                  initial_model=weights, store=store).run()

Each round it samples live clients, publishes :class:`RoundStart` (for everyone, naming no one) and a
:class:`RoundInvite` to each sampled client alone, folds :class:`ModelUpdate` events in as they arrive,
closes on all-answered / ``min_clients`` / deadline, stores and publishes the new global model. Vanished
clients are noticed by their missing heartbeats, so no round waits on the dead. State is checkpointed (see
:mod:`fedbus.aggregator.state`): a restarted aggregator resumes the run where it stopped; one started with
``resume=False`` refuses a run id that already has state. On a secure broker (``clients``, see
:mod:`fedbus.aggregator.trust`) a client event counts only from a registered client identity, signed by its
own key. Synchronous rounds live in :mod:`fedbus.aggregator.sync_rounds`, secure ones in
:mod:`fedbus.aggregator.secure_round`, the asynchronous (FedBuff) mode in :mod:`fedbus.aggregator.async_rounds`.

With central DP (``strategy.dp``) the run is *private*: the sample is a secret Poisson sample, and nothing
published names or counts the clients of a round (no refusals, empty lists and no client counts or client
metrics in :class:`RoundClose`), so the amplification the accountant counts on holds for bus observers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from fedbus.bus.client import Bus, Delivery
from fedbus.bus.events import Event, Params
from fedbus.bus.signing import key_id
from fedbus.bus.stores import ObjectStore

from . import blobs
from .async_rounds import AsyncRounds
from .config import RoundSettings, SecureSpec
from .errors import FlError, RoundError, RunExists
from .events import (
    ClientHeartbeat,
    ClientJoin,
    ClientLeave,
    EvalReport,
    GlobalModel,
    ModelRef,
    ModelUpdate,
    RoundClose,
    RoundInvite,
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
from .round import Verdict
from .state import RunState, StateStore
from .strategies import Strategy
from .sync_rounds import SyncRounds
from .trust import IdentityClients

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
        state_store: ObjectStore | None = None,
        client_config: Params | None = None,
        secure: SecureSpec | None = None,
        evaluate_fn: Callable[[Vector], Params] | None = None,
        trust_on_first_use: bool = False,
        clients: IdentityClients | None = None,
        on_event: Callable[[Event], None] | None = None,
        resume: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.strategy = strategy
        self.store = store
        self.states = StateStore(store, settings.run_id, private=state_store)
        self.resume = resume
        self.private = strategy.dp is not None
        """Central DP: the sample is secret, and nothing published names or counts a round's clients."""
        self.client_config = dict(client_config or {})
        self.secure = secure
        self.evaluate_fn = evaluate_fn
        self.trust_on_first_use = trust_on_first_use
        self.clients = clients
        """Secure mode: client events count only from registered identities, signed by their keys."""
        self.on_event = on_event
        """Called with every event this aggregator publishes (a progress view), after it is sent."""
        self.clock = clock
        self.registry = Registry(timeout=settings.heartbeat_timeout_s)
        self.accountant = RdpAccountant() if strategy.dp is not None else None
        self.model = np.ascontiguousarray(initial_model, dtype=np.float32).copy()
        self.dim = self.model.size
        self.state = RunState(run_id=settings.run_id)
        self.log = log.bind(run_id=settings.run_id, agent=bus.source)
        self.refused = 0
        self.untrusted = 0
        """Client events dropped by :attr:`clients` (unregistered, unsigned, signed by another key...)."""
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
                        await SyncRounds(self).run()
            except FlError as exc:
                self.log.error("federation failed", error=str(exc))
                await self.publish(
                    RunFinished(
                        run_id=self.settings.run_id,
                        status="failed",
                        rounds=self.state.round - 1,
                        version=self.state.version,
                        reason=str(exc),
                    )
                )
                raise
            ref = self.model_ref()
            await self.publish(
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

    async def publish(self, event: Event) -> None:
        """Publish ``event`` and show it to :attr:`on_event`."""
        await self.bus.publish(event)
        if self.on_event is not None:
            self.on_event(event)

    def _last_metrics(self) -> Params:
        return dict(self.state.history[-1]) if self.state.history else {}

    # -- state -----------------------------------------------------------------------------------------------
    async def refuse_existing(self) -> None:
        """Raise :class:`RunExists` if ``resume`` is off and the run id already has a checkpoint."""
        if not self.resume and (saved := await self.states.load()) is not None:
            raise RunExists(
                self.settings.run_id, round=saved.round, rounds=self.settings.rounds, finished=saved.finished
            )

    async def _load(self) -> None:
        await self.refuse_existing()
        saved = await self.states.load()
        if saved is None:
            self.state.model_object = await self.states.save_model(0, self.model, {"round": 0})
            self.state.model_sha256 = blobs.sha256_of(self.model)
            await self.checkpoint(force=True)
            self.log.info(
                "run started", rounds=self.settings.rounds, dim=self.dim, strategy=self.strategy.name
            )
            return
        self.state = saved
        self.model = await self.states.load_model(saved.version)
        if self.model.size != self.dim:
            raise FlError(f"checkpointed model has {self.model.size} values, the configured one {self.dim}")
        self.strategy.restore(saved.strategy)
        if self.accountant is not None and saved.dp_steps:
            if len(saved.dp_rdp) == len(self.accountant.orders):
                self.accountant.rdp = np.asarray(saved.dp_rdp, np.float64)
                self.accountant.steps = saved.dp_steps
            else:  # a checkpoint from another set of orders: every round so far had the run's q and σ
                self.account(count=saved.dp_steps)
        self.log.info(
            "run resumed", round=saved.round, version=saved.version, in_progress=saved.progress is not None
        )

    async def checkpoint(self, *, force: bool = False) -> None:
        """Save the run state, at most once per ``checkpoint_interval_s`` unless ``force``."""
        now = self.clock()
        if not force and now - self._last_checkpoint < self.settings.checkpoint_interval_s:
            return
        self.state.strategy = self.strategy.state()
        if self.accountant is not None:
            self.state.dp_rdp = [float(x) for x in self.accountant.rdp]
            self.state.dp_steps = self.accountant.steps
        await self.states.save(self.state)
        self._last_checkpoint = now

    def model_ref(self) -> ModelRef:
        """The current global model: inline up to ``inline_limit`` bytes, else its object in the store."""
        data_bytes = self.model.nbytes
        if data_bytes <= self.settings.inline_limit:
            return ModelRef(sha256=self.state.model_sha256, length=self.dim, inline=self.model.tobytes())
        return ModelRef(sha256=self.state.model_sha256, length=self.dim, object=self.state.model_object)

    async def finish_round(
        self, round: int, *, kind: str = "fit", status: str = "ok", model: Vector | None = None,
        metrics: Params | None = None, received: Iterable[str] = (), late: Iterable[str] = (),
        dropped: Iterable[str] = (), rejected: Iterable[str] = (), duration_s: float | None = None,
        started: float | None = None,
    ) -> None:
        """End a round, the one way every round ends: with ``model``, adopt it as a new global version (stored
        in the lineage with ``metrics``, announced by :class:`GlobalModel`), then publish the round's
        :class:`RoundClose` naming the current version. The lists are published as given (a private run passes
        them empty); the duration is ``duration_s``, else the time since ``started`` at the close, else 0."""
        metrics = metrics if metrics is not None else {}
        if model is not None:
            self.model = model
            self.state.version += 1
            stored = {"round": round, "version": self.state.version, **metrics}
            self.state.model_object = await self.states.save_model(self.state.version, model, stored)
            self.state.model_sha256 = blobs.sha256_of(model)
            await self.publish(GlobalModel(run_id=self.settings.run_id, version=self.state.version, round=round,
                                           model=self.model_ref(), metrics=stored))
        if duration_s is None:
            duration_s = self.clock() - started if started is not None else 0.0
        await self.publish(RoundClose(
            run_id=self.settings.run_id, round=round, kind=kind, status=status, version=self.state.version,
            received=list(received), late=list(late), dropped=list(dropped), rejected=list(rejected),
            duration_s=duration_s, metrics=metrics,
        ))

    # -- events ----------------------------------------------------------------------------------------------
    async def next_delivery(self, wake_at: float) -> Delivery[Any] | None:
        """The next round-relevant delivery, or ``None`` when the caller should re-check its conditions: a
        membership event was handled here, a client may have timed out, or ``wake_at`` passed."""
        assert self._inbox is not None
        now = self.clock()
        expiry = self.registry.next_expiry(now)
        until = min(wake_at, expiry + 1e-3) if expiry is not None else wake_at
        delivery = await self._inbox.next(max(until - now, 0.0))
        if delivery is None:
            return None
        if self.clients is not None and (why := await self.clients.check(delivery)) is not None:
            self.untrusted += 1
            self.log.warning("client event refused", reason=why, source=delivery.source[:64],
                             type=delivery.envelope.type)
            return None
        match delivery.event:
            case ClientJoin(client_id=cid, num_examples=n, public_key=key) if self.genuine(delivery, cid):
                self._learn_key(cid, key)
                if self.registry.seen(cid, self.clock(), num_examples=n):
                    self.log.info("client joined", client=cid, examples=n)
            case ClientHeartbeat(client_id=cid, busy=busy, public_key=key) if self.genuine(delivery, cid):
                self._learn_key(cid, key)
                if self.registry.seen(cid, self.clock(), busy=busy):
                    self.log.info("client is back", client=cid)
            case ClientLeave(client_id=cid, reason=reason) if self.genuine(delivery, cid):
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

    def genuine(self, delivery: Delivery[Any], client_id: str) -> bool:
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

    def account(self, *, count: int = 1) -> None:
        """Add ``count`` DP rounds to the accountant (at the accounted rate: q, or 1 without amplification)."""
        if self.accountant is not None and self.strategy.dp is not None:
            dp = self.strategy.dp
            self.accountant.step(q=dp.accounted_rate, sigma=dp.noise_multiplier, count=count)

    def sample(self, alive: list[str], *, round: int, attempt: int) -> list[str]:
        """A fit round's sample: a secret Poisson sample in a private run, else the seeded fixed-size one."""
        if self.strategy.dp is not None:
            return self.strategy.dp.sample(alive, round=round, attempt=attempt)
        s = self.settings
        return sample_clients(
            alive, fraction=s.fraction, min_clients=s.min_clients, seed=s.seed, round=round, attempt=attempt
        )

    async def announce(self, start: RoundStart, invited: list[str]) -> None:
        """Open a round: ``start`` for everyone (with the invitation count unless private), then an
        invitation on each invited client's own subject, which only that client may read."""
        await self.publish(msgspec.structs.replace(start, invited=None if self.private else len(invited)))
        for cid in sorted(invited):
            await self.publish(
                RoundInvite(
                    client_id=cid,
                    run_id=start.run_id,
                    round=start.round,
                    kind=start.kind,
                    version=start.version,
                    attempt=start.attempt,
                )
            )

    async def refuse(self, round: int, client_id: str, reason: str, detail: str = "") -> None:
        """Count a refused update; announce it unless the run is private."""
        self.refused += 1
        self.log.warning("update refused", round=round, client=client_id, reason=reason, detail=detail)
        if self.private:
            return  # a public refusal would say who was sampled
        await self.publish(
            UpdateRefused(
                run_id=self.settings.run_id, round=round, client_id=client_id, reason=reason, detail=detail
            )
        )

    async def wait_for_clients(self, needed: int) -> list[str]:
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
            delivery = await self.next_delivery(min(deadline, max(self._listening_until, self.clock() + 0.05)))
            if delivery is not None:
                await self.stray(delivery)
        return alive

    async def stray(self, delivery: Delivery[Any]) -> None:
        """An update or report that belongs to no open round."""
        match delivery.event:
            case ModelUpdate(client_id=cid, round=r) | SecAggMasked(client_id=cid, round=r):
                await self.refuse(r, cid, Verdict.LATE, "no fit round is open for it")
            case _:
                pass
