"""Broker permissions, generated from the catalogue: what each credential may publish and subscribe to.

Pure: no I/O. The event types' ``pub``/``sub`` declarations give the event subjects; :data:`BUCKETS` gives the
KV and object buckets; durable types give the JetStream consumers a role may create (with the filter in the
API subject, so a role can only make a consumer that reads what it could subscribe to anyway). Admin has no
limits. Everything not granted is denied, so a new event type nobody declared is reachable by admin alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .events import Event
from .roles import Role, parse_access

__all__ = [
    "BUCKETS", "Bucket", "Grants", "access_table", "grants_for", "inbox_prefix", "render_permissions", "splice_table",
]


@dataclass(frozen=True)
class Bucket:
    """A KV (``kind="kv"``) or object (``kind="obj"``) bucket and the roles that may write and read it.

    A ``"<role>:self"`` writer may only write the key named by its own id (liveness entries).
    """

    kind: str
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()

    def stream(self, name: str) -> str:
        from .limits import kv_stream, object_stream

        return kv_stream(name) if self.kind == "kv" else object_stream(name)

    def write_subject(self, name: str, key: str = ">") -> str:
        from .limits import OBJECT_PREFIX

        return f"$KV.{name}.{key}" if self.kind == "kv" else f"{OBJECT_PREFIX}.obj.{name}.>"


_DAEMONS: Final = ("scheduler", "gpu-agent", "aggregator", "observer", "gateway", "replica")
_ALL_BUT_DEVICES: Final = (*_DAEMONS, "fl-client")

#: Every bucket the project uses. A package that adds one adds it here, or only admin can reach it.
BUCKETS: Final[dict[str, Bucket]] = {
    "jobs": Bucket("kv", writers=("scheduler",), readers=("observer",)),
    "agents": Bucket("kv", writers=tuple(f"{r}:self" for r in _DAEMONS), readers=("scheduler", "observer")),
    "agent-keys": Bucket("kv", writers=(), readers=_ALL_BUT_DEVICES),
    "fedbus-identities": Bucket("kv", writers=(), readers=_ALL_BUT_DEVICES),
    "workspaces": Bucket("obj", writers=(), readers=("gpu-agent",)),
    "fl": Bucket("obj", writers=("aggregator", "fl-client"), readers=("aggregator", "fl-client")),
    "fl-state": Bucket("obj", writers=("aggregator",), readers=()),
}


@dataclass
class Grants:
    """Allowed publish and subscribe subjects of one credential (``None``: no limits, for admin)."""

    publish: list[str] | None = field(default_factory=list)
    subscribe: list[str] | None = field(default_factory=list)

    def add(self, *, pub: Iterable[str] = (), sub: Iterable[str] = ()) -> None:
        assert self.publish is not None and self.subscribe is not None
        self.publish.extend(s for s in pub if s not in self.publish)
        self.subscribe.extend(s for s in sub if s not in self.subscribe)


def inbox_prefix(ident: str) -> str:
    """The reply-inbox prefix of credential ``ident``: nobody else may subscribe below it."""
    return f"_INBOX.{ident}"


def _allowed(access: tuple[str, ...], role: Role) -> tuple[bool, bool]:
    """(allowed at all, only on its own key) for ``role`` in an access declaration."""
    everywhere = own = False
    for entry in access:
        r, self_only = parse_access(entry)
        if r is role:
            if self_only:
                own = True
            else:
                everywhere = True
    return everywhere or own, own and not everywhere


def _stream_read(stream: str) -> list[str]:
    api = "$JS.API"
    return [
        f"{api}.STREAM.INFO.{stream}", f"{api}.CONSUMER.INFO.{stream}.*", f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*", f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
    ]


def grants_for(role: Role, ident: str, events: Iterable[type[Event]],
               buckets: dict[str, Bucket] | None = None) -> Grants:
    """What credential ``ident`` of ``role`` may publish and subscribe to."""
    if role is Role.ADMIN:
        return Grants(publish=None, subscribe=None)
    from .limits import stream_of

    grants = Grants()
    inbox = inbox_prefix(ident)
    grants.add(sub=[f"{inbox}.>"])
    uses_js = False
    for cls in events:
        spec = cls.spec
        for access, direction in ((spec.pub, "pub"), (spec.sub, "sub")):
            ok, own = _allowed(access, role)
            if not ok:
                continue
            subject = cls.pattern(ident) if own else cls.pattern()
            if direction == "pub":
                grants.add(pub=[subject])
                continue
            grants.add(sub=[subject])
            if spec.durable:
                uses_js = True
                stream = stream_of(cls)
                grants.add(pub=[f"$JS.API.CONSUMER.CREATE.{stream}.*.{subject}", *_stream_read(stream)])
        if spec.durable and _allowed(spec.pub, role)[0]:
            uses_js = True  # a publish waits for its ack on the inbox; looking the stream up is harmless
            grants.add(pub=[f"$JS.API.STREAM.INFO.{stream_of(cls)}"])
    for name, bucket in (BUCKETS if buckets is None else buckets).items():
        stream = bucket.stream(name)
        writes, own_key = _allowed(bucket.writers, role)
        reads = writes or _allowed(bucket.readers, role)[0]
        if not reads:
            continue
        uses_js = True
        grants.add(pub=[
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}",
            *_stream_read(stream),
        ])
        if writes:
            grants.add(pub=[bucket.write_subject(name, ident if own_key else ">")])
            if bucket.kind == "obj":
                grants.add(pub=[f"$JS.API.STREAM.PURGE.{stream}", f"$JS.API.STREAM.MSG.DELETE.{stream}"])
    if uses_js:
        grants.add(pub=["$JS.API.INFO", "$JS.API.STREAM.NAMES"])
    return grants


def _quote(subject: str) -> str:
    return '"' + subject.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_permissions(grants: Grants, *, indent: str = "      ") -> str:
    """The ``permissions { ... }`` block of a nats-server user entry ("" for admin: no limits)."""
    if grants.publish is None and grants.subscribe is None:
        return ""
    pub = ", ".join(_quote(s) for s in grants.publish or [])
    sub = ", ".join(_quote(s) for s in grants.subscribe or [])
    return (f"{indent}permissions: {{\n{indent}  publish: {{ allow: [{pub}] }}\n"
            f"{indent}  subscribe: {{ allow: [{sub}] }}\n{indent}  allow_responses: true\n{indent}}}\n")


def _cell(access: tuple[str, ...]) -> str:
    return ", ".join(access) if access else "—"


def access_table(events: Iterable[type[Event]]) -> str:
    """The role × event-type table of ``docs/security.md`` (markdown), from the declarations."""
    rows = ["| event type | subject | durable | signed | published by | read by |", "|---|---|---|---|---|---|"]
    for cls in sorted(events, key=lambda c: (c.spec.type, c.spec.version)):
        spec = cls.spec
        rows.append(f"| `{spec.type}` | `{cls.pattern()}` | {'yes' if spec.durable else ''} | "
                    f"{'yes' if spec.signed else ''} | admin, {_cell(spec.pub)} | admin, {_cell(spec.sub)} |")
    rows += ["", "| bucket | kind | written by | read by |", "|---|---|---|---|"]
    for name, bucket in sorted(BUCKETS.items()):
        readers = tuple(r for r in bucket.readers if r not in bucket.writers)
        rows.append(f"| `{name}` | {bucket.kind} | admin, {_cell(bucket.writers)} | "
                    f"admin, {_cell(bucket.writers + readers)} |")
    return "\n".join(rows).replace("admin, —", "admin") + "\n"


TABLE_BEGIN: Final = "<!-- access table: generated by `python -m fedbus.bus.access_doc docs/security.md` -->"
TABLE_END: Final = "<!-- end of access table -->"


def splice_table(doc: str, table: str) -> str:
    """``doc`` with the text between the table markers replaced by ``table``."""
    head, _, rest = doc.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    return f"{head}{TABLE_BEGIN}\n{table}{TABLE_END}{tail}"

