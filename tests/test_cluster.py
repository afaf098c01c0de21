"""A real 3-node NATS cluster: an R3 stream keeps every acknowledged event when a node is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.bus import Bus, Catalogue, Codec, Event, event
from fedbus.bus.broker import NatsCluster
from fedbus.bus.jetstream import JetStream
from fedbus.bus.nats_transport import NatsTransport

CAT = Catalogue()


@event("cltest", "tick", key="job_id", durable=True, catalogue=CAT)
class Tick(Event):
    job_id: str
    n: int


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(size=3, data_dir=tmp_path / "cluster") as c:
        yield c


def meta_leader(cluster: NatsCluster, index: int) -> str | None:
    with urllib.request.urlopen(f"{cluster.nodes[index].monitor_url}/jsz", timeout=2) as r:
        return json.load(r).get("meta_cluster", {}).get("leader")


def test_cluster_is_ready_only_once_a_meta_leader_is_elected(cluster: NatsCluster) -> None:
    leaders = {meta_leader(cluster, i) for i in range(3)}
    assert len(leaders) == 1 and leaders <= {n.server_name for n in cluster.nodes}


async def test_r3_stream_survives_a_node_killed_while_publishing_and_consuming(cluster: NatsCluster) -> None:
    codec = Codec(catalogue=CAT)
    async with (
        Bus(NatsTransport(cluster.url, reconnect_wait=0.05), source="producer", codec=codec) as pub_bus,
        Bus(NatsTransport(cluster.url, reconnect_wait=0.05), source="consumer", codec=codec) as sub_bus,
    ):
        producer = await JetStream.open(pub_bus, replicas=3, api_timeout=1.0, publish_timeout=60.0)
        consumer_js = await JetStream.open(sub_bus, replicas=3, api_timeout=1.0, publish_timeout=60.0)
        log = producer.event_log()
        await log.ensure(Tick)
        info = await producer.js.stream_info("FEDBUS_CLTEST")
        assert info.config.num_replicas == 3 and info.cluster is not None
        victim = [n.server_name for n in cluster.nodes].index(info.cluster.leader)

        acked: list[str] = []
        consumed: set[str] = set()
        before_kill, all_acked, all_consumed = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def produce() -> None:
            for n in range(200):
                acked.append((await log.publish(Tick(job_id="t", n=n))).id)
                if n == 60:
                    before_kill.set()
            envs = await log.publish_many([Tick(job_id="t", n=200 + i) for i in range(100)])
            acked.extend(env.id for env in envs)
            all_acked.set()

        async def consume() -> None:
            async with consumer_js.event_log().consume(Tick, durable="survivor", ack_wait=5.0) as deliveries:
                async for d in deliveries:
                    consumed.add(d.envelope.id)
                    await d.ack()
                    if all_acked.is_set() and consumed >= set(acked):
                        all_consumed.set()
                        return

        async def kill_the_stream_leader() -> None:
            await before_kill.wait()
            await asyncio.to_thread(cluster.kill, victim)  # SIGKILL: no goodbye to the cluster

        async with asyncio.timeout(90), asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            tg.create_task(consume())
            tg.create_task(kill_the_stream_leader())

        assert all_consumed.is_set()
        assert not cluster.nodes[victim].running
        assert len(acked) == 300 == len(set(acked))
        stored = [s.envelope.id async for s in log.replay(Tick.pattern()) if s.envelope is not None]
        assert len(stored) == len(set(stored)), "an event was stored twice"
        assert set(stored) == set(acked), "an acknowledged event is missing"
        after = await producer.js.stream_info("FEDBUS_CLTEST")
        assert after.cluster is not None and after.cluster.leader != info.cluster.leader
