"""The agent runtime on an in-memory broker: identity, key registry, health, metrics, heartbeats, drain."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import msgspec
import pytest

from fedbus.agents.errors import AgentError
from fedbus.agents.events import AgentHeartbeat
from fedbus.agents.runtime import LIVENESS_BUCKET, Agent, AgentStatus, RuntimeConfig
from fedbus.agents.trust import KEYS_BUCKET
from fedbus.bus.client import Bus
from fedbus.bus.memory import MemoryBroker, MemoryTransport
from fedbus.bus.signing import AgentKey
from fedbus.bus.stores import open_stores


class Probe(Agent):
    kind = "probe"
    drained = False

    async def on_drain(self) -> None:
        self.drained = True


def _config(tmp_path: Path, **kw: object) -> RuntimeConfig:
    return RuntimeConfig(state_dir=tmp_path / "state", heartbeat_s=0.05, **kw)  # type: ignore[arg-type]


async def test_identity_and_key_survive_restarts(tmp_path: Path) -> None:
    broker = MemoryBroker()
    first = Probe(_config(tmp_path, agent_id="probe-1"), transport=MemoryTransport(broker))
    async with first:
        kid = first.key.kid
    again = Probe(_config(tmp_path), transport=MemoryTransport(broker))  # no id given: the stored one
    async with again:
        assert again.agent_id == "probe-1" and again.key.kid == kid
        keys = await open_stores(again.bus)
        stored = await (await keys.key_value(KEYS_BUCKET)).get("probe-1")
        assert stored.value == again.key.public_raw


async def test_an_id_registered_with_another_key_is_refused(tmp_path: Path) -> None:
    broker = MemoryBroker()
    async with Bus(MemoryTransport(broker), source="someone") as bus:
        keys = await (await open_stores(bus)).key_value(KEYS_BUCKET)
        await keys.create("probe-1", AgentKey.generate().public_raw)
    agent = Probe(_config(tmp_path, agent_id="probe-1"), transport=MemoryTransport(broker))
    with pytest.raises(AgentError, match="registered with another key"):
        await agent.start()
    assert agent.status is AgentStatus.STOPPED


async def test_health_metrics_heartbeats_and_drain(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agent = Probe(_config(tmp_path, agent_id="probe-2"), transport=MemoryTransport(broker))
    async with Bus(MemoryTransport(broker), source="watcher") as watcher:
        beats = await watcher.subscribe(AgentHeartbeat, key="probe-2")
        async with agent:
            first = (await beats.next(timeout=5)).event
            second = (await beats.next(timeout=5)).event
            assert (first.status, second.seq - first.seq) == ("ready", 1)
            assert agent.health_url is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{agent.health_url}/healthz") as r:
                    assert r.status == 200 and (await r.json())["status"] == "ready"
                async with http.get(f"{agent.health_url}/metrics") as r:
                    text = await r.text()
            assert 'fedbus_up{agent_id="probe-2",kind="probe"} 1' in text
            assert "fedbus_heartbeats_total" in text
            live = await (await open_stores(watcher)).key_value(LIVENESS_BUCKET)
            entry = msgspec.msgpack.decode((await live.get("probe-2")).value, type=AgentHeartbeat)
            assert entry.agent_id == "probe-2"
        statuses = []
        while (d := await beats.next(timeout=5)).event.status != "stopped":
            statuses.append(d.event.status)
        assert "draining" in statuses and agent.drained
        assert "probe-2" not in await live.keys()  # gone from `fedbus agents` at once
        await agent.close()  # idempotent
