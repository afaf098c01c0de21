"""What a GPU agent remembers of the awards it saw, across restarts: a replayed award is refused.

The bus refuses an event id it has seen, but only while the process lives; an award captured off the wire
and sent again after the agent restarted would run its job a second time. :class:`AwardBook` keeps, in a
small JSON file in the state dir, the envelope ids of the awards seen and the ``(job_id, attempt)`` pairs
accepted. It is written atomically (temp file, fsync, rename) before the agent answers an award, so a
crash right after an accept cannot forget it.

Bounded: entries older than ``max_age_s`` are pruned (an award that old is past its ``accept_by_ns`` and
outside the bus's replay window anyway), and at most ``max_entries`` of each kind are kept, the newest.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import structlog

__all__ = ["AwardBook"]

log = structlog.get_logger("fedbus.agents.awards")


class AwardBook:
    """Seen award ids and accepted attempts, persisted in ``path``."""

    def __init__(self, path: Path, *, max_age_s: float = 86_400.0, max_entries: int = 4096) -> None:
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._seen: dict[str, float] = {}
        self._accepted: dict[str, float] = {}
        self._load()

    @staticmethod
    def _attempt_key(job_id: str, attempt: int) -> str:
        return f"{job_id}#{attempt}"

    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def accepted(self, job_id: str, attempt: int) -> bool:
        return self._attempt_key(job_id, attempt) in self._accepted

    def record(self, event_id: str, *, accepted: tuple[str, int] | None = None,
               now: float | None = None) -> None:
        """Remember an award's envelope id (and the attempt it made us run); written before returning."""
        now = time.time() if now is None else now
        self._seen[event_id] = now
        if accepted is not None:
            self._accepted[self._attempt_key(*accepted)] = now
        self._prune(now)
        self._save()

    def __len__(self) -> int:
        return len(self._seen) + len(self._accepted)

    def _prune(self, now: float) -> None:
        horizon = now - self.max_age_s
        for book in (self._seen, self._accepted):
            for key in [k for k, t in book.items() if t < horizon]:
                del book[key]
            if len(book) > self.max_entries:  # dicts keep insertion order: the oldest come first
                for key in list(book)[: len(book) - self.max_entries]:
                    del book[key]

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            seen = {str(k): float(v) for k, v in data["seen"].items()}
            accepted = {str(k): float(v) for k, v in data["accepted"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Refusing to start would let one bad write stop the node for good; the bus's replay window
            # and ``accept_by_ns`` still cover what is lost. Say so loudly.
            log.error("unreadable award record; starting with an empty one", path=str(self.path),
                      error=str(exc))
            return
        self._seen = dict(sorted(seen.items(), key=lambda kv: kv[1]))
        self._accepted = dict(sorted(accepted.items(), key=lambda kv: kv[1]))
        self._prune(time.time())

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = json.dumps({"seen": self._seen, "accepted": self._accepted}, separators=(",", ":"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, self.path)
