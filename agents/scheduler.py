"""The scheduler daemon (``fedbus agent scheduler``): the I/O loop around :class:`SchedulingCore`.

Inputs, all funnelled into one bounded inbox and applied in order by one loop:

- durable consumers (JetStream): ``JobSubmit``, ``JobCancel``, ``JobReport``: acknowledged only after the
  effects they caused are saved, so a crash at any point redelivers them (the core ignores repeats);
- core subscriptions: ``AgentHeartbeat``, ``JobBid`` (ephemeral: the next heartbeat or a new offer round
  replaces a lost one).

Every input passes the :class:`~fedbus.agents.admission.Gate` first: who signed it, in which role, on which
subject (see :mod:`fedbus.agents.admission`; secure when the identities registry is in use). The inputs are
read through a bus that checks no signatures itself, so that every verdict is taken in one place, against
the registry, and a refused durable input is *dead-lettered* with its reason instead of dropped unseen.

No input can stop scheduling. A durable input that is refused (unsigned, forged, a duplicate job id, too
large) goes to the dead letters at once; one whose handling fails (the core raises, or its job record cannot
be stored) is handed back and tried again later, and after ``retry.max_attempts`` attempts goes to the dead
letters too (:mod:`fedbus.bus.deadletter`). Either way it is terminated on its stream, so a restarted
scheduler never sees it again.

Each batch of inputs ends with a ``tick``; its effects are applied write-ahead: job records are saved to the
``jobs`` bucket (compare-and-set on the revision this scheduler last wrote), then the consumed events are
acknowledged, then lifecycle ``JobStatus`` events are published (durable, signed, in order, by one
announcer task) and offers/awards/stops sent. Nothing is announced or sent for a job whose record was not
saved. A restarted scheduler loads every record and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fedbus.bus.client import Bus, EventSubscription, Security
from fedbus.bus.codec import Envelope
from fedbus.bus.creds import IDENTITIES_BUCKET
from fedbus.bus.deadletter import DeadLetters, RetryPolicy
from fedbus.bus.errors import FedbusError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.stores import AckableDelivery, EventConsumer, EventLog, KeyValue, open_stores
from fedbus.bus.transport import Transport

from .admission import Gate, Signers, Verdict, registry_in_use
from .events import AgentHeartbeat, JobBid, JobCancel, JobLog, JobReport, JobState, JobStatus, JobSubmit
from .placement import policy_named
from .records import JOBS_BUCKET, decode_record, encode_record, is_claim
from .runtime import Agent, RuntimeConfig
from .saving import RecordSaver, SaveFailure
from .scheduling import Effects, JobRecord, SchedulerConfig, SchedulingCore
from .trust import KEYS_BUCKET

__all__ = ["JOBS_BUCKET", "SchedulerAgent", "SchedulerAgentConfig", "decode_record", "encode_record"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerAgentConfig:
    """What the scheduler adds to :class:`RuntimeConfig`."""

    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)
    policy: str = "binpack"
    consumer_prefix: str = "scheduler"
    """Durable consumer names start with this (two schedulers with one prefix share the work)."""
    max_batch: int = 512
    secure: bool | None = None
    """Check every input against the identities registry; ``None``: when the registry holds identities."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How often a durable input whose handling fails is tried before it goes to the dead letters."""
    max_submit_bytes: int = 96 * 1024
    """Larger submissions are refused (a job's data belongs in its workspace)."""
    max_record_bytes: int = 192 * 1024
    """A job record that would be larger is not stored (the ``jobs`` bucket takes values up to 256 KiB)."""
    save_give_up_s: float = 0.5
    """A record the broker keeps refusing this long (not: the broker is away) is a failed attempt."""


@dataclass(slots=True)
class _Input:
    event: Event
    envelope: Envelope
    subject: str
    delivery: AckableDelivery[Any] | None = None
    consumer: str = ""


class SchedulerAgent(Agent):
    """See the module docstring."""

    kind = "scheduler"

    def __init__(self, config: RuntimeConfig, sched: SchedulerAgentConfig | None = None, *,
                 transport: Transport | None = None) -> None:
        super().__init__(config, transport=transport)
        self.sched = sched or SchedulerAgentConfig()
        self.policy = policy_named(self.sched.policy)
        self.core: SchedulingCore | None = None
        self.secure = False
        self.gate: Gate | None = None
        self.dead: DeadLetters | None = None
        self._inbox: asyncio.Queue[_Input] = asyncio.Queue(maxsize=8192)
        self._outbox: asyncio.Queue[JobStatus] = asyncio.Queue(maxsize=8192)
        self._saver: RecordSaver | None = None
        self._inputs: Bus | None = None
        self._warned: set[str] = set()
        self.refused: Counter[str] = Counter()
        """Inputs the gate refused, by event type."""
        self.metrics.counter("events_total", "inputs applied, by type")
        self.metrics.counter("inputs_refused_total", "inputs refused: unsigned, forged, duplicate, malformed")
        self.metrics.counter("inputs_failed_total", "inputs whose handling failed (tried again later)")
        self.metrics.counter("dead_letters_total", "durable inputs set aside as dead letters")

    # -- start ------------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        stores = self.stores
        jobs = await stores.key_value(JOBS_BUCKET)
        identities = await stores.key_value(IDENTITIES_BUCKET)
        self.secure = await registry_in_use(identities) if self.sched.secure is None else self.sched.secure
        self.gate = Gate(Signers(agent_keys=await stores.key_value(KEYS_BUCKET),
                                 identities=identities if self.secure else None),
                         max_submit_bytes=self.sched.max_submit_bytes)
        self.dead = await DeadLetters.open(stores, agent_id=self.agent_id, policy=self.sched.retry)
        log = stores.event_log()
        # In secure mode `fedbus up` made every stream; the scheduler may not even look at the log stream.
        await log.ensure(JobSubmit, JobCancel, JobReport, JobStatus, *(() if self.secure else (JobLog,)))
        records, claims = await self._load(jobs)
        self._saver = RecordSaver(jobs, max_bytes=self.sched.max_record_bytes, log=self.log,
                                  give_up_s=self.sched.save_give_up_s)
        self._saver.adopt(records, claims)
        self.core = SchedulingCore(now=time.time(), config=self.sched.scheduling, policy=self.policy,
                                   scheduler_id=self.agent_id)
        self.core.restore([rec for rec, _ in records], time.time())
        await self._apply(self.core.take_effects(), [])  # before the loop starts: one writer at a time
        # Inputs through a bus that verifies nothing itself: the gate decides, against the registry.
        self._inputs = Bus(self.bus.transport, source=self.agent_id, security=Security.OFF)
        inputs, prefix = self._inputs, self.sched.consumer_prefix
        self._forward(await inputs.subscribe(AgentHeartbeat, max_pending=8192), "heartbeats")
        self._forward(await inputs.subscribe(JobBid, max_pending=8192), "bids")
        ack_wait = max(30.0, self.sched.scheduling.lease_s)
        input_log = (await open_stores(inputs)).event_log()
        for cls, name in ((JobSubmit, "submit"), (JobCancel, "cancel"), (JobReport, "report")):
            durable = f"{prefix}-{name}"
            assert self.dead is not None
            self._consume(input_log.consume(cls, durable=durable, ack_wait=ack_wait,
                                            on_reject=self.dead.on_reject(durable)), durable)
        self.spawn(self._announce(log), name="announcer")
        self.spawn(self._loop(), name="loop")
        if self.secure:
            self.log.info("secure: submits and cancels count only when signed by an admin identity, bids and "
                          "reports only when signed by the agent they name")
        else:
            self.log.warning("insecure: no identities are registered; anyone who reaches the broker may submit")

    async def _load(self, jobs: KeyValue) -> tuple[list[tuple[JobRecord, int]], list[tuple[JobRecord, int]]]:
        """Every stored record with its revision: the scheduler's own, and submitters' claims."""
        records, claims = [], []
        for job_id in await jobs.keys():
            try:
                entry = await jobs.get(job_id)
                rec = decode_record(entry.value)
            except NotFound:
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.log.error("unreadable job record; skipped", job_id=job_id, error=str(exc))
                continue
            (claims if is_claim(rec) else records).append((rec, entry.revision))
        return records, claims

    def _forward(self, sub: EventSubscription[Any], name: str) -> None:
        async def loop() -> None:
            async with sub:
                async for d in sub:
                    await self._inbox.put(_Input(d.event, d.envelope, d.subject))

        self.spawn(loop(), name=name)

    def _consume(self, consumer: EventConsumer[Any], name: str) -> None:
        async def loop() -> None:
            async with consumer:
                async for d in consumer:
                    await self._inbox.put(_Input(d.event, d.envelope, d.subject, d, name))

        self.spawn(loop(), name=name)

    # -- the loop ---------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        core = self.core
        assert core is not None
        while True:
            wake = core.next_wakeup()
            timeout = 1.0 if wake is None else min(max(wake - time.time(), 0.0), 1.0)
            batch: list[_Input] = []
            if timeout > 0 and self._inbox.empty():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        batch.append(await self._inbox.get())
            with contextlib.suppress(asyncio.QueueEmpty):
                while len(batch) < self.sched.max_batch:
                    batch.append(self._inbox.get_nowait())
            now = time.time()
            handled = [item for item in batch if await self._handle(item, now)]
            try:
                core.tick(now)
            except Exception:  # a bug; the next tick tries again, and inputs keep coming
                self.log.exception("tick failed")
            await self._apply(core.take_effects(), handled)

    async def _handle(self, item: _Input, now: float) -> bool:
        """Admit and apply one input; ``True`` for a durable one to acknowledge once its effects are saved."""
        core, gate, dead, d = self.core, self.gate, self.dead, item.delivery
        assert core is not None and gate is not None and dead is not None
        kind = item.event.spec.type
        if d is not None and await dead.exhausted(d, consumer=item.consumer):
            self.metrics.inc("dead_letters_total")
            return False
        verdict = await gate.admit(item.event, item.envelope, item.subject, core.jobs)
        if verdict.ok and isinstance(item.event, JobSubmit) and item.event.job_id not in core.jobs \
                and self._saver is not None and self._saver.stored(item.event.job_id):
            verdict = Verdict(False, f"job id {item.event.job_id!r} is taken (by a finished job)")
        if not verdict.ok:
            if not verdict.quiet:
                await self._refuse(item, verdict.reason)
            return False
        try:
            core.handle(item.event, now, by=verdict.by, event_id=item.envelope.id)
        except Exception as exc:  # a message must never stop the scheduler
            self.log.exception("input not handled", type=kind, subject=item.subject)
            await self._failed(item, f"the scheduler failed on it: {type(exc).__name__}: {exc}")
            return False
        self.metrics.inc("events_total", type=kind)
        return d is not None

    async def _refuse(self, item: _Input, reason: str) -> None:
        kind = item.event.spec.type
        self.refused[kind] += 1
        self.metrics.inc("inputs_refused_total", type=kind)
        if item.delivery is None:  # heartbeats and bids: dropped, said once per sender
            who = f"{kind}:{item.envelope.src}"
            if who not in self._warned:
                if len(self._warned) > 10_000:
                    self._warned.clear()
                self._warned.add(who)
                self.log.warning("input refused", type=kind, source=item.envelope.src, reason=reason)
            return
        assert self.dead is not None
        if await self.dead.refuse(item.delivery, reason, consumer=item.consumer):
            self.metrics.inc("dead_letters_total")
            await self._refuse_claim(item, reason)

    async def _failed(self, item: _Input, reason: str) -> None:
        self.metrics.inc("inputs_failed_total", type=item.event.spec.type)
        if item.delivery is None:
            return
        assert self.dead is not None
        if await self.dead.failed(item.delivery, reason, consumer=item.consumer):
            self.metrics.inc("dead_letters_total")
            await self._refuse_claim(item, reason)

    async def _refuse_claim(self, item: _Input, reason: str) -> None:
        """A refused submission whose submitter claimed the id: mark the claim failed, and say so."""
        if not isinstance(item.event, JobSubmit) or self._saver is None:
            return
        status = await self._saver.refuse_claim(item.event.job_id, item.envelope.id, reason)
        if status is not None:
            await self._outbox.put(status)

    async def _apply(self, effects: Effects, handled: list[_Input]) -> None:
        """Save, then acknowledge, then announce and send (write-ahead)."""
        assert self._saver is not None and self.core is not None
        failures: dict[str, SaveFailure] = {}
        if effects.saves:
            failures = await self._saver.save_all(effects.saves, jobs=self.core.jobs)
        for job_id, failure in failures.items():
            if failure.new:  # never stored: as if the submission had not come
                self.core.forget(job_id)
        acks = []
        for item in handled:
            failure = failures.get(getattr(item.event, "job_id", ""))
            if failure is None:
                assert item.delivery is not None
                acks.append(item.delivery)
            elif failure.refuse:
                await self._refuse(item, failure.reason)
            else:
                await self._failed(item, failure.reason)
        if acks:
            await asyncio.gather(*(d.ack() for d in acks), return_exceptions=True)
        for status in effects.statuses:
            if status.job_id not in failures:
                await self._outbox.put(status)
        sends = [ev for ev in effects.sends if getattr(ev, "job_id", "") not in failures]
        if sends:
            results = await asyncio.gather(*(self.bus.publish(ev) for ev in sends), return_exceptions=True)
            for ev, res in zip(sends, results, strict=True):
                if isinstance(res, FedbusError):
                    self.log.warning("send failed", type=ev.spec.type, error=str(res))
                elif isinstance(res, BaseException):
                    raise res

    async def _announce(self, log: EventLog) -> None:
        """Publish lifecycle events in order, in batches, with retries."""
        while True:
            batch = [await self._outbox.get()]
            with contextlib.suppress(asyncio.QueueEmpty):
                while len(batch) < 256:
                    batch.append(self._outbox.get_nowait())
            delay = 0.1
            while True:
                try:
                    await log.publish_many(batch)
                    break
                except FedbusError as exc:
                    self.log.warning("statuses not published yet; retrying", count=len(batch), error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def on_drain(self) -> None:
        """Let the announcer publish what is queued (everything else is saved already)."""
        for _ in range(100):
            if self._outbox.empty():
                return
            await asyncio.sleep(0.02)

    # -- views ------------------------------------------------------------------------------------------
    def collect_metrics(self) -> None:
        super().collect_metrics()
        if self._inputs is not None:
            self.metrics.set("bus_rejected", sum(self.bus.rejected.values()) + sum(self._inputs.rejected.values()))
        if self.core is None:
            return
        states = Counter(rec.state for rec in self.core.jobs.values())
        for state in JobState:
            self.metrics.set("jobs", states.get(state, 0), state=state.value)
        for name, value in self.core.counters.items():
            self.metrics.set(f"scheduler_{name}", value)
        self.metrics.set("agents_live", len(self.core.live_agents(time.time())))
