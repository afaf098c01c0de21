"""The event catalogue as the command line sees it: discovery, lookup by name or subject, descriptions.

Packages make their event types known by listing the modules that declare them under the ``fedbus.events``
entry point group (``bus = "fedbus.bus.catalogue"``); :func:`load_events` imports them all, so the inspector
decodes every event type that is installed.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import msgspec
import structlog

from . import subjects
from .codec import field_of
from .errors import ConfigError, SchemaError, UnknownEventType
from .events import CATALOGUE, Catalogue, Event

__all__ = [
    "EventInfo", "FieldInfo", "describe", "event_for", "find_by_subject", "find_by_type", "load_events",
    "parse_data",
]

log = structlog.get_logger("fedbus.bus")
_CORE_MODULES = ("fedbus.bus.catalogue",)


def load_events(catalogue: Catalogue = CATALOGUE) -> Catalogue:
    """Import every module listed under the ``fedbus.events`` entry points (and the bus's own)."""
    for module in _CORE_MODULES:
        import_module(module)
    for ep in entry_points(group="fedbus.events"):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the inspector down with it
            log.warning("cannot load event types", entry_point=ep.name, module=ep.value, error=str(exc))
    return catalogue


def _latest(catalogue: Catalogue) -> dict[str, type[Event]]:
    latest: dict[str, type[Event]] = {}
    for cls in catalogue:  # sorted by (type, version): the last one wins
        latest[cls.spec.type] = cls
    return latest


def find_by_type(event_type: str, catalogue: Catalogue = CATALOGUE) -> type[Event] | None:
    """The newest version of the event class called ``event_type`` (``domain.name``), if any."""
    return _latest(catalogue).get(event_type)


def find_by_subject(subject: str, catalogue: Catalogue = CATALOGUE) -> type[Event] | None:
    """The event class whose subscription pattern matches a concrete subject, if any."""
    for cls in _latest(catalogue).values():
        if subjects.matches(cls.pattern(), subject):
            return cls
    return None


@dataclass(frozen=True, slots=True)
class FieldInfo:
    name: str
    type: str
    required: bool
    default: str | None


@dataclass(frozen=True, slots=True)
class EventInfo:
    type: str
    version: int
    pattern: str
    key: str | None
    durable: bool
    signed: bool
    fields: tuple[FieldInfo, ...]
    doc: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type, "version": self.version, "subject": self.pattern, "key": self.key,
            "durable": self.durable, "signed": self.signed, "doc": self.doc,
            "fields": [{"name": f.name, "type": f.type, "required": f.required, "default": f.default}
                       for f in self.fields],
        }


def type_name(tp: Any) -> str:
    """A short readable name for a type annotation: ``dict[str, int | None]``, ``str``."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return str(tp).replace("typing.", "")


def describe(cls: type[Event]) -> EventInfo:
    """What ``fedbus events`` shows about an event class."""
    spec = cls.spec
    fields = []
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            default: str | None = repr(f.default)
        elif f.default_factory is not msgspec.NODEFAULT:
            default = repr(f.default_factory())
        else:
            default = None
        fields.append(FieldInfo(f.name, type_name(f.type), default is None, default))
    doc = re.sub(r":\w+:`([^`]*)`|``([^`]*)``", lambda m: m.group(1) or m.group(2),
                 (cls.__doc__ or "").strip().split("\n\n", 1)[0].replace("\n", " "))
    return EventInfo(spec.type, spec.version, cls.pattern(), spec.key, spec.durable, spec.signed,
                     tuple(fields), doc)


def parse_data(cls: type[Event], text: str, *, key: str | None = None) -> Event:
    """A ``cls`` event from JSON text, validated; unknown fields are errors, ``key`` fills the key field.

    Raises :class:`SchemaError` naming the offending field, or :class:`ConfigError` for text that is not a
    JSON object.
    """
    spec = cls.spec
    try:
        data = msgspec.json.decode(text.encode() if text else b"{}")
    except msgspec.DecodeError as exc:
        raise ConfigError(f"--data is not valid JSON: {exc}", key="data") from None
    if not isinstance(data, dict):
        raise ConfigError("--data must be a JSON object of the event's fields", key="data")
    if key is not None:
        if spec.key is None:
            raise SchemaError("has no key field; drop --key", event_type=spec.type)
        if spec.key in data and str(data[spec.key]) != key:
            raise SchemaError(f"--key {key!r} disagrees with the data's {spec.key}={data[spec.key]!r}",
                              event_type=spec.type, field=spec.key)
        data.setdefault(spec.key, key)
    known = set(cls.__struct_fields__)
    for name in data:
        if name not in known:
            raise SchemaError(f"unknown field `{name}` (fields: {', '.join(sorted(known))})",
                              event_type=spec.type, field=str(name))
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc), event_type=spec.type, field=field_of(exc)) from None


def event_for(target: str, event_type: str | None, data: str, *, key: str | None = None,
              catalogue: Catalogue = CATALOGUE) -> tuple[Event | None, str]:
    """What ``fedbus publish TARGET`` sends: ``(event, subject)`` for a known type, validated, or
    ``(None, subject)`` for raw JSON under an unknown ``event_type``.

    ``target`` is an event type (``bus.heartbeat``), or a subject (``fedbus.bus.heartbeat.gpu-1``) whose event
    type is found from it, or, with ``event_type``, any subject to publish that type on.
    """
    if event_type is not None:
        subject = subjects.validate_subject(target)
        cls = find_by_type(event_type, catalogue)
        if cls is None:
            return None, subjects.join(*subject.split("."), key) if key else subject
        return parse_data(cls, data, key=key), subject
    if target.startswith(f"{subjects.PREFIX}."):
        subject = subjects.validate_subject(target)
        cls = find_by_subject(subject, catalogue)
        if cls is None:
            raise ConfigError(f"no event type is published on {subject!r}; add --type TYPE to publish "
                              "raw JSON there", key="type")
        if cls.spec.key is not None and key is None:
            key = subject.rsplit(".", 1)[1]
        event = parse_data(cls, data, key=key)
        if event.subject() != subject:
            raise SchemaError(f"this event belongs on {event.subject()!r}, not {subject!r}",
                              event_type=cls.spec.type, field=cls.spec.key)
        return event, subject
    cls = find_by_type(target, catalogue)
    if cls is None:
        raise UnknownEventType(target, 1)
    event = parse_data(cls, data, key=key)
    return event, event.subject()
