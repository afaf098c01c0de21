"""Run a whole federation in one process: the aggregator and N clients, each an agent with its own bus
connection, over an in-memory broker or a real one. This is ``fedbus fl run --simulate N``: the agents are
exactly the deployed ones (:class:`~fedbus.aggregator.server.Aggregator`,
:class:`~fedbus.aggregator.client.FlClient`),
only their transports share a process, so simulation and deployment never diverge.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.errors import BusError
from fedbus.bus.events import Event
from fedbus.bus.memory import MemoryBroker, MemoryTransport
from fedbus.bus.signing import AgentKey, KeyRing
from fedbus.bus.stores import ObjectStore
from fedbus.bus.transport import Transport

from .client import ClientFaults, FlClient, LocalTrainer
from .config import FlConfig
from .errors import FlError
from .events import GlobalModel, RoundClose, RunFinished
from .filestore import FileObjectStore
from .inbox import Inbox
from .server import Aggregator, RunResult

__all__ = ["STATE_BUCKET", "SimulationOptions", "client_id", "open_object_store", "simulate", "watch"]

STATE_BUCKET = "fl-state"
"""The aggregator's own object bucket: checkpoints, which name the sampled clients (``fl`` is every client's)."""

log = structlog.get_logger("fedbus.aggregator.federation")


def client_id(index: int) -> str:
    """The agent id of simulated client ``index``."""
    return f"client-{index:04d}"


@dataclass(frozen=True, kw_only=True)
class SimulationOptions:
    """Where and how a simulated federation runs."""

    server: str | None = None
    """Broker URL (``nats://…``); ``None`` runs on an in-memory broker."""
    state_dir: Path | None = None
    """Where the aggregator keeps checkpoints and lineage when the broker has no object store."""
    faults: Mapping[int, ClientFaults] = field(default_factory=dict)
    """Fault injection per client index."""
    security: Security = Security.STRICT
    """The aggregator's check of signed events (updates must be signed by a client key it trusts)."""
    resume: bool = True
    """Continue a run whose id already has state; ``False`` refuses it (:class:`RunExists`) before any
    client starts."""


async def open_object_store(bus: Bus, *, fallback: Path, bucket: str = "fl") -> ObjectStore:
    """The broker's object store for ``bus`` (JetStream, or the in-memory one), else a local directory."""
    try:
        from fedbus.bus.stores import open_stores

        stores = await open_stores(bus)
        return await stores.object_store(bucket)
    except (ImportError, BusError) as exc:
        log.info("no broker object store; using a local directory", reason=str(exc), path=str(fallback))
        return FileObjectStore(fallback, bucket)


async def watch(
    bus: Bus, run_id: str, on_event: Callable[[Event], None], *, ready: asyncio.Event | None = None
) -> None:
    """Call ``on_event`` with every round close, global model and the final event of a run, until it ends;
    ``ready`` is set once subscribed."""
    async with Inbox(bus) as inbox:
        for cls in (RoundClose, GlobalModel, RunFinished):
            await inbox.add(cls, key=run_id)
        await bus.transport.flush()
        if ready is not None:
            ready.set()
        while True:
            delivery = await inbox.next()
            if delivery is None:
                continue
            on_event(delivery.event)
            if isinstance(delivery.event, RunFinished):
                return


async def simulate(
    config: FlConfig,
    trainers: list[LocalTrainer],
    initial: npt.NDArray[np.float32],
    *,
    options: SimulationOptions | None = None,
    evaluate_fn: Callable[[npt.NDArray[np.float32]], Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> RunResult:
    """Run the federation described by ``config``, one client per trainer; returns the aggregator's result."""
    opts = options or SimulationOptions()
    s = config.settings
    broker = MemoryBroker() if opts.server is None else None

    def transport(agent: str) -> Transport:
        if broker is not None:
            return MemoryTransport(broker, client_id=agent)
        return transport_for(opts.server, client_id=agent)

    keys = [AgentKey.generate() for _ in trainers]
    keyring = KeyRing({k.kid: k.public_raw for k in keys})
    with contextlib.ExitStack() as stack:
        state_dir = opts.state_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedbus-fl-"))
        )
        async with contextlib.AsyncExitStack() as buses:
            agg_bus = await buses.enter_async_context(
                Bus(transport("aggregator"), source="aggregator", keyring=keyring, security=opts.security)
            )
            store = await open_object_store(agg_bus, fallback=state_dir)
            state_store = await open_object_store(agg_bus, fallback=state_dir, bucket=STATE_BUCKET)
            client_buses = [
                await buses.enter_async_context(
                    Bus(transport(client_id(i)), source=client_id(i), key=keys[i])
                )
                for i in range(len(trainers))
            ]
            watcher_bus = None
            if on_event is not None:
                watcher_bus = await buses.enter_async_context(Bus(transport("fl-watch"), source="fl-watch"))
            aggregator = Aggregator(
                agg_bus,
                settings=s,
                strategy=config.build_strategy(len(trainers)),
                initial_model=initial,
                store=store,
                state_store=state_store,
                client_config=config.client_config(),
                secure=config.secure,
                evaluate_fn=evaluate_fn,
                resume=opts.resume,
            )
            await aggregator.refuse_existing()  # before any client joins someone else's run
            clients = [
                FlClient(
                    b,
                    t,
                    run_id=s.run_id,
                    heartbeat_s=s.heartbeat_s,
                    store=store,
                    inline_limit=s.inline_limit,
                    faults=opts.faults.get(i),
                )
                for i, (b, t) in enumerate(zip(client_buses, trainers, strict=True))
            ]
            try:
                async with asyncio.TaskGroup() as tg:
                    if watcher_bus is not None and on_event is not None:
                        ready = asyncio.Event()
                        tg.create_task(watch(watcher_bus, s.run_id, on_event, ready=ready), name="watch")
                        await ready.wait()
                    for c in clients:
                        tg.create_task(c.run(), name=f"client:{c.client_id}")
                    result = await aggregator.run()
            except BaseExceptionGroup as group:  # the aggregator's own error, not the group around it
                errors = _leaves(group)
                first = next((e for e in errors if isinstance(e, FlError)), None)
                if first is not None:
                    raise first from None
                raise
            return result


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
