"""An object store in a local directory, for an aggregator without a broker-side store.

It implements :class:`fedbus.bus.stores.ObjectStore` on top of :class:`~fedbus.bus.chunked.ChunkedObjectStore`
(which does the hashing and verification): each object is a file written to a temporary name and renamed
once complete, with a JSON sidecar holding its size and sha256. A SIGKILL at any moment leaves either the
old object or the new one, never a torn one, which is what a resumable aggregator needs of its state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fedbus.bus.chunked import ChunkedObjectStore
from fedbus.bus.errors import NotFound, StoreError
from fedbus.bus.stores import ObjectInfo, validate_bucket, validate_key

__all__ = ["FileObjectStore"]


class FileObjectStore(ChunkedObjectStore):
    """Objects as files under ``root/bucket/``; names may contain ``/`` (sub-directories)."""

    def __init__(self, root: Path, bucket: str = "fl", *, chunk_size: int = 1 << 20) -> None:
        self.bucket = validate_bucket(bucket)
        self.chunk_size = chunk_size
        self.root = Path(root) / bucket
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        validate_key(name)
        if ".." in name.split("/"):
            raise StoreError(f"object name {name!r} escapes the bucket")
        return self.root / name

    async def _store(self, name: str, pieces: AsyncIterator[bytes], digest: object) -> ObjectInfo:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        chunks = 0
        try:
            with os.fdopen(fd, "wb") as file:
                async for piece in pieces:
                    await asyncio.to_thread(file.write, piece)
                    chunks += 1
                await asyncio.to_thread(_sync, file)
            info = ObjectInfo(
                name=name,
                size=digest.size,
                sha256=digest.hexdigest(),  # type: ignore[attr-defined]
                chunks=chunks,
                chunk_size=self.chunk_size,
                time_ns=time.time_ns(),
            )
            meta = json.dumps(
                {
                    "size": info.size,
                    "sha256": info.sha256,
                    "chunks": info.chunks,
                    "chunk_size": info.chunk_size,
                    "time_ns": info.time_ns,
                }
            )
            await asyncio.to_thread(_replace_pair, Path(tmp), path, meta)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return info

    async def _load(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        with open(self._path(info.name), "rb") as file:  # noqa: ASYNC230 - opening is quick; reads run in a thread
            while data := await asyncio.to_thread(file.read, self.chunk_size):
                yield data

    async def info(self, name: str) -> ObjectInfo:
        meta_path = _meta(self._path(name))
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no object {name!r} in {self.root}") from None
        except ValueError as exc:
            raise StoreError(f"unreadable metadata of {name!r}: {exc}") from None
        return ObjectInfo(
            name=name,
            size=meta["size"],
            sha256=meta["sha256"],
            chunks=meta["chunks"],
            chunk_size=meta["chunk_size"],
            time_ns=meta["time_ns"],
        )

    async def delete(self, name: str) -> None:
        path = self._path(name)
        for p in (_meta(path), path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def list(self) -> list[ObjectInfo]:
        names = sorted(
            str(p.relative_to(self.root))[: -len(".meta.json")] for p in self.root.rglob("*.meta.json")
        )
        return [await self.info(n) for n in names]


def _meta(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _sync(file: object) -> None:
    file.flush()  # type: ignore[attr-defined]
    os.fsync(file.fileno())  # type: ignore[attr-defined]


def _replace_pair(tmp: Path, path: Path, meta: str) -> None:
    """Rename the data into place, then its metadata; a reader trusts the data only through the metadata."""
    meta_tmp = _meta(tmp)
    meta_tmp.write_text(meta)
    os.replace(tmp, path)
    os.replace(meta_tmp, _meta(path))
