"""``fedbus up`` secure by default, as a person uses it: real processes, real ports, the saved context.

Covers the issue's findings 7 (one `up` per data dir; its nats-server dies with it) and 8 (clients follow the
port `up` actually bound), the newcomer's path (`fedbus up` in one shell, commands with no flags in another),
and credentials issued and revoked from the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FEDBUS = [sys.executable, "-m", "fedbus.bus.cli"]
MOSQUITTO_PUB = shutil.which("mosquitto_pub")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDBUS_")}
    env.update(FEDBUS_CONTEXT=str(tmp / "context.json"), HOME=str(tmp / "home"), FEDBUS_LOG_LEVEL="error")
    return env


def run(tmp: Path, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDBUS, *args], env=_env(tmp), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or tmp, check=False)


class Up:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen([*FEDBUS, "up", "--json", *args], env=_env(tmp), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"fedbus up failed: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.info = json.loads(line)

    @property
    def server_pid(self) -> int:
        return int(self.info["nodes"][0]["pid"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    broker = Up(tmp_path, "--data-dir", str(tmp_path / "data"), "--nats-port", "0", "--mqtt-port", "0")
    yield broker
    broker.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_newcomer_path_up_then_commands_with_no_flags(up: Up, tmp_path: Path) -> None:
    assert up.info["nats"].startswith("tls://") and up.info["mqtt"].startswith("mqtts://")
    assert not up.info["insecure"]
    context = json.loads(run(tmp_path, "context", "--json").stdout)
    assert context["server"] == up.info["nats"]
    assert context["identity"] == {"id": "admin", "role": "admin"}
    tail = subprocess.Popen([*FEDBUS, "tail", "fedbus.bus.>", "--count", "1", "--timeout", "30", "--json"],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None
        assert "listening" in tail.stderr.readline()  # subscribed: what is published now is seen
        published = run(tmp_path, "publish", "bus.heartbeat", "--data", '{"agent_id": "cli-1"}')
        assert published.returncode == 0, published.stderr
        output, _ = tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 0
    assert json.loads(output.splitlines()[0])["type"] == "bus.heartbeat"


def test_clients_follow_the_port_up_actually_bound(tmp_path: Path) -> None:
    """Finding 8: `up` moves off a taken port; every client must follow it, not talk to the old port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = Up(tmp_path, "--data-dir", str(tmp_path / "data"), "--nats-port", str(port), "--mqtt-port", "0")
        try:
            assert f":{port}" not in broker.info["nats"]
            assert any(str(port) in note for note in broker.info["notes"])
            context = json.loads(run(tmp_path, "context", "--json").stdout)
            assert context["server"] == broker.info["nats"]
            streams = run(tmp_path, "streams", "--json")
            assert streams.returncode == 0, streams.stderr
        finally:
            broker.stop()


def test_one_up_per_data_dir_and_its_server_dies_with_it(up: Up, tmp_path: Path) -> None:
    """Finding 7: a second `up` on the same data dir, and SIGKILL of `up`."""
    second = run(tmp_path, "up", "--data-dir", str(tmp_path / "data"), "--nats-port", "0", "--mqtt-port", "0")
    assert second.returncode == 69
    assert f"PID {up.proc.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    server = up.server_pid
    assert _alive(server)
    up.proc.kill()
    up.proc.wait()
    deadline = time.monotonic() + 10
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server), "nats-server outlived its SIGKILLed `fedbus up`"
    # And the data dir can be used again at once.
    again = Up(tmp_path, "--data-dir", str(tmp_path / "data"), "--nats-port", "0", "--mqtt-port", "0")
    again.stop()


def test_open_broker_beyond_loopback_is_refused(tmp_path: Path) -> None:
    refused = run(tmp_path, "up", "--insecure", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d"))
    assert refused.returncode == 2
    assert "without authentication" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_insecure_says_so_loudly(tmp_path: Path) -> None:
    broker = Up(tmp_path, "--insecure", "--data-dir", str(tmp_path / "data"), "--nats-port", "0",
                "--mqtt-port", "0")
    try:
        assert broker.info["nats"].startswith("nats://")
        assert broker.info["insecure"] is True
    finally:
        broker.stop()
    assert broker.proc.stderr is not None  # --json sends the human lines to stderr
    assert "INSECURE" in broker.proc.stderr.read()


def test_creds_issue_list_revoke_from_the_cli(up: Up, tmp_path: Path) -> None:
    issued = run(tmp_path, "creds", "issue", "device", "phone-1", "--out", str(tmp_path / "phone-1.creds"))
    assert issued.returncode == 0, issued.stderr
    creds = json.loads((tmp_path / "phone-1.creds").read_text())
    assert (tmp_path / "phone-1.creds").stat().st_mode & 0o777 == 0o600
    assert creds["servers"]["mqtt"] == up.info["mqtt"] and creds["role"] == "device"
    listed = {c["id"]: c for c in json.loads(run(tmp_path, "creds", "list", "--json").stdout)}
    assert listed["phone-1"]["state"] == "active" and listed["admin"]["role"] == "admin"
    assert "password" not in json.dumps(listed)
    duplicate = run(tmp_path, "creds", "issue", "device", "phone-1")
    assert duplicate.returncode != 0 and "exists" in duplicate.stderr

    assert MOSQUITTO_PUB is not None, "mosquitto_pub is needed (Debian: mosquitto-clients)"
    host, port = up.info["mqtt"].split("://")[1].rsplit(":", 1)
    ca = tmp_path / "ca.pem"
    ca.write_text(creds["ca"])

    def device_publish() -> int:
        return subprocess.run([MOSQUITTO_PUB, "-h", host, "-p", port, "--cafile", str(ca), "-u", creds["user"],
                               "-P", creds["password"], "-q", "1", "-t", "fedbus/edge/status/phone-1", "-m", "x"],
                              capture_output=True, timeout=20, check=False).returncode

    assert device_publish() == 0
    revoked = run(tmp_path, "creds", "revoke", "phone-1")
    assert revoked.returncode == 0 and "reloaded" in revoked.stdout
    assert device_publish() == 5  # MQTT CONNACK: not authorised
    listed = {c["id"]: c for c in json.loads(run(tmp_path, "creds", "list", "--json").stdout)}
    assert listed["phone-1"]["state"] == "revoked"
