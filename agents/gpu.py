"""The GPU agent (``fedbus agent gpu``): bids on job offers it can honour and runs what it is awarded.

- Offers: an offer it can honour gets a bid and a reservation (until the award, a reject, or a timeout);
  one it cannot honour gets a refusal with the reason, so the scheduler can tell the user why.
- Awards must be signed by the scheduler's key (the bus runs in strict mode; the key comes from
  ``--trust`` files, or is pinned on first use from the ``agent-keys`` bucket). An award is accepted only
  for resources still free; the accept, the start and the exit are durable, signed :class:`JobReport`\\s.
- Running: workspace fetched from the object store (sha256-verified) and unpacked, then the runner
  (:mod:`fedbus.agents.executor`); output lines are batched into ``JobLog`` events. ``JobStop`` stops it.
- Draining (SIGTERM): no new bids; running jobs finish (up to ``drain_timeout_s``), then the agent exits.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedbus.bus.broker import free_port
from fedbus.bus.client import Delivery, EventSubscription
from fedbus.bus.connect import resolve_url
from fedbus.bus.errors import FedbusError, IntegrityError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.signing import key_id
from fedbus.bus.stores import EventLog, KeyValue, ObjectStore
from fedbus.bus.transport import Transport

from . import workspace
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
from .ledger import Ledger
from .logship import LogShipper
from .placement import node_cost
from .resources import DeclaredResources, Resources, detect_resources, free_disk_gb
from .runtime import Agent, AgentStatus, RuntimeConfig
from .trust import KEYS_BUCKET, PinnedKeys, fetch_key

__all__ = ["GpuAgent", "GpuAgentConfig"]


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


@dataclass(slots=True)
class _Running:
    award: JobAward
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    abandoned: bool = False
    """Stopped because the agent is shutting down: reported ``lost``, so the scheduler runs it elsewhere."""
    task: asyncio.Task[None] | None = None


def _outbound_address(server: str) -> str:
    """The local address that routes to the broker (so other nodes can reach us as the broker does)."""
    host = urlsplit(server.split(",")[0]).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class GpuAgent(Agent):
    """A node that runs jobs; see the module docstring."""

    kind = "gpu"

    def __init__(self, config: RuntimeConfig, gpu: GpuAgentConfig | None = None, *,
                 transport: Transport | None = None, runner: Runner | None = None,
                 resources: Resources | None = None) -> None:
        super().__init__(config, transport=transport)
        self.gpu = gpu or GpuAgentConfig()
        self.pid_dir = self.state_dir / "pids"
        self.runner: Runner = runner or SubprocessRunner(grace_s=self.gpu.stop_grace_s, pid_dir=self.pid_dir,
                                                         env=agent_env(resolve_url(config.server)))
        self.resources = resources
        self.ledger: Ledger | None = None
        self.jobs_dir = self.state_dir / "jobs"
        self._running: dict[tuple[str, int], _Running] = {}
        self._pins = PinnedKeys(self.state_dir / "trusted_keys.json")
        self._scheduler_kids: set[str] = set()
        self._address = self.gpu.address
        self._log: EventLog | None = None
        self._keys: KeyValue | None = None
        self._objects: ObjectStore | None = None
        for name, help_ in (
            ("offers_total", "offers received"), ("bids_total", "bids sent"),
            ("refusals_total", "offers refused"), ("awards_total", "awards accepted"),
            ("declines_total", "awards declined"), ("jobs_exited_total", "job attempts ended"),
            ("forged_total", "awards or stops ignored: signed by a trusted key that is not the scheduler's"),
        ):
            self.metrics.counter(name, help_)

    # -- runtime hooks ----------------------------------------------------------------------------------
    async def on_start(self) -> None:
        # Nothing survives a restart: jobs that a killed predecessor ran are gone for the scheduler.
        reaped = await asyncio.to_thread(reap_orphans, self.pid_dir)
        if self.jobs_dir.exists():
            await asyncio.to_thread(shutil.rmtree, self.jobs_dir, True)
        if reaped:
            self.log.warning("reaped jobs of the previous run", process_groups=reaped)
        if self.resources is None:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self.resources = await asyncio.to_thread(
                detect_resources, self.gpu.declared, work_dir=self.jobs_dir, probe_torch=self.gpu.probe_torch)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        jobs_dir = self.jobs_dir
        self.ledger = Ledger(self.resources, price_per_hour=self.gpu.price_per_hour, labels=self.gpu.labels,
                             free_disk=lambda: free_disk_gb(jobs_dir))
        if self._address is None:
            self._address = _outbound_address(resolve_url(self.config.server))
        self._log = self.stores.event_log()
        await self._log.ensure(JobReport, JobLog)
        self._keys = await self.stores.key_value(KEYS_BUCKET)
        self._objects = await self.stores.object_store(workspace.BUCKET)
        await self._trust_scheduler()
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
                    except FedbusError as exc:
                        self.log.warning("event not handled", subscription=name, error=str(exc))

        self.spawn(loop(), name=name)

    async def _trust_scheduler(self) -> bool:
        """Make sure the scheduler's key is trusted: from ``--trust`` files, the pin, or first use."""
        if self._scheduler_kids:
            return True
        sid = self.gpu.scheduler_id
        if self.config.trust:  # an operator said exactly whom to trust
            self._scheduler_kids = set(self.trusted_kids)
            return bool(self._scheduler_kids)
        pinned = self._pins.get(sid)
        assert self._keys is not None
        registered = await fetch_key(self._keys, sid)
        if pinned is not None:
            if registered is not None and registered != pinned:
                self.log.error("the scheduler's registered key differs from the pinned one; awards signed by "
                               "it are ignored (delete trusted_keys.json in the state dir to re-pin)",
                               pinned=key_id(pinned), registered=key_id(registered))
            raw = pinned
        elif registered is not None:
            self._pins.pin(sid, registered)
            self.log.warning("trusting the scheduler's key on first use; pin it with --trust for production",
                             scheduler=sid, kid=key_id(registered))
            raw = registered
        else:
            return False
        self.keyring.trust(raw)
        self._scheduler_kids = {key_id(raw)}
        return True

    def _from_scheduler(self, delivery: Delivery[Any]) -> bool:
        if delivery.envelope.kid in self._scheduler_kids:
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
        elif not await self._trust_scheduler():
            problem = f"no key registered for scheduler {self.gpu.scheduler_id!r} yet"
        else:
            expires = max(offer.deadline_ns / 1e9, now) + self.gpu.reserve_s
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
        if not self._from_scheduler(d) or (award.job_id, award.attempt) in self._running:
            return
        if self.status is not AgentStatus.READY:
            held: Any = f"agent is {self.status.value}"
        else:
            held = self.ledger.confirm(award.job_id, award.attempt, award.jobspec.computing, now=time.time())
        if isinstance(held, str):
            self.metrics.inc("declines_total")
            self.log.info("award declined", job_id=award.job_id, attempt=award.attempt, reason=held)
            await self._report(award, ReportPhase.DECLINED, reason=held)
            return
        self.metrics.inc("awards_total")
        running = self._running[(award.job_id, award.attempt)] = _Running(award)
        await self._report(award, ReportPhase.ACCEPTED)
        running.task = self.spawn(self._run(running, held.gpu_ids), name=f"job-{award.job_id}")
        await self.beat_now()

    async def _on_reject(self, d: Delivery[JobReject]) -> None:
        assert self.ledger is not None
        if self._from_scheduler(d):
            self.ledger.unreserve(d.event.job_id, d.event.round)

    async def _on_stop(self, d: Delivery[JobStop]) -> None:
        stop = d.event
        assert self.ledger is not None
        if not self._from_scheduler(d):
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
        workdir = self.jobs_dir / f"{award.job_id}-{award.attempt}"
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
                except FedbusError as exc:
                    result = ExitResult(1, str(exc))
                finally:
                    why = f": {result.reason}" if result.reason else ""
                    shipper.line("system", award.node_rank, f"exited with {result.code}{why}")
                    shipper.close()
        finally:
            if self.ledger is not None:
                self.ledger.release(award.job_id, award.attempt)
            self._running.pop((award.job_id, award.attempt), None)
            self.metrics.inc("jobs_exited_total")
            log.info("job ended", exit_code=result.code, reason=result.reason, log_lines=shipper.sent)
            if not self.gpu.keep_workdirs:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
            await asyncio.shield(self._finish(award, result, lost=running.abandoned))

    async def _finish(self, award: JobAward, result: ExitResult, *, lost: bool) -> None:
        if lost:
            await self._report(award, ReportPhase.LOST, reason=result.reason)
        else:
            await self._report(award, ReportPhase.EXITED, exit_code=result.code, reason=result.reason)
        await self.beat_now()

    async def _prepare(self, award: JobAward, workdir: Path) -> None:
        """A fresh work dir holding the job's workspace, fetched and verified."""
        workdir.mkdir(parents=True, exist_ok=True)
        name = award.jobspec.workspace
        if not name:
            return
        assert self._objects is not None
        archive = workdir.parent / f".{workdir.name}.tar.gz"
        try:
            await self._objects.get_file(name, archive)
        except NotFound:
            raise WorkspaceError(f"workspace {name!r} is not in the object store",
                                 job_id=award.job_id) from None
        except IntegrityError as exc:
            raise WorkspaceError(f"workspace {name!r} is corrupt: {exc}", job_id=award.job_id) from None
        try:
            await workspace.unpack(archive, workdir)
        finally:
            archive.unlink(missing_ok=True)
