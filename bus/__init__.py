"""fedbus.bus: typed MessagePack events over NATS, MQTT and in-memory transports."""

from .client import Bus, Delivery, EventSubscription, Security
from .codec import Codec, Envelope, Limits, new_id
from .connect import connect, publish_sync, transport_for
from .events import CATALOGUE, Catalogue, Event, EventSpec, Params, Scalar, event
from .memory import MemoryBroker, MemoryTransport
from .roles import Id, Role, validate_id
from .signing import AgentKey, KeyRing, ReplayGuard
from .transport import Capabilities, Frame, Subscription, Transport

__all__ = [
    "CATALOGUE",
    "AgentKey",
    "Bus",
    "Capabilities",
    "Catalogue",
    "Codec",
    "Delivery",
    "Envelope",
    "Event",
    "EventSpec",
    "EventSubscription",
    "Frame",
    "Id",
    "KeyRing",
    "Limits",
    "MemoryBroker",
    "MemoryTransport",
    "Params",
    "ReplayGuard",
    "Role",
    "Scalar",
    "Security",
    "Subscription",
    "Transport",
    "connect",
    "event",
    "new_id",
    "publish_sync",
    "transport_for",
    "validate_id",
]
