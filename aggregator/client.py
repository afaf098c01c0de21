"""The federated-learning client agent: joins a run, heartbeats, trains when a round asks it to.

It is framework-free: training is a :class:`LocalTrainer` (the torch one is
:class:`fedbus.trainer.TorchTrainer`), called in a worker thread (``asyncio.to_thread``) so heartbeats keep
flowing while it trains. The same class runs in ``--simulate`` (many clients in one process), in a client job
on a GPU agent, and in tests.

A synchronous round is two events: the :class:`RoundStart` every client sees (the model, the config) and a
:class:`RoundInvite` on the client's own subject, which only it may read (the sample stays secret). The
client answers once it holds both, whichever came first; an asynchronous round (``open``) needs no invite.

Idempotence: the client remembers what it sent for the last rounds; when a round is announced again (an
aggregator that restarted re-opens its round) it sends the same update again instead of retraining, and the
aggregator refuses duplicates, so nothing is folded twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from fedbus.bus.client import Bus
from fedbus.bus.events import Event, Params
from fedbus.bus.stores import ObjectStore

from . import blobs
from .errors import FlError, UpdateRejected
from .events import (
    ClientHeartbeat,
    ClientJoin,
    ClientLeave,
    EvalReport,
    ModelRef,
    ModelUpdate,
    RoundInvite,
    RoundStart,
    RunFinished,
    SecAggInbox,
    SecAggRoster,
    SecAggUnmask,
    UpdateRefused,
)
from .inbox import Inbox
from .secure_client import Mailbox, secure_fit

__all__ = ["ClientFaults", "ClientStats", "EvalOutcome", "FitOutcome", "FlClient", "LocalTrainer"]

log = structlog.get_logger("fedbus.aggregator.client")
Vector = npt.NDArray[np.float32]
RoundKey = tuple[str, int, int]
"""(kind, round, attempt): what pairs a round's start with its invitation."""
_REMEMBERED = 16


@dataclass(frozen=True, slots=True)
class FitOutcome:
    """The result of local training: the trained weights (flat float32) and what they were trained on."""

    weights: Vector
    num_examples: int
    metrics: Params = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvalOutcome:
    loss: float
    num_examples: int
    metrics: Params = field(default_factory=dict)


class LocalTrainer(Protocol):
    """What a client trains with. Both methods run in a worker thread."""

    @property
    def num_examples(self) -> int: ...

    def fit(self, weights: Vector, config: Params, *, round: int) -> FitOutcome:
        """Train from ``weights`` with the round's ``config`` (epochs, lr, proximal_mu...)."""
        ...

    def evaluate(self, weights: Vector, config: Params) -> EvalOutcome:
        """Evaluate ``weights`` on local held-out data."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientFaults:
    """Fault injection for tests and benchmarks: how this client misbehaves."""

    crash_at: str | None = None
    """Vanish (stop heartbeats, stop answering) at a stage: ``fit`` (asked to train), ``after_update``,
    ``after_advertise``, ``after_masked``."""
    crash_round: int = 1
    delay_s: float = 0.0
    """Wait this long after training before sending (a straggler)."""
    delay_round: int | None = None
    """Only straggle in this round (default: every round)."""
    duplicate: bool = False
    """Send every update twice."""
    corrupt: str | None = None
    """In ``crash_round``, send a malformed update: ``wrong_shape``, ``bad_hash`` or ``nan``."""


@dataclass
class ClientStats:
    status: str = "running"
    fits: int = 0
    evaluations: int = 0
    resent: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)


class _Crash(Exception):
    """An injected crash (see :class:`ClientFaults`)."""


class FlClient:
    """One client of one run. ``await FlClient(bus, trainer, run_id=...).run()`` returns when the run ends."""

    def __init__(
        self,
        bus: Bus,
        trainer: LocalTrainer,
        *,
        run_id: str,
        heartbeat_s: float = 1.0,
        store: ObjectStore | None = None,
        inline_limit: int = blobs.DEFAULT_INLINE_LIMIT,
        faults: ClientFaults | None = None,
        info: Params | None = None,
    ) -> None:
        self.bus = bus
        self.client_id = bus.source
        self.trainer = trainer
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.store = store
        self.inline_limit = inline_limit
        self.faults = faults or ClientFaults()
        self.info = dict(info or {})
        self.stats = ClientStats()
        self.log = log.bind(client=self.client_id, run_id=run_id)
        self._busy = False
        self._round = -1
        self._sent: OrderedDict[tuple[str, int, int], Event] = OrderedDict()
        self._mailbox = Mailbox()
        self._pending: OrderedDict[str, RoundStart] = OrderedDict()  # newest start per kind, while busy
        self._starts: OrderedDict[RoundKey, RoundStart] = OrderedDict()  # announced, not yet invited to
        self._invites: OrderedDict[RoundKey, RoundInvite] = OrderedDict()  # invited, start not yet seen
        self._tg: asyncio.TaskGroup | None = None
        self._done = asyncio.Event()
        self._public_key = bus.key.public_raw if bus.key is not None else b""

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def run(self) -> ClientStats:
        """Join, answer rounds until :class:`RunFinished` (or :meth:`stop`), then leave."""
        try:
            async with Inbox(self.bus) as inbox, asyncio.TaskGroup() as tg:
                self._tg = tg
                for cls in (RoundStart, RunFinished, UpdateRefused, SecAggRoster, SecAggUnmask):
                    await inbox.add(cls, key=self.run_id)
                await inbox.add(SecAggInbox, key=self.client_id)
                await inbox.add(RoundInvite, key=self.client_id)
                await self.bus.transport.flush()
                await self.bus.publish(
                    ClientJoin(
                        run_id=self.run_id,
                        client_id=self.client_id,
                        num_examples=self.trainer.num_examples,
                        info=self.info,
                        public_key=self._public_key,
                    )
                )
                heartbeat = tg.create_task(self._heartbeat(), name=f"heartbeat:{self.client_id}")
                await self._serve(inbox)
                heartbeat.cancel()
                if self.stats.status == "running":
                    self.stats.status = "finished"
                    await self.bus.publish(
                        ClientLeave(run_id=self.run_id, client_id=self.client_id, reason="run finished")
                    )
        except* _Crash:
            self.stats.status = "crashed"
            self.log.warning("injected crash", stage=self.faults.crash_at)
        return self.stats

    def stop(self) -> None:
        """Leave the run at the next event (for a graceful shutdown)."""
        self.stats.status = "stopped"
        self._done.set()

    async def _heartbeat(self) -> None:
        while True:
            await self.bus.publish(
                ClientHeartbeat(
                    run_id=self.run_id,
                    client_id=self.client_id,
                    busy=self._busy,
                    round=self._round,
                    public_key=self._public_key,
                )
            )
            await asyncio.sleep(self.heartbeat_s)

    async def _serve(self, inbox: Inbox) -> None:
        while not self._done.is_set():
            delivery = await inbox.next(timeout=0.5)
            if delivery is None:
                continue
            match delivery.event:
                case RoundStart() as start:
                    self._on_start(start)
                case RoundInvite() as invite if invite.run_id == self.run_id:
                    self._on_invite(invite)
                case RunFinished():
                    self.log.info("run finished", version=delivery.event.version)
                    return
                case UpdateRefused(client_id=cid, reason=reason) if cid == self.client_id:
                    self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1
                    self.log.info("update refused", round=delivery.event.round, reason=reason)
                case SecAggRoster() | SecAggUnmask() | SecAggInbox() as event:
                    self._mailbox.deliver(event, event.round)
                case _:
                    pass

    def crash_if(self, stage: str, round: int) -> None:
        """Fault injection: vanish at ``stage`` of ``round`` if :class:`ClientFaults` says so."""
        if self.faults.crash_at == stage and round == self.faults.crash_round:
            raise _Crash(stage)

    # -- rounds ----------------------------------------------------------------------------------------------
    def _on_start(self, start: RoundStart) -> None:
        if start.open:
            self._dispatch(start)
            return
        key = (start.kind, start.round, start.attempt)
        if self._invites.pop(key, None) is not None:
            self._dispatch(start)
        else:
            _remember(self._starts, key, start)

    def _on_invite(self, invite: RoundInvite) -> None:
        key = (invite.kind, invite.round, invite.attempt)
        start = self._starts.pop(key, None)
        if start is not None:
            self._dispatch(start)
        else:
            _remember(self._invites, key, invite)

    def _dispatch(self, start: RoundStart) -> None:
        """Work on ``start`` now, or once the round in hand is done."""
        assert self._tg is not None
        if self._busy:  # a straggler, or asynchronous mode: answer the newest start of each kind when free
            self._pending.pop(start.kind, None)
            self._pending[start.kind] = start
            return
        self._busy = True
        self._round = start.round
        self._tg.create_task(self._work(start), name=f"{start.kind}:{self.client_id}:{start.round}")

    async def _work(self, start: RoundStart) -> None:
        try:
            while True:
                cached = self._sent.get((start.kind, start.round, start.version))
                if cached is not None:  # a re-opened round: send the same answer again
                    self.stats.resent += 1
                    await self.bus.publish(cached)
                elif start.kind == "evaluate":
                    await self._evaluate(start)
                elif start.secure:
                    await self._secure_fit(start)
                else:
                    await self._fit(start)
                if not self._pending:
                    return
                _, start = self._pending.popitem(last=False)
                self._round = start.round
        except (FlError, UpdateRejected) as exc:
            self.log.warning("round abandoned", round=start.round, error=str(exc))
        finally:
            self._busy = False

    async def _global(self, start: RoundStart) -> Vector:
        return np.asarray(await blobs.fetch(start.model, store=self.store), np.float32)

    async def _fit(self, start: RoundStart) -> None:
        self.crash_if("fit", start.round)
        weights = await self._global(start)
        outcome = await asyncio.to_thread(self.trainer.fit, weights, dict(start.config), round=start.round)
        delta = np.ascontiguousarray(outcome.weights - weights, dtype=np.float32)
        ref = await blobs.ref_for(
            delta,
            name=f"{self.run_id}/update/{start.round}/{secrets.token_hex(16)}",  # names no client
            store=self.store,
            inline_limit=self.inline_limit,
        )
        if self.faults.corrupt and start.round == self.faults.crash_round:
            ref = _corrupt(ref, self.faults.corrupt)
        update = ModelUpdate(
            run_id=self.run_id,
            round=start.round,
            client_id=self.client_id,
            base_version=start.version,
            update=ref,
            num_examples=outcome.num_examples,
            metrics=outcome.metrics,
        )
        if self.faults.delay_s and self.faults.delay_round in (None, start.round):
            await asyncio.sleep(self.faults.delay_s)
        self._remember(("fit", start.round, start.version), update)
        await self.bus.publish(update)
        if self.faults.duplicate:
            await self.bus.publish(update)
        self.fitted(start.round)
        self.crash_if("after_update", start.round)

    async def _evaluate(self, start: RoundStart) -> None:
        weights = await self._global(start)
        outcome = await asyncio.to_thread(self.trainer.evaluate, weights, dict(start.config))
        report = EvalReport(
            run_id=self.run_id,
            round=start.round,
            client_id=self.client_id,
            version=start.version,
            num_examples=outcome.num_examples,
            loss=outcome.loss,
            metrics=outcome.metrics,
        )
        self._remember(("evaluate", start.round, start.version), report)
        await self.bus.publish(report)
        self.stats.evaluations += 1

    def _remember(self, key: tuple[str, int, int], event: Event) -> None:
        self._sent[key] = event
        while len(self._sent) > 8:
            self._sent.popitem(last=False)

    # -- secure rounds ---------------------------------------------------------------------------------------
    def fitted(self, round: int) -> None:
        """Count a round this client trained in."""
        self.stats.fits += 1
        self.stats.rounds.append(round)

    async def _secure_fit(self, start: RoundStart) -> None:
        """Train, then take part in the SecAgg+ stages (see :mod:`fedbus.aggregator.secure_client`)."""
        self.crash_if("fit", start.round)
        weights = await self._global(start)
        assert self._tg is not None
        training = self._tg.create_task(
            asyncio.to_thread(self.trainer.fit, weights, dict(start.config), round=start.round),
            name=f"train:{self.client_id}:{start.round}",
        )
        await secure_fit(self, start, weights, training, self._mailbox, num_examples=self.trainer.num_examples)


def _remember(table: OrderedDict[RoundKey, Any], key: RoundKey, value: Any) -> None:
    """Keep ``value`` under ``key``, forgetting the oldest entries beyond a few rounds' worth."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > _REMEMBERED:
        table.popitem(last=False)


def _corrupt(ref: ModelRef, how: str) -> ModelRef:
    """A malformed copy of an inline reference (fault injection)."""
    data = ref.inline or b""
    if how == "wrong_shape":
        data = data[:-4]
        return ModelRef(sha256=hashlib.sha256(data).hexdigest(), length=ref.length - 1, inline=data)
    if how == "nan":
        bad = np.frombuffer(data, np.float32).copy()
        bad[0] = np.nan
        return ModelRef(
            sha256=hashlib.sha256(bad.tobytes()).hexdigest(), length=ref.length, inline=bad.tobytes()
        )
    return ModelRef(sha256="0" * 64, length=ref.length, inline=data)  # bad_hash
