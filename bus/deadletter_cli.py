"""``fedbus dead-letters``: what consumers set aside (see :mod:`fedbus.bus.deadletter`), one line each."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import click

from .cli import server_option
from .client import Security
from .connect import connect
from .console import configure_logging, err, out, run_async
from .deadletter import DeadLetter, read_dead_letters
from .render import format_time
from .stores import open_stores

__all__ = ["dead_letters_cmd", "letter_record"]


def letter_record(letter: DeadLetter, *, stored_ns: int, seq: int) -> dict[str, Any]:
    """A dead letter as one JSON object (the original frame as its size and sha256)."""
    return {
        "time": format_time(stored_ns), "seq": seq, "agent_id": letter.agent_id, "consumer": letter.consumer,
        "subject": letter.original_subject, "type": letter.event_type, "event_id": letter.event_id,
        "source": letter.source, "stream_seq": letter.stream_seq, "attempts": letter.attempts,
        "refused": letter.refused, "reason": letter.reason, "frame_bytes": letter.frame_bytes,
        "frame_sha256": letter.frame_sha256, "frame_kept": bool(letter.frame),
    }


def _line(record: dict[str, Any]) -> str:
    refused = " refused" if record["refused"] else ""
    return (f"{record['time'][:19].replace('T', ' ')}  {record['subject']}  {record['type']}  "
            f"attempts={record['attempts']}{refused}  {record['reason']}")


@click.command("dead-letters")
@server_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the N newest.")
def dead_letters_cmd(server: str | None, as_json: bool, limit: int | None) -> None:
    """List the dead letters: durable events a consumer refused or could not handle, with the reason.

    One line each: when (UTC), subject, event type, attempts (and "refused" when it was refused at once rather
    than failed that often), reason. The original envelopes are
    kept in the FEDBUS_DEAD stream (``fedbus replay FEDBUS_DEAD --json`` shows them in full).
    """
    configure_logging()

    async def main() -> list[dict[str, Any]]:
        records = []
        source = f"fedbus-dead-letters-{os.urandom(3).hex()}"
        async with connect(server, source=source, security=Security.OFF) as bus:
            letters = read_dead_letters((await open_stores(bus)).event_log())
            async with contextlib.aclosing(letters):
                async for stored in letters:
                    if isinstance(stored.event, DeadLetter):
                        records.append(letter_record(stored.event, stored_ns=stored.time_ns, seq=stored.seq))
        return records[-limit:] if limit else records

    records = run_async(main)
    for record in records:
        if as_json:
            click.echo(json.dumps(record))
        else:
            out.print(_line(record), markup=False)
    err.print(f"{len(records)} dead letter{'s' if len(records) != 1 else ''}")
