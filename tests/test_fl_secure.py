"""Federated learning on the secure broker: the broker `fedbus up` starts (TLS, only issued users, each with
its role's permissions), an aggregator and FL clients with their own issued credentials.

One broker per module, made by an :class:`Authority` in a temp dir exactly as ``fedbus up`` makes it, with
every stream and bucket provisioned as admin. Then: a FedAvg run of real ``fedbus agent aggregator`` and
``fedbus fl client`` processes; the same in one process (what ``make demo`` runs); what an ``fl-client``
credential cannot do (publish the aggregator's events, read another client's invitation or the aggregator's
state); and the aggregator's refusal of client events that are not signed by their sender's registered key.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import numpy as np
import pytest
import yaml

from fedbus.aggregator.config import parse_config
from fedbus.aggregator.events import ClientHeartbeat, ClientJoin, ModelRef, ModelUpdate
from fedbus.aggregator.federation import SimulationOptions, identity_clients, open_object_store, simulate
from fedbus.bus.authority import Authority, provision_broker
from fedbus.bus.broker import NatsServer
from fedbus.bus.client import Bus, Security
from fedbus.bus.connect import connect, transport_for
from fedbus.bus.context import Context, save_context
from fedbus.bus.creds import Credentials
from fedbus.bus.errors import FedbusError
from fedbus.bus.permissions import inbox_prefix

FEDBUS = [sys.executable, "-m", "fedbus.bus.cli"]
LOGREG_DIM = 64 * 10 + 10  # logistic regression on 8x8 digits


@dataclass
class Secure:
    authority: Authority
    server: NatsServer
    root: Path
    creds: dict[str, Credentials] = field(default_factory=dict)

    def file(self, ident: str) -> Path:
        return self.creds[ident].dump(self.root / f"{ident}.creds")

    @property
    def env(self) -> dict[str, str]:
        """A process environment with no context or credential but what a command is given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDBUS_")}
        env.update(FEDBUS_CONTEXT=str(self.root / "no-context.json"), OMP_NUM_THREADS="1")
        return env


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("fl-secure")
    authority = Authority(root / "data")
    with authority.server(mqtt_port=None) as server:
        authority.record(server)
        s = Secure(authority, server, root)
        s.creds["admin"] = authority.admin_creds()
        for role, ident in (("aggregator", "agg-1"), ("fl-client", "silo-1"), ("fl-client", "silo-2"),
                            ("fl-client", "silo-3"), ("gpu-agent", "gpu-1"), ("device", "phone-1")):
            s.creds[ident] = authority.issue(role, ident)
        authority.apply()
        asyncio.run(provision_broker(authority, server.url))
        yield s


SILOS = ("silo-1", "silo-2", "silo-3")


# -- federations ---------------------------------------------------------------------------------------------
def _run(run_id: str, clients: int) -> dict[str, Any]:
    """A short FedAvg on digits with ``clients`` clients, all of them in every round."""
    return {"run_id": run_id, "rounds": 2, "seed": 0, "model": {"name": "logreg"},
            "data": {"name": "digits", "partition": "iid"},
            "clients": {"count": clients, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "round": {"min_clients": clients, "min_available": clients, "heartbeat_s": 0.3,
                      "heartbeat_timeout_s": 3.0, "evaluate_every": 1, "timeout_s": 60}}


@pytest.mark.slow
def test_aggregator_and_clients_as_processes_with_their_own_credentials(secure: Secure) -> None:
    """The deployed shape: ``fedbus agent aggregator --creds`` and two ``fedbus fl client --creds`` processes
    (two, not three: each process imports torch, seconds of CPU apiece)."""
    config = secure.root / "procs.yaml"
    config.write_text(yaml.safe_dump(_run("procs", 2)))
    silos = SILOS[:2]
    initial = secure.root / "initial.npy"
    np.save(initial, np.zeros(LOGREG_DIM, np.float32))
    common = {"env": secure.env, "cwd": secure.root, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
              "text": True}
    aggregator = subprocess.Popen([*FEDBUS, "agent", "aggregator", str(config), "--creds", str(secure.file("agg-1")),
                                   "--initial-model", str(initial), "--json"], **common)  # type: ignore[call-overload]
    clients = [subprocess.Popen([*FEDBUS, "fl", "client", str(config), "--index", str(i), "--creds",
                                 str(secure.file(ident))], **common)  # type: ignore[call-overload]
               for i, ident in enumerate(silos)]
    try:
        out, err = aggregator.communicate(timeout=90)
        assert aggregator.returncode == 0, err[-3000:]
        report = json.loads(out[out.index("{"):])
        assert (report["status"], report["version"]) == ("ok", 2)
        assert [h["clients"] for h in report["history"]] == [2, 2]
        assert report["final"]["eval_accuracy"] > 0.8, report["final"]
        assert "client event refused" not in err and "on first use" not in err
        for ident, client in zip(silos, clients, strict=True):
            _, client_err = client.communicate(timeout=30)
            assert client.returncode == 0, client_err[-3000:]
            assert f"{ident}: finished, 2 fits, 2 evaluations" in client_err  # its id is its credential's
    finally:
        for proc in (aggregator, *clients):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_in_process_federation_with_per_role_credentials(secure: Secure) -> None:
    """What ``make demo`` runs: every agent on its own connection with its own credential."""
    from fedbus.trainer.setup import prepare

    config = parse_config(_run("in-process", 3))
    federation = prepare(config)
    result = await simulate(config, federation.trainers, federation.initial,
                            options=SimulationOptions(server=secure.server.url,
                                                      aggregator_creds=secure.creds["agg-1"],
                                                      client_creds=[secure.creds[i] for i in SILOS]),
                            evaluate_fn=federation.evaluate)
    assert (result.status, result.version) == ("ok", 2)
    assert [h["clients"] for h in result.history] == [3, 3]
    assert result.history[-1]["test_accuracy"] > 0.8, result.history[-1]


def test_fl_run_as_admin_through_the_saved_context(secure: Secure) -> None:
    """``fedbus fl run --simulate`` on the secure broker needs no flag but ``--server``: the admin context
    ``fedbus up`` saved logs it in."""
    context = secure.root / "context.json"
    save_context(Context(servers=secure.authority.servers(), creds=str(secure.authority.admin_creds_path)),
                 context)
    config = secure.root / "admin.yaml"
    config.write_text(yaml.safe_dump(_run("admin-run", 2)))
    done = subprocess.run([*FEDBUS, "fl", "run", str(config), "--simulate", "2", "--server", secure.server.url,
                           "--json"], env={**secure.env, "FEDBUS_CONTEXT": str(context)}, capture_output=True,
                          text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert (report["status"], report["version"]) == ("ok", 2)


def test_a_client_credential_of_another_role_is_refused_in_one_line(secure: Secure) -> None:
    config = secure.root / "role.yaml"
    config.write_text(yaml.safe_dump(_run("role", 3)))
    done = subprocess.run([*FEDBUS, "fl", "client", str(config), "--index", "0", "--creds",
                           str(secure.file("gpu-1"))], env=secure.env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 77, done.stderr
    assert done.stderr.count("\n") == 1 and "fl-client" in done.stderr and "gpu-agent" in done.stderr


# -- what an fl-client credential cannot do --------------------------------------------------------------------
async def _raw(secure: Secure, ident: str, errors: list[str]) -> nats.NATS:
    creds = secure.creds[ident]

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(secure.server.url, user=creds.user, password=creds.password,
                              tls=creds.ssl_context(), inbox_prefix=inbox_prefix(ident), error_cb=on_error,
                              allow_reconnect=False, connect_timeout=3)


@pytest.fixture
async def admin(secure: Secure) -> AsyncIterator[nats.NATS]:
    nc = await _raw(secure, "admin", [])
    yield nc
    await nc.close()


async def _seen(admin: nats.NATS, subject: str, send: object) -> list[bytes]:
    """What an admin subscriber on ``subject`` gets of what ``send()`` publishes, up to a marker the admin
    sends after it (the server handles one connection's messages in order)."""
    got: list[bytes] = []
    marker = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        if msg.data == b"MARKER":
            marker.set()
        else:
            got.append(msg.data)

    sub = await admin.subscribe(subject, cb=on_msg)
    await admin.flush()
    await send()  # type: ignore[operator]
    await admin.publish(subject, b"MARKER")
    await asyncio.wait_for(marker.wait(), 5)
    await sub.unsubscribe()
    return got


async def test_fl_client_cannot_publish_the_aggregators_events(secure: Secure, admin: nats.NATS) -> None:
    errors: list[str] = []
    client = await _raw(secure, "silo-1", errors)
    try:
        for subject in ("fedbus.fl.round_start.victim-run", "fedbus.fl.global_model.victim-run",
                        "fedbus.fl.finished.victim-run", "fedbus.fl.invite.silo-2"):
            async def forge(subject: str = subject) -> None:
                await client.publish(subject, b"forged")
                await client.flush()

            assert await _seen(admin, subject, forge) == [], subject
        assert sum("permissions violation" in e.lower() for e in errors) == 4, errors

        async def heartbeat() -> None:  # the control: what its role is for reaches the aggregator's side
            await client.publish("fedbus.fl.heartbeat.victim-run", b"alive")
            await client.flush()

        assert await _seen(admin, "fedbus.fl.heartbeat.victim-run", heartbeat) == [b"alive"]
    finally:
        await client.close()


async def test_fl_client_reads_only_its_own_invitations_and_not_the_aggregators_state(secure: Secure) -> None:
    errors: list[str] = []
    client = await _raw(secure, "silo-1", errors)
    try:
        await client.subscribe("fedbus.fl.invite.silo-2")
        await client.subscribe("fedbus.fl.invite.*")
        await client.flush()
        for _ in range(50):  # the refusals come back asynchronously
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sum("permissions violation" in e.lower() for e in errors) == 2, errors
    finally:
        await client.close()
    async with connect(secure.server.url, source="silo-1", creds=secure.creds["silo-1"]) as bus:
        shared = await open_object_store(bus, fallback=None)  # the `fl` bucket: read and write
        await shared.put_bytes("probe/silo-1", b"x")
        assert await shared.get_bytes("probe/silo-1") == b"x"
        with pytest.raises(FedbusError):
            await open_object_store(bus, fallback=None, bucket="fl-state")


# -- the aggregator's check of client events --------------------------------------------------------------------
async def test_only_registered_clients_signing_with_their_own_key_count(secure: Secure) -> None:
    update = ModelUpdate(run_id="check", round=1, client_id="silo-2", base_version=0,
                         update=ModelRef(sha256="0" * 64, length=1, inline=b"\0\0\0\0"), num_examples=1)
    async with connect(secure.server.url, source="agg-1", creds=secure.creds["agg-1"],
                       security=Security.OFF) as agg, \
            await agg.subscribe(ModelUpdate, key="check") as updates, \
            await agg.subscribe(ClientJoin, key="check") as joins, \
            await agg.subscribe(ClientHeartbeat, key="check") as beats:
        await agg.transport.flush()
        clients = await identity_clients(agg)

        async def verdict(sender: str, event: object, *, source: str | None = None, sign: bool = True) -> str | None:
            creds = secure.creds[sender]
            async with Bus(transport_for(secure.server.url, creds=creds), source=source or sender,
                           key=creds.signing_key if sign else None, sign_all=True) as bus:
                await bus.publish(event)  # type: ignore[arg-type]
                await bus.transport.flush()
            sub = {ModelUpdate: updates, ClientJoin: joins, ClientHeartbeat: beats}[type(event)]
            return await clients.check(await sub.next(5))

        assert await verdict("silo-2", update) is None
        # silo-1 speaks as silo-2, signing with its own key: the key is not silo-2's.
        assert "not by 'silo-2'" in (await verdict("silo-1", update, source="silo-2") or "")
        assert "must sign" in (await verdict("silo-2", update, sign=False) or "")
        join = ClientJoin(run_id="check", client_id="phone-1", num_examples=1)
        assert await verdict("phone-1", join) is None  # a device may take part (fl events are open to devices)
        beat = ClientHeartbeat(run_id="check", client_id="silo-3")
        assert "not a registered identity" in (await verdict("silo-3", beat, source="silo-9") or "")
