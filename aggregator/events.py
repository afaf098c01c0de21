"""Typed events of federated learning (domain ``fl``).

Run-wide events are keyed by ``run_id`` (subject ``fedbus.fl.<name>.<run_id>``), so several federations can
share one broker; the round invitation and the secure-aggregation mailbox are keyed by the receiving client
(``fedbus.fl.invite.<client_id>``), so that only that client may read them. Models travel as a
:class:`ModelRef`: the bytes inline for small models, otherwise the name of an object in the object store;
either way with a sha256 that the receiver checks. Events that carry weights or shares are ``signed``.

Flow of a synchronous round::

    aggregator: RoundStart ──▶ everyone (the model and config; how many are invited, never who)
    aggregator: RoundInvite ──▶ each sampled client alone (the selection stays secret: DP amplification)
    clients:    ModelUpdate ──▶ aggregator (idempotent by client and round; late ones refused)
    aggregator: RoundClose, GlobalModel ──▶ everyone;   RunFinished after the last round
    clients:    ClientJoin / ClientHeartbeat / ClientLeave, so that vanished clients are noticed

Who may publish and read each type (``pub``/``sub``; admin may always do both) is declared on it; the
broker's permissions are generated from these declarations. Every field that becomes a subject token, a
path or an object name is an :data:`~fedbus.bus.roles.Id` (or an :data:`ObjectName`), checked on decode.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from fedbus.bus.events import Event, Params, event
from fedbus.bus.roles import Id

__all__ = [
    "OBJECT_NAME_PATTERN",
    "ClientHeartbeat",
    "ClientJoin",
    "ClientLeave",
    "EvalReport",
    "GlobalModel",
    "ModelRef",
    "ModelUpdate",
    "ObjectName",
    "RoundClose",
    "RoundInvite",
    "RoundStart",
    "RunFinished",
    "SecAggAdvertise",
    "SecAggInbox",
    "SecAggMasked",
    "SecAggPeer",
    "SecAggReveal",
    "SecAggRoster",
    "SecAggShares",
    "SecAggUnmask",
    "UpdateRefused",
]


#: An object-store name: 2-6 id-like segments separated by ``/`` (``<run>/update/<round>/<token>``); no dots,
#: so never ``..`` nor a name that escapes a directory-backed store.
OBJECT_NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){1,5}$"
ObjectName = Annotated[str, msgspec.Meta(pattern=OBJECT_NAME_PATTERN)]

_CLIENTS: Final = ("fl-client", "device")
_AGG: Final = ("aggregator",)
_WATCHERS: Final = ("fl-client", "device", "observer")


class ModelRef(msgspec.Struct, frozen=True, kw_only=True):
    """A flat vector: inline bytes or an object-store name, with its length, dtype and sha256."""

    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    length: Annotated[int, msgspec.Meta(ge=0)]
    dtype: str = "float32"
    inline: bytes | None = None
    object: ObjectName | None = None


# -- membership ----------------------------------------------------------------------------------------------
@event("fl", "join", key="run_id", pub=_CLIENTS, sub=_AGG)
class ClientJoin(Event):
    """A client is ready to train for ``run_id``."""

    run_id: Id
    client_id: Id
    num_examples: int = 0
    info: Params = {}
    public_key: bytes = b""
    """The client's Ed25519 key, for an aggregator that trusts keys on first use."""


@event("fl", "heartbeat", key="run_id", pub=_CLIENTS, sub=_AGG)
class ClientHeartbeat(Event):
    """A client is alive (sent every ``heartbeat_s``, also while it trains)."""

    run_id: Id
    client_id: Id
    busy: bool = False
    round: int = -1
    public_key: bytes = b""


@event("fl", "leave", key="run_id", pub=_CLIENTS, sub=_AGG)
class ClientLeave(Event):
    """A client leaves the federation (a graceful stop)."""

    run_id: Id
    client_id: Id
    reason: str = ""


# -- rounds --------------------------------------------------------------------------------------------------
@event("fl", "round_start", key="run_id", pub=_AGG, sub=_WATCHERS)
class RoundStart(Event):
    """The aggregator opens a round: train (``fit``) or evaluate (``evaluate``) the model.

    It never says who takes part: each sampled client gets its own :class:`RoundInvite` and answers once it
    holds both. ``open`` means every client may answer without an invitation (asynchronous mode).
    ``invited`` is how many were invited, or ``None`` when even that is withheld (central DP: the size of a
    Poisson sample tells about its members). ``attempt`` > 0 re-opens a round (after a failed attempt or an
    aggregator restart); clients that already answered it re-send their cached answer. ``secure`` switches
    the round to the secure-aggregation message flow.
    """

    run_id: Id
    round: int
    kind: str
    version: int
    model: ModelRef
    deadline_s: float
    config: Params = {}
    attempt: int = 0
    secure: bool = False
    open: bool = False
    invited: int | None = None


@event("fl", "invite", key="client_id", pub=_AGG, sub=("fl-client:self", "device:self"))
class RoundInvite(Event):
    """To one client alone: it is in the sample of round ``round`` (``attempt``, ``kind``) of ``run_id``."""

    client_id: Id
    run_id: Id
    round: int
    kind: str
    version: int
    attempt: int = 0


@event("fl", "update", key="run_id", signed=True, pub=_CLIENTS, sub=_AGG)
class ModelUpdate(Event):
    """A client's trained delta (model − the global model of ``base_version``) for a round."""

    run_id: Id
    round: int
    client_id: Id
    base_version: int
    update: ModelRef
    num_examples: int
    metrics: Params = {}


@event("fl", "eval_report", key="run_id", signed=True, pub=_CLIENTS, sub=_AGG)
class EvalReport(Event):
    """A client's evaluation of a global model on its local data."""

    run_id: Id
    round: int
    client_id: Id
    version: int
    num_examples: int
    loss: float
    metrics: Params = {}


@event("fl", "refused", key="run_id", pub=_AGG, sub=_WATCHERS)
class UpdateRefused(Event):
    """The aggregator refused a client's update (late, duplicate, malformed, wrong shape...). Not sent in a
    run with central DP: it would tell everyone which clients were sampled."""

    run_id: Id
    round: int
    client_id: Id
    reason: str
    detail: str = ""


@event("fl", "round_close", key="run_id", pub=_AGG, sub=_WATCHERS)
class RoundClose(Event):
    """A round ended: who answered, who was late, dropped or rejected, and the aggregated metrics. With
    central DP the lists stay empty and the metrics carry no client counts: they would reveal the sample."""

    run_id: Id
    round: int
    kind: str
    status: str
    version: int
    received: list[Id] = []
    late: list[Id] = []
    dropped: list[Id] = []
    rejected: list[Id] = []
    duration_s: float = 0.0
    metrics: Params = {}


@event("fl", "global_model", key="run_id", pub=_AGG, sub=_WATCHERS)
class GlobalModel(Event):
    """A new global model version (kept in the object store: the run's lineage)."""

    run_id: Id
    version: int
    round: int
    model: ModelRef
    metrics: Params = {}


@event("fl", "finished", key="run_id", pub=_AGG, sub=_WATCHERS)
class RunFinished(Event):
    """The federation is over; clients may exit."""

    run_id: Id
    status: str
    rounds: int
    version: int
    model: ModelRef | None = None
    metrics: Params = {}
    reason: str = ""


# -- secure aggregation (see fedbus.aggregator.secagg for the protocol) --------------------------------------
@event("fl", "secagg_advertise", key="run_id", signed=True, pub=("fl-client",), sub=_AGG)
class SecAggAdvertise(Event):
    """Stage 1, client → aggregator: public keys for this round."""

    run_id: Id
    round: int
    client_id: Id
    enc_key: bytes
    mask_key: bytes
    num_examples: int


class SecAggPeer(msgspec.Struct, frozen=True, kw_only=True):
    client_id: Id
    enc_key: bytes
    mask_key: bytes
    num_examples: int


@event("fl", "secagg_roster", key="run_id", pub=_AGG, sub=("fl-client",))
class SecAggRoster(Event):
    """Stage 2, aggregator → clients: the advertised keys and the total example count."""

    run_id: Id
    round: int
    peers: list[SecAggPeer]
    total_examples: int
    threshold: int
    neighbours: int
    clip: float
    levels: int


@event("fl", "secagg_shares", key="run_id", signed=True, pub=("fl-client",), sub=_AGG)
class SecAggShares(Event):
    """Stage 3, client → aggregator: encrypted shares, one ciphertext per neighbour."""

    run_id: Id
    round: int
    client_id: Id
    ciphertexts: dict[Id, bytes]


@event("fl", "secagg_inbox", key="client_id", pub=_AGG, sub=("fl-client:self",))
class SecAggInbox(Event):
    """Stage 3, aggregator → one client: the ciphertexts its neighbours addressed to it."""

    client_id: Id
    run_id: Id
    round: int
    ciphertexts: dict[Id, bytes]


@event("fl", "secagg_masked", key="run_id", signed=True, pub=("fl-client",), sub=_AGG)
class SecAggMasked(Event):
    """Stage 4, client → aggregator: the masked, quantised vector (uint32)."""

    run_id: Id
    round: int
    client_id: Id
    masked: ModelRef
    num_examples: int
    metrics: Params = {}


@event("fl", "secagg_unmask", key="run_id", pub=_AGG, sub=("fl-client",))
class SecAggUnmask(Event):
    """Stage 5, aggregator → clients: who survived and who dropped; reveal the matching shares."""

    run_id: Id
    round: int
    survivors: list[Id]
    dropped: list[Id]


@event("fl", "secagg_reveal", key="run_id", signed=True, pub=("fl-client",), sub=_AGG)
class SecAggReveal(Event):
    """Stage 5, client → aggregator: shares of survivors' self-mask seeds and dropped clients' mask keys."""

    run_id: Id
    round: int
    client_id: Id
    seed_shares: dict[Id, bytes]
    key_shares: dict[Id, bytes]
