"""Shared fixtures: real brokers started on free ports, per session or per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from fedbus.bus.broker import NatsServer

# Tests never talk to a developer's broker by accident: no saved context, no creds, no server from the shell.
os.environ["FEDBUS_CONTEXT"] = str(Path(tempfile.mkdtemp(prefix="fedbus-test-ctx-")) / "context.json")
for _name in ("FEDBUS_CREDS", "FEDBUS_SERVER"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True)
def _own_context(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and each `fedbus up` it starts) has a context file of its own."""
    monkeypatch.setenv("FEDBUS_CONTEXT", str(tmp_path_factory.mktemp("ctx") / "context.json"))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server (JetStream + MQTT listener) shared by the session's tests."""
    with NatsServer(data_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that stop, kill or restart it."""
    with NatsServer(data_dir=tmp_path / "nats") as server:
        yield server


# -- Mosquitto: a real second MQTT broker, when the binary exists (it does here and on CI) ------------------
# Tests that use it are parametrised only when MOSQUITTO is found, so a machine without it generates no such
# test rather than skipping one.

import os as _os
import shutil as _shutil
import signal as _signal
import socket as _socket
import subprocess as _subprocess
import time as _time

from fedbus.bus.broker import free_port as _free_port


def _find_mosquitto() -> str | None:
    found = _shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if _os.access(candidate, _os.X_OK):
            return candidate
    return None


MOSQUITTO: str | None = _find_mosquitto()


class MosquittoServer:
    """A mosquitto process on a free port with its own config, persistence and log in ``data_dir``."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1") -> None:
        assert MOSQUITTO is not None
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = _free_port(host)
        self._proc: _subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",  # sessions and queued QoS 1 messages survive a restart
            f"persistence_location {self.data_dir.as_posix()}/",
            f"log_dest file {(self.data_dir / 'mosquitto.log').as_posix()}",
            "set_tcp_nodelay true",
        ]
        if _os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write data_dir
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 10.0) -> Self:
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(self._config())
        assert MOSQUITTO is not None
        self._proc = _subprocess.Popen(  # our binary, our config
            [MOSQUITTO, "-c", str(conf)], stdout=_subprocess.DEVNULL, stderr=_subprocess.PIPE,
            start_new_session=True,
        )
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err}")
            try:
                with _socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                _time.sleep(0.02)
        raise RuntimeError(f"mosquitto not listening on {self.port} after {timeout}s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), then wait. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(_signal.SIGTERM)
        try:
            proc.wait(10)
        except _subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> MosquittoServer:
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """One Mosquitto shared by the session's tests (only requested where ``MOSQUITTO`` is set)."""
    with MosquittoServer(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A Mosquitto of this test's own, for tests that restart it."""
    with MosquittoServer(tmp_path / "mosquitto") as server:
        yield server
