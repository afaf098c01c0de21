"""Key-value buckets on JetStream: compare-and-set revisions (stream sequences), liveness by TTL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats.js.errors
import structlog
from nats.js.kv import KeyValue as NatsKeyValue

from ._js_errors import PermissionDenied, guarded, mapped, translate
from ._js_provision import NAME_IN_USE, fitting, lookup
from .errors import Conflict, NotFound, StoreError
from .limits import BucketLimits, StoreMissing, kv_stream
from .stores import KvEntry, validate_bucket, validate_key

if TYPE_CHECKING:
    from .jetstream import JetStream

log = structlog.get_logger("fedbus.bus.jetstream")


async def open_bucket(owner: JetStream, bucket: str, *, ttl: float | None, history: int) -> JetStreamKV:
    """The bucket ``bucket``: looked up, and created with its limits (and ``ttl``, else the registry's) only
    when missing. :class:`~fedbus.bus.limits.StoreMissing` when it is missing and this credential may not
    create it."""
    validate_bucket(bucket)
    stream = kv_stream(bucket)
    limits = owner.options.limits.bucket(bucket)
    info = await owner.retrying("look up bucket", lambda _t: lookup(owner, stream))
    if info is None:
        created, _ = await owner.retrying("create bucket", lambda _t: create_bucket(
            owner, bucket, limits, ttl=ttl if ttl is not None else limits.ttl or None, history=history))
        if created is not None:
            return JetStreamKV(bucket, created)
        info = await owner.retrying("look up bucket", lambda _t: lookup(owner, stream))
        if info is None:
            raise StoreMissing(stream, f"(bucket {bucket!r}) was created and deleted again")
    if ttl is not None and (info.config.max_age or 0) != ttl:
        log.warning("bucket exists with another ttl; keeping it", bucket=bucket, ttl=ttl,
                    existing=info.config.max_age)
    if (info.config.max_msgs_per_subject or 0) < 1:
        raise StoreError(f"stream {stream} is not a key-value bucket")
    kv = NatsKeyValue(name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=owner.js,
                      direct=bool(info.config.allow_direct))
    return JetStreamKV(bucket, kv)


async def create_bucket(owner: JetStream, bucket: str, limits: BucketLimits, *, ttl: float | None,
                        history: int) -> tuple[NatsKeyValue | None, int]:
    """Create a KV bucket with ``limits``; returns it (``None`` if another process created it meanwhile) and
    the max_bytes it got (less when the server has less room). Raises
    :class:`~fedbus.bus.limits.StoreMissing` when this credential may not create it."""
    stream = kv_stream(bucket)

    async def add(max_bytes: int) -> NatsKeyValue:
        return await guarded(owner.nc, owner.js.create_key_value(
            bucket=bucket, ttl=ttl, history=history, replicas=owner.options.replicas,
            storage=owner.options.storage_type, max_bytes=max_bytes, max_value_size=limits.max_value_size,
        ), subject=f"$JS.API.STREAM.CREATE.{stream}", what=f"create bucket {bucket}")

    try:
        return await fitting(stream, limits.max_bytes, add)
    except PermissionDenied:
        raise StoreMissing(stream, f"(bucket {bucket!r}) does not exist") from None
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != NAME_IN_USE:
            raise
        return None, limits.max_bytes


class JetStreamKV:
    """:class:`~fedbus.bus.stores.KeyValue` on a JetStream KV bucket; revisions are stream sequences."""

    def __init__(self, bucket: str, kv: NatsKeyValue) -> None:
        self.bucket = bucket
        self._kv = kv
        self._store = f"bucket {bucket!r}"

    async def get(self, key: str) -> KvEntry:
        try:
            entry = await self._kv.get(validate_key(key))
        except nats.js.errors.NotFoundError:
            raise NotFound(f"no key {key!r} in bucket {self.bucket!r}") from None
        except Exception as exc:
            raise translate(exc, store=self._store) from exc
        if entry.value is None or entry.revision is None:
            raise NotFound(f"no key {key!r} in bucket {self.bucket!r}")
        return KvEntry(key, entry.value, entry.revision)

    async def put(self, key: str, value: bytes) -> int:
        with mapped(self._store):
            return await self._kv.put(validate_key(key), value)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(validate_key(key), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict("key exists", key=key) from None
        except Exception as exc:
            raise translate(exc, store=self._store) from exc

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        try:
            return await self._kv.update(validate_key(key), value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"revision is not {revision}", key=key, expected=revision) from None
        except Exception as exc:
            raise translate(exc, store=self._store) from exc

    async def delete(self, key: str) -> None:
        with mapped(self._store):
            await self._kv.delete(validate_key(key))

    async def keys(self) -> list[str]:
        try:
            return sorted(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        except Exception as exc:
            raise translate(exc, store=self._store) from exc
