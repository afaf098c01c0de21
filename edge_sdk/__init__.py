"""fedbus edge SDK: phones and Raspberry Pis on the fedbus over MQTT, needing only aiomqtt and msgpack.

It never imports ``fedbus.bus`` (nor msgspec, torch or structlog); ``cryptography`` is optional (signing).
Envelopes are byte-identical to fedbus's typed codec, proven by the shared vectors in ``tests/vectors``.
"""

from .client import SDK_VERSION, STATUS_TYPE, EdgeClient
from .creds import DeviceCreds
from .envelope import FrameLimits, decode_data, make_envelope, new_id, pack, signing_bytes, unpack
from .errors import (
    BufferFull,
    ConnectFailed,
    EdgeError,
    FrameError,
    FrameTooLarge,
    LinkClosed,
    LinkError,
    MalformedFrame,
    PublishFailed,
    RequestTimeout,
    SignatureError,
    SubscribeFailed,
    TopicError,
)
from .link import LinkOptions, MqttLink, Will
from .subscription import EdgeSubscription, Received
from .telemetry import METRICS_TYPE, MetricsBatcher
from .topics import event_filter, event_topic

__all__ = [
    "METRICS_TYPE",
    "SDK_VERSION",
    "STATUS_TYPE",
    "BufferFull",
    "ConnectFailed",
    "DeviceCreds",
    "EdgeClient",
    "EdgeError",
    "EdgeSubscription",
    "FrameError",
    "FrameLimits",
    "FrameTooLarge",
    "LinkClosed",
    "LinkError",
    "LinkOptions",
    "MalformedFrame",
    "MetricsBatcher",
    "MqttLink",
    "PublishFailed",
    "Received",
    "RequestTimeout",
    "SignatureError",
    "SubscribeFailed",
    "TopicError",
    "Will",
    "decode_data",
    "event_filter",
    "event_topic",
    "make_envelope",
    "new_id",
    "pack",
    "signing_bytes",
    "unpack",
]
