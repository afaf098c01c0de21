"""Run a whole federation in one process: the aggregator and N clients, each an agent with its own bus
connection, over an in-memory broker or a real one. This is ``fedbus fl run --simulate N``: the agents are
exactly the deployed ones (:class:`~fedbus.aggregator.server.Aggregator`,
:class:`~fedbus.aggregator.client.FlClient`),
only their transports share a process, so simulation and deployment never diverge.

On a secure broker each agent may log in with its own credential (:class:`SimulationOptions`
``aggregator_creds``/``client_creds``): each client is then known by its credential id and signs everything
with its key, and the aggregator checks client events against the identities registry
(:mod:`fedbus.aggregator.trust`), exactly as a deployment does. Without per-client credentials the process
holds every client key, and the aggregator trusts exactly those.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import transport_for
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials
from fedbus.bus.errors import BusError, ConfigError
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
from .trust import IdentityClients

__all__ = [
    "STATE_BUCKET", "WATCHED", "SimulationOptions", "client_id", "identity_clients", "open_object_store", "simulate",
    "watch",
]

STATE_BUCKET = "fl-state"
"""The aggregator's own object bucket: checkpoints, which name the sampled clients (``fl`` is every client's)."""

log = structlog.get_logger("fedbus.aggregator.federation")

WATCHED: tuple[type[Event], ...] = (RoundClose, GlobalModel, RunFinished)
"""What a run's progress is told by: round closes, global models and the final event."""


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
    aggregator_creds: Credentials | None = None
    """The aggregator's credential (role ``aggregator`` or ``admin``); default: ``FEDBUS_CREDS`` or the
    context's, as for any client."""
    client_creds: Sequence[Credentials] = ()
    """One credential per client (role ``fl-client``): client ``i`` is known by ``client_creds[i].id``, signs
    everything with its key and opens the ``fl`` bucket on its own connection; the aggregator then trusts
    only registered client identities. Needs ``server``."""


async def open_object_store(bus: Bus, *, fallback: Path | None, bucket: str = "fl") -> ObjectStore:
    """The broker's object store ``bucket`` for ``bus`` (JetStream, or the in-memory one), else a local
    directory under ``fallback``; with ``fallback=None`` (a secure broker, where a missing bucket means a
    missing grant, not a broker without JetStream) the broker's error is raised."""
    try:
        from fedbus.bus.stores import open_stores

        stores = await open_stores(bus)
        return await stores.object_store(bucket)
    except (ImportError, BusError) as exc:
        if fallback is None:
            raise
        log.info("no broker object store; using a local directory", reason=str(exc), path=str(fallback))
        return FileObjectStore(fallback, bucket)


async def identity_clients(bus: Bus) -> IdentityClients:
    """The secure mode's check of client events, reading the identities registry with ``bus``."""
    from fedbus.bus.stores import open_stores

    return IdentityClients(await (await open_stores(bus)).key_value(IDENTITIES_BUCKET))


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
    """Run the federation described by ``config``, one client per trainer; returns the aggregator's result.
    ``on_event`` sees every :data:`WATCHED` event the aggregator publishes, as it publishes it."""
    opts = options or SimulationOptions()
    s = config.settings
    secure = bool(opts.client_creds)
    if secure and len(opts.client_creds) != len(trainers):
        raise ConfigError(f"{len(opts.client_creds)} client credentials for {len(trainers)} clients",
                          key="client_creds")
    if secure and opts.server is None:
        raise ConfigError("client credentials need a broker: set server", key="server")
    broker = MemoryBroker() if opts.server is None else None

    def transport(agent: str, creds: Credentials | None = None) -> Transport:
        if broker is not None:
            return MemoryTransport(broker, client_id=agent)
        return transport_for(opts.server, client_id=agent, creds=creds)

    if secure:
        ids = [c.id for c in opts.client_creds]
        keys = [c.signing_key for c in opts.client_creds]
    else:
        ids = [client_id(i) for i in range(len(trainers))]
        keys = [AgentKey.generate() for _ in trainers]
    agg_creds = opts.aggregator_creds
    tap = None if on_event is None else _watched(on_event)
    with contextlib.ExitStack() as stack:
        state_dir = opts.state_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedbus-fl-"))
        )
        async with contextlib.AsyncExitStack() as buses:
            agg_id = agg_creds.id if agg_creds is not None else "aggregator"
            agg_bus = await buses.enter_async_context(
                Bus(transport(agg_id, agg_creds), source=agg_id, security=Security.OFF)
                if secure  # the aggregator checks every client event against the registry itself
                else Bus(transport(agg_id, agg_creds), source=agg_id,
                         keyring=KeyRing({k.kid: k.public_raw for k in keys}), security=opts.security)
            )
            fallback = None if secure else state_dir
            store = await open_object_store(agg_bus, fallback=fallback)
            state_store = await open_object_store(agg_bus, fallback=fallback, bucket=STATE_BUCKET)
            creds: Sequence[Credentials | None] = opts.client_creds or [None] * len(trainers)
            client_buses = [
                await buses.enter_async_context(
                    Bus(transport(cid, c), source=cid, key=key, sign_all=secure)
                )
                for cid, key, c in zip(ids, keys, creds, strict=True)
            ]
            # Secure: each client reads and writes the `fl` bucket with its own grants.
            client_stores = [await open_object_store(b, fallback=None) for b in client_buses] if secure else None
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
                clients=await identity_clients(agg_bus) if secure else None,
                on_event=tap,
                resume=opts.resume,
            )
            await aggregator.refuse_existing()  # before any client joins someone else's run
            clients = [
                FlClient(
                    b,
                    t,
                    run_id=s.run_id,
                    heartbeat_s=s.heartbeat_s,
                    store=client_stores[i] if client_stores is not None else store,
                    inline_limit=s.inline_limit,
                    faults=opts.faults.get(i),
                )
                for i, (b, t) in enumerate(zip(client_buses, trainers, strict=True))
            ]
            try:
                async with asyncio.TaskGroup() as tg:
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


def _watched(on_event: Callable[[Event], None]) -> Callable[[Event], None]:
    def tap(event: Event) -> None:
        if isinstance(event, WATCHED):
            on_event(event)

    return tap


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
