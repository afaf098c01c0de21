"""Typed events and the catalogue that maps wire types to classes.

An event is a frozen ``msgspec.Struct`` declared with :func:`event`::

    @event("jobs", "offer", key="job_id", durable=True, signed=True)
    class JobOffer(Event):
        job_id: str
        gpus: int = 0

The decorator fixes the event's wire type (``jobs.offer``), schema version, the field whose value becomes the
subject's last token (``fedbus.jobs.offer.<job_id>``), whether it goes to a durable JetStream stream, and
whether strict buses require it to be signed. Free-form fields use :data:`Params` (flat scalars), so every
payload has a depth bounded by its schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec

from . import subjects
from .errors import FedbusError, SubjectError, UnknownEventType
from .roles import Access, parse_access

__all__ = ["CATALOGUE", "Catalogue", "Event", "EventSpec", "Params", "Scalar", "event"]

Scalar = str | int | float | bool | None
#: Flat string-keyed parameters (config, metrics, labels): depth is bounded by the type.
Params = dict[str, Scalar]

E = TypeVar("E", bound="Event")
_BASES: dict[type, str] = {}  # event class → "fedbus.<domain>.<name>", computed once at declaration
_KEY_OK = re.compile(r"[A-Za-z0-9_-]+").fullmatch


@dataclass(frozen=True, slots=True)
class EventSpec:
    """What the catalogue knows about an event class."""

    domain: str
    name: str
    version: int = 1
    key: str | None = None
    durable: bool = False
    signed: bool = False
    pub: Access = ()
    """Roles that may publish it (``"<role>:self"``: only on subjects keyed by their own id); admin always may."""
    sub: Access = ()
    """Roles that may subscribe to it, in the same notation; admin always may."""

    @property
    def type(self) -> str:
        """The wire type, ``<domain>.<name>``."""
        return f"{self.domain}.{self.name}"

    @property
    def base_subject(self) -> str:
        """``fedbus.<domain>.<name>``: the subject, less the key token."""
        return subjects.join(subjects.PREFIX, self.domain, self.name)


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every event payload. Subclass it and decorate the subclass with :func:`event`."""

    spec: ClassVar[EventSpec]

    def subject(self) -> str:
        """The concrete subject this event is published on."""
        spec = self.spec
        base = _BASES[type(self)]
        if spec.key is None:
            return base
        key = getattr(self, spec.key)
        if not (isinstance(key, str) and _KEY_OK(key)):
            subjects.validate_token(str(key), what=f"{spec.type}.{spec.key} (used in the subject)")
        return f"{base}.{key}"

    @classmethod
    def pattern(cls, key: str = "*") -> str:
        """The subscription pattern for this event type; ``key`` narrows it to one job, agent, round..."""
        spec = cls.spec
        if spec.key is None:
            return subjects.join(subjects.PREFIX, spec.domain, spec.name)
        if key != "*":
            subjects.validate_token(key)
        return f"{subjects.PREFIX}.{spec.domain}.{spec.name}.{key}"


class Catalogue:
    """Maps ``(type, version)`` to event classes; one per process is the default, tests can make their own."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, int], type[Event]] = {}

    def register(self, cls: type[E]) -> type[E]:
        spec = cls.spec
        known = self._classes.get((spec.type, spec.version))
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise FedbusError(f"event type {spec.type} v{spec.version} is already {known.__qualname__}")
        self._classes[(spec.type, spec.version)] = cls
        return cls

    def lookup(self, event_type: str, version: int, *, subject: str | None = None) -> type[Event]:
        try:
            return self._classes[(event_type, version)]
        except KeyError:
            raise UnknownEventType(event_type, version, subject=subject) from None

    def __iter__(self) -> Iterator[type[Event]]:
        return iter(sorted(self._classes.values(), key=lambda c: (c.spec.type, c.spec.version)))

    def __len__(self) -> int:
        return len(self._classes)


#: The catalogue the :func:`event` decorator registers into unless told otherwise.
CATALOGUE = Catalogue()


def event(
    domain: str,
    name: str,
    *,
    version: int = 1,
    key: str | None = None,
    durable: bool = False,
    signed: bool = False,
    pub: Access = (),
    sub: Access = (),
    catalogue: Catalogue | None = None,
) -> Any:
    """Class decorator declaring an :class:`Event` subclass's wire type, delivery properties and who may
    publish (``pub``) and subscribe to (``sub``) it: role names from :class:`~fedbus.bus.roles.Role`, or
    ``"<role>:self"`` for subjects keyed by the credential's own id (``key`` must be set then)."""
    subjects.validate_token(domain, what="event domain")
    subjects.validate_token(name, what="event name")
    for entry in (*pub, *sub):
        _role, own = parse_access(entry)
        if own and key is None:
            raise SubjectError(f"{entry!r} needs a key field to scope by", subject=f"{domain}.{name}")

    def decorate(cls: type[E]) -> type[E]:
        if not (isinstance(cls, type) and issubclass(cls, Event)):
            raise TypeError("@event decorates subclasses of fedbus.bus.Event")
        if key is not None and key not in cls.__struct_fields__:
            raise SubjectError(f"key field is not a field of {cls.__name__}", subject=key)
        cls.spec = EventSpec(domain, name, version, key, durable, signed, tuple(pub), tuple(sub))
        _BASES[cls] = cls.spec.base_subject
        return (CATALOGUE if catalogue is None else catalogue).register(cls)

    return decorate
