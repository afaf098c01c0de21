"""``fedbus creds issue|list|revoke`` and ``fedbus context``.

The ``creds`` commands work on the authority in the broker's data dir (the context's, or ``--data-dir``), on
the machine ``fedbus up`` runs on, like ``nsc`` does for NATS operators. Issuing and revoking take effect on
the running broker at once: its users are re-rendered and it reloads them, and the identities bucket follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .console import EXIT_USAGE, err, fail, out
from .context import context_path, load_context
from .creds import load_creds
from .errors import ConfigError, FedbusError
from .roles import ROLES, Role

if TYPE_CHECKING:  # imported by the commands that use it: `fedbus --help` needs neither bcrypt nor x509
    from .authority import Authority

__all__ = ["context_cmd", "creds_group", "parse_duration"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"not a duration: {text!r} (e.g. 30m, 12h, 7d)", key="expires")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _authority(data_dir: Path | None) -> Authority:
    if data_dir is None:
        context = load_context()
        if context is None or not context.data_dir:
            fail("no broker data dir: run `fedbus up` first, or pass --data-dir", EXIT_USAGE)
        data_dir = Path(context.data_dir)
    from .authority import Authority

    authority = Authority(data_dir)
    if not authority.exists:
        fail(f"no authority in {data_dir} (start `fedbus up` there once, without --insecure)", EXIT_USAGE)
    return authority


def _apply(authority: Authority) -> str:
    """Push the registry to the running broker; says what happened."""
    from .authority import provision_broker

    reloaded = authority.apply()
    servers = authority.servers()
    if servers.get("nats"):
        with contextlib.suppress(FedbusError, OSError):
            asyncio.run(provision_broker(authority, servers["nats"]))
    return "the broker reloaded its users" if reloaded else "no broker running: takes effect when it starts"


_data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                                help="The broker's data dir. [default: the context's]")


@click.group("creds")
def creds_group() -> None:
    """Issue, list and revoke credentials (run where `fedbus up` runs)."""


@creds_group.command("issue")
@click.argument("role", type=click.Choice(sorted(r.value for r in ROLES)))
@click.argument("ident", metavar="ID")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the creds file. [default: ./ID.creds]")
@click.option("--expires", default=None, help="Lifetime, e.g. 12h, 7d. [default: none]")
@click.option("--replace", is_flag=True, help="Replace an active credential of the same id.")
@_data_dir_option
def issue_cmd(role: str, ident: str, out_file: Path | None, expires: str | None, replace: bool,
              data_dir: Path | None) -> None:
    """Issue a credential of ROLE for ID and write its creds file (mode 0600)."""
    try:
        authority = _authority(data_dir)
        creds = authority.issue(Role(role), ident, expires_s=parse_duration(expires) if expires else None,
                                replace=replace)
        path = creds.dump(out_file or Path(f"{ident}.creds"))
        note = _apply(authority)
    except FedbusError as exc:
        fail(exc)
    out.print(f"issued {role} credential {ident!r} → {path} ({note})")


@creds_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@_data_dir_option
def list_cmd(as_json: bool, data_dir: Path | None) -> None:
    """The credentials issued, active or not (never their secrets)."""
    authority = _authority(data_dir)
    try:
        entries = authority.credentials()
    except FedbusError as exc:
        fail(exc)
    rows = []
    for e in entries:
        rows.append({"id": e.id, "role": str(e.role), "state": e.state, "kid": e.identity().kid,
                     "issued": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.issued_ns / 1e9)),
                     "expires": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.expires_ns / 1e9))
                     if e.expires_ns else "never"})
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("id", "role", "state", "key id", "issued", "expires", box=None)
    for r in rows:
        table.add_row(r["id"], r["role"], r["state"], r["kid"], r["issued"], r["expires"])
    out.print(table)


@creds_group.command("revoke")
@click.argument("ident", metavar="ID")
@_data_dir_option
def revoke_cmd(ident: str, data_dir: Path | None) -> None:
    """Revoke ID: its connections are closed and it cannot log in or sign again (no broker restart)."""
    try:
        authority = _authority(data_dir)
        authority.revoke(ident)
        note = _apply(authority)
    except FedbusError as exc:
        fail(exc)
    out.print(f"revoked {ident!r} ({note})")


@click.command("context")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def context_cmd(as_json: bool) -> None:
    """Which broker commands on this machine talk to, and as whom."""
    from .connect import resolve

    try:
        url, creds = resolve(None)
        context = load_context()
    except FedbusError as exc:
        fail(exc)
    explicit = load_creds() is not None
    info = {
        "server": url,
        "identity": None if creds is None else {"id": creds.id, "role": str(creds.role)},
        "creds": None if creds is None else str(creds.path) if creds.path else None,
        "from": "FEDBUS_CREDS" if explicit else ("context" if context else "default"),
        "context": str(context_path()),
        "insecure": bool(context and context.insecure),
        "broker_pid": None if context is None else context.pid,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    out.print(f"server:   {url}")
    out.print(f"identity: {creds.id} ({creds.role})" if creds else "identity: none (an open broker only)")
    out.print(f"from:     {info['from']} ({info['context']})")
    if context is None:
        err.print("no context yet: `fedbus up` saves one; until then commands use the default above")
