"""Dead letters: durable events a consumer could not handle, set aside with the reason, never retried forever.

::

    dead = await DeadLetters.open(stores, agent_id="scheduler")
    async with log.consume(JobSubmit, durable="scheduler-submit") as deliveries:
        async for d in deliveries:
            if await dead.exhausted(d, consumer="scheduler-submit"):
                continue                                  # delivered too often already: set aside
            try:
                handle(d.event)
            except Exception as exc:                      # it will fail again: try later, then give up
                await dead.failed(d, f"{type(exc).__name__}: {exc}", consumer="scheduler-submit")
                continue
            await d.ack()

A delivery whose handling failed :attr:`RetryPolicy.max_attempts` times (counted by the broker as
``delivered``, so the count survives restarts) is published as a :class:`DeadLetter` on
``fedbus.dead.letter.<agent_id>`` (stream ``FEDBUS_DEAD``) with its reason and the original envelope, and only
then terminated on its own stream: it is never delivered again, so a restarted consumer never treats it as live
work. Earlier failures hand it back with a growing delay. A message that can never succeed (unsigned, forged,
a duplicate) is refused at once: :meth:`DeadLetters.refuse`.

``FEDBUS_DEAD`` is bounded like every stream (:mod:`fedbus.bus.limits`: messages, bytes, age; the oldest give
way to new ones), and so is each dead letter (:class:`DeadLetterLimits`). Dead letters hold whole envelopes
(job specs with their ``env``), so only admin may read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Final

import structlog

from .codec import Codec
from .errors import FedbusError, NotFound
from .events import Event, event
from .roles import Id
from .stores import AckableDelivery, EventLog, RejectHook, StoredEvent, Stores, stream_name

__all__ = ["DEAD_STREAM", "DeadLetter", "DeadLetterLimits", "DeadLetters", "RetryPolicy", "read_dead_letters"]

log = structlog.get_logger("fedbus.bus.deadletter")


@event("dead", "letter", key="agent_id", durable=True, pub=("scheduler:self", "aggregator:self"), sub=())
class DeadLetter(Event, frozen=True):
    """A durable event that ``agent_id``'s consumer set aside: why, after how many attempts, and the event."""

    agent_id: Id
    """Who set it aside (the subject's key)."""
    consumer: str
    original_subject: str
    """The subject it came on (``subject`` is the method that gives a dead letter's own)."""
    event_type: str
    event_id: str
    source: str
    """The ``src`` of the original envelope (who published it, by its own account)."""
    stream_seq: int
    attempts: int
    reason: str
    refused: bool = False
    """Refused at once (it could never succeed), rather than failed ``attempts`` times."""
    frame: bytes = b""
    """The original envelope, re-encoded (empty when over :attr:`DeadLetterLimits.max_frame_copy`)."""
    frame_bytes: int = 0
    frame_sha256: str = ""


DEAD_STREAM: Final = stream_name(DeadLetter.spec.domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often a failing delivery is tried, and how long it waits between tries."""

    max_attempts: int = 5
    delay_s: float = 1.0
    """Before the second attempt; doubles with every further one."""
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.delay_s * 2 ** max(attempt - 1, 0), self.max_delay_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterLimits:
    """The bounds of one dead letter (the stream's are in :mod:`fedbus.bus.limits`)."""

    max_frame_copy: int = 512 * 2**10
    """Envelopes larger than this are summarised (size and sha256), not copied."""
    max_reason: int = 2000


class DeadLetters:
    """Sets failing deliveries aside for one agent; see the module docstring."""

    def __init__(self, log_: EventLog, *, agent_id: str, policy: RetryPolicy | None = None,
                 limits: DeadLetterLimits | None = None, codec: Codec | None = None) -> None:
        self._log = log_
        self.agent_id = agent_id
        self.policy = policy or RetryPolicy()
        self.limits = limits or DeadLetterLimits()
        self._codec = codec or Codec()
        self.count = 0
        """Dead letters written by this object."""

    @classmethod
    async def open(cls, stores: Stores, *, agent_id: str, policy: RetryPolicy | None = None,
                   limits: DeadLetterLimits | None = None) -> DeadLetters:
        """Dead letters for ``agent_id`` in ``stores`` (the stream is created if need be)."""
        dead = cls(stores.event_log(), agent_id=agent_id, policy=policy, limits=limits)
        await dead._log.ensure(DeadLetter)
        return dead

    async def exhausted(self, delivery: AckableDelivery[Any], *, consumer: str) -> bool:
        """Set aside, without handling it, a delivery that came more often than the policy allows (its
        earlier attempts never concluded: the consumer crashed or hung). ``True`` if it was set aside."""
        if delivery.delivered <= self.policy.max_attempts:
            return False
        reason = f"delivered {delivery.delivered} times without being handled (the consumer crashed or hung)"
        return await self._bury(delivery, reason, consumer=consumer, refused=False)

    async def failed(self, delivery: AckableDelivery[Any], reason: str, *, consumer: str) -> bool:
        """Handling ``delivery`` failed: hand it back for a later try, or, on its last attempt, dead-letter
        it. ``True`` if it was dead-lettered."""
        attempt = delivery.delivered
        if attempt >= self.policy.max_attempts:
            return await self._bury(delivery, reason, consumer=consumer, refused=False)
        log.warning("delivery failed; it will be tried again", consumer=consumer, subject=delivery.subject,
                    attempt=attempt, of=self.policy.max_attempts, reason=reason)
        await _quietly(delivery.nak(self.policy.delay(attempt)))
        return False

    async def refuse(self, delivery: AckableDelivery[Any], reason: str, *, consumer: str) -> bool:
        """Dead-letter ``delivery`` at once: it can never succeed. ``True`` once it is set aside."""
        return await self._bury(delivery, reason, consumer=consumer, refused=True)

    def on_reject(self, consumer: str) -> RejectHook:
        """The hook for :meth:`EventLog.consume`: a stored frame that cannot even be decoded is kept here, with
        the decoder's reason, before the consumer drops it."""

        async def keep(subject: str, data: bytes, reason: str, seq: int) -> None:
            await self.undecodable(subject, data, reason, consumer=consumer, seq=seq)

        return keep

    async def undecodable(self, subject: str, data: bytes, reason: str, *, consumer: str, seq: int) -> bool:
        """Keep a frame that is no valid event (garbage, a bomb, a forged or unsigned envelope). Never raises:
        the frame is dropped by its consumer either way. ``True`` once it is stored."""
        size, digest = len(data), hashlib.sha256(data).hexdigest()
        letter = DeadLetter(
            agent_id=self.agent_id, consumer=consumer, original_subject=subject[:512], event_type="?",
            event_id="", source="?", stream_seq=seq, attempts=1, reason=reason[: self.limits.max_reason],
            refused=True, frame=data if size <= self.limits.max_frame_copy else b"", frame_bytes=size,
            frame_sha256=digest)
        try:
            await self._log.publish(letter)
        except FedbusError as exc:
            log.warning("undecodable frame not kept as a dead letter", consumer=consumer, subject=subject[:200],
                        error=str(exc))
            return False
        self.count += 1
        log.error("undecodable frame set aside as a dead letter", consumer=consumer, subject=subject[:200],
                  bytes=size, reason=letter.reason)
        return True

    def letter(self, delivery: AckableDelivery[Any], reason: str, *, consumer: str, refused: bool
               ) -> DeadLetter:
        """The dead letter for ``delivery`` (not published)."""
        env = delivery.envelope
        try:
            frame = self._codec.pack(env)
        except FedbusError:
            frame = b""
        size, digest = len(frame), hashlib.sha256(frame).hexdigest()
        return DeadLetter(
            agent_id=self.agent_id, consumer=consumer, original_subject=delivery.subject, event_type=env.type,
            event_id=env.id, source=env.src, stream_seq=delivery.seq, attempts=delivery.delivered,
            reason=reason[: self.limits.max_reason], refused=refused,
            frame=frame if size <= self.limits.max_frame_copy else b"", frame_bytes=size, frame_sha256=digest)

    async def _bury(self, delivery: AckableDelivery[Any], reason: str, *, consumer: str, refused: bool) -> bool:
        letter = self.letter(delivery, reason, consumer=consumer, refused=refused)
        try:
            await self._log.publish(letter)
        except FedbusError as exc:  # not stored: keep the original, try again later
            log.warning("dead letter not stored; the delivery is handed back", consumer=consumer,
                        subject=delivery.subject, error=str(exc))
            await _quietly(delivery.nak(self.policy.delay(delivery.delivered)))
            return False
        await _quietly(delivery.term())
        self.count += 1
        log.error("delivery set aside as a dead letter", consumer=consumer, subject=delivery.subject,
                  type=letter.event_type, event_id=letter.event_id, attempts=letter.attempts,
                  refused=refused, reason=letter.reason)
        return True


async def read_dead_letters(log_: EventLog) -> AsyncGenerator[StoredEvent, None]:
    """Every stored dead letter, oldest first (nothing when the stream does not exist yet)."""
    try:
        async for stored in log_.replay(DeadLetter.pattern()):
            yield stored
    except NotFound:
        return


async def _quietly(call: Any) -> None:
    """Ack-family calls: a lost one only means one more delivery, which the policy counts."""
    try:
        await call
    except FedbusError as exc:
        log.warning("acknowledgement not sent", error=str(exc))

