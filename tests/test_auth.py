"""The secure broker, attacked with real clients: raw nats-py, mosquitto_pub/sub, plain paho and our SDK.

One nats-server per module, started by the authority exactly as ``fedbus up`` starts it: TLS on NATS and
MQTT, only issued users, each limited to what its role's declarations allow.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import nats
import nats.errors
import paho.mqtt.client as paho
import pytest

from fedbus.bus import connect
from fedbus.bus.authority import Authority
from fedbus.bus.broker import NatsServer
from fedbus.bus.creds import IDENTITIES_BUCKET, Credentials
from fedbus.bus.errors import ConnectError, FedbusError
from fedbus.bus.permissions import inbox_prefix
from fedbus.bus.stores import open_stores
from fedbus.edge_sdk import EdgeClient

MOSQUITTO_PUB = shutil.which("mosquitto_pub")


class Secure:
    def __init__(self, authority: Authority, server: NatsServer) -> None:
        self.authority = authority
        self.server = server
        self.creds: dict[str, Credentials] = {}

    def issue(self, role: str, ident: str) -> Credentials:
        creds = self.authority.issue(role, ident)
        self.creds[ident] = creds
        assert self.authority.apply()
        return creds

    @property
    def ca(self) -> Path:
        return self.authority.pki.ca_cert

    @property
    def mqtt_port(self) -> int:
        assert self.server.mqtt_port
        return self.server.mqtt_port


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    authority = Authority(tmp_path_factory.mktemp("secure"))
    with authority.server() as server:
        authority.record(server)
        s = Secure(authority, server)
        s.creds["admin"] = authority.admin_creds()
        for role, ident in (("scheduler", "sched-1"), ("gpu-agent", "gpu-1"), ("device", "dev-1"),
                            ("device", "dev-2")):
            s.issue(role, ident)
        yield s


async def raw(secure: Secure, ident: str, errors: list[str] | None = None) -> nats.NATS:
    creds = secure.creds[ident]

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(secure.server.url, user=creds.user, password=creds.password,
                              tls=creds.ssl_context(), inbox_prefix=inbox_prefix(ident), error_cb=on_error,
                              allow_reconnect=False, connect_timeout=3)


class Watch:
    """An admin subscription: did a subject get a message before the marker that follows it?"""

    def __init__(self, nc: nats.NATS, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.got: list[bytes] = []
        self.marker = asyncio.Event()

    async def start(self) -> Watch:
        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            if msg.data == b"MARKER":
                self.marker.set()
            else:
                self.got.append(msg.data)

        await self.nc.subscribe(self.subject, cb=on_msg)
        await self.nc.flush()
        return self

    async def settle(self) -> list[bytes]:
        await self.nc.publish(self.subject, b"MARKER")
        await asyncio.wait_for(self.marker.wait(), 5)
        return self.got


@pytest.fixture
async def admin(secure: Secure) -> AsyncIterator[nats.NATS]:
    nc = await raw(secure, "admin")
    yield nc
    await nc.close()


# -- nobody gets in without a credential, and clients only trust the deployment's CA --------------------------
async def test_unauthenticated_nats_refused(secure: Secure) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secure.server.url, tls=secure.creds["admin"].ssl_context(), allow_reconnect=False,
                           connect_timeout=3)
    wrong = secure.creds["gpu-1"]
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secure.server.url, user=wrong.user, password="guessed", tls=wrong.ssl_context(),
                           allow_reconnect=False, connect_timeout=3)


async def test_plaintext_nats_refused(secure: Secure) -> None:
    """A client that does not speak TLS cannot talk to the broker at all."""
    creds = secure.creds["gpu-1"]
    plain = secure.server.url.replace("tls://", "nats://")
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        await nats.connect(plain, user=creds.user, password=creds.password, allow_reconnect=False,
                           connect_timeout=3)


async def test_client_refuses_a_server_signed_by_another_ca(secure: Secure, tmp_path: Path) -> None:
    other = Authority(tmp_path / "other")
    other.init()
    real = secure.creds["gpu-1"]
    forged = Credentials(**{**real.__dict__, "ca_pem": other.pki.ca_pem(), "path": None})
    with pytest.raises(ConnectError) as info:
        async with connect(secure.server.url, source="gpu-1", creds=forged):
            pass
    assert info.value.refused


async def test_unauthenticated_mqtt_refused(secure: Secure) -> None:
    ctx = ssl.create_default_context(cafile=str(secure.ca))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", secure.mqtt_port, tls_context=ctx, identifier="anon-1", timeout=3):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", secure.mqtt_port, tls_context=ctx, identifier="anon-2",
                                  username="dev-1", password="guessed", timeout=3):
            pass


def test_mqtt_device_over_tls_with_plain_paho(secure: Secure) -> None:
    """Any MQTT 3.1.1 client works with the creds file: user, password and the CA from it."""
    creds = secure.creds["dev-1"]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-dev-1", protocol=paho.MQTTv311)
    client.username_pw_set(creds.user, creds.password)
    client.tls_set(ca_certs=str(secure.ca))
    client.connect("127.0.0.1", secure.mqtt_port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish("fedbus/edge/status/dev-1", b"x", qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
    # Without the CA the broker's certificate is not trusted.
    untrusting = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-dev-1b", protocol=paho.MQTTv311)
    untrusting.username_pw_set(creds.user, creds.password)
    untrusting.tls_set()
    with pytest.raises(ssl.SSLError):
        untrusting.connect("127.0.0.1", secure.mqtt_port, keepalive=10)


async def test_sdk_device_with_creds_file_meets_a_nats_agent(secure: Secure, admin: nats.NATS,
                                                             tmp_path: Path) -> None:
    path = secure.creds["dev-2"].dump(tmp_path / "dev-2.creds")
    watch = await Watch(admin, "fedbus.edge.metrics.dev-2").start()
    async with EdgeClient.from_creds(path, batch_points=1) as edge:
        await edge.log_metrics({"temp_c": 40.0})
        await edge.flush_metrics()
    for _ in range(50):
        if watch.got:
            break
        await asyncio.sleep(0.1)
    assert watch.got, "the device's metrics did not reach the NATS side"


# -- least privilege ----------------------------------------------------------------------------------------
async def test_device_cannot_submit_jobs_with_mosquitto_pub(secure: Secure, admin: nats.NATS) -> None:
    """Finding 1: a raw jobs.submit on the MQTT port ran a shell command on a GPU agent."""
    creds = secure.creds["dev-1"]
    watch = await Watch(admin, "fedbus.jobs.submit.>").start()
    assert MOSQUITTO_PUB is not None, "mosquitto_pub is needed (Debian: mosquitto-clients; .ci/run installs it)"
    for topic in ("fedbus/jobs/submit/evil", "fedbus/jobs/cancel/victim", "fedbus/edge/status/dev-2"):
        argv = [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(secure.mqtt_port), "--cafile", str(secure.ca),
                "-u", creds.user, "-P", creds.password, "-q", "1", "-i", "mp-dev-1", "-t", topic, "-m", "id"]
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=20, check=False)
        assert done.returncode == 0, done.stderr
    assert await watch.settle() == []


async def test_device_reads_only_what_is_addressed_to_it(secure: Secure, admin: nats.NATS) -> None:
    creds = secure.creds["dev-1"]
    ctx = ssl.create_default_context(cafile=str(secure.ca))
    async with aiomqtt.Client("127.0.0.1", secure.mqtt_port, tls_context=ctx, identifier="sub-dev-1",
                              username=creds.user, password=creds.password, timeout=5) as client:
        for forbidden in ("fedbus/#", "fedbus/jobs/offer/dev-2", "fedbus/jobs/log/+", "fedbus/agents/heartbeat/+"):
            granted = await client.subscribe(forbidden, qos=1)
            assert [int(getattr(q, "value", q)) for q in granted] == [0x80], forbidden
        granted = await client.subscribe("fedbus/jobs/offer/dev-1", qos=1)
        assert [int(getattr(q, "value", q)) for q in granted] == [1]
        await admin.publish("fedbus.jobs.offer.dev-2", b"not yours")
        await admin.publish("fedbus.jobs.offer.dev-1", b"yours")
        message = await asyncio.wait_for(anext(aiter(client.messages)), 5)
        assert message.payload == b"yours"


async def test_gpu_agent_cannot_award_or_write_keys(secure: Secure, admin: nats.NATS) -> None:
    errors: list[str] = []
    gpu = await raw(secure, "gpu-1", errors)
    try:
        watch = await Watch(admin, "fedbus.jobs.>").start()
        await gpu.publish("fedbus.jobs.award.gpu-1", b"self-award")
        await gpu.publish("fedbus.jobs.submit.x", b"submit")
        await gpu.publish("fedbus.jobs.status.x", b"forged status")
        await gpu.flush()
        assert await watch.settle() == []
        assert any("permissions violation" in e.lower() for e in errors), errors
        # The agent may do what its role is for: report on a job.
        await gpu.publish("fedbus.jobs.bid.x", b"bid")
        await gpu.flush()
        watch2 = await Watch(admin, "fedbus.jobs.bid.y").start()
        await gpu.publish("fedbus.jobs.bid.y", b"bid")
        await gpu.flush()
        assert await watch2.settle() == [b"bid"]
    finally:
        await gpu.close()


async def test_only_admin_writes_identities(secure: Secure) -> None:
    """Finding 3: the key buckets were writable by any client, so a forged key made a forged report count."""
    async with connect(secure.server.url, source="admin", creds=secure.creds["admin"]) as bus:
        stores = await open_stores(bus)
        bucket = await stores.key_value(IDENTITIES_BUCKET)
        await bucket.put("gpu-1", secure.creds["gpu-1"].identity().encode())
        await stores.key_value("agent-keys")
    async with connect(secure.server.url, source="gpu-1", creds=secure.creds["gpu-1"]) as bus:
        legacy = await (await open_stores(bus)).key_value("agent-keys")
        with pytest.raises(FedbusError):
            await legacy.put("sched-1", b"\x00" * 32)
    async with connect(secure.server.url, source="gpu-1", creds=secure.creds["gpu-1"]) as bus:
        bucket = await (await open_stores(bus)).key_value(IDENTITIES_BUCKET)
        assert (await bucket.get("gpu-1")).value == secure.creds["gpu-1"].identity().encode()
        with pytest.raises(FedbusError):
            await bucket.put("sched-1", secure.creds["gpu-1"].identity().encode())
    async with connect(secure.server.url, source="admin", creds=secure.creds["admin"]) as bus:
        bucket = await (await open_stores(bus)).key_value(IDENTITIES_BUCKET)
        assert not await _has(bucket, "sched-1")


async def _has(bucket: object, key: str) -> bool:
    try:
        await bucket.get(key)  # type: ignore[attr-defined]
    except FedbusError:
        return False
    return True


async def test_inboxes_are_private(secure: Secure) -> None:
    errors: list[str] = []
    gpu = await raw(secure, "gpu-1", errors)
    try:
        await gpu.subscribe("_INBOX.>")
        await gpu.subscribe(f"{inbox_prefix('sched-1')}.>")
        await gpu.flush()
        await asyncio.sleep(0.2)
        assert sum("permissions violation" in e.lower() for e in errors) == 2, errors
    finally:
        await gpu.close()


# -- revocation ----------------------------------------------------------------------------------------------
async def test_revoked_credential_stops_working_within_seconds(secure: Secure) -> None:
    creds = secure.issue("gpu-agent", "gpu-doomed")
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(secure.server.url, user=creds.user, password=creds.password, tls=creds.ssl_context(),
                            inbox_prefix=inbox_prefix("gpu-doomed"), closed_cb=on_closed, allow_reconnect=False)
    assert nc.is_connected
    secure.authority.revoke("gpu-doomed")
    assert secure.authority.apply()
    await asyncio.wait_for(closed.wait(), 10)  # the broker closed the revoked user's live connection
    assert nc.is_closed
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secure.server.url, user=creds.user, password=creds.password, tls=creds.ssl_context(),
                           allow_reconnect=False, connect_timeout=3)
    with pytest.raises(ConnectError) as info:
        async with connect(secure.server.url, source="gpu-doomed", creds=creds):
            pass
    assert info.value.refused


async def test_an_expired_credential_stops_working(secure: Secure) -> None:
    creds = secure.authority.issue("gpu-agent", "gpu-brief", expires_s=1.0)
    assert secure.authority.apply()
    nc = await nats.connect(secure.server.url, user=creds.user, password=creds.password, tls=creds.ssl_context(),
                            allow_reconnect=False, connect_timeout=3)
    await nc.close()
    while not creds.expired():
        await asyncio.sleep(0.05)
    assert secure.authority.apply()  # what `fedbus up` does every few seconds
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secure.server.url, user=creds.user, password=creds.password, tls=creds.ssl_context(),
                           allow_reconnect=False, connect_timeout=3)
    listed = {e.id: e for e in secure.authority.credentials()}
    assert not listed["gpu-brief"].active
