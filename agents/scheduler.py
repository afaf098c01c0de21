"""The scheduler daemon (``fedbus agent scheduler``): the I/O loop around :class:`SchedulingCore`.

Inputs, all funnelled into one bounded inbox and applied in order by one loop:

- durable consumers (JetStream): ``JobSubmit``, ``JobCancel``, ``JobReport``: acknowledged only after the
  effects they caused are saved, so a crash at any point redelivers them (the core ignores repeats);
- core subscriptions: ``AgentHeartbeat``, ``JobBid`` (ephemeral: the next heartbeat or a new offer round
  replaces a lost one).

Each batch of inputs ends with a ``tick``; its effects are applied write-ahead: job records are saved to the
``jobs`` bucket (compare-and-set on the revision this scheduler last wrote), then the consumed events are
acknowledged, then lifecycle ``JobStatus`` events are published (durable, signed, in order, by one
announcer task) and offers/awards/stops sent. A restarted scheduler loads every record and resumes.

A report is trusted only when signed by the key registered for the agent id it names (``agent-keys``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fedbus.bus.client import EventSubscription
from fedbus.bus.errors import Conflict, FedbusError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.signing import key_id
from fedbus.bus.stores import AckableDelivery, EventConsumer, EventLog, KeyValue
from fedbus.bus.transport import Transport

from .events import AgentHeartbeat, JobBid, JobCancel, JobLog, JobReport, JobState, JobStatus, JobSubmit
from .placement import policy_named
from .runtime import Agent, RuntimeConfig
from .scheduling import JobRecord, SchedulerConfig, SchedulingCore
from .trust import KEYS_BUCKET

__all__ = ["JOBS_BUCKET", "SchedulerAgent", "SchedulerAgentConfig", "decode_record", "encode_record"]

JOBS_BUCKET = "jobs"
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(JobRecord)


def encode_record(rec: JobRecord) -> bytes:
    """A job record as stored in the ``jobs`` bucket."""
    return _ENCODER.encode(rec)


def decode_record(data: bytes) -> JobRecord:
    """The inverse of :func:`encode_record`."""
    return _DECODER.decode(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerAgentConfig:
    """What the scheduler adds to :class:`RuntimeConfig`."""

    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)
    policy: str = "binpack"
    consumer_prefix: str = "scheduler"
    """Durable consumer names start with this (two schedulers with one prefix share the work)."""
    max_batch: int = 512


@dataclass(slots=True)
class _Input:
    event: Event
    delivery: AckableDelivery[Any] | None = None


class SchedulerAgent(Agent):
    """See the module docstring."""

    kind = "scheduler"

    def __init__(self, config: RuntimeConfig, sched: SchedulerAgentConfig | None = None, *,
                 transport: Transport | None = None) -> None:
        super().__init__(config, transport=transport)
        self.sched = sched or SchedulerAgentConfig()
        self.policy = policy_named(self.sched.policy)
        self.core: SchedulingCore | None = None
        self._inbox: asyncio.Queue[_Input] = asyncio.Queue(maxsize=8192)
        self._outbox: asyncio.Queue[JobStatus] = asyncio.Queue(maxsize=8192)
        self._revisions: dict[str, int] = {}
        self._agent_kids: dict[str, str] = {}
        self._unknown_agents: set[str] = set()
        self._jobs: KeyValue | None = None
        self._keys: KeyValue | None = None
        self._log: EventLog | None = None
        self.rejected_reports: Counter[str] = Counter()
        self.metrics.counter("events_total", "inputs applied, by type")
        self.metrics.counter("reports_rejected_total", "reports not signed by the agent they name")

    # -- start ------------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        stores = self.stores
        self._jobs = await stores.key_value(JOBS_BUCKET)
        self._keys = await stores.key_value(KEYS_BUCKET)
        self._log = stores.event_log()
        await self._log.ensure(JobSubmit, JobCancel, JobReport, JobStatus, JobLog)
        for agent_id in await self._keys.keys():
            await self._learn_key(agent_id)
        records = await self._load()
        self.core = SchedulingCore(now=time.time(), config=self.sched.scheduling, policy=self.policy,
                                   scheduler_id=self.agent_id)
        self.core.restore(records, time.time())
        await self._apply(self.core.take_effects(), [])  # before the loop starts: one writer at a time
        bus, prefix = self.bus, self.sched.consumer_prefix
        self._forward(await bus.subscribe(AgentHeartbeat, max_pending=8192), "heartbeats")
        self._forward(await bus.subscribe(JobBid, max_pending=8192), "bids")
        ack_wait = max(30.0, self.sched.scheduling.lease_s)
        for cls, name in ((JobSubmit, "submit"), (JobCancel, "cancel"), (JobReport, "report")):
            self._consume(self._log.consume(cls, durable=f"{prefix}-{name}", ack_wait=ack_wait), name)
        self.spawn(self._announce(), name="announcer")
        self.spawn(self._loop(), name="loop")

    async def _load(self) -> list[JobRecord]:
        assert self._jobs is not None
        records = []
        for job_id in await self._jobs.keys():
            try:
                entry = await self._jobs.get(job_id)
                rec = decode_record(entry.value)
            except NotFound:
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.log.error("unreadable job record; skipped", job_id=job_id, error=str(exc))
                continue
            self._revisions[job_id] = entry.revision
            records.append(rec)
        return records

    async def _learn_key(self, agent_id: str) -> bool:
        assert self._keys is not None
        try:
            raw = (await self._keys.get(agent_id)).value
        except NotFound:
            return False
        self.keyring.trust(raw)
        self._agent_kids[agent_id] = key_id(raw)
        return True

    def _forward(self, sub: EventSubscription[Any], name: str) -> None:
        async def loop() -> None:
            async with sub:
                async for d in sub:
                    await self._inbox.put(_Input(d.event))

        self.spawn(loop(), name=name)

    def _consume(self, consumer: EventConsumer[Any], name: str) -> None:
        async def loop() -> None:
            async with consumer:
                async for d in consumer:
                    await self._inbox.put(_Input(d.event, d))

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
            acks: list[AckableDelivery[Any]] = []
            for item in batch:
                if await self._admit(item):
                    core.handle(item.event, now)
                    self.metrics.inc("events_total", type=item.event.spec.type)
                if item.delivery is not None:
                    acks.append(item.delivery)
            core.tick(now)
            await self._apply(core.take_effects(), acks)

    async def _admit(self, item: _Input) -> bool:
        """Whether an input may reach the core: heartbeats need a registered key, reports a valid one."""
        event = item.event
        match event:
            case AgentHeartbeat(agent_id=agent_id):
                if agent_id in self._agent_kids or await self._learn_key(agent_id):
                    return True
                if agent_id not in self._unknown_agents:
                    self._unknown_agents.add(agent_id)
                    self.log.warning("heartbeat from an agent with no registered key; ignored",
                                     agent=agent_id)
                return False
            case JobReport(agent_id=agent_id):
                assert item.delivery is not None
                kid = item.delivery.envelope.kid
                expected = self._agent_kids.get(agent_id)
                if expected is None and await self._learn_key(agent_id):
                    expected = self._agent_kids[agent_id]
                if kid is not None and kid == expected and item.delivery.envelope.src == agent_id:
                    return True
                self.rejected_reports[agent_id] += 1
                self.metrics.inc("reports_rejected_total")
                self.log.warning("report not signed by the agent it names; ignored", agent=agent_id, kid=kid,
                                 job_id=event.job_id)
                return False
            case _:
                return True

    async def _apply(self, effects: Any, acks: list[AckableDelivery[Any]]) -> None:
        """Save, then acknowledge, then announce and send (write-ahead)."""
        if effects.saves:
            await asyncio.gather(*(self._save(rec) for rec in effects.saves.values()))
        if acks:
            await asyncio.gather(*(d.ack() for d in acks), return_exceptions=True)
        for status in effects.statuses:
            await self._outbox.put(status)
        if effects.sends:
            results = await asyncio.gather(*(self.bus.publish(ev) for ev in effects.sends),
                                           return_exceptions=True)
            for ev, res in zip(effects.sends, results, strict=True):
                if isinstance(res, FedbusError):
                    self.log.warning("send failed", type=ev.spec.type, error=str(res))
                elif isinstance(res, BaseException):
                    raise res

    async def _save(self, rec: JobRecord) -> None:
        """Compare-and-set the record on the revision we wrote last; retried while the broker is away."""
        assert self._jobs is not None
        data = encode_record(rec)
        delay = 0.1
        while True:
            revision = self._revisions.get(rec.job_id)
            try:
                if revision is None:
                    self._revisions[rec.job_id] = await self._jobs.create(rec.job_id, data)
                else:
                    self._revisions[rec.job_id] = await self._jobs.update(rec.job_id, data, revision=revision)
                return
            except Conflict:
                try:
                    theirs: int | None = (await self._jobs.get(rec.job_id)).revision
                except NotFound:
                    theirs = None
                self.log.error("job record was changed by someone else (two schedulers?); overwriting",
                               job_id=rec.job_id, ours=revision, theirs=theirs)
                if theirs is None:
                    self._revisions.pop(rec.job_id, None)
                else:
                    self._revisions[rec.job_id] = theirs
            except FedbusError as exc:
                self.log.warning("job record not saved yet; retrying", job_id=rec.job_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _announce(self) -> None:
        """Publish lifecycle events in order, in batches, with retries."""
        assert self._log is not None
        while True:
            batch = [await self._outbox.get()]
            with contextlib.suppress(asyncio.QueueEmpty):
                while len(batch) < 256:
                    batch.append(self._outbox.get_nowait())
            delay = 0.1
            while True:
                try:
                    await self._log.publish_many(batch)
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
        if self.core is None:
            return
        states = Counter(rec.state for rec in self.core.jobs.values())
        for state in JobState:
            self.metrics.set("jobs", states.get(state, 0), state=state.value)
        for name, value in self.core.counters.items():
            self.metrics.set(f"scheduler_{name}", value)
        self.metrics.set("agents_live", len(self.core.live_agents(time.time())))
