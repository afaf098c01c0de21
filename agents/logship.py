"""Batches a job's output lines into :class:`~fedbus.agents.events.JobLog` events.

Lines are queued without blocking the process pumps; a batch goes out every ``interval_s`` or as soon as
``max_lines`` (or ``max_bytes``) are waiting. The queue is bounded: when the bus cannot keep up, new lines
are dropped and counted, and the next batch says how many (``dropped``), so a chatty job can never eat the
agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from fedbus.bus.errors import FedbusError

from .events import JobLog, LogLine

__all__ = ["LogShipper"]

log = structlog.get_logger("fedbus.agents.logship")


class LogShipper:
    """One node's log stream for one job attempt: :meth:`run` it as a task; :meth:`close` flushes, ends it."""

    def __init__(self, publish: Callable[[JobLog], Awaitable[object]], *, job_id: str, attempt: int,
                 agent_id: str, node_rank: int, interval_s: float = 0.2, max_lines: int = 500,
                 max_bytes: int = 256 * 1024, max_pending: int = 20_000) -> None:
        self._publish = publish
        self._ids = (job_id, attempt, agent_id, node_rank)
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self._lines: deque[LogLine] = deque()
        self._bytes = 0
        self._dropped = 0
        self._seq = 0
        self._wake = asyncio.Event()
        self._closing = False
        self.sent = 0

    def line(self, stream: str, rank: int, text: str) -> None:
        """Queue one line (never blocks; dropped and counted when the queue is full)."""
        if len(self._lines) >= self.max_pending:
            self._dropped += 1
            return
        first = not self._lines
        self._lines.append(LogLine(time.time_ns(), stream, rank, text))
        self._bytes += len(text) + 24
        if first or self._full():
            self._wake.set()

    def _full(self) -> bool:
        return len(self._lines) >= self.max_lines or self._bytes >= self.max_bytes

    async def run(self) -> None:
        """Send batches until :meth:`close`, then what is left. Idle (no timer) while nothing is queued."""
        while not self._closing:
            await self._wake.wait()  # the first line of a batch, a full batch, or close
            self._wake.clear()
            if not self._closing and not self._full():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):  # let the batch fill a little
                        await self._wake.wait()
                self._wake.clear()
            await self._flush()
            if self._lines:
                self._wake.set()
        while self._lines or self._dropped:
            await self._flush()

    def close(self) -> None:
        """Ask :meth:`run` to flush the rest and return."""
        self._closing = True
        self._wake.set()

    async def _flush(self) -> None:
        if not self._lines and not self._dropped:
            return
        batch: list[LogLine] = []
        size = 0
        while self._lines and len(batch) < self.max_lines and size < self.max_bytes:
            item = self._lines.popleft()
            batch.append(item)
            size += len(item.text) + 24
        self._bytes = max(self._bytes - size, 0)
        dropped, self._dropped = self._dropped, 0
        self._seq += 1
        job_id, attempt, agent_id, node_rank = self._ids
        try:
            await self._publish(JobLog(job_id=job_id, attempt=attempt, agent_id=agent_id, node_rank=node_rank,
                                       seq=self._seq, lines=batch, dropped=dropped))
            self.sent += len(batch)
        except FedbusError as exc:
            self._dropped += dropped + len(batch)
            log.warning("log batch not published", job_id=job_id, lines=len(batch), error=str(exc))
            if self._closing:
                self._lines.clear()
                self._dropped = 0  # give up at the end rather than loop on a dead broker
            else:
                await asyncio.sleep(self.interval_s)

