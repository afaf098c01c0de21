"""MQTT topics for fedbus events, derived exactly as fedbus subjects are (``fedbus.bus.subjects``).

An event of type ``<domain>.<name>`` with key ``k`` travels on subject ``fedbus.<domain>.<name>.<k>``, which
is MQTT topic ``fedbus/<domain>/<name>/<k>``; without a key the last level is absent. Tokens are
``[A-Za-z0-9_-]+``. Also here: MQTT filter matching and the "one filter covers another" test the link uses
to keep a minimal set of broker subscriptions (overlapping subscriptions are delivered twice by some brokers).
"""

from __future__ import annotations

import re
from typing import Final

from .errors import TopicError

__all__ = [
    "PREFIX",
    "SHARE_PREFIX",
    "event_filter",
    "event_topic",
    "filter_covers",
    "shared_filter",
    "split_shared",
    "subject_to_topic",
    "topic_matches",
    "topic_to_subject",
    "validate_token",
]

PREFIX: Final = "fedbus"
SHARE_PREFIX: Final = "$share/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def validate_token(token: str, *, what: str = "topic level") -> str:
    """Return ``token`` if it can stand as one subject token / topic level, else raise :class:`TopicError`."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise TopicError(f"invalid {what} (allowed: letters, digits, '_' and '-')", value=str(token))
    return token


def _split_type(event_type: str) -> tuple[str, str]:
    parts = event_type.split(".") if isinstance(event_type, str) else []
    if len(parts) != 2:
        raise TopicError("an event type is '<domain>.<name>'", value=str(event_type))
    return validate_token(parts[0], what="event domain"), validate_token(parts[1], what="event name")


def event_topic(event_type: str, key: str | None = None) -> str:
    """The topic an event of ``event_type`` (with subject key ``key``) is published on."""
    domain, name = _split_type(event_type)
    if key is None:
        return f"{PREFIX}/{domain}/{name}"
    return f"{PREFIX}/{domain}/{name}/{validate_token(str(key), what='event key')}"


def event_filter(event_type: str, key: str | None = "*") -> str:
    """The subscription filter for ``event_type``: ``key="*"`` any key, a value one key, ``None`` unkeyed."""
    if key == "*":
        domain, name = _split_type(event_type)
        return f"{PREFIX}/{domain}/{name}/+"
    return event_topic(event_type, key)


def subject_to_topic(subject: str) -> str:
    """The MQTT topic for a concrete fedbus subject (e.g. an envelope's ``reply``)."""
    if not isinstance(subject, str) or not subject:
        raise TopicError("empty subject", value=str(subject))
    for token in subject.split("."):
        validate_token(token, what="subject token")
    return subject.replace(".", "/")


def topic_to_subject(topic: str) -> str:
    """The fedbus subject for a concrete MQTT topic."""
    if not isinstance(topic, str) or not topic:
        raise TopicError("empty topic", value=str(topic))
    for level in topic.split("/"):
        validate_token(level, what="topic level")
    return topic.replace("/", ".")


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/<group>/<filter>``: the broker hands each message to one member of ``group``."""
    return f"{SHARE_PREFIX}{validate_token(group, what='share group')}/{topic_filter}"


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``(group, filter)`` of a shared filter; ``(None, filter)`` for a plain one."""
    if topic_filter.startswith(SHARE_PREFIX):
        group, _, rest = topic_filter[len(SHARE_PREFIX):].partition("/")
        return group, rest
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT ``topic_filter`` (``+`` one level, ``#`` this level and below)."""
    _, topic_filter = split_shared(topic_filter)
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False  # MQTT: wildcards at the first level never match $-topics
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(a: str, b: str) -> bool:
    """Whether every topic that filter ``b`` matches is matched by filter ``a``.

    A shared filter covers only itself: its messages are spread over a group, so a plain filter never
    stands in for it, nor it for a plain one.
    """
    group_a, fa = split_shared(a)
    group_b, fb = split_shared(b)
    if group_a is not None or group_b is not None:
        return a == b
    a_levels, b_levels = fa.split("/"), fb.split("/")
    for i, level in enumerate(a_levels):
        if level == "#":
            return True
        if i >= len(b_levels) or b_levels[i] == "#":
            return False
        if level != "+" and (b_levels[i] == "+" or level != b_levels[i]):
            return False
    return len(a_levels) == len(b_levels)
