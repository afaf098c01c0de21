"""The ``fedbus`` command. Each package contributes commands through the ``fedbus.cli`` entry point group.

An entry point names a list of ``click.Command`` objects. Groups of the same name from several packages are
merged, so ``fedbus agent gpu`` (agents) and ``fedbus agent aggregator`` (aggregator) live side by side.
Command modules import their heavy dependencies (numpy, torch, aiohttp, the daemons) inside the commands that
need them, so ``fedbus --help`` and ``fedbus tail`` start fast, and work on a core install without extras.
Every client command takes ``--server URL`` (or ``FEDBUS_SERVER``); see :func:`server_option`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import click

from .connect import DEFAULT_URL
from .console import configure_logging

__all__ = ["main", "server_option"]

F = TypeVar("F", bound=Callable[..., Any])


def _export_creds(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Every connection this command makes uses the creds file (fedbus.bus.connect reads FEDBUS_CREDS).
    if value:
        os.environ["FEDBUS_CREDS"] = value
    return value


def server_option(func: F) -> F:
    """``--server URL`` (``FEDBUS_SERVER``) and ``--creds FILE`` (``FEDBUS_CREDS``); without them the context
    that ``fedbus up`` saved is used (``fedbus context`` shows it)."""
    func = click.option(
        "--creds", "creds_file", envvar="FEDBUS_CREDS", default=None, show_envvar=True, expose_value=False,
        type=click.Path(dir_okay=False), callback=_export_creds, is_eager=True,
        help="Creds file (from `fedbus creds issue`): who to log in as, the CA, the signing key.",
    )(func)
    return click.option(
        "--server", "server", envvar="FEDBUS_SERVER", default=None, show_envvar=True,
        help=f"Broker URL (tls://host:port[,…], nats://…, mqtts://… or mqtt://…). [default: the context's, "
             f"else {DEFAULT_URL}]",
    )(func)


# The commands of fedbus's own packages: the `fedbus.cli` entry points that add to each, and the first paragraph
# of its help. `fedbus --help` lists them without importing a command module, and a command imports only its
# own package's commands (plus any entry point not named here: another package's, loaded every time).
# tests/test_startup.py checks this table against the commands themselves.
KNOWN_COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "agent": (("agents", "aggregator"), "Run a fedbus daemon (GPU node agent, scheduler, ...)."),
    "agents": (("agents",), "List live agents and their free capacity."),
    "cancel": (("agents",), "Cancel a job, whatever its state."),
    "context": (("bus",), "Which broker commands on this machine talk to, and as whom."),
    "creds": (("bus",), "Issue, list and revoke credentials (run where `fedbus up` runs)."),
    "dead-letters": (("bus",), ("List the dead letters: durable events a consumer refused or could not handle, "
                                "with the reason.")),
    "events": (("bus",), ("The event catalogue: type, version, subject, key, durable, signed and fields of every "
                          "event type.")),
    "fl": (("aggregator",), "Federated learning: run a federation described in fl.yaml."),
    "job": (("agents",), "Show one job: state, why it is waiting, placements, history."),
    "jobs": (("agents",), "List jobs, newest first."),
    "launch": (("agents",), "Submit a job file; prints the job id."),
    "logs": (("agents",), "Print a job's output (stored, then live with -f)."),
    "publish": (("bus",), ("Publish one event by type name (e.g. bus.heartbeat) or on a subject, validated; "
                           "prints its id.")),
    "replay": (("bus",), ("Re-read a durable stream (by name, or the stream holding a subject pattern) from a time "
                          "or sequence.")),
    "stats": (("bus",), "Live message and byte rates per subject."),
    "streams": (("bus",), "List JetStream streams and their consumers (messages, bytes, pending)."),
    "tail": (("bus",), ("Decode every event on PATTERN live (default fedbus.>); undecodable frames are shown as "
                        "such.")),
    "up": (("bus",), "Start the embedded broker (nats-server with JetStream and MQTT) and run until Ctrl-C."),
}
_KNOWN_PACKAGES = frozenset(p for packages, _ in KNOWN_COMMANDS.values() for p in packages)


class _Root(click.Group):
    """The root group: loads the ``fedbus.cli`` entry points a command needs, when it needs them.

    Commands are merged as if every entry point were loaded in name order, whatever order they load in: of two
    groups of one name the first is the base (its help) and takes the other's subcommands."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._entry_points: dict[str, EntryPoint] | None = None
        self._loaded: set[str] = set()
        self._origin: dict[str, str] = {}  # command name -> the entry point its object came from
        self._unavailable: dict[str, str] = {}

    def _installed(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            self._entry_points = {ep.name: ep for ep in entry_points(group="fedbus.cli")}
        return self._entry_points

    def _others(self) -> list[str]:
        """Entry points not in :data:`KNOWN_COMMANDS` (other packages'): what they add is known once loaded."""
        return [name for name in self._installed() if name not in _KNOWN_PACKAGES]

    def _load(self, names: Iterable[str]) -> None:
        for name in sorted(set(names) - self._loaded):
            self._loaded.add(name)
            ep = self._installed().get(name)
            if ep is None:
                continue
            try:
                commands: Iterable[click.Command] = ep.load()
            except ImportError as exc:  # a broken package: the other commands still work, and say nothing
                self._unavailable[name] = (f"fedbus: the {name} commands are unavailable ({exc}); "
                                           f"try: pip install 'fedbus[ml]'")
                continue
            for command in commands:
                self._merge(command, name)

    def _merge(self, command: click.Command, origin: str) -> None:
        assert command.name is not None
        name = command.name
        existing = self.commands.get(name)
        if isinstance(existing, click.Group) and isinstance(command, click.Group):
            base, other = (command, existing) if origin < self._origin[name] else (existing, command)
            for sub in other.commands.values():
                base.add_command(sub)
            self.commands[name] = base
            self._origin[name] = min(origin, self._origin[name])
        elif existing is None or origin > self._origin[name]:
            self.add_command(command)
            self._origin[name] = origin

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load(self._others())
        installed = self._installed()
        known = [name for name, (packages, _) in KNOWN_COMMANDS.items() if any(p in installed for p in packages)]
        return sorted({*known, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        packages = KNOWN_COMMANDS[cmd_name][0] if cmd_name in KNOWN_COMMANDS else tuple(self._installed())
        self._load([*packages, *self._others()])
        command = super().get_command(ctx, cmd_name)
        if command is None and not ctx.resilient_parsing:  # perhaps it is one of those that failed to load
            for note in self._unavailable.values():
                click.echo(note, err=True)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, with the short help of those not loaded taken from the table."""
        commands: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is None:  # a stand-in that only says its help
                command = click.Command(name, help=KNOWN_COMMANDS[name][1])
            if not command.hidden:
                commands.append((name, command))
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in commands])


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fedbus")
def main() -> None:
    """fedbus: launch, serve, train and federate AI jobs as typed events over NATS and MQTT.

    Logs go to stderr: pretty on a terminal, JSON lines otherwise; FEDBUS_LOG_LEVEL (default warning) and
    FEDBUS_LOG_FORMAT=json|pretty override.
    """
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    configure_logging()


if __name__ == "__main__":  # python -m fedbus.bus.cli
    main(prog_name="fedbus")
