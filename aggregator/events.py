"""Typed events of federated learning (domain ``fl``).

Run-wide events are keyed by ``run_id`` (subject ``fedbus.fl.<name>.<run_id>``), so several federations can
share one broker; the secure-aggregation mailbox is keyed by the receiving client. Models travel as a
:class:`ModelRef`: the bytes inline for small models, otherwise the name of an object in the object store;
either way with a sha256 that the receiver checks. Events that carry weights or shares are ``signed``.

Flow of a synchronous round::

    aggregator: RoundStart ──▶ clients (sampled ones train)
    clients:    ModelUpdate ──▶ aggregator (idempotent by client and round; late ones refused)
    aggregator: RoundClose, GlobalModel ──▶ everyone;   RunFinished after the last round
    clients:    ClientJoin / ClientHeartbeat / ClientLeave, so that vanished clients are noticed
"""

from __future__ import annotations

import msgspec

from fedbus.bus.events import Event, Params, event

__all__ = [
    "ClientHeartbeat",
    "ClientJoin",
    "ClientLeave",
    "EvalReport",
    "GlobalModel",
    "ModelRef",
    "ModelUpdate",
    "RoundClose",
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


class ModelRef(msgspec.Struct, frozen=True, kw_only=True):
    """A flat vector: inline bytes or an object-store name, with its length, dtype and sha256."""

    sha256: str
    length: int
    dtype: str = "float32"
    inline: bytes | None = None
    object: str | None = None


# -- membership ----------------------------------------------------------------------------------------------
@event("fl", "join", key="run_id")
class ClientJoin(Event):
    """A client is ready to train for ``run_id``."""

    run_id: str
    client_id: str
    num_examples: int = 0
    info: Params = {}
    public_key: bytes = b""
    """The client's Ed25519 key, for an aggregator that trusts keys on first use."""


@event("fl", "heartbeat", key="run_id")
class ClientHeartbeat(Event):
    """A client is alive (sent every ``heartbeat_s``, also while it trains)."""

    run_id: str
    client_id: str
    busy: bool = False
    round: int = -1
    public_key: bytes = b""


@event("fl", "leave", key="run_id")
class ClientLeave(Event):
    """A client leaves the federation (a graceful stop)."""

    run_id: str
    client_id: str
    reason: str = ""


# -- rounds --------------------------------------------------------------------------------------------------
@event("fl", "round_start", key="run_id")
class RoundStart(Event):
    """The aggregator opens a round: train (``fit``) or evaluate the model on the listed clients.

    ``clients`` empty means every client may answer (asynchronous mode). ``attempt`` > 0 re-opens a round
    (after a failed attempt or an aggregator restart); clients that already answered it re-send their cached
    answer. ``secure`` switches the round to the secure-aggregation message flow.
    """

    run_id: str
    round: int
    kind: str
    version: int
    model: ModelRef
    clients: list[str]
    deadline_s: float
    config: Params = {}
    attempt: int = 0
    secure: bool = False


@event("fl", "update", key="run_id", signed=True)
class ModelUpdate(Event):
    """A client's trained delta (model − the global model of ``base_version``) for a round."""

    run_id: str
    round: int
    client_id: str
    base_version: int
    update: ModelRef
    num_examples: int
    metrics: Params = {}


@event("fl", "eval_report", key="run_id", signed=True)
class EvalReport(Event):
    """A client's evaluation of a global model on its local data."""

    run_id: str
    round: int
    client_id: str
    version: int
    num_examples: int
    loss: float
    metrics: Params = {}


@event("fl", "refused", key="run_id")
class UpdateRefused(Event):
    """The aggregator refused a client's update (late, duplicate, malformed, wrong shape...)."""

    run_id: str
    round: int
    client_id: str
    reason: str
    detail: str = ""


@event("fl", "round_close", key="run_id")
class RoundClose(Event):
    """A round ended: who answered, who was late, dropped or rejected, and the aggregated metrics."""

    run_id: str
    round: int
    kind: str
    status: str
    version: int
    received: list[str] = []
    late: list[str] = []
    dropped: list[str] = []
    rejected: list[str] = []
    duration_s: float = 0.0
    metrics: Params = {}


@event("fl", "global_model", key="run_id")
class GlobalModel(Event):
    """A new global model version (kept in the object store: the run's lineage)."""

    run_id: str
    version: int
    round: int
    model: ModelRef
    metrics: Params = {}


@event("fl", "finished", key="run_id")
class RunFinished(Event):
    """The federation is over; clients may exit."""

    run_id: str
    status: str
    rounds: int
    version: int
    model: ModelRef | None = None
    metrics: Params = {}
    reason: str = ""


# -- secure aggregation (see fedbus.aggregator.secagg for the protocol) --------------------------------------
@event("fl", "secagg_advertise", key="run_id", signed=True)
class SecAggAdvertise(Event):
    """Stage 1, client → aggregator: public keys for this round."""

    run_id: str
    round: int
    client_id: str
    enc_key: bytes
    mask_key: bytes
    num_examples: int


class SecAggPeer(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    enc_key: bytes
    mask_key: bytes
    num_examples: int


@event("fl", "secagg_roster", key="run_id")
class SecAggRoster(Event):
    """Stage 2, aggregator → clients: the advertised keys and the total example count."""

    run_id: str
    round: int
    peers: list[SecAggPeer]
    total_examples: int
    threshold: int
    neighbours: int
    clip: float
    levels: int


@event("fl", "secagg_shares", key="run_id", signed=True)
class SecAggShares(Event):
    """Stage 3, client → aggregator: encrypted shares, one ciphertext per neighbour."""

    run_id: str
    round: int
    client_id: str
    ciphertexts: dict[str, bytes]


@event("fl", "secagg_inbox", key="client_id")
class SecAggInbox(Event):
    """Stage 3, aggregator → one client: the ciphertexts its neighbours addressed to it."""

    client_id: str
    run_id: str
    round: int
    ciphertexts: dict[str, bytes]


@event("fl", "secagg_masked", key="run_id", signed=True)
class SecAggMasked(Event):
    """Stage 4, client → aggregator: the masked, quantised vector (uint32)."""

    run_id: str
    round: int
    client_id: str
    masked: ModelRef
    num_examples: int
    metrics: Params = {}


@event("fl", "secagg_unmask", key="run_id")
class SecAggUnmask(Event):
    """Stage 5, aggregator → clients: who survived and who dropped; reveal the matching shares."""

    run_id: str
    round: int
    survivors: list[str]
    dropped: list[str]


@event("fl", "secagg_reveal", key="run_id", signed=True)
class SecAggReveal(Event):
    """Stage 5, client → aggregator: shares of survivors' self-mask seeds and dropped clients' mask keys."""

    run_id: str
    round: int
    client_id: str
    seed_shares: dict[str, bytes]
    key_shares: dict[str, bytes]
