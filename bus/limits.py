"""Storage limits: how much every JetStream stream, KV bucket and object bucket may hold, in one config.

Every stream and bucket fedbus creates gets its limits from a :class:`StorageLimits`: the defaults below, or
a YAML file (``fedbus up --limits FILE``; format and reasoning in ``docs/durability.md``)::

    limits = load_limits("limits.yaml")          # None: the built-in defaults
    limits.stream("FEDBUS_JOBS").max_bytes       # 1 GiB
    limits.bucket("agent-keys").max_value_size   # 4 KiB

This module also says where things are stored: :func:`stream_of` maps a durable event type to its stream
(``FEDBUS_<DOMAIN>``, or a stream of its own listed in :data:`OWN_STREAMS`), and :data:`STREAMS`,
:data:`KV_BUCKETS` and :data:`OBJECT_BUCKETS` register every stream and bucket the project uses with its
limits. A package that adds a bucket or a stream adds it here, so ``fedbus up`` provisions it.

Discard policy, in short: records that matter (job submits, reports, statuses, keys, objects) are kept and a
full stream refuses new writes (``discard: new``), so a flood can never evict them; it can only make the
flooder's (and, once full, everyone's) next writes fail loudly. Logs evict their oldest lines
(``discard: old``): they are voluminous, written by job processes, and worth less than room for new ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from . import subjects
from .errors import ConfigError, StoreError

if TYPE_CHECKING:
    from .events import Event
    from .stores import Stores

__all__ = [
    "DEFAULT_KV",
    "DEFAULT_OBJECTS",
    "DEFAULT_STREAM",
    "KV_BUCKETS",
    "OBJECT_BUCKETS",
    "OBJECT_PREFIX",
    "OWN_STREAMS",
    "SERVER_MAX_PAYLOAD",
    "STREAMS",
    "BucketLimits",
    "LimitExceeded",
    "ObjectLimits",
    "StorageLimits",
    "StoreMissing",
    "StreamLimits",
    "durable_streams",
    "kv_stream",
    "load_limits",
    "object_stream",
    "object_subjects",
    "parse_limits",
    "provision",
    "render_limits",
    "stream_of",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
DAY: Final = 86_400.0
SERVER_MAX_PAYLOAD: Final = 8 * MiB
"""The embedded nats-server's ``max_payload``: no message, and so no limit on one, can be larger."""

Discard = Literal["old", "new"]


# -- errors -----------------------------------------------------------------------------------------------
class LimitExceeded(StoreError):
    """A store refused a write because of its limits: too large, or full with ``discard: new``."""

    def __init__(self, store: str, reason: str, *, size: int | None = None, limit: int | None = None) -> None:
        detail = f" ({size} bytes; limit {limit})" if size is not None and limit is not None else ""
        super().__init__(f"{store} refused the write: {reason}{detail}")
        self.store = store
        self.reason = reason
        self.size = size
        self.limit = limit


class StoreMissing(StoreError):
    """A stream or bucket does not exist and this credential may not create it (only ``fedbus up`` does)."""

    def __init__(self, store: str, detail: str = "does not exist") -> None:
        super().__init__(f"stream {store} {detail}; start the broker with `fedbus up`")
        self.store = store


# -- the limits of one stream or bucket ----------------------------------------------------------------
def _positive(owner: object, *names: str) -> None:
    for name in names:
        if getattr(owner, name) <= 0:
            raise ConfigError("must be positive", key=name)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """The limits of one event stream."""

    max_bytes: int
    """Total bytes held; at the limit, ``discard`` decides what gives."""
    max_age: float
    """Seconds an event is kept (0: no age limit)."""
    max_msg_size: int
    """Larger events are refused by the broker (capped further by the codec's frame limit)."""
    max_msgs: int = -1
    """Events held (-1: only bytes and age limit them)."""
    max_msgs_per_subject: int = -1
    """Events held per subject, i.e. per job, agent or run (-1: no such limit)."""
    discard: Discard = "new"
    """At a limit: ``new`` refuses the write (nothing stored is evicted), ``old`` evicts the oldest."""
    discard_new_per_subject: bool = False
    """At ``max_msgs_per_subject``, refuse (instead of evicting the subject's oldest); needs ``discard: new``."""

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_msg_size")
        if self.max_age < 0:
            raise ConfigError("must be 0 (no limit) or positive", key="max_age")
        if self.max_msg_size > SERVER_MAX_PAYLOAD:
            raise ConfigError(f"must be at most the server's max_payload ({SERVER_MAX_PAYLOAD})",
                              key="max_msg_size")
        for name in ("max_msgs", "max_msgs_per_subject"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ConfigError("must be -1 (no limit) or positive", key=name)
        if self.discard not in ("old", "new"):
            raise ConfigError("must be 'old' or 'new'", key="discard")
        if self.discard_new_per_subject and (self.discard != "new" or self.max_msgs_per_subject < 1):
            raise ConfigError("needs discard: new and max_msgs_per_subject", key="discard_new_per_subject")


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketLimits:
    """The limits of one key-value bucket (JetStream keeps one value per key; a full bucket refuses new keys,
    while overwriting an existing key still works)."""

    max_bytes: int
    max_value_size: int
    ttl: float = 0.0
    """Forget keys not written for this many seconds (0: keep them). A caller's own ``ttl`` wins when it
    creates the bucket; an existing bucket keeps the ttl it was created with."""

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_value_size")
        if self.ttl < 0:
            raise ConfigError("must be 0 (no limit) or positive", key="ttl")
        if self.max_value_size > SERVER_MAX_PAYLOAD:
            raise ConfigError(f"must be at most the server's max_payload ({SERVER_MAX_PAYLOAD})",
                              key="max_value_size")


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectLimits:
    """The limits of one object bucket. Always ``discard: new``: evicting chunks would corrupt objects."""

    max_bytes: int
    max_age: float = 0.0
    """Seconds an object is kept (0: until replaced or deleted)."""
    max_chunk_size: int = SERVER_MAX_PAYLOAD
    """The largest message (chunk or meta record) the bucket's stream accepts; chunks are cut to fit."""

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_chunk_size")
        if self.max_age < 0:
            raise ConfigError("must be 0 (no limit) or positive", key="max_age")
        if self.max_chunk_size > SERVER_MAX_PAYLOAD:
            raise ConfigError(f"must be at most the server's max_payload ({SERVER_MAX_PAYLOAD})",
                              key="max_chunk_size")


# -- the registry: every stream and bucket the project uses --------------------------------------------
DEFAULT_STREAM: Final = StreamLimits(max_bytes=256 * MiB, max_age=30 * DAY, max_msg_size=1 * MiB)
"""Any durable domain without an entry of its own (e.g. ``FEDBUS_BUS`` of ``bus.record``)."""

STREAMS: Final[dict[str, StreamLimits]] = {
    # submit, cancel, report, status: ~200-500 bytes each (a jobspec with a long inline script a few KiB).
    # A job's events are one subject per type: 50,000 per subject is far above a 1024-node job with retries.
    "FEDBUS_JOBS": StreamLimits(max_bytes=1 * GiB, max_age=30 * DAY, max_msg_size=128 * KiB,
                                max_msgs=1_000_000, max_msgs_per_subject=50_000, discard="new",
                                discard_new_per_subject=True),
    # Batches of up to 500 lines / 256 Ki characters (~280 KB in ASCII, up to the codec's 1 MiB frame in
    # multi-byte text). Old lines give way to new; a chatty job evicts its own oldest batches first.
    "FEDBUS_JOBS_LOG": StreamLimits(max_bytes=2 * GiB, max_age=7 * DAY, max_msg_size=1 * MiB,
                                    max_msgs_per_subject=20_000, discard="old"),
    # Dead letters (bus/deadletter.py) copy envelopes up to 512 KiB; the oldest give way to new ones.
    "FEDBUS_DEAD": StreamLimits(max_bytes=256 * MiB, max_age=30 * DAY, max_msg_size=1 * MiB, max_msgs=10_000,
                                discard="old"),
}
"""Event streams by name. Durable types land in ``FEDBUS_<DOMAIN>`` unless :data:`OWN_STREAMS` says otherwise."""

OWN_STREAMS: Final[dict[str, str]] = {"jobs.log": "FEDBUS_JOBS_LOG"}
"""Durable event types (``domain.name``) stored apart from their domain: logs must never crowd out records."""

DEFAULT_KV: Final = BucketLimits(max_bytes=64 * MiB, max_value_size=1 * MiB)

KV_BUCKETS: Final[dict[str, BucketLimits]] = {
    "jobs": BucketLimits(max_bytes=512 * MiB, max_value_size=256 * KiB),  # job records (the scheduler's)
    "agents": BucketLimits(max_bytes=64 * MiB, max_value_size=64 * KiB, ttl=6.0),  # liveness: 3 heartbeats
    "agent-keys": BucketLimits(max_bytes=16 * MiB, max_value_size=4 * KiB),  # public keys by agent id
    "fedbus-identities": BucketLimits(max_bytes=16 * MiB, max_value_size=16 * KiB),  # creds.IDENTITIES_BUCKET
}
"""Key-value buckets by name (stream ``KV_<name>``)."""

DEFAULT_OBJECTS: Final = ObjectLimits(max_bytes=2 * GiB)

OBJECT_BUCKETS: Final[dict[str, ObjectLimits]] = {
    "workspaces": ObjectLimits(max_bytes=10 * GiB, max_age=30 * DAY),  # packed job folders, ≤ 512 MiB each
    "fl": ObjectLimits(max_bytes=20 * GiB),  # models and updates of federated runs (every client's)
    "fl-state": ObjectLimits(max_bytes=10 * GiB),  # the aggregator's checkpoints (aggregator.federation)
}
"""Object buckets by name (stream ``FEDBUS_OBJ_<name>``)."""


def stream_of(cls: type[Event]) -> str:
    """The stream that stores a durable event type: ``FEDBUS_<DOMAIN>`` (``FEDBUS_JOBS``), or its own one."""
    spec = cls.spec
    own = OWN_STREAMS.get(spec.type)
    if own is not None:
        return own
    return "FEDBUS_" + subjects.validate_token(spec.domain, what="event domain").upper()


def durable_streams(classes: Iterable[type[Event]]) -> dict[str, list[str]]:
    """Every stream the durable types among ``classes`` need, with its subject patterns (sorted)."""
    out: dict[str, set[str]] = {}
    for cls in classes:
        if cls.spec.durable:
            out.setdefault(stream_of(cls), set()).add(cls.pattern())
    return {name: sorted(patterns) for name, patterns in sorted(out.items())}


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket (JetStream's own naming)."""
    return "KV_" + bucket


def object_stream(bucket: str) -> str:
    """The stream behind an object bucket (subjects :func:`object_subjects`)."""
    return "FEDBUS_OBJ_" + bucket


OBJECT_PREFIX: Final = "_fedbus"
"""Object chunks and meta records live outside ``fedbus.>``, so ``fedbus tail`` never sees chunk traffic."""


def object_subjects(bucket: str) -> list[str]:
    """The subjects of an object bucket's stream: chunks ``_fedbus.obj.<bucket>.c.<version>`` and meta
    records ``_fedbus.obj.<bucket>.m.<name token>``."""
    return [subjects.validate_pattern(f"{OBJECT_PREFIX}.obj.{bucket}.{kind}.*") for kind in ("c", "m")]


# -- the whole config ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class StorageLimits:
    """Limits of every stream and bucket, with a default for those not named."""

    streams: Mapping[str, StreamLimits] = field(default_factory=lambda: dict(STREAMS))
    default_stream: StreamLimits = DEFAULT_STREAM
    kv: Mapping[str, BucketLimits] = field(default_factory=lambda: dict(KV_BUCKETS))
    default_kv: BucketLimits = DEFAULT_KV
    objects: Mapping[str, ObjectLimits] = field(default_factory=lambda: dict(OBJECT_BUCKETS))
    default_objects: ObjectLimits = DEFAULT_OBJECTS

    def stream(self, name: str) -> StreamLimits:
        """The limits of the event stream ``name``."""
        return self.streams.get(name, self.default_stream)

    def bucket(self, name: str) -> BucketLimits:
        """The limits of the KV bucket ``name``."""
        return self.kv.get(name, self.default_kv)

    def object_bucket(self, name: str) -> ObjectLimits:
        """The limits of the object bucket ``name``."""
        return self.objects.get(name, self.default_objects)


# -- the limits file (parsing in :mod:`._limits_file`) ---------------------------------------------------
def parse_limits(data: Any, *, source: str = "<limits>") -> StorageLimits:
    """Limits from parsed YAML: each entry overrides the built-in one field by field; ``default`` in a
    section sets the limits of that section's unnamed streams or buckets. Errors are :class:`ConfigError`
    naming the key and ``source``."""
    from ._limits_file import parse

    return parse(data, source=source)


def load_limits(path: str | Path | None) -> StorageLimits:
    """The limits in the YAML file at ``path`` (over the built-in defaults), or the defaults for ``None``."""
    from ._limits_file import load

    return load(path)


def render_limits(limits: StorageLimits) -> str:
    """``limits`` as a YAML limits file (what :func:`load_limits` reads back to equal limits)."""
    from ._limits_file import render

    return render(limits)


# -- provisioning --------------------------------------------------------------------------------------
async def provision(stores: Stores, limits: StorageLimits | None = None, *,
                    events: Iterable[type[Event]] | None = None) -> list[str]:
    """Create or update every event stream, KV bucket and object bucket the project uses with ``limits``
    (default: the built-in ones); one line per stream saying what was done. ``fedbus up`` runs it as admin.

    ``events`` defaults to every event type of the installed packages (the ``fedbus.events`` entry points).
    On memory stores (one process), the limits apply to what is created from now on and the event streams
    are created.
    """
    from .jetstream import JetStream  # nats-py only when provisioning a broker
    from .memstores import MemoryStores

    if isinstance(stores, JetStream):
        return await stores.provision(limits, events=events)
    if isinstance(stores, MemoryStores):
        stores.hub.limits = limits or StorageLimits()
        classes = list(events) if events is not None else [c for c in stores.bus.codec.catalogue]
        await stores.event_log().ensure(*(c for c in classes if c.spec.durable))
        return [f"{name}: in memory" for name in durable_streams(classes)]
    raise StoreError(f"cannot provision {type(stores).__name__}")
