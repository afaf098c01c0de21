"""What may reach the scheduler's core: every input is checked against a registry of who signs what.

Two registries, one per deployment:

- **secure** (the identities registry ``fedbus-identities`` holds identities; only the authority writes it):
  a heartbeat counts only for an id registered as ``gpu-agent`` or ``device``; a bid or report only when
  signed by the registered key of the ``agent_id`` it names, in one of those roles; a submit or cancel only
  when signed by the registered key of ``submitted_by``/``cancelled_by``, an ``admin`` identity. The verified
  identity is what the job record says submitted or cancelled it.
- **insecure** (no identities: ``fedbus up --insecure``, tests): agents' keys come from the ``agent-keys``
  bucket (first come, first served) and bids and reports must be signed by them, as before; submits and
  cancels are taken from anyone.

Besides the signer, a durable input must have come on its own subject (``fedbus.jobs.submit.<job_id>`` for
job ``job_id``), a submission must be small enough to store, name only its own workspace archive, and not
reuse the id of another job. Looked-up keys are cached for ``ttl_s``, so a revoked identity stops counting
within that time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fedbus.bus.codec import Envelope
from fedbus.bus.creds import fetch_identity
from fedbus.bus.errors import AuthError, FedbusError, NotFound
from fedbus.bus.events import Event
from fedbus.bus.roles import Role
from fedbus.bus.signing import KeyRing, key_id
from fedbus.bus.stores import KeyValue

from . import workspace
from .events import AgentHeartbeat, JobBid, JobCancel, JobReport, JobSubmit

__all__ = ["AGENT_ROLES", "Gate", "Signers", "Verdict", "registry_in_use"]

#: Roles whose identities may run jobs (heartbeat, bid, report).
AGENT_ROLES = frozenset({Role.GPU_AGENT, Role.DEVICE})
_MAX_CACHED = 10_000


async def registry_in_use(identities: KeyValue) -> bool:
    """Whether the deployment is secure: its identities registry holds at least one identity. An unreadable
    registry raises (a scheduler must not fall back to open mode because the broker was slow)."""
    return bool(await identities.keys())


class _Record(Protocol):
    @property
    def submitted_by(self) -> str: ...

    @property
    def submit_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """May an input reach the core? ``by`` is the verified sender of a submit or cancel."""

    ok: bool
    reason: str = ""
    by: str | None = None
    quiet: bool = False
    """Not for the scheduler and nothing wrong with it (another daemon's heartbeat): dropped unlogged."""


_OK = Verdict(True)
#: Heartbeat kinds of agents that bid for and run jobs; other daemons' heartbeats are not the scheduler's.
JOB_RUNNER_KINDS = frozenset({"gpu", "device"})


class Signers:
    """The public keys of agents and admins, looked up in the registry of the deployment and cached."""

    def __init__(self, *, agent_keys: KeyValue, identities: KeyValue | None, ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.agent_keys = agent_keys
        self.identities = identities
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, bytes | None, str]] = OrderedDict()
        self._ring = KeyRing()

    @property
    def secure(self) -> bool:
        return self.identities is not None

    async def key(self, ident: str, roles: frozenset[Role]) -> tuple[bytes | None, str]:
        """The registered public key of ``ident`` if it has one of ``roles``, else ``None`` and why not."""
        now = self._clock()
        cached = self._cache.get(ident)
        if cached is None or cached[0] <= now:
            try:
                found = await self._fetch(ident)
            except FedbusError as exc:  # the registry is unreachable now: decide nothing for long
                return None, f"the registry is unavailable ({exc})"
            cached = (now + self.ttl_s, *found)
            self._cache[ident] = cached
            self._cache.move_to_end(ident)
            while len(self._cache) > _MAX_CACHED:
                self._cache.popitem(last=False)
        _, public, role = cached
        if public is None:
            return None, f"{ident!r} has no registered key" if not self.secure else f"no identity {ident!r}"
        if self.secure and role not in roles:
            return None, f"identity {ident!r} is a {role}, not {' or '.join(sorted(roles))}"
        return public, ""

    async def _fetch(self, ident: str) -> tuple[bytes | None, str]:
        if self.identities is not None:
            identity = await fetch_identity(self.identities, ident)
            return (None, "") if identity is None else (identity.public_key, str(identity.role))
        try:
            return (await self.agent_keys.get(ident)).value, str(Role.GPU_AGENT)
        except NotFound:
            return None, ""

    def signed_by(self, env: Envelope, public: bytes, ident: str) -> str | None:
        """``None`` if ``env`` carries a valid signature by ``public`` (``ident``'s key), else why not."""
        if env.sig is None or env.kid is None:
            return f"unsigned, but {ident!r} must sign it"
        if env.kid != key_id(public):
            return f"signed by key {env.kid}, not by {ident!r}'s registered key {key_id(public)}"
        if env.kid not in self._ring:
            self._ring.trust(public)
        try:
            self._ring.verify(env)
        except AuthError as exc:
            return str(exc)
        return None


class Gate:
    """Decides, input by input, what reaches the core; see the module docstring."""

    def __init__(self, signers: Signers, *, max_submit_bytes: int = 96 * 1024) -> None:
        self.signers = signers
        self.max_submit_bytes = max_submit_bytes

    async def admit(self, event: Event, env: Envelope, subject: str, jobs: Mapping[str, _Record]) -> Verdict:
        """Whether ``event`` (in ``env``, received on ``subject``) may reach the core, and from whom."""
        if subject != event.subject():
            return Verdict(False, f"came on {subject!r}, not on its own subject {event.subject()!r}")
        match event:
            case AgentHeartbeat(kind=kind) if kind not in JOB_RUNNER_KINDS:
                return Verdict(False, f"a {kind} runs no jobs", quiet=True)
            case AgentHeartbeat(agent_id=agent_id):
                _, why = await self.signers.key(agent_id, AGENT_ROLES)
                return Verdict(False, why) if why else _OK
            case JobBid(agent_id=agent_id) | JobReport(agent_id=agent_id):
                return await self._agent(env, agent_id)
            case JobSubmit():
                return await self._submit(event, env, jobs)
            case JobCancel():
                return await self._admin(env, event.cancelled_by, "cancel jobs")
            case _:
                return Verdict(False, f"the scheduler takes no {event.spec.type} events")

    async def _agent(self, env: Envelope, agent_id: str) -> Verdict:
        if env.src != agent_id:
            return Verdict(False, f"sent by {env.src!r} in the name of {agent_id!r}")
        public, why = await self.signers.key(agent_id, AGENT_ROLES)
        if public is None:
            return Verdict(False, why)
        why_not = self.signers.signed_by(env, public, agent_id)
        return Verdict(False, why_not) if why_not else _OK

    async def _admin(self, env: Envelope, claimed: str | None, what: str) -> Verdict:
        if not self.signers.secure:
            return Verdict(True, by=claimed or env.src)
        if claimed is None:
            return Verdict(False, f"names no sender: only an admin identity's signature may {what}")
        public, why = await self.signers.key(claimed, frozenset({Role.ADMIN}))
        if public is None:
            return Verdict(False, f"{why}: only an admin identity may {what}")
        why_not = self.signers.signed_by(env, public, claimed)
        return Verdict(False, why_not) if why_not else Verdict(True, by=claimed)

    async def _submit(self, ev: JobSubmit, env: Envelope, jobs: Mapping[str, _Record]) -> Verdict:
        if len(env.data) > self.max_submit_bytes:
            return Verdict(False, f"the submission is {len(env.data)} bytes, over the limit of "
                                  f"{self.max_submit_bytes} (keep data in the workspace)")
        own = workspace.object_name(ev.job_id)
        if ev.jobspec.workspace is not None and ev.jobspec.workspace != own:
            return Verdict(False, f"workspace {ev.jobspec.workspace!r} is not the job's own archive {own!r}")
        verdict = await self._admin(env, ev.submitted_by, "submit jobs")
        if not verdict.ok:
            return verdict
        known = jobs.get(ev.job_id)
        if known is not None and known.submit_id != env.id:
            return Verdict(False, f"job id {ev.job_id!r} is taken (submitted by {known.submitted_by or '?'})")
        return verdict
