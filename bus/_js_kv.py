"""Key-value buckets on JetStream: compare-and-set revisions (stream sequences), liveness by TTL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats.js.errors
import structlog
from nats.js.kv import KeyValue as NatsKeyValue

from ._js_errors import mapped, translate
from .errors import Conflict, NotFound
from .stores import KvEntry, validate_bucket, validate_key

if TYPE_CHECKING:
    from .jetstream import JetStream

log = structlog.get_logger("fedbus.bus.jetstream")


async def open_bucket(owner: JetStream, bucket: str, *, ttl: float | None, history: int) -> JetStreamKV:
    """The bucket ``bucket`` of ``owner``'s account, created (with ``ttl`` and ``history``) if needed."""
    validate_bucket(bucket)
    try:
        kv = await owner.js.key_value(bucket)
        if ttl is not None and (await kv.status()).ttl != ttl:
            log.warning("bucket exists with another ttl; keeping it", bucket=bucket, ttl=ttl)
    except nats.js.errors.BucketNotFoundError:
        with mapped():
            kv = await owner.retrying("create bucket", lambda _t: owner.js.create_key_value(
                bucket=bucket, ttl=ttl, history=history, replicas=owner.options.replicas,
                storage=owner.options.storage_type,
            ))
    except Exception as exc:
        raise translate(exc) from exc
    return JetStreamKV(bucket, kv)


class JetStreamKV:
    """:class:`~fedbus.bus.stores.KeyValue` on a JetStream KV bucket; revisions are stream sequences."""

    def __init__(self, bucket: str, kv: NatsKeyValue) -> None:
        self.bucket = bucket
        self._kv = kv

    async def get(self, key: str) -> KvEntry:
        try:
            entry = await self._kv.get(validate_key(key))
        except nats.js.errors.NotFoundError:
            raise NotFound(f"no key {key!r} in bucket {self.bucket!r}") from None
        except Exception as exc:
            raise translate(exc) from exc
        if entry.value is None or entry.revision is None:
            raise NotFound(f"no key {key!r} in bucket {self.bucket!r}")
        return KvEntry(key, entry.value, entry.revision)

    async def put(self, key: str, value: bytes) -> int:
        with mapped():
            return await self._kv.put(validate_key(key), value)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(validate_key(key), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict("key exists", key=key) from None
        except Exception as exc:
            raise translate(exc) from exc

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        try:
            return await self._kv.update(validate_key(key), value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"revision is not {revision}", key=key, expected=revision) from None
        except Exception as exc:
            raise translate(exc) from exc

    async def delete(self, key: str) -> None:
        with mapped():
            await self._kv.delete(validate_key(key))

    async def keys(self) -> list[str]:
        try:
            return sorted(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        except Exception as exc:
            raise translate(exc) from exc
