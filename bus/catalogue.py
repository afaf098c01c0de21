"""Core event types of the bus itself: liveness, a ping/pong round trip, signed notices, durable records.

Other packages declare their own event types in their own modules and list them under the ``fedbus.events``
entry point group, so that ``fedbus events``, ``fedbus tail`` and ``fedbus publish`` know them.
Append new core event types below; keep each one small and documented.
"""

from __future__ import annotations

import msgspec

from .events import Event, Params, event
from .roles import Role

# Who may publish and read each type (admin always may): see fedbus.bus.roles and docs/security.md.
_EVERYONE_SELF = tuple(f"{role}:self" for role in Role if role is not Role.ADMIN)
_DAEMONS = ("scheduler", "gpu-agent", "aggregator", "observer", "gateway", "replica")

__all__ = [
    "EdgeMetrics", "EdgeStatus", "Heartbeat", "MetricPoint", "Notice", "Ping", "Pong", "Record",
]


@event("bus", "heartbeat", key="agent_id", pub=_EVERYONE_SELF, sub=("scheduler", "observer"))
class Heartbeat(Event, frozen=True):
    """An agent is alive. Unsigned, not durable: a missed one is replaced by the next."""

    agent_id: str
    seq: int = 0
    role: str = "agent"
    labels: Params = {}


@event("bus", "ping", key="agent_id", sub=_EVERYONE_SELF)
class Ping(Event, frozen=True):
    """A request to the agent ``agent_id``; it answers with a :class:`Pong`."""

    agent_id: str
    text: str = ""


@event("bus", "pong", key="agent_id", pub=_EVERYONE_SELF)
class Pong(Event, frozen=True):
    """The answer to a :class:`Ping`; ``agent_id`` is the agent that answers."""

    agent_id: str
    text: str = ""
    rtt_hint_us: int = 0


@event("bus", "notice", key="agent_id", signed=True, pub=("scheduler:self",), sub=_DAEMONS)
class Notice(Event, frozen=True):
    """An authenticated announcement; strict buses drop it unless signed by a trusted key."""

    agent_id: str
    text: str


@event("bus", "record", key="topic", durable=True)
class Record(Event, frozen=True):
    """A fact that must not be lost: stored in a JetStream stream, re-readable with ``fedbus replay``.
    Admin only (operators' notes from the CLI)."""

    topic: str
    text: str
    fields: Params = {}


@event("edge", "status", key="device_id", pub=("device:self",), sub=("scheduler", "observer"))
class EdgeStatus(Event, frozen=True):
    """An edge device's presence, retained on its MQTT status topic: ``online`` when it connects, and
    ``online=False`` as its last will (published by the broker when the device vanishes) or when it closes.
    Unsigned: the will is sent by the broker at an unknown later time, outside any replay window."""

    device_id: str
    online: bool
    sdk: str = ""
    info: Params = {}


class MetricPoint(msgspec.Struct, kw_only=True, frozen=True):
    """One telemetry value: ``time`` in ns since the epoch, ``step`` when the device counts steps."""

    name: str
    value: float
    time: int
    step: int | None = None


@event("edge", "metrics", key="device_id", pub=("device:self",), sub=("observer",))
class EdgeMetrics(Event, frozen=True):
    """A batch of telemetry points from an edge device (the SDK flushes every N points or T seconds).
    ``seq`` counts the device's batches; the envelope id is the batch's idempotency key."""

    device_id: str
    seq: int
    points: list[MetricPoint] = []
