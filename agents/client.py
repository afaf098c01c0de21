"""What ``fedbus launch``, ``jobs``, ``job``, ``logs``, ``cancel`` and ``agents`` do, as an async API.

::

    async with LaunchClient("nats://127.0.0.1:4222", creds=load_creds()) as client:
        job_id = await client.submit(load_jobspec("job.yaml"))
        record = await client.follow(job_id, on_status=print, on_log=print)
        print(record.state, record.exit_code)

Job records are read from the ``jobs`` bucket the scheduler writes, live agents from the ``agents`` bucket
their heartbeats refresh, logs from the durable ``jobs`` stream; none of it needs the scheduler to answer.

A submission first *claims* its job id in the ``jobs`` bucket (compare-and-set create, see
:mod:`fedbus.agents.records`): an id that is taken raises :class:`~fedbus.agents.errors.JobError` before the
workspace is uploaded, so the first job's record and workspace are never touched. With credentials, submits
and cancels are signed with the credential's key and name its id (``submitted_by``, ``cancelled_by``), which
a secure scheduler checks against the identities registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Self

import msgspec

from fedbus.bus.client import Bus, Security
from fedbus.bus.codec import Envelope, new_id
from fedbus.bus.connect import resolve, transport_for
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials, Identity, fetch_identity
from fedbus.bus.errors import Conflict, FedbusError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.roles import Role, validate_id
from fedbus.bus.signing import KeyRing
from fedbus.bus.stores import EventLog, KeyValue, ObjectStore, Stores, open_stores
from fedbus.bus.transport import Transport

from . import workspace
from .errors import JobError, UnknownJob
from .events import AgentHeartbeat, JobCancel, JobLog, JobState, JobStatus, JobSubmit
from .jobspec import JobSpec, LoadedJob
from .records import JOBS_BUCKET, claim_record, decode_record, encode_record
from .runtime import LIVENESS_BUCKET
from .scheduling import JobRecord
from .trust import KEYS_BUCKET, fetch_key

__all__ = ["LaunchClient", "exit_code_of", "new_job_id"]

_HEARTBEAT = msgspec.msgpack.Decoder(AgentHeartbeat)


_BASE32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's: no i, l, o, u
JOB_ID_RANDOM_BITS = 128


def new_job_id(name: str) -> str:
    """``<name>-<26 characters>``: readable, and unique: the characters carry 128 random bits (a collision
    is as likely as guessing a UUID), and the whole is a valid :data:`~fedbus.bus.roles.Id`."""
    value = int.from_bytes(os.urandom(JOB_ID_RANDOM_BITS // 8), "big")
    tail = "".join(_BASE32[(value >> shift) & 31] for shift in range(125, -1, -5))
    return f"{name[:37]}-{tail}"


def exit_code_of(record: JobRecord) -> int:
    """The exit code ``fedbus launch --follow`` ends with: the job's own, 1 when it has none, 0 on success."""
    if record.state is JobState.SUCCEEDED:
        return 0
    if record.exit_code:
        return min(max(record.exit_code, 1), 255)
    return 1


async def scheduler_identities(identities: KeyValue) -> list[Identity]:
    """Every scheduler the authority registered (their keys sign job statuses)."""
    found = []
    for ident in await identities.keys():
        identity = await fetch_identity(identities, ident)
        if identity is not None and identity.role is Role.SCHEDULER:
            found.append(identity)
    return found


class LaunchClient:
    """A short-lived client of the Launch system (one per command). ``creds`` (default: ``FEDBUS_CREDS``'s)
    signs submits and cancels."""

    def __init__(self, server: str | None = None, *, transport: Transport | None = None,
                 source: str | None = None, scheduler_id: str = "scheduler",
                 creds: Credentials | None = None) -> None:
        # The server and credential: given, FEDBUS_SERVER/FEDBUS_CREDS, or the context `fedbus up` saved.
        self.server, self.creds = (server or "memory://", creds) if transport is not None else resolve(server, creds)
        self.source = source or (self.creds.id if self.creds is not None else
                                 f"cli-{os.getpid()}-{new_id()[-6:].lower()}")
        self.scheduler_id = scheduler_id
        self._transport = transport or transport_for(self.server, client_id=f"{self.source}-{os.getpid()}",
                                                     creds=self.creds)
        self.keyring = KeyRing()
        self.bus = Bus(self._transport, source=self.source, keyring=self.keyring, security=Security.VERIFY)
        self._stores: Stores | None = None
        self._jobs: KeyValue | None = None
        self._log: EventLog | None = None

    async def __aenter__(self) -> Self:
        await self.bus.connect()
        try:
            self._stores = await open_stores(self.bus)
            self._jobs = await self._stores.key_value(JOBS_BUCKET)
            self._log = self._stores.event_log()
            await self._log.ensure(JobSubmit, JobCancel, JobStatus, JobLog)
            raw = await fetch_key(await self._stores.key_value(KEYS_BUCKET), self.scheduler_id)
            if raw is not None:
                self.keyring.trust(raw)
            if self.creds is not None:  # secure mode: schedulers are who the authority says they are
                for identity in await scheduler_identities(await self._stores.key_value(IDENTITIES_BUCKET)):
                    self.keyring.trust(identity.public_key)
        except BaseException:
            await self.bus.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.bus.close()

    @property
    def stores(self) -> Stores:
        assert self._stores is not None, "use `async with LaunchClient(...)`"
        return self._stores

    # -- submitting -------------------------------------------------------------------------------------
    def _envelope(self, event: Event) -> Envelope:
        """The envelope of a submit or cancel: signed with the credential's key when there is one."""
        env = self.bus.envelope(event)
        if self.creds is not None:
            self.creds.signing_key.sign(env)
        return env

    async def submit(self, job: LoadedJob | JobSpec, *, job_id: str | None = None) -> str:
        """Claim the job id, pack and upload the workspace folder (if any), then submit; returns the job id.

        Raises :class:`JobError` when the id is taken (nothing of the first job is touched). A bare
        :class:`JobSpec` is submitted as it is (its ``workspace``, if set, must be the job's own archive)."""
        assert self._log is not None and self._jobs is not None
        spec = job.spec if isinstance(job, LoadedJob) else job
        folder = job.workspace_dir if isinstance(job, LoadedJob) else None
        job_id = validate_id(job_id, what="job id") if job_id else new_job_id(spec.name)
        if folder is not None:
            spec = msgspec.structs.replace(spec, workspace=workspace.object_name(job_id))
        by = self.creds.id if self.creds is not None else None
        env = self._envelope(JobSubmit(job_id=job_id, jobspec=spec, submitted_by=by))
        claim = claim_record(job_id, spec, submit_id=env.id, submitted_by=by or self.source, now=time.time())
        try:
            await self._jobs.create(job_id, encode_record(claim))
        except Conflict:
            raise JobError("job id already exists; choose another (or let fedbus pick one)", job_id=job_id) from None
        try:
            if folder is not None:
                objects: ObjectStore = await self.stores.object_store(workspace.BUCKET)
                archive = await workspace.pack(folder)
                try:
                    await objects.put_file(workspace.object_name(job_id), archive)
                finally:
                    archive.unlink(missing_ok=True)
            await self._log.publish_envelope(env)
        except BaseException:
            with contextlib.suppress(FedbusError):  # give the id back: nothing was submitted
                await asyncio.shield(self._jobs.delete(job_id))
            raise
        return job_id

    async def cancel(self, job_id: str, *, reason: str = "cancelled by user") -> str:
        """Ask the scheduler to cancel a job (durable: done even if the scheduler is restarting)."""
        assert self._log is not None
        job_id = await self.resolve(job_id)
        by = self.creds.id if self.creds is not None else None
        cancel = JobCancel(job_id=job_id, reason=reason[:2000], cancelled_by=by)
        await self._log.publish_envelope(self._envelope(cancel))
        return job_id

    # -- reading ----------------------------------------------------------------------------------------
    async def jobs(self) -> list[JobRecord]:
        """Every job the scheduler recorded, newest first."""
        assert self._jobs is not None
        records = []
        for key in await self._jobs.keys():
            with contextlib.suppress(NotFound):
                records.append(decode_record((await self._jobs.get(key)).value))
        return sorted(records, key=lambda r: r.created, reverse=True)

    async def resolve(self, job_id: str) -> str:
        """The full id of a job given its id or a unique prefix of it."""
        assert self._jobs is not None
        keys = await self._jobs.keys()
        if job_id in keys:
            return job_id
        matches = [k for k in keys if k.startswith(job_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise JobError(f"ambiguous: {', '.join(sorted(matches)[:5])}", job_id=job_id)
        raise UnknownJob(job_id)

    async def job(self, job_id: str) -> JobRecord:
        """A job's record (id or unique prefix)."""
        assert self._jobs is not None
        job_id = await self.resolve(job_id)
        try:
            return decode_record((await self._jobs.get(job_id)).value)
        except NotFound:
            raise UnknownJob(job_id) from None

    async def agents(self) -> list[AgentHeartbeat]:
        """The last heartbeat of every live agent."""
        live = await self.stores.key_value(LIVENESS_BUCKET)
        beats = []
        for key in await live.keys():
            with contextlib.suppress(NotFound, msgspec.DecodeError, msgspec.ValidationError):
                beats.append(_HEARTBEAT.decode((await live.get(key)).value))
        return sorted(beats, key=lambda b: (b.kind, b.agent_id))

    async def stored_logs(self, job_id: str) -> AsyncIterator[JobLog]:
        """The log batches stored so far for a job, in order."""
        assert self._log is not None
        with contextlib.suppress(NotFound):
            async for stored in self._log.replay(JobLog.pattern(job_id)):
                if isinstance(stored.event, JobLog):
                    yield stored.event

    # -- following --------------------------------------------------------------------------------------
    async def follow(self, job_id: str, *, on_status: Callable[[JobStatus], Any] | None = None,
                     on_log: Callable[[JobLog], Any] | None = None, logs: bool = True,
                     submit: Callable[[], Any] | None = None, timeout: float | None = None) -> JobRecord:
        """Stream a job's status changes and log batches until it ends; returns its final record.

        With ``submit``, the subscriptions are made first and ``submit()`` is awaited after, so nothing the
        job does is missed. Log batches already stored are replayed first; each is shown once. ``job_id``
        is the full id (see :meth:`resolve`). Raises ``TimeoutError`` (and only that) when the job has not
        ended ``timeout`` seconds after it was submitted or the following began; the job goes on.
        """
        if submit is None:
            job_id = await self.resolve(job_id)
        seen: set[tuple[str, int, int]] = set()

        def show(batch: JobLog) -> None:
            key = (batch.agent_id, batch.attempt, batch.seq)
            if key not in seen:
                seen.add(key)
                if on_log is not None:
                    on_log(batch)

        statuses = await self.bus.subscribe(JobStatus, key=job_id, max_pending=4096)
        batches = await self.bus.subscribe(JobLog, key=job_id, max_pending=8192) if logs else None
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(statuses)
            if batches is not None:
                await stack.enter_async_context(batches)
            if submit is not None:
                await submit()
            elif logs:
                async for batch in self.stored_logs(job_id):
                    show(batch)
            done = asyncio.Event()

            async def watch_statuses() -> None:
                async for d in statuses:
                    if on_status is not None:
                        on_status(d.event)
                    if d.event.state.terminal:
                        done.set()
                        return

            async def watch_logs() -> None:
                assert batches is not None
                async for d in batches:
                    show(d.event)

            async def poll_record() -> None:
                # A status published before we subscribed is not seen live: the record tells.
                assert self._jobs is not None
                while True:
                    with contextlib.suppress(FedbusError):  # not there yet, or the broker is restarting
                        if decode_record((await self._jobs.get(job_id)).value).state.terminal:
                            done.set()
                            return
                    await asyncio.sleep(1.0)

            watchers = [watch_statuses(), poll_record()] + ([watch_logs()] if batches is not None else [])
            await _until(done, watchers, timeout)
        if logs:  # everything an agent logged was stored before it reported the exit
            async for batch in self.stored_logs(job_id):
                show(batch)
        return await self.job(job_id)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobRecord:
        """Wait until a job ends (no output); returns its final record."""
        return await self.follow(job_id, logs=False, timeout=timeout)


async def _until(done: asyncio.Event, watchers: list[Coroutine[Any, Any, None]], timeout: float | None) -> None:
    """Run ``watchers`` until ``done`` is set, at most ``timeout`` seconds (then ``TimeoutError``). A watcher's
    error is raised as it is (not in an exception group); every watcher is cancelled and awaited on the way out."""
    tasks = [asyncio.ensure_future(w) for w in watchers]
    waiter = asyncio.ensure_future(done.wait())
    try:
        async with asyncio.timeout(timeout):
            pending = {waiter, *tasks}
            while not done.is_set():
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is not waiter and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
    finally:
        for task in (waiter, *tasks):
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
