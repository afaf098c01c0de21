"""Batched telemetry: points are buffered and sent as one ``edge.metrics`` event every N points or T seconds.

Pure logic, no I/O: :class:`EdgeClient` owns the timer and the publishing. The batch payload has the fields
of ``fedbus.bus.catalogue.EdgeMetrics``: ``device_id``, ``seq`` and ``points`` (``name``, ``value``,
``time`` in ns, ``step``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from .errors import EdgeError

__all__ = ["METRICS_TYPE", "MetricsBatcher"]

METRICS_TYPE = "edge.metrics"
_MAX_NAME = 256


class MetricsBatcher:
    """Collects points; :meth:`take` hands out a batch payload when one is due: once it holds
    ``max_points`` points, or once its oldest point is ``max_age_s`` seconds old."""

    def __init__(self, device_id: str, *, max_points: int = 100, max_age_s: float = 10.0) -> None:
        if max_points < 1 or max_age_s <= 0:
            raise EdgeError("max_points must be >= 1 and max_age_s > 0")
        self.device_id = device_id
        self.max_points = max_points
        self.max_age_s = max_age_s
        self._points: list[dict[str, Any]] = []
        self._oldest: float | None = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._points)

    def add(self, metrics: Mapping[str, float], *, step: int | None = None,
            time_ns: int | None = None) -> None:
        """Buffer one point per metric name, all with the same time and step."""
        now = time.time_ns() if time_ns is None else time_ns
        points = []
        for name, value in metrics.items():
            if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
                raise EdgeError(f"a metric name is a non-empty string of at most {_MAX_NAME} characters: "
                                f"{name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EdgeError(f"metric {name!r} must be a finite number, not {value!r}")
            points.append({"name": name, "value": float(value), "time": now, "step": step})
        if points and self._oldest is None:
            self._oldest = time.monotonic()
        self._points.extend(points)

    def due(self, *, now: float | None = None) -> bool:
        """Whether a batch should be sent now (full, or its oldest point is old enough)."""
        if not self._points:
            return False
        if len(self._points) >= self.max_points:
            return True
        assert self._oldest is not None
        return (time.monotonic() if now is None else now) - self._oldest >= self.max_age_s

    def take(self) -> dict[str, Any] | None:
        """The next batch payload (at most ``max_points`` points), or ``None`` when empty."""
        if not self._points:
            return None
        batch, self._points = self._points[: self.max_points], self._points[self.max_points:]
        self._oldest = time.monotonic() if self._points else None
        self._seq += 1
        return {"device_id": self.device_id, "seq": self._seq, "points": batch}
