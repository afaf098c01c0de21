"""A small Prometheus registry: counters and gauges with labels, rendered in the text exposition format."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Metrics"]

LabelKey = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Family:
    kind: str
    help: str
    values: dict[LabelKey, float] = field(default_factory=dict)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters (``*_total``) and gauges of one process; :meth:`render` is what ``/metrics`` serves."""

    def __init__(self, *, prefix: str = "fedbus_", const_labels: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.const_labels = dict(const_labels or {})
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, help: str) -> None:
        """Declare a counter (its name should end in ``_total``)."""
        self._families.setdefault(name, _Family("counter", help))

    def gauge(self, name: str, help: str) -> None:
        """Declare a gauge."""
        self._families.setdefault(name, _Family("gauge", help))

    def _family(self, name: str, kind: str) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(kind, name.replace("_", " "))
        return family

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        family = self._family(name, "counter")
        key = tuple(sorted(labels.items()))
        family.values[key] = family.values.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        self._family(name, "gauge").values[tuple(sorted(labels.items()))] = float(value)

    def value(self, name: str, **labels: str) -> float:
        """The current value (0 when never set)."""
        family = self._families.get(name)
        return 0.0 if family is None else family.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition of every family."""
        lines: list[str] = []
        for name in sorted(self._families):
            family = self._families[name]
            full = self.prefix + name
            lines.append(f"# HELP {full} {_escape(family.help)}")
            lines.append(f"# TYPE {full} {family.kind}")
            for key, value in sorted(family.values.items()):
                labels = {**self.const_labels, **dict(key)}
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{full}{{{text}}} {value:g}" if text else f"{full} {value:g}")
        return "\n".join(lines) + "\n"
