"""The small base every fedbus daemon is built on: identity, lifecycle, heartbeats, health and metrics.

::

    class MyAgent(Agent):
        kind = "my"

        async def on_start(self) -> None:          # subscribe, spawn loops with self.spawn(...)
            ...

        async def on_drain(self) -> None:          # SIGTERM: finish in-flight work
            ...

    await MyAgent(RuntimeConfig(server=url, state_dir=path)).run()   # until SIGTERM/SIGINT, then exit 0

- One owner: the agent holds an exclusive lock on its state dir (``0700``) for its life; a second agent
  on the same dir is refused, naming the PID that holds it (:mod:`fedbus.agents.statedir`).
- Identity with credentials (``creds``): the agent id is the credential's id and its signing key the
  credential's; the registry of identities (written by admin alone) is where others learn that key.
- Identity without credentials (insecure mode): the agent id (``<hostname>-<6 hex>`` unless given) and an
  Ed25519 key are created on first start in the state dir and reused after; the public key is registered
  under the id in the ``agent-keys`` bucket, first come first served (see :mod:`fedbus.agents.trust`).
  Either way the public key is written to ``public_key.json`` (the file other nodes pass to ``--trust``).
- Lifecycle: ``starting → ready → draining → stopped`` (:class:`AgentStatus`); ``close`` is idempotent.
  Every loop is a task of the agent's ``asyncio.TaskGroup``; nothing runs after ``close`` returns.
- Heartbeats: every ``heartbeat_s`` an :class:`~fedbus.agents.events.AgentHeartbeat` with live capacity and
  held jobs, also written to the ``agents`` bucket (with a TTL), which ``fedbus agents`` lists.
- Health: ``GET /healthz`` (JSON; 503 unless ready) and ``GET /metrics`` (Prometheus text) over aiohttp.
- Reconnects are the transport's job: publishes are buffered while the broker is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import msgspec
import structlog
from aiohttp import web

from fedbus.bus.client import Bus, Security
from fedbus.bus.codec import new_id
from fedbus.bus.connect import resolve_url, transport_for
from fedbus.bus.creds import Credentials
from fedbus.bus.errors import ConfigError, FedbusError
from fedbus.bus.signing import AgentKey, KeyRing
from fedbus.bus.stores import KeyValue, Stores, open_stores
from fedbus.bus.transport import Transport

from .events import AgentHeartbeat, Capacity, JobRef
from .metrics import Metrics
from .statedir import StateLock, load_identity, private_dir
from .trust import KEYS_BUCKET, load_trust_file, register_key

__all__ = ["LIVENESS_BUCKET", "Agent", "AgentStatus", "RuntimeConfig", "configure_daemon_logging"]

LIVENESS_BUCKET = "agents"


class AgentStatus(enum.StrEnum):
    """Where an agent is in its life; sent in every heartbeat."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeConfig:
    """What every agent needs; agent kinds add their own config beside it."""

    server: str | None = None
    """Broker URL; ``FEDBUS_SERVER`` or ``nats://127.0.0.1:4222`` when unset."""
    state_dir: Path = Path("~/.fedbus/agent")
    """Identity, key and records; one live agent per state dir (a lock)."""
    agent_id: str | None = None
    """Chosen on first start (``<hostname>-<6 hex>``) and remembered in the state dir when unset; with
    ``creds``, the credential's id (a different ``agent_id`` is an error)."""
    creds: Credentials | None = None
    """Secure mode: log in, sign and be known as this credential (no key file, no ``agent-keys`` entry)."""
    heartbeat_s: float = 2.0
    health_host: str = "127.0.0.1"
    health_port: int | None = 0
    """0 picks a free port; ``None`` turns the health endpoint off."""
    drain_timeout_s: float = 300.0
    security: Security = Security.STRICT
    trust: tuple[Path, ...] = ()
    """Trusted-keys files (``KeyRing`` JSON); when given, the only keys trusted besides the agent's own."""
    liveness_ttl_s: float | None = None
    """TTL of the entry in the ``agents`` bucket (default: 3 heartbeats); 0 disables the entry."""


def configure_daemon_logging(*, json_logs: bool | None = None, level: str | None = None) -> None:
    """Structured logs on stderr: JSON lines for daemons (the default unless stderr is a terminal)."""
    json_logs = (not sys.stderr.isatty()) if json_logs is None else json_logs
    name = (level or os.environ.get("FEDBUS_LOG_LEVEL") or "info").upper()
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(name)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class Agent:
    """Base of every daemon; see the module docstring. Subclasses set :attr:`kind` and override the hooks."""

    kind: ClassVar[str] = "agent"

    def __init__(self, config: RuntimeConfig, *, transport: Transport | None = None) -> None:
        self.config = config
        self.state_dir = private_dir(Path(config.state_dir).expanduser())
        self._lock = StateLock(self.state_dir).acquire()
        try:
            self.agent_id, self.key = self._identity(config)
        except BaseException:
            self._lock.release()
            raise
        public = KeyRing()
        public.trust(self.key.public_raw)
        public.dump(self.state_dir / "public_key.json")  # what other nodes pass to --trust
        self.instance = new_id()
        self.keyring = KeyRing()
        self.trusted_kids: list[str] = []
        """Key ids from the ``trust`` files."""
        for path in config.trust:
            self.trusted_kids += load_trust_file(self.keyring, Path(path).expanduser())
        self.status = AgentStatus.STARTING
        self.metrics = Metrics(const_labels={"agent_id": self.agent_id, "kind": self.kind})
        self.metrics.counter("heartbeats_total", "heartbeats published")
        self.metrics.gauge("up", "1 while the agent is ready")
        self.log = structlog.get_logger(f"fedbus.agents.{self.kind}").bind(agent_id=self.agent_id)
        self.health_url: str | None = None
        self._transport = transport
        self._bus: Bus | None = None
        self._stores: Stores | None = None
        self._liveness: KeyValue | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._beat_soon = asyncio.Event()
        self.beat_gap_s = 0.05
        self._closed = False
        self._seq = 0
        self._started = time.time()

    def _identity(self, config: RuntimeConfig) -> tuple[str, AgentKey]:
        creds = config.creds
        if creds is None:
            return (load_identity(self.state_dir, config.agent_id),
                    AgentKey.load_or_create(self.state_dir / "agent.key"))
        source = str(creds.path) if creds.path else None
        if creds.expired():
            raise ConfigError(f"credential {creds.id!r} has expired", key="creds", source=source)
        if config.agent_id and config.agent_id != creds.id:
            raise ConfigError(f"agent id {config.agent_id!r} differs from the credential's id {creds.id!r}",
                              key="agent_id", source=source)
        return load_identity(self.state_dir, creds.id), creds.signing_key

    # -- hooks for subclasses ---------------------------------------------------------------------------
    async def on_start(self) -> None:
        """Subscribe and spawn loops (the bus and stores are ready)."""

    async def on_drain(self) -> None:
        """Finish in-flight work; called once, before the agent stops. It is cancelled after
        ``drain_timeout_s``: wait with ``asyncio.wait`` (``gather`` would cancel the work too), then
        :meth:`on_stop` deals with what is left."""

    async def on_stop(self) -> None:
        """Last chance to clean up (after draining or when the drain timed out)."""

    def on_closed(self) -> None:
        """Everything has stopped (also after a failed start): release what the agent holds."""

    def capacity(self) -> Capacity | None:
        """Live capacity for the heartbeat (``None``: this agent runs no jobs)."""
        return None

    def held_jobs(self) -> list[JobRef]:
        """The job attempts this agent holds, for the heartbeat."""
        return []

    def address(self) -> str:
        """Where other nodes reach this one (used as MASTER_ADDR)."""
        return ""

    def broker_url(self) -> str:
        """The broker this agent connects to: the configured one, else its credential's, else the default."""
        creds = self.config.creds
        return resolve_url(self.config.server or (creds.servers.get("nats") if creds else None))

    # -- properties -------------------------------------------------------------------------------------
    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise FedbusError(f"agent {self.agent_id} is not started")
        return self._bus

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            raise FedbusError(f"agent {self.agent_id} is not started")
        return self._stores

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> Self:
        """Connect, register the key, serve health, call :meth:`on_start`, start heartbeating."""
        self._lock.acquire()  # again, if an earlier start or close released it
        stack = self._stack = AsyncExitStack()
        creds = self.config.creds
        try:
            transport = self._transport or transport_for(self.broker_url(), client_id=self.agent_id,
                                                         creds=creds)
            self._bus = await stack.enter_async_context(Bus(
                transport, source=self.agent_id, key=self.key, keyring=self.keyring,
                security=self.config.security))
            self._stores = await open_stores(self._bus)
            if creds is None:  # insecure mode: first come, first served
                await register_key(await self._stores.key_value(KEYS_BUCKET), self.agent_id, self.key)
            ttl = self.config.liveness_ttl_s
            ttl = 3 * self.config.heartbeat_s if ttl is None else ttl
            if ttl:
                self._liveness = await self._stores.key_value(LIVENESS_BUCKET, ttl=ttl)
            if self.config.health_port is not None:
                await self._serve_health(stack)
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            await self.on_start()
            self.status = AgentStatus.READY
            self.metrics.set("up", 1)
            self.spawn(self._heartbeat_loop(), name="heartbeat")
        except BaseException:
            await self._unwind()
            raise
        self.log.info("agent started", kind=self.kind, health=self.health_url, kid=self.key.kid,
                      server=self.bus.transport.url)
        return self

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the agent's TaskGroup; it is cancelled when the agent stops."""
        if self._tg is None:
            coro.close()
            raise FedbusError(f"agent {self.agent_id} is not started")
        task = self._tg.create_task(coro, name=f"{self.agent_id}:{name}")
        self._tasks.append(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def close(self) -> None:
        """Drain in-flight work, announce ``stopped``, stop every task, disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.status in (AgentStatus.READY, AgentStatus.BUSY):
            self.status = AgentStatus.DRAINING
            self.log.info("draining")
            await self._beat()
            try:
                async with asyncio.timeout(self.config.drain_timeout_s):
                    await self.on_drain()
            except TimeoutError:
                self.log.warning("drain timed out", timeout_s=self.config.drain_timeout_s)
            await asyncio.shield(self.on_stop())
            self.status = AgentStatus.STOPPED
            self.metrics.set("up", 0)
            await self._beat()
        await self._unwind()
        self.log.info("agent stopped")

    async def _unwind(self) -> None:
        # Cancel until done: a cancellation can be lost inside a library's wait_for (Python 3.11), and a
        # TaskGroup would then wait for that task forever.
        for _ in range(100):
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self.status = AgentStatus.STOPPED
            self.on_closed()
            self._lock.release()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def request_stop(self) -> None:
        """Ask :meth:`run` to drain and return (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), drain, stop."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        refusal: FedbusError | None = None
        try:
            async with self:
                refused = getattr(self.bus.transport, "refused", None)  # NatsTransport: credentials revoked
                waits = {asyncio.ensure_future(self._stop.wait())}
                if isinstance(refused, asyncio.Event):
                    waits.add(asyncio.ensure_future(refused.wait()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
                if self._stop.is_set():
                    self.log.info("stop requested")
                else:
                    refusal = getattr(self.bus.transport, "refusal", None)
                    self.log.error("the broker refused this agent's credentials; stopping", error=str(refusal))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        if refusal is not None:
            raise refusal

    # -- heartbeats -------------------------------------------------------------------------------------
    def heartbeat(self) -> AgentHeartbeat:
        """The heartbeat this agent would send now."""
        self._seq += 1
        return AgentHeartbeat(agent_id=self.agent_id, kind=self.kind, status=self.status.value,
                              instance=self.instance, seq=self._seq, interval_s=self.config.heartbeat_s,
                              address=self.address(), capacity=self.capacity(), jobs=self.held_jobs())

    async def _beat(self) -> None:
        if self._bus is None:
            return
        hb = self.heartbeat()
        try:
            await self._bus.publish(hb)
            self.metrics.inc("heartbeats_total")
            if self._liveness is not None:
                if hb.status == AgentStatus.STOPPED:
                    await self._liveness.delete(self.agent_id)
                else:
                    await self._liveness.put(self.agent_id, msgspec.msgpack.encode(hb))
        except FedbusError as exc:
            self.log.warning("heartbeat not published", error=str(exc))

    async def beat_now(self) -> None:
        """Ask for a heartbeat soon (capacity changed), besides the periodic ones; requests made within
        ``beat_gap_s`` of each other share one heartbeat."""
        self._beat_soon.set()

    async def _heartbeat_loop(self) -> None:
        gap = min(self.beat_gap_s, self.config.heartbeat_s)
        while True:
            self._beat_soon.clear()
            await self._beat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._beat_soon.wait()
            await asyncio.sleep(gap)

    # -- health -----------------------------------------------------------------------------------------
    async def _serve_health(self, stack: AsyncExitStack) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.health_host, self.config.health_port or 0)
        await site.start()
        server = site._server  # the only way to read the port picked for port 0
        port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else 0
        self.health_url = f"http://{self.config.health_host}:{port}"

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self.status in (AgentStatus.READY, AgentStatus.BUSY)
        body = {"agent_id": self.agent_id, "kind": self.kind, "status": self.status.value,
                "uptime_s": round(time.time() - self._started, 3), "instance": self.instance}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.collect_metrics()
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type": "text/plain; version=0.0.4"})

    def collect_metrics(self) -> None:
        """Refresh gauges before ``/metrics`` is served."""
        self.metrics.set("bus_rejected", sum(self.bus.rejected.values()) if self._bus else 0)
