"""Subjects and MQTT topics, built from event types in one place.

A subject is ``fedbus.<domain>.<event>[.<key>]``: the domain and event name come from the event class, the
optional key (a job id, an agent id, a round) from one of its fields. Tokens are ``[A-Za-z0-9_-]+``, so the
same subject is a valid NATS subject and, with ``/`` for ``.``, a valid MQTT topic: an MQTT device and a NATS
agent meet on the same event. Wildcards (``*`` one token, ``>`` the rest) are only valid in patterns.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

from .errors import SubjectError

__all__ = [
    "PREFIX",
    "from_mqtt",
    "join",
    "matches",
    "to_mqtt",
    "validate_pattern",
    "validate_subject",
    "validate_token",
]

PREFIX: Final = "fedbus"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_MATCH = _TOKEN.fullmatch
_MAX_SUBJECT = 512


def validate_token(token: str, *, what: str = "subject token") -> str:
    """Return ``token`` if it can stand as one subject token, else raise :class:`SubjectError`."""
    if not isinstance(token, str) or not _TOKEN_MATCH(token):
        raise SubjectError(f"invalid {what} (allowed: letters, digits, '_' and '-')", subject=str(token))
    return token


def join(*tokens: str) -> str:
    """Join validated tokens into a subject."""
    for token in tokens:
        validate_token(token)
    return ".".join(tokens)


def _check(subject: str, *, wildcards: bool) -> str:
    if not isinstance(subject, str) or not subject:
        raise SubjectError("empty subject", subject=str(subject))
    if len(subject) > _MAX_SUBJECT:
        raise SubjectError(f"subject longer than {_MAX_SUBJECT} characters", subject=subject[:64] + "…")
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if wildcards and token == "*":
            continue
        if wildcards and token == ">":
            if i != len(tokens) - 1:
                raise SubjectError("'>' must be the last token", subject=subject)
            continue
        if not _TOKEN.fullmatch(token):
            kind = "pattern" if wildcards else "subject (no wildcards, spaces or control characters)"
            raise SubjectError(f"invalid {kind}", subject=subject)
    return subject


@lru_cache(maxsize=16384)
def validate_subject(subject: str) -> str:
    """Validate a concrete subject to publish on: no wildcards, no empty tokens, no whitespace."""
    return _check(subject, wildcards=False)


@lru_cache(maxsize=4096)
def validate_pattern(pattern: str) -> str:
    """Validate a subscription pattern: like a subject, plus ``*`` tokens and a trailing ``>``."""
    return _check(pattern, wildcards=True)


def matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS-style ``pattern``."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


def to_mqtt(subject_or_pattern: str) -> str:
    """The MQTT topic (or filter) for a subject (or pattern): ``.``→``/``, ``*``→``+``, ``>``→``#``."""
    validate_pattern(subject_or_pattern)
    return "/".join(
        "+" if t == "*" else "#" if t == ">" else t for t in subject_or_pattern.split(".")
    )


def from_mqtt(topic: str) -> str:
    """The subject (or pattern) for an MQTT topic (or filter); the inverse of :func:`to_mqtt`."""
    levels = topic.split("/")
    for level in levels:
        if level not in ("+", "#") and not _TOKEN.fullmatch(level):
            raise SubjectError("MQTT topic level is not a fedbus subject token", subject=topic)
    return validate_pattern(".".join("*" if t == "+" else ">" if t == "#" else t for t in levels))
