"""The GPU agent (``fedbus agent gpu``): bids on job offers it can honour and runs what it is awarded.

- Offers: an offer it can honour gets a bid and a reservation (until the award, a reject, or a timeout);
  one it cannot honour gets a refusal with the reason, so the scheduler can tell the user why.
- Awards, stops and rejects must be signed by a scheduler (:mod:`fedbus.agents.gpu_trust`: with
  credentials, a scheduler or admin identity of the registry; without, ``--trust`` files or the key pinned
  on first use). An award is accepted only before its ``accept_by_ns``, only once (its envelope id and its
  ``(job_id, attempt)`` are kept in the state dir across restarts, :mod:`fedbus.agents.awards`) and only
  for resources still free; the accept, the start and the exit are durable, signed :class:`JobReport`\\s.
- Running: in a work dir of its own outside the state dir, as the job user (never root when the agent is
  root), with the agent's secrets scrubbed from its environment (:mod:`fedbus.agents.jobhost`); workspace
  fetched from the object store (sha256-verified) and unpacked, then the runner
  (:mod:`fedbus.agents.executor`); output lines are batched into ``JobLog`` events. ``JobStop`` stops it.
- Nothing a message does stops the agent: a handler that fails logs one line and the loop goes on; a job
  whose preparation fails ends as that job's failure.
- Draining (SIGTERM): no new bids; running jobs finish (up to ``drain_timeout_s``), then the agent exits.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus.bus.broker import free_port
from fedbus.bus.client import Delivery, EventSubscription
from fedbus.bus.creds import IDENTITIES_BUCKET
from fedbus.bus.errors import ConfigError, FedbusError, IntegrityError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.roles import validate_id
from fedbus.bus.stores import EventLog, ObjectStore
from fedbus.bus.transport import Transport

from . import workspace
from .awards import AwardBook
from .errors import WorkspaceError
from .events import (
    Capacity,
    JobAward,
    JobBid,
    JobLog,
    JobOffer,
    JobRef,
    JobReject,
    JobReport,
    JobStop,
    ReportPhase,
)
from .executor import ExitResult, Launch, Runner, SubprocessRunner, agent_env, reap_orphans
from .gpu_trust import IdentityTrust, PinnedTrust, SchedulerTrust
from .jobhost import JobUser, WorkRoot
from .ledger import Ledger
from .logship import LogShipper
from .placement import node_cost
from .resources import DeclaredResources, Resources, detect_resources, free_disk_gb, outbound_address
from .runtime import Agent, AgentStatus, RuntimeConfig
from .trust import KEYS_BUCKET, PinnedKeys

__all__ = ["GpuAgent", "GpuAgentConfig"]

_MAX_BID_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuAgentConfig:
    """What a GPU agent adds to :class:`RuntimeConfig`."""

    declared: DeclaredResources = field(default_factory=DeclaredResources)
    labels: dict[str, str] = field(default_factory=dict)
    price_per_hour: float = 0.0
    """Per GPU (per node for jobs without GPUs)."""
    address: str | None = None
    """MASTER_ADDR other nodes use to reach this one; default: the local address that routes to the broker."""
    scheduler_id: str = "scheduler"
    stop_grace_s: float = 10.0
    reserve_s: float = 5.0
    """How long a reservation outlives the offer's bid deadline when no award comes."""
    keep_workdirs: bool = False
    probe_torch: bool = False
    work_dir: Path | None = None
    """Where job work dirs go, outside the state dir; default ``<tmp>/fedbus-jobs-<agent id>-<hash>``."""
    job_user: str | None = None
    """Who jobs run as: default ``nobody`` when the agent is root, else the agent's own user."""
    clock_skew_s: float = 1.0
    """How far past its ``accept_by_ns`` an award is still taken (clocks of two machines differ)."""
    identity_refresh_s: float = 30.0
    """With credentials: how long a scheduler identity read from the registry is trusted before re-reading."""


@dataclass(slots=True)
class _Running:
    award: JobAward
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    abandoned: bool = False
    """Stopped because the agent is shutting down: reported ``lost``, so the scheduler runs it elsewhere."""
    task: asyncio.Task[None] | None = None


def _why(exc: BaseException) -> str:
    """One line for an error, from inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) if isinstance(exc, FedbusError) else f"{type(exc).__name__}: {exc}"


class GpuAgent(Agent):
    """A node that runs jobs; see the module docstring."""

    kind = "gpu"

    def __init__(self, config: RuntimeConfig, gpu: GpuAgentConfig | None = None, *,
                 transport: Transport | None = None, runner: Runner | None = None,
                 resources: Resources | None = None) -> None:
        super().__init__(config, transport=transport)
        self.gpu = gpu = gpu or GpuAgentConfig()
        self.pid_dir = self.state_dir / "pids"
        try:
            self.job_user = JobUser.choose(gpu.job_user)
            work_dir = gpu.work_dir or WorkRoot.default_path(self.agent_id, self.state_dir)
            self.work_root = WorkRoot(work_dir, state_dir=self.state_dir)
        except BaseException:
            self._lock.release()
            raise
        secret_paths = [self.state_dir, *([config.creds.path] if config.creds and config.creds.path else [])]
        self.runner: Runner = runner or SubprocessRunner(
            grace_s=gpu.stop_grace_s, pid_dir=self.pid_dir, env=agent_env(self.broker_url()),
            user=self.job_user, secret_paths=secret_paths)
        self.resources = resources
        self.ledger: Ledger | None = None
        self.awards = AwardBook(self.state_dir / "awards.json")
        self.scheduler_trust: SchedulerTrust | None = None
        self._running: dict[tuple[str, int], _Running] = {}
        self._address = gpu.address
        self._log: EventLog | None = None
        self._objects: ObjectStore | None = None
        for name, help_ in (
            ("offers_total", "offers received"), ("bids_total", "bids sent"),
            ("refusals_total", "offers refused"), ("awards_total", "awards accepted"),
            ("declines_total", "awards declined"), ("jobs_exited_total", "job attempts ended"),
            ("forged_total", "awards or stops ignored: signed by a trusted key that is not the scheduler's"),
            ("replays_total", "awards refused: seen or accepted before (a replay)"),
            ("expired_total", "awards refused: past their accept_by_ns"),
            ("handler_errors_total", "events whose handling failed (logged; the agent goes on)"),
        ):
            self.metrics.counter(name, help_)

    # -- runtime hooks ----------------------------------------------------------------------------------
    async def on_start(self) -> None:
        # Nothing survives a restart: jobs that a killed predecessor ran are gone for the scheduler.
        reaped = await asyncio.to_thread(reap_orphans, self.pid_dir)
        await asyncio.to_thread(self.work_root.prepare, self.job_user)
        await asyncio.to_thread(shutil.rmtree, self.state_dir / "jobs", True)  # where work dirs used to be
        if reaped:
            self.log.warning("reaped jobs of the previous run", process_groups=reaped)
        jobs_dir = self.work_root.path
        if self.resources is None:
            self.resources = await asyncio.to_thread(
                detect_resources, self.gpu.declared, work_dir=jobs_dir, probe_torch=self.gpu.probe_torch)
        self.ledger = Ledger(self.resources, price_per_hour=self.gpu.price_per_hour, labels=self.gpu.labels,
                             free_disk=lambda: free_disk_gb(jobs_dir))
        python = agent_env(self.broker_url())["FEDBUS_PYTHON"]
        if not self.job_user.can_run(python):
            self.log.warning("the job user cannot run this agent's Python; jobs that use $FEDBUS_PYTHON will "
                             "fail (install fedbus where that user can reach it, or choose --job-user)",
                             job_user=self.job_user.name, python=python)
        if self._address is None:
            self._address = outbound_address(self.broker_url())
        self._log = self.stores.event_log()
        await self._log.ensure(JobReport, JobLog)
        self._objects = await self.stores.object_store(workspace.BUCKET)
        if self.config.creds is not None:
            identities = await self.stores.key_value(IDENTITIES_BUCKET)
            self.scheduler_trust = IdentityTrust(self.keyring, identities, refresh_s=self.gpu.identity_refresh_s)
        else:
            self.scheduler_trust = PinnedTrust(
                self.keyring, await self.stores.key_value(KEYS_BUCKET),
                PinnedKeys(self.state_dir / "trusted_keys.json"), scheduler_id=self.gpu.scheduler_id,
                trusted_kids=self.trusted_kids)
        await self.scheduler_trust.learn(self.gpu.scheduler_id)
        bus = self.bus
        self._listen(await bus.subscribe(JobOffer, key=self.agent_id), self._on_offer, "offers")
        self._listen(await bus.subscribe(JobAward, key=self.agent_id), self._on_award, "awards")
        self._listen(await bus.subscribe(JobStop, key=self.agent_id), self._on_stop, "stops")
        self._listen(await bus.subscribe(JobReject, key=self.agent_id), self._on_reject, "rejects")

    async def on_drain(self) -> None:
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            self.log.info("waiting for running jobs", jobs=len(tasks))
            await asyncio.wait(tasks)  # not gather: the drain timeout must not cancel the jobs themselves

    async def on_stop(self) -> None:
        """The drain timed out: stop what still runs and report it lost (it will run elsewhere)."""
        running = [r for r in self._running.values() if r.task is not None]
        for r in running:
            r.abandoned, r.reason = True, "the agent is shutting down"
            r.stop.set()
        tasks = [r.task for r in running if r.task is not None]
        if tasks:
            self.log.warning("stopping jobs still running", jobs=len(tasks))
            await asyncio.wait(tasks, timeout=self.gpu.stop_grace_s + 5.0)

    def on_closed(self) -> None:
        self.work_root.release()

    def capacity(self) -> Capacity | None:
        return self.ledger.capacity(time.time()) if self.ledger is not None else None

    def held_jobs(self) -> list[JobRef]:
        return self.ledger.held() if self.ledger is not None else []

    def address(self) -> str:
        return self._address or ""

    # -- plumbing ---------------------------------------------------------------------------------------
    def _listen(self, sub: EventSubscription[Any], handler: Callable[[Delivery[Any]], Awaitable[None]],
                name: str) -> None:
        async def loop() -> None:
            async with sub:
                async for delivery in sub:
                    try:
                        await handler(delivery)
                    except Exception as exc:  # noqa: BLE001 - no message may stop the agent
                        self.metrics.inc("handler_errors_total")
                        self.log.warning("event not handled", subscription=name, source=delivery.source,
                                         error=_why(exc)[:500])

        self.spawn(loop(), name=name)

    async def _from_scheduler(self, delivery: Delivery[Any]) -> bool:
        if self.scheduler_trust is not None and await self.scheduler_trust.allows(delivery.envelope):
            return True
        self.metrics.inc("forged_total")
        self.log.warning("ignored: not signed by the scheduler", type=delivery.envelope.type,
                         source=delivery.source, kid=delivery.envelope.kid)
        return False

    async def _report(self, award: JobAward, phase: ReportPhase, *, exit_code: int | None = None,
                      reason: str = "") -> None:
        """A durable report; retried with the same envelope (deduplicated) while the broker is away."""
        assert self._log is not None
        env = self.bus.envelope(JobReport(job_id=award.job_id, attempt=award.attempt, agent_id=self.agent_id,
                                          node_rank=award.node_rank, phase=phase, exit_code=exit_code,
                                          reason=reason[:2000]))
        delay = 0.2
        for _ in range(12):
            try:
                await self._log.publish_envelope(env)
                return
            except FedbusError as exc:
                self.log.warning("report not stored yet; retrying", job_id=award.job_id, phase=phase.value,
                                 error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.log.error("report lost", job_id=award.job_id, attempt=award.attempt, phase=phase.value)

    async def _send(self, event: Event) -> None:
        await self.bus.publish(event)

    # -- contract net -----------------------------------------------------------------------------------
    async def _on_offer(self, d: Delivery[JobOffer]) -> None:
        offer = d.event
        assert self.ledger is not None
        self.metrics.inc("offers_total")
        now = time.time()
        if self.status is not AgentStatus.READY:
            problem: str | None = f"agent is {self.status.value}"
        elif self.scheduler_trust is None or (problem := await self.scheduler_trust.learn(d.source)):
            problem = problem or "not started"
        else:
            # An offer's deadline cannot pin resources for long, whatever it says.
            expires = min(max(offer.deadline_ns / 1e9, now), now + _MAX_BID_WINDOW_S) + self.gpu.reserve_s
            before = self.ledger.capacity(now, exclude=offer.job_id)
            held = self.ledger.reserve(offer.job_id, offer.needs, expires=expires, now=now, round=offer.round)
            if not isinstance(held, str):
                self.metrics.inc("bids_total")
                await self._send(JobBid(job_id=offer.job_id, round=offer.round, agent_id=self.agent_id,
                                        capacity=before, cost_per_hour=node_cost(offer.needs, before),
                                        address=self.address(), port=free_port()))
                return
            problem = held
        self.metrics.inc("refusals_total")
        await self._send(JobBid(job_id=offer.job_id, round=offer.round, agent_id=self.agent_id, ok=False,
                                reason=problem))

    async def _on_award(self, d: Delivery[JobAward]) -> None:
        award = d.event
        assert self.ledger is not None
        attempt = (award.job_id, award.attempt)
        if not await self._from_scheduler(d) or attempt in self._running:
            return
        try:
            validate_id(award.job_id, what="job id")  # it becomes a path and a subject token
        except ConfigError as exc:
            self.log.warning("award ignored", error=str(exc), source=d.source)
            return
        if self.awards.seen(d.envelope.id) or self.awards.accepted(*attempt):
            self.metrics.inc("replays_total")
            self.log.warning("award refused: seen or accepted before (a replay?)", job_id=award.job_id,
                             attempt=award.attempt, event_id=d.envelope.id)
            return
        late_s = (time.time_ns() - award.accept_by_ns) / 1e9
        if self.status is not AgentStatus.READY:
            held: Any = f"agent is {self.status.value}"
        elif late_s > self.gpu.clock_skew_s:
            self.metrics.inc("expired_total")
            held = f"award expired {late_s:.1f}s ago (accept_by_ns passed)"
        else:
            held = self.ledger.confirm(award.job_id, award.attempt, award.jobspec.computing, now=time.time())
        accepted = None if isinstance(held, str) else attempt
        await asyncio.to_thread(self.awards.record, d.envelope.id, accepted=accepted)  # before answering
        if isinstance(held, str):
            self.metrics.inc("declines_total")
            self.log.info("award declined", job_id=award.job_id, attempt=award.attempt, reason=held)
            await self._report(award, ReportPhase.DECLINED, reason=held)
            return
        self.metrics.inc("awards_total")
        running = self._running[attempt] = _Running(award)
        await self._report(award, ReportPhase.ACCEPTED)
        running.task = self.spawn(self._run(running, held.gpu_ids), name=f"job-{award.job_id}")
        await self.beat_now()

    async def _on_reject(self, d: Delivery[JobReject]) -> None:
        assert self.ledger is not None
        if await self._from_scheduler(d):
            self.ledger.unreserve(d.event.job_id, d.event.round)

    async def _on_stop(self, d: Delivery[JobStop]) -> None:
        stop = d.event
        assert self.ledger is not None
        if not await self._from_scheduler(d):
            return
        running = self._running.get((stop.job_id, stop.attempt))
        if running is not None:
            self.log.info("stopping job", job_id=stop.job_id, attempt=stop.attempt, reason=stop.reason)
            running.reason = stop.reason
            running.stop.set()
            return
        hold = self.ledger.get(stop.job_id)
        if hold is not None and hold.attempt in (None, stop.attempt):
            self.ledger.release(stop.job_id)

    # -- running ----------------------------------------------------------------------------------------
    async def _run(self, running: _Running, gpu_ids: tuple[int, ...]) -> None:
        award = running.award
        log = self.log.bind(job_id=award.job_id, attempt=award.attempt)
        assert self._log is not None
        workdir = self.work_root.job_dir(award.job_id, award.attempt)
        shipper = LogShipper(self._log.publish, job_id=award.job_id, attempt=award.attempt,
                             agent_id=self.agent_id, node_rank=award.node_rank)
        result = ExitResult(1, "the agent failed before the job started")
        log.info("job starting", node_rank=award.node_rank, nodes=award.nodes, gpus=list(gpu_ids))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(shipper.run())
                try:
                    await self._prepare(award, workdir)
                    launch = Launch(job_id=award.job_id, attempt=award.attempt, agent_id=self.agent_id,
                                    node_rank=award.node_rank, nodes=award.nodes,
                                    master_addr=award.master_addr, master_port=award.master_port,
                                    spec=award.jobspec, gpu_ids=gpu_ids, workdir=workdir)
                    result = await self.runner.run(
                        launch, shipper.line, stop=running.stop,
                        started=lambda: self._report(award, ReportPhase.RUNNING))
                    if running.stop.is_set():
                        result = ExitResult(result.code, f"stopped: {running.reason}")
                except Exception as exc:  # noqa: BLE001 - whatever a job brings ends the job, not the agent
                    result = ExitResult(1, _why(exc))
                finally:
                    why = f": {result.reason}" if result.reason else ""
                    shipper.line("system", award.node_rank, f"exited with {result.code}{why}")
                    shipper.close()
        except Exception as exc:  # noqa: BLE001 - the log shipper failed; the job's end is still reported
            log.error("job supervision failed", error=_why(exc))
        finally:
            if self.ledger is not None:
                self.ledger.release(award.job_id, award.attempt)
            self._running.pop((award.job_id, award.attempt), None)
            self.metrics.inc("jobs_exited_total")
            log.info("job ended", exit_code=result.code, reason=result.reason, log_lines=shipper.sent)
            if not self.gpu.keep_workdirs:
                await asyncio.to_thread(self.work_root.remove, workdir)
            await asyncio.shield(self._finish(award, result, lost=running.abandoned))

    async def _finish(self, award: JobAward, result: ExitResult, *, lost: bool) -> None:
        if lost:
            await self._report(award, ReportPhase.LOST, reason=result.reason)
        else:
            await self._report(award, ReportPhase.EXITED, exit_code=result.code, reason=result.reason)
        await self.beat_now()

    async def _prepare(self, award: JobAward, workdir: Path) -> None:
        """A fresh work dir holding the job's workspace, fetched and verified, owned by the job user."""
        await asyncio.to_thread(self.work_root.make_job_dir, award.job_id, award.attempt)
        name = award.jobspec.workspace
        if name:
            assert self._objects is not None
            archive = self.work_root.archive(award.job_id, award.attempt)
            try:
                await self._objects.get_file(name, archive)
                await workspace.unpack(archive, workdir)
            except NotFound:
                raise WorkspaceError(f"workspace {name!r} is not in the object store",
                                     job_id=award.job_id) from None
            except IntegrityError as exc:
                raise WorkspaceError(f"workspace {name!r} is corrupt: {exc}", job_id=award.job_id) from None
            finally:
                archive.unlink(missing_ok=True)
        await asyncio.to_thread(WorkRoot.hand_over, workdir, self.job_user)
