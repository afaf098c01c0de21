"""Terminal plumbing shared by the bus's commands and the demo: consoles, logging, exit codes.

Exit codes: 0 ok, 1 runtime failure (broker unreachable, timeout, ...), 2 usage or validation error (bad
option, bad URL, a field that does not fit its event type). A fedbus error is shown as one line, never a
traceback. Data goes to stdout; status lines, notes and errors go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import structlog
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from .errors import AuthError, CodecError, ConfigError, ConnectError, FedbusError, SubjectError

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_NOPERM", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_UNAVAILABLE",
           "EXIT_USAGE", "PIPE_WIDTH", "configure_logging", "err", "exit_code", "fail", "out", "run_async"]

T = TypeVar("T")

# The one table of exit codes of every fedbus command (docs/cli.md):
EXIT_OK = 0
EXIT_FAILURE = 1
"""Something went wrong at run time, or work was lost (a job failed, an event was not stored)."""
EXIT_USAGE = 2
"""What the user typed is wrong: a bad option, file, subject or event."""
EXIT_UNAVAILABLE = 69
"""The broker (or a service it needs) cannot be reached, or a resource is held by another process."""
EXIT_NOPERM = 77
"""Authentication or permission refused: bad, expired or revoked credentials; a role not allowed to."""
EXIT_TIMEOUT = 124
"""A ``--timeout`` ran out before the work finished (the work may go on)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: the command stopped waiting (the work may go on: the message says how to stop it)."""

PIPE_WIDTH = 200
"""Columns a table may use when the output is not a terminal (rich would use 80 and cut it); ``COLUMNS`` wins."""


class _Console(Console):
    """A rich console as wide as the terminal, or :data:`PIPE_WIDTH` when piped or redirected."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


out = _Console(highlight=False, soft_wrap=True)
"""Command output (stdout)."""
err = _Console(stderr=True, highlight=False, soft_wrap=True)
"""Status lines, notes and errors (stderr)."""

_USAGE_ERRORS = (ConfigError, SubjectError, CodecError)


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Library logs to stderr (stdout is for data), at ``level`` or ``FEDBUS_LOG_LEVEL`` (default warning).

    Pretty on a terminal, one JSON object per line otherwise (daemons under systemd or compose), unless
    ``json`` or ``FEDBUS_LOG_FORMAT=json|pretty`` says which.
    """
    name = (level or os.environ.get("FEDBUS_LOG_LEVEL") or "warning").upper()
    if json is None:
        fmt = os.environ.get("FEDBUS_LOG_FORMAT", "")
        json = fmt == "json" or (fmt != "pretty" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if json else "%H:%M:%S", utc=json),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(name)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def exit_code(exc: FedbusError) -> int:
    """The exit code of the table above for ``exc``."""
    if isinstance(exc, _USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(exc, AuthError) or (isinstance(exc, ConnectError) and exc.refused):
        return EXIT_NOPERM
    if isinstance(exc, ConnectError):
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


def fail(exc: FedbusError | str, code: int | None = None) -> NoReturn:
    """Print one error line on stderr and exit."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)  # text in [] stays
    if code is None:
        code = exit_code(exc) if isinstance(exc, FedbusError) else EXIT_FAILURE
    raise SystemExit(code)


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine: SIGTERM cancels it like Ctrl-C does (a clean stop, exit 0); fedbus errors
    become one line and an exit code."""

    async def guarded() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(guarded())
    except FedbusError as exc:
        fail(exc)
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise SystemExit(EXIT_OK) from None
