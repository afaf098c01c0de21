"""Small fixes of issue 8 (item 9): transports forget what was unsubscribed, one reply inbox per memory
transport, a broken NVML is logged, piped tables are not cut at 80 columns, `fedbus agents --json`, help on
every option of the launch commands."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from rich.table import Table
from structlog.testing import capture_logs

from fedbus.agents.commands import COMMANDS as LAUNCH_COMMANDS
from fedbus.agents.events import AgentHeartbeat, Capacity
from fedbus.agents.resources import detect_gpus
from fedbus.agents.runtime import LIVENESS_BUCKET
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus
from fedbus.bus.console import PIPE_WIDTH, _Console
from fedbus.bus.errors import ClosedError, NoResponders, RequestTimeout
from fedbus.bus.memory import MemoryBroker, MemoryTransport
from fedbus.bus.nats_transport import NatsTransport
from fedbus.bus.stores import open_stores

FEDBUS = str(Path(sys.executable).parent / "fedbus")


# -- transports forget unsubscribed subscriptions ------------------------------------------------------------
async def test_memory_transport_keeps_no_entry_after_1000_subscribe_unsubscribe() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    await transport.connect()
    keep = await transport.subscribe("keep.>")
    for i in range(1000):
        sub = await transport.subscribe(f"churn.{i}")
        await sub.unsubscribe()
    assert transport._subs == {keep}
    assert broker._subs == [keep]
    await transport.close()
    assert transport._subs == set() and broker._subs == []


async def test_nats_transport_keeps_no_entry_after_1000_subscribe_unsubscribe(nats_server: NatsServer) -> None:
    transport = NatsTransport(nats_server.url)
    await transport.connect()
    try:
        keep = await transport.subscribe("small-fixes.keep")
        for i in range(1000):
            sub = await transport.subscribe(f"small-fixes.churn.{i}")
            await sub.unsubscribe()
        assert transport._subs == {keep}
        await transport.publish("small-fixes.keep", b"still here")
        assert (await keep.next(timeout=10)).data == b"still here"
    finally:
        await transport.close()
    assert transport._subs == set() and keep.closed


async def _echo(transport: MemoryTransport, pattern: str) -> None:
    async for frame in await transport.subscribe(pattern):
        assert frame.reply is not None
        await transport.publish(frame.reply, b"re:" + frame.data)


async def test_memory_requests_share_one_inbox_and_leave_nothing_behind() -> None:
    broker = MemoryBroker()
    server, client = MemoryTransport(broker, client_id="server"), MemoryTransport(broker, client_id="client")
    await server.connect()
    await client.connect()
    async with asyncio.TaskGroup() as tg:
        echo = tg.create_task(_echo(server, "svc.echo"))
        replies = await asyncio.gather(*(client.request("svc.echo", str(i).encode()) for i in range(200)))
        assert [r.data for r in replies] == [f"re:{i}".encode() for i in range(200)]
        for i in range(800):
            assert (await client.request("svc.echo", b"x")).data == b"re:x"
        assert len(client._subs) == 1  # the one reply inbox
        assert client._replies is not None and client._replies.waiting == {}
        assert len(broker._subs) == 2  # the echo service and the client's inbox
        with pytest.raises(NoResponders):
            await client.request("svc.nobody", b"x")
        await server.close()
        echo.cancel()
    await client.close()
    assert broker._subs == []


async def test_memory_request_timeout_and_close_while_waiting() -> None:
    broker = MemoryBroker()
    silent, client = MemoryTransport(broker), MemoryTransport(broker)
    await silent.connect()
    await client.connect()
    heard = await silent.subscribe("svc.silent")
    with pytest.raises(RequestTimeout):
        await client.request("svc.silent", b"x", timeout=0.05)
    assert client._replies is not None and client._replies.waiting == {}
    assert (await heard.next(timeout=5)).data == b"x"
    waiting = asyncio.create_task(client.request("svc.silent", b"y", timeout=30))
    assert (await heard.next(timeout=5)).data == b"y"  # the request is out: its reply is awaited
    await client.close()
    with pytest.raises(ClosedError):
        await waiting
    await silent.close()


# -- a broken NVML is logged --------------------------------------------------------------------------------
class _NvmlBroken(Exception):
    pass


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, *, init_fails: bool) -> None:
    fake = types.ModuleType("pynvml")

    def init() -> None:
        if init_fails:
            raise _NvmlBroken("Driver/library version mismatch")

    def count() -> int:
        raise _NvmlBroken("GPU is lost")

    fake.nvmlInit = init  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("shutil.which", lambda name: None)  # no nvidia-smi either
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # nor a torch another test imported


@pytest.mark.parametrize("init_fails", [True, False])
def test_a_broken_nvml_is_logged_not_silent(monkeypatch: pytest.MonkeyPatch, init_fails: bool) -> None:
    _fake_pynvml(monkeypatch, init_fails=init_fails)
    with capture_logs() as logs:
        gpus, source = detect_gpus()
    assert (gpus, source) == ([], "none")
    warnings = [e for e in logs if e["log_level"] == "warning" and "NVML" in e["event"]]
    assert len(warnings) == 1
    assert ("version mismatch" if init_fails else "GPU is lost") in warnings[0]["error"]


# -- piped tables ---------------------------------------------------------------------------------------------
def test_a_piped_console_is_wide_and_columns_still_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.delenv("COLUMNS", raising=False)
    buffer = io.StringIO()
    console = _Console(file=buffer, highlight=False, soft_wrap=True)
    table = Table(box=None)
    for name in "ABCDEFG":
        table.add_column(name, no_wrap=True)
    table.add_row(*[f"{name}-" + "x" * 20 for name in "ABCDEFG"])
    console.print(table)
    assert console.width == PIPE_WIDTH
    assert "G-" + "x" * 20 in buffer.getvalue()  # rich's 80 columns would cut the last cells to "…"
    monkeypatch.setenv("COLUMNS", "60")
    assert _Console(file=io.StringIO()).width == 60
    assert _Console(file=io.StringIO(), width=90).width == 90


# -- help on every option; `fedbus agents --json` -------------------------------------------------------------
def _options(command: object, path: str = "") -> list[tuple[str, object]]:
    import click

    assert isinstance(command, click.Command)
    found = [(f"{path} {command.name}", p) for p in command.params if isinstance(p, click.Option)]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found += _options(sub, f"{path} {command.name}")
    return found


def test_every_launch_option_has_help() -> None:
    missing = [f"{where} {opt.opts[0]}" for where, opt in _options_of_launch()  # type: ignore[attr-defined]
               if not opt.help and not opt.hidden]  # type: ignore[attr-defined]
    assert missing == []


def _options_of_launch() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for command in LAUNCH_COMMANDS:
        found += _options(command)
    return found


def test_agents_help_lists_json() -> None:
    result = CliRunner().invoke(next(c for c in LAUNCH_COMMANDS if c.name == "agents"), ["--help"])
    assert result.exit_code == 0 and "--json" in result.output


async def test_agents_json_prints_one_object_per_agent(fresh_nats: NatsServer) -> None:
    beats = [
        AgentHeartbeat(agent_id="gpu-a", kind="gpu", status="ready", instance="i1", seq=3, interval_s=1.0,
                       address="10.0.0.1", capacity=Capacity(gpus=2, free_gpus=1, gpu_model="A100")),
        AgentHeartbeat(agent_id="gpu-b", kind="gpu", status="busy", instance="i2", seq=7, interval_s=1.0),
    ]
    async with Bus(NatsTransport(fresh_nats.url), source="small-fixes") as bus:
        live = await (await open_stores(bus)).key_value(LIVENESS_BUCKET, ttl=60)
        for hb in beats:
            await live.put(hb.agent_id, msgspec.msgpack.encode(hb))
    proc = await asyncio.create_subprocess_exec(
        FEDBUS, "agents", "--json", "--server", fresh_nats.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [(r["agent_id"], r["status"], r["seq"]) for r in rows] == [("gpu-a", "ready", 3), ("gpu-b", "busy", 7)]
    assert rows[0]["capacity"]["gpu_model"] == "A100" and rows[1]["capacity"] is None
