"""The scheduler as a pure state machine: events and the clock in, effects out. No I/O, no asyncio.

:class:`SchedulingCore` keeps every job's :class:`JobRecord` and a view of the live agents built from their
heartbeats. :meth:`SchedulingCore.handle` takes one event (submission, cancel, heartbeat, bid, report) and
:meth:`SchedulingCore.tick` the passing of time (bid deadlines, accept deadlines, leases, retry backoff);
both leave :class:`Effects` to collect with :meth:`SchedulingCore.take_effects`: records to save, lifecycle
events to announce, offers/awards/stops to send. The I/O loop (:mod:`fedbus.agents.scheduler`) saves first,
then announces and sends, so nothing is sent that a restart could forget (write-ahead).

The contract-net flow of one job::

    queued ─offer→ offered ─bids→ awarded ─all accept→ starting ─all running→ running ─all exit 0→ succeeded
       ▲              │ no fit        │ decline/timeout                              │ exit ≠ 0 → failed
       └──────────────┴───────────────┘                 lost (lease expired) → queued after backoff, or failed

Offers are *directed*: they go to the best candidates of the heartbeat view by the placement policy
(:mod:`fedbus.agents.placement`), who answer with a bid or a refusal, so the award is made as soon as all
have answered, not at a deadline. While an offer or award is out, the scheduler counts its resources busy on
that agent, so a burst of jobs spreads instead of piling onto one node. A refusal sends the offer on to the
next candidate at once (the refusing agent is skipped for that job until its next heartbeat); losing bidders
get a ``JobReject`` so they free their reservation. With no candidate the job waits in ``queued`` with the
reason, and is offered again when capacity appears.

Every award increments ``attempt``, the fencing token: reports carrying another attempt are ignored and the
agent that sent them is told to stop, so a presumed-dead agent cannot complete or overwrite a re-run.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import msgspec
import structlog

from fedbus.bus.events import Event

from .events import (
    AgentHeartbeat,
    Capacity,
    JobAward,
    JobBid,
    JobCancel,
    JobOffer,
    JobReject,
    JobReport,
    JobState,
    JobStatus,
    JobStop,
    JobSubmit,
    ReportPhase,
)
from .jobspec import Computing, JobSpec
from .placement import BinPack, Candidate, Policy, choose, fit_problem

__all__ = ["AgentView", "Effects", "JobRecord", "Placement", "SchedulerConfig", "SchedulingCore",
           "Transition"]

log = structlog.get_logger("fedbus.agents.scheduling")

_ACTIVE = frozenset({JobState.AWARDED, JobState.STARTING, JobState.RUNNING})
_MAX_HISTORY = 64
_MAX_REASON = 1000
"""Characters of a reason kept in a record and its history (bids' reasons are joined into one)."""
_MAX_EARLY_CANCELS = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Timing and placement knobs of the scheduler (seconds)."""

    bid_window_s: float = 0.5
    """Deadline for bids after an offer (a round usually closes earlier: when every candidate answered)."""
    accept_window_s: float = 10.0
    """Time the awarded agents have to accept."""
    lease_s: float = 10.0
    """A placed node must appear in one of its agent's heartbeats this often, or the job is lost."""
    restore_grace_s: float = 10.0
    """After a scheduler restart, running nodes get at least this long before their leases can expire: a job
    that ended while the scheduler was down is no longer in its agent's heartbeats, and its (durable) report
    must be read back first, which can take a while on a loaded broker."""
    agent_ttl_s: float = 10.0
    """An agent without a heartbeat for this long is no longer offered work."""
    warmup_s: float = 1.0
    """After a (re)start, wait this long for heartbeats before placing anything."""
    backoff_s: float = 1.0
    """Delay before the first retry of a lost job; doubles with every retry."""
    max_backoff_s: float = 60.0
    requeue_s: float = 5.0
    """Waiting jobs are re-evaluated at least this often (and whenever capacity appears)."""
    spare_offers: int = 0
    """An offer goes to the ``nodes + spare_offers`` best candidates. Spares save a round trip when a
    candidate refuses, but hold reservations they may not need (a burst of offers then starves itself)."""
    stop_grace_s: float = 10.0
    keep_finished: int = 10_000
    """Finished jobs kept in memory (all of them stay in the store)."""


class Transition(msgspec.Struct, frozen=True, array_like=True):
    """One entry of a job's history."""

    t: float
    state: JobState
    attempt: int
    reason: str


class Placement(msgspec.Struct, kw_only=True):
    """One node of the current attempt."""

    agent_id: str
    node_rank: int
    address: str = ""
    phase: str = "awarded"
    exit_code: int | None = None


class JobRecord(msgspec.Struct, kw_only=True):
    """Everything the scheduler knows about a job; what the store keeps (one key per job)."""

    job_id: str
    spec: JobSpec
    state: JobState
    created: float
    updated: float
    submitted_by: str = ""
    """The identity that submitted it: verified against the identities registry by a secure scheduler."""
    submit_id: str = ""
    """The envelope id of the submission: a redelivery carries it, a duplicate job id does not."""
    cancelled_by: str = ""
    attempt: int = 0
    retries_used: int = 0
    reason: str = ""
    placements: list[Placement] = []
    master_addr: str = ""
    master_port: int = 0
    exit_code: int | None = None
    not_before: float = 0.0
    deadline: float = 0.0
    seq: int = 0
    history: list[Transition] = []

    @property
    def agents(self) -> list[str]:
        return [p.agent_id for p in self.placements]


@dataclass(slots=True)
class AgentView:
    """What the scheduler knows of one agent, from its last heartbeat."""

    agent_id: str
    instance: str
    kind: str
    status: str
    address: str
    capacity: Capacity | None
    last_seen: float
    public_key: bytes | None
    held: set[tuple[str, int]] = field(default_factory=set)
    pending: dict[str, Computing] = field(default_factory=dict)
    """Offers and awards made since the agent's last heartbeat that its capacity does not show yet."""
    _effective: Capacity | None = None

    def set_capacity(self, capacity: Capacity | None) -> None:
        self.capacity, self._effective = capacity, None

    def add_pending(self, job_id: str, needs: Computing) -> None:
        self.pending[job_id], self._effective = needs, None

    def drop_pending(self, job_id: str) -> None:
        if self.pending.pop(job_id, None) is not None:
            self._effective = None

    def effective(self) -> Capacity | None:
        """Capacity minus what is pending (cached until either changes)."""
        cap = self.capacity
        if cap is None or not self.pending:
            return cap
        if self._effective is None:
            gpus = sum(n.gpus_per_node for n in self.pending.values())
            cpus = sum(n.cpus_per_node for n in self.pending.values())
            mem = sum(n.min_memory_gb for n in self.pending.values())
            self._effective = msgspec.structs.replace(
                cap, free_gpus=max(cap.free_gpus - gpus, 0), free_cpus=max(cap.free_cpus - cpus, 0.0),
                free_memory_gb=max(cap.free_memory_gb - mem, 0.0))
        return self._effective


@dataclass(slots=True)
class _Round:
    job_id: str
    round: int
    deadline: float
    expected: frozenset[str]
    bids: dict[str, JobBid] = field(default_factory=dict)


@dataclass(slots=True)
class Effects:
    """What the I/O loop must do, in this order: save records, announce statuses, send events."""

    saves: dict[str, JobRecord] = field(default_factory=dict)
    statuses: list[JobStatus] = field(default_factory=list)
    sends: list[Event] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.saves or self.statuses or self.sends)


class SchedulingCore:
    """The scheduler's state and decisions; see the module docstring. Time is wall-clock seconds."""

    def __init__(self, *, now: float, config: SchedulerConfig | None = None, policy: Policy | None = None,
                 scheduler_id: str = "scheduler") -> None:
        self.config = config or SchedulerConfig()
        self.policy: Policy = policy or BinPack()
        self.scheduler_id = scheduler_id
        self.jobs: dict[str, JobRecord] = {}
        self._open: dict[str, JobRecord] = {}
        """Jobs not finished yet."""
        self._queued: dict[str, JobRecord] = {}
        self._awarded: dict[str, JobRecord] = {}
        """Jobs in those two states: what ``tick`` looks at (running jobs are watched through leases)."""
        self.agents: dict[str, AgentView] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("offers", "awards", "stale_reports", "lost", "retries", "declines", "key_conflicts"), 0)
        self._rounds: dict[str, _Round] = {}
        self._round_ids = itertools.count(int(now * 1000))
        self._leases: dict[tuple[str, str], float] = {}
        self._lease_heap: list[tuple[float, str, str]] = []
        """``(until, job, agent)``, renewals push new entries; stale ones are skipped when popped."""
        self._stops_sent: dict[tuple[str, str, int], float] = {}
        self._cancel_first: dict[str, str] = {}
        """Cancels that came before their job's submission, and who sent them (bounded)."""
        self._refused: dict[str, dict[str, float]] = {}
        """Agents that refused (or ignored) a job's offer, and when: skipped for that job until they beat."""
        self._failed_rounds: dict[str, int] = {}
        """Offer rounds in a row that placed nothing, by job: the next one waits longer."""
        self._finished: deque[str] = deque()
        self._warm_at = now + self.config.warmup_s
        self._warm = False
        self._capacity_changed = False
        self._next_requeue = now + self.config.requeue_s
        self._effects = Effects()

    # -- effects ----------------------------------------------------------------------------------------
    def take_effects(self) -> Effects:
        """The effects accumulated since the last call."""
        effects, self._effects = self._effects, Effects()
        return effects

    def _save(self, rec: JobRecord) -> None:
        self._effects.saves[rec.job_id] = rec

    def _send(self, event: Event) -> None:
        self._effects.sends.append(event)

    def _transition(self, rec: JobRecord, state: JobState, reason: str, now: float, *,
                    save: bool = True) -> None:
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 1] + "…"
        if rec.state is state and rec.reason == reason:
            return
        self._index(rec, state)
        rec.state, rec.reason, rec.updated = state, reason, now
        rec.seq += 1
        history = rec.history
        history.append(Transition(now, state, rec.attempt, reason))
        if len(history) > _MAX_HISTORY:
            del history[1:len(history) - _MAX_HISTORY + 1]
        self._effects.statuses.append(JobStatus(
            job_id=rec.job_id, state=state, attempt=rec.attempt, seq=rec.seq, reason=reason,
            agents=rec.agents if state is not JobState.QUEUED else [], exit_code=rec.exit_code))
        if save:
            self._save(rec)
        if state.terminal:
            self._open.pop(rec.job_id, None)
            self._failed_rounds.pop(rec.job_id, None)
            self._refused.pop(rec.job_id, None)
            self._finished.append(rec.job_id)
            while len(self._finished) > self.config.keep_finished:
                old = self._finished.popleft()
                if old in self.jobs and self.jobs[old].state.terminal:
                    del self.jobs[old]
        log.info("job state", job_id=rec.job_id, state=state.value, attempt=rec.attempt, reason=reason)

    def _index(self, rec: JobRecord, state: JobState) -> None:
        """Keep the per-state indexes in step with ``rec`` moving to ``state``."""
        for index, wanted in ((self._queued, JobState.QUEUED), (self._awarded, JobState.AWARDED)):
            if state is wanted:
                index[rec.job_id] = rec
            else:
                index.pop(rec.job_id, None)

    def _lease(self, job_id: str, agent_id: str, until: float) -> None:
        self._leases[(job_id, agent_id)] = until
        heapq.heappush(self._lease_heap, (until, job_id, agent_id))

    # -- restore ----------------------------------------------------------------------------------------
    def restore(self, records: list[JobRecord], now: float) -> None:
        """Load the records a previous run saved, and resume: open offers are made again, leases restart."""
        for rec in sorted(records, key=lambda r: r.created):
            self.jobs[rec.job_id] = rec
            if rec.state.terminal:
                self._finished.append(rec.job_id)
                continue
            self._open[rec.job_id] = rec
            self._index(rec, rec.state)
            if rec.state in (JobState.OFFERED, JobState.LOST):
                self._transition(rec, JobState.QUEUED, "scheduler restarted; offering again", now)
            elif rec.state in (JobState.STARTING, JobState.RUNNING):
                for p in rec.placements:
                    if p.phase != "exited":
                        self._lease(rec.job_id, p.agent_id,
                                    now + max(self.config.lease_s, self.config.restore_grace_s))
            elif rec.state is JobState.AWARDED:
                rec.deadline = max(rec.deadline, now + self.config.accept_window_s)
                self._send_awards(rec, rnd=0, only_pending=True)
        log.info("restored jobs", total=len(records),
                 active=sum(1 for r in records if not r.state.terminal))

    # -- events -----------------------------------------------------------------------------------------
    def handle(self, event: Event, now: float, *, by: str | None = None, event_id: str = "") -> None:
        """Apply one incoming event. ``by`` is who sent a submission or cancel (the verified identity, or
        what the event says in an insecure deployment) and ``event_id`` its envelope id."""
        match event:
            case JobSubmit():
                said = event.submitted_by or ""
                self._submit(event, now, by=said if by is None else by, event_id=event_id)
            case JobCancel():
                said = event.cancelled_by or ""
                self._cancel(event.job_id, event.reason, now, by=said if by is None else by)
            case AgentHeartbeat():
                self._heartbeat(event, now)
            case JobBid():
                self._bid(event, now)
            case JobReport():
                self._report(event, now)
            case _:
                log.debug("ignored event", type=event.spec.type)

    def _submit(self, ev: JobSubmit, now: float, *, by: str, event_id: str) -> None:
        if ev.job_id in self.jobs:
            return  # a redelivery (the I/O shell refuses a duplicate id before it gets here)
        rec = JobRecord(job_id=ev.job_id, spec=ev.jobspec, state=JobState.QUEUED, created=now, updated=now,
                        submitted_by=by, submit_id=event_id)
        self.jobs[ev.job_id] = self._open[ev.job_id] = self._queued[ev.job_id] = rec
        rec.seq = 1
        rec.history.append(Transition(now, JobState.QUEUED, 0, "submitted"))
        rec.reason = "submitted"
        self._effects.statuses.append(JobStatus(job_id=rec.job_id, state=JobState.QUEUED, attempt=0, seq=1,
                                                reason="submitted"))
        self._save(rec)
        if ev.job_id in self._cancel_first:
            self._cancel(ev.job_id, "cancelled before it was queued", now, by=self._cancel_first.pop(ev.job_id))
            return
        self._try_place(rec, now)

    def _cancel(self, job_id: str, reason: str, now: float, *, by: str = "") -> None:
        rec = self.jobs.get(job_id)
        if rec is None:
            self._cancel_first[job_id] = by  # the submission may still be on its way
            while len(self._cancel_first) > _MAX_EARLY_CANCELS:
                del self._cancel_first[next(iter(self._cancel_first))]
            return
        if rec.state.terminal:
            return
        rec.cancelled_by = by
        rnd = self._rounds.pop(job_id, None)
        if rnd is not None:
            for agent_id in rnd.expected:
                if agent_id in self.agents:
                    self.agents[agent_id].drop_pending(job_id)
        self._stop_placements(rec, reason)
        self._transition(rec, JobState.CANCELLED, reason, now)

    def forget(self, job_id: str) -> None:
        """Drop a job that was never saved (its record could not be stored): as if never submitted."""
        rec = self.jobs.pop(job_id, None)
        for index in (self._open, self._queued, self._awarded, self._failed_rounds, self._refused):
            index.pop(job_id, None)
        self._rounds.pop(job_id, None)
        for view in self.agents.values():
            view.drop_pending(job_id)
        if rec is not None:
            for p in rec.placements:
                self._leases.pop((job_id, p.agent_id), None)
        with contextlib.suppress(ValueError):
            self._finished.remove(job_id)

    def _heartbeat(self, hb: AgentHeartbeat, now: float) -> None:
        view = self.agents.get(hb.agent_id)
        if view is not None and view.public_key and hb.public_key and hb.public_key != view.public_key:
            self.counters["key_conflicts"] += 1
            log.warning("heartbeat with another key for a known agent; ignored", agent_id=hb.agent_id)
            return
        if view is None:
            view = self.agents[hb.agent_id] = AgentView(
                agent_id=hb.agent_id, instance=hb.instance, kind=hb.kind, status=hb.status,
                address=hb.address, capacity=hb.capacity, last_seen=now, public_key=hb.public_key)
            self._capacity_changed = True
            log.info("agent joined", agent_id=hb.agent_id, kind=hb.kind)
        else:
            restarted = view.instance != hb.instance
            before = view.capacity
            view.instance, view.status, view.address = hb.instance, hb.status, hb.address
            view.set_capacity(hb.capacity)
            view.last_seen = now
            view.public_key = view.public_key or hb.public_key
            if restarted:
                listed = {(r.job_id, r.attempt) for r in hb.jobs}
                for rec in self._jobs_on(hb.agent_id):
                    if (rec.job_id, rec.attempt) not in listed:
                        self._lose(rec, hb.agent_id, f"agent {hb.agent_id} restarted", now)
            if before is None or (hb.capacity is not None and _grew(before, hb.capacity)):
                self._capacity_changed = True
        held = {(r.job_id, r.attempt) for r in hb.jobs}
        view.held = held
        for job_id, attempt in held:
            rec = self.jobs.get(job_id)
            if (rec is not None and rec.attempt == attempt and rec.state in _ACTIVE
                    and hb.agent_id in rec.agents):
                self._lease(job_id, hb.agent_id, now + self.config.lease_s)
                view.drop_pending(job_id)
            else:
                why = "the job is over" if rec is None or rec.state.terminal else \
                    f"attempt {attempt} is not current (now {rec.attempt})"
                self._stop(hb.agent_id, job_id, attempt, why, now)
        if hb.status == "stopped":
            # Its jobs have reported their end (durably, so maybe still on the way); leases cover the rest.
            self.agents.pop(hb.agent_id, None)

    def _bid(self, bid: JobBid, now: float) -> None:
        rnd = self._rounds.get(bid.job_id)
        if rnd is None or rnd.round != bid.round:
            return  # late, or for an earlier round
        rnd.bids[bid.agent_id] = bid
        if rnd.expected and rnd.expected <= rnd.bids.keys():
            self._close_round(rnd, now)

    def _report(self, r: JobReport, now: float) -> None:
        rec = self.jobs.get(r.job_id)
        if rec is None:
            return
        placement = next((p for p in rec.placements if p.agent_id == r.agent_id
                          and p.node_rank == r.node_rank), None)
        if r.attempt != rec.attempt or placement is None or rec.state.terminal or rec.state not in _ACTIVE:
            self.counters["stale_reports"] += 1
            log.info("stale report ignored", job_id=r.job_id, agent_id=r.agent_id, attempt=r.attempt,
                     current=rec.attempt, phase=r.phase.value, state=rec.state.value)
            if r.phase in (ReportPhase.ACCEPTED, ReportPhase.RUNNING):
                self._stop(r.agent_id, r.job_id, r.attempt, "stale attempt", now, force=True)
            return
        match r.phase:
            case ReportPhase.ACCEPTED:
                if placement.phase == "awarded":
                    placement.phase = "accepted"
                    self._lease(rec.job_id, r.agent_id, now + self.config.lease_s)
                if rec.state is JobState.AWARDED and all(p.phase != "awarded" for p in rec.placements):
                    self._transition(rec, JobState.STARTING,
                                     f"fetching workspace and bootstrapping on {', '.join(rec.agents)}", now)
            case ReportPhase.DECLINED:
                self.counters["declines"] += 1
                self._release(rec, f"{r.agent_id} declined: {r.reason or 'no reason given'}", now)
            case ReportPhase.LOST:
                self._lose(rec, r.agent_id, f"{r.agent_id} gave the job up: {r.reason or 'no reason'}", now)
            case ReportPhase.RUNNING:
                if placement.phase in ("awarded", "accepted"):
                    placement.phase = "running"
                    self._lease(rec.job_id, r.agent_id, now + self.config.lease_s)
                if all(p.phase in ("running", "exited") for p in rec.placements) \
                        and rec.state is not JobState.RUNNING:
                    self._transition(rec, JobState.RUNNING, f"running on {', '.join(rec.agents)}", now)
            case ReportPhase.EXITED:
                if placement.phase == "exited":
                    return
                placement.phase, placement.exit_code = "exited", r.exit_code
                self._leases.pop((rec.job_id, r.agent_id), None)
                code = r.exit_code if r.exit_code is not None else -1
                if code != 0:
                    self._node_failed(rec, r.agent_id, code, r.reason, now)
                elif all(p.phase == "exited" for p in rec.placements):
                    rec.exit_code = 0
                    self._finish_attempt(rec)
                    self._transition(rec, JobState.SUCCEEDED, "all nodes exited with 0", now)
                else:
                    self._save(rec)

    # -- time -------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Apply the passing of time: deadlines, leases, backoff, periodic re-evaluation."""
        cfg = self.config
        if not self._warm and now >= self._warm_at:
            self._warm = True
            self._capacity_changed = True
        for rnd in [r for r in self._rounds.values() if r.deadline <= now]:
            self._close_round(rnd, now)
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            until, job_id, agent_id = heapq.heappop(heap)
            if self._leases.get((job_id, agent_id)) != until:
                continue  # renewed (or released) since
            rec = self.jobs.get(job_id)
            self._leases.pop((job_id, agent_id), None)
            if rec is not None and rec.state in (JobState.STARTING, JobState.RUNNING):
                self._lose(rec, agent_id, f"no heartbeat from {agent_id} listing the job for "
                                          f"{cfg.lease_s:g}s", now)
        for agent_id in [a for a, v in self.agents.items() if v.last_seen + cfg.agent_ttl_s <= now]:
            del self.agents[agent_id]
            log.info("agent gone", agent_id=agent_id)
        requeue = self._capacity_changed or now >= self._next_requeue
        for rec in [r for r in self._awarded.values() if r.deadline <= now]:
            slow = [p.agent_id for p in rec.placements if p.phase == "awarded"]
            self._release(rec, f"award not accepted in {cfg.accept_window_s:g}s by {', '.join(slow)}", now)
        for rec in [r for r in self._queued.values() if r.not_before and r.not_before <= now]:
            rec.not_before = 0.0
            self._try_place(rec, now)
        if requeue and self._warm:
            self._capacity_changed = False
            self._next_requeue = now + cfg.requeue_s
            for rec in sorted((r for r in self._queued.values() if r.state is JobState.QUEUED),
                              key=lambda r: r.created):
                self._try_place(rec, now)

    def next_wakeup(self) -> float | None:
        """The earliest time :meth:`tick` has something to do (``None``: only events matter)."""
        times = [r.deadline for r in self._rounds.values()]
        heap = self._lease_heap
        while heap and self._leases.get((heap[0][1], heap[0][2])) != heap[0][0]:
            heapq.heappop(heap)  # drop stale entries so that the top is a live lease
        if heap:
            times.append(heap[0][0])
        times += [rec.deadline for rec in self._awarded.values()]
        times += [rec.not_before for rec in self._queued.values() if rec.not_before]
        times += [v.last_seen + self.config.agent_ttl_s for v in self.agents.values()]
        times.append(self._next_requeue if self._warm else self._warm_at)
        return min(times) if times else None

    # -- decisions --------------------------------------------------------------------------------------
    def live_agents(self, now: float) -> list[AgentView]:
        """Agents with capacity that beat recently and take work."""
        ttl = self.config.agent_ttl_s
        return [v for v in self.agents.values()
                if v.capacity is not None and v.status in ("ready", "busy") and v.last_seen + ttl > now]

    def explain(self, spec: JobSpec, now: float, *, job_id: str = "", limit: int | None = None
                ) -> tuple[list[Candidate], str]:
        """The agents that could take a node of this job now, best first (the ``limit`` best), and the
        situation in words: how many fit, and why each of the others cannot."""
        needs, nodes = spec.computing, spec.computing.nodes
        fitting: list[Candidate] = []
        problems: list[str] = []
        live = sorted(self.live_agents(now), key=lambda v: v.agent_id)
        refused = self._refused.get(job_id, {})
        for view in live:
            cap = view.effective()
            assert cap is not None
            problem = fit_problem(needs, cap)
            if problem is None and refused.get(view.agent_id, -1.0) >= view.last_seen:
                problem = "refused the last offer (asked again after its next heartbeat)"
            if problem is None:
                fitting.append(Candidate(view.agent_id, cap, view.address))
            else:
                problems.append(f"{view.agent_id}: {problem}")
        count = len(fitting)
        rank = lambda c: self.policy.rank(needs, c)
        fitting = sorted(fitting, key=rank) if limit is None else heapq.nsmallest(limit, fitting, key=rank)
        if not self._warm:
            return fitting, f"scheduler starting: waiting {self.config.warmup_s:g}s for agent heartbeats"
        if not live:
            return fitting, "no live agents (none has sent a heartbeat recently)"
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        what = f"{needs.gpus_per_node} GPU{'s' if needs.gpus_per_node != 1 else ''}"
        if needs.resource_type and needs.gpus_per_node:
            what += f" ({needs.resource_type})"
        return fitting, (f"needs {nodes} node{'s' if nodes != 1 else ''} with {what}, "
                         f"{needs.cpus_per_node:g} CPUs, {needs.min_memory_gb:g} GB memory; "
                         f"{count} of {len(live)} live agents fit now"
                         + (f" — {shown}" if shown else ""))

    def _try_place(self, rec: JobRecord, now: float) -> None:
        if rec.state is not JobState.QUEUED or rec.job_id in self._rounds or (rec.not_before > now):
            return
        nodes = rec.spec.computing.nodes
        fitting, why = self.explain(rec.spec, now, job_id=rec.job_id, limit=nodes + self.config.spare_offers)
        if not self._warm or len(fitting) < nodes:
            if rec.not_before <= now:
                self._transition(rec, JobState.QUEUED, why, now)
            return
        chosen = fitting[: nodes + self.config.spare_offers]
        rnd = _Round(rec.job_id, next(self._round_ids), now + self.config.bid_window_s,
                     frozenset(c.agent_id for c in chosen))
        self._rounds[rec.job_id] = rnd
        for c in chosen[:nodes]:  # the likely winners: count them busy, so that the next job looks elsewhere
            self.agents[c.agent_id].add_pending(rec.job_id, rec.spec.computing)
        deadline_ns = int(rnd.deadline * 1e9)
        for c in chosen:
            self._send(JobOffer(to=c.agent_id, job_id=rec.job_id, round=rnd.round, nodes=nodes,
                                needs=rec.spec.computing, deadline_ns=deadline_ns))
        self.counters["offers"] += 1
        self._transition(rec, JobState.OFFERED, f"offered to {', '.join(sorted(rnd.expected))}", now,
                         save=False)

    def _close_round(self, rnd: _Round, now: float) -> None:
        self._rounds.pop(rnd.job_id, None)
        rec = self.jobs.get(rnd.job_id)
        if rec is None or rec.state is not JobState.OFFERED:
            return
        needs, nodes = rec.spec.computing, rec.spec.computing.nodes
        live = {v.agent_id for v in self.live_agents(now)}
        bids = [b for b in rnd.bids.values() if b.ok and b.capacity is not None and b.agent_id in live]
        candidates = [Candidate(b.agent_id, b.capacity, b.address, b.port) for b in bids
                      if b.capacity is not None]
        chosen, why = choose(needs, nodes, candidates, self.policy)
        winners = {c.agent_id for c in chosen} if chosen is not None else set()
        for agent_id in rnd.expected | rnd.bids.keys():
            view = self.agents.get(agent_id)
            if view is not None and agent_id not in winners:
                view.drop_pending(rec.job_id)
            bid = rnd.bids.get(agent_id)
            if bid is not None and bid.ok and agent_id not in winners:
                self._send(JobReject(agent_id=agent_id, job_id=rec.job_id, round=rnd.round))
        if chosen is None:
            refusals = [f"{b.agent_id}: {b.reason}" for b in rnd.bids.values() if not b.ok]
            silent = sorted(rnd.expected - rnd.bids.keys())
            detail = "; ".join(refusals + ([f"no answer from {', '.join(silent)}"] if silent else []))
            refused = self._refused.setdefault(rec.job_id, {})
            for agent_id in rnd.expected | rnd.bids.keys():
                if agent_id not in winners and not (agent_id in rnd.bids and rnd.bids[agent_id].ok):
                    refused[agent_id] = now
            why = f"no placement: {why}" + (f" — {detail}" if detail else "")
            self._transition(rec, JobState.QUEUED, why, now)
            fitting, _ = self.explain(rec.spec, now, job_id=rec.job_id, limit=nodes)
            if len(fitting) >= nodes and rnd.expected:
                self._try_place(rec, now)  # other candidates remain: ask them at once
            else:  # the view was wrong: try again soon, then less and less often
                failed = self._failed_rounds[rec.job_id] = self._failed_rounds.get(rec.job_id, 0) + 1
                delay = min(self.config.bid_window_s * 2 ** (failed - 1), self.config.requeue_s)
                rec.not_before = now + delay
            return
        self._failed_rounds.pop(rec.job_id, None)
        self._refused.pop(rec.job_id, None)
        rec.attempt += 1
        rec.placements = [Placement(agent_id=c.agent_id, node_rank=i, address=c.address)
                          for i, c in enumerate(chosen)]
        rec.master_addr, rec.master_port = chosen[0].address, chosen[0].port
        rec.exit_code = None
        rec.deadline = now + self.config.accept_window_s
        self.counters["awards"] += 1
        self._send_awards(rec, rnd=rnd.round)
        for p in rec.placements:
            view = self.agents.get(p.agent_id)
            if view is not None:
                view.add_pending(rec.job_id, needs)
        self._transition(rec, JobState.AWARDED, f"awarded to {', '.join(rec.agents)}", now)

    def _send_awards(self, rec: JobRecord, *, rnd: int, only_pending: bool = False) -> None:
        for p in rec.placements:
            if only_pending and p.phase != "awarded":
                continue
            self._send(JobAward(agent_id=p.agent_id, job_id=rec.job_id, attempt=rec.attempt, round=rnd,
                                node_rank=p.node_rank, nodes=len(rec.placements), master_addr=rec.master_addr,
                                master_port=rec.master_port, jobspec=rec.spec,
                                accept_by_ns=int(rec.deadline * 1e9)))

    def _release(self, rec: JobRecord, why: str, now: float) -> None:
        """An award that did not take (declined, not accepted in time): free the nodes, offer again."""
        self._stop_placements(rec, why)
        self._finish_attempt(rec)
        self._transition(rec, JobState.QUEUED, f"{why}; offering again", now)
        self._try_place(rec, now)

    def _node_failed(self, rec: JobRecord, agent_id: str, code: int, detail: str, now: float) -> None:
        rec.exit_code = code
        self._stop_placements(rec, f"node on {agent_id} failed", skip=agent_id)
        self._finish_attempt(rec)
        why = f"node on {agent_id} exited with {code}" + (f" ({detail})" if detail else "")
        if rec.spec.retry_on_failure and rec.retries_used < rec.spec.retries:
            self._retry(rec, why, now)
        else:
            self._transition(rec, JobState.FAILED, why, now)

    def _lose(self, rec: JobRecord, agent_id: str, why: str, now: float) -> None:
        if rec.state not in _ACTIVE:
            return
        self.counters["lost"] += 1
        self._stop_placements(rec, why, skip=agent_id)
        self._stop(agent_id, rec.job_id, rec.attempt, why, now)  # in case it comes back
        self._finish_attempt(rec)
        self._transition(rec, JobState.LOST, why, now, save=False)
        if rec.retries_used < rec.spec.retries:
            self._retry(rec, why, now)
        else:
            self._transition(rec, JobState.FAILED, f"{why}; no retries left (retries: {rec.spec.retries})",
                             now)

    def _retry(self, rec: JobRecord, why: str, now: float) -> None:
        rec.retries_used += 1
        self.counters["retries"] += 1
        delay = min(self.config.backoff_s * 2 ** (rec.retries_used - 1), self.config.max_backoff_s)
        rec.not_before = now + delay
        self._transition(rec, JobState.QUEUED,
                         f"retry {rec.retries_used} of {rec.spec.retries} in {delay:g}s: {why}", now)

    def _finish_attempt(self, rec: JobRecord) -> None:
        for p in rec.placements:
            self._leases.pop((rec.job_id, p.agent_id), None)
            view = self.agents.get(p.agent_id)
            if view is not None:
                view.drop_pending(rec.job_id)
        self._capacity_changed = True

    def _stop_placements(self, rec: JobRecord, why: str, *, skip: str | None = None) -> None:
        if rec.state not in _ACTIVE:
            return
        for p in rec.placements:
            if p.agent_id != skip and p.phase != "exited":
                self._send(JobStop(agent_id=p.agent_id, job_id=rec.job_id, attempt=rec.attempt, reason=why,
                                   grace_s=self.config.stop_grace_s))
        self._finish_attempt(rec)

    def _stop(self, agent_id: str, job_id: str, attempt: int, why: str, now: float, *,
              force: bool = False) -> None:
        """Tell an agent to stop an attempt; repeated at most once per lease period unless ``force``."""
        key = (agent_id, job_id, attempt)
        if self._stops_sent.get(key, 0.0) > now and not force:
            return
        self._stops_sent[key] = now + self.config.lease_s
        if len(self._stops_sent) > 10_000:
            for k in [k for k, t in self._stops_sent.items() if t <= now]:
                del self._stops_sent[k]
        self._send(JobStop(agent_id=agent_id, job_id=job_id, attempt=attempt, reason=why,
                           grace_s=self.config.stop_grace_s))

    def _jobs_on(self, agent_id: str) -> list[JobRecord]:
        return [r for r in self._open.values() if r.state in _ACTIVE and agent_id in r.agents]


def _grew(before: Capacity, after: Capacity) -> bool:
    return (after.free_gpus > before.free_gpus or after.free_cpus > before.free_cpus + 1e-9
            or after.free_memory_gb > before.free_memory_gb + 1e-9 or after.gpus != before.gpus)
