"""The object store's transfers, shared by every backend: chunking, sha256 while streaming, verification.

A backend subclasses :class:`ChunkedObjectStore` and provides two primitives; see its docstring. The contracts
(:class:`~fedbus.bus.stores.ObjectStore`, :class:`~fedbus.bus.stores.ObjectInfo`) are in :mod:`.stores`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import IO

from .errors import IntegrityError
from .stores import ObjectInfo

__all__ = ["ChunkedObjectStore"]

class _Digest:
    """A running sha256 and byte count of what was streamed through it."""

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ChunkedObjectStore(abc.ABC):
    """The object store's public methods, built on two primitives a backend provides.

    ``_store(name, pieces, digest)`` persists pieces of at most :attr:`chunk_size` bytes (the digest is
    complete once ``pieces`` is exhausted) and ``_load(info)`` yields the stored chunks back. Hashing happens
    here, once per transfer: inline for streams, and for files in a worker thread together with the file I/O,
    so a slow disk never stalls the event loop.
    """

    bucket: str
    chunk_size: int

    @abc.abstractmethod
    async def _store(self, name: str, pieces: AsyncIterator[bytes], digest: _Digest) -> ObjectInfo: ...

    @abc.abstractmethod
    def _load(self, info: ObjectInfo) -> AsyncGenerator[bytes, None]: ...

    @abc.abstractmethod
    async def info(self, name: str) -> ObjectInfo: ...

    # -- put --------------------------------------------------------------------------------------------
    async def put_stream(self, name: str, chunks: AsyncIterator[bytes]) -> ObjectInfo:
        """Store the bytes of ``chunks`` (any sizes; re-cut to the store's chunk size)."""
        digest = _Digest()
        return await self._store(name, _hashed(_recut(chunks, self.chunk_size), digest), digest)

    async def put_bytes(self, name: str, data: bytes) -> ObjectInfo:
        """Store ``data``."""
        return await self.put_stream(name, _once(data))

    async def put_file(self, name: str, path: Path) -> ObjectInfo:
        """Store a file, read and hashed in chunks in a worker thread."""
        digest = _Digest()
        with open(path, "rb") as file:  # noqa: ASYNC230 - opening is quick; reads run in a worker thread
            async with contextlib.aclosing(_read_file(file, self.chunk_size, digest)) as pieces:
                return await self._store(name, pieces, digest)

    # -- get --------------------------------------------------------------------------------------------
    async def get_stream(self, name: str) -> AsyncGenerator[bytes, None]:
        """Chunks of the object, verified against its sha256 once the last one has been read."""
        info = await self.info(name)
        digest = _Digest()
        async with contextlib.aclosing(self._load(info)) as chunks:
            async for chunk in chunks:
                digest.update(chunk)
                yield chunk
        _verify(info, digest)

    async def get_bytes(self, name: str) -> bytes:
        """The whole object in memory, verified."""
        parts = [chunk async for chunk in self.get_stream(name)]
        return b"".join(parts)

    async def get_file(self, name: str, path: Path) -> ObjectInfo:
        """Write the object to ``path`` via a temporary file in the same directory, renamed once verified."""
        path = Path(path)
        info = await self.info(name)
        digest = _Digest()
        loop = asyncio.get_running_loop()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                async with contextlib.aclosing(self._load(info)) as chunks:
                    async for chunk in chunks:  # file I/O and hashing off the event loop
                        await loop.run_in_executor(None, _write_and_hash, file, digest, chunk)
            _verify(info, digest)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return info


def _verify(info: ObjectInfo, digest: _Digest) -> None:
    if digest.size != info.size:
        raise IntegrityError(info.name, expected=f"{info.size} bytes", actual=f"{digest.size} bytes")
    actual = digest.hexdigest()
    if actual != info.sha256:
        raise IntegrityError(info.name, expected=f"sha256 {info.sha256}", actual=f"sha256 {actual}")


def _write_and_hash(file: IO[bytes], digest: _Digest, chunk: bytes) -> None:
    file.write(chunk)
    digest.update(chunk)


def _read_and_hash(file: IO[bytes], size: int, digest: _Digest) -> bytes:
    data = file.read(size)
    digest.update(data)
    return data


async def _read_file(file: IO[bytes], size: int, digest: _Digest) -> AsyncGenerator[bytes, None]:
    # One chunk at a time: on a machine with few cores a reader thread running ahead only fights the event
    # loop and the broker for them (measured: no faster, sometimes slower).
    loop = asyncio.get_running_loop()
    while data := await loop.run_in_executor(None, _read_and_hash, file, size, digest):
        yield data


async def _hashed(pieces: AsyncIterator[bytes], digest: _Digest) -> AsyncIterator[bytes]:
    async for piece in pieces:
        digest.update(piece)
        yield piece


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _recut(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """Re-cut a stream of arbitrary pieces into pieces of exactly ``size`` bytes (the last may be shorter)."""
    pending = bytearray()
    async for chunk in chunks:
        if not pending and len(chunk) == size:
            yield bytes(chunk)
            continue
        pending += chunk
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
