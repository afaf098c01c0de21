"""Object store: put + get throughput and peak RSS, fedbus vs nats-py's own object store, side by side.

    python -m bench.bench_objects [--size 1G] [--size 64M ...] [--chunk-size 1M] [--window 16]
                                  [--no-native] [--server nats://...]

For each size a random source file is written once; then each variant runs in a fresh child process that
puts the file into the store and gets it back into another file, so the peak RSS reported (``ru_maxrss``) is
that of the process doing the transfer, from its start. Baselines in the same run: a plain file copy (page
cache to page cache) and a memory copy, i.e. what the machine can do at all; and the RSS of a child that only
imports fedbus and connects (the floor every variant pays). Without ``--server`` an embedded nats-server with
file storage is started on free ports in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._table import print_table

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K`` or a number of bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def human(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- children: one transfer each, JSON on stdout --------------------------------------------------------
async def child_fedbus(url: str, src: Path, dst: Path, chunk_size: int, window: int) -> dict[str, Any]:
    from fedbus.bus import Bus
    from fedbus.bus.jetstream import JetStream
    from fedbus.bus.nats_transport import NatsTransport

    async with Bus(NatsTransport(url), source="bench-objects") as bus:
        js = await JetStream.open(bus, chunk_size=chunk_size, chunk_window=window)
        store = await js.object_store("benchfedbus")
        start = time.perf_counter()
        await store.put_file("blob", src)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        await store.get_file("blob", dst)  # verified against the sha256 before the rename
        get_s = time.perf_counter() - start
        start = time.perf_counter()
        async for _chunk in store.get_stream("blob"):  # verified at the end; nothing written to disk
            pass
        stream_s = time.perf_counter() - start
        await store.delete("blob")
    return {"put_s": put_s, "get_s": get_s, "stream_s": stream_s, "chunk": store.chunk_size}


async def child_native(url: str, src: Path, dst: Path) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    store = await js.create_object_store("benchnative")
    with open(src, "rb") as fh:  # noqa: ASYNC230 - measures nats-py's own file API, which takes a file
        start = time.perf_counter()
        await store.put("blob", fh)
        put_s = time.perf_counter() - start
    with open(dst, "wb") as fh:  # noqa: ASYNC230 - as above
        start = time.perf_counter()
        await store.get("blob", writeinto=fh)  # digest checked by nats-py
        get_s = time.perf_counter() - start
    await store.delete("blob")
    await js.delete_object_store("benchnative")
    await nc.close()
    return {"put_s": put_s, "get_s": get_s, "chunk": 128 * 1024}


async def child_floor(url: str) -> dict[str, Any]:
    from fedbus.bus import Bus
    from fedbus.bus.jetstream import JetStream
    from fedbus.bus.nats_transport import NatsTransport

    async with Bus(NatsTransport(url), source="bench-objects") as bus:
        await (await JetStream.open(bus)).object_store("benchfedbus")
    return {}


def run_child(args: argparse.Namespace) -> None:
    src, dst = Path(args.src or "."), Path(args.dst or ".")
    match args.child:
        case "fedbus":
            result = asyncio.run(child_fedbus(args.server, src, dst, args.chunk_size, args.window))
        case "native":
            result = asyncio.run(child_native(args.server, src, dst))
        case _:
            result = asyncio.run(child_floor(args.server))
    result["rss_mb"] = peak_rss_mb()
    sys.stdout.write(json.dumps(result) + "\n")


def spawn(kind: str, url: str, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_objects", "--child", kind, "--server", url, "--src", str(src),
           "--dst", str(dst), "--chunk-size", str(args.chunk_size), "--window", str(args.window)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- baselines in this process --------------------------------------------------------------------------
def file_copy_s(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    return time.perf_counter() - start


def memory_copy_mb_s(size: int = 256 << 20) -> float:
    """memcpy between two buffers whose pages are already mapped (the best of 3)."""
    src, dst = bytearray(os.urandom(1 << 20)) * (size >> 20), bytearray(size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst[:] = src
        best = min(best, time.perf_counter() - start)
    return size / best / 1e6


def write_source(path: Path, size: int) -> None:
    block = os.urandom(4 << 20)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)
            block = os.urandom(len(block)) if left > 0 else block


def mb_s(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e6:,.0f}"


def bench(url: str, sizes: list[int], args: argparse.Namespace) -> None:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="fedbus-bench-objects-") as tmp:
        floor = spawn("floor", url, Path(tmp), Path(tmp), args)["rss_mb"]
        for size in sizes:
            src, dst = Path(tmp) / "src.bin", Path(tmp) / "dst.bin"
            write_source(src, size)
            copy_s = file_copy_s(src, dst)
            dst.unlink()
            rows.append([human(size), "file copy (baseline)", mb_s(size, copy_s), "-", "-", "-", "-", "-"])
            variants = ["fedbus"] + ([] if args.no_native else ["native"])
            for kind in variants:
                r = spawn(kind, url, src, dst, args)
                if dst.read_bytes()[:4096] != src.read_bytes()[:4096] or dst.stat().st_size != size:
                    raise SystemExit(f"{kind}: the object read back differs from the source")
                dst.unlink()
                label = "fedbus object store" if kind == "fedbus" else "nats-py object store"
                stream = mb_s(size, r["stream_s"]) if "stream_s" in r else "-"
                rows.append([human(size), label, mb_s(size, r["put_s"]), mb_s(size, r["get_s"]), stream,
                             mb_s(2 * size, r["put_s"] + r["get_s"]), f"{r['rss_mb']:.0f}",
                             human(r["chunk"])])
            src.unlink()
    rows.append(["-", "memory copy (baseline)", f"{memory_copy_mb_s():,.0f}", "-", "-", "-", "-", "-"])
    print_table(
        f"object store put+get (MB/s = 1e6 B/s; floor RSS {floor:.0f} MB = python + fedbus + a connection)",
        ["size", "variant", "put file MB/s", "get file MB/s", "get stream MB/s", "put+get file MB/s",
         "peak RSS MB", "chunk"], rows)
    print("put file: file -> store; get file: store -> temp file, sha256 verified, renamed; get stream: store ->"
          " verified chunks, not written anywhere (what a loader that needs no file sees).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", default=None,
                        help="object size, e.g. 64M or 1G (repeatable, or comma-separated)")
    parser.add_argument("--chunk-size", type=parse_size, default=1 << 20)
    parser.add_argument("--window", type=int, default=16, help="chunks in flight each way")
    parser.add_argument("--no-native", action="store_true", help="skip nats-py's object store (slow at 1G)")
    parser.add_argument("--server", default=None, help="an existing nats:// server (default: embedded)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args, _unknown = parser.parse_known_args()  # `python -m bench` passes every bench the same arguments
    if args.child:
        run_child(args)
        return
    sizes = [parse_size(s) for text in (args.size or ["1G"]) for s in text.split(",")]
    if args.server:
        bench(args.server, sizes, args)
        return
    from fedbus.bus.broker import NatsServer

    with tempfile.TemporaryDirectory(prefix="fedbus-bench-nats-") as data, \
            NatsServer(data_dir=Path(data), mqtt_port=None) as server:
        print(f"embedded nats-server at {server.url} (file storage in {data})", flush=True)
        bench(server.url, sizes, args)


if __name__ == "__main__":
    main()
