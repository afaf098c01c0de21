"""``fedbus up``: the embedded broker, secure by default.

On first start it makes, in its data dir, a CA and the broker's TLS certificate, and the admin credential; the
broker then accepts only credentials the authority issued (``fedbus creds issue``), each limited to what its
role may publish and read, over TLS on both NATS and MQTT. ``--insecure`` keeps the open broker of a throwaway
run and says so loudly; listening beyond loopback without authentication is refused. The data dir is locked
(a second ``up`` names the PID holding it) and the nats-server child dies with its parent, SIGKILL included.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click
from rich.markup import escape

from .catalogue_cli import load_events
from .console import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE, configure_logging, err, fail, out
from .context import Context, save_context
from .errors import FedbusError
from .events import CATALOGUE

__all__ = ["up"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_RENDER_EVERY_S = 10.0


def _default_data_dir(cluster: bool) -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "fedbus" / ("cluster" if cluster else "nats")


@contextlib.contextmanager
def lock_data_dir(data_dir: Path) -> Iterator[IO[str]]:
    """Hold ``<data_dir>/fedbus-up.lock`` for the life of the broker; one line and exit 69 if another holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "fedbus-up.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            fail(f"the data dir {data_dir} is in use by another `fedbus up` (PID {holder}); stop it, or pass "
                 "--data-dir", EXIT_UNAVAILABLE)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _refuse_orphan(data_dir)
        yield handle
    finally:
        handle.close()


def _refuse_orphan(data_dir: Path) -> None:
    """A nats-server still running on this JetStream store (left by an older fedbus) must not get a twin."""
    try:
        pid = int((data_dir / "nats-server.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"nats-server" in cmdline:
        fail(f"a nats-server (PID {pid}) still runs on {data_dir}; stop it first (kill {pid})", EXIT_UNAVAILABLE)


def _wait_for_stop(alive: Callable[[], bool], every: Callable[[], None]) -> bool:
    """Block until SIGINT/SIGTERM (True) or until the broker dies on its own (False); ``every`` runs on a timer."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    waited = 0.0
    try:
        while not stop.wait(0.5):
            if not alive():
                return False
            waited += 0.5
            if waited >= _RENDER_EVERY_S:
                waited = 0.0
                every()
        return True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@click.command("up")
@click.option("--nats-port", type=click.IntRange(0, 65535), default=4222, show_default=True,
              help="NATS client port; a free one is picked (and said) when it is taken. 0: any free port.")
@click.option("--mqtt-port", type=click.IntRange(0, 65535), default=1883, show_default=True,
              help="MQTT listener port for edge devices; a free one is picked when it is taken.")
@click.option("--no-mqtt", is_flag=True, help="Do not open the MQTT listener.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="JetStream storage, server config and the authority. [default: ~/.local/share/fedbus/nats]")
@click.option("--cluster", "size", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Start a local cluster of N nodes (JetStream replicated); needs --insecure for now.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--advertise", default=None, metavar="NAME",
              help="The host name or address clients on other machines use: it goes into the TLS certificate "
                   "and into every creds file issued.")
@click.option("--insecure", is_flag=True,
              help="No authentication, no TLS: anyone who reaches the ports runs jobs. Loopback only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the URLs once ready.")
def up(nats_port: int, mqtt_port: int, no_mqtt: bool, data_dir: Path | None, size: int, host: str,
       advertise: str | None, insecure: bool, as_json: bool) -> None:
    """Start the embedded broker (nats-server with JetStream and MQTT) and run until Ctrl-C."""
    configure_logging()
    say = err if as_json else out
    if insecure and host not in _LOOPBACK:
        fail(f"refusing to listen on {host} without authentication: drop --insecure (the default is "
             "authenticated TLS), or listen on 127.0.0.1", EXIT_USAGE)
    if size > 1 and not insecure:
        fail("--cluster runs without authentication for now: add --insecure (loopback only)", EXIT_USAGE)
    data_dir = Path(data_dir or _default_data_dir(size > 1)).expanduser()
    with lock_data_dir(data_dir):
        _run(data_dir=data_dir, nats_port=nats_port, mqtt_port=None if no_mqtt else mqtt_port, size=size,
             host=host, advertise=advertise, insecure=insecure, as_json=as_json, say=say)


def _run(*, data_dir: Path, nats_port: int, mqtt_port: int | None, size: int, host: str,
         advertise: str | None, insecure: bool, as_json: bool, say: object) -> None:
    from rich.console import Console

    from .authority import Authority, provision_broker
    from .broker import NatsCluster, NatsServer

    assert isinstance(say, Console)
    load_events()
    authority = None if insecure else Authority(data_dir)
    try:
        broker: NatsServer | NatsCluster
        if authority is not None and authority.init(host=host, names=[advertise] if advertise else []):
            say.print(f"made a CA, a server certificate and the admin credential in "
                      f"{escape(str(authority.dir))}")
        options: dict[str, Any] = {"host": host, "port": nats_port, "mqtt_port": mqtt_port, "server_name": "fedbus",
                   "die_with_parent": True}
        if size == 1 and authority is not None:
            broker = authority.server(CATALOGUE, **options)
        elif size == 1:
            broker = NatsServer(data_dir=data_dir, pid_file=data_dir / "nats-server.pid", **options)
        else:
            broker = NatsCluster(size=size, host=host, data_dir=data_dir, mqtt=mqtt_port is not None,
                                 base_port=nats_port)
        try:
            broker.start()
            if authority is not None:
                assert isinstance(broker, NatsServer)
                authority.record(broker, advertise=advertise)
                asyncio.run(provision_broker(authority, broker.url))
        except BaseException:
            broker.close()
            raise
    except FedbusError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot start the broker in {data_dir}: {exc}")
    nodes = broker.nodes if isinstance(broker, NatsCluster) else [broker]
    creds_path = None if authority is None else authority.admin_creds_path
    context = save_context(Context(servers={"nats": broker.url, **({"mqtt": nodes[0].mqtt_url}
                                                                   if nodes[0].mqtt_url else {})},
                                   creds=None if creds_path is None else str(creds_path), data_dir=str(data_dir),
                                   insecure=insecure, pid=os.getpid()))
    notes = [note for node in nodes for note in node.notes]
    info = {
        "nats": broker.url, "mqtt": nodes[0].mqtt_url, "monitor": nodes[0].monitor_url, "data_dir": str(data_dir),
        "notes": notes, "insecure": insecure, "creds": None if creds_path is None else str(creds_path),
        "context": str(context),
        "nodes": [{"name": n.server_name, "nats": n.url, "mqtt": n.mqtt_url, "monitor": n.monitor_url,
                   "pid": n.pid} for n in nodes],
    }
    for note in notes:
        say.print(f"[yellow]note:[/] {escape(note)}", markup=True)
    kind = f"a {size}-node cluster" if size > 1 else "nats-server"
    say.print(f"[bold green]fedbus broker is up[/] ({kind}, JetStream on, data in {escape(str(data_dir))})",
              markup=True)
    if insecure:
        say.print("[bold red]INSECURE:[/] no authentication and no TLS — anyone who can reach these ports can "
                  "run commands on every agent. For throwaway runs on this machine only.", markup=True)
    else:
        say.print(f"  TLS and authentication on; admin creds: {escape(str(creds_path))}")
    for node in nodes:
        prefix = f"{node.server_name}  " if size > 1 else ""
        say.print(f"  {prefix}NATS  {node.url}")
        if node.mqtt_url:
            say.print(f"  {prefix}MQTT  {node.mqtt_url}")
    say.print(f"  context saved to {escape(str(context))}: commands on this machine use it (`fedbus context`)")
    say.print("[dim]Ctrl-C to stop.[/]", markup=True)
    if as_json:
        click.echo(json.dumps(info))

    def refresh() -> None:  # expired credentials stop working without a restart
        if authority is not None:
            with contextlib.suppress(FedbusError, OSError):
                if authority.apply(CATALOGUE):
                    asyncio.run(provision_broker(authority, broker.url))

    try:
        stopped_by_user = _wait_for_stop(lambda: all(n.running for n in nodes), refresh)
    finally:
        say.print("stopping…")
        broker.close()
    if not stopped_by_user:
        fail("the broker exited unexpectedly (see its log in the data dir)", EXIT_FAILURE)
    say.print("stopped.")
