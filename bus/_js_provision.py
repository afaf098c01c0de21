"""Streams and buckets on JetStream: looked up first, created with their limits only when missing.

In secure mode only admin (``fedbus up``) may create or change a stream; every other credential may at most
look one up. So "ensure" is: look up (``STREAM.INFO``), and only when the stream is missing, create it. When
that is refused, or the lookup itself is not permitted, the caller gets a :class:`~fedbus.bus.limits.StoreMissing`
at once (the broker sends no reply to a refused request; :func:`~._js_errors.guarded` notices its ``-ERR``).

:func:`provision` creates or updates every stream and bucket the project uses with its
:class:`~fedbus.bus.limits.StorageLimits`; ``fedbus up`` runs it as admin. When the server cannot reserve a
stream's ``max_bytes`` (a small disk), the stream gets the most it can reserve, and the line says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nats.js.errors
import structlog
from nats.js import api

from ._js_errors import NO_ROOM_CODES, PermissionDenied, guarded, mapped, translate
from .limits import (
    BucketLimits,
    ObjectLimits,
    StorageLimits,
    StoreMissing,
    StreamLimits,
    durable_streams,
    kv_stream,
    object_stream,
    object_subjects,
)

if TYPE_CHECKING:
    from .events import Event
    from .jetstream import JetStream

log = structlog.get_logger("fedbus.bus.jetstream")
T = TypeVar("T")

NAME_IN_USE = 10058
"""The JetStream error code of a create that lost a race: the stream exists (with another config)."""
_MIN_BYTES = 1024 * 1024
"""Below this, a stream the server cannot reserve room for is an error rather than a smaller stream."""


def _api(op: str, name: str) -> str:
    return f"$JS.API.STREAM.{op}.{name}"


def _window(duplicate_window: float, max_age: float) -> float:
    """The duplicate window, which the server wants no longer than the stream's max age."""
    return min(duplicate_window, max_age) if max_age > 0 else duplicate_window


# -- stream configs from limits ------------------------------------------------------------------------
def event_stream_config(owner: JetStream, name: str, patterns: Iterable[str], limits: StreamLimits
                        ) -> api.StreamConfig:
    """The config of an event stream: its subjects, the owner's storage options and ``limits``."""
    opts = owner.options
    return _with_stream_limits(api.StreamConfig(
        name=name, subjects=sorted(patterns), storage=opts.storage_type, num_replicas=opts.replicas,
        duplicate_window=opts.duplicate_window, retention=api.RetentionPolicy.LIMITS,
    ), limits, max_frame=owner.bus.codec.limits.max_frame_bytes)


def _with_stream_limits(config: api.StreamConfig, limits: StreamLimits, *, max_frame: int) -> api.StreamConfig:
    return config.evolve(
        max_bytes=limits.max_bytes, max_age=limits.max_age or None, max_msgs=limits.max_msgs,
        max_msgs_per_subject=limits.max_msgs_per_subject, max_msg_size=min(limits.max_msg_size, max_frame),
        discard=api.DiscardPolicy(limits.discard), discard_new_per_subject=limits.discard_new_per_subject,
        duplicate_window=_window(config.duplicate_window or 120.0, limits.max_age),
    )


def object_stream_config(owner: JetStream, bucket: str, subjects: list[str], limits: ObjectLimits
                         ) -> api.StreamConfig:
    """The config of an object bucket's stream."""
    opts = owner.options
    return _with_object_limits(api.StreamConfig(
        name=object_stream(bucket), subjects=subjects, storage=opts.storage_type, num_replicas=opts.replicas,
        allow_rollup_hdrs=True, duplicate_window=opts.duplicate_window,
    ), limits)


def _with_object_limits(config: api.StreamConfig, limits: ObjectLimits) -> api.StreamConfig:
    return config.evolve(
        max_bytes=limits.max_bytes, max_age=limits.max_age or None, max_msg_size=limits.max_chunk_size,
        discard=api.DiscardPolicy.NEW, duplicate_window=_window(config.duplicate_window or 120.0, limits.max_age),
    )


def _with_kv_limits(config: api.StreamConfig, limits: BucketLimits) -> api.StreamConfig:
    # The ttl (max_age) stays as the bucket was created: it is what its users rely on for liveness.
    return config.evolve(max_bytes=limits.max_bytes, max_msg_size=limits.max_value_size)


# -- lookup, create, update ----------------------------------------------------------------------------
async def lookup(owner: JetStream, name: str) -> api.StreamInfo | None:
    """The stream ``name``, or ``None`` when it does not exist; :class:`StoreMissing` when this credential
    may not even look it up."""
    try:
        return await guarded(owner.nc, owner.js.stream_info(name), subject=_api("INFO", name),
                             what=f"look up stream {name}")
    except nats.js.errors.NotFoundError:
        return None
    except PermissionDenied:
        raise StoreMissing(name, "is not visible to this credential (or does not exist)") from None


async def fitting(name: str, max_bytes: int, call: Callable[[int], Awaitable[T]]) -> tuple[T, int]:
    """``call(max_bytes)``, halving ``max_bytes`` while the server cannot reserve that much room."""
    size = max_bytes
    while True:
        try:
            return await call(size), size
        except nats.js.errors.APIError as exc:
            if exc.err_code not in NO_ROOM_CODES or size // 2 < min(_MIN_BYTES, max_bytes):
                raise
            size //= 2
            log.warning("the server cannot reserve the stream's max_bytes; trying less", stream=name,
                        max_bytes=size * 2, next=size)


async def create(owner: JetStream, config: api.StreamConfig, *, missing: str = "does not exist"
                 ) -> tuple[api.StreamInfo, int]:
    """Create a stream; returns its info and the max_bytes it got. Raises :class:`StoreMissing` when this
    credential may not create streams; nats-py's errors pass through (see :data:`NAME_IN_USE`)."""
    name = config.name or ""

    async def add(max_bytes: int) -> api.StreamInfo:
        return await guarded(owner.nc, owner.js.add_stream(config.evolve(max_bytes=max_bytes)),
                             subject=_api("CREATE", name), what=f"create stream {name}")

    try:
        return await fitting(name, config.max_bytes or -1, add)
    except PermissionDenied:
        raise StoreMissing(name, missing) from None


async def update(owner: JetStream, config: api.StreamConfig, *, missing: str) -> tuple[api.StreamInfo, int]:
    """Update a stream's config; :class:`StoreMissing` (saying ``missing``) when not permitted."""
    name = config.name or ""

    async def change(max_bytes: int) -> api.StreamInfo:
        return await guarded(owner.nc, owner.js.update_stream(config.evolve(max_bytes=max_bytes)),
                             subject=_api("UPDATE", name), what=f"update stream {name}")

    try:
        return await fitting(name, config.max_bytes or -1, change)
    except PermissionDenied:
        raise StoreMissing(name, missing) from None


async def ensure_event_stream(owner: JetStream, name: str, patterns: set[str]) -> None:
    """Make sure stream ``name`` exists and stores ``patterns``: look it up, create it (with its limits) only
    when missing, extend its subjects only when one is missing."""
    for _ in range(5):  # another process may be creating or extending the same stream: re-read and merge
        info = await lookup(owner, name)
        if info is None:
            config = event_stream_config(owner, name, patterns, owner.options.limits.stream(name))
            try:
                await create(owner, config)
                return
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != NAME_IN_USE:
                    raise
                continue  # created meanwhile, perhaps with other subjects: merge on the next pass
        have = set(info.config.subjects or ())
        if patterns <= have:
            return
        info.config.subjects = sorted(have | patterns)
        await update(owner, info.config, missing=f"does not store {sorted(patterns - have)}")
        return
    raise translate(nats.js.errors.Error(f"could not create or extend stream {name} with {sorted(patterns)}"))


# -- provisioning (admin) ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    action: str
    """created, updated or unchanged"""
    max_bytes: int
    wanted: int

    def line(self) -> str:
        text = f"{self.name}: {self.action} ({_size(self.max_bytes)})"
        if self.max_bytes != self.wanted:
            text += f"; the server could not reserve {_size(self.wanted)}"
        return text


def _size(n: int) -> str:
    if n < 0:
        return "no byte limit"
    exp = min(int(math.log(n, 1024)) if n > 0 else 0, 4)
    return f"{n / 1024**exp:g} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"


_LIMIT_FIELDS = ("max_bytes", "max_age", "max_msgs", "max_msgs_per_subject", "max_msg_size", "discard",
                 "discard_new_per_subject", "duplicate_window", "subjects")


_UNSET: dict[str, object] = {"max_bytes": -1, "max_age": 0.0, "max_msgs": -1, "max_msgs_per_subject": -1,
                             "max_msg_size": -1, "discard_new_per_subject": False, "duplicate_window": 0.0}


def _same(a: api.StreamConfig, b: api.StreamConfig) -> bool:
    def norm(config: api.StreamConfig, key: str) -> object:
        value = getattr(config, key)
        if key == "subjects":
            return sorted(value or ())
        if value is None:
            return _UNSET.get(key)
        return value

    return all(norm(a, k) == norm(b, k) for k in _LIMIT_FIELDS)


async def _apply(owner: JetStream, wanted: api.StreamConfig,
                 merge: Callable[[api.StreamConfig], api.StreamConfig]) -> _Outcome:
    """Create ``wanted``, or update the existing stream to ``merge(its config)``."""
    name = wanted.name or ""
    target = wanted.max_bytes or -1
    info = await lookup(owner, name)
    if info is None:
        _, got = await create(owner, wanted)
        return _Outcome(name, "created", got, target)
    config = merge(info.config)
    if _same(config, info.config):
        return _Outcome(name, "unchanged", info.config.max_bytes or -1, target)
    _, got = await update(owner, config, missing="may not be changed by this credential")
    return _Outcome(name, "updated", got, target)


async def provision(owner: JetStream, limits: StorageLimits | None = None, *,
                    events: Iterable[type[Event]] | None = None) -> list[str]:
    """Create or update every event stream, KV bucket and object bucket the project uses with ``limits``
    (default: the owner's); returns one line per stream saying what was done. Run as admin (``fedbus up``).

    ``events`` defaults to every event type of the installed packages (the ``fedbus.events`` entry points);
    buckets are those named in ``limits`` (the registry in :mod:`fedbus.bus.limits`, plus the file's).
    """
    with mapped():
        return await _provision(owner, limits or owner.options.limits, events)


async def _provision(owner: JetStream, limits: StorageLimits, events: Iterable[type[Event]] | None
                     ) -> list[str]:
    from .catalogue_cli import load_events  # the entry points only when provisioning

    classes = list(load_events(owner.bus.codec.catalogue) if events is None else events)
    max_frame = owner.bus.codec.limits.max_frame_bytes
    outcomes: list[_Outcome] = []
    for name, patterns in durable_streams(classes).items():
        stream_limits = limits.stream(name)

        def merge(config: api.StreamConfig, patterns: list[str] = patterns, sl: StreamLimits = stream_limits
                  ) -> api.StreamConfig:
            merged = config.evolve(subjects=sorted(set(config.subjects or ()) | set(patterns)))
            return _with_stream_limits(merged, sl, max_frame=max_frame)

        wanted = event_stream_config(owner, name, patterns, stream_limits)
        outcomes.append(await _apply(owner, wanted, merge))
    for bucket, kv_limits in sorted({**limits.kv}.items()):
        outcomes.append(await _provision_kv(owner, bucket, kv_limits))
    for bucket, obj_limits in sorted({**limits.objects}.items()):
        wanted = object_stream_config(owner, bucket, object_subjects(bucket), obj_limits)
        outcomes.append(await _apply(owner, wanted, functools.partial(_with_object_limits, limits=obj_limits)))
    for outcome in outcomes:
        log.info("provisioned", stream=outcome.name, action=outcome.action, max_bytes=outcome.max_bytes)
    return [o.line() for o in outcomes]


async def _provision_kv(owner: JetStream, bucket: str, limits: BucketLimits) -> _Outcome:
    name = kv_stream(bucket)
    info = await lookup(owner, name)
    if info is None:
        from ._js_kv import create_bucket  # _js_kv imports this module

        _, got = await create_bucket(owner, bucket, limits, ttl=limits.ttl or None, history=1)
        return _Outcome(name, "created", got, limits.max_bytes)
    config = _with_kv_limits(info.config, limits)
    if _same(config, info.config):
        return _Outcome(name, "unchanged", info.config.max_bytes or -1, limits.max_bytes)
    _, got = await update(owner, config, missing="may not be changed by this credential")
    return _Outcome(name, "updated", got, limits.max_bytes)
