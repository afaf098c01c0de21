"""A second MQTT broker for the benchmarks: Mosquitto on a free port, when its binary exists.

The tests have a fuller helper (tests/conftest.py, with persistence and restarts); benchmarks need only a
clean broker that starts, listens on loopback and goes away::

    if (binary := find_mosquitto()) is not None:
        with Mosquitto(binary) as broker:
            ... broker.url ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from fedbus.bus.broker import free_port

__all__ = ["Mosquitto", "find_mosquitto"]


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (on PATH or in the usual sbin folders), or ``None``."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class Mosquitto:
    """A mosquitto process on a free loopback port, without persistence, logging into a temporary folder."""

    def __init__(self, binary: str, *, host: str = "127.0.0.1", ready_timeout: float = 10.0) -> None:
        self.binary = binary
        self.host = host
        self.port = 0
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start it and wait until it accepts connections; raises ``RuntimeError`` if it does not."""
        self._tmp = tempfile.TemporaryDirectory(prefix="fedbus-bench-mosquitto-")
        folder = Path(self._tmp.name)
        self.port = free_port(self.host)
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false",
                 f"log_dest file {(folder / 'mosquitto.log').as_posix()}", "set_tcp_nodelay true",
                 "max_queued_messages 100000"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write the log
        conf = folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self.stop()
                raise RuntimeError(f"mosquitto exited with {rc}: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto not listening on {self.host}:{self.port} after {self.ready_timeout}s")

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL after 10 s); removes the temporary folder. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
