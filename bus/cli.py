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
from importlib.metadata import entry_points
from typing import Any, TypeVar

import click

from .console import configure_logging

__all__ = ["DEFAULT_SERVER", "main", "server_option"]

DEFAULT_SERVER = "nats://127.0.0.1:4222"
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
             f"else {DEFAULT_SERVER}]",
    )(func)


class _Root(click.Group):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loaded = False
        self._unavailable: list[str] = []

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in sorted(entry_points(group="fedbus.cli"), key=lambda e: e.name):
            try:
                commands: Iterable[click.Command] = ep.load()
            except ImportError as exc:  # a broken package: the other commands still work, and say nothing
                self._unavailable.append(f"fedbus: the {ep.name} commands are unavailable ({exc}); "
                                         f"try: pip install 'fedbus[ml]'")
                continue
            for command in commands:
                self._merge(command)

    def _merge(self, command: click.Command) -> None:
        assert command.name is not None
        existing = self.commands.get(command.name)
        if isinstance(existing, click.Group) and isinstance(command, click.Group):
            for sub in command.commands.values():
                existing.add_command(sub)
        else:
            self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        command = super().get_command(ctx, cmd_name)
        if command is None and not ctx.resilient_parsing:  # perhaps it is one of those that failed to load
            for note in self._unavailable:
                click.echo(note, err=True)
        return command


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
