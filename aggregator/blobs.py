"""Flat vectors ↔ :class:`~fedbus.aggregator.events.ModelRef`: inline bytes for small models, the object
store for large ones; sha256, length, dtype and finiteness checked on the way in.

A vector is raw little-endian ``float32`` (or ``uint32`` for masked secure-aggregation inputs): no pickle,
nothing executable, decoded zero-copy with ``numpy.frombuffer``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

from fedbus.bus.errors import IntegrityError, NotFound, StoreError
from fedbus.bus.stores import ObjectStore

from .errors import UpdateRejected
from .events import ModelRef

__all__ = ["DEFAULT_INLINE_LIMIT", "fetch", "ref_for", "sha256_of"]

DEFAULT_INLINE_LIMIT = 256 * 1024
"""Vectors up to this many bytes travel inside the event (the bus's frame limit is 1 MiB)."""

_DTYPES = {"float32": np.dtype("<f4"), "uint32": np.dtype("<u4")}


def sha256_of(vector: npt.NDArray[np.generic]) -> str:
    """Hex sha256 of a vector's bytes."""
    return hashlib.sha256(np.ascontiguousarray(vector).data).hexdigest()


async def ref_for(
    vector: npt.NDArray[np.generic],
    *,
    name: str,
    store: ObjectStore | None,
    inline_limit: int = DEFAULT_INLINE_LIMIT,
) -> ModelRef:
    """A reference to ``vector``: inline when small (or when there is no store), else stored as ``name``."""
    dtype = vector.dtype.name
    if dtype not in _DTYPES:
        raise StoreError(f"cannot send a {dtype} vector (float32 or uint32 only)")
    data = np.ascontiguousarray(vector, dtype=_DTYPES[dtype]).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) <= inline_limit or store is None:
        return ModelRef(sha256=digest, length=vector.size, dtype=dtype, inline=data)
    await store.put_bytes(name, data)
    return ModelRef(sha256=digest, length=vector.size, dtype=dtype, object=name)


async def fetch(
    ref: ModelRef,
    *,
    store: ObjectStore | None,
    length: int | None = None,
    dtype: str = "float32",
    within: str | None = None,
) -> npt.NDArray[np.generic]:
    """The vector behind ``ref``, verified; raises :class:`UpdateRejected` with a reason word when it is
    malformed (``bad_dtype``, ``wrong_shape``, ``bad_hash``, ``missing_blob``, ``non_finite``), or, with
    ``within``, names an object outside that prefix (``bad_object``: a client may not point the aggregator
    at the run's models or another client's blob, which the aggregator deletes after the round)."""
    if ref.object is not None and within is not None and not ref.object.startswith(within):
        raise UpdateRejected("bad_object", f"object {ref.object!r} is not under {within!r}")
    if ref.dtype != dtype or ref.dtype not in _DTYPES:
        raise UpdateRejected("bad_dtype", f"expected {dtype}, got {ref.dtype!r}")
    if length is not None and ref.length != length:
        raise UpdateRejected("wrong_shape", f"expected {length} values, got {ref.length}")
    if ref.inline is not None:
        data = ref.inline
    elif ref.object is not None and store is not None:
        try:
            data = await store.get_bytes(ref.object)
        except (NotFound, IntegrityError) as exc:
            raise UpdateRejected("missing_blob", f"object {ref.object!r}: {exc}") from None
    else:
        raise UpdateRejected("missing_blob", "no inline bytes and no object store to fetch from")
    itemsize = _DTYPES[ref.dtype].itemsize
    if len(data) != ref.length * itemsize:
        raise UpdateRejected("wrong_shape", f"{len(data)} bytes for {ref.length} {ref.dtype} values")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise UpdateRejected("bad_hash", "sha256 does not match the bytes")
    vector = np.frombuffer(data, dtype=_DTYPES[ref.dtype])
    if ref.dtype == "float32" and not np.isfinite(vector).all():
        raise UpdateRejected("non_finite", "NaN or infinite values")
    return vector
